"""Probes (``vlatlas probe``, pipeline/probe.py): what a probe reads, and the ``probes`` table.

A probe reads stored vectors from ``hidden_states`` (source ``hidden``) or ``activations`` (a
captured module): the two tables are laid out alike (example_id, token_idx, vec), so the same
SQL reads either; ``table`` is one of :data:`VECTOR_TABLES`, chosen by code, never typed by a user.
"""

from __future__ import annotations

import pandas as pd

VECTOR_TABLES = ("hidden_states", "activations")
SIGNIFICANT = 0.05  # the p-value under which the app and the findings call a layer's probe significant


def _table(table: str) -> str:
    if table not in VECTOR_TABLES:
        raise ValueError(f"no vectors in table {table!r}: one of {', '.join(VECTOR_TABLES)}")
    return table


def probe_examples(cat, run: str) -> pd.DataFrame:
    """example_id, answer, boxes (JSON), meta (JSON) of every example of a run, by example_id."""
    return cat.df("SELECT example_id, answer, boxes, meta FROM examples WHERE run = $run ORDER BY example_id",
                  {"run": run})


def probe_tokens(cat, run: str, stream: str) -> pd.DataFrame:
    """The token table of one stream of a run (what the selectors look at), by (example_id, token_idx)."""
    return cat.df(
        "SELECT example_id, token_idx, modality, role, token, seq_pos, x0, y0, x1, y1 FROM tokens "
        "WHERE run = $run AND stream = $stream ORDER BY example_id, token_idx",
        {"run": run, "stream": stream},
    )


def hidden_vector_layers(cat, run: str) -> pd.DataFrame:
    """stream, layer of every hidden-state layer of a run that stores vectors (``vec`` not null)."""
    return cat.df("SELECT stream, layer FROM hidden_states WHERE run = $run AND vec IS NOT NULL "
                  "GROUP BY stream, layer ORDER BY stream, layer", {"run": run})


def stored_modules(cat, run: str) -> pd.DataFrame:
    """stream, module, layer (null outside the blocks) of every captured module of a run that stores
    vectors, by stream, layer, module."""
    return cat.df("SELECT stream, module, min(layer) AS layer FROM activations WHERE run = $run "
                  "AND vec IS NOT NULL GROUP BY stream, module ORDER BY stream, layer NULLS FIRST, module",
                  {"run": run})


def vector_examples(cat, run: str, table: str, stream: str, *, layer: int | None = None,
                    module: str | None = None) -> pd.DataFrame:
    """example_id of the examples with a stored vector at one hidden-state layer (``hidden_states``)
    or one module (``activations``) of a stream, by example_id."""
    where, params = _where(run, stream, layer, module)
    return cat.df(f"SELECT DISTINCT example_id FROM {_table(table)} WHERE {where} AND vec IS NOT NULL "
                  "ORDER BY example_id", params)


def selected_vectors(cat, run: str, table: str, stream: str, pairs: tuple[list, list], *,
                     layer: int | None = None, module: str | None = None) -> pd.DataFrame:
    """example_id, token_idx, vec of the given tokens (``(example_ids, token_idxs)``) that have a stored
    vector at one layer or module: one query, by (example_id, token_idx)."""
    ex, tok = [int(i) for i in pairs[0]], [int(i) for i in pairs[1]]
    where, params = _where(run, stream, layer, module, "h.")
    lo, hi = (min(ex), max(ex)) if ex else (0, -1)
    return cat.df(
        "WITH p AS (SELECT unnest($ex::BIGINT[]) AS example_id, unnest($tok::INTEGER[]) AS token_idx) "
        f"SELECT h.example_id, h.token_idx, h.vec FROM {_table(table)} h "
        "JOIN p ON p.example_id = h.example_id AND p.token_idx = h.token_idx "
        f"WHERE {where} "
        "AND h.example_id BETWEEN $lo AND $hi AND h.vec IS NOT NULL ORDER BY h.example_id, h.token_idx",
        {**params, "ex": ex, "tok": tok, "lo": lo, "hi": hi},
    )


def _where(run: str, stream: str, layer: int | None, module: str | None, alias: str = "") -> tuple[str, dict]:
    """The filter on one stream's layer or module (columns prefixed with ``alias``) and its parameters."""
    a = alias
    where, params = f"{a}run = $run AND {a}stream = $stream", {"run": run, "stream": stream}
    if module is not None:
        where += f" AND {a}module = $module"
        params["module"] = module
    if layer is not None:
        where += f" AND {a}layer = $layer"
        params["layer"] = int(layer)
    return where, params


def probe_rows(cat, run: str, probe: str | None = None) -> pd.DataFrame:
    """The ``probes`` rows of a run (one probe's when ``probe`` is given), by probe, stream, source, layer."""
    sql = "SELECT * EXCLUDE (run) FROM probes WHERE run = $run"
    params: dict = {"run": run}
    if probe is not None:
        sql += " AND probe = $probe"
        params["probe"] = probe
    return cat.df(sql + " ORDER BY probe, stream, source, layer NULLS FIRST", params)


def probe_keys(cat, run: str) -> pd.DataFrame:
    """probe, target, selector, source, metric, created_at, rows of every probe of a run, newest first."""
    return cat.df("SELECT probe, any_value(target) AS target, any_value(selector) AS selector, "
                  "min(source) AS source, any_value(metric) AS metric, max(created_at) AS created_at, "
                  "count(*) AS rows FROM probes WHERE run = $run "
                  "GROUP BY probe ORDER BY created_at DESC, probe", {"run": run})
