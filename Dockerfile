# The VL-Atlas app on the demo lake: docker build -t vlatlas . && docker run -p 8501:8501 vlatlas
FROM python:3.11-slim
WORKDIR /app
# torch first, so that the project's `torch>=2.4` is already met. For a smaller image pass a
# CPU-only wheel index: --build-arg TORCH_INDEX="--index-url <your CPU wheel index>".
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY lake lake
COPY streamlit_app streamlit_app
RUN pip install --no-cache-dir -e . && vlatlas demo --lake /app/demo_lake --no-app --quiet
ENV STREAMLIT_SERVER_ADDRESS=0.0.0.0
EXPOSE 8501
CMD ["vlatlas", "app", "--lake", "/app/demo_lake", "--headless", "--port", "8501"]
