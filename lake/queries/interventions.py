"""Interventions (``vlatlas intervene``, pipeline/intervene/): what the regions kind ranks image tokens by,
and the ``interventions`` table as the app reads it.

An intervention's rows share ``intervention`` (its key); ``metric_after - metric_before`` is the
effect of the intervention on the model's score of its own answer (negative: the answer lost
support). ``estimated`` rows are attribution patching's first-order estimates of head ablations.
"""

from __future__ import annotations

import pandas as pd

# explanation methods the relevancy table holds, ranked per image token by their summed value
RELEVANCY_METHODS = ("rollout", "relevancy")


def best_grounding_head(cat, run: str) -> dict | None:
    """``{stream, layer, head, grounding}`` of the head with the largest mean ``grounding`` over the run
    (None when the run has no grounding: no boxes, or no stream where text looks at the image)."""
    d = cat.df("SELECT stream, layer, head, avg(value) AS grounding FROM head_stats WHERE run = $run "
               "AND stat = 'grounding' AND value IS NOT NULL GROUP BY stream, layer, head "
               "ORDER BY grounding DESC, stream, layer, head LIMIT 1", {"run": run})
    if not len(d):
        return None
    r = d.iloc[0]
    return {"stream": str(r["stream"]), "layer": int(r["layer"]), "head": int(r["head"]), "grounding": float(r["grounding"])}


def relevancy_methods_held(cat, run: str) -> list[str]:
    """Which of :data:`RELEVANCY_METHODS` the run's ``relevancy`` table holds."""
    d = cat.df("SELECT DISTINCT method FROM relevancy WHERE run = $run", {"run": run})
    return [m for m in RELEVANCY_METHODS if m in set(d.method)]


def has_value_norms(cat, run: str, stream: str, layer: int) -> bool:
    d = cat.df("SELECT count(*) AS n FROM value_norms WHERE run = $run AND stream = $stream AND layer = $layer",
               {"run": run, "stream": stream, "layer": int(layer)})
    return bool(int(d.n.iloc[0]))


def relevancy_scores(cat, run: str, method: str, first: int, last: int) -> pd.DataFrame:
    """example_id, token_idx, score: an explanation method's value at every token of the examples
    ``first..last``, summed over what it explains (every generated token of a decoder) and its streams."""
    return cat.df("SELECT example_id, token_idx, sum(value) AS score FROM relevancy WHERE run = $run "
                  "AND method = $method AND example_id BETWEEN $first AND $last GROUP BY example_id, token_idx",
                  {"run": run, "method": method, "first": int(first), "last": int(last)})


def head_key_weights(cat, run: str, stream: str, layer: int, head: int, first: int, last: int,
                     value: bool = False) -> pd.DataFrame:
    """example_id, query_idx, key_idx, weight of one head over the examples ``first..last`` (stored
    weights); with ``value``, the weight times the key's value norm (``--explain value``)."""
    p = {"run": run, "stream": stream, "layer": int(layer), "head": int(head), "first": int(first), "last": int(last)}
    if not value:
        return cat.df("SELECT example_id, query_idx, key_idx, weight FROM attention WHERE run = $run AND "
                      "stream = $stream AND layer = $layer AND head = $head AND example_id BETWEEN $first AND $last", p)
    return cat.df("SELECT a.example_id, a.query_idx, a.key_idx, a.weight * v.norm AS weight FROM attention a "
                  "JOIN value_norms v ON v.run = a.run AND v.stream = a.stream AND v.layer = a.layer AND "
                  "v.example_id = a.example_id AND v.head = a.head AND v.token_idx = a.key_idx "
                  "WHERE a.run = $run AND a.stream = $stream AND a.layer = $layer AND a.head = $head "
                  "AND a.example_id BETWEEN $first AND $last", p)


def run_example_ids(cat, run: str) -> list[int]:
    """The example ids a run holds (its accepted examples), ascending."""
    d = cat.df("SELECT example_id FROM examples WHERE run = $run ORDER BY example_id", {"run": run})
    return [int(x) for x in d.example_id]


# -- the table ----------------------------------------------------------------------------------------
def intervention_keys(cat, run: str) -> pd.DataFrame:
    """intervention, kind, metric, examples, rows, estimated (any estimated rows) of every intervention
    of a run, by kind and key."""
    return cat.df("SELECT intervention, any_value(kind) AS kind, any_value(metric) AS metric, "
                  "count(DISTINCT example_id) AS examples, count(*) AS rows, bool_or(estimated) AS estimated "
                  "FROM interventions WHERE run = $run GROUP BY intervention ORDER BY kind, intervention",
                  {"run": run})


# -- what the Interventions page reads -------------------------------------------------------------
def head_effects(cat, run: str, method: str) -> pd.DataFrame:
    """intervention, stream, layer, head, estimated, effect (the mean of ``metric_after - metric_before``
    over examples), n (examples), changed (the share of examples whose answer changed; null for
    estimates) of every head ablated with ``method`` (``mean`` or ``zero``) in any heads intervention of
    a run: the page pairs one intervention's exact rows with another's estimates."""
    return cat.df("SELECT intervention, stream, layer, head, estimated, avg(metric_after - metric_before) AS effect, "
                  "count(*) AS n, avg(CAST(changed AS DOUBLE)) AS changed FROM interventions "
                  "WHERE run = $run AND kind = 'heads' AND method = $method "
                  "GROUP BY ALL ORDER BY intervention, stream, layer, head, estimated",
                  {"run": run, "method": method})


def knockout_effects(cat, run: str, intervention: str) -> pd.DataFrame:
    """method (the blocked set pair, e.g. ``text->image``), stream, layer (the window's first layer),
    window (its layers, JSON), effect (mean of ``metric_after - metric_before``), changed (share of
    examples whose answer changed), n (examples) of a knockout intervention."""
    return cat.df("SELECT method, stream, layer, any_value(json_extract(spec, '$.layers')::VARCHAR) AS window, "
                  "avg(metric_after - metric_before) AS effect, avg(CAST(changed AS DOUBLE)) AS changed, "
                  "count(*) AS n FROM interventions WHERE run = $run AND intervention = $iv AND kind = 'knockout' "
                  "GROUP BY method, stream, layer ORDER BY method, stream, layer",
                  {"run": run, "iv": intervention})


def region_curves(cat, run: str, intervention: str) -> pd.DataFrame:
    """method, curve (``deletion``: the top fraction of image tokens removed; ``insertion``: only the
    top fraction kept), fraction, score (mean ``metric_after``), relative (mean of ``metric_after /
    metric_before``, over examples whose ``metric_before`` is not 0), changed (share of examples whose
    answer changed), n (examples) of a ranked regions intervention, by method, curve, fraction."""
    return cat.df("SELECT method, json_extract_string(spec, '$.curve') AS curve, fraction, "
                  "avg(metric_after) AS score, avg(metric_after / nullif(metric_before, 0)) AS relative, "
                  "avg(CAST(changed AS DOUBLE)) AS changed, count(*) AS n FROM interventions "
                  "WHERE run = $run AND intervention = $iv AND kind = 'regions' AND method <> 'box' "
                  "GROUP BY ALL ORDER BY method, curve, fraction", {"run": run, "iv": intervention})


def box_effects(cat, run: str, intervention: str) -> pd.DataFrame:
    """label (the box's), effect (mean of ``metric_after - metric_before`` over the boxes removed),
    changed (share of those whose removal changed the answer), boxes, examples, fraction (mean share
    of the image tokens removed) of a box regions intervention, by label."""
    return cat.df("SELECT coalesce(json_extract_string(spec, '$.label'), '(no label)') AS label, "
                  "avg(metric_after - metric_before) AS effect, avg(CAST(changed AS DOUBLE)) AS changed, "
                  "count(*) AS boxes, count(DISTINCT example_id) AS examples, avg(fraction) AS fraction "
                  "FROM interventions WHERE run = $run AND intervention = $iv AND kind = 'regions' "
                  "AND method = 'box' GROUP BY label ORDER BY effect, label", {"run": run, "iv": intervention})


def example_changes(cat, run: str, example_id: int) -> pd.DataFrame:
    """Every intervention row of one example whose answer changed (``changed``): intervention, kind,
    method, stream, layer, head, spec, fraction, metric, metric_before, metric_after, effect,
    answer_after; the largest drop of the score first."""
    return cat.df("SELECT intervention, kind, method, stream, layer, head, spec, fraction, metric, metric_before, "
                  "metric_after, metric_after - metric_before AS effect, answer_after FROM interventions "
                  "WHERE run = $run AND example_id = $ex AND changed "
                  "ORDER BY effect, kind, intervention, method, stream, layer, head, fraction",
                  {"run": run, "ex": int(example_id)})


def example_intervened(cat, run: str, example_id: int) -> int:
    """How many intervention rows with an answer (``changed`` not null) one example has."""
    d = cat.df("SELECT count(changed) AS n FROM interventions WHERE run = $run AND example_id = $ex",
               {"run": run, "ex": int(example_id)})
    return int(d.n.iloc[0])


def has_interventions(cat, run: str) -> bool:
    """Whether the run has rows in ``interventions`` (the SQL page offers its worked examples then)."""
    d = cat.df("SELECT EXISTS (SELECT 1 FROM interventions WHERE run = $run) AS has", {"run": run})
    return bool(d.has.iloc[0])


def intervention_methods(cat, run: str) -> pd.DataFrame:
    """intervention, method, rows: the methods each intervention of a run holds (heads: ``mean`` or
    ``zero``; knockout: the set pairs; regions: ``box`` or the explanations ranked), by intervention, method."""
    return cat.df("SELECT intervention, method, count(*) AS rows FROM interventions WHERE run = $run "
                  "GROUP BY ALL ORDER BY intervention, method", {"run": run})
