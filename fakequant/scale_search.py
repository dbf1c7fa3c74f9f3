"""Smarter shared exponents for MX block floats: MSE-optimal and Hessian-weighted E8M0 scale search.

The scale rules of ``shared/spec/formats.md`` §1 (``floor``, ``round``, ``ceil``, ``rceil``) look only at the
block maximum. Here each block takes the power-of-two scale ``2^s`` that minimises its own error, with the
elements quantized exactly as ``quant_dequant`` quantizes them at that scale (same element grid, rounding
mode, saturation and E8M0 window). Results are the reference's numbers at the chosen scales, so they pack
bit for bit (``fakequant.packing.pack(x, q, scales=mse_scales(x, q))``).

Which scales can win (``x`` a block, ``a = |x|``, ``s0`` the ``floor`` exponent E(amax) - emax, ``max`` the
element format's max_norm, ``E(t)`` the block's squared error at scale ``t``):

* **Above: only ``s0 + 1``.** For ``t >= 2 * amax / max`` the element grid at ``t / 2`` holds every point of
  the grid at ``t`` up to ``max * t / 2 >= amax`` (a format value ``u`` has ``2u`` in the format while
  ``2u <= max``), so rounding any element to the grid at ``t / 2`` is at least as close, for nearest, even
  and toward-zero rounding. Since ``amax < 2^(s0 + emax + 1) <= max * 2^(s0 + 1)``, every ``t >= 2^(s0 + 2)``
  is dominated by ``t / 2``, and by induction by ``2^(s0 + 1)``. This subsumes seed 001's upper bound
  ``t <= y_(k*+1) / d0`` (the k*-th smallest element rounding to zero).
* **Below: while the clipping bound allows.** Seed 001's fast-fail: at scale ``t`` every element above
  ``max * t`` saturates, so ``E(t) >= C(t) = sum(max(a - max * t, 0)^2)``, which grows as ``t`` shrinks. We
  walk down from ``s0 - 1`` and drop a block as soon as ``C(t) >= E_best`` (its best error so far): no
  smaller scale can beat it. This subsumes seed 001's lower bound ``t >= (amax - sqrt(E0)) / max``
  (``C(t)`` includes the amax term). For Gaussian blocks of 32 the walk almost always ends after one step.

Ties keep the earlier candidate in the order ``s0``, ``s0 + 1``, ``s0 - 1``, ``s0 - 2``, ..., so the search
returns ``floor``'s scale unless another one is strictly better; ``ceil``'s exponent is ``s0`` or ``s0 + 1``.
Errors are summed in float64 from the float32 values. A block that ``floor`` makes NaN (a NaN/inf element,
or ``s0`` above the E8M0 window) stays NaN; all-zero blocks keep ``floor``'s exponent.

The Hessian variant (GPTQ-style) weighs the error of a weight block ``x`` of ``W``'s row by the input
statistics of its columns: ``(x - q)^T H (x - q)`` with ``H = X_blk^T X_blk`` summed over the tokens of the
activations ``X`` (``[T, K]``), one ``B x B`` matrix per column block. It evaluates the scales the plain
search considers viable (``s0 + 1``, ``s0`` and the walk down while ``C(t)`` stays below ``floor``'s error,
seed 001's rule) and keeps the one with the smallest weighted error; that set holds the MSE choice, so the
Hessian choice is never worse on the weighted objective.

Public: ``mse_scales``, ``quant_dequant_mse``, ``hessian_scales``, ``quant_dequant_scaled``,
``block_hessians``, ``hessian_error``, ``naive_mse_scales`` (the exhaustive loop over all 254 E8M0 scales,
the slow yardstick).

QType hook: once ``QType`` accepts ``.scale("mse")``, the reference ``quant_dequant_mx`` calls
``quant_dequant_mse`` for that mode; until then call these functions directly (they ignore the QType's
scale mode and use everything else: element format, block size, scale bits, rounding, axis).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import as_qtype, check_input
from .formats._common import FLT_MAX, pow2, saturating_cast, to_blocks
from .formats.mx import ElementFormat, quantize_elements
from .packing import mx_block_exponents
from .qtype import QType

__all__ = [
    "mse_scales",
    "quant_dequant_mse",
    "hessian_scales",
    "quant_dequant_scaled",
    "block_hessians",
    "hessian_error",
    "naive_mse_scales",
]

# Block rows evaluated at once; bounds the float64 temporaries (and the gathered Hessians) per step.
_CHUNK_ROWS = 1 << 16


def _mx_qtype(qtype: QType | str, what: str) -> QType:
    q = as_qtype(qtype)
    if q.family != "mx":
        raise ValueError(
            f"{what} needs an MX block float e<E>m<M>k<K>b<B>[c] (or an mx* alias), got {str(q)!r} "
            f"(family {q.family!r})"
        )
    return q


def _dequant(a: Tensor, s: Tensor, fmt: ElementFormat, round_mode: str) -> Tensor:
    """Magnitudes ``q * 2^s`` the reference stores for ``a = |x|`` at exponents ``s`` (formats.md §1 step 3)."""
    q = quantize_elements(a * pow2(-s), fmt, round_mode)
    return torch.clamp(q * pow2(s), max=FLT_MAX)


def _sse(a: Tensor, s: Tensor, fmt: ElementFormat, round_mode: str) -> Tensor:
    """Per-row squared error (float64, ``[R, 1]``) of float32 magnitudes ``a`` ``[R, B]`` at exponents ``s``."""
    d = a.double() - _dequant(a, s, fmt, round_mode).double()
    return (d * d).sum(dim=-1, keepdim=True)


def _clip_bound(a: Tensor, s: Tensor, fmt: ElementFormat) -> Tensor:
    """Seed 001's fast-fail ``C(t) = sum(max(a - max * t, 0)^2)``, a lower bound of the error at ``t = 2^s``."""
    top = (fmt.max_value * pow2(s)).double()
    over = (a.double() - top).clamp(min=0)
    return (over * over).sum(dim=-1, keepdim=True)


def _candidates_below(a: Tensor, s0: Tensor, bound: Tensor, k_max: int, fmt: ElementFormat):
    """Yield ``(rows, s)`` for the walk below ``s0``: row indices still viable at ``s = s0[rows] - d`` (the
    clipping bound below ``bound[rows]`` and ``s >= -k_max``), for d = 1, 2, ... until none is left.
    ``bound`` may be updated in place by the caller between steps (the plain search lowers it)."""
    rows = torch.arange(a.shape[0], device=a.device)
    d = 1
    while rows.numel():
        s = s0[rows] - d
        keep = (s >= -k_max).squeeze(-1)
        rows, s = rows[keep], s[keep]
        if not rows.numel():
            return
        clip = torch.cat([_clip_bound(a[rows[i:i + _CHUNK_ROWS]], s[i:i + _CHUNK_ROWS], fmt)
                          for i in range(0, rows.numel(), _CHUNK_ROWS)])
        keep = (clip < bound[rows]).squeeze(-1)
        rows, s = rows[keep], s[keep]
        if rows.numel():
            yield rows, s
        d += 1


def _search(blocks: Tensor, q: QType, weighted=None) -> tuple[Tensor, Tensor]:
    """Exponents ``[..., n_blocks, 1]`` and NaN mask of float32 ``blocks`` ``[..., n_blocks, B]``.

    ``weighted(rows, s)`` (optional) returns the objective of those block rows at exponents ``s``; without it
    the objective is the squared error and the walk down is pruned against the best error so far, with it
    against ``floor``'s squared error (the viable set of seed 001)."""
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    s0, nan_block = mx_block_exponents(blocks, q, "floor")
    lead = blocks.shape[:-1]
    a = blocks.abs().reshape(-1, blocks.shape[-1])
    s0 = s0.reshape(-1, 1)
    live = (~nan_block.reshape(-1, 1)) & (a.amax(dim=-1, keepdim=True) > 0)
    best = s0.clone()
    idx = live.squeeze(-1).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return best.reshape(*lead, 1), nan_block
    a_l, s0_l = a[idx], s0[idx]
    all_rows = torch.arange(a_l.shape[0], device=a.device)

    def chunked(fn, rows: Tensor, s: Tensor) -> Tensor:
        if rows.numel() == 0:
            return torch.empty(0, 1, dtype=torch.float64, device=a.device)
        return torch.cat([fn(rows[i:i + _CHUNK_ROWS], s[i:i + _CHUNK_ROWS])
                          for i in range(0, rows.numel(), _CHUNK_ROWS)])

    sse = lambda rows, s: _sse(a_l[rows], s, fmt, q.round_mode)  # noqa: E731
    sse0 = chunked(sse, all_rows, s0_l)
    objective = sse if weighted is None else (lambda rows, s: weighted(idx[rows], s))
    err = sse0.clone() if weighted is None else chunked(objective, all_rows, s0_l)
    choice = s0_l.clone()

    def consider(rows: Tensor, s: Tensor) -> None:
        e = chunked(objective, rows, s)
        better = (e < err[rows]).squeeze(-1)
        rows, s, e = rows[better], s[better], e[better]
        err[rows] = e
        choice[rows] = s

    up = (s0_l + 1 <= q.k_max).squeeze(-1)
    consider(all_rows[up], s0_l[up] + 1)
    bound = err if weighted is None else sse0  # the MSE walk tightens as err falls; Hessian uses floor's SSE
    for rows, s in _candidates_below(a_l, s0_l, bound, q.k_max, fmt):
        consider(rows, s)
    best[idx] = choice
    return best.reshape(*lead, 1), nan_block


def _scales_from(s: Tensor, nan_block: Tensor, qdim: int) -> Tensor:
    """Float32 power-of-two scales in ``pack``'s scale layout (NaN for NaN blocks)."""
    scale = torch.where(nan_block, float("nan"), pow2(s)).squeeze(-1)
    return scale.movedim(-1, qdim).contiguous()


def _quant_dequant_at(x: Tensor, q: QType, qdim: int, exps_fn) -> Tensor:
    """The reference's numbers at exponents ``exps_fn(blocks) -> (s, nan_block)``; x's shape and dtype."""
    if x.numel() == 0:
        return x.clone()
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    blocks, restore = to_blocks(x32, qdim, q.blk_size)
    s, nan_block = exps_fn(blocks)
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    magnitude = _dequant(blocks.abs(), s, fmt, q.round_mode).masked_fill(nan_block, float("nan"))
    out = torch.where(blocks < 0, -magnitude, magnitude)
    return saturating_cast(restore(out), x.dtype).reshape(x.shape)


def mse_scales(x: Tensor, qtype: QType | str) -> Tensor:
    """Per block, the power-of-two scale minimising the block's squared quantization error.

    ``qtype`` is an MX block float (``mxfp4``, ``e2m1k8b32``, any ``e<E>m<M>k<K>b<B>``); its scale mode is
    ignored. Returns float32 scales ``2^s`` in ``fakequant.packing.pack``'s scale layout (``x``'s shape with
    ``qtype.q_dim`` replaced by the number of blocks), NaN for NaN blocks.
    """
    q = _mx_qtype(qtype, "mse_scales")
    qdim = check_input(x, q)
    if x.numel() == 0:
        shape = list(x.shape)
        shape[qdim] = -(-shape[qdim] // q.blk_size)
        return torch.empty(shape, dtype=torch.float32, device=x.device)
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    blocks, _ = to_blocks(x32, qdim, q.blk_size)
    s, nan_block = _search(blocks, q)
    return _scales_from(s, nan_block, qdim)


def quant_dequant_mse(x: Tensor, qtype: QType | str) -> Tensor:
    """``quant_dequant(x, qtype)`` with each block at its MSE-optimal scale (``mse_scales``)."""
    q = _mx_qtype(qtype, "quant_dequant_mse")
    qdim = check_input(x, q)
    return _quant_dequant_at(x, q, qdim, lambda blocks: _search(blocks, q))


def quant_dequant_scaled(x: Tensor, qtype: QType | str, scales: Tensor) -> Tensor:
    """``x`` quantized with ``qtype``'s element format at the given power-of-two block ``scales`` (the layout
    of ``mse_scales``; NaN marks a NaN block). Equal bit for bit to ``unpack(pack(x, q, scales=scales))``."""
    from .packing import _scales_to_exponents

    q = _mx_qtype(qtype, "quant_dequant_scaled")
    qdim = check_input(x, q)

    def exps(blocks: Tensor):
        s, nan_block = _scales_to_exponents(scales.movedim(qdim, -1), q, blocks.shape[:-1])
        return s, nan_block | ~torch.isfinite(blocks.abs().amax(dim=-1, keepdim=True))

    return _quant_dequant_at(x, q, qdim, exps)


# --------------------------------------------------------------------------------------------------------
# Hessian-weighted search


def block_hessians(X: Tensor, block: int) -> Tensor:
    """``H_j = X_j^T X_j`` (float32 ``[ceil(K / block), block, block]``) for the column blocks ``X_j`` of the
    activations ``X`` (``[..., K]``, leading dims are tokens); a last partial block is zero-padded."""
    if X.dim() < 1:
        raise ValueError("X must have a last (feature) dimension")
    k = X.shape[-1]
    x = X.reshape(-1, k).to(torch.float32)
    pad = (-k) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    xb = x.reshape(x.shape[0], -1, block).transpose(0, 1)  # [n_blocks, T, B]
    return xb.transpose(1, 2) @ xb  # [n_blocks, B, B]


def _check_weight(W: Tensor, q: QType) -> None:
    if W.dim() != 2:
        raise ValueError(f"hessian_scales needs a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    if q.q_dim % 2 != 1:
        raise ValueError(
            f"hessian_scales quantizes along in_features (the last axis, dim=-1), got dim={q.q_dim}: "
            f"the Hessian weighs the columns that multiply the same activations"
        )


def hessian_error(W: Tensor, Wq: Tensor, H_blocks: Tensor) -> Tensor:
    """Per-block weighted error ``(w - q)^T H_j (w - q)`` (float64 ``[out, n_blocks]``) of ``W`` vs ``Wq``."""
    n_blocks, block = H_blocks.shape[0], H_blocks.shape[-1]
    r = (W.double() - Wq.double())
    pad = n_blocks * block - r.shape[-1]
    if pad:
        r = torch.nn.functional.pad(r, (0, pad))
    r = r.reshape(r.shape[0], n_blocks, block)
    return torch.einsum("njb,jab,nja->nj", r, H_blocks.double(), r)


def hessian_scales(W: Tensor, X: Tensor | None = None, H_blocks: Tensor | None = None,
                   qtype: QType | str = "mxfp4") -> Tensor:
    """Per block of the weight ``W`` (``[out, in]``, blocks along ``in``), the power-of-two scale minimising
    the Hessian-weighted error ``(w - q)^T H_j (w - q)``, among the scales seed 001's bounds leave viable.

    ``H_blocks`` (``[ceil(in / B), B, B]``) or the activations ``X`` (``[..., in]``, giving
    ``block_hessians(X, B)``) is required; ``H_blocks`` wins when both are given. Returns float32 scales
    ``[out, ceil(in / B)]`` (NaN for NaN blocks), usable with ``quant_dequant_scaled`` and ``pack``.
    """
    q = _mx_qtype(qtype, "hessian_scales")
    _check_weight(W, q)
    block = q.blk_size
    n_blocks = -(-W.shape[1] // block)
    if H_blocks is None:
        if X is None:
            raise ValueError("hessian_scales needs X (activations [..., in_features]) or H_blocks")
        if X.shape[-1] != W.shape[1]:
            raise ValueError(f"X has {X.shape[-1]} features, W has in_features={W.shape[1]}")
        H_blocks = block_hessians(X, block)
    if H_blocks.shape != (n_blocks, block, block):
        raise ValueError(f"H_blocks must have shape {(n_blocks, block, block)}, got {tuple(H_blocks.shape)}")
    H = H_blocks.to(device=W.device, dtype=torch.float64)
    w32 = W.to(torch.float32)
    blocks, _ = to_blocks(w32, 1, block)  # [out, n_blocks, B]
    rows_per_out = n_blocks  # block row r of the flattened [out * n_blocks, B] is column block r % n_blocks
    a = blocks.reshape(-1, block)
    signs = torch.where(a < 0, -1.0, 1.0).double()
    fmt = ElementFormat(q.exp_bits, q.man_bits)

    def weighted(rows: Tensor, s: Tensor) -> Tensor:
        x = a[rows]
        r = x.double() - signs[rows] * _dequant(x.abs(), s, fmt, q.round_mode).double()
        Hr = torch.bmm(H[rows % rows_per_out], r.unsqueeze(-1)).squeeze(-1)
        return (r * Hr).sum(dim=-1, keepdim=True)

    s, nan_block = _search(blocks, q, weighted)
    return _scales_from(s, nan_block, 1)


# --------------------------------------------------------------------------------------------------------
# The yardstick


def naive_mse_scales(x: Tensor, qtype: QType | str) -> Tensor:
    """The plain search: every E8M0 scale 2^-127..2^127 inside the QType's window, tried on every block, the
    smallest squared error kept (ties to the smaller scale). Slow; for tests and the speed comparison."""
    q = _mx_qtype(qtype, "naive_mse_scales")
    qdim = check_input(x, q)
    blocks, _ = to_blocks(x.to(torch.float32), qdim, q.blk_size)
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    s_floor, nan_block = mx_block_exponents(blocks, q, "floor")
    a = blocks.abs()
    best_err = torch.full(a.shape[:-1] + (1,), float("inf"), dtype=torch.float64)
    best = torch.zeros_like(s_floor)
    for e in range(-q.k_max, q.k_max + 1):
        s = torch.full_like(s_floor, e)
        err = _sse(a, s, fmt, q.round_mode)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    zero = a.amax(dim=-1, keepdim=True) == 0
    best = torch.where(zero, s_floor, best)
    return _scales_from(best, nan_block, qdim)
