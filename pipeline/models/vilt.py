"""ViLT: one single-stream encoder over text tokens followed by image patches.

Sequence layout as the model sees it (``ViltEmbeddings.forward``)::

    [CLS] w1 ... wn [SEP] [PAD]...  |  [image CLS] p_s(0) p_s(1) ... [image PAD]...
    0 ................... T-1       |  T            T+1 ...

The image part is *not* in raster order: ``visual_embed`` samples the valid
patches with ``torch.multinomial`` (a random permutation when it keeps all
of them) and appends sampled padding patches for smaller images in a padded
batch. It returns the grid position of every patch it kept (``patch_index``)
and a mask of which are real; the adapter records both while the model runs
and builds the token table from them. Padding tokens (text and image) get no
weight from the attention mask and are left out of the token table, so an
example's rows do not depend on what else was in its batch.

In the token table the text tokens come first in sequence order, then the
image ``[CLS]``, then the patches in raster order (row by row, top to
bottom).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor

from pipeline.capture import HookPoint
from pipeline.data import BadInput
from pipeline.models.base import (BatchLayout, Prediction, module_at, normalise_answer, stream_hook_points,
                                  stream_layout, stream_shapes, token_rows)
from pipeline.stats import TokenMasks

# Native module paths -> (stream, layer): one dict per family (STYLE.md).
MODULES = {
    "attention": "vilt.encoder.layer.{layer}.attention.attention",  # ViltSelfAttention -> (context, probs)
    "hidden_0": "vilt.embeddings",  # (embeddings, masks): hidden state 0
    "hidden": "vilt.encoder.layer.{layer}",  # (layer_output, ...): hidden state layer + 1
}
STREAM = "self"

HEADS = {
    "ViltModel": None,
    "ViltForQuestionAnswering": "vqa",
    "ViltForImageAndTextRetrieval": "retrieval",
    "ViltForMaskedLM": None,
    "ViltForTokenClassification": None,
    "ViltForImagesAndTextClassification": "nlvr",
}


class ViltAdapter:
    family = "vilt"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.head = HEADS.get(type(model).__name__)
        self.prefix = "" if type(model).__name__ == "ViltModel" else "vilt."
        self._record: dict[str, torch.Tensor] = {}
        cfg = model.config
        self.max_text = int(getattr(cfg, "max_position_embeddings", 40))
        self.patch_size = int(cfg.patch_size)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32, revision: str | None = None):
        import transformers

        config = AutoConfig.from_pretrained(model_id, revision=revision)
        arch = (getattr(config, "architectures", None) or ["ViltModel"])[0]
        if arch not in HEADS:
            arch = "ViltModel"
        if arch == "ViltForImagesAndTextClassification":
            raise NotImplementedError(
                "ViltForImagesAndTextClassification takes two images per example (NLVR2); "
                "its manifests need an image pair, which VL-Atlas does not read yet. "
                "Load the checkpoint's encoder with ViltModel instead."
            )
        model = getattr(transformers, arch).from_pretrained(
            model_id, revision=revision, attn_implementation="eager", dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        return cls(model.to(device).eval(), processor, device)

    def _path(self, key: str, **kw) -> str:
        path = MODULES[key].format(**kw)
        return path[len("vilt."):] if not self.prefix else path

    def streams(self) -> dict[str, dict[str, int]]:
        return stream_shapes({STREAM: self.model.config})

    def hook_points(self, keep_hidden: set[int] | None) -> list[HookPoint]:
        paths = {k: self._path(k, layer="{layer}") for k in MODULES}
        return stream_hook_points(self.model, {STREAM: self.model.config}, {STREAM: paths}, keep_hidden)

    # -- inputs ---------------------------------------------------------------------
    def check_image(self, image) -> None:
        """Reject an image the processor would leave without a whole patch on a side.

        ViLT's processor resizes the shorter side to ``shortest_edge``, caps the longer
        one and rounds both *down* to a multiple of the patch size, so an elongated image
        that :func:`pipeline.data.load_image` accepts can end up 0 pixels high and fail
        the whole batch. Runs the processor on the image alone.
        """
        w, h = image.size
        try:
            px = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        except Exception as e:  # noqa: BLE001 - any failure of the processor on this one image
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput("image", f"the model's image processor cannot prepare this {w}x{h} image "
                                    f"(an aspect ratio of {max(w, h) / min(w, h):.0f}:1 may be too extreme "
                                    f"for its {self.patch_size} px patches): {first}") from None
        ph, pw = px.shape[-2:]  # [batch, channel, height, width]
        if ph < self.patch_size or pw < self.patch_size:
            raise BadInput("image", f"a {w}x{h} image is too elongated for this model: its processor resizes "
                                    f"it to {pw}x{ph} px, less than one {self.patch_size} px patch on a side")

    def encode(self, texts: list[str], images: list):
        notes: list[list[tuple[str, str]]] = []
        for t in texts:
            n = len(self.tokenizer(t, add_special_tokens=True)["input_ids"])
            notes.append([("text", f"text truncated from {n} to {self.max_text} tokens (the model's limit)")]
                         if n > self.max_text else [])
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                             truncation=True, max_length=self.max_text)
        return {k: v.to(self.device) for k, v in enc.items()}, notes

    @contextmanager
    def _bookkeeping(self):
        """Record ``visual_embed``'s patch positions while the model runs."""
        emb = module_at(self.model, self._path("hidden_0"))
        original = emb.visual_embed

        def visual_embed(*args, **kwargs):
            x, x_mask, (patch_index, _) = out = original(*args, **kwargs)
            self._record["patch_index"] = patch_index  # [batch, patches, 2] (row, col)
            self._record["image_mask"] = x_mask  # [batch, 1 + patches], 1 = real
            return out

        emb.visual_embed = visual_embed
        try:
            yield
        finally:
            del emb.visual_embed

    def forward(self, inputs: dict[str, torch.Tensor]):
        with self._bookkeeping(), torch.no_grad():
            return self.model(**inputs, output_attentions=True, output_hidden_states=False, return_dict=True)

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: dict[str, torch.Tensor], images: list, boxes: list) -> BatchLayout:
        if "patch_index" not in self._record:
            raise RuntimeError("layout() needs the patch positions recorded while the model embedded the batch")
        ids = inputs["input_ids"].cpu()  # [batch, T]
        amask = inputs["attention_mask"].cpu().bool()
        pmask = inputs["pixel_mask"].cpu().bool()  # [batch, H, W]
        pidx = self._record["patch_index"].cpu()  # [batch, P, 2]
        imask = self._record["image_mask"].cpu().bool()  # [batch, 1 + P]
        B, T = ids.shape
        ps = self.patch_size
        tok = self.tokenizer
        tables, orders, grids = [], [], []
        for b in range(B):
            text_pos = torch.nonzero(amask[b]).flatten().tolist()
            pieces = tok.convert_ids_to_tokens(ids[b, text_pos].tolist())
            roles = ["cls" if i == tok.cls_token_id else "sep" if i == tok.sep_token_id else "word"
                     for i in ids[b, text_pos].tolist()]
            # real image region in processed pixels, and the scale back to the original image
            valid_h = int(pmask[b, :, 0].sum())
            valid_w = int(pmask[b, 0, :].sum())
            orig_w, orig_h = images[b].size
            sx, sy = orig_w / valid_w, orig_h / valid_h
            real = [j for j in range(pidx.shape[1]) if imask[b, 1 + j]]
            real.sort(key=lambda j: (int(pidx[b, j, 0]), int(pidx[b, j, 1])))  # raster order
            rc = [(int(pidx[b, j, 0]), int(pidx[b, j, 1])) for j in real]
            n_text = len(text_pos)
            n = n_text + 1 + len(real)
            none_t = [None] * n_text
            box = lambda r, c: (c * ps * sx, r * ps * sy, min((c + 1) * ps, valid_w) * sx,  # noqa: E731
                                min((r + 1) * ps, valid_h) * sy)
            boxes_px = [box(r, c) for r, c in rc]
            tables.append(token_rows(
                token_idx=list(range(n)),
                stream=["self"] * n,
                modality=["text"] * n_text + ["image"] * (1 + len(real)),
                role=roles + ["image_cls"] + ["patch"] * len(real),
                token=pieces + [None] * (1 + len(real)),
                seq_pos=text_pos + [T] + [T + 1 + j for j in real],
                text_pos=list(range(n_text)) + [None] * (1 + len(real)),
                patch_row=none_t + [None] + [r for r, _ in rc],
                patch_col=none_t + [None] + [c for _, c in rc],
                x0=none_t + [0.0] + [q[0] for q in boxes_px],
                y0=none_t + [0.0] + [q[1] for q in boxes_px],
                x1=none_t + [float(orig_w)] + [q[2] for q in boxes_px],
                y1=none_t + [float(orig_h)] + [q[3] for q in boxes_px],
            ))
            orders.append(text_pos + [T] + [T + 1 + j for j in real])
            grids.append((-(-valid_h // ps), -(-valid_w // ps)))
        return BatchLayout(tables, {STREAM: stream_layout(tables, orders, boxes, self._pieces)}, grids)

    def _pieces(self, label: str) -> list[str]:
        return self.tokenizer.tokenize(label)

    # -- predictions ----------------------------------------------------------------
    def predict(self, outputs: Any, answers: list[str | None]) -> list[Prediction]:
        if self.head == "vqa":
            probs = outputs.logits.float().sigmoid()  # ViLT VQA is trained with BCE over answers
            top = probs.argmax(-1).tolist()
            id2label = self.model.config.id2label
            preds = []
            for i, a in zip(top, answers):
                p = str(id2label.get(i, id2label.get(str(i), i)))
                ok = None if a is None else normalise_answer(p) == normalise_answer(a)
                preds.append(Prediction(p, ok, {"score": round(float(probs[len(preds), i]), 6)}))
            return preds
        if self.head == "retrieval":
            scores = outputs.logits.float()[:, 0].tolist()
            return [Prediction(f"{s:.4f}", None, {"score": s}) for s in scores]
        return [Prediction() for _ in answers]
