"""Compare: two groups of examples, head by head — B − A, an effect size, and a test per head
corrected for the number of heads; drill into a head to see the examples that drive it."""

import pandas as pd
import streamlit as st

from lake import queries
from lake import compare as cmp
from lake.queries import ExampleFilter
from streamlit_app import charts, export, filters, state, views

TOP = 5  # driving examples listed per group
ATTENTION = "app_pages/attention.py"

c = state.ctx()
st.title("Compare")
state.require_examples(c, "nothing to compare")
st.button("Reset the comparison", on_click=state.COMPARE.reset,
          help="this page's statistic, groups, test, correction, ranking and drilled head back to their defaults")

# -- group B: a slice of this run, or another run over the same manifest ------------------------
others = state.q(queries.runs_same_manifest, c.run)
other_runs = [r for r, n in zip(others.run, others.n_examples) if pd.notna(n) and n > 0]
state.choose("cmp_b_run", [None, *other_runs], default=None)
if not st.session_state.get("_cmp_seeded"):  # a first visit with nothing chosen: right vs wrong answers
    st.session_state["_cmp_seeded"] = True
    if (state.get("cmp_b_run") is None and state.example_filter("a_").is_empty()
            and state.example_filter("b_").is_empty()
            and state.q(queries.count_examples, c.run, ExampleFilter(correct=True))
            and state.q(queries.count_examples, c.run, ExampleFilter(correct=False))):
        state.set_value("a_correct", True)
        state.set_value("b_correct", False)
b_run = state.get("cmp_b_run")
paired = b_run is not None
mode = "paired" if paired else "independent"


def _mode_changed() -> None:
    state.set_value("cmp_b_run", other_runs[0] if st.session_state["w_cmp_mode"] == "run" and other_runs else None)
    state.set_value("cmp_head", [])


left, right = st.columns(2, gap="large")
with left:
    box_a = st.container(border=True)
with right:
    box_b = st.container(border=True)
box_b.markdown("#### Group B")
st.session_state["w_cmp_mode"] = "run" if paired else "slice"
box_b.radio("B is", ["slice", "run"], key="w_cmp_mode", on_change=_mode_changed, horizontal=True,
            disabled=not other_runs,
            format_func=lambda m: "a slice of this run" if m == "slice" else "another run over the same manifest",
            help="Another run: another model or checkpoint over the same manifest (`runs.manifest`), compared "
                 "example by example." + ("" if other_runs else " No other run in this lake has this run's "
                                                                 "manifest."))
if paired:
    box_a.markdown(f"#### Group A: run `{c.run}`")
    box_a.caption("Filter (applied to both runs; an example is compared when it passes it in both)")
    filters.filter_widgets(c.run, "a", box_a, wide=False)
    box_b.selectbox("Run B", other_runs, **state.bind("cmp_b_run"),
                    format_func=lambda r: f"{r} · {dict(zip(others.run, others.model)).get(r)}")
    box_b.caption(f"Run B's examples are paired with run A's by example_id (same manifest: "
                  f"`{c.info.get('manifest')}`).")
    flt_a = flt_b = state.example_filter("a_")
else:
    box_a.markdown("#### Group A")
    filters.filter_widgets(c.run, "a", box_a, wide=False)
    filters.filter_widgets(c.run, "b", box_b, wide=False)
    flt_a, flt_b = state.example_filter("a_"), state.example_filter("b_")

# -- what to compare ------------------------------------------------------------------------------
s1, s2, s3, s4, s5 = st.columns([1.2, 1.6, 2, 2.4, 2.6])
stream = state.pick_stream(c, s1)
if stream is None:
    st.info(f"Run **{c.run}** has no head statistics.")
    st.stop()
avail = state.q(queries.stats_available, c.run, stream)
if paired:
    avail_b = state.q(queries.stats_available, b_run, stream)
    avail = avail[avail.stat.isin(avail_b[avail_b.n_values > 0].stat)]
stats = avail[avail.n_values > 0].stat.tolist()
if not stats:
    st.info(f"No statistic has values in stream `{stream}`" + (f" in both runs `{c.run}` and `{b_run}`."
                                                                 if paired else f" of run `{c.run}`."))
    st.stop()
help_ = state.stat_help()
state.choose("cmp_stat", stats, default="t2i")
s2.selectbox("Statistic", stats, help="\n".join(f"- **{s}**: {help_.get(s, '')}" for s in stats),
             **state.bind("cmp_stat"))
state.choose("cmp_test", list(cmp.TESTS))
test_help = (f"**{cmp.TEST_LABELS[(mode, 't')]}**: {cmp.HELP['welch' if not paired else 'paired_t']}\n\n"
             f"**{cmp.TEST_LABELS[(mode, 'rank')]}**: {cmp.HELP['mannwhitney' if not paired else 'wilcoxon']}")
s3.radio("Test", list(cmp.TESTS), format_func=lambda t: cmp.TEST_LABELS[(mode, t)], horizontal=True,
         help=test_help, **state.bind("cmp_test"))
state.choose("cmp_corr", list(cmp.CORRECTIONS))
s4.radio("Correction for the number of heads", list(cmp.CORRECTIONS), horizontal=True,
         format_func=lambda k: cmp.CORRECTION_LABELS[k],
         help="\n\n".join(f"**{cmp.CORRECTION_LABELS[k]}**: {cmp.HELP[k]}" for k in cmp.CORRECTIONS),
         **state.bind("cmp_corr"))
effect_name = "d_z" if paired else "Hedges' g"
state.choose("cmp_map", ["diff", "effect"])
s5.radio("Colour", ["diff", "effect"], horizontal=True, **state.bind("cmp_map"),
         format_func=lambda v: "difference of means" if v == "diff" else f"effect size ({effect_name})",
         help=cmp.HELP["d_z" if paired else "hedges_g"])
stat, test, corr = state.get("cmp_stat"), state.get("cmp_test"), state.get("cmp_corr")

# -- the groups' sizes ------------------------------------------------------------------------------
if paired:
    sizes = state.q(queries.paired_sizes, c.run, b_run, flt_a).iloc[0]
    label_a, label_b = f"run {c.run}", f"run {b_run}"
    st.markdown(f"**A** = run `{c.run}`, **B** = run `{b_run}`, paired by example: **{int(sizes.n_both)}** "
                f"examples pass the filter ({flt_a.describe()}) in both runs (of {int(sizes.n_a)} in A, "
                f"{int(sizes.n_b)} in B).")
    enough = sizes.n_both >= 2
else:
    sizes = state.q(queries.compare_sizes, c.run, flt_a, flt_b).iloc[0]
    n_a, n_b, n_both = int(sizes.n_a) - int(sizes.n_both), int(sizes.n_b) - int(sizes.n_both), int(sizes.n_both)
    label_a = flt_a.describe() if not flt_a.is_empty() else "every example not in B"
    label_b = flt_b.describe() if not flt_b.is_empty() else "every example not in A"
    st.markdown(f"**A** = {label_a} (**{n_a}** examples) · **B** = {label_b} (**{n_b}** examples) · "
                f"run `{c.run}`, independent groups.")
    if n_both:
        st.caption(f"⚠️ {n_both} examples pass both filters and are left out of both groups: independent samples "
                   "share no example (so B with no filter is every example not in A).")
    enough = n_a >= 2 and n_b >= 2
name_a, name_b = f"A: {label_a}", f"B: {label_b}"  # the legends' names of the groups
what = (f"A: run {c.run} · B: run {b_run} · paired by example, filter {flt_a.describe()}" if paired
        else f"run {c.run} · {name_a} · {name_b}")
if not enough:
    st.info("Each group needs at least 2 examples" + (" (pairs)" if paired else "") + " to be compared; "
            + ("the two filters select the same examples — " if not paired and n_a == 0 and n_b == 0 else "")
            + "change the filters.")
    st.stop()

# -- the comparison ------------------------------------------------------------------------------------
if paired:
    mom = state.q(queries.paired_moments, c.run, b_run, flt_a, stream, stat)
    vals = state.q(queries.paired_values, c.run, b_run, flt_a, stream, stat) if test == "rank" else None
    res = cmp.compare_paired(mom, vals, test, corr)
else:
    mom = state.q(queries.compare_moments, c.run, flt_a, flt_b, stream, stat)
    vals = state.q(queries.compare_values, c.run, flt_a, flt_b, stream, stat) if test == "rank" else None
    res = cmp.compare_independent(mom, vals, test, corr)
if res.empty or res["diff"].notna().sum() == 0:
    st.info(f"**{stat}** has no values in both groups for stream `{stream}`.")
    st.stop()
state.choose("cmp_rank", list(cmp.RANKS))
rank_by = state.get("cmp_rank")
ranked = cmp.ranked(res, rank_by)
tested = int(res.p.notna().sum())
n_sig = int((res.p_adj < cmp.ALPHA).sum())
heads = set(zip(res.layer, res["head"]))
sel = tuple(state.get("cmp_head") or ())
if len(sel) != 2 or sel not in heads:
    sel = (int(ranked.layer.iloc[0]), int(ranked["head"].iloc[0]))  # the head that differs most


def _cell_clicked() -> None:
    cell = st.session_state["cmp_chart"].selection.get("cell") or []
    if cell:
        state.set_value("cmp_head", [int(cell[0]["layer"]), int(cell[0]["head"])])


map_left, map_right = st.columns([3, 2])
with map_left:
    value = state.get("cmp_map")
    title = f"{stat}: B − A" if value == "diff" else f"{effect_name} (B vs A)"
    chart = charts.compare_heatmap(res, value=value, value_title=title, selected=sel, alpha=cmp.ALPHA,
                                   labels=(f"A ({label_a})", f"B ({label_b})"))
    export.show_chart(chart, f"compare-{stat}-{value}", res, on_select=_cell_clicked, selection_mode="cell",
                      key="cmp_chart", width="content",
                      context=f"Compare · {what} · stream {stream} · {title} per head · "
                              f"{cmp.TEST_LABELS[(mode, test)]}, {cmp.CORRECTION_LABELS[corr]}")
    st.caption(f"Each cell is one head `(stream {stream}, layer, head)`; colour: "
               + (f"the difference of the mean **{stat}** of B and of A" if value == "diff"
                  else f"the effect size {effect_name} of B against A")
               + " (orange: higher in B, blue: higher in A, the groups' colours on this page)"
               + f". ∗ marks heads whose {cmp.CORRECTION_LABELS[corr]}-adjusted p is below {cmp.ALPHA}. "
               "Click a cell to see the examples behind it.")
with map_right:
    st.markdown(f"#### `{stat}`\n{help_.get(stat, '')}.")
    st.markdown(f"**{n_sig}** of {tested} heads tested differ at adjusted p < {cmp.ALPHA} "
                f"({cmp.TEST_LABELS[(mode, test)]}, {cmp.CORRECTION_LABELS[corr]}, m = {tested})."
                + (f" {len(res) - tested} heads could not be tested (fewer than 2 values in a group, or no "
                   "variance) and are left out of m." if len(res) > tested else ""))
    with st.expander("How these numbers are computed"):
        if paired:
            st.markdown(f"Paired by example: d = value in B − value in A.\n\n"
                        f"- **effect size** {cmp.HELP['d_z']}\n- **{cmp.TEST_LABELS[(mode, 't')]}**: "
                        f"{cmp.HELP['paired_t']}\n- **{cmp.TEST_LABELS[(mode, 'rank')]}**: {cmp.HELP['wilcoxon']}")
        else:
            st.markdown(f"Independent groups.\n\n- **effect size** {cmp.HELP['hedges_g']}\n"
                        f"- **{cmp.TEST_LABELS[(mode, 't')]}**: {cmp.HELP['welch']}\n"
                        f"- **{cmp.TEST_LABELS[(mode, 'rank')]}**: {cmp.HELP['mannwhitney']}")
        st.markdown("\n".join(f"- **{cmp.CORRECTION_LABELS[k]}**: {cmp.HELP[k]}" for k in cmp.CORRECTIONS))

# -- the ranked list ------------------------------------------------------------------------------------
st.subheader("Heads that differ most")
RANK_LABELS = {"diff": "difference of means |B − A|", "effect": f"effect size |{effect_name}|"}
st.radio("Rank heads by", list(cmp.RANKS), horizontal=True, format_func=RANK_LABELS.get, **state.bind("cmp_rank"),
         help="**difference of means**: the heads whose mean statistic differs most between the groups, in the "
              f"statistic's own units (as the README's findings rank them). **effect size**: {effect_name}, the "
              "difference in units of the spread within the groups, so a small but consistent difference ranks "
              "high. The drilled head below is the first of the ranking until you pick one.")
table = ranked.rename(columns={"mean_a": "mean A", "mean_b": "mean B", "diff": "B − A", "effect": effect_name,
                               "p_adj": "adjusted p", "n_a": "n A", "n_b": "n B"})
table["not tested"] = cmp.untested(ranked, paired, test)
table = table[["layer", "head", "mean A", "mean B", "B − A", effect_name, "p", "adjusted p", "n A", "n B"]
              + (["not tested"] if (table["not tested"] != "").any() else [])]
FOUR, SCI = "{:.4f}".format, "{:.2e}".format
# shown through a Styler: an untestable head's empty cells read "–" (a plain null reads "None"), its
# reason in the last column, and the numbers stay numbers (the columns sort as numbers)
shown = table.style.format({"mean A": FOUR, "mean B": FOUR, "B − A": FOUR, effect_name: FOUR, "p": SCI,
                            "adjusted p": SCI}, na_rep="–")


def _row_picked() -> None:
    rows = st.session_state["cmp_table"].selection.rows
    if rows:
        state.set_value("cmp_head", [int(table.layer.iloc[rows[0]]), int(table["head"].iloc[rows[0]])])


# widths in pixels: wide enough for "-1.0000" and "7.53e-05" whole (measured on the header alone,
# "p" was cut to "7.53e-…"), the reason wider still
st.dataframe(shown, key="cmp_table", on_select=_row_picked, selection_mode="single-row", hide_index=True,
             width="stretch", height=min(38 + 35 * len(table), 400),
             column_config={c_: st.column_config.NumberColumn(c_, width=84)
                            for c_ in ("mean A", "mean B", "B − A", effect_name)}
             | {c_: st.column_config.NumberColumn(c_, width=96) for c_ in ("p", "adjusted p")}
             | {"not tested": st.column_config.TextColumn("not tested", width=260,
                                                          help="why a head has no p-value")})
st.caption(f"Ranked by {RANK_LABELS[rank_by]}, largest first"
           + (" (heads without an effect size last)" if rank_by == "effect" else "")
           + ". Click a row to see the examples behind that head.")

# -- one head: the examples that drive its difference --------------------------------------------------------
layer, head = sel
row = res[(res.layer == layer) & (res["head"] == head)].iloc[0]
st.subheader(f"Layer {layer}, head {head}")
m = st.columns(6)
m[0].metric("mean A", f"{row.mean_a:.4f}", help=label_a)
m[1].metric("mean B", f"{row.mean_b:.4f}", help=label_b)
m[2].metric("B − A", f"{row['diff']:+.4f}")
m[3].metric(effect_name, "–" if pd.isna(row.effect) else f"{row.effect:+.3f}")
why = cmp.untested(res[(res.layer == layer) & (res["head"] == head)], paired, test).iloc[0]
why_help = f"not tested: {why}" if why else None
m[4].metric("p", "–" if pd.isna(row.p) else f"{row.p:.2e}", help=why_help)
m[5].metric("adjusted p", "–" if pd.isna(row.p_adj) else f"{row.p_adj:.2e}", help=why_help)
if why:
    st.caption(f"Layer {layer}, head {head} is not tested: {why}.")


def _open(run: str, example_id: int) -> None:
    """Select this example at the drilled head; the Attention page opens it."""
    if run != c.run:  # opening run B's example makes B the sidebar's run: keep the comparison, swapped
        state.set_value("cmp_b_run", c.run)
    for k, v in (("run", run), ("ex", int(example_id)), ("stream", stream), ("layer", int(layer)),
                 ("head", int(head))):
        state.set_value(k, v)


if paired:
    hv = state.q(queries.paired_values, c.run, b_run, flt_a, stream, stat, layer, head)
    drv = cmp.drivers_paired(hv)
    long = pd.concat([hv.assign(group="A", value=hv.a), hv.assign(group="B", value=hv.b)])
else:
    hv = state.q(queries.compare_values, c.run, flt_a, flt_b, stream, stat, layer, head)
    drv = cmp.drivers_independent(hv)
    long = hv.assign(group=hv.group.map({"A": "A", "B": "B"}))
export.show_chart(charts.group_values(long[["example_id", "group", "value"]], value_title=stat,
                                      labels={"A": name_a, "B": name_b}),
                  f"compare-values-l{layer}h{head}", key="cmp_values",
                  context=f"Compare · {what} · stream {stream} · layer {layer}, head {head} · {stat} per example")
st.markdown("**Examples that drive the difference** — the share of an example: "
            + (cmp.HELP["share_paired"] if paired else cmp.HELP["share_independent"]))

info = {}
if len(drv):
    shown = drv.groupby("group").head(TOP) if not paired else drv.head(2 * TOP)
    ex = state.q(queries.examples_by_id, c.run, sorted({int(i) for i in shown.example_id}))
    info = {int(r.example_id): r for r in ex.itertuples()}


def _line(r) -> str:
    e = info.get(int(r.example_id))
    if e is None:
        return f"#{int(r.example_id)}"
    mark = "" if pd.isna(e.correct) else " (correct)" if e.correct else " (wrong)"
    pred = views.prediction_line(e.prediction, f"prediction in A ({c.run})" if paired else "prediction")
    return f"#{int(r.example_id)} · {e.text} · {views.answer_line(e.answer)} · {pred}{mark}"


def _share(x: float) -> str:
    """A share as a percentage: whole percents from 10%, else two significant digits (0.43%, 2.5%), so
    a real share never rounds to 0%."""
    if pd.isna(x):
        return "n/a"
    p = 100 * float(x)
    return f"{p:.0f}%" if p == 0 or abs(p) >= 10 else f"{p:.2g}%"


def _even(x: float) -> str:
    """An example's share over an even share (1 / n of its group)."""
    return "n/a" if pd.isna(x) else f"{x:.2f}× even"


def _button(where, label: str, run: str, example_id: int, key: str) -> None:
    if where.button(label, key=key, help=f"open example #{example_id} of run {run} on the Attention page at "
                                         f"stream {stream}, layer {layer}, head {head}"):
        _open(run, example_id)
        st.switch_page(ATTENTION)


def _driver_row(where):
    """A driving example's line: its button(s) as wide as their labels, the text in the rest. (Columns of
    fixed shares cut the buttons to "O…" in a half-width column.)"""
    return where.container(horizontal=True, vertical_alignment="center", gap="small", wrap=False)


if len(drv):
    n_g = drv.groupby("group").n.first() if not paired else None
    st.caption("An even share is " + (f"1/{int(drv.n.iloc[0])} = {_share(1 / drv.n.iloc[0])} of the pairs" if paired
                                      else " and ".join(f"1/{int(n_g[g])} = {_share(1 / n_g[g])} in {g}"
                                                        for g in ("A", "B") if g in n_g))
               + "; × even is an example's share over it.")

if paired:
    st.caption(f"Largest differences B − A in the direction of the mean difference; "
               f"**Open A** / **Open B** opens the example in run `{c.run}` / `{b_run}`.")
    for r in drv.head(2 * TOP).itertuples():
        row_ = _driver_row(st)
        _button(row_, "Open A", c.run, int(r.example_id), f"cmp_open_a_{int(r.example_id)}")
        _button(row_, "Open B", b_run, int(r.example_id), f"cmp_open_b_{int(r.example_id)}")
        row_.markdown(f"{_line(r)} — A {r.a:.4f} → B {r.b:.4f} (d {r.d:+.4f}, share {_share(r.share)} of Σd, "
                      f"{_even(r.vs_even)})", width="stretch")
else:
    col_a, col_b = st.columns(2, gap="large")
    for where, g, other in ((col_a, "A", "B"), (col_b, "B", "A")):
        where.markdown(f"##### {g}: {label_a if g == 'A' else label_b}")
        where.caption(f"furthest from the mean of {other} ({row.mean_b if g == 'A' else row.mean_a:.4f}) "
                      f"in the direction of B − A")
        for r in drv[drv.group == g].head(TOP).itertuples():
            row_ = _driver_row(where)
            _button(row_, "Open", c.run, int(r.example_id), f"cmp_open_{g}_{int(r.example_id)}")
            row_.markdown(f"{_line(r)} — {stat} {r.value:.4f} (share {_share(r.share)} in {g}, "
                          f"{_even(r.vs_even)})", width="stretch")
