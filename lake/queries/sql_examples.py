"""Worked examples for the SQL page: plain SQL a person reads and edits; they run in the
sandbox (``Catalog.user_sql``), filled with SQL literals, never with parameters."""

from __future__ import annotations

import re


# Templates with {run} {stream} {layer} {head} {stat} {example_id}; example_sql() fills them with
# SQL literals (strings quoted by doubling single quotes, numbers through int()), so the text a
# person sees and edits is plain, parameter-free SQL.
EXAMPLE_SQL: dict[str, str] = {
    "Top examples for a head": """\
-- The 20 examples on which head (layer {layer}, head {head}) scores highest on {stat_name}
SELECT h.example_id, h.value AS {stat_ident}, e.text, e.answer, e.prediction, e.correct
FROM head_stats h JOIN examples e ON e.run = h.run AND e.example_id = h.example_id
WHERE h.run = {run} AND h.stream = {stream} AND h.layer = {layer} AND h.head = {head}
  AND h.stat = {stat} AND h.value IS NOT NULL
ORDER BY h.value DESC, h.example_id
LIMIT 20""",
    "Heads that ground words": """\
-- Heads whose words look inside their ground-truth boxes (needs boxes in the manifest)
SELECT stream, layer, head,
       avg(value) FILTER (WHERE stat = 'grounding') AS grounding,
       avg(value) FILTER (WHERE stat = 'pointing') AS pointing,
       count(value) FILTER (WHERE stat = 'grounding') AS examples
FROM head_stats
WHERE run = {run} AND stat IN ('grounding', 'pointing')
GROUP BY stream, layer, head
ORDER BY grounding DESC NULLS LAST, pointing DESC NULLS LAST
LIMIT 20""",
    "Statistics per question type": """\
-- Accuracy and mean head statistics (over all heads) for each meta.qtype
WITH e AS (
  SELECT example_id, json_extract_string(meta, '$.qtype') AS qtype, correct
  FROM examples WHERE run = {run}
), s AS (
  SELECT example_id,
         avg(value) FILTER (WHERE stat = 't2i') AS t2i,
         avg(value) FILTER (WHERE stat = 'entropy') AS entropy,
         avg(value) FILTER (WHERE stat = 'sink') AS sink
  FROM head_stats WHERE run = {run} AND stream = {stream}
  GROUP BY example_id
)
SELECT qtype, count(*) AS examples, avg(CAST(correct AS INTEGER)) AS accuracy,
       avg(t2i) AS t2i, avg(entropy) AS entropy, avg(sink) AS sink
FROM e LEFT JOIN s USING (example_id)
GROUP BY qtype
ORDER BY qtype""",
    "Wrong answers": """\
-- What the model answered instead, most frequent mistakes first
SELECT answer, prediction, count(*) AS examples, min(example_id) AS first_example
FROM examples
WHERE run = {run} AND NOT correct
GROUP BY answer, prediction
ORDER BY examples DESC, answer, prediction""",
    "Skipped rows and why": """\
-- Manifest rows the run skipped or altered, grouped by reason
SELECT stage, message, count(*) AS rows, min(source_id) AS first_source_id
FROM errors
WHERE run = {run}
GROUP BY stage, message
ORDER BY rows DESC, stage""",
    "Tokens of an example": """\
-- The token table of example {example_id}: every token of every stream, in one index space; an image
-- token's box (x0, y0, x1, y1) is in pixels of the original image, its tile 0 the base image, 1.. a crop
SELECT token_idx, stream, modality, role, token, seq_pos, text_pos, patch_row, patch_col, tile, x0, y0, x1, y1
FROM tokens
WHERE run = {run} AND example_id = {example_id}
ORDER BY stream, token_idx""",
    "Where a word looks": """\
-- Where {word_desc} of example {example_id} looks among the image patches (query -> key), layer {layer},
-- head {head}: the 16 patches it attends to most, and each one's share of the word's attention (tile: 0 the
-- base image, 1.. a crop of a tiled image; the box in pixels of the original image)
WITH t AS (SELECT * FROM tokens WHERE run = {run} AND example_id = {example_id} AND stream = {stream}),
q AS (SELECT token_idx, token FROM t WHERE {word_where} ORDER BY text_pos LIMIT 1)
SELECT q.token AS query, k.tile, k.patch_row, k.patch_col, k.x0, k.y0, k.x1, k.y1, round(a.weight, 5) AS weight,
       round(a.weight / sum(a.weight) OVER (), 4) AS share_of_image_mass
FROM attention a
JOIN q ON a.query_idx = q.token_idx
JOIN t k ON a.key_idx = k.token_idx AND k.role = 'patch'
WHERE a.run = {run} AND a.stream = {stream} AND a.layer = {layer} AND a.head = {head}
  AND a.example_id = {example_id}
ORDER BY a.weight DESC
LIMIT 16""",
    "Contribution norms (--explain value)": """\
-- Weights as contribution norms ||a f(x)|| (Kobayashi et al. 2020): stored weight x the key's value norm,
-- example {example_id}, head {head}, layer {layer}; empty unless the run was extracted with --explain value
SELECT a.query_idx, a.key_idx, a.weight, v.norm AS value_norm, a.weight * v.norm AS contribution
FROM attention a
JOIN value_norms v ON v.run = a.run AND v.stream = a.stream AND v.layer = a.layer
  AND v.example_id = a.example_id AND v.head = a.head AND v.token_idx = a.key_idx
WHERE a.run = {run} AND a.stream = {stream} AND a.layer = {layer} AND a.head = {head}
  AND a.example_id = {example_id}
ORDER BY contribution DESC
LIMIT 50""",
    "Rollout to the image (--explain rollout)": """\
-- Attention rollout after the last block: how much each word of example {example_id} draws on each patch;
-- empty unless the run was extracted with --explain rollout
WITH t AS (SELECT * FROM tokens WHERE run = {run} AND example_id = {example_id})
SELECT q.token AS word, k.patch_row, k.patch_col, r.value AS rollout
FROM relevancy r
JOIN t q ON q.token_idx = r.target
JOIN t k ON k.token_idx = r.token_idx
WHERE r.run = {run} AND r.method = 'rollout' AND r.example_id = {example_id}
  AND r.layer = (SELECT max(layer) FROM relevancy WHERE run = {run} AND method = 'rollout')
ORDER BY rollout DESC
LIMIT 50""",
    "Sink tokens (--explain sinks)": """\
-- Tokens with a massive activation (|h_d| / rms(h) >= 20), by role and dimension: the model's sink dimensions;
-- empty unless the run was extracted with --explain sinks
SELECT s.stream, s.layer, t.role, s.dim, count(*) AS tokens, round(avg(s.ratio), 1) AS mean_ratio
FROM sinks s
JOIN tokens t ON t.run = s.run AND t.example_id = s.example_id AND t.token_idx = s.token_idx
WHERE s.run = {run}
GROUP BY ALL
ORDER BY tokens DESC""",
    "Heads that matter (vlatlas intervene)": """\
-- Heads whose exact ablation lowers the score of the model's own answer most (effect = score after - before,
-- mean over examples), beside their mean {stat_name}: which heads look, and which heads matter;
-- empty until `vlatlas intervene --kind heads` has run
WITH a AS (
  SELECT stream, layer, head, method AS ablation, avg(metric_after - metric_before) AS effect,
         avg(CAST(changed AS DOUBLE)) AS answer_changed, count(*) AS examples
  FROM interventions
  WHERE run = {run} AND kind = 'heads' AND NOT estimated
  GROUP BY ALL
), s AS (
  SELECT stream, layer, head, avg(value) AS {stat_ident}
  FROM head_stats WHERE run = {run} AND stat = {stat}
  GROUP BY ALL
)
SELECT a.*, s.{stat_ident}
FROM a LEFT JOIN s USING (stream, layer, head)
ORDER BY effect, stream, layer, head
LIMIT 20""",
    "Deletion and insertion areas (vlatlas intervene)": """\
-- The area under each ranking's deletion and insertion curve: the mean score of the original answer at each
-- fraction of image tokens removed (deletion) or kept (insertion), summed in trapezoids over the fractions;
-- empty until `vlatlas intervene --kind regions` has run
WITH c AS (
  SELECT json_extract_string(spec, '$.replace') AS replace, method,
         json_extract_string(spec, '$.curve') AS curve, fraction, avg(metric_after) AS score
  FROM interventions
  WHERE run = {run} AND kind = 'regions' AND method <> 'box'
  GROUP BY ALL
), t AS (
  SELECT *, lag(fraction) OVER w AS prev_fraction, lag(score) OVER w AS prev_score
  FROM c WINDOW w AS (PARTITION BY replace, method, curve ORDER BY fraction)
)
SELECT replace, method, curve, count(*) AS fractions,
       sum((fraction - prev_fraction) * (score + prev_score) / 2) AS area
FROM t
GROUP BY ALL
ORDER BY replace, curve, area, method""",
    "What changes an answer (vlatlas intervene)": """\
-- Every intervention that changes the answer of example {example_id} (a head ablated, edges knocked out in a
-- window of layers, image regions removed), the largest drop of the score first;
-- empty until `vlatlas intervene` has run
SELECT kind, method, stream, layer, head, fraction, spec, metric, metric_before, metric_after,
       metric_after - metric_before AS effect, answer_after
FROM interventions
WHERE run = {run} AND example_id = {example_id} AND changed
ORDER BY effect, kind, method
LIMIT 100""",
}


# The worked examples that read what only ``--explain`` or ``vlatlas intervene`` writes, and the rows each
# needs (the names of :func:`worked_rows`): on a run without them they return no rows, so the SQL page
# leaves them out.
NEEDS: dict[str, str] = {
    "Contribution norms (--explain value)": "value_norms",
    "Rollout to the image (--explain rollout)": "rollout",
    "Sink tokens (--explain sinks)": "sinks",
    "Heads that matter (vlatlas intervene)": "interventions",
    "Deletion and insertion areas (vlatlas intervene)": "interventions",
    "What changes an answer (vlatlas intervene)": "interventions",
}


# Each of those rows: what its worked example shows, and the ``--explain`` method that writes it.
EXPLAIN_ROWS: dict[str, tuple[str, str]] = {
    "value_norms": ("contribution norms", "value"),
    "rollout": ("rollout", "rollout"),
    "sinks": ("sink tokens", "sinks"),
}


def explain_rows(cat, run: str) -> set[str]:
    """Which of the ``--explain`` rows the worked examples read a run has: a subset of ``value_norms``,
    ``rollout`` (rows of ``relevancy`` with method ``rollout``) and ``sinks`` (a run extracted with
    ``--explain sinks`` on a model where no token is a sink has none)."""
    d = cat.df("SELECT EXISTS (SELECT 1 FROM value_norms WHERE run = $run) AS value_norms, "
               "EXISTS (SELECT 1 FROM relevancy WHERE run = $run AND method = 'rollout') AS rollout, "
               "EXISTS (SELECT 1 FROM sinks WHERE run = $run) AS sinks", {"run": run})
    return {k for k in EXPLAIN_ROWS if bool(d[k].iloc[0])}


def worked_rows(cat, run: str) -> set[str]:
    """:func:`explain_rows`, and ``interventions`` when the run has rows there: what the worked examples
    of :data:`NEEDS` need."""
    from lake.queries.interventions import has_interventions

    return explain_rows(cat, run) | ({"interventions"} if has_interventions(cat, run) else set())


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (single quotes doubled)."""
    return "'" + str(text).replace("'", "''") + "'"


def example_sql(run: str, *, stream: str = "self", layer: int = 0, head: int = 0, stat: str = "t2i",
                example_id: int = 0, text_pos: int | None = None) -> dict[str, str]:
    """``{title: SQL}`` of :data:`EXAMPLE_SQL` for one run and head, ready for ``Catalog.user_sql``;
    "Where a word looks" follows the text token at ``text_pos`` (default: the example's first word)."""
    stat_name = re.sub(r"[^A-Za-z0-9_]+", "_", stat)  # for comments: nothing that could end one
    values = dict(run=sql_literal(run), stream=sql_literal(stream), layer=int(layer), head=int(head),
                  stat=sql_literal(stat), stat_name=stat_name, stat_ident='"' + stat.replace('"', '""') + '"',
                  example_id=int(example_id),
                  word_where="role = 'word'" if text_pos is None else f"text_pos = {int(text_pos)}",
                  word_desc="the first word" if text_pos is None else f"word {int(text_pos)}")
    return {title: sql.format(**values) for title, sql in EXAMPLE_SQL.items()}
