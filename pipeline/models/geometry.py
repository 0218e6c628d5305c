"""Pixel-box geometry: where the processed image (and each of its patches) lies in the original image.

An image processor resizes (and may pad to a square, or centre-crop) before the model cuts the
image into patches. Boxes in the lake are in pixels of the *original* image (docs/DESIGN.md,
Conventions), so every patch's box is mapped back through the processor's own geometry, read from
its settings with transformers' own size helpers.

A geometry is the tuple ``(sx, sy, left, top, out_w, out_h)``: processed pixel ``(u, v)`` comes
from original pixel ``((u + left) / sx, (v + top) / sy)``; ``out_w``/``out_h`` is the processed size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Geometry = tuple[float, float, float, float, int, int]  # (sx, sy, left, top, out_w, out_h)
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in original pixels


def _size(sd, key):
    """A key of an image processor's size dict (``SizeDict`` or plain dict)."""
    if sd is None:
        return None
    return sd.get(key) if isinstance(sd, dict) else getattr(sd, key, None)


def crop_geometry(image_processor, width: int, height: int) -> Geometry:
    """Where the processed image lies in the original one.

    Returns ``(sx, sy, left, top, out_w, out_h)``: processed pixel ``(u, v)`` comes from original
    pixel ``((u + left) / sx, (v + top) / sy)``, with ``sx``/``sy`` the resize scale and
    ``left``/``top`` the centre crop's offset in the resized image (negative where the crop pads);
    ``out_w``/``out_h`` the processed size. Uses transformers' own size helpers.
    """
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio

    ip = image_processor
    rw, rh = width, height
    if getattr(ip, "do_resize", True):
        size = ip.size
        short, long_, h, w = (_size(size, k) for k in ("shortest_edge", "longest_edge", "height", "width"))
        if short and long_:
            rh, rw = get_size_with_aspect_ratio((height, width), short, long_)
        elif short:
            rh, rw = get_resize_output_image_size(np.zeros((1, height, width)), size=short,
                                                  default_to_square=False, input_data_format="channels_first")
        elif h and w:
            rh, rw = h, w
        else:
            raise NotImplementedError(f"VL-Atlas cannot map boxes through {type(ip).__name__}'s resize "
                                      f"to {size}; supported: shortest_edge, height/width")
    sx, sy = rw / width, rh / height
    left = top = 0
    ow, oh = rw, rh
    if getattr(ip, "do_center_crop", False):
        ch, cw = int(_size(ip.crop_size, "height")), int(_size(ip.crop_size, "width"))
        pil = type(ip).__name__.endswith("Pil")  # numpy backend pads ceil(d/2) on the left, torchvision floor

        def offset(full, crop):
            if crop <= full:
                return (full - crop) // 2
            d = crop - full
            return -((d + 1) // 2 if pil else d // 2)

        left, top, ow, oh = offset(rw, cw), offset(rh, ch), cw, ch
    return sx, sy, left, top, ow, oh


def pad_square_geometry(image_processor, width: int, height: int) -> Geometry:
    """As :func:`crop_geometry`, after a pad to a centred square when the processor pads
    (``do_pad``, as LLaVA's image processor does) and resizes the square."""
    ip = image_processor
    if getattr(ip, "do_pad", False):
        S = max(width, height)
        sx, sy, left, top, ow, oh = crop_geometry(ip, S, S)
        # processed (u, v) <- padded ((u + left) / sx, ...) <- original (... - pad_x)
        return sx, sy, left - (S - width) // 2 * sx, top - (S - height) // 2 * sy, ow, oh
    return crop_geometry(ip, width, height)


@dataclass(frozen=True)
class PatchGrid:
    """The patches of one processed image, in original pixels.

    ``cells[k] = (row, col)`` in raster order (row by row, top to bottom), ``boxes[k]`` its box;
    ``whole`` is the processed image's box (what an image ``[CLS]`` sees).
    """

    rows: int
    cols: int
    cells: list[tuple[int, int]]
    boxes: list[Box]
    whole: Box


def patch_grid(geometry: Geometry, width: int, height: int, processed: tuple[int, int],
               patch_size: int) -> PatchGrid:
    """The ``processed = (w, h)`` image cut into ``patch_size`` patches, each boxed in the
    ``width`` x ``height`` original through ``geometry``; boxes are clipped to the image.

    Raises ``RuntimeError`` when the processor made an image of another size than its settings say
    (the boxes would be wrong).
    """
    sx, sy, left, top, ow, oh = geometry
    pw, ph = processed
    if (ow, oh) != (pw, ph):
        raise RuntimeError(f"the image processor made a {pw}x{ph} image where its settings say "
                           f"{ow}x{oh}; VL-Atlas cannot place patches on the original image")
    W, H = float(width), float(height)

    def px(u, v):  # processed pixel -> original pixel, clipped to the image
        return min(max((u + left) / sx, 0.0), W), min(max((v + top) / sy, 0.0), H)

    ps = patch_size
    gh, gw = ph // ps, pw // ps
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    boxes = [px(c * ps, r * ps) + px((c + 1) * ps, (r + 1) * ps) for r, c in cells]
    return PatchGrid(gh, gw, cells, boxes, px(0, 0) + px(pw, ph))


def tile_grid(image_processor, width: int, height: int) -> tuple[int, int]:
    """``(rows, cols)`` of the tile grid a GotOcr2 image processor (``crop_to_patches``: InternVL, Aya
    Vision) picks for a ``width x height`` image, by its own ``get_optimal_tiled_canvas`` (the aspect
    ratio with ``min_patches <= rows cols <= max_patches`` closest to the image's); 1 x 1 when it
    takes one tile at most."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ip = image_processor
    most = int(getattr(ip, "max_patches", 1) or 1)
    if most <= 1:
        return 1, 1
    sh, sw = _size(ip.size, "height"), _size(ip.size, "width")
    cols, rows = get_optimal_tiled_canvas((height, width), (sh, sw), int(ip.min_patches), most)
    return int(rows), int(cols)


def tiled_crops(width: int, height: int, grid: tuple[int, int], crop: int,
                patch: int) -> list[tuple[int, list[Box], Box]]:
    """The crops of a GotOcr2 tiling in the tower's order: per crop ``(tile, its patches' boxes in raster
    order, its whole box)``, in original pixels, ``crop`` the side of a crop and ``patch`` of a patch.

    With ``grid = (rows, cols)`` over one tile, the original is stretched to ``cols crop x rows crop`` and
    cut row by row (tile ``1 + r cols + c``), then the *thumbnail* follows (tile 0: the whole original
    stretched to ``crop x crop``); a single-tile image is the thumbnail alone."""
    rows, cols = grid
    W, H, n = float(width), float(height), crop // patch

    def boxed(x0, y0, sx, sy):  # crop pixel (u, v) -> original (x0 + u sx, y0 + v sy), clipped
        def px(u, v):
            return min(max(x0 + u * sx, 0.0), W), min(max(y0 + v * sy, 0.0), H)
        return ([px(c * patch, r * patch) + px((c + 1) * patch, (r + 1) * patch) for r in range(n) for c in range(n)],
                px(0, 0) + px(crop, crop))

    thumb = (0, *boxed(0.0, 0.0, W / crop, H / crop))
    if rows * cols == 1:
        return [thumb]
    sx, sy = W / (cols * crop), H / (rows * crop)
    return [(1 + t, *boxed((t % cols) * crop * sx, (t // cols) * crop * sy, sx, sy)) for t in range(rows * cols)] \
        + [thumb]
