"""Examples, their token tables and images; summaries of examples by metadata."""

from __future__ import annotations

import pandas as pd

from lake.queries.filters import ExampleFilter, _example_where, _json_pointer


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
        sql += " LIMIT $limit OFFSET $offset"
        params.update(limit=int(limit), offset=int(offset))
    return cat.df(sql, params)


def example(cat, run: str, example_id: int) -> pd.DataFrame:
    """One example's row, with ``has_image`` telling whether its image is in the lake."""
    return cat.df(
        f"SELECT {', '.join('e.' + c.strip() for c in EXAMPLE_COLUMNS.split(','))}, "
        "EXISTS (SELECT 1 FROM images i WHERE i.image_id = e.image_id) AS has_image "
        "FROM examples e WHERE e.run = $run AND e.example_id = $example_id",
        {"run": run, "example_id": int(example_id)},
    )


_DISTINCT = {  # column -> constant SQL; the column name is never taken from input
    "answer": "SELECT answer AS value, count(*) AS n FROM examples WHERE run = $run AND answer IS NOT NULL "
              "GROUP BY 1 ORDER BY n DESC, value LIMIT $limit",
    "prediction": "SELECT prediction AS value, count(*) AS n FROM examples WHERE run = $run "
                  "AND prediction IS NOT NULL GROUP BY 1 ORDER BY n DESC, value LIMIT $limit",
    "split": "SELECT split AS value, count(*) AS n FROM examples WHERE run = $run AND split IS NOT NULL "
             "GROUP BY 1 ORDER BY n DESC, value LIMIT $limit",
}


def distinct_values(cat, run: str, column: str, limit: int = 500) -> pd.DataFrame:
    """value, n of ``answer``, ``prediction`` or ``split`` in a run, most frequent first."""
    if column not in _DISTINCT:
        raise ValueError(f"distinct_values: column must be one of {', '.join(_DISTINCT)}, not {column!r}")
    return cat.df(_DISTINCT[column], {"run": run, "limit": int(limit)})


def meta_keys(cat, run: str) -> pd.DataFrame:
    """key: every top-level key of the examples' ``meta`` JSON in a run."""
    return cat.df(
        "SELECT DISTINCT unnest(json_keys(meta)) AS key FROM examples "
        "WHERE run = $run AND meta IS NOT NULL AND json_valid(meta) ORDER BY key",
        {"run": run},
    )


def meta_values(cat, run: str, key: str, limit: int = 500) -> pd.DataFrame:
    """value, n of ``meta[key]`` (as strings) in a run, most frequent first."""
    return cat.df(
        "SELECT json_extract_string(meta, $key) AS value, count(*) AS n FROM examples "
        "WHERE run = $run AND meta IS NOT NULL AND json_valid(meta) "
        "AND json_extract_string(meta, $key) IS NOT NULL GROUP BY 1 ORDER BY n DESC, value LIMIT $limit",
        {"key": _json_pointer(key), "run": run, "limit": int(limit)},
    )


def example_tokens(cat, run: str, example_id: int, stream: str | None = None) -> pd.DataFrame:
    """The example's token table (all streams, or one), by token_idx; ``tile`` is null for text, 0 for the
    base image, 1.. for crops or tiles (a lake written before tiles reads as 0 for every image token)."""
    sql = ("SELECT token_idx, stream, modality, role, token, seq_pos, text_pos, patch_row, patch_col, "
           "x0, y0, x1, y1, tile FROM tokens WHERE run = $run AND example_id = $example_id")
    params: dict = {"run": run, "example_id": int(example_id)}
    if stream is not None:
        sql += " AND stream = $stream"
        params["stream"] = stream
    return cat.df(sql + " ORDER BY token_idx", params)


def image_png(cat, image_id: str) -> pd.DataFrame:
    """image_id, png (bytes), width, height of one image (empty when it is not in the lake)."""
    return cat.df("SELECT image_id, png, width, height FROM images WHERE image_id = $image_id LIMIT 1",
                  {"image_id": image_id})


def images_png(cat, image_ids: list[str]) -> pd.DataFrame:
    """image_id, png of several images at once (those that are in the lake)."""
    return cat.df(
        "SELECT DISTINCT ON (image_id) image_id, png FROM images WHERE list_contains($image_ids, image_id)",
        {"image_ids": list(image_ids)},
    )


def accuracy_by(cat, run: str, meta_key: str) -> pd.DataFrame:
    """group (the value of ``meta[meta_key]``), n, accuracy over examples with a known ``correct``."""
    return cat.df(
        "SELECT json_extract_string(meta, $key) AS \"group\", count(*) AS n, avg(correct::INT) AS accuracy "
        "FROM examples WHERE run = $run AND correct IS NOT NULL GROUP BY 1 ORDER BY 1",
        {"key": _json_pointer(meta_key), "run": run},
    )


def examples_by_id(cat, run: str, ids: list[int]) -> pd.DataFrame:
    """example_id, text, answer, prediction, correct, split of the given examples of a run."""
    return cat.df(
        "SELECT example_id, text, answer, prediction, correct, split FROM examples "
        "WHERE run = $run AND list_contains($ids, example_id) ORDER BY example_id",
        {"run": run, "ids": [int(i) for i in ids]},
    )
