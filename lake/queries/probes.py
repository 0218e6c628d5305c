"""Probes: the ``probes`` table (``vlatlas probe``) and the modules a run captured (``activations``)."""

from __future__ import annotations

import pandas as pd

SIGNIFICANT = 0.05  # the p-value under which the app marks a layer's probe significant


def probe_list(cat, run: str) -> pd.DataFrame:
    """probe, target, selector, source, metric, created_at, layers of every probe of a run (newest first)."""
    return cat.df(
        "SELECT probe, any_value(target) AS target, any_value(selector) AS selector, any_value(source) AS source, "
        "any_value(metric) AS metric, max(created_at) AS created_at, count(*) AS layers FROM probes "
        "WHERE run = $run GROUP BY probe ORDER BY created_at DESC, probe",
        {"run": run},
    )


def probe_rows(cat, run: str, probe: str) -> pd.DataFrame:
    """One probe's rows, by stream and layer: every column of ``probes`` but run."""
    return cat.df(
        "SELECT * EXCLUDE (run) FROM probes WHERE run = $run AND probe = $probe ORDER BY stream, layer",
        {"run": run, "probe": probe},
    )


def captured_modules(cat, run: str) -> pd.DataFrame:
    """stream, module, layer, n_vectors: the modules a run captured (``--capture-modules``) with vectors."""
    return cat.df(
        "SELECT stream, module, any_value(layer) AS layer, count(vec) AS n_vectors FROM activations "
        "WHERE run = $run GROUP BY stream, module ORDER BY stream, layer NULLS FIRST, module",
        {"run": run},
    )
