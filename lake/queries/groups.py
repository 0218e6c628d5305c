"""Two groups of examples, head by head, for the Compare page (the tests are lake/compare.py):
slices of one run (independent samples) or one manifest under two runs (paired samples)."""

from __future__ import annotations

import pandas as pd

from lake.queries.filters import ExampleFilter, _example_where


def _two_filters(run_a: str, run_b: str, flt_a: ExampleFilter | None,
                 flt_b: ExampleFilter | None) -> tuple[str, str, dict]:
    """The WHERE clauses of two example filters and their parameters, named ``$a_…`` and ``$b_…``."""
    wa, pa_ = _example_where(run_a, flt_a, prefix="a_")
    wb, pb = _example_where(run_b, flt_b, prefix="b_")
    return wa, wb, {**pa_, **pb}


def _groups_sql(run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None) -> tuple[str, dict]:
    """SQL of (example_id, grp): the run's examples passing ``flt_a`` (grp 'A') or ``flt_b`` ('B');
    an example passing both belongs to neither (independent samples share no member)."""
    wa, wb, params = _two_filters(run, run, flt_a, flt_b)
    return (f"SELECT example_id, 'A' AS grp FROM examples WHERE {wa} AND example_id NOT IN "
            f"(SELECT example_id FROM examples WHERE {wb}) UNION ALL "
            f"SELECT example_id, 'B' AS grp FROM examples WHERE {wb} AND example_id NOT IN "
            f"(SELECT example_id FROM examples WHERE {wa})",
            params)


def compare_sizes(cat, run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None) -> pd.DataFrame:
    """One row: n_a, n_b (examples passing each filter), n_both (passing both; left out of both groups)."""
    wa, wb, params = _two_filters(run, run, flt_a, flt_b)
    return cat.df(
        f"WITH a AS (SELECT example_id FROM examples WHERE {wa}), b AS (SELECT example_id FROM examples WHERE {wb}) "
        "SELECT (SELECT count(*) FROM a) AS n_a, (SELECT count(*) FROM b) AS n_b, "
        "(SELECT count(*) FROM a JOIN b USING (example_id)) AS n_both",
        params,
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
        "WHERE h.run = $run AND h.stream = $stream AND h.stat = $stat GROUP BY ALL ORDER BY 1, 2, 3",
        {**gp, "run": run, "stream": stream, "stat": stat},
    )


def compare_values(cat, run: str, flt_a: ExampleFilter | None, flt_b: ExampleFilter | None, stream: str,
                   stat: str, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
    """layer, head, example_id, group, value: the per-example values behind :func:`compare_moments`
    (one head with ``layer`` and ``head``, else all); null values left out."""
    g, gp = _groups_sql(run, flt_a, flt_b)
    sql = (f"WITH g AS ({g}) SELECT h.layer, h.head, h.example_id, g.grp AS \"group\", "
           "CAST(h.value AS DOUBLE) AS value FROM head_stats h JOIN g ON h.example_id = g.example_id "
           "WHERE h.run = $run AND h.stream = $stream AND h.stat = $stat AND h.value IS NOT NULL")
    params = {**gp, "run": run, "stream": stream, "stat": stat}
    if layer is not None and head is not None:
        sql += " AND h.layer = $layer AND h.head = $head"
        params.update(layer=int(layer), head=int(head))
    return cat.df(sql + " ORDER BY 1, 2, 4, 3", params)


def _pairs_sql(run_a: str, run_b: str, flt: ExampleFilter | None, stream: str, stat: str) -> tuple[str, dict]:
    """SQL of (layer, head, example_id, a, b): a statistic of the same example and head in two runs,
    for examples passing ``flt`` in both runs (same example_id and source_id) with a value in both."""
    wa, wb, params = _two_filters(run_a, run_b, flt, flt)
    return (f"WITH e AS (SELECT example_id, source_id FROM examples WHERE {wa} INTERSECT "
            f"SELECT example_id, source_id FROM examples WHERE {wb}), "
            "ha AS (SELECT layer, head, example_id, CAST(value AS DOUBLE) AS value FROM head_stats "
            "WHERE run = $a_run AND stream = $stream AND stat = $stat AND value IS NOT NULL), "
            "hb AS (SELECT layer, head, example_id, CAST(value AS DOUBLE) AS value FROM head_stats "
            "WHERE run = $b_run AND stream = $stream AND stat = $stat AND value IS NOT NULL), "
            "p AS (SELECT ha.layer, ha.head, ha.example_id, ha.value AS a, hb.value AS b FROM ha "
            "JOIN hb USING (layer, head, example_id) WHERE ha.example_id IN (SELECT example_id FROM e)) ",
            {**params, "stream": stream, "stat": stat})


def paired_sizes(cat, run_a: str, run_b: str, flt: ExampleFilter | None) -> pd.DataFrame:
    """One row: n_a, n_b (examples passing ``flt`` in each run), n_both (in both: the pairs)."""
    wa, wb, params = _two_filters(run_a, run_b, flt, flt)
    return cat.df(
        f"WITH a AS (SELECT example_id, source_id FROM examples WHERE {wa}), "
        f"b AS (SELECT example_id, source_id FROM examples WHERE {wb}) "
        "SELECT (SELECT count(*) FROM a) AS n_a, (SELECT count(*) FROM b) AS n_b, "
        "(SELECT count(*) FROM (SELECT * FROM a INTERSECT SELECT * FROM b)) AS n_both",
        params,
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
        sql += " WHERE layer = $layer AND head = $head"
        params.update(layer=int(layer), head=int(head))
    return cat.df(sql + " ORDER BY 1, 2, 3", params)
