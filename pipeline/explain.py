"""Beyond raw attention: the formulas behind ``vlatlas extract --explain``.

Pure torch on the device, one function per method, each tested against an independent
computation (``tests/pipeline/test_explain.py``). ``A`` is a ``[batch, head, query, key]`` attention in the
model's sequence order; padding rows and columns are zero.

- **Rollout** (Abnar and Zuidema 2020): ``Â_l = rownorm(mean_h A_l + I)``, ``R_0 = Â_0``,
  ``R_l = Â_l R_{l-1}``: how much each token's representation after block ``l`` draws on each
  input token, following the residual stream through every layer.
- **Value-weighted attention** (Kobayashi et al. 2020): the norm of what key ``j`` sends through
  head ``h``, ``n_h(j) = ||W_O^h (W_V^h x_j + b_V^h)||``, so a weight becomes its contribution norm
  ``||a_ij f_h(x_j)|| = a_ij n_h(j)``. Head statistics on those norms (``t2i_norm`` …) are the
  same sums as the raw ones over the row ``a_ij n_h(j)`` renormalised to 1.
- **Visual attention sinks** (Kang et al. 2025): a token is a sink at a layer when its hidden
  state there has a massive activation, ``max_d |h_d| / rms(h) >= SINK_RATIO`` (20, the paper's
  threshold). The dimension is stored with it: the dimensions that recur across a run are the
  model's *sink dimensions*, found from the data rather than assumed (the rule is per token, so
  a token's flag never depends on the rest of its batch). The ratio is at most ``sqrt(D)``, so it
  only fires in models wider than 400 (every LVLM's language model; not the demo's small ViLT).
"""

from __future__ import annotations

import torch

SINK_RATIO = 20.0  # |h_d| / rms(h) above which an activation is massive
LENS_TOP_K = 5


# -- rollout ------------------------------------------------------------------------------------
def rollout_step(attn: torch.Tensor, valid: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """One layer of attention rollout.

    attn : ``[batch, head, S, S]`` this layer's attention (sequence order).
    valid : ``[batch, S]`` real tokens.
    prev : ``[batch, S, S]`` the rollout up to the previous layer (None at the first layer).

    Returns ``[batch, S, S]`` float32: rows of valid tokens sum to 1 over valid keys.
    """
    m = attn.float().mean(1)  # [batch, S, S]
    eye = torch.diag_embed(valid.float())  # identity on valid tokens only
    a = m + eye
    a = a * valid[:, None, :].float()
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-30)
    return a if prev is None else torch.bmm(a, prev)


# -- value-weighted attention -----------------------------------------------------------------------
def value_norms(values: torch.Tensor, w_out: torch.Tensor, heads: int, kv_heads: int | None = None) -> torch.Tensor:
    """``n_h(j) = ||W_O^h v_h(j)||`` for every head and token.

    values : ``[batch, S, kv_heads * d]`` the value projection's output (bias included).
    w_out : ``[D_out, heads * d]`` the output projection's weight (``nn.Linear.weight``).
    heads, kv_heads : query heads and value heads (grouped-query attention shares a value head
        between ``heads // kv_heads`` query heads; default ``heads``).

    Returns ``[batch, heads, S]`` float32.
    """
    kv_heads = kv_heads or heads
    B, S, _ = values.shape
    d = w_out.shape[1] // heads
    v = values.float().reshape(B, S, kv_heads, d)
    if kv_heads != heads:
        v = v.repeat_interleave(heads // kv_heads, dim=2)  # [batch, S, heads, d]
    w = w_out.float().reshape(w_out.shape[0], heads, d)  # [D_out, heads, d]
    f = torch.einsum("bshd,ohd->bhso", v, w)  # [batch, heads, S, D_out]
    return f.norm(dim=-1)


def norm_weighted(attn: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``a_ij n_h(j)`` with every row renormalised to 1 (zero rows stay zero): a matrix the head
    statistics read like an attention matrix. attn ``[b, h, q, k]``, norms ``[b, h, k]``."""
    w = attn.float() * norms[:, :, None, :]
    return w / w.sum(-1, keepdim=True).clamp(min=1e-30)


# -- attention sinks --------------------------------------------------------------------------------
def massive(hidden: torch.Tensor) -> torch.Tensor:
    """``|h_d| / rms(h)`` for every token and dimension: ``[batch, S, D]`` float32."""
    h = hidden.float()
    rms = h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-30)
    return h.abs() / rms


def sinks(hidden: torch.Tensor, valid: torch.Tensor, ratio: float = SINK_RATIO
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sink tokens: ``(flag [batch, S] bool, dim [batch, S] int64, value [batch, S] float32)``, the
    dimension of each token's largest ``|h_d| / rms(h)`` and that ratio; padding is never a sink.
    The dimensions that come up across a run are the model's sink dimensions (``sinks.dim``)."""
    value, dim = massive(hidden).max(-1)
    return (value >= ratio) & valid, dim, value


# -- logit lens -------------------------------------------------------------------------------------
def lens_topk(hidden: torch.Tensor, norm: torch.nn.Module, head: torch.nn.Module, k: int = LENS_TOP_K,
              rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit lens: ``softmax(lm_head(norm(h)))``'s ``k`` most likely vocabulary items.

    hidden : ``[n, D]`` hidden states, taken ``rows`` at a time (a vocabulary of 150k makes a
    logits block of 300 MB per 512 rows in float32). Returns (probs ``[n, k]`` float32, ids
    ``[n, k]`` int64).
    """
    dtype = next(head.parameters()).dtype
    ps, ids = [], []
    for i in range(0, hidden.shape[0], rows):
        logits = head(norm(hidden[i:i + rows].to(dtype))).float()
        p, j = logits.softmax(-1).topk(k, dim=-1)
        ps.append(p)
        ids.append(j)
    if not ps:
        return hidden.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long, device=hidden.device)
    return torch.cat(ps), torch.cat(ids)


# -- relevancy ----------------------------------------------------------------------------------------
def relevancy_self(attns: list[torch.Tensor], grads: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted relevancy of a self-attention stack (Chefer, Gur and Wolf 2021, ICCV).

    ``R = I``; for every layer, ``Ā = E_h[(∇A ⊙ A)^+]`` and ``R ← R + Ā R``. Row ``q`` of the
    result is how relevant each token is to the output read at token ``q``.

    attns, grads : per layer ``[batch, head, S, S]`` the attention and the gradient of the target
        score with respect to it. valid : ``[batch, S]``.
    Returns ``[batch, S, S]`` float32.
    """
    B, S = valid.shape
    r = torch.diag_embed(valid.float())
    for a, g in zip(attns, grads):
        cam = (g.float() * a.float()).clamp(min=0).mean(1)  # [batch, S, S]
        r = r + torch.bmm(cam, r)
    return r


def _bar(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``R̄ = R̂ + I`` with ``R̂ = R - I`` row-normalised (Chefer et al. 2021, eq. 9); rows of ``R̂``
    that sum to 0 stay 0."""
    eye = torch.diag_embed(valid.float())
    rh = r - eye
    sums = rh.sum(-1, keepdim=True)
    return rh / torch.where(sums != 0, sums, torch.ones_like(sums)) + eye


def relevancy_cross(attns: dict[str, list[torch.Tensor]], grads: dict[str, list[torch.Tensor]],
                    v_valid: torch.Tensor, t_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevancy of a text encoder that cross-attends to a vision tower (BLIP), Chefer et al. 2021's
    rules for self- and bi-modal attention: ``R^ii`` from the vision tower's self-attention; then per
    text layer, its self-attention ``R^tt += Ā R^tt``, ``R^ti += Ā R^ti``, and its cross-attention
    (text queries over image keys) ``R^ti += (R̄^tt)ᵀ Ā^ti R^ii``. The image never attends to the
    text, so ``R^it`` stays 0 and ``R^tt`` gets nothing from the cross-attention.

    ``attns``/``grads``: the ``vision``, ``text`` and ``cross`` streams' attentions and their
    gradients, layer by layer. Returns ``(R^tt [batch, St, St], R^ti [batch, St, Si])`` float32.
    """
    r_ii = relevancy_self(attns["vision"], grads["vision"], v_valid)
    r_tt = torch.diag_embed(t_valid.float())
    r_ti = torch.zeros(t_valid.shape[0], t_valid.shape[1], v_valid.shape[1], device=t_valid.device)
    for a, g, ca, cg in zip(attns["text"], grads["text"], attns["cross"], grads["cross"]):
        cam = (g.float() * a.float()).clamp(min=0).mean(1)
        r_tt = r_tt + torch.bmm(cam, r_tt)
        r_ti = r_ti + torch.bmm(cam, r_ti)
        ccam = (cg.float() * ca.float()).clamp(min=0).mean(1)  # [batch, St, Si]
        r_ti = r_ti + torch.bmm(torch.bmm(_bar(r_tt, t_valid).transpose(1, 2), ccam), r_ii)
    return r_tt, r_ti
