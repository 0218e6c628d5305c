"""Head statistics, pure torch, computed on the device from the full attention.

Every statistic is, for one example and one head, a mean over a set of query
rows of a per-row quantity. ``A[q, k]`` is the weight query ``q`` puts on key
``k``; each valid row sums to 1 over the valid keys. Text (t) and image (i)
name the modality of a token; *patches* are the image tokens with role
``patch`` (an image ``[CLS]`` is an image token but not a patch); *special*
tokens are those with a role in ``lake.schema.ROLES_SPECIAL`` (``cls``, ``sep``, ``bos``, ``eos``,
``image_cls``, ``image_newline`` and the Qwen-VL markers ``vision_start``, ``vision_end``, ``im_start``,
``im_end``).

The formulas (quoted by the app's help text, see :data:`STAT_HELP`):

- ``t2i`` / ``t2t``: over text queries, ``sum_{k image} A[q,k]`` / ``sum_{k text} A[q,k]``.
- ``i2t`` / ``i2i``: over image queries, ``sum_{k text} A[q,k]`` / ``sum_{k image} A[q,k]``.
- ``i2i_noself``: over image queries, ``sum_{k image, k != q} A[q,k]``.
- ``entropy``: over all queries, ``-sum_k A[q,k] log A[q,k] / log(n_keys)``.
- ``sink``: over all queries, ``sum_{k special} A[q,k]``.
- ``max``: over all queries, ``max_k A[q,k]``.
- ``img_entropy``: over text queries that put mass on patches (under causal attention, text
  before the image puts none), with ``p_k = A[q,k] / sum_{j patch} A[q,j]`` over
  patch keys, ``-sum_k p_k log p_k / log(n_patches)``.
- ``boxed_img_mass``: over the text tokens of words that have a ground-truth box,
  ``sum_{k patch} A[q,k]``: how much those words look at the image at all.
- ``grounding``: over the text tokens of words that have a ground-truth box and put at
  least ``MIN_IMAGE_MASS`` (1%) of their attention on the patches,
  ``sum_{k patch in box} A[q,k] / sum_{k patch} A[q,k]``. A patch is in the box
  when its centre is; when no patch centre is, the patch holding the box's
  centre stands for the box.
- ``pointing``: over the same tokens (boxed, at least 1% on the patches), 1 when the
  patch with the largest ``A[q,k]`` is in the box, else 0 (the pointing game).

  Rows under 1% are left out of both because their image attention is noise: renormalising
  a few thousandths of mass (or taking the argmax of weights below float16's precision)
  credits a word that does not look at the image. The set is chosen per head; an example and
  head whose boxed words all fall under 1% has no value (null), and ``boxed_img_mass`` says
  how much the head looks at all.
- ``kept_mass``: over all queries, the share of the row's mass kept in the
  ``attention`` table after pruning.

A statistic whose query set is empty (an example without image tokens, a
text without boxed words) is NaN here and null in the lake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lake.schema import STAT_HELP  # the one-line definitions live with the lake's contract

# Rows that put less than this share of their attention on the image patches are left out of
# ``grounding`` and ``pointing`` (see the module docstring).
MIN_IMAGE_MASS = 0.01

__all__ = ["MIN_IMAGE_MASS", "STAT_HELP", "TokenMasks", "head_stats"]


@dataclass
class TokenMasks:
    """Boolean masks over the token axis of a batch in token-table order.

    All are ``[batch, token]`` except ``in_box`` (``[batch, query, key]``: patch
    key ``k`` lies in the box of the word of text query ``q``) and ``boxed``
    (``[batch, query]``: query ``q`` belongs to a word with a box).
    """

    valid: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    patch: torch.Tensor
    special: torch.Tensor
    in_box: torch.Tensor | None = None
    boxed: torch.Tensor | None = None
    n_boxed: int | None = None  # most boxed queries in an example, when known (spares a device sync)


def _row_mean(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [batch, head, query] over the query rows ``rows`` [batch, query] (or per head,
    [batch, head, query]); NaN if none."""
    w = (rows if rows.dim() == 3 else rows[:, None, :]).to(x.dtype)  # [batch, 1 or head, query]
    n = w.sum(-1)  # [batch, 1 or head]
    s = (torch.nan_to_num(x) * w).sum(-1)  # [batch, head]
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def head_stats(attn: torch.Tensor, m: TokenMasks, km: TokenMasks | None = None) -> dict[str, torch.Tensor]:
    """Every head statistic of one layer.

    Parameters
    ----------
    attn : ``[batch, head, query, key]`` attention, rows of invalid tokens and columns of
        invalid keys zero (or left out by the masks). Any order of the query and key axes
        works as long as the masks use the same one: the extractor passes the model's own
        sequence order with masks scattered to it, which saves reordering the matrix.
    m : the token masks of the batch (of the queries).
    km : the masks of the keys when they are another stream's tokens (cross attention,
        ``attn`` then ``[batch, head, query, key]`` with ``m.in_box`` ``[batch, query, key]``);
        default ``m``. Query sets are then ``m``'s, key sets ``km``'s: for text queries over
        image keys ``t2i`` is 1, ``t2t`` 0 and the image-query statistics have no rows (NaN).

    Returns
    -------
    ``{stat: [batch, head]}`` float32 tensors on ``attn``'s device (NaN where
    the statistic's query set is empty). ``kept_mass`` is added by the pruning
    step, which knows what is kept.

    The per-row sums over key sets are batched matrix products with the stacked key masks, and
    the image entropy comes from the same ``-a log a`` pass as the entropy:
    ``H(p) = log(m) + (1/m) sum_{k patch} -a_k log a_k`` with ``m = sum_{k patch} a_k``, so the
    full matrix is read a handful of times per layer.
    """
    a = attn.float()  # [batch, head, query, key]
    square = km is None
    km = m if km is None else km
    keys = torch.stack([km.image, km.text, km.special, km.patch, km.valid], -1).to(a.dtype)  # [batch, key, 5]
    masses = torch.matmul(a, keys[:, None, :, :4])  # [batch, head, query, 4]
    mass_img, mass_txt, mass_spec, patch_mass = (masses[..., i] for i in range(4))
    diag = torch.diagonal(a, dim1=-2, dim2=-1) if square else torch.zeros_like(mass_img)  # [batch, head, query]
    out = {
        "t2i": _row_mean(mass_img, m.text),
        "t2t": _row_mean(mass_txt, m.text),
        "i2t": _row_mean(mass_txt, m.image),
        "i2i": _row_mean(mass_img, m.image),
        "i2i_noself": _row_mean(mass_img - diag, m.image),
        "sink": _row_mean(mass_spec, m.valid),
        "max": _row_mean(a.amax(-1), m.valid),
    }
    ent = torch.matmul(torch.special.entr(a), keys[:, None, :, 3:])  # [batch, head, query, 2]: patch, all keys
    n_keys = km.valid.sum(-1)[:, None, None]  # [batch, 1, 1]
    nan = torch.full_like(mass_img, float("nan"))
    row_ent = torch.where(n_keys > 1, ent[..., 1] / torch.log(n_keys.to(a.dtype)).clamp(min=1e-30), nan)
    out["entropy"] = _row_mean(row_ent, m.valid)

    n_patch = km.patch.sum(-1)[:, None, None]
    has_patch_mass = patch_mass > 0
    pm = patch_mass.clamp(min=1e-30)
    h_img = (torch.log(pm) + ent[..., 0] / pm).clamp(min=0)
    img_ent = torch.where(has_patch_mass & (n_patch > 1),
                          h_img / torch.log(n_patch.to(a.dtype)).clamp(min=1e-30), nan)
    # only rows that put mass on patches (a causal LM's text before the image puts none)
    out["img_entropy"] = _row_mean(img_ent, m.text[:, None, :] & has_patch_mass)

    nb = 0
    if m.in_box is not None and m.boxed is not None:
        nb = m.n_boxed if m.n_boxed is not None else int(m.boxed.sum(-1).max())
    if nb > 0:
        B, H, _, K = a.shape
        q = torch.argsort((~m.boxed).to(torch.int8), dim=-1, stable=True)[:, :nb]  # [batch, nb] boxed rows first
        rows_ok = m.boxed.gather(1, q)  # [batch, nb]
        rows = a.gather(2, q[:, None, :, None].expand(B, H, nb, K))  # [batch, head, nb, key]
        box = m.in_box.gather(1, q[:, :, None].expand(-1, -1, K))  # [batch, nb, key]
        pm_rows = pm.gather(2, q[:, None, :].expand(B, H, nb))
        in_box_mass = torch.einsum("bhqk,bqk->bhq", rows, box.to(a.dtype)) / pm_rows
        img_rows = patch_mass.gather(2, q[:, None, :].expand(B, H, nb))  # [batch, head, nb]
        out["boxed_img_mass"] = _row_mean(img_rows, rows_ok)
        looks = rows_ok[:, None, :] & (img_rows >= MIN_IMAGE_MASS)  # [batch, head, nb]: per head
        out["grounding"] = _row_mean(torch.where(looks, in_box_mass, torch.zeros_like(in_box_mass)), looks)
        # pointing: is the argmax over patch keys inside the box?
        top = rows.masked_fill(~km.patch[:, None, None, :], -1.0).argmax(-1, keepdim=True)  # [batch, head, nb, 1]
        hit = torch.gather(box[:, None].expand(-1, H, -1, -1), -1, top)[..., 0]
        out["pointing"] = _row_mean(hit.to(a.dtype), looks)
    else:
        nan = torch.full(a.shape[:2], float("nan"), device=a.device)
        out["grounding"] = nan
        out["pointing"] = nan.clone()
        out["boxed_img_mass"] = nan.clone()
    return out
