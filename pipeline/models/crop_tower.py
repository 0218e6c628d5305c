"""A vision tower whose batch is the crops of all the batch's examples (LLaVA-NeXT and OneVision,
InternVL, Idefics3 and SmolVLM, Gemma 3 with pan-and-scan).

The tower sees ``[crop, ...]``, not ``[example, ...]``: hooks on its attention and layer modules
(``paths["vision"]``) regroup each layer per example and hand it to probes, which the capture reads
as the ``vision`` stream. An example's crops lie one after another (``seq_pos = crop * n + patch``)
and its attention is block diagonal: each crop's own ``[n, n]`` attention on its block, zero
between crops (crops never attend to each other), examples with fewer crops zero padded. A family
says how many crops each example has (:meth:`CropTower.batch_crops`); ``run`` holds that for the
hooks during the captured pass.
"""

from __future__ import annotations

import torch

from pipeline.capture import HookPoint
from pipeline.models.base import GEN_START, AttnProbe, Probe, module_at, probed_points, stream_hook_points


def crop_columns(crops: list[tuple[int, list[tuple], tuple | None]], cols: int, cls: bool) -> dict[str, list]:
    """The ``vision`` stream's token-table columns of one example whose crops the tower saw one after
    another: ``crops`` in the tower's order, each ``(tile, boxes of its patches in raster order, its
    whole box)``; each crop's tokens are its image ``[CLS]`` (when ``cls``, boxed as the whole crop) then
    its patches, ``cols`` a row, and ``seq_pos`` is ``crop * n + token``."""
    out = {k: [] for k in ("stream", "modality", "role", "token", "seq_pos", "patch_row", "patch_col", "box",
                           "tile")}
    first = 1 if cls else 0
    for j, (tile, boxes, whole) in enumerate(crops):
        n = len(boxes) + first
        for q in range(n):
            head = q < first
            r, c = divmod(q - first, cols) if not head else (None, None)
            for key, v in zip(out, ("vision", "image", "image_cls" if head else "patch", None, j * n + q, r, c,
                                    whole if head else boxes[q - first], tile)):
                out[key].append(v)
    return out


class CropTower:
    """A mixin before :class:`~pipeline.models.base.DecoderAdapter` for a tower whose batch is crops."""

    _crops: list[int] | None = None  # crops per example of the pass being captured

    def batch_crops(self, inputs, model_inputs) -> list[int] | None:
        """Crops per example of a batch (the base image included); None when the tower's batch is the
        examples (the hooks then stay idle)."""
        raise NotImplementedError

    def crops_by_image_tokens(self, inputs, image_token_id: int, per_crop: int) -> list[int]:
        """Crops per example counted from its prompt's image tokens, ``per_crop`` a crop (the answer's
        tokens are never image features), checked against the crops in ``pixel_values``."""
        ids = inputs["input_ids"].cpu()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        counts = [int((ids[b, :start[b]] == image_token_id).sum()) for b in range(ids.shape[0])]
        if any(c == 0 or c % per_crop for c in counts):
            raise RuntimeError(f"image tokens per example {counts} are not whole crops of {per_crop}")
        crops = [c // per_crop for c in counts]
        if sum(crops) != inputs["pixel_values"].shape[0]:
            raise RuntimeError(f"{sum(crops)} crops' image tokens in the prompts for {inputs['pixel_values'].shape[0]} "
                               "crops in pixel_values")
        return crops

    def run(self, inputs, model_inputs, example_ids):
        self._crops = self.batch_crops(inputs, model_inputs)
        try:
            return self.model(**model_inputs, use_cache=False, return_dict=True)
        finally:
            self._crops = None

    def _hook_crop_tower(self, model: torch.nn.Module, layers: int) -> None:
        """Probes for the tower's ``layers`` attention maps and ``layers + 1`` hidden states, fed by hooks
        on the modules of ``self.paths["vision"]`` that regroup the tower's batch of crops per example."""
        self.vis_attn = [AttnProbe() for _ in range(layers)]
        self.vis_hidden = [Probe() for _ in range(layers + 1)]
        vp = self.paths["vision"]
        for i in range(layers):
            module_at(model, vp["attention"].format(layer=i)).register_forward_hook(self._attn_hook(i))
            module_at(model, vp["hidden"].format(layer=i)).register_forward_hook(self._hidden_hook(i + 1))
        module_at(model, vp["hidden_0"]).register_forward_hook(self._hidden_hook(0))

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """``lm`` from its modules; ``vision`` from the probes the tower's hooks feed, one block per crop
        (no ``--explain value`` for the tower: its batch is the crops, not the examples)."""
        pts = stream_hook_points(self.model, {"lm": self.configs["lm"]}, {"lm": self.paths["lm"]}, keep_hidden,
                                 first_hidden={"lm": self.probe}, explain=explain)
        return pts + probed_points("vision", self.vis_attn, self.vis_hidden, keep_hidden, explain)

    def _attn_hook(self, layer: int):
        probe = self.vis_attn[layer]

        def fn(module, args, output):
            if self._crops is not None and self._watched(probe) and isinstance(output, tuple) and len(output) > 1 \
                    and output[1] is not None:
                probe(self._blocks(output[1]))
            return None

        return fn

    def _hidden_hook(self, layer: int):
        probe = self.vis_hidden[layer]

        def fn(module, args, output):
            if self._crops is not None and self._watched(probe):
                h = output[0] if isinstance(output, (tuple, list)) else output
                probe(self._per_example(h))
            return None

        return fn

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``[crop, head, n, n]`` (the crops of the whole batch) -> ``[example, head, C n, C n]``: each
        example's crops on the block diagonal, ``C`` the batch's most crops, zero elsewhere."""
        crops, n = self._crops, w.shape[-1]
        N = max(crops) * n
        out = w.new_zeros(len(crops), w.shape[1], N, N)
        k = 0
        for b, c in enumerate(crops):
            for j in range(c):
                out[b, :, j * n:(j + 1) * n, j * n:(j + 1) * n] = w[k]
                k += 1
        return out

    def _per_example(self, h: torch.Tensor) -> torch.Tensor:
        """``[crop, n, dim]`` -> ``[example, C n, dim]`` (each example's crops one after the other)."""
        parts = [p.reshape(-1, h.shape[-1]) for p in torch.split(h, self._crops, dim=0)]
        return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
