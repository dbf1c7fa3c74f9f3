"""Straight-through-estimator autograd functions: every GEMM on fake-quantized operands.

Each function quantizes the operands of each of its GEMMs (fprop, dgrad, wgrad) with the formats a
``FakeQuantConfig`` names, runs the GEMM in high precision with the same torch op plain torch uses, and
passes gradients straight through the rounding. With ``fidelity="faithful"`` (the default) every operand is
quantized for every GEMM **from its high-precision value**, along that GEMM's reduction dimension
(DESIGN.md, GEMM table); ``fidelity="reference"`` quantizes each tensor along its last dimension.

Rules every function here follows:

* forward saves only the high-precision inputs (what plain torch saves), never quantized copies; backward
  re-quantizes;
* the output dtype is the one torch would return: the inputs' dtype, or under ``torch.autocast`` (CPU or
  CUDA) the autocast dtype: inputs are cast first, exactly as autocast would, then quantized;
* a role whose format is ``None`` (or a cast that is exact for the tensor's dtype, such as ``fp32``) is not
  touched, so an all-``None`` config gives bit-for-bit the forward and backward of plain torch.

Every quantization goes through ``fakequant.dispatch.quant_dequant`` so that Triton/NPU kernels plug in.

Observers (``fakequant.observe``): each function takes an optional ``ObserverSite`` (``None`` = no observers,
then nothing else runs) and, after quantizing an operand, forward or backward, calls its observers with the
layer, GEMM, role, format, high-precision operand and quantized operand.

Public: ``quant_linear``, ``quant_matmul``, ``quant_bmm``, ``quant_baddbmm``, ``quant_attention``,
``quant_ste``, ``GemmPlan``, ``gemm_plan``, ``AttentionPlan``, ``attention_plan``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FakeQuantConfig
from .dispatch import quant_dequant, quant_dequant_pair, quant_dequant_pair_two, quant_dequant_two
from .observe import ObserverSite
from .qtype import QType

__all__ = [
    "quant_linear", "quant_matmul", "quant_bmm", "quant_baddbmm", "quant_attention", "quant_ste",
    "GemmPlan", "gemm_plan", "AttentionPlan", "attention_plan",
]

# The plain ops, looked up once: ``patch_functional`` replaces the torch attributes while it is active,
# and the functions below must keep calling the originals.
_matmul = torch.matmul
_bmm = torch.bmm
_baddbmm = torch.baddbmm
_linear = F.linear
_sdpa = F.scaled_dot_product_attention

# A cast round trip that is exact for these input dtypes is skipped (no copy, bitwise plain torch).
_EXACT_CASTS = {
    "fp32": (torch.float32, torch.bfloat16, torch.float16),
    "bf16": (torch.bfloat16,),
    "fp16": (torch.float16,),
}


class GemmPlan(NamedTuple):
    """The format of each operand of each GEMM of ``C = A·B``: a canonical QType string with its axis
    (``"mxfp4:dim=-2"``), or ``None`` = high precision. Strings keep the plan a constant for torch.compile.

    A: [..., M, K] (role ``input``), B: [..., K, N] (role ``weight``), dC: [..., M, N] (``grad_output``).
    For a linear layer A = X and B = Wᵀ with W stored as [N, K], so B's axes are given on W.
    """

    a_fprop: str | None
    b_fprop: str | None
    g_dgrad: str | None
    b_dgrad: str | None
    g_wgrad: str | None
    a_wgrad: str | None


_PLAN_ROLES = GemmPlan(
    ("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output"), ("dgrad", "weight"),
    ("wgrad", "grad_output"), ("wgrad", "input"),
)
# Reduction axis of each operand per GEMM (DESIGN.md): fprop reduces K, dgrad N, wgrad M.
_PLAN_AXES = {
    # A [.., M, K]: K = -1, M = -2.  B [.., K, N]: K = -2, N = -1.  dC [.., M, N]: N = -1, M = -2.
    ("matmul", "faithful"): GemmPlan(-1, -2, -1, -1, -2, -2),
    # W [N, K]: K = -1, N = -2.  X and dY are folded to [M, K] and [M, N].
    ("linear", "faithful"): GemmPlan(-1, -1, -1, -2, -2, -2),
    # Every tensor along its own last dimension, whatever the GEMM (the earlier library's behaviour).
    ("matmul", "reference"): GemmPlan(-1, -1, -1, -1, -1, -1),
    ("linear", "reference"): GemmPlan(-1, -1, -1, -1, -1, -1),
}


def _axis(q: QType | None, axis: int) -> str | None:
    return None if q is None else str(q.dim(axis))


@functools.lru_cache(maxsize=256)
def gemm_plan(config: FakeQuantConfig, kind: str = "linear") -> GemmPlan:
    """The per-GEMM operand formats of ``config`` for a ``"linear"`` layer or a ``"matmul"``."""
    axes = _PLAN_AXES[(kind, config.fidelity)]
    return GemmPlan(*(_axis(config.format_for(g, r), ax) for (g, r), ax in zip(_PLAN_ROLES, axes)))


class AttentionPlan(NamedTuple):
    """Formats for ``quant_attention``.

    SDPA path (``attn_probs`` unset): q, k, v quantized once for the forward GEMMs (q, k along the head dim,
    v along the key axis, the reduction of P·V), dO along the head dim; the SDPA kernel reuses them in
    backward. Explicit path (``attn_probs`` set): ``scores`` is S = Q·Kᵀ and ``context`` is O = P·V, each a
    full per-GEMM plan (dS, the gradient of the scores, stays in high precision).
    """

    query: str | None
    key: str | None
    value: str | None
    grad_attn_output: str | None
    scores: GemmPlan | None
    context: GemmPlan | None


@functools.lru_cache(maxsize=256)
def attention_plan(config: FakeQuantConfig) -> AttentionPlan:
    q, k, v, p, do = config.query, config.key, config.value, config.attn_probs, config.grad_attn_output
    if config.fidelity == "reference":
        # Each tensor along its own last dim: k's last dim is the second-to-last of Kᵀ.
        scores = GemmPlan(_axis(q, -1), _axis(k, -2), None, _axis(k, -2), None, _axis(q, -1))
        context = GemmPlan(_axis(p, -1), _axis(v, -1), _axis(do, -1), _axis(v, -1), _axis(do, -1), _axis(p, -1))
        sdpa = (_axis(q, -1), _axis(k, -1), _axis(v, -1), _axis(do, -1))
    else:
        # S = Q·Kᵀ, Q: [.., L, E], Kᵀ: [.., E, S]: fprop reduces E, dgrad (dQ = dS·K) S, wgrad (dKᵀ = Qᵀ·dS) L.
        scores = GemmPlan(_axis(q, -1), _axis(k, -2), None, _axis(k, -1), None, _axis(q, -2))
        # O = P·V, P: [.., L, S], V: [.., S, Ev]: fprop reduces S, dgrad (dP = dO·Vᵀ) Ev, wgrad (dV = Pᵀ·dO) L.
        context = GemmPlan(_axis(p, -1), _axis(v, -2), _axis(do, -1), _axis(v, -1), _axis(do, -2), _axis(p, -2))
        sdpa = (_axis(q, -1), _axis(k, -1), _axis(v, -2), _axis(do, -1))
    if p is None:
        return AttentionPlan(*sdpa, None, None)
    return AttentionPlan(None, None, None, None, scores, context)


# ------------------------------------------------------------------------------------------- helpers
def _quantizes(x: Tensor, q: str | None) -> bool:
    """False for ``None`` and for a cast that is exact for ``x``'s dtype: then ``x`` is used as it is."""
    return q is not None and x.dtype not in _EXACT_CASTS.get(q.split(":", 1)[0], ())


def _q(x: Tensor, q: str | None) -> Tensor:
    """Fake-quantize ``x`` with format ``q`` (axis included); ``None`` and exact casts return ``x`` itself."""
    if not _quantizes(x, q):
        return x
    # The custom op only while torch.compile traces; eager calls skip its dispatch (tens of µs per call).
    if torch.compiler.is_compiling():
        return torch.ops.fakequant.gemm_operand_qdq(x, q)
    return _quantize_operand(x, q)


def _q_pair(x: Tensor, q_a: str, q_b: str) -> tuple[Tensor, Tensor]:
    """``(_q(x, q_a), _q(x, q_b))`` in one pass over ``x`` where the backend fuses them."""
    if torch.compiler.is_compiling():
        return torch.ops.fakequant.gemm_operand_qdq_pair(x, q_a, q_b)
    return _quantize_operand_pair(x, q_a, q_b)


def _qo(x: Tensor, q: str | None, site: ObserverSite | None, gemm: str, operand: int) -> Tensor:
    """``_q``, then tell the observers of ``site`` (if any): ``operand`` 0 = A, 1 = B, 2 = dC of C = A·B."""
    y = _q(x, q)
    if site is not None and q is not None:
        site.notify(gemm, site.roles[operand], q, x, y)
    return y


def _qo_two(a: Tensor, q_a: str | None, b: Tensor, q_b: str | None, site: ObserverSite | None,
            gemm: str | tuple[str, str], operands: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """``(_qo(a, q_a, ...), _qo(b, q_b, ...))`` with one kernel launch for both where the backend fuses
    them (``dispatch.quant_dequant_two``): a GEMM's two operands (or, in backward, the two operands that
    dgrad and wgrad quantize from saved tensors). ``gemm``: the GEMM of each, or one for both."""
    gemm_a, gemm_b = (gemm, gemm) if isinstance(gemm, str) else gemm
    if not (_quantizes(a, q_a) and _quantizes(b, q_b)):
        return _qo(a, q_a, site, gemm_a, operands[0]), _qo(b, q_b, site, gemm_b, operands[1])
    if torch.compiler.is_compiling():
        ya, yb = torch.ops.fakequant.gemm_operands_qdq_two(a, q_a, b, q_b)
    else:
        ya, yb = _quantize_operands_two(a, q_a, b, q_b)
    if site is not None:
        site.notify(gemm_a, site.roles[operands[0]], q_a, a, ya)
        site.notify(gemm_b, site.roles[operands[1]], q_b, b, yb)
    return ya, yb


def _qo_backward(dy: Tensor, weight: Tensor, x: Tensor, plan: GemmPlan, site: ObserverSite | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every backward operand of a Linear, all quantized: dY for dgrad and wgrad, W for dgrad, X for wgrad,
    in one kernel launch where the backend fuses them (``dispatch.quant_dequant_pair_two``)."""
    if torch.compiler.is_compiling():
        outs = torch.ops.fakequant.gemm_backward_qdq(dy, plan.g_dgrad, plan.g_wgrad, weight, plan.b_dgrad, x,
                                                     plan.a_wgrad)
    else:
        outs = _quantize_backward(dy, plan.g_dgrad, plan.g_wgrad, weight, plan.b_dgrad, x, plan.a_wgrad)
    if site is not None:
        for (gemm, operand, q, t), y in zip((("dgrad", 2, plan.g_dgrad, dy), ("wgrad", 2, plan.g_wgrad, dy),
                                            ("dgrad", 1, plan.b_dgrad, weight), ("wgrad", 0, plan.a_wgrad, x)), outs):
            site.notify(gemm, site.roles[operand], q, t, y)
    return outs


def _qo_grad(g: Tensor, plan: GemmPlan, site: ObserverSite | None, dgrad: bool, wgrad: bool
             ) -> tuple[Tensor | None, Tensor | None]:
    """``grad_output`` for dgrad (along N) and wgrad (along M), each only if needed. When both are quantized
    they come from one fused pass over ``g`` where the backend has one (``dispatch.quant_dequant_pair``),
    bit for bit the two separate quantizations."""
    q_d, q_w = (plan.g_dgrad if dgrad else None), (plan.g_wgrad if wgrad else None)
    if not (_quantizes(g, q_d) and _quantizes(g, q_w)):
        return (_qo(g, q_d, site, "dgrad", 2) if dgrad else None), (_qo(g, q_w, site, "wgrad", 2) if wgrad else None)
    g_d, g_w = _q_pair(g, q_d, q_w)
    if site is not None:
        site.notify("dgrad", site.roles[2], q_d, g, g_d)
        site.notify("wgrad", site.roles[2], q_w, g, g_w)
    return g_d, g_w


# depth > 0 while a quantizer runs, so that patch_functional leaves any torch op it calls alone.
_QUANTIZING = threading.local()


@functools.lru_cache(maxsize=1024)
def _parse(desc: str) -> QType:
    return QType(desc)


# ``quant_dequant`` as one opaque op, so that torch.compile traces the autograd functions without a graph
# break and runs the quantizer (whichever backend dispatch picks) exactly as in eager mode.
@contextlib.contextmanager
def _quantizing():
    """Mark this thread as inside a quantizer (``_QUANTIZING.depth``) for the duration."""
    _QUANTIZING.depth = getattr(_QUANTIZING, "depth", 0) + 1
    try:
        yield
    finally:
        _QUANTIZING.depth -= 1


# The results are made contiguous: GEMM and SDPA kernels choose their path by stride.
def _quantize_operand(x: Tensor, qtype: str) -> Tensor:
    with _quantizing():
        return quant_dequant(x, _parse(qtype)).contiguous()


def _quantize_operand_pair(x: Tensor, qtype_a: str, qtype_b: str) -> tuple[Tensor, Tensor]:
    with _quantizing():
        return tuple(t.contiguous() for t in quant_dequant_pair(x, _parse(qtype_a), _parse(qtype_b)))


def _quantize_operands_two(a: Tensor, q_a: str, b: Tensor, q_b: str) -> tuple[Tensor, Tensor]:
    with _quantizing():
        return tuple(t.contiguous() for t in quant_dequant_two(a, _parse(q_a), b, _parse(q_b)))


def _quantize_backward(dy: Tensor, q_dd: str, q_dw: str, w: Tensor, q_w: str, x: Tensor, q_x: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _quantizing():
        outs = quant_dequant_pair_two(dy, _parse(q_dd), _parse(q_dw), w, _parse(q_w), x, _parse(q_x))
        return tuple(t.contiguous() for t in outs)


@torch.library.custom_op("fakequant::gemm_backward_qdq", mutates_args=())
def _gemm_backward_qdq(dy: Tensor, q_dd: str, q_dw: str, w: Tensor, q_w: str, x: Tensor, q_x: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _quantize_backward(dy, q_dd, q_dw, w, q_w, x, q_x)


@_gemm_backward_qdq.register_fake
def _(dy: Tensor, q_dd: str, q_dw: str, w: Tensor, q_w: str, x: Tensor, q_x: str
      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (dy, dy, w, x))


@torch.library.custom_op("fakequant::gemm_operands_qdq_two", mutates_args=())
def _gemm_operands_qdq_two(a: Tensor, q_a: str, b: Tensor, q_b: str) -> tuple[Tensor, Tensor]:
    return _quantize_operands_two(a, q_a, b, q_b)


@_gemm_operands_qdq_two.register_fake
def _(a: Tensor, q_a: str, b: Tensor, q_b: str) -> tuple[Tensor, Tensor]:
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device),
            torch.empty(b.shape, dtype=b.dtype, device=b.device))


@torch.library.custom_op("fakequant::gemm_operand_qdq", mutates_args=())
def _gemm_operand_qdq(x: Tensor, qtype: str) -> Tensor:
    return _quantize_operand(x, qtype)


@_gemm_operand_qdq.register_fake
def _(x: Tensor, qtype: str) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fakequant::gemm_operand_qdq_pair", mutates_args=())
def _gemm_operand_qdq_pair(x: Tensor, qtype_a: str, qtype_b: str) -> tuple[Tensor, Tensor]:
    return _quantize_operand_pair(x, qtype_a, qtype_b)


@_gemm_operand_qdq_pair.register_fake
def _(x: Tensor, qtype_a: str, qtype_b: str) -> tuple[Tensor, Tensor]:
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _autocast_cast(*tensors: Tensor | None) -> tuple[tuple[Tensor | None, ...], str | None]:
    """Cast the floating inputs the way ``torch.autocast`` casts the inputs of a matmul-like op.

    Returns the tensors and the device type whose autocast must be disabled around the function (so
    that nothing inside is cast again), or ``None`` when autocast is off. fp64 tensors are left alone, as
    autocast leaves them.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, None
    dtype = torch.get_autocast_dtype(device_type)
    cast: list[Tensor | None] = []
    for t in tensors:
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            cast.append(t)
            continue
        # autocast casts a leaf that requires grad once and reuses the copy (its weight cache): q, q, q in
        # self-attention then share one copy, and their gradients add up in the autocast dtype, as in torch.
        same = [c for c, orig in zip(cast, tensors) if orig is t and t.is_leaf and t.requires_grad]
        cast.append(same[0] if same else t.to(dtype))
    return tuple(cast), device_type


def _no_autocast(device_type: str | None):
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _check_config(config: object, where: str) -> FakeQuantConfig:
    if not isinstance(config, FakeQuantConfig):
        raise TypeError(f"{where}: config must be a FakeQuantConfig, got {type(config).__name__}")
    return config


def _check_tensor(x: object, name: str, where: str, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{where}: {name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------- linear
class _QuantLinear(torch.autograd.Function):
    # Y = X·Wᵀ + b with X: [M, K] (leading dims folded into M), W: [N, K], Y: [M, N]
    #   fprop: Y  = Q(X along K) · Q(W along K)ᵀ + b
    #   dgrad: dX = Q(dY along N) · Q(W along N)
    #   wgrad: dW = Q(dY along M)ᵀ · Q(X along M)
    #          db = Σ_M dY        (a reduction, not a GEMM: high precision)
    # The ops mirror plain torch's (F.linear forward; mm for dgrad/wgrad as addmm/mm backward does).

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: GemmPlan,
                site: ObserverSite | None = None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.site = plan, site
        ctx.bias_shape = None if bias is None else bias.shape
        xq, wq = _qo_two(x, plan.a_fprop, weight, plan.b_fprop, site, "fprop")
        return _linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        plan, site = ctx.plan, ctx.site
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, N]
        dx = dw = db = None
        dgrad, wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if dgrad and wgrad and all(_quantizes(t, q) for t, q in ((dy2, plan.g_dgrad), (dy2, plan.g_wgrad),
                                                                 (weight, plan.b_dgrad), (x2, plan.a_wgrad))):
            dy_d, dy_w, w_d, x_w = _qo_backward(dy2, weight, x2, plan, site)
        else:
            dy_d, dy_w = _qo_grad(dy2, plan, site, dgrad, wgrad)
            w_d, x_w = _qo_two(weight, plan.b_dgrad if dgrad else None, x2, plan.a_wgrad if wgrad else None, site,
                               ("dgrad", "wgrad"), operands=(1, 0))
        if dgrad:
            dx = dy_d.mm(w_d).view(x.shape)  # [M, K] -> x's shape
        if wgrad:
            dw = dy_w.t().mm(x_w)  # [N, K]
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            db = dy2.sum_to_size(ctx.bias_shape)
        return dx, dw, db, None, None  # None: plan, site


def quant_linear(x: Tensor, weight: Tensor, bias: Tensor | None, config: FakeQuantConfig) -> Tensor:
    """``F.linear(x, weight, bias)`` with fprop, dgrad and wgrad on fake-quantized operands."""
    _check_config(config, "quant_linear")
    return _apply_linear(x, weight, bias, gemm_plan(config, "linear"))


def _apply_linear(x: Tensor, weight: Tensor, bias: Tensor | None, plan: GemmPlan,
                  site: ObserverSite | None = None) -> Tensor:
    _check_tensor(x, "x", "quant_linear")
    _check_tensor(weight, "weight", "quant_linear", 2)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"quant_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match "
            f"(weight must be [out_features, in_features] with in_features = x.shape[-1])"
        )
    (x, weight, bias), device_type = _autocast_cast(x, weight, bias)
    with _no_autocast(device_type):
        return _QuantLinear.apply(x, weight, bias, plan, site)


# --------------------------------------------------------------------------------------------- matmul
class _QuantMatmul(torch.autograd.Function):
    # C = A·B with A: [..., M, K], B: [..., K, N], C: [..., M, N], batch dims broadcast as torch.matmul
    #   fprop: C  = Q(A along K) · Q(B along K)
    #   dgrad: dA = Q(dC along N) · Q(B along N)ᵀ      (summed over the dims A was broadcast along)
    #   wgrad: dB = Q(A along M)ᵀ · Q(dC along M)      (summed over the dims B was broadcast along)
    # When B is 2-D, torch.matmul folds A's leading dims into M, so do the GEMMs here (one mm each, as
    # plain torch's backward does) and wgrad's blocks run along the folded rows, as for a linear layer.

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, plan: GemmPlan, site: ObserverSite | None = None) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.plan, ctx.site = plan, site
        return _matmul(_qo(a, plan.a_fprop, site, "fprop", 0), _qo(b, plan.b_fprop, site, "fprop", 1))

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        plan, site = ctx.plan, ctx.site
        da = db = None
        if b.dim() == 2:
            g2 = g.reshape(-1, g.shape[-1])  # [M, N]
            g_d, g_w = _qo_grad(g2, plan, site, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            if ctx.needs_input_grad[0]:
                da = g_d.mm(_qo(b, plan.b_dgrad, site, "dgrad", 1).t()).view(a.shape)
            if ctx.needs_input_grad[1]:
                a2 = a.reshape(-1, a.shape[-1])  # [M, K]
                db = _qo(a2, plan.a_wgrad, site, "wgrad", 0).t().mm(g_w)
        else:
            g_d, g_w = _qo_grad(g, plan, site, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            if ctx.needs_input_grad[0]:
                da = _matmul(g_d, _qo(b, plan.b_dgrad, site, "dgrad", 1).mT).sum_to_size(a.shape)
            if ctx.needs_input_grad[1]:
                db = _matmul(_qo(a, plan.a_wgrad, site, "wgrad", 0).mT, g_w).sum_to_size(b.shape)
        return da, db, None, None  # None: plan, site


def quant_matmul(a: Tensor, b: Tensor, config: FakeQuantConfig) -> Tensor:
    """``torch.matmul(a, b)`` on fake-quantized operands: ``a`` plays ``input`` (reduced along its last
    dim), ``b`` plays ``weight`` (reduced along its second-to-last dim), the gradient ``grad_output``."""
    _check_config(config, "quant_matmul")
    return _apply_matmul(a, b, gemm_plan(config, "matmul"))


def _apply_matmul(a: Tensor, b: Tensor, plan: GemmPlan, site: ObserverSite | None = None) -> Tensor:
    _check_tensor(a, "a", "quant_matmul")
    _check_tensor(b, "b", "quant_matmul")
    if a.dim() == 1:  # a vector is one row: [K] -> [1, K]
        return _apply_matmul(a.unsqueeze(0), b, plan, site).squeeze(-2)
    if b.dim() == 1:  # a vector is one column: [K] -> [K, 1]
        return _apply_matmul(a, b.unsqueeze(-1), plan, site).squeeze(-1)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"quant_matmul: a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied")
    (a, b), device_type = _autocast_cast(a, b)
    with _no_autocast(device_type):
        return _QuantMatmul.apply(a, b, plan, site)


# ------------------------------------------------------------------------------------- bmm / baddbmm
class _QuantBmm(torch.autograd.Function):
    # C = A·B per batch, A: [Bt, M, K], B: [Bt, K, N]
    #   fprop: C  = Q(A along K) · Q(B along K)
    #   dgrad: dA = Q(dC along N) · Q(B along N)ᵀ
    #   wgrad: dB = Q(A along M)ᵀ · Q(dC along M)

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, plan: GemmPlan, site: ObserverSite | None = None) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.plan, ctx.site = plan, site
        return _bmm(_qo(a, plan.a_fprop, site, "fprop", 0), _qo(b, plan.b_fprop, site, "fprop", 1))

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        plan, site = ctx.plan, ctx.site
        da = db = None
        g_d, g_w = _qo_grad(g, plan, site, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.needs_input_grad[0]:
            da = g_d.bmm(_qo(b, plan.b_dgrad, site, "dgrad", 1).transpose(1, 2))
        if ctx.needs_input_grad[1]:
            db = _qo(a, plan.a_wgrad, site, "wgrad", 0).transpose(1, 2).bmm(g_w)
        return da, db, None, None  # None: plan, site


class _QuantBaddbmm(torch.autograd.Function):
    # out = beta·input + alpha·(A·B) per batch, A: [Bt, M, K], B: [Bt, K, N], input broadcast to [Bt, M, N]
    #   fprop: out    = beta·input + alpha · Q(A along K) · Q(B along K)
    #   dgrad: dA     = alpha · Q(dout along N) · Q(B along N)ᵀ
    #   wgrad: dB     = alpha · Q(A along M)ᵀ · Q(dout along M)
    #          dinput = beta · dout      (no GEMM: high precision)
    # Scaling by alpha/beta only when they differ from 1, as plain torch's backward does.

    @staticmethod
    def forward(ctx, inp: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float, plan: GemmPlan,
                site: ObserverSite | None = None) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.plan, ctx.site, ctx.beta, ctx.alpha, ctx.inp_shape = plan, site, beta, alpha, inp.shape
        return _baddbmm(inp, _qo(a, plan.a_fprop, site, "fprop", 0), _qo(b, plan.b_fprop, site, "fprop", 1),
                        beta=beta, alpha=alpha)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        plan, site, beta, alpha = ctx.plan, ctx.site, ctx.beta, ctx.alpha
        dinp = da = db = None
        if ctx.needs_input_grad[0]:
            dinp = _scaled(g, beta).sum_to_size(ctx.inp_shape)
        g_d, g_w = _qo_grad(g, plan, site, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if ctx.needs_input_grad[1]:
            da = _scaled(g_d.bmm(_qo(b, plan.b_dgrad, site, "dgrad", 1).transpose(1, 2)), alpha)
        if ctx.needs_input_grad[2]:
            db = _scaled(_qo(a, plan.a_wgrad, site, "wgrad", 0).transpose(1, 2).bmm(g_w), alpha)
        return dinp, da, db, None, None, None, None  # None: beta, alpha, plan, site


def _scaled(t: Tensor, s: float) -> Tensor:
    return t if s == 1 else t * s


def _check_batched(a: Tensor, b: Tensor, where: str) -> None:
    _check_tensor(a, "batch1", where, 3)
    _check_tensor(b, "batch2", where, 3)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(
            f"{where}: batch1 {tuple(a.shape)} and batch2 {tuple(b.shape)} must be [B, M, K] and [B, K, N]"
        )


def quant_bmm(a: Tensor, b: Tensor, config: FakeQuantConfig) -> Tensor:
    """``torch.bmm(a, b)`` on fake-quantized operands (``a`` = ``input`` role, ``b`` = ``weight`` role)."""
    _check_config(config, "quant_bmm")
    return _apply_bmm(a, b, gemm_plan(config, "matmul"))


def _apply_bmm(a: Tensor, b: Tensor, plan: GemmPlan, site: ObserverSite | None = None) -> Tensor:
    _check_batched(a, b, "quant_bmm")
    (a, b), device_type = _autocast_cast(a, b)
    with _no_autocast(device_type):
        return _QuantBmm.apply(a, b, plan, site)


def quant_baddbmm(
    input: Tensor, batch1: Tensor, batch2: Tensor, beta: float = 1.0, alpha: float = 1.0,
    config: FakeQuantConfig | None = None,
) -> Tensor:
    """``torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)`` on fake-quantized ``batch1``
    (``input`` role) and ``batch2`` (``weight`` role); ``input`` is added in high precision."""
    _check_config(config, "quant_baddbmm")
    return _apply_baddbmm(input, batch1, batch2, beta, alpha, gemm_plan(config, "matmul"))


def _apply_baddbmm(inp: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float, plan: GemmPlan,
                   site: ObserverSite | None = None) -> Tensor:
    _check_batched(a, b, "quant_baddbmm")
    if not isinstance(inp, Tensor):
        raise TypeError(f"quant_baddbmm: input must be a torch.Tensor, got {type(inp).__name__}")
    for name, s in (("beta", beta), ("alpha", alpha)):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"quant_baddbmm: {name} must be a number, got {type(s).__name__} ({s!r})")
    (inp, a, b), device_type = _autocast_cast(inp, a, b)
    with _no_autocast(device_type):
        return _QuantBaddbmm.apply(inp, a, b, beta, alpha, plan, site)


# ------------------------------------------------------------------------------------------------ STE
class _QuantSTE(torch.autograd.Function):
    # y = Q_fwd(x); dx = Q_bwd(dy) (or dy unchanged): the straight-through estimator of one tensor.
    # Observers see x as operand A of fprop and dy as operand dC of dgrad (site.roles name them).

    @staticmethod
    def forward(ctx, x: Tensor, fwd: str | None, bwd: str | None, site: ObserverSite | None = None) -> Tensor:
        ctx.bwd, ctx.site = bwd, site
        y = _qo(x, fwd, site, "fprop", 0)
        return x.view_as(x) if y is x else y

    @staticmethod
    def backward(ctx, dy: Tensor):
        return _qo(dy, ctx.bwd, ctx.site, "dgrad", 2), None, None, None  # None: fwd, bwd, site


def quant_ste(x: Tensor, forward: QType | str | None, backward: QType | str | None = None) -> Tensor:
    """Fake-quantize ``x`` with ``forward``; the gradient passes straight through, quantized with
    ``backward`` when given. Each QType's own axis (``q.dim(d)``, default -1) is used."""
    _check_tensor(x, "x", "quant_ste", 0)
    fwd = _as_qtype(forward, "forward")
    bwd = _as_qtype(backward, "backward")
    if fwd is None and bwd is None:
        return x
    return _QuantSTE.apply(x, fwd, bwd)


def _as_qtype(q: QType | str | None, name: str) -> str | None:
    if q is None:
        return None
    if isinstance(q, QType):
        return str(q)
    if isinstance(q, str):
        return str(QType(q))
    raise TypeError(f"{name} format must be a QType, a format string or None, got {type(q).__name__}")


# ------------------------------------------------------------------------------------------ attention
def quant_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    config: FakeQuantConfig, observer_site: ObserverSite | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` on fake-quantized q, k, v (roles ``query``, ``key``, ``value``),
    with the gradient of the output quantized in the ``grad_attn_output`` role.

    With ``attn_probs`` set, attention is computed explicitly (S = Q·Kᵀ·scale, mask, softmax, dropout,
    O = P·V) so that P and every operand of the four backward GEMMs are quantized per GEMM; this stores
    P ([..., L, S]) for backward, like SDPA's math path.

    ``observer_site``: where observers see the operands (``patch_functional`` passes it); ``None`` = none.
    """
    _check_config(config, "quant_attention")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name, "quant_attention", 2)
    plan = attention_plan(config)
    (query, key, value, attn_mask), device_type = _autocast_cast(query, key, value, attn_mask)
    with _no_autocast(device_type):
        if plan.scores is None:
            site = observer_site
            q = _ste(query, plan.query, None, site and site.with_roles("query", None, None))
            k = _ste(key, plan.key, None, site and site.with_roles("key", None, None))
            v = _ste(value, plan.value, None, site and site.with_roles("value", None, None))
            out = _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
            return _ste(out, None, plan.grad_attn_output, site and site.with_roles(None, None, "grad_attn_output"))
        return _explicit_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, plan,
                                   observer_site)


def _ste(x: Tensor, fwd: str | None, bwd: str | None, site: ObserverSite | None) -> Tensor:
    return x if fwd is None and bwd is None else _QuantSTE.apply(x, fwd, bwd, site)


def _explicit_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool,
    scale: float | None, enable_gqa: bool, plan: AttentionPlan, site: ObserverSite | None = None,
) -> Tensor:
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:  # repeat each key/value head for its group of query heads: [.., Hkv, S, E] -> [.., H, S, E]
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scores_site = site and site.with_roles("query", "key", None)  # dS stays in high precision
    scores = _QuantMatmul.apply(query, key.mT, plan.scores, scores_site) * scale  # [.., L, S]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    context_site = site and site.with_roles("attn_probs", "value", "grad_attn_output")
    return _QuantMatmul.apply(probs, value, plan.context, context_site)  # [.., L, Ev]
