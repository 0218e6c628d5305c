"""Runs: the runs table, a run's capture configuration and streams, its skipped rows."""

from __future__ import annotations

import json

import pandas as pd


def list_runs(cat) -> pd.DataFrame:
    """Every run: run, model, model_family, status, n_examples, created_at (newest first)."""
    return cat.df(
        "SELECT run, model, model_family, status, n_examples, created_at FROM runs "
        "ORDER BY created_at DESC NULLS LAST, run"
    )


def run_info(cat, run: str) -> pd.DataFrame:
    """The run's row of ``runs`` (empty when the run is unknown)."""
    return cat.df("SELECT * FROM runs WHERE run = $run", {"run": run})


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
        "WHERE run = $run GROUP BY stream ORDER BY stream",
        {"run": run},
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
    return cat.df("SELECT source_id, stage, message FROM errors WHERE run = $run ORDER BY source_id",
                  {"run": run})


def runs_same_manifest(cat, run: str) -> pd.DataFrame:
    """run, model, status, n_examples of the *other* runs whose ``runs.manifest`` equals ``run``'s."""
    return cat.df(
        "SELECT run, model, status, n_examples FROM runs WHERE run <> $run "
        "AND manifest = (SELECT any_value(manifest) FROM runs WHERE run = $run) "
        "ORDER BY created_at DESC NULLS LAST, run",
        {"run": run},
    )
