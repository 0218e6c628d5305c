"""What the demo model shows, measured on the demo lake.

``python -m pipeline.demo.findings --lake demo_lake`` computes every number of
the README's section "What the demo model shows" from the lake (through the
same DuckDB views and named queries the app uses), writes them to
``pipeline/demo/findings.json`` and rewrites that README section from them.
``tests/pipeline/test_findings.py`` builds the demo lake again and checks the numbers
against the committed JSON (with a margin) and the README against the JSON,
so the README cannot drift from the model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from lake import queries
from lake.catalog import open_catalog
from lake.queries import interventions as IQ
from pipeline.demo.build import RUN, demo_intervention_key, demo_interventions, demo_probes
from pipeline.demo.shapes import QTYPES

HERE = Path(__file__).resolve().parent
FINDINGS = HERE / "findings.json"
README = HERE.parent.parent / "README.md"
START, END = "<!-- findings:start -->", "<!-- findings:end -->"


def compute(lake: str | Path, run: str = RUN) -> dict:
    cat = open_catalog(lake)
    acc = queries.accuracy_by(cat, run, "qtype")
    heads = queries.head_means(cat, run, ["grounding", "pointing", "t2i", "boxed_img_mass"])
    chance = queries.pointing_chance(cat, run)
    by_layer = queries.layer_means(cat, run, ["t2i", "grounding", "pointing", "boxed_img_mass"])
    split = queries.stat_by_correctness(cat, run, "grounding")
    top = heads.sort_values("pointing", ascending=False).head(3)
    best = top.iloc[0]
    split = split.dropna(subset=["diff"])
    d = split.loc[split["diff"].abs().idxmax()]
    t2i = queries.stat_by_correctness(cat, run, "t2i")
    probes = {}
    for spec in demo_probes():
        r = queries.probe_rows(cat, run, spec.key)
        above = r[(r.p_value < queries.SIGNIFICANT) & (r.selectivity > 0)]
        probes[f"{spec.target} {spec.selector}"] = {
            "key": spec.key, "first_layer": int(above.layer.iloc[0]) if len(above) else None,
            "folds": int(r.folds.iloc[0]), "permutations": int(r.permutations.iloc[0]), "n": int(r.n.max()),
            "n_vectors": int(r.n_vectors.max()),
            "layers": [{"layer": int(x.layer), "value": round(float(x.value), 3), "control": round(float(x.control), 3),
                        "p_value": round(float(x.p_value), 3)} for x in r.itertuples()]}
    return {
        "run": run,
        "n_examples": int(acc["n"].sum()),
        "accuracy": {**{r.group: round(float(r.accuracy), 3) for r in acc.itertuples()},
                     "overall": round(float((acc["accuracy"] * acc["n"]).sum() / acc["n"].sum()), 3)},
        "pointing_chance": round(float(chance), 3),
        "top_pointing_heads": [
            {"layer": int(r.layer), "head": int(r.head), "pointing": round(float(r.pointing), 3),
             "grounding": round(float(r.grounding), 3), "boxed_img_mass": round(float(r.boxed_img_mass), 3)}
            for r in top.itertuples()],
        "best_head": {"layer": int(best["layer"]), "head": int(best["head"])},
        "layers": [{"layer": int(r.layer), "t2i": round(float(r.t2i), 3), "grounding": round(float(r.grounding), 3),
                    "pointing": round(float(r.pointing), 3), "boxed_img_mass": round(float(r.boxed_img_mass), 3)}
                   for r in by_layer.itertuples()],
        "grounding_correct_vs_wrong": {
            "layer": int(d["layer"]), "head": int(d["head"]), "correct": round(float(d["correct"]), 3),
            "wrong": round(float(d["wrong"]), 3), "diff": round(float(d["diff"]), 3)},
        "wrong_share": {r.group: round(float(r.n * (1 - r.accuracy) / max(1.0, (acc["n"] * (1 - acc["accuracy"])).sum())), 3)
                        for r in acc.itertuples()},
        "t2i_correct_vs_wrong_mean": {
            "correct": round(float(t2i["correct"].mean()), 3), "wrong": round(float(t2i["wrong"].mean()), 3)},
        "probes": probes,
        "ablation": ablation(cat, run, (int(best["layer"]), int(best["head"]))),
    }


def _keys() -> dict[str, str]:
    """The demo's intervention keys by role: heads (exact), estimate, knockout, ranked, boxes."""
    names = ("heads", "estimate", "knockout", "ranked", "boxes")
    return {n: demo_intervention_key(kind, o) for n, (kind, o) in zip(names, demo_interventions())}


def ablation(cat, run: str, best: tuple[int, int]) -> dict:
    """What the demo's interventions show: the effect (score after minus before, the logit of the
    answer first given) and the share of answers changed of ablating each head to its mean, the best
    pointing head ``best`` against the median head; each layer's text -> image and [CLS] -> image
    knockout; the deletion and insertion areas of each ranking of the image patches."""
    k = _keys()
    p = {"run": run}
    heads = cat.df("SELECT layer, head, avg(metric_after - metric_before) AS effect, avg(CAST(changed AS DOUBLE)) "
                   "AS changed, count(*) AS n FROM interventions WHERE run = $run AND intervention = $key "
                   "AND stream = 'self' GROUP BY layer, head ORDER BY layer, head", {**p, "key": k["heads"]})
    est = cat.df("SELECT layer, head, avg(metric_after - metric_before) AS estimate FROM interventions "
                 "WHERE run = $run AND intervention = $key AND estimated AND stream = 'self' GROUP BY layer, head",
                 {**p, "key": k["estimate"]})
    if not len(heads) or not len(est):
        raise SystemExit(f"run {run!r} has no rows of the demo's head ablations; `vlatlas demo` adds them to a "
                         "demo lake that lacks them")
    pair = heads.merge(est, on=["layer", "head"])
    b = heads.set_index(["layer", "head"]).loc[best]
    worst = heads.loc[heads.effect.idxmin()]
    by_effect = heads.sort_values(["effect", "layer", "head"]).reset_index(drop=True)
    rank = int(by_effect.index[(by_effect.layer == best[0]) & (by_effect["head"] == best[1])][0]) + 1
    ko = cat.df("SELECT method AS sets, layer, avg(metric_after - metric_before) AS effect, "
                "avg(CAST(changed AS DOUBLE)) AS changed FROM interventions WHERE run = $run AND intervention = $key "
                "GROUP BY method, layer ORDER BY method, layer", {**p, "key": k["knockout"]})
    curves = cat.df("SELECT method, json_extract_string(spec, '$.curve') AS curve, fraction, avg(metric_after) AS "
                    "score, count(*) AS n FROM interventions WHERE run = $run AND intervention = $key "
                    "GROUP BY ALL ORDER BY method, curve, fraction", {**p, "key": k["ranked"]})
    areas = {}
    for (method, curve), g in curves.groupby(["method", "curve"], sort=True):
        areas.setdefault(method, {})[curve] = round(float(np.trapezoid(g.score, g.fraction)), 3)
    ends = cat.df("SELECT avg(metric_before) AS before, avg(metric_after) FILTER (WHERE fraction = 1) AS removed, "
                  "count(DISTINCT example_id) AS n FROM interventions WHERE run = $run AND intervention = $key "
                  "AND json_extract_string(spec, '$.curve') = 'deletion'", {**p, "key": k["ranked"]}).iloc[0]
    box = cat.df("SELECT avg(metric_after - metric_before) AS effect, avg(CAST(changed AS DOUBLE)) AS changed, "
                 "count(*) AS boxes, count(DISTINCT example_id) AS n FROM interventions WHERE run = $run "
                 "AND intervention = $key", {**p, "key": k["boxes"]}).iloc[0]
    g = IQ.best_grounding_head(cat, run)

    def r3(x) -> float:
        return round(float(x), 3)
    return {
        "keys": k,
        "n_heads_examples": int(heads.n.max()),
        "metric": "class_logit",
        "heads": [{"layer": int(x.layer), "head": int(x.head), "effect": r3(x.effect), "changed": r3(x.changed)}
                  for x in heads.itertuples()],
        "best_head": {"layer": best[0], "head": best[1], "effect": r3(b.effect), "changed": r3(b.changed),
                      "rank": rank},
        "median_head": {"effect": r3(heads.effect.median()), "changed": r3(heads.changed.median())},
        "largest_head": {"layer": int(worst.layer), "head": int(worst["head"]), "effect": r3(worst.effect),
                         "changed": r3(worst.changed)},
        "estimate_spearman": r3(pair.effect.rank().corr(pair.estimate.rank())),
        "estimate_rank_of_largest": int((pair.estimate < pair.set_index(["layer", "head"]).estimate.loc[
            (int(worst.layer), int(worst["head"]))]).sum()) + 1,
        "knockout": {sets: [{"layer": int(x.layer), "effect": r3(x.effect), "changed": r3(x.changed)}
                            for x in d.itertuples()] for sets, d in ko.groupby("sets", sort=True)},
        "n_knockout_examples": int(cat.df("SELECT count(DISTINCT example_id) AS n FROM interventions WHERE run = $run "
                                          "AND intervention = $key", {**p, "key": k["knockout"]}).n.iloc[0]),
        "attention_head": None if g is None else {"layer": g["layer"], "head": g["head"]},
        "areas": areas,
        "n_regions_examples": int(ends.n),
        "score_before": r3(ends.before),
        "score_all_removed": r3(ends.removed),
        "boxes": {"effect": r3(box.effect), "changed": r3(box.changed), "boxes": int(box.boxes), "n": int(box.n)},
    }


def render(f: dict) -> str:
    acc = f["accuracy"]
    qt = ", ".join(f"{q} {acc[q]:.0%}" for q in QTYPES if q in acc)
    heads = "\n".join(f"| {h['layer']} | {h['head']} | {h['pointing']:.2f} | {h['grounding']:.2f} | "
                      f"{h['boxed_img_mass']:.2f} |" for h in f["top_pointing_heads"])
    layers = "\n".join(f"| {x['layer']} | {x['t2i']:.2f} | {x['grounding']:.2f} | {x['pointing']:.2f} | "
                       f"{x['boxed_img_mass']:.2f} |" for x in f["layers"])
    g, t = f["grounding_correct_vs_wrong"], f["t2i_correct_vs_wrong_mean"]
    pc, ps = f["probes"]["box_color image-in-box"], f["probes"]["box_shape image-in-box"]
    pw = f["probes"]["box_color word"]
    probe_rows = "\n".join(f"| {a['layer']} | {a['value']:.2f} ({a['control']:.2f}) | {b['value']:.2f} "
                           f"({b['control']:.2f}) | {w['value']:.2f} ({w['control']:.2f}) | "
                           f"{max(a['p_value'], b['p_value'], w['p_value']):.3f} |"
                           for a, b, w in zip(pc["layers"], ps["layers"], pw["layers"]))
    w0, wl = pw["layers"][0], pw["layers"][-1]

    def first(p: dict) -> str:
        return "at no layer" if p["first_layer"] is None else f"from layer {p['first_layer']}"
    top_wrong = max(f["wrong_share"], key=f["wrong_share"].get)
    return f"""{START}
*Generated by `python -m pipeline.demo.findings --lake demo_lake` from the demo lake
({f['n_examples']:,} held-out scenes, run `{f['run']}`); `tests/pipeline/test_findings.py` rebuilds the lake and
checks every number here.*

**Accuracy.** The demo model answers {acc['overall']:.0%} of the held-out questions correctly
({qt}). Filter the Examples page on `correct` to see the questions it gets wrong.

**Heads that ground object words.** For every word with a box (the "circle" of "what color is the
circle ?"), `pointing` is 1 when the patch that word attends to most lies inside the object's
box, and `grounding` is the share of the word's attention to the image that lands inside the box.
Both count only the words that put at least 1% of their attention on the image patches (below
that, the image attention is noise: the argmax of weights under float16's precision); `image
mass` (`boxed_img_mass`) is how much the boxed words look at the image at all. Chance pointing (a
uniformly random patch) is {f['pointing_chance']:.2f}. The best heads, averaged over the boxed words:

| layer | head | pointing | grounding | image mass |
| --- | --- | --- | --- | --- |
{heads}

Open the Head summary page with statistic `pointing`, click layer {f['best_head']['layer']} head
{f['best_head']['head']} (the click opens it on the Attention page), then pick the word "circle" (or any
boxed word): the heatmap sits on the object.

**Through the layers** (mean over heads and examples):

| layer | t2i | grounding | pointing | image mass |
| --- | --- | --- | --- | --- |
{layers}

**Correct versus wrong answers.** The head whose grounding differs most between correctly and
wrongly answered questions is layer {g['layer']} head {g['head']}: {g['correct']:.2f} when the answer is
right, {g['wrong']:.2f} when it is wrong. Over all heads, text tokens put {t['correct']:.2f} of their
attention on the image in correctly answered questions and {t['wrong']:.2f} in wrong ones.
{f['wrong_share'][top_wrong]:.0%} of the wrong answers are {top_wrong} questions, so part of this
difference is the question type: on the Compare page, restrict both groups to one type
(metadata `qtype`) to separate the two.

**What the image tokens in the box encode, and what the object's word learns.** A linear probe
(logistic regression, {pc['folds']}-fold cross-validated with each example's tokens in one fold) is
trained at every layer on stored hidden states to predict the colour (`box_color`) or shape
(`box_shape`) of the object in the example's first box; the control task is the same probe on
labels permuted across examples ({pc['permutations']} permutations; p is the permutation test's, and
{1 / (1 + pc['permutations']):.3f} is the smallest it can be). On the image tokens whose patch centre
lies in the box ({pc['n_vectors']:,} vectors of {pc['n']:,} examples), colour is read above its control
{first(pc)} and shape {first(ps)}: the patch embedding is a linear map of the patch's pixels, so both
are there from the start. The telling curve is the word's: on the hidden state of the text token
naming the object ({pw['n_vectors']:,} words), the object's colour is read with accuracy
{w0['value']:.2f} at layer 0 and {wl['value']:.2f} at layer {wl['layer']} (control about
{wl['control']:.2f}). At layer 0 the word is only its embedding, and it is above chance there
because in `exist` and `shape` questions the boxed word is the colour word itself; the rise through
the layers is the colour the word takes from the image. Accuracy per layer (control in brackets):

| layer | colour, image tokens in the box | shape, image tokens in the box | colour, the object's word | largest p |
| --- | --- | --- | --- | --- |
{probe_rows}

The Probes page draws these curves and the confusion matrix at any layer
(`vlatlas probe --lake demo_lake --run demo --target box_color --tokens word` makes the third again).

{render_ablation(f["ablation"])}
{END}"""


def render_ablation(x: dict) -> str:
    """The README's paragraphs on what the demo's interventions show."""
    grid = {(h["layer"], h["head"]): h for h in x["heads"]}
    layers = sorted({h["layer"] for h in x["heads"]})
    heads = sorted({h["head"] for h in x["heads"]})
    head_rows = "\n".join(f"| {layer} | " + " | ".join(
        f"{grid[(layer, h)]['effect']:+.2f} ({grid[(layer, h)]['changed']:.0%})" for h in heads) + " |"
        for layer in layers)
    b, med, top = x["best_head"], x["median_head"], x["largest_head"]
    than = "more" if b["effect"] < med["effect"] else "less"
    most = ("It is also the head the answer depends on most." if (top["layer"], top["head"]) == (b["layer"], b["head"])
            else f"Looking at the object is not what the answer depends on most: layer {top['layer']} head "
                 f"{top['head']} is ({top['effect']:+.2f}, {top['changed']:.0%} of the answers changed).")
    ko = x["knockout"]
    t2i, cls = ko["text->image"], ko["last->image"]
    ko_rows = "\n".join(f"| {a['layer']} | {a['effect']:+.2f} ({a['changed']:.0%}) | {c['effect']:+.2f} "
                         f"({c['changed']:.0%}) |" for a, c in zip(t2i, cls))
    t_top, c_top = min(t2i, key=lambda r: r["effect"]), min(cls, key=lambda r: r["effect"])
    c_low = [r["layer"] for r in cls if r["changed"] < 0.1]
    areas = x["areas"]
    order = sorted(areas, key=lambda m: areas[m]["deletion"])
    area_rows = "\n".join(f"| {m} | {areas[m]['deletion']:.2f} | {areas[m]['insertion']:.2f} |" for m in order)
    ah = x["attention_head"]
    bx = x["boxes"]
    k = x["keys"]
    return f"""**What ablation shows** (`vlatlas intervene`; the Interventions page draws these). The score is the
model's logit of the answer it first gave; an effect is the score after an intervention minus before
(negative: the answer lost support), averaged over the examples, with the share of answers that
changed in brackets. Each head's output replaced by its mean over the examples, one head at a time
(exact ablation, the first {x['n_heads_examples']} examples):

| layer | head 0 | head 1 | head 2 | head 3 |
| --- | --- | --- | --- | --- |
{head_rows}

The best pointing head, layer {b['layer']} head {b['head']}, matters {than} than the median head: without it the
answer's logit moves by {b['effect']:+.2f} and {b['changed']:.0%} of the answers change, against {med['effect']:+.2f} and
{med['changed']:.0%} for the median head (it ranks {b['rank']} of {len(x['heads'])} by effect).
{most}
Attribution patching's estimate of the same ablations (`--estimate`, one forward and one backward
pass an example) ranks the heads' mean effects with Spearman {x['estimate_spearman']:.2f} (the head that matters most is
at rank {x['estimate_rank_of_largest']} of {len(x['heads'])} by the estimate). Replacing a head's output by its mean is a large change,
and the first-order estimate is {'far from' if x['estimate_spearman'] < 0.5 else 'close to'} the exact effect here (`make bench-intervene` compares them
example by example).

Which layers carry the image to the answer: the attention from the text tokens (text -> image) or
from [CLS], where the answer is read (last -> image), to the image patches blocked at one layer
(`--window 1`, the first {x['n_knockout_examples']} examples):

| layer | text -> image | [CLS] -> image |
| --- | --- | --- |
{ko_rows}

Blocking text -> image costs most at layer {t_top['layer']} ({t_top['effect']:+.2f}, {t_top['changed']:.0%} of the answers
changed) and [CLS] -> image at layer {c_top['layer']}; [CLS] reads the image{' little at layers ' + ', '.join(map(str, c_low)) + ' (under 10% of the answers change)' if c_low else ''}.

Which patches the answer depends on: the image's patches removed (painted with the image's mean
colour) in the order of each ranking, the top fraction p (deletion) or all but it (insertion), p = 0,
0.1, ... 1, on the first {x['n_regions_examples']} examples (the score is {x['score_before']:.2f} with the whole image, {x['score_all_removed']:.2f}
with every patch removed). `attention` ranks by the best grounding head (layer {ah['layer'] if ah else '?'} head
{ah['head'] if ah else '?'}), `rollout` by attention rollout, `random` is the baseline. The area under each curve of the
mean score (a good ranking: a small deletion area, a large insertion area):

| ranking | deletion area | insertion area |
| --- | --- | --- |
{area_rows}

Painting out one object's box changes {bx['changed']:.0%} of the answers (mean effect {bx['effect']:+.2f}; {bx['boxes']} boxes of
{bx['n']} examples).

`vlatlas demo` runs these five interventions when it builds the lake, as `vlatlas intervene --lake
demo_lake --run demo` with `--kind heads --limit {_limit(k['heads'])}`, `--kind heads --estimate --limit {_limit(k['estimate'])}`,
`--kind knockout --sets text->image,last->image --limit {_limit(k['knockout'])}`, `--kind regions --methods
attention,rollout,random --limit {_limit(k['ranked'])}` and `--kind regions --regions boxes --limit {_limit(k['boxes'])}` would;
`python -m pipeline.demo.findings --lake demo_lake` computes this section from their rows."""


def _limit(key: str) -> str:
    return key.rsplit("limit=", 1)[1]


def update_readme(section: str, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text:
        raise SystemExit(f"{readme} has no {START} marker")
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default="demo_lake")
    a = p.parse_args(argv)
    f = compute(a.lake)
    FINDINGS.write_text(json.dumps(f, indent=2) + "\n")
    update_readme(render(f))
    print(render(f))


if __name__ == "__main__":
    main()
