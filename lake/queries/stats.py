"""Head statistics: per-head matrices (raw or z-scored), top examples, run-level summaries."""

from __future__ import annotations

import pandas as pd

from lake.queries.filters import ExampleFilter, _example_where


NORMS = ("raw", "z_example", "z_dataset")


NORM_LABELS = {
    "raw": "raw value",
    "z_example": "z-score across layers × heads (this selection)",
    "z_dataset": "z-score against the whole run (per head)",
}


def stats_available(cat, run: str, stream: str | None = None) -> pd.DataFrame:
    """stream, stat, n_values (non-null), n_rows of the head statistics stored for a run."""
    sql = ("SELECT stream, stat, count(value) AS n_values, count(*) AS n_rows FROM head_stats "
           "WHERE run = $run")
    params: dict = {"run": run}
    if stream is not None:
        sql += " AND stream = $stream"
        params["stream"] = stream
    return cat.df(sql + " GROUP BY stream, stat ORDER BY stream, stat", params)


def _matrix_sql(run: str, stream: str, stat: str, example_id: int | None,
                flt: ExampleFilter | None) -> tuple[str, dict]:
    """SQL of (layer, head, value, n): one example's values or the mean over filtered examples.
    Its parameters include ``$run``, ``$stream`` and ``$stat``."""
    base = {"run": run, "stream": stream, "stat": stat}
    if example_id is not None:
        return ("SELECT layer, head, value, CAST(value IS NOT NULL AS BIGINT) AS n FROM head_stats "
                "WHERE run = $run AND stream = $stream AND stat = $stat AND example_id = $example_id",
                {**base, "example_id": int(example_id)})
    where, params = _example_where(run, flt)
    return ("SELECT layer, head, avg(value) AS value, count(value) AS n FROM head_stats "
            "WHERE run = $run AND stream = $stream AND stat = $stat AND example_id IN "
            f"(SELECT example_id FROM examples WHERE {where}) GROUP BY layer, head",
            {**base, **params})


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
               "FROM head_stats WHERE run = $run AND stream = $stream AND stat = $stat GROUP BY layer, head) "
               "SELECT m.layer, m.head, (m.value - d.mu) / nullif(d.sd, 0) AS value, m.value AS raw, m.n "
               "FROM m LEFT JOIN d USING (layer, head)")
    return cat.df(sql + " ORDER BY layer, head", params)


def head_stat_dataset(cat, run: str, stream: str, stat: str) -> pd.DataFrame:
    """layer, head, mean, std (population), n of a statistic over all examples of a run."""
    return cat.df(
        "SELECT layer, head, avg(value) AS mean, stddev_pop(value) AS std, count(value) AS n "
        "FROM head_stats WHERE run = $run AND stream = $stream AND stat = $stat "
        "GROUP BY layer, head ORDER BY layer, head",
        {"run": run, "stream": stream, "stat": stat},
    )


def top_examples(cat, run: str, stream: str, layer: int, head: int | None, stat: str, n: int = 20,
                 flt: ExampleFilter | None = None, ascending: bool = False) -> pd.DataFrame:
    """The ``n`` examples with the largest (``ascending``: smallest) value of a statistic at one head.

    Returns example_id, value, text, answer, prediction, correct, best first
    (ties by example_id). ``head=None`` ranks by the mean over the layer's heads.
    Only examples passing ``flt`` compete; null values never do.
    """
    params: dict = {"run": run, "stream": stream, "layer": int(layer), "stat": stat, "n": int(n)}
    head_sql = ""
    if head is not None:
        head_sql = " AND head = $head"
        params["head"] = int(head)
    in_sql = ""
    if flt is not None and not flt.is_empty():
        where, wp = _example_where(run, flt)
        in_sql = f" AND example_id IN (SELECT example_id FROM examples WHERE {where})"
        params.update(wp)
    order = "ASC" if ascending else "DESC"  # one of two constants
    # Rank inside head_stats first (a top-n over one column), then fetch only the winners' rows.
    inner = ("SELECT example_id, avg(value) AS value FROM head_stats WHERE run = $run AND stream = $stream "
             f"AND layer = $layer AND stat = $stat{head_sql} AND value IS NOT NULL{in_sql} GROUP BY example_id "
             f"ORDER BY value {order}, example_id LIMIT $n")
    return cat.df(
        f"SELECT t.example_id, t.value, e.text, e.answer, e.prediction, e.correct FROM ({inner}) t "
        f"JOIN examples e ON e.run = $run AND e.example_id = t.example_id ORDER BY t.value {order}, t.example_id",
        params,
    )


def head_means(cat, run: str, stats: list[str], stream: str = "self") -> pd.DataFrame:
    """layer, head and one column per statistic: its mean over the run's examples (nulls skipped)."""
    d = cat.df(
        "SELECT layer, head, stat, avg(value) AS mean FROM head_stats "
        "WHERE run = $run AND stream = $stream AND list_contains($stats, stat) GROUP BY ALL",
        {"run": run, "stream": stream, "stats": list(stats)},
    )
    return d.pivot_table(index=["layer", "head"], columns="stat", values="mean").reset_index()


def layer_means(cat, run: str, stats: list[str], stream: str = "self") -> pd.DataFrame:
    """layer and one column per statistic: its mean over heads and examples."""
    d = cat.df(
        "SELECT layer, stat, avg(value) AS mean FROM head_stats "
        "WHERE run = $run AND stream = $stream AND list_contains($stats, stat) GROUP BY ALL",
        {"run": run, "stream": stream, "stats": list(stats)},
    )
    return d.pivot_table(index="layer", columns="stat", values="mean").reset_index()


def stat_by_correctness(cat, run: str, stat: str, stream: str = "self") -> pd.DataFrame:
    """layer, head, correct, wrong, diff: a statistic's mean over right and over wrong answers."""
    return cat.df(
        "SELECT h.layer, h.head, avg(value) FILTER (WHERE e.correct) AS correct, "
        "avg(value) FILTER (WHERE NOT e.correct) AS wrong, "
        "avg(value) FILTER (WHERE e.correct) - avg(value) FILTER (WHERE NOT e.correct) AS diff "
        "FROM head_stats h JOIN examples e ON e.run = h.run AND e.example_id = h.example_id "
        "WHERE h.run = $run AND h.stream = $stream AND h.stat = $stat AND e.correct IS NOT NULL "
        "GROUP BY h.layer, h.head ORDER BY h.layer, h.head",
        {"run": run, "stream": stream, "stat": stat},
    )


def pointing_chance(cat, run: str) -> float:
    """The pointing score of a uniformly random patch: the mean, over the boxes of the run's
    examples, of the share of the example's patches whose centre lies in the box."""
    d = cat.df(
        "WITH b AS (SELECT example_id, unnest(from_json(boxes, '[{\"label\": \"VARCHAR\", \"box\": [\"DOUBLE\"]}]')) "
        "AS bx FROM examples WHERE run = $run AND boxes IS NOT NULL), "
        "p AS (SELECT example_id, (x0 + x1) / 2 AS cx, (y0 + y1) / 2 AS cy FROM tokens "
        "WHERE run = $run AND role = 'patch'), "
        "f AS (SELECT b.example_id, b.bx, avg(CASE WHEN cx BETWEEN bx.box[1] AND bx.box[3] "
        "AND cy BETWEEN bx.box[2] AND bx.box[4] THEN 1.0 ELSE 0.0 END) AS frac "
        "FROM b JOIN p ON p.example_id = b.example_id GROUP BY ALL) "
        "SELECT avg(frac) AS chance FROM f",
        {"run": run},
    )
    return float(d.chance.iloc[0]) if len(d) and pd.notna(d.chance.iloc[0]) else float("nan")


def first_view_head(cat, run: str, stream: str) -> pd.DataFrame:
    """layer, head, stat, value: the head a first view opens on (one row; empty without statistics).

    The best grounding head when the run has boxes (the largest mean ``grounding`` over the run's
    examples), else the head with the largest mean text -> image mass (``t2i``). Ties go to the
    lowest layer, then the lowest head.
    """
    for stat in ("grounding", "t2i"):
        d = cat.df(
            "SELECT layer, head, $stat AS stat, avg(CAST(value AS DOUBLE)) AS value FROM head_stats "
            "WHERE run = $run AND stream = $stream AND stat = $stat AND value IS NOT NULL GROUP BY layer, head "
            "ORDER BY value DESC, layer, head LIMIT 1",
            {"stat": stat, "run": run, "stream": stream},
        )
        if len(d) and pd.notna(d.value.iloc[0]) and d.value.iloc[0] > 0:
            return d
    return pd.DataFrame({"layer": [], "head": [], "stat": [], "value": []})
