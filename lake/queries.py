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


# -- attention ----------------------------------------------------------------------
def n_heads(cat, run: str, stream: str) -> int:
    """Heads of a stream: from ``runs.streams``, else the largest head index stored + 1."""
    s = run_streams(cat, run)
    s = s[s.stream == stream]
    if len(s):
        return int(s.heads.iloc[0])
    d = cat.df("SELECT max(head) + 1 AS h FROM attention WHERE run = ? AND stream = ?", [run, stream])
    return int(d.h.iloc[0]) if len(d) and pd.notna(d.h.iloc[0]) else 0


def attention_block(cat, run: str, example_id: int, stream: str, layer: int, head: int | None = None,
                    heads: int | None = None) -> pd.DataFrame:
    """query_idx, key_idx, weight of one example's attention at ``(stream, layer, head)``.

    With ``head=None`` the weight is the mean over heads, ``sum_h A_h[q, k] /
    heads``: a weight that pruning left out counts as 0 (the divisor is the
    number of heads, not the number of stored rows). ``heads`` defaults to the
    stream's head count (:func:`n_heads`). Pairs with no stored weight are absent.
    """
    base = "FROM attention WHERE run = ? AND stream = ? AND layer = ? AND example_id = ?"
    params: list = [run, stream, int(layer), int(example_id)]
    if head is not None:
        return cat.df(f"SELECT query_idx, key_idx, CAST(weight AS DOUBLE) AS weight {base} AND head = ? "
                      "ORDER BY query_idx, key_idx", [*params, int(head)])
    heads = heads or n_heads(cat, run, stream)
    if heads <= 0:
        return pd.DataFrame({"query_idx": [], "key_idx": [], "weight": []})
    return cat.df(f"SELECT query_idx, key_idx, sum(CAST(weight AS DOUBLE)) / ? AS weight {base} "
                  "GROUP BY query_idx, key_idx ORDER BY query_idx, key_idx", [float(heads), *params])


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
