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

import numpy as np
import torch

from pipeline.data import BadInput
from pipeline.models.base import (Adapter, BatchLayout, Inputs, Prediction, encoder_relevancy_targets,
                                  normalise_answer, stream_layout)
from pipeline.models.hooks import module_at
from pipeline.models.tokens import token_table
from pipeline.models.family import FamilySpec

# Native module paths -> (stream, layer): one declaration per family (docs/DESIGN.md, Model adapters).
# The paths are a head's (``vilt.`` first); a bare ViltModel's drop that prefix (``ViltAdapter._path``).
STREAM = "self"
VILT = FamilySpec(
    name="vilt",
    classes={"vilt": "ViltForQuestionAnswering"},  # or another head: HEADS
    streams={STREAM: {"attention": "vilt.encoder.layer.{layer}.attention.attention",  # -> (context, probs)
                      "hidden_0": "vilt.embeddings",  # (embeddings, masks): hidden state 0
                      "hidden": "vilt.encoder.layer.{layer}",  # (layer_output, ...): hidden state layer + 1
                      "value": "vilt.encoder.layer.{layer}.attention.attention.value",  # --explain value: W_V x + b_V
                      "out": "vilt.encoder.layer.{layer}.attention.output.dense"}},  # and W_O
)
MODULES = VILT.streams[STREAM]
PATCH_SEED = 1_000_003  # + example_id: the generator of an example's patch sampling

HEADS = {
    "ViltModel": None,
    "ViltForQuestionAnswering": "vqa",
    "ViltForImageAndTextRetrieval": "retrieval",
    "ViltForMaskedLM": None,
    "ViltForTokenClassification": None,
    "ViltForImagesAndTextClassification": "nlvr",
}


class ViltAdapter(Adapter):
    family = "vilt"
    TEXT_ROLES = ("cls", "sep")  # padding gets no weight and is left out of the table

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        super().__init__(model, processor, device)
        self.head = HEADS.get(type(model).__name__)
        self.prefix = "" if type(model).__name__ == "ViltModel" else "vilt."
        self._record: dict[str, torch.Tensor] = {}  # patch positions of the last plain-dict batch
        cfg = model.config
        self.max_text = int(getattr(cfg, "max_position_embeddings", 40))
        self.patch_size = int(cfg.patch_size)
        self.configs = {STREAM: cfg}
        self.paths = {STREAM: {k: self._path(k, layer="{layer}") for k in MODULES}}

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        arch = (getattr(config, "architectures", None) or ["ViltModel"])[0]
        if arch not in HEADS:
            arch = "ViltModel"
        if arch == "ViltForImagesAndTextClassification":
            raise NotImplementedError(
                "ViltForImagesAndTextClassification takes two images per example (NLVR2); "
                "its manifests need an image pair, which VL-Atlas does not read yet. "
                "Load the checkpoint's encoder with ViltModel instead."
            )
        return arch

    def _path(self, key: str, **kw) -> str:
        path = MODULES[key].format(**kw)
        return path[len("vilt."):] if not self.prefix else path

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

    def rejects(self, inputs: dict[str, torch.Tensor], images: list) -> dict[int, str]:
        """The examples of an encoded batch whose image came out of the processor without a whole
        patch on a side (read from ``pixel_mask``, so the processor runs once per image)."""
        pm = inputs["pixel_mask"]  # [batch, H, W], 1 = real pixels
        hs, ws = pm[:, :, 0].sum(-1).tolist(), pm[:, 0, :].sum(-1).tolist()
        out = {}
        for j, (ph, pw) in enumerate(zip(hs, ws)):
            if ph < self.patch_size or pw < self.patch_size:
                w, h = images[j].size
                out[j] = (f"a {w}x{h} image is too elongated for this model: its processor resizes it to "
                          f"{int(pw)}x{int(ph)} px, less than one {self.patch_size} px patch on a side")
        return out

    def encode(self, texts: list[str], images: list):
        notes = self.truncation_notes(texts)
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                             truncation=True, max_length=self.max_text)
        return Inputs(enc), notes  # on the host: the pipeline moves them to the device

    @contextmanager
    def _bookkeeping(self, example_ids=None, record: dict | None = None):
        """Record ``visual_embed``'s patch positions while the model runs, in ``record`` (the
        batch's ``Inputs.state``; the adapter's own for a plain dict).

        With ``example_ids``, the patch sampling of example ``b`` (``visual_embed`` calls
        ``torch.multinomial`` once per example, in batch order) draws from a generator seeded by
        that example's id, so which patches are kept (and their order) depends on the example alone,
        never on the batch it shares or its position in it.
        """
        emb = module_at(self.model, self._path("hidden_0"))
        original = emb.visual_embed
        multinomial = torch.multinomial

        def seeded(input, num_samples, replacement=False, *, generator=None, out=None):
            b = next(calls)
            g = torch.Generator(device=input.device).manual_seed(PATCH_SEED + int(example_ids[b]))
            return multinomial(input, num_samples, replacement, generator=g)

        def visual_embed(*args, **kwargs):
            nonlocal calls
            calls = iter(range(len(example_ids or ())))
            if example_ids is not None:
                torch.multinomial = seeded
            try:
                x, x_mask, (patch_index, _) = out = original(*args, **kwargs)
            finally:
                torch.multinomial = multinomial
            kept = self._record if record is None else record
            kept["patch_index"] = patch_index  # [batch, patches, 2] (row, col)
            kept["image_mask"] = x_mask  # [batch, 1 + patches], 1 = real
            return out

        calls = iter(())
        emb.visual_embed = visual_embed
        try:
            yield
        finally:
            del emb.visual_embed

    def run(self, inputs, model_inputs, example_ids):
        with self._bookkeeping(example_ids, inputs.state if isinstance(inputs, Inputs) else None):
            return self.model(**model_inputs, output_attentions=True, output_hidden_states=False, return_dict=True)

    # -- relevancy (--explain relevancy) -----------------------------------------------
    def relevancy_targets(self, inputs, outputs) -> list[dict]:
        return encoder_relevancy_targets(self, inputs, outputs)

    def relevancy_target(self, outputs) -> torch.Tensor:
        """``[batch]`` the score explained: the predicted answer's logit (VQA) or the match logit."""
        if self.head == "vqa":
            return outputs.logits.gather(1, outputs.logits.argmax(-1, keepdim=True))[:, 0]
        if self.head == "retrieval":
            return outputs.logits[:, 0]
        raise ValueError("--explain relevancy explains a prediction: this ViLT checkpoint has no head "
                         "(ViltForQuestionAnswering or ViltForImageAndTextRetrieval)")

    def relevancy_rows(self, inputs) -> dict[str, torch.Tensor]:
        """``{stream: [batch] sequence position}`` of the token the head reads: [CLS] (the pooler)."""
        n = inputs["input_ids"].shape[0]
        return {STREAM: torch.zeros(n, dtype=torch.long, device=inputs["input_ids"].device)}

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        record = inputs.state if isinstance(inputs, Inputs) and "patch_index" in inputs.state else self._record
        if "patch_index" not in record:
            raise RuntimeError("layout() needs the patch positions recorded while the model embedded the batch")
        ids = inputs["input_ids"].cpu().numpy()  # [batch, T]
        amask = inputs["attention_mask"].cpu().numpy().astype(bool)
        pmask = inputs["pixel_mask"].cpu().numpy().astype(bool)  # [batch, H, W]
        pidx = record["patch_index"].cpu().numpy()  # [batch, P, 2]
        imask = record["image_mask"].cpu().numpy().astype(bool)  # [batch, 1 + P]
        B, T = ids.shape
        ps = self.patch_size
        tok = self.tokenizer
        tables, orders, grids = [], [], []
        for b in range(B):
            text_pos = np.flatnonzero(amask[b])
            tid = ids[b, text_pos]
            pieces = tok.convert_ids_to_tokens(tid.tolist())
            roles = [self._text_role(i) for i in tid.tolist()]
            # real image region in processed pixels, and the scale back to the original image
            valid_h, valid_w = int(pmask[b, :, 0].sum()), int(pmask[b, 0, :].sum())
            orig_w, orig_h = images[b].size
            sx, sy = orig_w / valid_w, orig_h / valid_h
            real = np.flatnonzero(imask[b, 1:])
            rc = pidx[b, real]  # [n_patch, 2] (row, col)
            order = np.lexsort((rc[:, 1], rc[:, 0]))  # raster order
            real, rc = real[order], rc[order]
            r, c = rc[:, 0].astype(np.int64), rc[:, 1].astype(np.int64)
            n_text, n_img = len(text_pos), 1 + len(real)
            seq = np.concatenate([text_pos, [T], T + 1 + real]).astype(np.int64)
            tables.append(token_table(
                n_text=n_text, n_image=n_img, stream=STREAM, roles_text=roles,
                roles_image=np.array(["image_cls"] + ["patch"] * len(real), dtype=object), pieces=pieces, seq=seq,
                patch_row=np.concatenate([[-1], r]), patch_col=np.concatenate([[-1], c]),
                x0=np.concatenate([[0.0], c * ps * sx]), y0=np.concatenate([[0.0], r * ps * sy]),
                x1=np.concatenate([[float(orig_w)], np.minimum((c + 1) * ps, valid_w) * sx]),
                y1=np.concatenate([[float(orig_h)], np.minimum((r + 1) * ps, valid_h) * sy])))
            orders.append(seq)
            grids.append((-(-valid_h // ps), -(-valid_w // ps)))
        return BatchLayout(tables, {STREAM: stream_layout(tables, orders, boxes, self._pieces)}, grids)

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
