"""Tests for pipeline.data: manifest readers, image loading and validation, thumbnails."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from pipeline import data
from pipeline.data import BadInput, LoadedImage, ManifestError, Row, load_image, read_manifest, thumbnail_png

BOXES = [{"label": "cat", "box": [1, 2, 30, 40]}, {"label": "mat", "box": [0.5, 0.5, 9.5, 8]}]
RECORDS = [
    {"id": "a", "image": "img/a.png", "text": "a cat on a mat", "answer": "yes", "split": "train",
     "boxes": BOXES, "source": "coco"},
    {"id": "b", "image": "img/b.png", "text": "a dog", "answer": None, "split": "val", "boxes": None,
     "source": "vg"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, records, columns=None) -> Path:
    columns = columns or list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            w.writerow(["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r.get(c), list) else r[c]
                        for c in columns])
    return path


def write_parquet(path: Path, records, boxes_as_json=False) -> Path:
    recs = [dict(r) for r in records]
    if boxes_as_json:
        for r in recs:
            r["boxes"] = None if r.get("boxes") is None else json.dumps(r["boxes"])
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def errors_by_id(errors):
    return {sid: msg for sid, stage, msg in errors}


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("writer", ["jsonl", "csv", "parquet", "parquet_json_boxes"])
def test_formats_give_the_same_rows(tmp_path, writer):
    path = {
        "jsonl": lambda: write_jsonl(tmp_path / "m.jsonl", RECORDS),
        "csv": lambda: write_csv(tmp_path / "m.csv", RECORDS),
        "parquet": lambda: write_parquet(tmp_path / "m.parquet", RECORDS),
        "parquet_json_boxes": lambda: write_parquet(tmp_path / "m.parquet", RECORDS, boxes_as_json=True),
    }[writer]()
    rows, errors = read_manifest(path)
    assert errors == []
    folder = tmp_path.resolve()
    assert rows == [
        Row(0, "a", folder / "img" / "a.png", "a cat on a mat", "yes", "train",
            [{"label": "cat", "box": [1.0, 2.0, 30.0, 40.0]}, {"label": "mat", "box": [0.5, 0.5, 9.5, 8.0]}],
            {"source": "coco"}),
        Row(1, "b", folder / "img" / "b.png", "a dog", None, "val", None, {"source": "vg"}),
    ]
    assert all(isinstance(v, float) for b in rows[0].boxes for v in b["box"])


def test_required_columns_only(tmp_path):
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "image": "x.png", "text": "t"}]))
    assert errors == []
    assert rows == [Row(0, "1", tmp_path.resolve() / "x.png", "t", None, None, None, {})]


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_missing_column_names_it_and_lists_found(tmp_path, ext):
    recs = [{"id": "a", "image": "a.png", "caption": "hello"}]
    path = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[ext](tmp_path / f"data.{ext}", recs)
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert "no column 'text'" in msg
    assert "(found: id, image, caption)" in msg
    assert "every manifest needs id, image and text" in msg


def test_missing_several_columns_and_case_hint(tmp_path):
    with pytest.raises(ManifestError, match=r"no columns 'id', 'text' \(found: image, Text\)") as e:
        read_manifest(write_csv(tmp_path / "m.csv", [{"image": "a.png", "Text": "x"}]))
    assert "rename 'Text' for 'text'" in str(e.value)


def test_bad_json_reports_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "image": "a.png", "text": "x"}\n\n{"id": "b", "image": "b.png", "text": \n')
    with pytest.raises(ManifestError, match=r"line 3 is not valid JSON"):
        read_manifest(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "image": "a.png", "text": "x"}\n[1, 2]\n')
    with pytest.raises(ManifestError, match=r"line 2 is a JSON list, expected an object"):
        read_manifest(path)


def test_json_array_file_is_accepted(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "a", "image": "a.png", "text": "x"}]))
    rows, _ = read_manifest(path)
    assert [r.source_id for r in rows] == ["a"]


def test_blank_jsonl_lines_do_not_count_as_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"id": "a", "image": "a.png", "text": "x"}\n   \n{"id": "b", "image": "b.png", "text": "y"}\n')
    rows, _ = read_manifest(path)
    assert [(r.example_id, r.source_id) for r in rows] == [(0, "a"), (1, "b")]


@pytest.mark.parametrize("name,content,match", [
    ("m.jsonl", "", "is empty"),
    ("m.jsonl", "\n\n", "is empty"),
    ("m.csv", "id,image,text\n", "has no rows"),
    ("m.csv", "", "is empty"),
    ("m.parquet", "not parquet at all", "not a readable Parquet file"),
    ("m.txt", "id,image,text\n", r"unsupported extension '\.txt'; use one of .*\.jsonl.*\.csv.*\.parquet"),
])
def test_unusable_manifests(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(path)


def test_empty_parquet_and_missing_file(tmp_path):
    empty = pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.string()),
                      "text": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="has no rows"):
        read_manifest(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,image,text\na,a.png,caf\xe9\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        read_manifest(path)


def test_duplicate_ids_keep_first(tmp_path):
    recs = [{"id": "x", "image": "1.png", "text": "one"}, {"id": "y", "image": "2.png", "text": "two"},
            {"id": "z", "image": "3.png", "text": "three"}, {"id": "x", "image": "4.png", "text": "four"}]
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", recs))
    assert [(r.example_id, r.source_id, r.text) for r in rows] == [(0, "x", "one"), (1, "y", "two"), (2, "z", "three")]
    assert errors == [("x", "manifest", "duplicate id 'x' (first seen at row 0)")]


def test_int_and_str_ids_collide_after_stringifying(tmp_path):
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", [
        {"id": 7, "image": "1.png", "text": "a"}, {"id": "7", "image": "2.png", "text": "b"}]))
    assert [r.source_id for r in rows] == ["7"]
    assert errors == [("7", "manifest", "duplicate id '7' (first seen at row 0)")]


def test_row_problems_are_errors_and_example_ids_are_stable(tmp_path):
    recs = [
        {"id": "ok0", "image": "0.png", "text": "fine"},
        {"id": "blank", "image": "1.png", "text": "   \t"},
        {"id": "empty", "image": "2.png", "text": ""},
        {"id": "none", "image": "3.png", "text": None},
        {"id": "", "image": "4.png", "text": "no id"},
        {"id": "noimg", "image": "", "text": "no image"},
        {"id": "ok6", "image": "6.png", "text": "fine too"},
        {"image": "7.png", "text": "id key absent"},
        {"id": "ok8", "image": "8.png", "text": 42},
    ]
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", recs))
    assert [(r.example_id, r.source_id, r.text) for r in rows] == [(0, "ok0", "fine"), (6, "ok6", "fine too"),
                                                                    (8, "ok8", "42")]
    assert all(stage == "manifest" for _, stage, _ in errors)
    errs = errors_by_id(errors)
    assert set(errs) == {"blank", "empty", "none", "<row 4>", "noimg", "<row 7>"}
    assert "empty text" in errs["blank"] and "empty text" in errs["empty"] and "empty text" in errs["none"]
    assert "row 4 has no id" in errs["<row 4>"]
    assert "no image" in errs["noimg"]


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,text\na,a.png,hello\nb,b.png,hi,surplus\n")
    rows, errors = read_manifest(path)
    assert [r.source_id for r in rows] == ["a"]
    assert errors == [("b", "manifest", "row 1 has 4 fields but the header has 3")]


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_boxes_parse_in_every_format(tmp_path, ext):
    recs = [{"id": "a", "image": "a.png", "text": "x", "boxes": BOXES},
            {"id": "b", "image": "b.png", "text": "y", "boxes": []}]
    path = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[ext](tmp_path / f"m.{ext}", recs)
    rows, errors = read_manifest(path)
    assert errors == []
    assert rows[0].boxes == [{"label": "cat", "box": [1.0, 2.0, 30.0, 40.0]},
                             {"label": "mat", "box": [0.5, 0.5, 9.5, 8.0]}]
    assert rows[1].boxes == []


BAD_BOXES = [
    ({"label": "cat", "box": [1, 2, 3, 4]}, "expected a list"),
    ([{"label": "cat"}], "item 0 is not an object with 'label' and 'box'"),
    ([["cat", [1, 2, 3, 4]]], "item 0 is not an object"),
    ([{"label": "", "box": [1, 2, 3, 4]}], "empty or non-string label"),
    ([{"label": 5, "box": [1, 2, 3, 4]}], "empty or non-string label"),
    ([{"label": "cat", "box": [1, 2, 3]}], "box must be 4 finite numbers"),
    ([{"label": "cat", "box": [1, 2, "3", 4]}], "box must be 4 finite numbers"),
    ([{"label": "cat", "box": [1, 2, True, 4]}], "box must be 4 finite numbers"),
    ([{"label": "cat", "box": "1 2 3 4"}], "box must be 4 finite numbers"),
    ([{"label": "ok", "box": [0, 0, 1, 1]}, {"label": "cat", "box": [5, 2, 5, 4]}], "item 1 ('cat'): box"),
    ([{"label": "cat", "box": [1, 9, 3, 4]}], "needs x0 < x1 and y0 < y1"),
    ("[{\"label\": \"cat\", \"box\": [1, 2, 3, 4]", "not valid JSON"),
]


@pytest.mark.parametrize("boxes,match", BAD_BOXES)
def test_malformed_boxes_reject_the_row(tmp_path, boxes, match):
    recs = [{"id": "bad", "image": "a.png", "text": "x", "boxes": boxes},
            {"id": "good", "image": "b.png", "text": "y"}]
    rows, errors = read_manifest(write_jsonl(tmp_path / "m.jsonl", recs))
    assert [r.source_id for r in rows] == ["good"]
    assert len(errors) == 1 and errors[0][:2] == ("bad", "manifest")
    assert "malformed boxes" in errors[0][2] and match in errors[0][2]


def test_malformed_boxes_in_csv_and_nan_box_in_parquet(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,image,text,boxes\na,a.png,x,"[{""label"": ""c"", ""box"": [3, 0, 1, 1]}]"\nb,b.png,y,oops\n')
    rows, errors = read_manifest(path)
    assert rows == [] and [e[0] for e in errors] == ["a", "b"]
    t = pa.table({"id": ["a"], "image": ["a.png"], "text": ["x"],
                  "boxes": [[{"label": "c", "box": [0.0, float("nan"), 1.0, 1.0]}]]})
    pq.write_table(t, tmp_path / "m.parquet")
    rows, errors = read_manifest(tmp_path / "m.parquet")
    assert rows == [] and "finite" in errors[0][2]


def test_meta_collects_extra_columns_as_plain_json(tmp_path):
    t = pa.table({
        "id": pa.array([1, 2], pa.int64()), "image": ["a.png", "b.png"], "text": ["x", "y"],
        "answer": pa.array([3, None], pa.int32()),
        "count": pa.array([5, None], pa.int64()), "score": pa.array([0.25, float("nan")], pa.float32()),
        "when": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5), None], pa.timestamp("s")),
        "tags": [["a", "b"], []], "flag": [True, False],
    })
    pq.write_table(t, tmp_path / "m.parquet")
    rows, errors = read_manifest(tmp_path / "m.parquet")
    assert errors == []
    assert [r.source_id for r in rows] == ["1", "2"]
    assert [r.answer for r in rows] == ["3", None]
    assert rows[0].meta == {"count": 5, "score": 0.25, "when": "2024-01-02T03:04:05", "tags": ["a", "b"],
                            "flag": True}
    assert rows[1].meta == {"count": None, "score": None, "when": None, "tags": [], "flag": False}
    assert type(rows[0].meta["count"]) is int and type(rows[0].meta["flag"]) is bool
    json.dumps([r.meta for r in rows], allow_nan=False)


def test_meta_in_jsonl_has_every_extra_column(tmp_path):
    rows, _ = read_manifest(write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "image": "a.png", "text": "x", "lang": "en", "extra": {"k": [1, 2]}},
        {"id": "b", "image": "b.png", "text": "y", "lang": "fr"}]))
    assert rows[0].meta == {"lang": "en", "extra": {"k": [1, 2]}}
    assert rows[1].meta == {"lang": "fr", "extra": None}


def test_pandas_index_column_is_not_meta(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"id": ["a", "b"], "image": ["a.png", "b.png"], "text": ["x", "y"]}, index=[10, 20])
    df.to_parquet(tmp_path / "m.parquet")
    rows, _ = read_manifest(tmp_path / "m.parquet")
    assert [r.meta for r in rows] == [{}, {}]


def test_image_paths_are_relative_to_the_manifest_folder(tmp_path, monkeypatch):
    sub = tmp_path / "dataset"
    (sub / "img").mkdir(parents=True)
    absolute = tmp_path / "elsewhere" / "z.png"
    write_jsonl(sub / "m.jsonl", [{"id": "a", "image": "img/a.png", "text": "x"},
                                  {"id": "b", "image": str(absolute), "text": "y"}])
    monkeypatch.chdir(tmp_path)
    rows, _ = read_manifest(Path("dataset") / "m.jsonl")
    assert rows[0].image_path == (sub / "img" / "a.png").resolve()
    assert rows[0].image_path.is_absolute()
    assert rows[1].image_path == absolute


def test_image_path_resolves_to_a_loadable_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 6), "red").save(tmp_path / "img" / "a.png")
    rows, _ = read_manifest(write_csv(tmp_path / "m.csv", [{"id": "a", "image": "img/a.png", "text": "x"}]))
    assert load_image(rows[0].image_path).width == 8


# ---------------------------------------------------------------- images


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def noise(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bad(path) -> str:
    with pytest.raises(BadInput) as e:
        load_image(path)
    assert e.value.stage == "image"
    assert str(e.value) == e.value.message
    return e.value.message


def test_rgb_png_and_sha256(tmp_path):
    path = save(noise(30, 20), tmp_path / "a.png")
    out = load_image(path)
    assert isinstance(out, LoadedImage)
    assert out.image_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out.width, out.height, out.mode, out.image.mode) == (30, 20, "RGB", "RGB")
    assert np.array_equal(np.asarray(out.image), np.asarray(noise(30, 20)))


def test_missing_empty_and_not_an_image(tmp_path):
    assert bad(tmp_path / "nope.png") == f"image file not found: {tmp_path / 'nope.png'}"
    (tmp_path / "zero.png").write_bytes(b"")
    assert "empty (0 bytes)" in bad(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("this is not a picture")
    assert "not an image" in bad(tmp_path / "text.png")
    (tmp_path / "dir.png").mkdir()
    assert "not found" in bad(tmp_path / "dir.png")


@pytest.mark.parametrize("global_flag", [False, True])
def test_truncated_jpeg_is_rejected(tmp_path, global_flag, monkeypatch):
    whole = save(noise(64, 64), tmp_path / "whole.jpg", quality=95).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", global_flag)
    assert "truncated" in bad(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is global_flag  # restored


def test_truncated_png_is_rejected(tmp_path):
    whole = save(noise(64, 64), tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert "truncated or corrupt" in bad(tmp_path / "cut.png")


@pytest.mark.parametrize("size", [(1, 100), (100, 1), (2, 50), (210, 10)])
def test_extreme_aspect_ratio(tmp_path, size):
    msg = bad(save(Image.new("RGB", size), tmp_path / "a.png"))
    assert f"{size[0]}x{size[1]}" in msg and "aspect ratio" in msg and "20:1" in msg


def test_aspect_ratio_at_the_limit_is_fine(tmp_path):
    assert load_image(save(Image.new("RGB", (200, 10)), tmp_path / "a.png")).width == 200


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1)])
def test_tiny_images(tmp_path, size):
    assert "at least 2 px" in bad(save(Image.new("RGB", size), tmp_path / "a.png"))


def test_huge_image_by_our_limit(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (40, 30)), tmp_path / "a.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    assert "larger than the limit" in bad(path) and "40x30" in bad(path)
    monkeypatch.setattr(data, "MAX_PIXELS", 1200)
    assert load_image(path).width == 40


def test_huge_image_by_pillow_bomb_check(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "larger than the limit" in bad(path)
    # Above PIL's warning threshold but under ours: loads, and no warning escapes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).width == 100


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    raw = np.array([[0, 257, 1000, 65535], [12345, 32768, 65280, 128]], dtype=np.uint16)
    img = Image.fromarray(raw)
    assert img.mode == "I;16"
    out = load_image(save(img, tmp_path / "a.png"))
    assert out.mode == "I;16"
    # round(v / 257), by hand: 1000/257 = 3.89, 12345/257 = 48.04, 32768/257 = 127.5, 65280/257 = 254.0
    expected = np.array([[0, 1, 4, 255], [48, 128, 254, 0]], dtype=np.uint8)
    got = np.asarray(out.image)
    assert got.shape == (2, 4, 3)
    assert np.array_equal(got[..., 0], expected)
    assert np.array_equal(got[..., 0], got[..., 2])


def test_16bit_big_endian_and_mode_i(tmp_path):
    raw = np.array([[0, 257, 1000, 65535], [12345, 32768, 65280, 128]], dtype=np.uint16)
    expected = np.array([[0, 1, 4, 255], [48, 128, 254, 0]], dtype=np.uint8)
    big = Image.fromarray(raw.astype(">u2"))
    assert big.mode == "I;16B"
    out = load_image(save(big, tmp_path / "b.tif"))
    assert np.array_equal(np.asarray(out.image)[..., 1], expected)
    as_i = Image.fromarray(raw.astype(np.int32))
    assert as_i.mode == "I"
    out = load_image(save(as_i, tmp_path / "i.tif"))
    assert out.mode == "I" and np.array_equal(np.asarray(out.image)[..., 0], expected)


def test_mode_i_out_of_16bit_range_and_float_use_min_max(tmp_path):
    out = load_image(save(Image.fromarray(np.array([[-100, 0], [100, 155]], dtype=np.int32)), tmp_path / "i.tif"))
    # (v - -100) * 255 / 255: -100 -> 0, 0 -> 100, 100 -> 200, 155 -> 255
    assert np.asarray(out.image)[..., 0].tolist() == [[0, 100], [200, 255]]
    f = Image.fromarray(np.array([[0.5, 1.0], [1.5, 2.5]], dtype=np.float32))
    assert f.mode == "F"
    out = load_image(save(f, tmp_path / "f.tif"))
    # (v - 0.5) * 255 / 2: 0, 63.75 -> 64, 127.5 -> 128, 255
    assert out.mode == "F" and np.asarray(out.image)[..., 0].tolist() == [[0, 64], [128, 255]]


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(save(img, tmp_path / "a.png"))
    px = np.asarray(out.image)
    assert out.mode == "RGBA" and out.image.mode == "RGB"
    assert px[0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in px[0, 1].tolist())
    assert px[3, 3].tolist() == [255, 0, 0]


def test_la_alpha_over_white(tmp_path):
    img = Image.new("LA", (3, 3), (0, 255))
    img.putpixel((2, 2), (0, 0))
    px = np.asarray(load_image(save(img, tmp_path / "a.png")).image)
    assert px[0, 0].tolist() == [0, 0, 0] and px[2, 2].tolist() == [255, 255, 255]


def test_greyscale_l(tmp_path):
    img = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8))
    out = load_image(save(img, tmp_path / "a.png"))
    assert out.mode == "L"
    assert np.array_equal(np.asarray(out.image), np.repeat(np.asarray(img)[..., None], 3, axis=2))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 2)
    out = load_image(save(img, tmp_path / "a.png", transparency=0))
    px = np.asarray(out.image)
    assert out.mode == "P"
    assert px[0, 0].tolist() == [255, 255, 255]  # transparent index -> white, not palette black
    assert px[0, 1].tolist() == [0, 255, 0] and px[2, 2].tolist() == [255, 0, 0]


def test_palette_without_transparency_gif(tmp_path):
    img = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    out = load_image(save(img, tmp_path / "a.gif"))
    assert out.mode == "P" and np.asarray(out.image)[1, 1].tolist() == [0, 0, 255]


def test_cmyk_jpeg(tmp_path):
    img = Image.new("RGB", (16, 16), (200, 30, 40)).convert("CMYK")
    out = load_image(save(img, tmp_path / "a.jpg", quality=100))
    assert out.mode == "CMYK" and out.image.mode == "RGB"
    r, g, b = np.asarray(out.image)[8, 8].tolist()
    assert abs(r - 200) <= 8 and abs(g - 30) <= 8 and abs(b - 40) <= 8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    out = load_image(save(img, tmp_path / "a.jpg", exif=exif, quality=95))
    assert (out.width, out.height) == (20, 40) == out.image.size
    px = np.asarray(out.image)
    assert px[2, 10].min() > 200 and px[37, 10].max() < 50  # the left band is now on top


# ---------------------------------------------------------------- thumbnails


def png_size(b: bytes) -> tuple[int, int]:
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(b)).size


def test_thumbnail_shrinks_longest_side():
    assert png_size(thumbnail_png(Image.new("RGB", (1000, 500)))) == (512, 256)
    assert png_size(thumbnail_png(Image.new("RGB", (300, 900)), longest=90)) == (30, 90)


def test_thumbnail_never_upscales_and_leaves_input_alone():
    img = Image.new("RGB", (100, 40), (1, 2, 3))
    b = thumbnail_png(img)
    assert png_size(b) == (100, 40)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), np.asarray(img))
    thumbnail_png(img, longest=10)
    assert img.size == (100, 40)


def test_thumbnail_rejects_nonpositive_longest():
    with pytest.raises(ValueError, match="positive"):
        thumbnail_png(Image.new("RGB", (4, 4)), longest=0)
