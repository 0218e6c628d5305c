"""Named, parameterised queries over the lake's views: every SQL the app and the CLI run.

Each function takes a :class:`lake.catalog.Catalog` (anything with
``df(sql, params) -> pandas.DataFrame``) and returns a DataFrame. Values are
always bound as parameters (``?``); the SQL text is assembled only from
constant fragments chosen by Python code, never from user input.

Conventions (DESIGN.md): ``weight = A[query, key]``; layers and heads are
0-based; ``(stream, layer, head)`` names a head.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

import pandas as pd

NORMS = ("raw", "z_example", "z_dataset")
NORM_LABELS = {
    "raw": "raw value",
    "z_example": "z-score across layers × heads (this selection)",
    "z_dataset": "z-score against the whole run (per head)",
}


# -- filters ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleFilter:
    """A filter over a run's examples; ``None`` means "any".

    Parameters
    ----------
    text : case-insensitive substring of the example's text (``ILIKE``).
    answer, prediction, split : exact values.
    correct : ``True`` / ``False`` for right / wrong predictions.
    meta_key, meta_value : ``meta[meta_key] == meta_value`` (as a string).
    """

    text: str | None = None
    answer: str | None = None
    prediction: str | None = None
    correct: bool | None = None
    split: str | None = None
    meta_key: str | None = None
    meta_value: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, "") for f in fields(self))

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``text ~ 'red', correct = False``."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v in (None, "") or f.name == "meta_value":
                continue
            if f.name == "text":
                parts.append(f"text contains {v!r}")
            elif f.name == "meta_key":
                if self.meta_value not in (None, ""):
                    parts.append(f"meta.{v} = {self.meta_value!r}")
            else:
                parts.append(f"{f.name} = {v!r}")
        return ", ".join(parts) or "no filter"


def _json_pointer(key: str) -> str:
    """JSON pointer (RFC 6901) of a top-level key, bound as a value, so any key is safe."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _example_where(run: str, flt: ExampleFilter | None) -> tuple[str, list]:
    """WHERE clause (constant text) and its parameters for examples of ``run`` passing ``flt``."""
    sql, params = ["run = ?"], [run]
    flt = flt or ExampleFilter()
    if flt.text:
        sql.append("text ILIKE ?")
        params.append("%" + flt.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        sql[-1] += " ESCAPE '\\'"
    for col in ("answer", "prediction", "split"):
        v = getattr(flt, col)
        if v not in (None, ""):
            sql.append(f"{col} = ?")  # col is one of three constants
            params.append(v)
    if flt.correct is not None:
        sql.append("correct = ?")
        params.append(bool(flt.correct))
    if flt.meta_key and flt.meta_value not in (None, ""):
        sql.append("json_extract_string(meta, ?) = ?")
        params += [_json_pointer(flt.meta_key), str(flt.meta_value)]
    return " AND ".join(sql), params


# -- runs -------------------------------------------------------------------------
def list_runs(cat) -> pd.DataFrame:
    """Every run: run, model, model_family, status, n_examples, created_at (newest first)."""
    return cat.df(
        "SELECT run, model, model_family, status, n_examples, created_at FROM runs "
        "ORDER BY created_at DESC NULLS LAST, run"
    )


def run_info(cat, run: str) -> pd.DataFrame:
    """The run's row of ``runs`` (empty when the run is unknown)."""
    return cat.df("SELECT * FROM runs WHERE run = ?", [run])


def parse_json(text) -> dict:
    """A JSON object column value as a dict ({} for null or malformed)."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return {}
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def run_capture(cat, run: str) -> dict:
    """The run's capture configuration (``runs.capture`` JSON) as a dict."""
    info = run_info(cat, run)
    return parse_json(info["capture"].iloc[0]) if len(info) else {}


def run_streams(cat, run: str) -> pd.DataFrame:
    """stream, layers, heads, hidden_size of every stream of a run.

    From ``runs.streams`` (JSON), completed by what the data holds (streams,
    layers and heads seen in ``head_stats``) where the JSON lacks it.
    """
    info = run_info(cat, run)
    declared = parse_json(info["streams"].iloc[0]) if len(info) else {}
    seen = cat.df(
        "SELECT stream, max(layer) + 1 AS layers, max(head) + 1 AS heads FROM head_stats "
        "WHERE run = ? GROUP BY stream ORDER BY stream",
        [run],
    )
    rows = []
    for stream, d in declared.items():
        d = d if isinstance(d, dict) else {}
        rows.append(dict(stream=stream, layers=d.get("layers"), heads=d.get("heads"),
                         hidden_size=d.get("hidden_size")))
    names = [r["stream"] for r in rows]
    for r in seen.itertuples(index=False):
        if r.stream in names:
            row = rows[names.index(r.stream)]
            row["layers"] = row["layers"] if row["layers"] is not None else int(r.layers)
            row["heads"] = row["heads"] if row["heads"] is not None else int(r.heads)
        else:
            rows.append(dict(stream=r.stream, layers=int(r.layers), heads=int(r.heads), hidden_size=None))
    out = pd.DataFrame(rows, columns=["stream", "layers", "heads", "hidden_size"])
    return out.dropna(subset=["layers", "heads"]).astype({"layers": int, "heads": int})


def run_errors(cat, run: str) -> pd.DataFrame:
    """Rows the run skipped or altered: source_id, stage, message."""
    return cat.df("SELECT source_id, stage, message FROM errors WHERE run = ? ORDER BY source_id", [run])


# -- examples ---------------------------------------------------------------------
EXAMPLE_COLUMNS = ("example_id, source_id, split, text, answer, prediction, correct, image_id, "
                   "image_width, image_height, grid_h, grid_w, n_tokens, boxes, meta")


def count_examples(cat, run: str, flt: ExampleFilter | None = None) -> int:
    """Number of the run's examples that pass ``flt``."""
    where, params = _example_where(run, flt)
    return int(cat.df(f"SELECT count(*) AS n FROM examples WHERE {where}", params)["n"].iloc[0])


def examples(cat, run: str, flt: ExampleFilter | None = None, limit: int | None = None,
             offset: int = 0) -> pd.DataFrame:
    """The run's examples that pass ``flt``, by example_id; ``limit``/``offset`` page through them."""
    where, params = _example_where(run, flt)
    sql = f"SELECT {EXAMPLE_COLUMNS} FROM examples WHERE {where} ORDER BY example_id"
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        params += [int(limit), int(offset)]
    return cat.df(sql, params)


def example(cat, run: str, example_id: int) -> pd.DataFrame:
    """One example's row, with ``has_image`` telling whether its image is in the lake."""
    return cat.df(
        f"SELECT {', '.join('e.' + c.strip() for c in EXAMPLE_COLUMNS.split(','))}, "
        "EXISTS (SELECT 1 FROM images i WHERE i.image_id = e.image_id) AS has_image "
        "FROM examples e WHERE e.run = ? AND e.example_id = ?",
        [run, int(example_id)],
    )


_DISTINCT = {  # column -> constant SQL; the column name is never taken from input
    "answer": "SELECT answer AS value, count(*) AS n FROM examples WHERE run = ? AND answer IS NOT NULL "
              "GROUP BY 1 ORDER BY n DESC, value LIMIT ?",
    "prediction": "SELECT prediction AS value, count(*) AS n FROM examples WHERE run = ? "
                  "AND prediction IS NOT NULL GROUP BY 1 ORDER BY n DESC, value LIMIT ?",
    "split": "SELECT split AS value, count(*) AS n FROM examples WHERE run = ? AND split IS NOT NULL "
             "GROUP BY 1 ORDER BY n DESC, value LIMIT ?",
}


def distinct_values(cat, run: str, column: str, limit: int = 500) -> pd.DataFrame:
    """value, n of ``answer``, ``prediction`` or ``split`` in a run, most frequent first."""
    if column not in _DISTINCT:
        raise ValueError(f"distinct_values: column must be one of {', '.join(_DISTINCT)}, not {column!r}")
    return cat.df(_DISTINCT[column], [run, int(limit)])


def meta_keys(cat, run: str) -> pd.DataFrame:
    """key: every top-level key of the examples' ``meta`` JSON in a run."""
    return cat.df(
        "SELECT DISTINCT unnest(json_keys(meta)) AS key FROM examples "
        "WHERE run = ? AND meta IS NOT NULL AND json_valid(meta) ORDER BY key",
        [run],
    )


def meta_values(cat, run: str, key: str, limit: int = 500) -> pd.DataFrame:
    """value, n of ``meta[key]`` (as strings) in a run, most frequent first."""
    return cat.df(
        "SELECT json_extract_string(meta, ?) AS value, count(*) AS n FROM examples "
        "WHERE run = ? AND meta IS NOT NULL AND json_valid(meta) "
        "AND json_extract_string(meta, ?) IS NOT NULL GROUP BY 1 ORDER BY n DESC, value LIMIT ?",
        [_json_pointer(key), run, _json_pointer(key), int(limit)],
    )


def example_tokens(cat, run: str, example_id: int, stream: str | None = None) -> pd.DataFrame:
    """The example's token table (all streams, or one), by token_idx."""
    sql = ("SELECT token_idx, stream, modality, role, token, seq_pos, text_pos, patch_row, patch_col, "
           "x0, y0, x1, y1 FROM tokens WHERE run = ? AND example_id = ?")
    params: list = [run, int(example_id)]
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    return cat.df(sql + " ORDER BY token_idx", params)


# -- images -----------------------------------------------------------------------
def image_png(cat, image_id: str) -> pd.DataFrame:
    """image_id, png (bytes), width, height of one image (empty when it is not in the lake)."""
    return cat.df("SELECT image_id, png, width, height FROM images WHERE image_id = ? LIMIT 1", [image_id])


def images_png(cat, image_ids: list[str]) -> pd.DataFrame:
    """image_id, png of several images at once (those that are in the lake)."""
    return cat.df(
        "SELECT DISTINCT ON (image_id) image_id, png FROM images WHERE list_contains(?, image_id)",
        [list(image_ids)],
    )


# -- head statistics ----------------------------------------------------------------
def stats_available(cat, run: str, stream: str | None = None) -> pd.DataFrame:
    """stream, stat, n_values (non-null), n_rows of the head statistics stored for a run."""
    sql = ("SELECT stream, stat, count(value) AS n_values, count(*) AS n_rows FROM head_stats "
           "WHERE run = ?")
    params: list = [run]
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    return cat.df(sql + " GROUP BY stream, stat ORDER BY stream, stat", params)


def _matrix_sql(run: str, stream: str, stat: str, example_id: int | None,
                flt: ExampleFilter | None) -> tuple[str, list]:
    """SQL of (layer, head, value, n): one example's values or the mean over filtered examples."""
    if example_id is not None:
        return ("SELECT layer, head, value, CAST(value IS NOT NULL AS BIGINT) AS n FROM head_stats "
                "WHERE run = ? AND stream = ? AND stat = ? AND example_id = ?",
                [run, stream, stat, int(example_id)])
    where, params = _example_where(run, flt)
    return ("SELECT layer, head, avg(value) AS value, count(value) AS n FROM head_stats "
            "WHERE run = ? AND stream = ? AND stat = ? AND example_id IN "
            f"(SELECT example_id FROM examples WHERE {where}) GROUP BY layer, head",
            [run, stream, stat, *params])


def head_stat_matrix(cat, run: str, stream: str, stat: str, example_id: int | None = None,
                     flt: ExampleFilter | None = None, norm: str = "raw") -> pd.DataFrame:
    """A statistic per (layer, head): layer, head, value, raw, n.

    Parameters
    ----------
    example_id : one example's values; ``None`` averages over the examples
        passing ``flt`` (``n`` counts the non-null values averaged).
    norm : ``raw``; ``z_example``: ``(raw - mean) / std`` with mean and std over
        all layers × heads of this matrix; ``z_dataset``: ``(raw - mean[l, h]) /
        std[l, h]`` with the mean and (population) std of head ``(l, h)`` over all
        examples of the run. A std of 0 gives null.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
    inner, params = _matrix_sql(run, stream, stat, example_id, flt)
    if norm == "raw":
        sql = f"SELECT layer, head, value, value AS raw, n FROM ({inner})"
    elif norm == "z_example":
        sql = (f"SELECT layer, head, (value - avg(value) OVER ()) / nullif(stddev_pop(value) OVER (), 0) "
               f"AS value, value AS raw, n FROM ({inner})")
    else:
        sql = (f"WITH m AS ({inner}), d AS (SELECT layer, head, avg(value) AS mu, stddev_pop(value) AS sd "
               "FROM head_stats WHERE run = ? AND stream = ? AND stat = ? GROUP BY layer, head) "
               "SELECT m.layer, m.head, (m.value - d.mu) / nullif(d.sd, 0) AS value, m.value AS raw, m.n "
               "FROM m LEFT JOIN d USING (layer, head)")
        params = [*params, run, stream, stat]
    return cat.df(sql + " ORDER BY layer, head", params)


def head_stat_dataset(cat, run: str, stream: str, stat: str) -> pd.DataFrame:
    """layer, head, mean, std (population), n of a statistic over all examples of a run."""
    return cat.df(
        "SELECT layer, head, avg(value) AS mean, stddev_pop(value) AS std, count(value) AS n "
        "FROM head_stats WHERE run = ? AND stream = ? AND stat = ? GROUP BY layer, head ORDER BY layer, head",
        [run, stream, stat],
    )


def top_examples(cat, run: str, stream: str, layer: int, head: int | None, stat: str, n: int = 20,
                 flt: ExampleFilter | None = None, ascending: bool = False) -> pd.DataFrame:
    """The ``n`` examples with the largest (``ascending``: smallest) value of a statistic at one head.

    Returns example_id, value, text, answer, prediction, correct, best first
    (ties by example_id). ``head=None`` ranks by the mean over the layer's heads.
    Only examples passing ``flt`` compete; null values never do.
    """
    params: list = [run, stream, int(layer), stat]
    head_sql = ""
    if head is not None:
        head_sql = " AND head = ?"
        params.append(int(head))
    in_sql = ""
    if flt is not None and not flt.is_empty():
        where, wp = _example_where(run, flt)
        in_sql = f" AND example_id IN (SELECT example_id FROM examples WHERE {where})"
        params += wp
    order = "ASC" if ascending else "DESC"  # one of two constants
    # Rank inside head_stats first (a top-n over one column), then fetch only the winners' rows.
    inner = (f"SELECT example_id, avg(value) AS value FROM head_stats WHERE run = ? AND stream = ? AND layer = ? "
             f"AND stat = ?{head_sql} AND value IS NOT NULL{in_sql} GROUP BY example_id "
             f"ORDER BY value {order}, example_id LIMIT ?")
    params.append(int(n))
    return cat.df(
        f"SELECT t.example_id, t.value, e.text, e.answer, e.prediction, e.correct FROM ({inner}) t "
        f"JOIN examples e ON e.run = ? AND e.example_id = t.example_id ORDER BY t.value {order}, t.example_id",
        [*params, run],
    )


# -- worked examples for the SQL page (user SQL: they run in the sandbox, Catalog.user_sql) ------
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
-- The token table of example {example_id}: every token of every stream, in one index space
SELECT token_idx, stream, modality, role, token, seq_pos, text_pos, patch_row, patch_col
FROM tokens
WHERE run = {run} AND example_id = {example_id}
ORDER BY stream, token_idx""",
    "Where a word looks": """\
-- Attention from the first word of example {example_id} to each patch (query -> key), head {head}, layer {layer}
WITH t AS (SELECT * FROM tokens WHERE run = {run} AND example_id = {example_id} AND stream = {stream}),
q AS (SELECT token_idx, token FROM t WHERE role = 'word' ORDER BY text_pos LIMIT 1)
SELECT q.token AS query, k.patch_row, k.patch_col, a.weight
FROM attention a
JOIN q ON a.query_idx = q.token_idx
JOIN t k ON a.key_idx = k.token_idx AND k.role = 'patch'
WHERE a.run = {run} AND a.stream = {stream} AND a.layer = {layer} AND a.head = {head}
  AND a.example_id = {example_id}
ORDER BY a.weight DESC""",
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
}


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (single quotes doubled)."""
    return "'" + str(text).replace("'", "''") + "'"


def example_sql(run: str, *, stream: str = "self", layer: int = 0, head: int = 0, stat: str = "t2i",
                example_id: int = 0) -> dict[str, str]:
    """``{title: SQL}`` of :data:`EXAMPLE_SQL` for one run and head, ready for ``Catalog.user_sql``."""
    stat_name = re.sub(r"[^A-Za-z0-9_]+", "_", stat)  # for comments: nothing that could end one
    values = dict(run=sql_literal(run), stream=sql_literal(stream), layer=int(layer), head=int(head),
                  stat=sql_literal(stat), stat_name=stat_name, stat_ident='"' + stat.replace('"', '""') + '"',
                  example_id=int(example_id))
    return {title: sql.format(**values) for title, sql in EXAMPLE_SQL.items()}


# -- attention ----------------------------------------------------------------------
def n_heads(cat, run: str, stream: str) -> int:
    """Heads of a stream: from ``runs.streams``, else the largest head index stored + 1."""
    s = run_streams(cat, run)
    s = s[s.stream == stream]
    if len(s):
        return int(s.heads.iloc[0])
    d = cat.df("SELECT max(head) + 1 AS h FROM attention WHERE run = ? AND stream = ?", [run, stream])
    return int(d.h.iloc[0]) if len(d) and pd.notna(d.h.iloc[0]) else 0


def _attention_sources(cat, run: str, example_id: int, stream: str, layer: int) -> list[tuple[str, list]]:
    """Where one example's attention at ``(stream, layer)`` can be read, fastest first: ``(FROM …
    WHERE … text, params)``.

    First the chunk file that holds the example, when the run records its chunk size (the
    pipeline does): DuckDB then opens one file instead of reading the footer of every chunk's
    file, which is what the view costs (about 0.4 s at 157 chunks of ViLT-B, each with ~100 row
    groups; see bench/bench_queries.py). Then the view, which is always right.
    """
    view = ("FROM attention WHERE run = ? AND stream = ? AND layer = ? AND example_id = ?",
            [run, stream, int(layer), int(example_id)])
    chunk = run_capture(cat, run).get("chunk_size")
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0 and hasattr(cat, "chunk_file")):
        return [view]
    path = cat.chunk_file("attention", {"run": run, "stream": stream, "layer": int(layer)}, int(example_id) // chunk)
    if path is None:
        return [view]
    return [("FROM read_parquet(?) WHERE example_id = ?", [path, int(example_id)]), view]


def attention_block(cat, run: str, example_id: int, stream: str, layer: int, head: int | None = None,
                    heads: int | None = None) -> pd.DataFrame:
    """query_idx, key_idx, weight of one example's attention at ``(stream, layer, head)``.

    With ``head=None`` the weight is the mean over heads, ``sum_h A_h[q, k] /
    heads``: a weight that pruning left out counts as 0 (the divisor is the
    number of heads, not the number of stored rows). ``heads`` defaults to the
    stream's head count (:func:`n_heads`). Pairs with no stored weight are absent.
    """
    if head is None:
        heads = heads or n_heads(cat, run, stream)
        if heads <= 0:
            return pd.DataFrame({"query_idx": [], "key_idx": [], "weight": []})
    d = pd.DataFrame({"query_idx": [], "key_idx": [], "weight": []})
    for src, params in _attention_sources(cat, run, example_id, stream, layer):
        if head is not None:
            d = cat.df(f"SELECT query_idx, key_idx, CAST(weight AS DOUBLE) AS weight {src} AND head = ? "
                       "ORDER BY query_idx, key_idx", [*params, int(head)])
        else:
            d = cat.df(f"SELECT query_idx, key_idx, sum(CAST(weight AS DOUBLE)) / ? AS weight {src} "
                       "GROUP BY query_idx, key_idx ORDER BY query_idx, key_idx", [float(heads), *params])
        if len(d):
            break
    return d


METHODS = ("attention", "value", "rollout", "relevancy")


def method_block(cat, run: str, example_id: int, stream: str, layer: int, head: int | None = None,
                 heads: int | None = None, method: str = "attention") -> pd.DataFrame:
    """query_idx, key_idx, weight of one example under an explanation method (``--explain``).

    - ``attention``: :func:`attention_block`.
    - ``value``: each stored weight times its key's value norm, ``a_qk n_h(k)``, renormalised over the
      row's stored keys (the share of the row's contribution norm ``||a f(x)||``); with ``head=None``
      the mean of those shares over heads (a head without stored weights counting as 0).
    - ``rollout``: the rollout after block ``layer`` (heads combined): text queries over patches.
    - ``relevancy``: each token's relevancy to a target, whatever the layer and head; ``query_idx`` is
      the target token (a generated token), or -1 for the model's prediction.
    """
    if method == "attention":
        return attention_block(cat, run, example_id, stream, layer, head, heads)
    if method == "value":
        divisor = 1.0 if head is not None else float(heads or n_heads(cat, run, stream))
        hsel = "" if head is None else "AND head = ?"
        d = pd.DataFrame({"query_idx": [], "key_idx": [], "weight": []})
        for src, params in _attention_sources(cat, run, example_id, stream, layer):  # the chunk file first
            d = cat.df(f"""
                WITH a AS (SELECT head, query_idx, key_idx, CAST(weight AS DOUBLE) AS weight {src} {hsel}),
                w AS (SELECT a.head, a.query_idx, a.key_idx, a.weight * v.norm AS c
                      FROM a JOIN value_norms v ON v.head = a.head AND v.token_idx = a.key_idx
                      WHERE v.run = ? AND v.stream = ? AND v.layer = ? AND v.example_id = ?),
                s AS (SELECT query_idx, key_idx, c / nullif(sum(c) OVER (PARTITION BY head, query_idx), 0) AS share
                      FROM w)
                SELECT query_idx, key_idx, sum(coalesce(share, 0)) / ? AS weight FROM s
                GROUP BY query_idx, key_idx ORDER BY query_idx, key_idx""",
                       [*params, *([] if head is None else [int(head)]), run, stream, int(layer), int(example_id),
                        divisor])
            if len(d):
                break
        return d
    if method == "rollout":
        return cat.df("SELECT target AS query_idx, token_idx AS key_idx, CAST(value AS DOUBLE) AS weight FROM relevancy "
                      "WHERE run = ? AND method = 'rollout' AND stream = ? AND layer = ? AND example_id = ? "
                      "ORDER BY 1, 2", [run, stream, int(layer), int(example_id)])
    if method == "relevancy":
        return cat.df("SELECT coalesce(target, -1) AS query_idx, token_idx AS key_idx, CAST(value AS DOUBLE) AS weight "
                      "FROM relevancy WHERE run = ? AND method = 'relevancy' AND stream = ? AND example_id = ? "
                      "ORDER BY 1, 2", [run, stream, int(example_id)])
    raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}")


def lens_words(cat, run: str, stream: str, example_id: int, token_idx: int) -> pd.DataFrame:
    """layer, rank, piece, vocab_id, prob: the logit lens of one token through the layers
    (``--explain lens``; empty without it)."""
    return cat.df("SELECT layer, rank, piece, vocab_id, CAST(prob AS DOUBLE) AS prob FROM lens WHERE run = ? "
                  "AND stream = ? AND example_id = ? AND token_idx = ? ORDER BY layer, rank",
                  [run, stream, int(example_id), int(token_idx)])


def attention_layers(cat, run: str, stream: str) -> pd.DataFrame:
    """layer: the layers of a stream that have attention stored."""
    return cat.df("SELECT DISTINCT layer FROM attention WHERE run = ? AND stream = ? ORDER BY layer",
                  [run, stream])


# -- dataset summaries (the demo's findings, the README) --------------------------------
def accuracy_by(cat, run: str, meta_key: str) -> pd.DataFrame:
    """group (the value of ``meta[meta_key]``), n, accuracy over examples with a known ``correct``."""
    return cat.df(
        "SELECT json_extract_string(meta, ?) AS \"group\", count(*) AS n, avg(correct::INT) AS accuracy "
        "FROM examples WHERE run = ? AND correct IS NOT NULL GROUP BY 1 ORDER BY 1",
        [_json_pointer(meta_key), run],
    )


def head_means(cat, run: str, stats: list[str], stream: str = "self") -> pd.DataFrame:
    """layer, head and one column per statistic: its mean over the run's examples (nulls skipped)."""
    d = cat.df(
        "SELECT layer, head, stat, avg(value) AS mean FROM head_stats "
        "WHERE run = ? AND stream = ? AND list_contains(?, stat) GROUP BY ALL",
        [run, stream, list(stats)],
    )
    return d.pivot_table(index=["layer", "head"], columns="stat", values="mean").reset_index()


def layer_means(cat, run: str, stats: list[str], stream: str = "self") -> pd.DataFrame:
    """layer and one column per statistic: its mean over heads and examples."""
    d = cat.df(
        "SELECT layer, stat, avg(value) AS mean FROM head_stats "
        "WHERE run = ? AND stream = ? AND list_contains(?, stat) GROUP BY ALL",
        [run, stream, list(stats)],
    )
    return d.pivot_table(index="layer", columns="stat", values="mean").reset_index()


def stat_by_correctness(cat, run: str, stat: str, stream: str = "self") -> pd.DataFrame:
    """layer, head, correct, wrong, diff: a statistic's mean over right and over wrong answers."""
    return cat.df(
        "SELECT h.layer, h.head, avg(value) FILTER (WHERE e.correct) AS correct, "
        "avg(value) FILTER (WHERE NOT e.correct) AS wrong, "
        "avg(value) FILTER (WHERE e.correct) - avg(value) FILTER (WHERE NOT e.correct) AS diff "
        "FROM head_stats h JOIN examples e ON e.run = h.run AND e.example_id = h.example_id "
        "WHERE h.run = ? AND h.stream = ? AND h.stat = ? AND e.correct IS NOT NULL "
        "GROUP BY h.layer, h.head ORDER BY h.layer, h.head",
        [run, stream, stat],
    )


def pointing_chance(cat, run: str) -> float:
    """The pointing score of a uniformly random patch: the mean, over the boxes of the run's
    examples, of the share of the example's patches whose centre lies in the box."""
    d = cat.df(
        "WITH b AS (SELECT example_id, unnest(from_json(boxes, '[{\"label\": \"VARCHAR\", \"box\": [\"DOUBLE\"]}]')) "
        "AS bx FROM examples WHERE run = ? AND boxes IS NOT NULL), "
        "p AS (SELECT example_id, (x0 + x1) / 2 AS cx, (y0 + y1) / 2 AS cy FROM tokens "
        "WHERE run = ? AND role = 'patch'), "
        "f AS (SELECT b.example_id, b.bx, avg(CASE WHEN cx BETWEEN bx.box[1] AND bx.box[3] "
        "AND cy BETWEEN bx.box[2] AND bx.box[4] THEN 1.0 ELSE 0.0 END) AS frac "
        "FROM b JOIN p ON p.example_id = b.example_id GROUP BY ALL) "
        "SELECT avg(frac) AS chance FROM f",
        [run, run],
    )
    return float(d.chance.iloc[0]) if len(d) and pd.notna(d.chance.iloc[0]) else float("nan")


# -- comparing two groups of examples (the Compare page; the statistics are lake/compare.py) ------
def runs_same_manifest(cat, run: str) -> pd.DataFrame:
    """run, model, status, n_examples of the *other* runs whose ``runs.manifest`` equals ``run``'s."""
    return cat.df(
        "SELECT run, model, status, n_examples FROM runs WHERE run <> ? "
        "AND manifest = (SELECT any_value(manifest) FROM runs WHERE run = ?) "
        "ORDER BY created_at DESC NULLS LAST, run",
        [run, run],
    )


def _groups_sql(run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None) -> tuple[str, list]:
    """SQL of (example_id, grp): the run's examples passing ``flt_a`` (grp 'A') or ``flt_b`` ('B');
    an example passing both belongs to neither (independent samples share no member)."""
    wa, pa_ = _example_where(run, flt_a)
    wb, pb = _example_where(run, flt_b)
    return (f"SELECT example_id, 'A' AS grp FROM examples WHERE {wa} AND example_id NOT IN "
            f"(SELECT example_id FROM examples WHERE {wb}) UNION ALL "
            f"SELECT example_id, 'B' AS grp FROM examples WHERE {wb} AND example_id NOT IN "
            f"(SELECT example_id FROM examples WHERE {wa})",
            [*pa_, *pb, *pb, *pa_])


def compare_sizes(cat, run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None) -> pd.DataFrame:
    """One row: n_a, n_b (examples passing each filter), n_both (passing both; left out of both groups)."""
    wa, pa_ = _example_where(run, flt_a)
    wb, pb = _example_where(run, flt_b)
    return cat.df(
        f"WITH a AS (SELECT example_id FROM examples WHERE {wa}), b AS (SELECT example_id FROM examples WHERE {wb}) "
        "SELECT (SELECT count(*) FROM a) AS n_a, (SELECT count(*) FROM b) AS n_b, "
        "(SELECT count(*) FROM a JOIN b USING (example_id)) AS n_both",
        [*pa_, *pb],
    )


def compare_moments(cat, run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None, stream: str,
                    stat: str) -> pd.DataFrame:
    """layer, head, group ('A'/'B'), n, mean, var (sample variance) of a statistic per head and group.

    The groups are :func:`_groups_sql`'s (the overlap of the filters left out); null values are skipped.
    """
    g, gp = _groups_sql(run, flt_a, flt_b)
    return cat.df(
        f"WITH g AS ({g}) SELECT h.layer, h.head, g.grp AS \"group\", count(h.value) AS n, "
        "avg(CAST(h.value AS DOUBLE)) AS mean, var_samp(CAST(h.value AS DOUBLE)) AS var "
        "FROM head_stats h JOIN g ON h.example_id = g.example_id "
        "WHERE h.run = ? AND h.stream = ? AND h.stat = ? GROUP BY ALL ORDER BY 1, 2, 3",
        [*gp, run, stream, stat],
    )


def compare_values(cat, run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None, stream: str,
                   stat: str, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
    """layer, head, example_id, group, value: the per-example values behind :func:`compare_moments`
    (one head with ``layer`` and ``head``, else all); null values left out."""
    g, gp = _groups_sql(run, flt_a, flt_b)
    sql = (f"WITH g AS ({g}) SELECT h.layer, h.head, h.example_id, g.grp AS \"group\", "
           "CAST(h.value AS DOUBLE) AS value FROM head_stats h JOIN g ON h.example_id = g.example_id "
           "WHERE h.run = ? AND h.stream = ? AND h.stat = ? AND h.value IS NOT NULL")
    params = [*gp, run, stream, stat]
    if layer is not None and head is not None:
        sql += " AND h.layer = ? AND h.head = ?"
        params += [int(layer), int(head)]
    return cat.df(sql + " ORDER BY 1, 2, 4, 3", params)


def _pairs_sql(run_a: str, run_b: str, flt: ExampleFilter | None, stream: str, stat: str) -> tuple[str, list]:
    """SQL of (layer, head, example_id, a, b): a statistic of the same example and head in two runs,
    for examples passing ``flt`` in both runs (same example_id and source_id) with a value in both."""
    wa, pa_ = _example_where(run_a, flt)
    wb, pb = _example_where(run_b, flt)
    return (f"WITH e AS (SELECT example_id, source_id FROM examples WHERE {wa} INTERSECT "
            f"SELECT example_id, source_id FROM examples WHERE {wb}), "
            "ha AS (SELECT layer, head, example_id, CAST(value AS DOUBLE) AS value FROM head_stats "
            "WHERE run = ? AND stream = ? AND stat = ? AND value IS NOT NULL), "
            "hb AS (SELECT layer, head, example_id, CAST(value AS DOUBLE) AS value FROM head_stats "
            "WHERE run = ? AND stream = ? AND stat = ? AND value IS NOT NULL), "
            "p AS (SELECT ha.layer, ha.head, ha.example_id, ha.value AS a, hb.value AS b FROM ha "
            "JOIN hb USING (layer, head, example_id) WHERE ha.example_id IN (SELECT example_id FROM e)) ",
            [*pa_, *pb, run_a, stream, stat, run_b, stream, stat])


def paired_sizes(cat, run_a: str, run_b: str, flt: ExampleFilter | None) -> pd.DataFrame:
    """One row: n_a, n_b (examples passing ``flt`` in each run), n_both (in both: the pairs)."""
    wa, pa_ = _example_where(run_a, flt)
    wb, pb = _example_where(run_b, flt)
    return cat.df(
        f"WITH a AS (SELECT example_id, source_id FROM examples WHERE {wa}), "
        f"b AS (SELECT example_id, source_id FROM examples WHERE {wb}) "
        "SELECT (SELECT count(*) FROM a) AS n_a, (SELECT count(*) FROM b) AS n_b, "
        "(SELECT count(*) FROM (SELECT * FROM a INTERSECT SELECT * FROM b)) AS n_both",
        [*pa_, *pb],
    )


def paired_moments(cat, run_a: str, run_b: str, flt: ExampleFilter | None, stream: str, stat: str) -> pd.DataFrame:
    """layer, head, n (pairs), mean_a, mean_b, mean_d, var_d (sample variance of d = b − a) per head."""
    p, params = _pairs_sql(run_a, run_b, flt, stream, stat)
    return cat.df(
        p + "SELECT layer, head, count(*) AS n, avg(a) AS mean_a, avg(b) AS mean_b, avg(b - a) AS mean_d, "
        "var_samp(b - a) AS var_d FROM p GROUP BY ALL ORDER BY 1, 2",
        params,
    )


def paired_values(cat, run_a: str, run_b: str, flt: ExampleFilter | None, stream: str, stat: str,
                  layer: int | None = None, head: int | None = None) -> pd.DataFrame:
    """layer, head, example_id, a, b: the pairs behind :func:`paired_moments` (one head, or all)."""
    p, params = _pairs_sql(run_a, run_b, flt, stream, stat)
    sql = p + "SELECT layer, head, example_id, a, b FROM p"
    if layer is not None and head is not None:
        sql += " WHERE layer = ? AND head = ?"
        params += [int(layer), int(head)]
    return cat.df(sql + " ORDER BY 1, 2, 3", params)


def examples_by_id(cat, run: str, ids: list[int]) -> pd.DataFrame:
    """example_id, text, answer, prediction, correct, split of the given examples of a run."""
    return cat.df(
        "SELECT example_id, text, answer, prediction, correct, split FROM examples "
        "WHERE run = ? AND list_contains(?, example_id) ORDER BY example_id",
        [run, [int(i) for i in ids]],
    )


# -- hidden states and their maps (pipeline/embed.py, the Hidden states page) ------------------------
def hidden_layers(cat, run: str, stream: str | None = None) -> pd.DataFrame:
    """stream, layer, n (tokens) of every hidden-state layer stored for a run (0 = embedding output)."""
    sql = "SELECT stream, layer, count(*) AS n FROM hidden_states WHERE run = ?"
    params: list = [run]
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    return cat.df(sql + " GROUP BY stream, layer ORDER BY stream, layer", params)


def hidden_vector_examples(cat, run: str, stream: str | None = None) -> pd.DataFrame:
    """example_id of the examples whose hidden *vectors* are stored (``vec`` not null), by example_id.

    A run extracted with ``--keep-hidden sample:N`` stores the norm of every token but the
    vectors of a seeded sample of N examples only; any other run has the vectors of every
    example it has hidden states of. Read at the lowest stored layer of the stream (the
    first stream when none is given): every layer of an example holds the same tokens.
    """
    layers = hidden_layers(cat, run, stream)
    if layers.empty:
        return pd.DataFrame({"example_id": pd.Series(dtype="int64")})
    first = layers.iloc[0]
    return cat.df(
        "SELECT DISTINCT example_id FROM hidden_states WHERE run = ? AND stream = ? AND layer = ? "
        "AND vec IS NOT NULL ORDER BY example_id",
        [run, str(first.stream), int(first.layer)],
    )


def hidden_token_keys(cat, run: str, stream: str, n_layers: int) -> pd.DataFrame:
    """example_id, token_idx, modality, role of the tokens with a hidden *vector* (``vec`` not
    null) at all ``n_layers`` stored layers of a stream, by (example_id, token_idx)."""
    return cat.df(
        "WITH k AS (SELECT example_id, token_idx FROM hidden_states WHERE run = ? AND stream = ? "
        "AND vec IS NOT NULL GROUP BY example_id, token_idx HAVING count(*) = ?) "
        "SELECT k.example_id, k.token_idx, t.modality, t.role FROM k LEFT JOIN tokens t "
        "ON t.run = ? AND t.example_id = k.example_id AND t.token_idx = k.token_idx "
        "ORDER BY k.example_id, k.token_idx",
        [run, stream, int(n_layers), run],
    )


def hidden_vectors(cat, run: str, stream: str, layer: int, *, pairs: tuple[list, list] | None = None,
                   example_ids: list[int] | None = None) -> pd.DataFrame:
    """example_id, token_idx, norm, vec (FLOAT[]) of the hidden states at ``(stream, layer)`` that
    have a stored vector (``vec`` not null: see :func:`hidden_vector_examples`), by (example_id, token_idx).

    Parameters
    ----------
    pairs : ``(example_ids, token_idxs)``, two equally long lists: only these tokens.
    example_ids : only the tokens of these examples.
    """
    base = "FROM hidden_states h WHERE h.run = ? AND h.stream = ? AND h.layer = ? AND h.vec IS NOT NULL"
    params: list = [run, stream, int(layer)]
    if pairs is not None:
        ex, tok = [int(i) for i in pairs[0]], [int(i) for i in pairs[1]]
        if len(ex) != len(tok):
            raise ValueError("hidden_vectors: pairs must be two lists of equal length")
        lo, hi = (min(ex), max(ex)) if ex else (0, -1)
        return cat.df(
            "WITH p AS (SELECT unnest(?::BIGINT[]) AS example_id, unnest(?::INTEGER[]) AS token_idx) "
            "SELECT h.example_id, h.token_idx, h.norm, h.vec FROM hidden_states h "
            "JOIN p ON p.example_id = h.example_id AND p.token_idx = h.token_idx "
            "WHERE h.run = ? AND h.stream = ? AND h.layer = ? AND h.example_id BETWEEN ? AND ? "
            "AND h.vec IS NOT NULL ORDER BY h.example_id, h.token_idx",
            [ex, tok, *params, lo, hi],
        )
    if example_ids is not None:
        base += " AND list_contains(?, h.example_id)"
        params.append([int(i) for i in example_ids])
    return cat.df(f"SELECT h.example_id, h.token_idx, h.norm, h.vec {base} ORDER BY h.example_id, h.token_idx",
                  params)


def hidden_norm_examples(cat, run: str, stream: str, layer: int, example_ids: list[int]) -> pd.DataFrame:
    """example_id of the given examples that have hidden states (a norm, with or without a vector) at
    ``(stream, layer)``, by example_id."""
    return cat.df(
        "SELECT DISTINCT example_id FROM hidden_states WHERE run = ? AND stream = ? AND layer = ? "
        "AND list_contains(?, example_id) ORDER BY example_id",
        [run, stream, int(layer), [int(i) for i in example_ids]],
    )


def example_hidden(cat, run: str, stream: str, example_id: int) -> pd.DataFrame:
    """layer, token_idx, modality, role, norm, vec of every hidden state of one example, by layer, token_idx
    (``vec`` is null where only the norm is stored: see :func:`hidden_vector_examples`)."""
    return cat.df(
        "SELECT h.layer, h.token_idx, t.modality, t.role, h.norm, h.vec FROM hidden_states h "
        "LEFT JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
        "WHERE h.run = ? AND h.stream = ? AND h.example_id = ? ORDER BY h.layer, h.token_idx",
        [run, stream, int(example_id)],
    )


def embedding_layers(cat, run: str, stream: str | None = None, method: str = "tsne") -> pd.DataFrame:
    """stream, layer, n (tokens) of the maps stored for a run."""
    sql = "SELECT stream, layer, count(*) AS n FROM embeddings WHERE run = ? AND method = ?"
    params: list = [run, method]
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    return cat.df(sql + " GROUP BY stream, layer ORDER BY stream, layer", params)


def embedding_map(cat, run: str, stream: str, layer: int, method: str = "tsne") -> pd.DataFrame:
    """One map: example_id, token_idx, x, y with the token's modality, role, token, text_pos, patch_row,
    patch_col, x0..y1 and its example's text, answer, prediction, correct, image_id, image_width,
    image_height, by (example_id, token_idx)."""
    return cat.df(
        "SELECT m.example_id, m.token_idx, m.x, m.y, t.modality, t.role, t.token, t.text_pos, t.patch_row, "
        "t.patch_col, t.x0, t.y0, t.x1, t.y1, e.text, e.answer, e.prediction, e.correct, e.image_id, "
        "e.image_width, e.image_height FROM embeddings m "
        "LEFT JOIN tokens t ON t.run = m.run AND t.example_id = m.example_id AND t.token_idx = m.token_idx "
        "LEFT JOIN examples e ON e.run = m.run AND e.example_id = m.example_id "
        "WHERE m.run = ? AND m.stream = ? AND m.layer = ? AND m.method = ? ORDER BY m.example_id, m.token_idx",
        [run, stream, int(layer), method],
    )


def embedding_tokens(cat, run: str, stream: str, layer: int, example_ids: list[int],
                     method: str = "tsne") -> pd.DataFrame:
    """example_id, token_idx, x, y of the given examples' tokens that are on a map."""
    return cat.df(
        "SELECT example_id, token_idx, x, y FROM embeddings WHERE run = ? AND stream = ? AND layer = ? "
        "AND method = ? AND list_contains(?, example_id) ORDER BY example_id, token_idx",
        [run, stream, int(layer), method, [int(i) for i in example_ids]],
    )


def embedding_path(cat, run: str, stream: str, example_id: int, token_idx: int,
                   method: str = "tsne") -> pd.DataFrame:
    """layer, x, y of one token on the maps of every layer (empty when it is not in the sample)."""
    return cat.df(
        "SELECT layer, x, y FROM embeddings WHERE run = ? AND stream = ? AND example_id = ? AND token_idx = ? "
        "AND method = ? ORDER BY layer",
        [run, stream, int(example_id), int(token_idx), method],
    )


def map_vectors(cat, run: str, stream: str, layer: int, method: str = "tsne") -> pd.DataFrame:
    """The sample of a map with its hidden vectors: example_id, token_idx, x, y, modality, role, token,
    patch_row, patch_col, vec, by (example_id, token_idx) (the map's row order)."""
    return cat.df(
        "SELECT m.example_id, m.token_idx, m.x, m.y, t.modality, t.role, t.token, t.patch_row, t.patch_col, "
        "h.vec FROM embeddings m "
        "JOIN hidden_states h ON h.run = m.run AND h.stream = m.stream AND h.layer = m.layer "
        "AND h.example_id = m.example_id AND h.token_idx = m.token_idx "
        "LEFT JOIN tokens t ON t.run = m.run AND t.example_id = m.example_id AND t.token_idx = m.token_idx "
        "WHERE m.run = ? AND m.stream = ? AND m.layer = ? AND m.method = ? "
        "AND h.run = ? AND h.stream = ? AND h.layer = ? AND h.vec IS NOT NULL ORDER BY m.example_id, m.token_idx",
        [run, stream, int(layer), method, run, stream, int(layer)],
    )


def hidden_norms(cat, run: str, stream: str, example_id: int | None = None,
                 flt: ExampleFilter | None = None, max_examples: int | None = None) -> pd.DataFrame:
    """layer, modality, norm, n, n_examples: the mean L2 norm of the hidden states of each modality
    per layer, over one example's tokens, or over the tokens of the examples passing ``flt`` (at most
    ``max_examples`` of them, a fixed pseudo-random choice: ``ORDER BY hash(example_id)``)."""
    sql = ("SELECT h.layer, t.modality, avg(h.norm) AS norm, count(*) AS n, "
           "count(DISTINCT h.example_id) AS n_examples FROM hidden_states h "
           "JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
           "WHERE h.run = ? AND h.stream = ?")
    params: list = [run, stream]
    if example_id is not None:
        sql += " AND h.example_id = ?"
        params.append(int(example_id))
    elif max_examples is not None or (flt is not None and not flt.is_empty()):
        where, p = _example_where(run, flt)
        sql += f" AND h.example_id IN (SELECT example_id FROM examples WHERE {where}"
        params += p
        if max_examples is not None:
            sql += " ORDER BY hash(example_id), example_id LIMIT ?"
            params.append(int(max_examples))
        sql += ")"
    return cat.df(sql + " GROUP BY h.layer, t.modality ORDER BY h.layer, t.modality", params)


def text_image_cosine(cat, run: str, stream: str, example_id: int | None = None,
                      flt: ExampleFilter | None = None, max_examples: int = 500) -> pd.DataFrame:
    """layer, cosine, n_examples: the mean cosine similarity between the text and the image tokens'
    hidden states, per layer.

    For each example, ``cos(h_t, h_i)`` is averaged over every pair of a text
    token ``t`` and an image token ``i`` (special tokens included, by their
    modality); ``cosine`` is that value for ``example_id``, or its mean over the
    examples passing ``flt`` (at most ``max_examples`` of them, a fixed
    pseudo-random choice: ``ORDER BY hash(example_id)``).

    Only stored vectors count (``vec`` not null): an example without vectors
    (``--keep-hidden sample:N``) has no row, and the mean is over the examples
    that have them, so ``n_examples`` counts those.
    """
    if example_id is not None:
        ex_sql, params = "SELECT ?::BIGINT AS example_id", [int(example_id)]
    else:
        where, params = _example_where(run, flt)
        with_vec = [int(i) for i in hidden_vector_examples(cat, run, stream).example_id]
        ex_sql = (f"SELECT example_id FROM examples WHERE {where} AND list_contains(?, example_id) "
                  "ORDER BY hash(example_id), example_id LIMIT ?")
        params = [*params, with_vec, int(max_examples)]
    return cat.df(
        f"WITH ex AS ({ex_sql}), "
        "h AS (SELECT h.example_id, h.layer, t.modality, h.vec FROM hidden_states h "
        "JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
        "WHERE h.run = ? AND h.stream = ? AND h.vec IS NOT NULL AND h.example_id IN (SELECT example_id FROM ex)), "
        "p AS (SELECT a.example_id, a.layer, avg(list_cosine_similarity(a.vec, b.vec)) AS cosine "
        "FROM h a JOIN h b ON a.example_id = b.example_id AND a.layer = b.layer "
        "WHERE a.modality = 'text' AND b.modality = 'image' GROUP BY a.example_id, a.layer) "
        "SELECT layer, avg(cosine) AS cosine, count(*) AS n_examples FROM p GROUP BY layer ORDER BY layer",
        [*params, run, stream],
    )
