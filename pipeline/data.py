"""Manifest readers, image loading and validation: the input edge of the pipeline.

A manifest is JSONL, CSV or Parquet with one example a row: ``id``, ``image``
(a path relative to the manifest's folder, or absolute), ``text``, optional
``answer``, ``split`` and ``boxes`` (``[{"label": word, "box": [x0, y0, x1, y1]}]``;
a JSON string in CSV, a JSON string or a list of structs in Parquet); every
other column goes into ``meta``.

Two kinds of failure are kept apart. A manifest that cannot be used at all
(unreadable, empty, missing a required column) raises :class:`ManifestError`
before any work starts. A single bad row or image is not an exception for the
run: :func:`read_manifest` returns it as an error ``(source_id, stage, message)``
and :func:`load_image` raises :class:`BadInput`, which the caller records in the
``errors`` table before going on with the next example.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

REQUIRED = ("id", "image", "text")
KNOWN = REQUIRED + ("answer", "split", "boxes")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_ASPECT = 20.0  # longer side / shorter side
MIN_SIDE = 2  # pixels
MAX_PIXELS = 100_000_000
_ROW_PROBLEM = "\0problem"  # a reader's note on a row it could split but not trust


class ManifestError(Exception):
    """The whole manifest is unusable (unreadable, empty, missing a required column)."""


class BadInput(Exception):
    """One example is unusable; ``stage`` says where it failed, ``message`` why."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.message = message


@dataclass(frozen=True)
class Row:
    """One accepted manifest row. ``example_id`` is its 0-based position in the
    manifest, counting rejected rows too, so ids do not shift when rows are skipped."""

    example_id: int
    source_id: str
    image_path: Path
    text: str
    answer: str | None
    split: str | None
    boxes: list[dict] | None
    meta: dict


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image in RGB, as displayed (EXIF orientation applied).

    ``image_id`` is the sha256 hex of the file's bytes; ``mode`` the file's original mode."""

    image: Image.Image
    image_id: str
    width: int
    height: int
    mode: str


# ---------------------------------------------------------------- manifests


def read_manifest(path) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """Read and validate a manifest.

    Parameters
    ----------
    path : a ``.jsonl``/``.ndjson``/``.json`` (JSON lines, or one JSON array),
        ``.csv`` or ``.parquet`` file.

    Returns
    -------
    rows : accepted rows in manifest order.
    errors : ``(source_id, "manifest", message)`` for each rejected row (missing
        id or image, empty text, duplicate id, malformed boxes). A row without an
        id is reported as ``source_id = "<row N>"``.

    Raises
    ------
    ManifestError : the file is missing, of an unknown type, unreadable, empty,
        or lacks one of the columns ``id``, ``image``, ``text``.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(f"manifest {path} has an unsupported extension {path.suffix!r}; "
                            f"use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    columns, records = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    if not columns and not records:
        raise ManifestError(f"manifest {path} is empty: it has no header and no rows")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        hint = [f"{c!r} for {m!r}" for m in missing for c in columns if c.strip().lower() == m]
        raise ManifestError(
            f"manifest {path} has no {what} {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(columns) or 'nothing'}); every manifest needs id, image and text"
            + (f"; rename {', '.join(hint)}" if hint else ""))
    if not records:
        raise ManifestError(f"manifest {path} has no rows")
    extra = [c for c in columns if c not in KNOWN]
    base = path.resolve().parent
    rows, errors, seen = [], [], {}
    for i, rec in enumerate(records):
        sid = _as_id(rec.get("id"))
        problems = [f"row {i} {rec[_ROW_PROBLEM]}"] if _ROW_PROBLEM in rec else []
        if sid is None:
            problems.append(f"row {i} has no id")
        elif sid in seen:
            problems.append(f"duplicate id {sid!r} (first seen at row {seen[sid]})")
        else:
            seen[sid] = i
        image = _plain(rec.get("image"))
        if not isinstance(image, str) or not image.strip():
            problems.append(f"row {i} has no image path" if image is None or isinstance(image, str) else
                            f"row {i}: image must be a path string, got {image!r}")
        text = _plain(rec.get("text"))
        if isinstance(text, (int, float)) and not isinstance(text, bool) and not _is_nan(text):
            text = str(text)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"row {i} has empty text")
        try:
            boxes = _parse_boxes(rec.get("boxes"))
        except ValueError as e:
            problems.append(f"row {i}: malformed boxes: {e}")
        if problems:
            errors.append((sid if sid is not None else f"<row {i}>", "manifest", "; ".join(problems)))
            continue
        rows.append(Row(example_id=i, source_id=sid, image_path=base / image.strip(), text=text,
                        answer=_as_opt_str(rec.get("answer")), split=_as_opt_str(rec.get("split")),
                        boxes=boxes, meta={c: _jsonable(rec.get(c)) for c in extra}))
    return rows, errors


def _read_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path} is not valid JSON (line {e.lineno}): {e.msg}") from e
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ManifestError(f"manifest {path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from e
    columns: dict[str, None] = {}
    for n, rec in numbered:
        if not isinstance(rec, dict):
            raise ManifestError(f"manifest {path}: line {n} is a JSON {type(rec).__name__}, expected an object")
        columns.update(dict.fromkeys(rec))
    return list(columns), [rec for _, rec in numbered]


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        if len(set(columns)) != len(columns):
            dup = sorted({c for c in columns if columns.count(c) > 1})
            raise ManifestError(f"manifest {path} repeats the column(s) {', '.join(dup)} in its header")
        reader.fieldnames = columns
        records = []
        for raw in reader:
            # An empty cell means "no value": CSV cannot tell "" from missing.
            rec = {k: (v if v != "" else None) for k, v in raw.items() if k is not None}
            if None in raw:
                rec[_ROW_PROBLEM] = f"has {len(columns) + len(raw[None])} fields but the header has {len(columns)}"
            records.append(rec)
    except csv.Error as e:
        raise ManifestError(f"manifest {path}: CSV error at line {reader.line_num}: {e}") from e
    return columns, records


def _read_parquet(path: Path) -> tuple[list[str], list[dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ManifestError(f"manifest {path} is not a readable Parquet file: {e}") from e
    # pandas may store its index as a column; it is not manifest data.
    keep = [c for c in table.column_names if not c.startswith("__index_level_")]
    return keep, table.select(keep).to_pylist()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path} as UTF-8 text: {e}") from e


def _parse_boxes(value) -> list[dict] | None:
    """Normalise boxes to ``[{"label": str, "box": [x0, y0, x1, y1] floats}]``; raise ValueError."""
    value = _plain(value)
    if value is None or (isinstance(value, str) and not value.strip()) or _is_nan(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of {{label, box}} objects, got {type(value).__name__}")
    out = []
    for j, item in enumerate(value):
        if not isinstance(item, dict) or "label" not in item or "box" not in item:
            raise ValueError(f"item {j} is not an object with 'label' and 'box'")
        label, box = _plain(item["label"]), _plain(item["box"])
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"item {j} has an empty or non-string label")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"item {j} ({label!r}): box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"item {j} ({label!r}): box {box!r} needs x0 < x1 and y0 < y1")
        out.append({"label": label, "box": [x0, y0, x1, y1]})
    return out


def _plain(v: Any) -> Any:
    """numpy / pyarrow scalars and arrays -> plain Python."""
    if hasattr(v, "as_py"):
        return v.as_py()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    return v


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _as_id(v: Any) -> str | None:
    v = _plain(v)
    if v is None or _is_nan(v):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 7.0 from a float column is the id "7"
    s = str(v).strip()
    return s or None


def _as_opt_str(v: Any) -> str | None:
    v = _plain(v)
    if v is None or _is_nan(v) or (isinstance(v, str) and not v.strip()):
        return None
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _jsonable(v: Any) -> Any:
    """A value json.dumps accepts: plain scalars, lists, dicts with str keys; NaN -> None."""
    v = _plain(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return None if not math.isfinite(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


# ---------------------------------------------------------------- images


def load_image(path) -> LoadedImage:
    """Read, fully decode and validate one image, returned as RGB as displayed.

    Non-RGB modes are converted: alpha (RGBA, LA, P/L/RGB with transparency) is
    composited over white; 16-bit greyscale (``I;16*``, and ``I`` whose values fit
    in 0..65535) is divided by 257; other ``I`` and ``F`` images are scaled by
    their own min/max. EXIF orientation is applied, so ``width``/``height`` are
    those of the displayed image.

    Raises
    ------
    BadInput : with ``stage="image"`` when the file is missing, empty, not an
        image, truncated, smaller than 2 px on a side, more than 20:1 in aspect
        ratio or larger than 100 megapixels.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput("image", f"image file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput("image", f"cannot read image file {path}: {e}") from e
    if not data:
        raise BadInput("image", f"image file is empty (0 bytes): {path}")
    huge = f"image {path} is larger than the limit of {MAX_PIXELS // 1_000_000} megapixels"
    truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut file must fail, not come back half grey
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires below our limit; we check the size ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size  # [width, height] from the header, before decoding
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise BadInput("image", f"image {path} is {w}x{h}, an aspect ratio above the limit of {MAX_ASPECT:g}:1")
            if min(w, h) < MIN_SIDE:
                raise BadInput("image", f"image {path} is {w}x{h}; both sides must be at least {MIN_SIDE} px")
            if w * h > MAX_PIXELS:
                raise BadInput("image", f"{huge} ({w}x{h})")
            im.load()
    except Image.DecompressionBombError as e:
        raise BadInput("image", f"{huge} ({e})") from e
    except UnidentifiedImageError as e:
        raise BadInput("image", f"file is not an image or its format is not supported: {path}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput("image", f"image {path} is truncated or corrupt and cannot be decoded: {e}") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_flag
    mode = im.mode
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject a good image
        pass
    try:
        rgb = _to_rgb(im)
    except (ValueError, OSError) as e:
        raise BadInput("image", f"image {path} has mode {mode}, which cannot be converted to RGB: {e}") from e
    return LoadedImage(image=rgb, image_id=hashlib.sha256(data).hexdigest(),
                       width=rgb.width, height=rgb.height, mode=mode)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)  # [height, width]
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
            a = a / 257.0  # 65535 -> 255: the full 16-bit range onto 8 bits
        else:
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def thumbnail_png(img: Image.Image, longest: int = 512) -> bytes:
    """PNG bytes of ``img`` shrunk (never enlarged) so its longest side is at most ``longest``."""
    if longest < 1:
        raise ValueError(f"longest must be a positive number of pixels, got {longest}")
    thumb = img.copy()
    thumb.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return buf.getvalue()
