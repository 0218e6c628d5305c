"""The "shapes" world: scenes and questions whose truth is known.

A scene is a 64 x 64 image on a plain background, cut into a 4 x 4 grid of
16-pixel cells (ViLT's patches, for the demo model); each object (a circle,
square or triangle, in red, green, blue or yellow, small or large) sits
centred in one cell, so a patch holds at most one object and we know which
patches a word ought to look at.

Questions, one type each (the manifest's ``meta.qtype``):

- ``color``: "what color is the circle ?" (the shape is unique in the scene)
- ``shape``: "what shape is the red object ?" (the colour is unique)
- ``exist``: "is there a blue square ?" (yes / no, balanced)
- ``count``: "how many circles are there ?" (0 to 4)
- ``relation``: "is the circle left of the square ?" / "... above ..." (yes / no)

Every word that refers to an object gets that object's box in ``boxes``
(``{"label": word, "box": [x0, y0, x1, y1]}``, pixels, x right, y down); the
manifest's ``box_color`` and ``box_shape`` are the colour and shape of the object
in the first box (null without one), the targets of the demo's probes.
Generation is deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
CELL = 16
GRID = SIZE // CELL
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
QTYPES = ("color", "shape", "exist", "count", "relation")
ANSWERS = tuple(COLORS) + SHAPES + ("yes", "no", "0", "1", "2", "3", "4")
PLURAL = {s: s + "s" for s in SHAPES}
VOCAB = sorted(set(
    "what color is the shape object there how many are left of above a an".split()
    + list(COLORS) + list(SHAPES) + list(PLURAL.values()) + ["yes", "no", "0", "1", "2", "3", "4", "?"]
))
BACKGROUND = (235, 235, 235)
SIDES = (10, 14)  # small, large (pixels)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def make_scene(rng: np.random.Generator) -> list[Obj]:
    """2 to 4 objects in distinct cells, each inside its cell."""
    n = int(rng.integers(2, 5))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs = []
    for c in cells:
        r, col = divmod(int(c), GRID)
        side = SIDES[int(rng.integers(0, len(SIDES)))]  # small or large, centred in its cell
        x0 = col * CELL + (CELL - side) // 2
        y0 = r * CELL + (CELL - side) // 2
        objs.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), r, col,
                        (x0, y0, x0 + side, y0 + side)))
    return objs


def draw(objs: list[Obj]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objs:
        x0, y0, x1, y1 = o.box
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            d.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=fill)
    return img


def _box(label: str, o: Obj) -> dict:
    return {"label": label, "box": list(o.box)}


def ask(objs: list[Obj], qtype: str, rng: np.random.Generator) -> tuple[str, str, list[dict]] | None:
    """A question of ``qtype`` about the scene, or None when the scene can't support it."""
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objs if o.color == c] for c in COLORS}
    if qtype == "color":
        unique = [s for s in SHAPES if len(by_shape[s]) == 1]
        if not unique:
            return None
        s = str(rng.choice(unique))
        o = by_shape[s][0]
        return f"what color is the {s} ?", o.color, [_box(s, o)]
    if qtype == "shape":
        unique = [c for c in COLORS if len(by_color[c]) == 1]
        if not unique:
            return None
        c = str(rng.choice(unique))
        o = by_color[c][0]
        return f"what shape is the {c} object ?", o.shape, [_box(c, o)]
    if qtype == "exist":
        want_yes = bool(rng.integers(0, 2))
        pairs = [(o.color, o.shape) for o in objs]
        if want_yes:
            c, s = pairs[int(rng.integers(0, len(pairs)))]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
            c, s = absent[int(rng.integers(0, len(absent)))]
        hits = [o for o in objs if o.color == c and o.shape == s]
        return f"is there a {c} {s} ?", "yes" if hits else "no", [b for o in hits for b in (_box(c, o), _box(s, o))]
    if qtype == "count":
        s = str(rng.choice(SHAPES))
        hits = by_shape[s]
        return f"how many {PLURAL[s]} are there ?", str(len(hits)), [_box(PLURAL[s], o) for o in hits]
    if qtype == "relation":
        unique = [s for s in SHAPES if len(by_shape[s]) == 1]
        if len(unique) < 2:
            return None
        a, b = (str(x) for x in rng.choice(unique, size=2, replace=False))
        oa, ob = by_shape[a][0], by_shape[b][0]
        if rng.integers(0, 2):
            if oa.col == ob.col:
                return None
            rel, yes = "left of", oa.col < ob.col
        else:
            if oa.row == ob.row:
                return None
            rel, yes = "above", oa.row < ob.row
        return f"is the {a} {rel} the {b} ?", "yes" if yes else "no", [_box(a, oa), _box(b, ob)]
    raise ValueError(f"unknown question type {qtype!r}")


def generate(n: int, seed: int) -> list[dict]:
    """``n`` examples: ``{"objs", "question", "answer", "boxes", "qtype"}``; question types cycle."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        qtype = QTYPES[len(out) % len(QTYPES)]
        objs = make_scene(rng)
        q = ask(objs, qtype, rng)
        if q is None:
            continue
        text, answer, boxes = q
        out.append({"objs": objs, "question": text, "answer": answer, "boxes": boxes, "qtype": qtype})
    return out


def write_dataset(out: str | Path, n: int, seed: int) -> Path:
    """Write PNGs and ``manifest.jsonl`` (docs/DESIGN.md's form) for ``n`` examples; return the manifest."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(generate(n, seed)):
        name = f"images/{seed}-{i:06d}.png"
        draw(ex["objs"]).save(out / name)
        # the object in the first box (the one the question names first): what a probe of the image
        # tokens in that box is asked to read (`vlatlas probe --target box_color`)
        first = next((o for o in ex["objs"] if ex["boxes"] and list(o.box) == ex["boxes"][0]["box"]), None)
        lines.append(json.dumps({
            "id": f"s{seed}-{i}", "image": name, "text": ex["question"], "answer": ex["answer"],
            "boxes": ex["boxes"], "qtype": ex["qtype"], "n_objects": len(ex["objs"]),
            "box_color": first.color if first else None, "box_shape": first.shape if first else None,
            "split": "heldout",
        }))
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
