"""How the regions kind ranks an example's image tokens: by each explanation the run holds (torch-free,
read from the lake before any model runs).

- ``attention``: the run's best grounding head (largest mean ``grounding``): its stored weights from
  the word naming the example's first box (the probe's ``word`` selector), or, without such a word,
  from the token the answer is read at (``last``), to each image token;
- ``value``: the same weights times each key's value norm (``--explain value``): ``a_ij n_h(j)``;
- ``rollout``, ``relevancy``: the ``relevancy`` table's value at each token, summed over what is
  explained (each generated token of a decoder);
- ``random``: a permutation seeded by the example (the chunk function draws it), the baseline.

The image tokens removed are those of one stream, the *unit stream*: the keys' stream of the best
grounding head (``vision`` for a cross stream), else a decoder's ``lm``, ViLT's ``self`` or a tower's
``vision``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lake import queries as Q
from lake.queries import interventions as IQ
from lake.queries.probes import probe_examples, probe_tokens
from pipeline.intervene.spec import METHODS, InterventionError
from pipeline.probe import select_tokens

KEY_STREAM = {"cross": "vision", "qformer_cross": "vision", "lm_cross": "vision"}
QUERY_STREAM = {"cross": "text", "qformer_cross": "qformer", "lm_cross": "lm"}


def unit_stream(cat, run: str, head: dict | None) -> str:
    """``head``: the run's best grounding head (``lake.queries.interventions.best_grounding_head``), read once
    by the caller for every function here."""
    if head is not None:
        return KEY_STREAM.get(head["stream"], head["stream"])
    streams = set(Q.run_streams(cat, run).stream)
    for s in ("lm", "self", "vision"):
        if s in streams:
            return s
    raise InterventionError(f"regions: run {run!r} has no stream with image tokens")


def held_methods(cat, run: str, head: dict | None) -> list[str]:
    """The ranking methods the run's tables support, in :data:`~pipeline.intervene.spec.METHODS` order."""
    held = set(IQ.relevancy_methods_held(cat, run)) | {"random"}
    if head is not None:
        held.add("attention")
        if IQ.has_value_norms(cat, run, head["stream"], head["layer"]):
            held.add("value")
    return [m for m in METHODS if m in held]


def choose_methods(cat, run: str, asked: tuple[str, ...], head: dict | None) -> list[str]:
    held = held_methods(cat, run, head)
    if not asked:
        return held
    missing = [m for m in asked if m not in held]
    if missing:
        why = {"attention": "no grounding statistic (the run has no boxes, or no stream where text attends to "
                            "the image)", "value": "no value norms at the best grounding head (--explain value)",
               "rollout": "no rollout (--explain rollout)", "relevancy": "no relevancy (--explain relevancy)"}
        raise InterventionError(f"regions: run {run!r} holds {why[missing[0]]}; it can rank by "
                                f"{', '.join(held)}")
    return list(asked)


def rankings(cat, run: str, methods: list[str], example_ids: list[int],
             head: dict | None) -> dict[int, dict[str, list[int]]]:
    """``{example_id: {method: [token_idx, best first]}}`` (``random`` is drawn by the chunk function)."""
    out: dict[int, dict[str, list[int]]] = {int(e): {} for e in example_ids}
    if not example_ids:
        return out
    first, last = int(min(example_ids)), int(max(example_ids))
    query = None  # the head's query tokens, read once for attention and value
    for m in methods:
        if m in IQ.RELEVANCY_METHODS:
            _put(out, IQ.relevancy_scores(cat, run, m, first, last), m)
        elif m in ("attention", "value"):
            query = _query_tokens(cat, run, head) if query is None else query
            _put(out, _head_scores(cat, run, head, query, first, last, value=(m == "value")), m)
    return out


def _query_tokens(cat, run: str, head: dict) -> pd.DataFrame:
    """example_id, token_idx of each example's query token for the head: the word naming its first box,
    else the last prompt token."""
    qstream = QUERY_STREAM.get(head["stream"], head["stream"])
    tokens, examples = probe_tokens(cat, run, qstream), probe_examples(cat, run)
    word = select_tokens(tokens, examples, "word")
    lastt = select_tokens(tokens, examples, "last")
    return pd.concat([word, lastt[~lastt.example_id.isin(word.example_id)]])


def _head_scores(cat, run: str, head: dict, query: pd.DataFrame, first: int, last: int, value: bool) -> pd.DataFrame:
    w = IQ.head_key_weights(cat, run, head["stream"], head["layer"], head["head"], first, last, value=value)
    w = w.merge(query.rename(columns={"token_idx": "query_idx"}), on=["example_id", "query_idx"])
    return (w.groupby(["example_id", "key_idx"], as_index=False).weight.sum()
            .rename(columns={"key_idx": "token_idx", "weight": "score"}))


def _put(out: dict, scores: pd.DataFrame, method: str) -> None:
    if not len(scores):
        return
    s = scores.sort_values(["example_id", "score", "token_idx"], ascending=[True, False, True])
    for eid, g in s.groupby("example_id", sort=False):
        if int(eid) in out:
            out[int(eid)][method] = g.token_idx.astype(np.int64).tolist()
