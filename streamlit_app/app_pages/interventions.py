"""Interventions: which heads and image regions the model's answer depends on (``vlatlas intervene``).

Attention shows where a model looks; an intervention removes something and measures the model's own
score of its original answer again. The page reads the ``interventions`` table: per head, the mean
effect of ablating it beside an attention statistic of the same head (which heads look, and which
matter); per window of layers, the effect of blocking attention between two token sets; per ranking
method, the deletion and insertion curves of image tokens with their areas; and, for the sidebar's
example, every intervention that changed its answer.
"""

import json

import numpy as np
import pandas as pd
import streamlit as st

from lake import queries
from streamlit_app import charts, export, state

c = state.ctx()
st.title("Interventions")
st.caption("Does the answer *depend* on what the model attends to? Each intervention removes something "
           "(a head's output, attention edges in a window of layers, image regions) and scores the model's "
           "original answer again. **Effect** = score after − score before (negative: the answer lost support); "
           "the score is the run's metric (a decoder's log-probability of its answer, a VQA class logit, a "
           "match logit or a pair similarity).")

keys = state.q(queries.intervention_keys, c.run)
if keys.empty:
    st.info(f"Run **{c.run}** has no interventions yet. Make them with "
            f"`vlatlas intervene --lake {c.lake} --run {c.run} --kind heads` (add `--estimate` for attribution "
            "patching of every head), `--kind knockout` or `--kind regions`.")
    st.stop()


def spearman(a: pd.Series, b: pd.Series) -> float | None:
    """Spearman's rank correlation (Pearson's of the average ranks); None under 3 pairs or a constant side."""
    ok = a.notna() & b.notna()
    a, b = a[ok].rank(), b[ok].rank()
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def rho_text(rho: float | None, n: int) -> str:
    return f"**ρ = {rho:+.3f}** over {n} heads" if rho is not None else f"undefined over {n} heads (too few, or constant)"


about = {r.intervention: r for r in keys.itertuples(index=False)}
ordered = keys.intervention.tolist()  # by kind, then key
state.choose("intervention", ordered)


def _label(k: str) -> str:
    r = about[k]
    rest = k[len(r.kind):].strip() if k.startswith(str(r.kind)) else k
    est = " · estimates" if r.estimated else ""
    return f"{r.kind} — {rest} · {int(r.examples)} examples{est}"


st.selectbox("Intervention", ordered, format_func=_label, help="the run's interventions, grouped by kind "
             "(heads, knockout, regions); the key holds the options it was run with", **state.bind("intervention"))
key = state.get("intervention")
iv = about[key]
kind, metric = str(iv.kind), str(iv.metric)
methods = state.q(queries.intervention_methods, c.run)
held = methods[methods.intervention == key].method.tolist()
context = f"Interventions · run {c.run} · {key}"

# -- heads ----------------------------------------------------------------------------------------------
if kind == "heads":
    ablate = held[0] if held else "mean"
    eff = state.q(queries.head_effects, c.run, ablate)
    eff = eff.assign(estimated=eff.estimated.fillna(False).astype(bool))

    def _rows(d: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
        """This intervention's rows, or else those of the run's intervention (same ablation) holding most."""
        if (d.intervention == key).any():
            return d[d.intervention == key], key
        if d.empty:
            return d, None
        best = d.groupby("intervention").size().sort_values(ascending=False, kind="stable").index[0]
        return d[d.intervention == best], best

    exact, exact_key = _rows(eff[~eff.estimated])
    est, est_key = _rows(eff[eff.estimated])
    streams = sorted(set(exact.stream) | set(est.stream))
    state.choose("ivstream", streams)
    h1, h2, _ = st.columns([1, 1, 2])
    h1.selectbox("Stream", streams, disabled=len(streams) < 2, help="the attention sublayer whose heads were ablated",
                 **state.bind("ivstream"))
    stream = state.get("ivstream")
    ex_s, est_s = exact[exact.stream == stream], est[est.stream == stream]
    main, main_name = (ex_s, "exact ablation") if len(ex_s) else (est_s, "attribution patching (estimate)")
    avail = state.q(queries.stats_available, c.run, stream)
    stats = avail[avail.n_values > 0].stat.tolist()
    stat_default = next((s for s in ("grounding", "t2i") if s in stats), stats[0] if stats else None)
    if stats:
        state.choose("ivstat", stats, default=stat_default)
        h2.selectbox("Attention statistic", stats, help="the heads' mean over the run's examples (Head summary)",
                     **state.bind("ivstat"))
    stat = state.get("ivstat") if stats else None
    what = f"mean Δ {metric}"
    m = main[["layer", "head", "effect", "n"]].rename(columns={"effect": "value"})
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Mean effect of ablating each head** ({ablate} ablation; {main_name})")
        export.show_chart(charts.head_heatmap(m, value_title=what, diverging=True, scale=charts.effect_scale(m.value),
                                              cell=28, description="iv-heads-effect"),
                          f"interventions-heads-{c.run}-{stream}", m, context=f"{context} · stream {stream}",
                          width="content")
    means = state.q(queries.head_stat_dataset, c.run, stream, stat) if stat else pd.DataFrame()
    with right:
        if stat and len(means):
            st.markdown(f"**Mean {stat} of each head** over the run's examples")
            sm = means[["layer", "head", "mean", "n"]].rename(columns={"mean": "value"})
            export.show_chart(charts.head_heatmap(sm, value_title=f"mean {stat}", diverging=False, cell=28,
                                                  description="iv-heads-stat"),
                              f"interventions-stat-{c.run}-{stream}-{stat}", sm,
                              context=f"{context} · stream {stream} · {stat}", width="content")
        else:
            st.info(f"No head statistics are stored for stream `{stream}`.")
        if stat:
            st.caption(f"{stat}: {state.stat_help().get(stat, '')}")
    if stat and len(means):
        both = main[["stream", "layer", "head", "effect"]].merge(
            means[["layer", "head", "mean"]].rename(columns={"mean": "stat"}), on=["layer", "head"])
        rho = spearman(both.stat, both.effect)
        st.markdown(f"#### Which heads look, and which heads matter\nSpearman rank correlation of **{stat}** "
                    f"and the mean effect ({main_name}): {rho_text(rho, len(both))}. A negative ρ: the heads "
                    f"that look more are those whose removal lowers the score of the answer more.")
        export.show_chart(charts.head_scatter(both, x="stat", y="effect", x_title=f"mean {stat}", y_title=what,
                                              description="iv-heads-scatter"),
                          f"interventions-scatter-{c.run}-{stream}-{stat}", both,
                          context=f"{context} · stream {stream} · {stat} vs {what}", width="content")
    worst = main.sort_values(["effect", "layer", "head"]).head(5)
    if len(worst):
        st.markdown("Heads whose ablation lowers the score most: " + ", ".join(
            f"L{int(r.layer)}.H{int(r['head'])} ({r.effect:+.4g})" for _, r in worst.iterrows()) + ".")
    if len(ex_s) and len(est_s):
        pair = ex_s[["stream", "layer", "head", "effect"]].merge(
            est_s[["layer", "head", "effect"]].rename(columns={"effect": "estimate"}), on=["layer", "head"])
        st.markdown("#### Attribution patching against exact ablation")
        e1, e2 = st.columns(2)
        em = est_s[["layer", "head", "effect", "n"]].rename(columns={"effect": "value"})
        with e1:
            st.markdown("**Estimated mean effect** (gradient × the change of the head's output)")
            export.show_chart(charts.head_heatmap(em, value_title=f"estimated {what}", diverging=True,
                                                  scale=charts.effect_scale(em.value), cell=28,
                                                  description="iv-heads-estimate"),
                              f"interventions-estimate-{c.run}-{stream}", em,
                              context=f"{context} · stream {stream}", width="content")
        with e2:
            rho_e = spearman(pair.estimate, pair.effect)
            st.markdown(f"Spearman rank correlation of the estimate and the exact effect: {rho_text(rho_e, len(pair))}.")
            export.show_chart(charts.head_scatter(pair, x="estimate", y="effect", x_title=f"estimated {what}",
                                                  y_title=f"exact {what}", description="iv-estimate-scatter"),
                              f"interventions-estimate-scatter-{c.run}-{stream}", pair,
                              context=f"{context} · stream {stream} · estimate vs exact", width="content")
    sources = [f"exact ablation from `{exact_key}`" if exact_key else None,
               f"estimates from `{est_key}`" if est_key else None]
    st.caption("Each cell: the mean over examples of the score after the head's output is replaced by "
               f"{'its mean over the run' if ablate == 'mean' else 'zero'}, minus the score before; the last "
               "column is the mean over the layer's heads. Shown: " + " and ".join(s for s in sources if s) + ".")

# -- knockout ------------------------------------------------------------------------------------------
elif kind == "knockout":
    d = state.q(queries.knockout_effects, c.run, key)
    st.markdown("**Attention knockout**: the edges from one token set to another blocked in a window of layers "
                "(the rest of each row renormalised), the window sliding over the depth.")
    export.show_chart(charts.knockout_lines(d, metric=metric, description="iv-knockout"),
                      f"interventions-knockout-{c.run}", d, context=context, width="content")
    lines = []
    for (pair, stream), g in d.groupby(["method", "stream"], sort=True):
        w = g.loc[g.effect.idxmin()]
        where = "largest drop" if w.effect < 0 else "no window lowers the score; the least rise"
        lines.append(f"- `{pair}` ({stream}): {where} with layers {w.window} blocked, mean Δ {metric} "
                     f"{w.effect:+.4g}; the answer changed on {w.changed:.0%} of the examples there "
                     f"(at most {g.changed.max():.0%} over the windows).")
    st.markdown("\n".join(lines))
    with st.expander("Effect and answers changed per window"):
        st.dataframe(d, hide_index=True, width="stretch")

# -- regions -------------------------------------------------------------------------------------------
else:
    curves = state.q(queries.region_curves, c.run, key)
    boxes = state.q(queries.box_effects, c.run, key)
    if len(curves):
        st.markdown("#### Deletion and insertion curves")
        st.radio("Score", ["score", "relative"], horizontal=True, format_func=lambda v: {
            "score": f"mean {metric} after", "relative": f"mean {metric} after ÷ before"}[v],
            help="the score of the original answer, or its ratio to the score before any removal",
            **state.bind("ivnorm"))
        value = state.get("ivnorm") if state.get("ivnorm") in ("score", "relative") else "score"
        title = f"mean {metric}" if value == "score" else f"mean {metric} after ÷ before"
        export.show_chart(charts.region_curves(curves, value=value, value_title=title, description="iv-curves"),
                          f"interventions-curves-{c.run}", curves, context=f"{context} · {title}", width="content")
        auc = []
        for (meth, curve), g in curves.groupby(["method", "curve"], sort=True):
            g = g.sort_values("fraction")
            auc.append({"method": meth, "curve": curve, "area": float(np.trapezoid(g[value], g.fraction)),
                        "fractions": len(g), "examples": int(g.n.max())})
        table = pd.DataFrame(auc).pivot(index="method", columns="curve", values="area").reset_index()
        table.columns.name = None
        table = table.rename(columns={"deletion": "deletion area", "insertion": "insertion area"})
        st.markdown(f"**Area under each curve** (trapezoids over the fractions, of {title}): a good ranking "
                    "has a small deletion area (the score falls as its top tokens go) and a large insertion area.")
        st.dataframe(table, hide_index=True, width="content")
        st.caption("Deletion: the top fraction of the image tokens by each method removed; insertion: only the "
                   "top fraction kept. `random` is the baseline a ranking should beat.")
    if len(boxes):
        st.markdown("#### Ground-truth boxes removed")
        export.show_chart(charts.box_effects_bars(boxes, metric=metric, description="iv-boxes"),
                          f"interventions-boxes-{c.run}", boxes, context=context, width="content")
        st.dataframe(boxes, hide_index=True, width="content")

# -- one example ---------------------------------------------------------------------------------------
st.markdown("---")
if c.example is None:
    st.stop()
ex = int(c.example["example_id"])
st.markdown(f"#### What changes the answer of example #{ex}")
changes = state.q(queries.example_changes, c.run, ex)


def _what(r) -> str:
    spec = json.loads(r.spec) if isinstance(r.spec, str) else {}
    if r.kind == "heads":
        return f"head {r.stream} L{int(r.layer)}.H{int(r['head'])} ({r.method} ablation)"
    if r.kind == "knockout":
        return f"{r.method} blocked in layers {spec.get('layers')} ({r.stream})"
    if r.method == "box":
        return f"box {spec.get('box')} ({spec.get('label')}) removed"
    curve = spec.get("curve", "deletion")
    return f"{r.method}: top {r.fraction:.0%} of the image tokens {'removed' if curve == 'deletion' else 'kept'}"


if changes.empty:
    n = state.q(queries.example_intervened, c.run, ex)
    st.info(f"No intervention changed the answer of example #{ex}" + (f" ({n} with an answer were run on it)."
            if n else ": none with an answer was run on it (estimates have no answer)."))
else:
    shown = pd.DataFrame({"kind": changes.kind, "removed": [_what(r) for _, r in changes.iterrows()],
                          "effect": changes.effect, "score before": changes.metric_before,
                          "score after": changes.metric_after, "answer after": changes.answer_after,
                          "intervention": changes.intervention})
    st.markdown(f"Original answer: **{c.example.get('prediction')}**. {len(shown)} interventions change it "
                f"({', '.join(f'{n} {k}' for k, n in shown.kind.value_counts().sort_index().items())}); the largest "
                "drop of the score first.")
    st.dataframe(shown, hide_index=True, width="stretch")
