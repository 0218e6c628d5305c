"""Examples: search and filter the run's examples; picking one selects it on every page."""

import pandas as pd
import streamlit as st

from lake import queries
from lake.queries import parse_json
from streamlit_app import filters, state, views

PAGE = 50

c = state.ctx()
st.title("Examples")
st.caption(f"Run **{c.run}** · {c.info.get('model')} · manifest `{c.info.get('manifest')}`")


def sentence(text: str) -> str:
    """A one-line message as a sentence: a capital first letter and a full stop."""
    t = text.strip()
    t = t[:1].upper() + t[1:]
    return t if t.endswith((".", "!", "?", "…")) else t + "."


def live_example() -> None:
    """The "Add a live example" section: an uploaded image and a text through the run's own model,
    appended to the run as a new chunk (``pipeline/live.py``), then selected."""
    done = st.session_state.pop("_live_added", None)
    if done:
        st.success(done)
    with st.expander("Add a live example"):
        try:
            from pipeline import live
        except Exception as e:  # noqa: BLE001 - the app can run without the pipeline's torch
            st.info(f"Live examples need the pipeline's dependencies (torch, transformers): {e}")
            return
        why = live.unavailable(c.lake, c.run)
        if why:
            st.info(f"Live examples are not available for run **{c.run}**: {why}.")
            return
        n = st.session_state.get("_live_n", 0)  # a new set of widgets after each added example
        st.caption(f"Upload an image and type a question or text: the run's model ({c.info.get('model')}) runs on "
                   f"it with the run's capture configuration and the example is added to run **{c.run}** "
                   f"(split `{live.LIVE_SPLIT}`). Up to {live.MAX_UPLOAD_BYTES // 2**20} MB and "
                   f"{live.MAX_UPLOAD_PIXELS // 1_000_000} megapixels; the text up to {live.MAX_TEXT_CHARS:,} characters.")
        # the uploader states the app's own limit ("20MB per file"), not Streamlit's default 200 MB
        up = st.file_uploader("Image", type=list(live.UPLOAD_TYPES), key=f"live_file_{n}",
                              max_upload_size=live.MAX_UPLOAD_BYTES // 2**20)
        # no max_chars: the browser would drop a longer paste silently; a long text is kept and said so
        text = st.text_input("Question or text", key=f"live_text_{n}")
        if len(text.strip()) > live.MAX_TEXT_CHARS:
            st.warning(f"The question or text has {len(text.strip()):,} characters, more than the limit of "
                       f"{live.MAX_TEXT_CHARS:,}: shorten it before running the model (what you typed is kept).")
        answer = st.text_input("Answer (optional)", key=f"live_answer_{n}")
        if not st.button("Run the model and add the example", key="live_add", type="primary"):
            return
        if up is None:
            st.error("Choose an image to upload first.")
            return
        try:
            with st.spinner("Running the model…"):
                res = live.add_live_example(c.lake, c.run, up.getvalue(), text, answer or None)
        except live.LiveError as e:
            st.error(sentence(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - never a traceback: one line
            said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            st.error(sentence(f"Adding the example failed: {said}"))
            return
    state.reload_lake()
    state.set_value("ex", res.example_id)
    if state.example_filter().is_empty():  # the table's last page holds it
        state.set_value("expage", max(1, -(-(c.n_examples + 1) // PAGE)))
    st.session_state["_live_n"] = n + 1
    hidden = "" if state.example_filter().is_empty() else " (the filters may hide it from the table)"
    st.session_state["_live_added"] = (
        f"Added live example #{res.example_id} (`{res.source_id}`): "
        + ("the model gives no prediction" if res.prediction is None else f"the model predicts **{res.prediction}**")
        + f" (on {res.device}){'; ' + res.note if res.note else ''}{hidden}.")
    st.rerun()


live_example()
if not c.n_examples:
    st.info(f"Run **{c.run}** has no examples yet (status: {c.info.get('status')}). "
            "If it is still being extracted, press ↻ Reload lake in the sidebar later.")
    st.stop()

filters.filter_widgets(c.run)

flt = state.example_filter()
n = state.q(queries.count_examples, c.run, flt)
pages = max(1, -(-n // PAGE))
h1, h2 = st.columns([4, 1])
expage = state.get("expage") if isinstance(state.get("expage"), int) else 1
if not 1 <= expage <= pages:  # the filter shrank the table
    expage = 1
state.set_value("expage", expage)  # the page is in the URL (``expage``); the widget mirrors it
st.session_state["ex_page"] = expage
page = h2.number_input("Page", min_value=1, max_value=pages, step=1, key="ex_page",
                       on_change=lambda: state.set_value("expage", int(st.session_state["ex_page"]))) \
    if pages > 1 else 1
h1.markdown(f"**{n}** of {c.n_examples} examples match ({flt.describe()}). Click a row to select it everywhere.")
if n == 0:
    st.info("No example matches these filters; loosen them.")
    st.stop()

rows = state.q(queries.examples, c.run, flt, limit=PAGE, offset=(int(page) - 1) * PAGE)
table = state.examples_table(rows)


def vector_examples() -> set[int] | None:
    """The examples whose hidden vectors are stored, None when that is every example (or the run has no
    hidden states: the Hidden states page says so)."""
    if state.q(queries.hidden_layers, c.run).empty:
        return None
    ids = set(int(i) for i in state.q(queries.hidden_vector_examples, c.run).example_id)
    return None if len(ids) >= c.n_examples else ids


with_vec = vector_examples()
if with_vec is not None:
    table.insert(table.columns.get_loc("example_id") + 1, "vectors", table.example_id.isin(with_vec))


def _pick() -> None:
    sel = st.session_state["ex_table"].selection.rows
    if sel:
        state.set_value("ex", int(table.example_id.iloc[sel[0]]))


st.dataframe(
    table, key="ex_table", on_select=_pick, selection_mode="single-row", hide_index=True,
    width="stretch", height=min(42 + 61 * len(table), 640), row_height=60,
    column_config={
        "image": st.column_config.ImageColumn("image", width="small"),
        "example_id": st.column_config.NumberColumn("id", format="%d", width="small"),
        "text": st.column_config.TextColumn("text", width="large"),
        "correct": st.column_config.CheckboxColumn("correct"),
        "vectors": st.column_config.CheckboxColumn(
            "vectors", help="its hidden vectors are stored (the Hidden states page's map and neighbours need them)"),
    },
)
if with_vec is not None:
    keep = c.capture.get("keep_hidden", "?")
    st.caption(f"**vectors**: this run stores the hidden-state norms of every example but the hidden vectors of "
               f"{len(with_vec)} of its {c.n_examples} examples only (`--keep-hidden {keep}`): "
               + (", ".join(f"#{i}" for i in sorted(with_vec)[:30]) + (" …" if len(with_vec) > 30 else "")
                  if with_vec else "none") + ".")

ex = c.example
st.subheader(f"Selected: #{ex['example_id']}")
a, b = st.columns([1, 2])
img = state.image_bytes(ex["image_id"]) if ex.get("image_id") else None
if img:
    a.image(img, width="stretch", caption=f"{ex['image_width']} × {ex['image_height']} px, "
                                          f"{ex['grid_h']} × {ex['grid_w']} patches")
else:
    a.info("This example's image is not in the lake.")
b.markdown(f"> {ex['text']}")
mark = "" if pd.isna(ex["correct"]) else "✅" if ex["correct"] else "❌"
answer = views.answer_line(ex["answer"])
prediction = views.prediction_line(ex["prediction"]) + ("" if pd.isna(ex["prediction"]) else f" {mark}")
b.markdown(f"{answer} · {prediction} · split {ex['split']} · source id `{ex['source_id']}`")
meta = parse_json(ex.get("meta"))
if meta:
    b.markdown(" · ".join(f"{k} **{v}**" for k, v in meta.items()))
b.page_link("app_pages/head_summary.py", label="Head summary of this example", icon=":material/grid_on:")
b.page_link("app_pages/attention.py", label="Attention of this example", icon=":material/visibility:")

errors = state.q(queries.run_errors, c.run)
if len(errors):
    with st.expander(f"⚠️ {len(errors)} manifest rows were skipped or altered by the run"):
        st.dataframe(errors, hide_index=True, width="stretch")
