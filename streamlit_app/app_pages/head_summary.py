"""Head summary: one statistic for every layer × head, of one example or the mean over filtered examples."""

import streamlit as st

from lake import queries
from lake.queries import NORM_LABELS, NORMS
from streamlit_app import charts, export, state

ATTENTION = "app_pages/attention.py"

c = state.ctx()
if st.session_state.pop("_hs_open", False):  # a click on a cell (its callback set the head): open it
    st.switch_page(ATTENTION)
st.title("Head summary")
state.require_examples(c, "no statistics to show")

s1, s2, s3, s4 = st.columns([1.2, 2, 2.2, 3])
stream = state.pick_stream(c, s1)
state.ensure_head(c, stream)  # a first view selects the run's most telling head
avail = state.q(queries.stats_available, c.run, stream) if stream else None
if avail is None or avail.empty:
    st.info(f"Run **{c.run}** has no head statistics for stream `{stream}`.")
    st.stop()
counts = dict(zip(avail.stat, avail.n_values))
help_ = state.stat_help()
stats = avail.stat.tolist()
state.choose("stat", stats, default="t2i" if counts.get("t2i") else next((s for s in stats if counts[s]), stats[0]))
s2.selectbox("Statistic", stats, format_func=lambda s: s if counts[s] else f"{s} (no values)",
             help="\n".join(f"- **{s}**: {help_.get(s, '')}" for s in stats), **state.bind("stat"))
state.choose("scope", ["example", "filtered"])
s3.radio("Of", ["example", "filtered"], horizontal=True, **state.bind("scope"),
         format_func=lambda s: f"example #{c.example['example_id']}" if s == "example"
         else f"mean of {c.n_filtered} filtered")
state.choose("norm", list(NORMS))
s4.radio("Normalisation", list(NORMS), format_func=NORM_LABELS.get, horizontal=True, **state.bind("norm"))
stat, scope, norm = state.get("stat"), state.get("scope"), state.get("norm")
if f"{stat}_nosink" in counts:  # --explain sinks: the same statistic with the sink tokens left out
    state.choose("nosink", [False, True], default=False)
    st.toggle("Leave sink tokens out", help="tokens with a massive activation (|h_d| / rms(h) >= 20) in the layer's "
              f"input, which draw attention whatever the content: show `{stat}_nosink`, the statistic with them "
              "left out of every row (renormalised)", **state.bind("nosink"))
    if state.get("nosink"):
        stat = f"{stat}_nosink"

if scope == "example":
    m = state.q(queries.head_stat_matrix, c.run, stream, stat, example_id=int(c.example["example_id"]), norm=norm)
    what = f"example #{c.example['example_id']}"
else:
    m = state.q(queries.head_stat_matrix, c.run, stream, stat, flt=c.flt, norm=norm)
    what = f"the mean over the {c.n_filtered} examples that pass the filter ({c.flt.describe()})"
definition = help_.get(stat, stat)
if m.empty or m.raw.notna().sum() == 0:
    st.info(f"**{stat}** has no values for {what} in stream `{stream}`: {definition}. "
            "Statistics over a query set that is empty (e.g. `grounding` without boxes in the manifest) are null.")
    st.stop()


def _clicked() -> None:
    """Select the clicked head and open it on the Attention page (the rerun this callback precedes
    switches page before drawing anything: ``st.switch_page`` is not for callbacks)."""
    cell = st.session_state["hs_chart"].selection.get("cell") or []
    if cell:
        state.set_value("layer", int(cell[0]["layer"]))
        state.set_value("head", "mean" if cell[0]["col"] == "mean" else int(cell[0]["col"]))
        st.session_state["_hs_open"] = True


# A blank or one-coloured map says why: a statistic with one value at every head (``sink_mass`` of a
# run where no token is a sink), or the whole run z-scored against itself (0 at every head by definition).
raw = m.raw.dropna()
if len(raw) and float(raw.max() - raw.min()) <= 1e-12 * max(1.0, float(raw.abs().max())):
    v = float(raw.iloc[0])
    if stat == "sink_mass" and v == 0:
        who = (f"example #{c.example['example_id']}" if scope == "example" else f"run **{c.run}**"
               if c.n_filtered == c.n_examples else f"the {c.n_filtered} filtered examples")
        st.info(f"No sink tokens were found in {who}: **sink_mass** is 0 for every head (no token's activation "
                "in a layer's input reached |h_d| / rms(h) >= 20), so the map has one colour.")
    else:
        st.info(f"**{stat}** is {v:.4g} for every head of {what}, so the map has one colour"
                + (" (and its z-scores, which divide by a spread of 0, are undefined)." if norm != "raw" else "."))
elif norm == "z_dataset" and scope == "filtered" and c.n_filtered == c.n_examples:
    st.info(f"Z-scored against the whole run, the mean over every example of run **{c.run}** is each head's own "
            "run mean, so every z-score is 0 and the map is blank. Pick one example (**Of**), filter the examples "
            "(Examples page), or choose **raw value** under Normalisation to see the heads differ.")


legend = stat if norm == "raw" else f"{stat} (z)"
left, right = st.columns([3, 2])
with left:
    export.show_chart(charts.head_heatmap(m, value_title=legend, diverging=norm != "raw",
                                          selected=(state.get("layer"), state.get("head"))),
                      f"head-summary-{c.run}-{stream}-{stat}-{norm}", on_select=_clicked, selection_mode="cell",
                      key="hs_chart", width="content",
                      context=f"Head summary · run {c.run} · stream {stream} · {stat} ({NORM_LABELS[norm]}) · "
                              f"{what}")
    st.caption(f"Each cell is one head `(stream {stream}, layer, head)` — rows are layers (0 at the top), "
               f"columns heads; the last column is the layer's mean over heads. Colour: **{stat}** — {definition} — "
               f"for {what}; {NORM_LABELS[norm]}. Attention is read query → key: `weight = A[query, key]`.")
with right:
    st.markdown(f"#### `{stat}`\n{definition}.")
    st.markdown({"raw": "Values as stored.",
                 "z_example": "Each cell minus the mean over all layers × heads shown, divided by their standard "
                              "deviation: which heads stand out *within* this selection.",
                 "z_dataset": "Each cell minus that head's mean over every example of the run, divided by that "
                              "head's standard deviation: how unusual this selection is *for that head*."}[norm])
    layer, head = state.get("layer"), state.get("head")
    shown = m[(m.layer == layer) & ((m["head"] == head) if head != "mean" else True)]
    if len(shown):
        st.metric(f"layer {layer}, {'mean over heads' if head == 'mean' else f'head {head}'}",
                  f"{shown.value.mean():.4f}", help=f"raw {stat}: {shown.raw.mean():.4f}")
    st.caption("Click a cell to open that head on the Attention page (the *mean* column: the mean over heads).")
    st.page_link(ATTENTION, label=f"Open layer {layer}, head {head} on the Attention page",
                 icon=":material/visibility:")

# -- the examples on which the selected head scores highest ---------------------------------------
layer, head = state.get("layer"), state.get("head")
among = c.flt if scope == "filtered" else None
who = f"the {c.n_filtered} filtered examples" if among is not None and not among.is_empty() else "all examples"
head_name = "the mean over heads" if head == "mean" else f"head {head}"
st.markdown(f"#### Top examples for layer {layer}, {head_name}")
top = state.q(queries.top_examples, c.run, stream, int(layer), None if head == "mean" else int(head), stat, n=20,
              flt=among)
if top.empty:
    st.info(f"No example has a value of **{stat}** at layer {layer}, {head_name}.")
else:
    def _pick_top() -> None:
        rows = st.session_state["hs_top"].selection.rows
        if rows:
            state.set_value("ex", int(top.example_id.iloc[rows[0]]))

    st.dataframe(top.rename(columns={"value": stat}), key="hs_top", on_select=_pick_top,
                 selection_mode="single-row", hide_index=True, width="stretch",
                 column_config={"example_id": st.column_config.NumberColumn("id", format="%d", width="small"),
                                "correct": st.column_config.CheckboxColumn("correct")})
    st.caption(f"The 20 of {who} with the highest raw **{stat}** at layer {layer}, {head_name} "
               f"(stream `{stream}`). Click a row to select that example.")
