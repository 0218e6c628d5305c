"""The input stage of extraction, ahead of the model: read and validate each image once, hash it,
make its thumbnail, and encode the batch with the model's processor.

:class:`InputBatches` is what a torch ``DataLoader`` runs in ``--workers`` processes (pinned memory
on CUDA); batches come back in plan order whatever the number of workers. :func:`prepare_batch` is
the same work for one batch in this process (the live example checks its upload with it).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from pipeline.data import BadInput, Row, load_image, thumbnail_png
from pipeline.extraction.plan import Job
from pipeline.models.base import conform, map_inputs


class InputBatches(torch.utils.data.Dataset):
    """Batch ``i`` of the plan: rows read, validated and encoded (one item = one batch).

    Each process (a worker has its own copy) remembers the thumbnails it made last, so an image
    that many manifest rows share (several questions about one picture) is shrunk and encoded once.
    """

    THUMBNAILS_KEPT = 32  # a few MB of PNG per worker

    def __init__(self, adapter, jobs: list[Job], known_images: set[str]):
        self.adapter, self.jobs, self.known = adapter, jobs, known_images
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        job = self.jobs[i]
        out = prepare_batch(self.adapter, job.rows, self.known, self._thumbnail)
        if out["inputs"] is not None:  # as numpy: pickled through the pipe, no file descriptors to share,
            # so a worker has nothing left to serve (or to complain about) when Ctrl-C stops the main process
            out["inputs"] = map_inputs(out["inputs"], lambda v: v.numpy() if isinstance(v, torch.Tensor)
                                       and v.dtype != torch.bfloat16 else v)
        return {"job": i, **out}

    def _thumbnail(self, li) -> bytes:
        png = self._thumbs.pop(li.image_id, None)
        if png is None:
            png = thumbnail_png(li.image)
        self._thumbs[li.image_id] = png  # most recent last
        if len(self._thumbs) > self.THUMBNAILS_KEPT:
            self._thumbs.popitem(last=False)
        return png


def identity(x):
    return x


def worker_init(_):
    """An input worker: one thread (the model's process owns the cores), Ctrl-C left to the main
    process (which stops the workers itself), and on Linux it dies with the main process even when
    that is killed with SIGKILL, so nothing is left holding the terminal or the lake."""
    import signal

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the DataLoader's own watchdog stops it
        pass


def prepare_batch(adapter, rows: list[Row], known_images: set[str], thumbnail=None) -> dict:
    """Read, validate and encode one batch; every image is decoded and processed once.

    The processor runs on the whole batch; only when it fails (or yields an image without a whole
    patch) are the images checked one by one, and the bad ones recorded and left out.
    ``thumbnail``: ``LoadedImage -> PNG bytes`` for images not in ``known_images`` (default
    :func:`pipeline.data.thumbnail_png` of the image).
    """
    adapter = conform(adapter)
    thumbnail = thumbnail or (lambda li: thumbnail_png(li.image))
    errors: list[tuple[str, str, str]] = []
    ok, images = [], []
    for r in rows:
        try:
            li = load_image(r.image_path)
        except BadInput as e:
            errors.append((r.source_id, e.stage, e.message))
            continue
        png = None if li.image_id in known_images else thumbnail(li)
        ok.append((r, li))
        images.append(png)
    inputs, notes = None, []
    while ok:
        texts, pics = [r.text for r, _ in ok], [li.image for _, li in ok]
        try:
            inputs, notes = adapter.encode(texts, pics)
        except Exception:  # noqa: BLE001 - find the image(s) the processor cannot take
            bad = _check_each(adapter, pics)
            if not bad:
                raise
        else:
            bad = adapter.rejects(inputs, pics)
            if not bad:
                break
        for j in sorted(bad, reverse=True):
            r, _ = ok.pop(j)
            images.pop(j)
            errors.append((r.source_id, "image", bad[j]))
        inputs = None
    return {
        "rows": [r for r, _ in ok],
        "images": [li.image for _, li in ok],
        "image_info": [(li.image_id, li.width, li.height, li.mode, png) for (_, li), png in zip(ok, images)],
        "inputs": inputs, "notes": notes, "errors": errors, "n_rows": len(rows),
    }


def _check_each(adapter, pics) -> dict[int, str]:
    bad = {}
    for j, im in enumerate(pics):
        try:
            adapter.check_image(im)
        except BadInput as e:
            bad[j] = e.message
    return bad


def to_device(v, device: str):
    """An input array or tensor on ``device`` (through pinned memory on CUDA, copied asynchronously)."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor):
        return v
    if str(device).startswith("cuda"):
        return v.pin_memory().to(device, non_blocking=True)
    return v.to(device)
