"""Hidden states and their maps: vectors, norms, t-SNE coordinates, text-image cosine."""

from __future__ import annotations

import pandas as pd

from lake.queries.filters import ExampleFilter, _example_where


def hidden_layers(cat, run: str, stream: str | None = None) -> pd.DataFrame:
    """stream, layer, n (tokens) of every hidden-state layer stored for a run (0 = embedding output)."""
    sql = "SELECT stream, layer, count(*) AS n FROM hidden_states WHERE run = $run"
    params: dict = {"run": run}
    if stream is not None:
        sql += " AND stream = $stream"
        params["stream"] = stream
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
        "SELECT DISTINCT example_id FROM hidden_states WHERE run = $run AND stream = $stream AND layer = $layer "
        "AND vec IS NOT NULL ORDER BY example_id",
        {"run": run, "stream": str(first.stream), "layer": int(first.layer)},
    )


def hidden_token_keys(cat, run: str, stream: str, n_layers: int) -> pd.DataFrame:
    """example_id, token_idx, modality, role of the tokens with a hidden *vector* (``vec`` not
    null) at all ``n_layers`` stored layers of a stream, by (example_id, token_idx)."""
    return cat.df(
        "WITH k AS (SELECT example_id, token_idx FROM hidden_states WHERE run = $run AND stream = $stream "
        "AND vec IS NOT NULL GROUP BY example_id, token_idx HAVING count(*) = $n_layers) "
        "SELECT k.example_id, k.token_idx, t.modality, t.role FROM k LEFT JOIN tokens t "
        "ON t.run = $run AND t.example_id = k.example_id AND t.token_idx = k.token_idx "
        "ORDER BY k.example_id, k.token_idx",
        {"run": run, "stream": stream, "n_layers": int(n_layers)},
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
    base = "FROM hidden_states h WHERE h.run = $run AND h.stream = $stream AND h.layer = $layer AND h.vec IS NOT NULL"
    params: dict = {"run": run, "stream": stream, "layer": int(layer)}
    if pairs is not None:
        ex, tok = [int(i) for i in pairs[0]], [int(i) for i in pairs[1]]
        if len(ex) != len(tok):
            raise ValueError("hidden_vectors: pairs must be two lists of equal length")
        lo, hi = (min(ex), max(ex)) if ex else (0, -1)
        return cat.df(
            "WITH p AS (SELECT unnest($ex::BIGINT[]) AS example_id, unnest($tok::INTEGER[]) AS token_idx) "
            "SELECT h.example_id, h.token_idx, h.norm, h.vec FROM hidden_states h "
            "JOIN p ON p.example_id = h.example_id AND p.token_idx = h.token_idx "
            "WHERE h.run = $run AND h.stream = $stream AND h.layer = $layer AND h.example_id BETWEEN $lo AND $hi "
            "AND h.vec IS NOT NULL ORDER BY h.example_id, h.token_idx",
            {**params, "ex": ex, "tok": tok, "lo": lo, "hi": hi},
        )
    if example_ids is not None:
        base += " AND list_contains($example_ids, h.example_id)"
        params["example_ids"] = [int(i) for i in example_ids]
    return cat.df(f"SELECT h.example_id, h.token_idx, h.norm, h.vec {base} ORDER BY h.example_id, h.token_idx",
                  params)


def hidden_norm_examples(cat, run: str, stream: str, layer: int, example_ids: list[int]) -> pd.DataFrame:
    """example_id of the given examples that have hidden states (a norm, with or without a vector) at
    ``(stream, layer)``, by example_id."""
    return cat.df(
        "SELECT DISTINCT example_id FROM hidden_states WHERE run = $run AND stream = $stream AND layer = $layer "
        "AND list_contains($example_ids, example_id) ORDER BY example_id",
        {"run": run, "stream": stream, "layer": int(layer), "example_ids": [int(i) for i in example_ids]},
    )


def example_hidden(cat, run: str, stream: str, example_id: int) -> pd.DataFrame:
    """layer, token_idx, modality, role, norm, vec of every hidden state of one example, by layer, token_idx
    (``vec`` is null where only the norm is stored: see :func:`hidden_vector_examples`)."""
    return cat.df(
        "SELECT h.layer, h.token_idx, t.modality, t.role, h.norm, h.vec FROM hidden_states h "
        "LEFT JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
        "WHERE h.run = $run AND h.stream = $stream AND h.example_id = $example_id ORDER BY h.layer, h.token_idx",
        {"run": run, "stream": stream, "example_id": int(example_id)},
    )


def embedding_layers(cat, run: str, stream: str | None = None, method: str = "tsne") -> pd.DataFrame:
    """stream, layer, n (tokens) of the maps stored for a run."""
    sql = "SELECT stream, layer, count(*) AS n FROM embeddings WHERE run = $run AND method = $method"
    params: dict = {"run": run, "method": method}
    if stream is not None:
        sql += " AND stream = $stream"
        params["stream"] = stream
    return cat.df(sql + " GROUP BY stream, layer ORDER BY stream, layer", params)


def embedding_map(cat, run: str, stream: str, layer: int, method: str = "tsne") -> pd.DataFrame:
    """One map: example_id, token_idx, x, y with the token's modality, role, token, text_pos, patch_row,
    patch_col, tile, x0..y1 and its example's text, answer, prediction, correct, image_id, image_width,
    image_height, by (example_id, token_idx)."""
    return cat.df(
        "SELECT m.example_id, m.token_idx, m.x, m.y, t.modality, t.role, t.token, t.text_pos, t.patch_row, "
        "t.patch_col, t.tile, t.x0, t.y0, t.x1, t.y1, e.text, e.answer, e.prediction, e.correct, e.image_id, "
        "e.image_width, e.image_height FROM embeddings m "
        "LEFT JOIN tokens t ON t.run = m.run AND t.example_id = m.example_id AND t.token_idx = m.token_idx "
        "LEFT JOIN examples e ON e.run = m.run AND e.example_id = m.example_id "
        "WHERE m.run = $run AND m.stream = $stream AND m.layer = $layer AND m.method = $method "
        "ORDER BY m.example_id, m.token_idx",
        {"run": run, "stream": stream, "layer": int(layer), "method": method},
    )


def embedding_tokens(cat, run: str, stream: str, layer: int, example_ids: list[int],
                     method: str = "tsne") -> pd.DataFrame:
    """example_id, token_idx, x, y of the given examples' tokens that are on a map."""
    return cat.df(
        "SELECT example_id, token_idx, x, y FROM embeddings WHERE run = $run AND stream = $stream AND layer = $layer "
        "AND method = $method AND list_contains($example_ids, example_id) ORDER BY example_id, token_idx",
        {"run": run, "stream": stream, "layer": int(layer), "method": method,
         "example_ids": [int(i) for i in example_ids]},
    )


def embedding_path(cat, run: str, stream: str, example_id: int, token_idx: int,
                   method: str = "tsne") -> pd.DataFrame:
    """layer, x, y of one token on the maps of every layer (empty when it is not in the sample)."""
    return cat.df(
        "SELECT layer, x, y FROM embeddings WHERE run = $run AND stream = $stream AND example_id = $example_id "
        "AND token_idx = $token_idx AND method = $method ORDER BY layer",
        {"run": run, "stream": stream, "example_id": int(example_id), "token_idx": int(token_idx), "method": method},
    )


def map_vectors(cat, run: str, stream: str, layer: int, method: str = "tsne") -> pd.DataFrame:
    """The sample of a map with its hidden vectors: example_id, token_idx, x, y, modality, role, token,
    patch_row, patch_col, tile, vec, by (example_id, token_idx) (the map's row order)."""
    return cat.df(
        "SELECT m.example_id, m.token_idx, m.x, m.y, t.modality, t.role, t.token, t.patch_row, t.patch_col, "
        "t.tile, h.vec FROM embeddings m "
        "JOIN hidden_states h ON h.run = m.run AND h.stream = m.stream AND h.layer = m.layer "
        "AND h.example_id = m.example_id AND h.token_idx = m.token_idx "
        "LEFT JOIN tokens t ON t.run = m.run AND t.example_id = m.example_id AND t.token_idx = m.token_idx "
        "WHERE m.run = $run AND m.stream = $stream AND m.layer = $layer AND m.method = $method "
        "AND h.run = $run AND h.stream = $stream AND h.layer = $layer AND h.vec IS NOT NULL "
        "ORDER BY m.example_id, m.token_idx",
        {"run": run, "stream": stream, "layer": int(layer), "method": method},
    )


def hidden_norms(cat, run: str, stream: str, example_id: int | None = None,
                 flt: ExampleFilter | None = None, max_examples: int | None = None) -> pd.DataFrame:
    """layer, modality, norm, n, n_examples: the mean L2 norm of the hidden states of each modality
    per layer, over one example's tokens, or over the tokens of the examples passing ``flt`` (at most
    ``max_examples`` of them, a fixed pseudo-random choice: ``ORDER BY hash(example_id)``)."""
    sql = ("SELECT h.layer, t.modality, avg(h.norm) AS norm, count(*) AS n, "
           "count(DISTINCT h.example_id) AS n_examples FROM hidden_states h "
           "JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
           "WHERE h.run = $run AND h.stream = $stream")
    params: dict = {"run": run, "stream": stream}
    if example_id is not None:
        sql += " AND h.example_id = $example_id"
        params["example_id"] = int(example_id)
    elif max_examples is not None or (flt is not None and not flt.is_empty()):
        where, p = _example_where(run, flt)
        sql += f" AND h.example_id IN (SELECT example_id FROM examples WHERE {where}"
        params.update(p)
        if max_examples is not None:
            sql += " ORDER BY hash(example_id), example_id LIMIT $max_examples"
            params["max_examples"] = int(max_examples)
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
        ex_sql, params = "SELECT $example_id::BIGINT AS example_id", {"example_id": int(example_id)}
    else:
        where, params = _example_where(run, flt)
        with_vec = [int(i) for i in hidden_vector_examples(cat, run, stream).example_id]
        ex_sql = (f"SELECT example_id FROM examples WHERE {where} AND list_contains($with_vec, example_id) "
                  "ORDER BY hash(example_id), example_id LIMIT $max_examples")
        params = {**params, "with_vec": with_vec, "max_examples": int(max_examples)}
    return cat.df(
        f"WITH ex AS ({ex_sql}), "
        "h AS (SELECT h.example_id, h.layer, t.modality, h.vec FROM hidden_states h "
        "JOIN tokens t ON t.run = h.run AND t.example_id = h.example_id AND t.token_idx = h.token_idx "
        "WHERE h.run = $run AND h.stream = $stream AND h.vec IS NOT NULL "
        "AND h.example_id IN (SELECT example_id FROM ex)), "
        "p AS (SELECT a.example_id, a.layer, avg(list_cosine_similarity(a.vec, b.vec)) AS cosine "
        "FROM h a JOIN h b ON a.example_id = b.example_id AND a.layer = b.layer "
        "WHERE a.modality = 'text' AND b.modality = 'image' GROUP BY a.example_id, a.layer) "
        "SELECT layer, avg(cosine) AS cosine, count(*) AS n_examples FROM p GROUP BY layer ORDER BY layer",
        {**params, "run": run, "stream": stream},
    )
