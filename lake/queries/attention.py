"""One example's attention (or an explanation method's weights) at one head or over heads."""

from __future__ import annotations

import pandas as pd

from lake.queries.runs import run_capture, run_streams


def n_heads(cat, run: str, stream: str) -> int:
    """Heads of a stream: from ``runs.streams``, else the largest head index stored + 1."""
    s = run_streams(cat, run)
    s = s[s.stream == stream]
    if len(s):
        return int(s.heads.iloc[0])
    d = cat.df("SELECT max(head) + 1 AS h FROM attention WHERE run = $run AND stream = $stream",
               {"run": run, "stream": stream})
    return int(d.h.iloc[0]) if len(d) and pd.notna(d.h.iloc[0]) else 0


def _attention_sources(cat, run: str, example_id: int, stream: str, layer: int) -> list[tuple[str, dict]]:
    """Where one example's attention at ``(stream, layer)`` can be read, fastest first: ``(FROM …
    WHERE … text, its named params)``; ``$example_id`` is always among them.

    First the chunk file that holds the example, when the run records its chunk size (the
    pipeline does): DuckDB then opens one file instead of reading the footer of every chunk's
    file, which is what the view costs (about 0.4 s at 157 chunks of ViLT-B, each with ~100 row
    groups; see bench/bench_queries.py). Then the view, which is always right.
    """
    view = ("FROM attention WHERE run = $run AND stream = $stream AND layer = $layer AND example_id = $example_id",
            {"run": run, "stream": stream, "layer": int(layer), "example_id": int(example_id)})
    chunk = run_capture(cat, run).get("chunk_size")
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0 and hasattr(cat, "chunk_file")):
        return [view]
    path = cat.chunk_file("attention", {"run": run, "stream": stream, "layer": int(layer)}, int(example_id) // chunk)
    if path is None:
        return [view]
    return [("FROM read_parquet($path) WHERE example_id = $example_id", {"path": path, "example_id": int(example_id)}),
            view]


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
            d = cat.df(f"SELECT query_idx, key_idx, CAST(weight AS DOUBLE) AS weight {src} AND head = $head "
                       "ORDER BY query_idx, key_idx", {**params, "head": int(head)})
        else:
            d = cat.df(f"SELECT query_idx, key_idx, sum(CAST(weight AS DOUBLE)) / $heads AS weight {src} "
                       "GROUP BY query_idx, key_idx ORDER BY query_idx, key_idx", {**params, "heads": float(heads)})
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
        hsel = "" if head is None else "AND head = $head"
        d = pd.DataFrame({"query_idx": [], "key_idx": [], "weight": []})
        for src, params in _attention_sources(cat, run, example_id, stream, layer):  # the chunk file first
            d = cat.df(f"""
                WITH a AS (SELECT head, query_idx, key_idx, CAST(weight AS DOUBLE) AS weight {src} {hsel}),
                w AS (SELECT a.head, a.query_idx, a.key_idx, a.weight * v.norm AS c
                      FROM a JOIN value_norms v ON v.head = a.head AND v.token_idx = a.key_idx
                      WHERE v.run = $run AND v.stream = $stream AND v.layer = $layer AND v.example_id = $example_id),
                s AS (SELECT query_idx, key_idx, c / nullif(sum(c) OVER (PARTITION BY head, query_idx), 0) AS share
                      FROM w)
                SELECT query_idx, key_idx, sum(coalesce(share, 0)) / $divisor AS weight FROM s
                GROUP BY query_idx, key_idx ORDER BY query_idx, key_idx""",
                       {**params, **({} if head is None else {"head": int(head)}), "run": run, "stream": stream,
                        "layer": int(layer), "example_id": int(example_id), "divisor": divisor})
            if len(d):
                break
        return d
    if method == "rollout":
        return cat.df("SELECT target AS query_idx, token_idx AS key_idx, CAST(value AS DOUBLE) AS weight "
                      "FROM relevancy WHERE run = $run AND method = 'rollout' AND stream = $stream "
                      "AND layer = $layer AND example_id = $example_id ORDER BY 1, 2",
                      {"run": run, "stream": stream, "layer": int(layer), "example_id": int(example_id)})
    if method == "relevancy":
        return cat.df("SELECT coalesce(target, -1) AS query_idx, token_idx AS key_idx, CAST(value AS DOUBLE) AS weight "
                      "FROM relevancy WHERE run = $run AND method = 'relevancy' AND stream = $stream "
                      "AND example_id = $example_id ORDER BY 1, 2",
                      {"run": run, "stream": stream, "example_id": int(example_id)})
    raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}")


def lens_words(cat, run: str, stream: str, example_id: int, token_idx: int) -> pd.DataFrame:
    """layer, rank, piece, vocab_id, prob: the logit lens of one token through the layers
    (``--explain lens``; empty without it)."""
    return cat.df("SELECT layer, rank, piece, vocab_id, CAST(prob AS DOUBLE) AS prob FROM lens WHERE run = $run "
                  "AND stream = $stream AND example_id = $example_id AND token_idx = $token_idx ORDER BY layer, rank",
                  {"run": run, "stream": stream, "example_id": int(example_id), "token_idx": int(token_idx)})


def attention_layers(cat, run: str, stream: str) -> pd.DataFrame:
    """layer: the layers of a stream that have attention stored."""
    return cat.df("SELECT DISTINCT layer FROM attention WHERE run = $run AND stream = $stream ORDER BY layer",
                  {"run": run, "stream": stream})
