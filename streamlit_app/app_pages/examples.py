"""Examples: search and filter the run's examples; picking one selects it on every page."""

import pandas as pd
import streamlit as st

from lake import queries
from lake.queries import parse_json
from streamlit_app import state

PAGE = 50

c = state.ctx()
st.title("🗂️ Examples")
st.caption(f"Run **{c.run}** · {c.info.get('model')} · manifest `{c.info.get('manifest')}`")
if not c.n_examples:
    st.info(f"Run **{c.run}** has no examples yet (status: {c.info.get('status')}). "
            "If it is still being extracted, press ↻ Reload lake in the sidebar later.")
    st.stop()

any_ = "any"
f1, f2, f3, f4 = st.columns([3, 2, 2, 2])
f1.text_input("Search text", placeholder="words in the text…", **state.bind("q"))
for col, name, column, label in ((f2, "answer", "answer", "Answer"), (f3, "pred", "prediction", "Prediction")):
    values = [None, *state.q(queries.distinct_values, c.run, column).value.tolist()]
    state.choose(name, values, default=None)
    col.selectbox(label, values, format_func=lambda v: any_ if v is None else v, placeholder=any_,
                  **state.bind(name))
state.choose("correct", [None, True, False], default=None)
f4.selectbox("Prediction is", [None, True, False], placeholder=any_, **state.bind("correct"),
             format_func=lambda v: any_ if v is None else "✅ correct" if v else "❌ wrong")
g1, g2, g3, _ = st.columns([2, 2, 3, 2])
splits = [None, *state.q(queries.distinct_values, c.run, "split").value.tolist()]
state.choose("split", splits, default=None)
g1.selectbox("Split", splits, format_func=lambda v: any_ if v is None else v, placeholder=any_,
             **state.bind("split"))
keys = [None, *state.q(queries.meta_keys, c.run).key.tolist()]
state.choose("mkey", keys, default=None)
g2.selectbox("Metadata key", keys, format_func=lambda v: "—" if v is None else v, placeholder="—",
             **state.bind("mkey"))
mvals = [None] + (state.q(queries.meta_values, c.run, state.get("mkey")).value.tolist() if state.get("mkey") else [])
state.choose("mval", mvals, default=None)
g3.selectbox("Metadata value", mvals, format_func=lambda v: any_ if v is None else v, placeholder=any_,
             disabled=not state.get("mkey"), **state.bind("mval"))

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
b.markdown(f"answer **{ex['answer']}** · prediction **{ex['prediction']}** {mark} · split {ex['split']} · "
           f"source id `{ex['source_id']}`")
meta = parse_json(ex.get("meta"))
if meta:
    b.markdown(" · ".join(f"{k} **{v}**" for k, v in meta.items()))
b.page_link("app_pages/head_summary.py", label="Head summary of this example", icon="🧠")
b.page_link("app_pages/attention.py", label="Attention of this example", icon="🔍")

errors = state.q(queries.run_errors, c.run)
if len(errors):
    with st.expander(f"⚠️ {len(errors)} manifest rows were skipped or altered by the run"):
        st.dataframe(errors, hide_index=True, width="stretch")
