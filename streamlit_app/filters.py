"""The example filter's widgets, shared by the Examples page and the Compare page's groups A and B.

The filter's values live in the canonical keys ``q``, ``answer``, ``pred``,
``correct``, ``split``, ``mkey``, ``mval`` (see :mod:`streamlit_app.state`);
with a prefix (``a``, ``b``) in ``a_q`` … ``a_mval``. Read the filter back with
``state.example_filter(prefix)``.
"""

from __future__ import annotations

import streamlit as st

from lake import queries
from streamlit_app import state

ANY = "any"
CORRECT_LABELS = {None: ANY, True: "correct", False: "wrong"}


def filter_widgets(run: str, prefix: str = "", where=st, wide: bool = True) -> None:
    """Text search, answer, prediction, right/wrong, split and a metadata key and value, bound to the
    canonical keys ``<prefix>_q`` … ``<prefix>_mval`` (``q`` … ``mval`` without a prefix).

    ``where``: the container to draw in. ``wide``: two rows (search, answer, prediction, right/wrong;
    split, metadata key, value) for a full-width page; else three rows for a narrow column (search;
    answer, prediction, right/wrong; split, metadata key, value).
    """
    def k(name: str) -> str:
        return f"{prefix}_{name}" if prefix else name

    def choices(column: str) -> list:
        return [None, *state.q(queries.distinct_values, run, column).value.tolist()]

    if wide:
        search, answer, pred, correct = where.columns([3, 2, 2, 2])
        split, mkey, mval, _ = where.columns([2, 2, 3, 2])
    else:
        search = where
        answer, pred, correct = where.columns(3)
        split, mkey, mval = where.columns(3)
    search.text_input("Search text", placeholder="words in the text…", **state.bind(k("q")))
    for col, name, column, label in ((answer, "answer", "answer", "Answer"), (pred, "pred", "prediction", "Prediction"),
                                     (split, "split", "split", "Split")):
        values = choices(column)
        state.choose(k(name), values, default=None)
        col.selectbox(label, values, format_func=lambda v: ANY if v is None else v, placeholder=ANY,
                      **state.bind(k(name)))
    state.choose(k("correct"), [None, True, False], default=None)
    correct.selectbox("Prediction is", [None, True, False], placeholder=ANY, format_func=CORRECT_LABELS.get,
                      **state.bind(k("correct")))
    keys = [None, *state.q(queries.meta_keys, run).key.tolist()]
    state.choose(k("mkey"), keys, default=None)
    mkey.selectbox("Metadata key", keys, format_func=lambda v: "—" if v is None else v, placeholder="—",
                   **state.bind(k("mkey")))
    key = state.get(k("mkey"))
    mvals = [None] + (state.q(queries.meta_values, run, key).value.tolist() if key else [])
    state.choose(k("mval"), mvals, default=None)
    mval.selectbox("Metadata value", mvals, format_func=lambda v: ANY if v is None else v, placeholder=ANY,
                   disabled=not key, **state.bind(k("mval")))
