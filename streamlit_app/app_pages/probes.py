"""Probes: what a linear classifier reads from the stored vectors, layer by layer, beside its control task.

A probe's rows come from the ``probes`` table (``vlatlas probe``, or the form at the bottom of this page,
which runs one on the run's stored vectors without a model). The page shows its score at every layer of
every stream with the control task's (the same probe on labels permuted across examples), marks the layers
whose permutation p-value is under 0.05, and draws the out-of-fold confusion matrix at one layer.
"""

import json

import streamlit as st

from lake import queries
from lake.queries import SIGNIFICANT
from streamlit_app import charts, export, state

c = state.ctx()
st.title("Probes")
st.caption("Does a layer *encode* a property? A linear probe is trained on the stored vectors of chosen tokens "
           "to predict it (k-fold cross-validation, folds grouped by example), and the same probe on labels "
           "permuted across examples (the control task) says how much a probe finds with no signal at all. "
           "**Selectivity** = score − control; **p** = the permutation test's p-value.")

probes = state.q(queries.probe_keys, c.run)
if probes.empty:
    st.info(f"Run **{c.run}** has no probes yet. Run one below, or with "
            f"`vlatlas probe --lake {c.lake} --run {c.run} --target COLUMN`.")
else:
    keys = probes.probe.tolist()
    about = {r.probe: r for r in probes.itertuples(index=False)}
    state.choose("probe", keys)
    st.selectbox("Probe", keys, format_func=lambda k: f"{about[k].target} · tokens {about[k].selector} · "
                 f"{about[k].source}", help="target · the tokens whose vectors are the features · the vectors' "
                 "source (hidden states, or a captured module)", **state.bind("probe"))
    key = state.get("probe")
    rows = state.q(queries.probe_rows, c.run, key)
    p = about[key]
    metric = str(p.metric)
    what = {"accuracy": "accuracy (share of held-out vectors classified right)",
            "r2": "R² on held-out vectors"}.get(metric, metric)
    export.show_chart(charts.probe_curve(rows, metric=metric, significant=SIGNIFICANT),
                      f"probe-{c.run}-{p.target}-{p.selector}", rows,
                      context=f"Probe · run {c.run} · target {p.target} · tokens {p.selector} · {p.source}")
    first = rows.iloc[0]
    st.caption(f"Solid line: the probe's {what}, {int(first.folds)}-fold cross-validated with every example's "
               f"tokens in one fold; dashed: the control task, the mean over {int(first.permutations)} "
               f"permutations of the labels across examples. Filled points: p < {SIGNIFICANT:g} (the probe beat "
               f"every permutation but a few: p = (1 + permutations scoring at least as high) / "
               f"(1 + {int(first.permutations)})). Layer 0 of hidden states is the embedding output.")
    lines = []
    for stream, g in rows.groupby("stream", sort=True):
        hit = g[(g.p_value < SIGNIFICANT) & (g.selectivity > 0)]
        best = g.loc[g.value.idxmax()]
        if len(hit):
            h = hit.iloc[0]
            lines.append(f"- `{stream}`: first above its control at **layer {int(h.layer)}** ({metric} "
                         f"{h.value:.3f} vs control {h.control:.3f}, p = {h.p_value:.3g}); best at layer "
                         f"{int(best.layer)} ({best.value:.3f}).")
        else:
            lines.append(f"- `{stream}`: at no layer above its control at p < {SIGNIFICANT:g} (best {metric} "
                         f"{best.value:.3f} at layer {int(best.layer)}, control {best.control:.3f}).")
    st.markdown("\n".join(lines))

    if metric == "accuracy" and rows.confusion.notna().any():
        st.markdown("#### Confusion matrix at one layer")
        m1, m2 = st.columns([1, 3])
        streams = sorted(rows.stream.unique().tolist())
        state.choose("pstream", streams)
        m1.selectbox("Stream", streams, disabled=len(streams) < 2, **state.bind("pstream"))
        in_stream = rows[rows.stream == state.get("pstream")]
        layers = [int(x) for x in in_stream.layer]
        best_layer = int(in_stream.loc[in_stream.value.idxmax(), "layer"])
        state.choose("player", layers, default=best_layer)
        m1.selectbox("Layer", layers, help="the best layer is chosen first", **state.bind("player"))
        r = in_stream[in_stream.layer == state.get("player")].iloc[0]
        conf = json.loads(r.confusion) if isinstance(r.confusion, str) else None
        with m2:
            if not conf or not conf.get("labels"):
                st.info("This layer has no confusion matrix.")
            else:
                export.show_chart(charts.confusion_heatmap(conf["labels"], conf["counts"]),
                                  f"probe-confusion-{c.run}-{p.target}-{r.stream}-{int(r.layer)}",
                                  context=f"Probe confusion · run {c.run} · target {p.target} · stream {r.stream} · "
                                          f"layer {int(r.layer)}")
                st.caption(f"Rows: the true **{p.target}**; columns: the probe's prediction for each vector while "
                           f"it was held out. Stream `{r.stream}`, layer {int(r.layer)}: accuracy {r.value:.3f} over "
                           f"{int(r.n_vectors)} vectors of {int(r.n)} examples (control {r.control:.3f}).")
    with st.expander("All rows of this probe"):
        st.dataframe(rows.drop(columns=["confusion"]), hide_index=True, width="stretch")


# -- a new probe, run here on the stored vectors ------------------------------------------------
st.markdown("#### Run a new probe")


@st.cache_data(show_spinner=False, ttl=120)
def _targets(root: str, run: str) -> list[str]:
    from pipeline.probe import probe_targets

    return probe_targets(state.catalog(root), run)


from pipeline.live import read_only  # noqa: E402 - no torch in either: the app imports torch only for live examples
from pipeline.probe import SELECTORS, ProbeError, ProbeSpec, run_probe, write_probes  # noqa: E402

try:
    targets = _targets(c.lake, c.run)
except ProbeError as e:
    targets = []
    st.info(str(e))
if targets:
    modules = state.q(queries.stored_modules, c.run)
    sources = ["hidden", *modules.module.tolist()]
    with st.form("new_probe"):
        f1, f2, f3 = st.columns(3)
        target = f1.selectbox("Target", targets, help="`answer`, or a column of the manifest (the examples' meta)")
        selector = f2.selectbox("Tokens", list(SELECTORS), help=(
            "image-in-box: the image tokens whose patch centre lies in the example's first box · word: the text "
            "token naming the first box's label · last: the prompt's last text token · mean-image: the mean of "
            "the image tokens"))
        source = f3.selectbox("Vectors", sources, help="hidden states, or a module captured with --capture-modules")
        f4, f5, _ = st.columns(3)
        folds = f4.number_input("Folds", min_value=2, max_value=10, value=5)
        perms = f5.number_input("Permutations (control task)", min_value=1, max_value=200, value=20,
                                help="p-values go down to 1 / (1 + permutations)")
        go = st.form_submit_button("Run the probe", type="primary")
    if go:
        spec = ProbeSpec(target=target, selector=selector, source=source, folds=int(folds), permutations=int(perms))
        bar = st.progress(0.0, text="reading the vectors…")

        def _progress(done: int, total: int, what: str) -> None:
            bar.progress(min(1.0, done / max(total, 1)), text=f"{what} ({done} of {total})")

        try:
            new = run_probe(state.catalog(c.lake), c.run, spec, progress=_progress)
        except ProbeError as e:
            bar.empty()
            st.error(str(e))
        else:
            bar.empty()
            if read_only():
                st.info("This app serves the lake read-only: the probe's rows are shown here, not stored.")
                st.dataframe(new.drop(columns=["confusion"]), hide_index=True, width="stretch")
            else:
                write_probes(state.catalog(c.lake), c.run, new)
                state.reload_lake()
                state.set_value("probe", spec.key)
                st.rerun()
