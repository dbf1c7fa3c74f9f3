"""The STE autograd functions against hand-built GEMMs, bit for bit.

Every expected value here is built the way DESIGN.md's GEMM table says: ``quant_dequant`` of each operand
along that GEMM's reduction axis, then the plain torch op. Six different formats are used for the six
operands (fprop X, W; dgrad dY, W; wgrad dY, X) so that a role or axis mix-up cannot go unnoticed, and the
shapes are chosen so that every axis has a partial block (K = 48, N = 36, M = 40 with blocks of 32 / 16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fakequant import QType, quant_dequant
from fakequant.autograd import (
    attention_plan, gemm_plan, quant_attention, quant_baddbmm, quant_bmm, quant_linear, quant_matmul, quant_ste,
)
from fakequant.config import FakeQuantConfig

from .conftest import assert_bitwise_equal


DTYPES = [torch.float32, torch.bfloat16]
M, K, N = 40, 48, 36

# Roles only: one format per role, so each role's format reaches every GEMM it appears in.
ROLES_CFG = FakeQuantConfig(input="mxfp8e4m3:scale=floor", weight="mxfp4", grad_output="e5m2k8b16")
# Every operand of every GEMM in its own format (the four overrides on top of the three roles).
OVERRIDES_CFG = FakeQuantConfig(
    input="mxfp8e4m3:scale=floor", weight="mxfp4", grad_output="e5m2k8b16",
    input_for_wgrad="mxfp6e2m3", weight_for_dgrad="mxfp6e3m2", grad_output_for_dgrad="e3m4k8b16",
    grad_output_for_wgrad="e2m1k8b16",
)
CONFIGS = {"roles": ROLES_CFG, "overrides": OVERRIDES_CFG}


def Q(t: torch.Tensor, cfg: FakeQuantConfig, gemm: str, role: str, axis: int) -> torch.Tensor:
    """Hand-built quantization of one GEMM operand: its format from the config, the axis from the table."""
    fmt = cfg.format_for(gemm, role)
    return t if fmt is None else quant_dequant(t, fmt.dim(axis))


def _leaf(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def _grads(out: torch.Tensor, g: torch.Tensor, *leaves):
    for leaf in leaves:
        if leaf is not None:
            leaf.grad = None
    out.backward(g)
    return [None if leaf is None else leaf.grad for leaf in leaves]


# --------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(M,), (2, M // 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_linear_faithful_matches_hand_built_gemms(dtype, lead, bias, cfg_name):
    cfg = CONFIGS[cfg_name]
    x, w = _leaf((*lead, K), dtype, 1), _leaf((N, K), dtype, 2)
    b = _leaf((N,), dtype, 3) if bias else None
    g = _leaf((*lead, N), dtype, 4).detach()
    y = quant_linear(x, w, b, cfg)
    dx, dw, db = _grads(y, g, x, w, b)

    x2, g2 = x.detach().reshape(-1, K), g.reshape(-1, N)  # [M, K], [M, N]
    w_ = w.detach()
    y_exp = F.linear(Q(x.detach(), cfg, "fprop", "input", -1), Q(w_, cfg, "fprop", "weight", -1), b)  # along K
    dx_exp = Q(g2, cfg, "dgrad", "grad_output", -1).mm(Q(w_, cfg, "dgrad", "weight", 0))  # along N
    dw_exp = Q(g2, cfg, "wgrad", "grad_output", 0).t().mm(Q(x2, cfg, "wgrad", "input", 0))  # along M
    assert_bitwise_equal(y, y_exp.detach())
    assert_bitwise_equal(dx, dx_exp.view(x.shape))
    assert_bitwise_equal(dw, dw_exp)
    if bias:
        assert_bitwise_equal(db, g2.sum(0))
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_reference_fidelity_quantizes_each_tensor_along_its_last_dim(dtype):
    cfg = ROLES_CFG.replace(fidelity="reference")
    x, w, b = _leaf((2, M // 2, K), dtype, 5), _leaf((N, K), dtype, 6), _leaf((N,), dtype, 7)
    g = _leaf((2, M // 2, N), dtype, 8).detach()
    y = quant_linear(x, w, b, cfg)
    dx, dw, _ = _grads(y, g, x, w, b)

    x2, g2, w_ = x.detach().reshape(-1, K), g.reshape(-1, N), w.detach()
    assert_bitwise_equal(y, F.linear(Q(x.detach(), cfg, "fprop", "input", -1), Q(w_, cfg, "fprop", "weight", -1), b)
                         .detach())
    assert_bitwise_equal(dx, Q(g2, cfg, "dgrad", "grad_output", -1).mm(Q(w_, cfg, "dgrad", "weight", -1)).view(x.shape))
    assert_bitwise_equal(dw, Q(g2, cfg, "wgrad", "grad_output", -1).t().mm(Q(x2, cfg, "wgrad", "input", -1)))
    # ... and that really is a different experiment from the faithful one.
    dx_f, dw_f, _ = _grads(quant_linear(x, w, b, ROLES_CFG), g, x, w, b)
    assert not torch.equal(dx, dx_f) and not torch.equal(dw, dw_f)


# --------------------------------------------------------------------------------------------- matmul
MATMUL_SHAPES = {
    "2d@2d": ((M, K), (K, N)),
    "3d@2d": ((2, M // 2, K), (K, N)),  # folded like torch.matmul: wgrad blocks run over all 40 rows
    "3d@3d": ((2, M // 2, K), (2, K, N)),
    "broadcast": ((3, 1, M // 2, K), (1, 2, K, N)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", list(MATMUL_SHAPES))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_matmul_faithful_matches_hand_built_gemms(dtype, shapes, cfg_name):
    cfg = CONFIGS[cfg_name]
    sa, sb = MATMUL_SHAPES[shapes]
    a, b = _leaf(sa, dtype, 11), _leaf(sb, dtype, 12)
    c = quant_matmul(a, b, cfg)
    g = _leaf(c.shape, dtype, 13).detach()
    da, db = _grads(c, g, a, b)

    a_, b_ = a.detach(), b.detach()
    c_exp = torch.matmul(Q(a_, cfg, "fprop", "input", -1), Q(b_, cfg, "fprop", "weight", -2))  # both along K
    if b.dim() == 2:
        a2, g2 = a_.reshape(-1, K), g.reshape(-1, N)
        da_exp = Q(g2, cfg, "dgrad", "grad_output", -1).mm(Q(b_, cfg, "dgrad", "weight", -1).t()).view(a.shape)
        db_exp = Q(a2, cfg, "wgrad", "input", 0).t().mm(Q(g2, cfg, "wgrad", "grad_output", 0))
    else:
        da_exp = torch.matmul(Q(g, cfg, "dgrad", "grad_output", -1), Q(b_, cfg, "dgrad", "weight", -1).mT)
        db_exp = torch.matmul(Q(a_, cfg, "wgrad", "input", -2).mT, Q(g, cfg, "wgrad", "grad_output", -2))
        da_exp, db_exp = da_exp.sum_to_size(a.shape), db_exp.sum_to_size(b.shape)
    assert_bitwise_equal(c, c_exp)
    assert_bitwise_equal(da, da_exp)
    assert_bitwise_equal(db, db_exp)


def test_matmul_vector_operands_are_a_row_and_a_column():
    cfg = ROLES_CFG
    a, b, v = _leaf((K,), torch.float32, 14), _leaf((K, N), torch.float32, 15), _leaf((K,), torch.float32, 16)
    row = quant_matmul(a, b, cfg)
    assert_bitwise_equal(row, quant_matmul(a.unsqueeze(0), b, cfg).squeeze(0))
    col = quant_matmul(b.mT, v, cfg)
    assert_bitwise_equal(col, quant_matmul(b.mT, v.unsqueeze(-1), cfg).squeeze(-1))
    assert row.shape == (N,) and col.shape == (N,)


# ---------------------------------------------------------------------------------------- bmm, baddbmm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_bmm_faithful_matches_hand_built_gemms(dtype, cfg_name):
    cfg = CONFIGS[cfg_name]
    a, b = _leaf((3, M, K), dtype, 21), _leaf((3, K, N), dtype, 22)
    g = _leaf((3, M, N), dtype, 23).detach()
    c = quant_bmm(a, b, cfg)
    da, db = _grads(c, g, a, b)
    a_, b_ = a.detach(), b.detach()
    assert_bitwise_equal(c, torch.bmm(Q(a_, cfg, "fprop", "input", -1), Q(b_, cfg, "fprop", "weight", -2)))
    assert_bitwise_equal(da, torch.bmm(Q(g, cfg, "dgrad", "grad_output", -1),
                                       Q(b_, cfg, "dgrad", "weight", -1).transpose(1, 2)))
    assert_bitwise_equal(db, torch.bmm(Q(a_, cfg, "wgrad", "input", -2).transpose(1, 2),
                                       Q(g, cfg, "wgrad", "grad_output", -2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize(
    "inp_shape,beta,alpha",
    [((3, M, N), 1.0, 1.0), ((M, N), 0.5, 0.25), ((1, M, N), 0.0, 1 / math.sqrt(K))],
    ids=["plain", "broadcast-scaled", "megatron"],
)
def test_baddbmm_faithful_matches_hand_built_gemms(dtype, cfg_name, inp_shape, beta, alpha):
    cfg = CONFIGS[cfg_name]
    inp, a, b = _leaf(inp_shape, dtype, 31), _leaf((3, M, K), dtype, 32), _leaf((3, K, N), dtype, 33)
    g = _leaf((3, M, N), dtype, 34).detach()
    c = quant_baddbmm(inp, a, b, beta, alpha, cfg)
    dinp, da, db = _grads(c, g, inp, a, b)

    a_, b_ = a.detach(), b.detach()
    c_exp = torch.baddbmm(inp.detach(), Q(a_, cfg, "fprop", "input", -1), Q(b_, cfg, "fprop", "weight", -2),
                          beta=beta, alpha=alpha)
    da_exp = torch.bmm(Q(g, cfg, "dgrad", "grad_output", -1), Q(b_, cfg, "dgrad", "weight", -1).transpose(1, 2))
    db_exp = torch.bmm(Q(a_, cfg, "wgrad", "input", -2).transpose(1, 2), Q(g, cfg, "wgrad", "grad_output", -2))
    scale = (lambda t, s: t if s == 1 else t * s)  # noqa: E731  (torch's maybe_multiply)
    assert_bitwise_equal(c, c_exp)
    assert_bitwise_equal(dinp, scale(g, beta).sum_to_size(inp_shape))
    assert_bitwise_equal(da, scale(da_exp, alpha))
    assert_bitwise_equal(db, scale(db_exp, alpha))


# ------------------------------------------------------------------------- all-None: plain torch exactly
NONE_CONFIGS = {
    "none": FakeQuantConfig(),
    "fp32": FakeQuantConfig(input="fp32", weight="fp32", grad_output="fp32", query="fp32", key="fp32",
                            value="fp32", grad_attn_output="fp32"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(NONE_CONFIGS))
@pytest.mark.parametrize("lead", [(M,), (2, M // 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_unquantized_linear_is_plain_torch(dtype, cfg_name, lead, bias):
    cfg = NONE_CONFIGS[cfg_name]
    x, w = _leaf((*lead, K), dtype, 41), _leaf((N, K), dtype, 42)
    b = _leaf((N,), dtype, 43) if bias else None
    g = _leaf((*lead, N), dtype, 44).detach()
    y = quant_linear(x, w, b, cfg)
    got = _grads(y, g, x, w, b)
    y_ref = F.linear(x, w, b)
    ref = _grads(y_ref, g, x, w, b)
    assert_bitwise_equal(y, y_ref)
    for actual, expected in zip(got, ref):
        if expected is not None:
            assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(NONE_CONFIGS))
@pytest.mark.parametrize("shapes", list(MATMUL_SHAPES))
def test_unquantized_matmul_is_plain_torch(dtype, cfg_name, shapes):
    cfg = NONE_CONFIGS[cfg_name]
    sa, sb = MATMUL_SHAPES[shapes]
    a, b = _leaf(sa, dtype, 51), _leaf(sb, dtype, 52)
    c = quant_matmul(a, b, cfg)
    g = _leaf(c.shape, dtype, 53).detach()
    got = _grads(c, g, a, b)
    c_ref = torch.matmul(a, b)
    ref = _grads(c_ref, g, a, b)
    assert_bitwise_equal(c, c_ref)
    for actual, expected in zip(got, ref):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(NONE_CONFIGS))
def test_unquantized_bmm_and_baddbmm_are_plain_torch(dtype, cfg_name):
    cfg = NONE_CONFIGS[cfg_name]
    inp, a, b = _leaf((3, M, N), dtype, 61), _leaf((3, M, K), dtype, 62), _leaf((3, K, N), dtype, 63)
    g = _leaf((3, M, N), dtype, 64).detach()
    got = _grads(quant_bmm(a, b, cfg), g, a, b)
    ref = _grads(torch.bmm(a, b), g, a, b)
    for actual, expected in zip(got, ref):
        assert_bitwise_equal(actual, expected)
    assert_bitwise_equal(quant_bmm(a, b, cfg), torch.bmm(a, b))
    for beta, alpha in [(1.0, 1.0), (0.0, 1 / math.sqrt(K)), (0.5, 2.0)]:
        c = quant_baddbmm(inp, a, b, beta, alpha, cfg)
        c_ref = torch.baddbmm(inp, a, b, beta=beta, alpha=alpha)
        assert_bitwise_equal(c, c_ref)
        got = _grads(c, g, inp, a, b)
        ref = _grads(c_ref, g, inp, a, b)
        for actual, expected in zip(got, ref):
            assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", list(NONE_CONFIGS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_unquantized_attention_is_plain_sdpa(dtype, cfg_name, causal):
    cfg = NONE_CONFIGS[cfg_name]
    q, k, v = (_leaf((2, 3, 20, 16), dtype, s) for s in (71, 72, 73))
    g = _leaf((2, 3, 20, 16), dtype, 74).detach()
    out = quant_attention(q, k, v, is_causal=causal, config=cfg)
    got = _grads(out, g, q, k, v)
    out_ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = _grads(out_ref, g, q, k, v)
    assert_bitwise_equal(out, out_ref)
    for actual, expected in zip(got, ref):
        assert_bitwise_equal(actual, expected)


# ------------------------------------------------------------------------------------------ attention
ATTN_CFG = FakeQuantConfig(query="mxfp8e4m3", key="e4m3k8b16", value="mxfp6e2m3", grad_attn_output="e5m2k8b16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fidelity", ["faithful", "reference"])
def test_sdpa_attention_quantizes_q_k_v_and_grad_output(dtype, fidelity):
    cfg = ATTN_CFG.replace(fidelity=fidelity)
    v_axis = -2 if fidelity == "faithful" else -1  # faithful: v along the key axis, the reduction of P·V
    q, k, v = (_leaf((2, 2, 40, 48), dtype, s) for s in (81, 82, 83))
    g = _leaf((2, 2, 40, 48), dtype, 84).detach()
    out = quant_attention(q, k, v, is_causal=True, config=cfg)
    got = _grads(out, g, q, k, v)

    # .contiguous(): the same values in the layout the SDPA kernel would get from a contiguous input.
    qq = quant_dequant(q.detach(), cfg.query.dim(-1)).contiguous().requires_grad_()
    kq = quant_dequant(k.detach(), cfg.key.dim(-1)).contiguous().requires_grad_()
    vq = quant_dequant(v.detach(), cfg.value.dim(v_axis)).contiguous().requires_grad_()
    out_exp = F.scaled_dot_product_attention(qq, kq, vq, is_causal=True)
    out_exp.backward(quant_dequant(g, cfg.grad_attn_output.dim(-1)))
    assert_bitwise_equal(out, out_exp.detach())
    for actual, expected in zip(got, (qq.grad, kq.grad, vq.grad)):
        assert_bitwise_equal(actual, expected)


def test_explicit_attention_quantizes_every_operand_of_every_gemm():
    cfg = ATTN_CFG.replace(attn_probs="mxfp8e4m3:scale=floor")
    E, L = 48, 40
    q, k, v = (_leaf((2, 2, L, E), torch.float32, s) for s in (91, 92, 93))
    g = _leaf((2, 2, L, E), torch.float32, 94).detach()
    out = quant_attention(q, k, v, is_causal=True, config=cfg)
    dq, dk, dv = _grads(out, g, q, k, v)

    def qd(t, fmt, axis):
        return quant_dequant(t, fmt.dim(axis))

    q_, k_, v_ = q.detach(), k.detach(), v.detach()
    scale = 1 / math.sqrt(E)
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    s = torch.matmul(qd(q_, cfg.query, -1), qd(k_.mT, cfg.key, -2)) * scale  # S = Q·Kᵀ, both along E
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    out_exp = torch.matmul(qd(p, cfg.attn_probs, -1), qd(v_, cfg.value, -2))  # O = P·V, both along S
    dp = torch.matmul(qd(g, cfg.grad_attn_output, -1), qd(v_, cfg.value, -1).mT)  # dP = dO·Vᵀ, along Ev
    dv_exp = torch.matmul(qd(p, cfg.attn_probs, -2).mT, qd(g, cfg.grad_attn_output, -2))  # dV = Pᵀ·dO, along L
    ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype).masked_fill(~keep, 0) * scale
    dq_exp = torch.matmul(ds, qd(k_, cfg.key, -2))  # dQ = dS·K, K along S (dS stays high precision)
    dk_exp = torch.matmul(qd(q_, cfg.query, -2).mT, ds).mT  # dKᵀ = Qᵀ·dS, Q along L
    assert_bitwise_equal(out, out_exp)
    assert_bitwise_equal(dv, dv_exp)
    assert_bitwise_equal(dq, dq_exp)
    assert_bitwise_equal(dk, dk_exp)


def test_attention_plans_follow_the_gemm_table():
    plan = attention_plan(ATTN_CFG)
    axes = [QType(f).q_dim for f in (plan.query, plan.key, plan.value, plan.grad_attn_output)]
    assert axes == [-1, -1, -2, -1] and plan.scores is None
    explicit = attention_plan(ATTN_CFG.replace(attn_probs="mxfp4"))
    assert explicit.query is None and QType(explicit.context.a_fprop) == QType("mxfp4").dim(-1)
    assert QType(explicit.context.a_wgrad) == QType("mxfp4").dim(-2)


# ------------------------------------------------------------------------------------- STE, dtypes, memory
def test_quant_ste_quantizes_forward_and_backward():
    x = _leaf((4, 40), torch.float32, 101)
    g = _leaf((4, 40), torch.float32, 102).detach()
    y = quant_ste(x, "mxfp4", QType("e5m2k8b16").dim(0))
    y.backward(g)
    assert_bitwise_equal(y.detach(), quant_dequant(x.detach(), "mxfp4"))
    assert_bitwise_equal(x.grad, quant_dequant(g, QType("e5m2k8b16").dim(0)))
    assert quant_ste(x, None, None) is x


@pytest.mark.parametrize("cfg_name", ["none", "quantized"])
def test_cpu_autocast_dtypes_and_values_match_plain_torch(cfg_name):
    cfg = FakeQuantConfig() if cfg_name == "none" else ROLES_CFG.replace(query="mxfp8e4m3")
    x, w, b = _leaf((2, M // 2, K), torch.float32, 111), _leaf((N, K), torch.float32, 112), _leaf((N,), torch.float32, 113)
    a3, b3 = _leaf((3, M, K), torch.float32, 114), _leaf((3, K, N), torch.float32, 115)
    q = _leaf((2, 2, 20, 16), torch.float32, 116)
    cases = {
        "linear": (lambda: quant_linear(x, w, b, cfg), lambda: F.linear(x, w, b), (x, w, b)),
        "matmul": (lambda: quant_matmul(x, w.t(), cfg), lambda: torch.matmul(x, w.t()), (x, w)),
        "bmm": (lambda: quant_bmm(a3, b3, cfg), lambda: torch.bmm(a3, b3), (a3, b3)),
        "baddbmm": (lambda: quant_baddbmm(a3[..., :N] * 0, a3, b3, 0.0, 0.5, cfg),
                    lambda: torch.baddbmm(a3[..., :N] * 0, a3, b3, beta=0.0, alpha=0.5), (a3, b3)),
        "sdpa": (lambda: quant_attention(q, q, q, config=cfg), lambda: F.scaled_dot_product_attention(q, q, q), (q,)),
    }
    for name, (ours, plain, leaves) in cases.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = ours(), plain()
        assert y.dtype == y_ref.dtype == torch.bfloat16, name
        got = _grads(y.float().sum(), None, *leaves)
        ref = _grads(y_ref.float().sum(), None, *leaves)
        for leaf, gr in zip(leaves, got):
            assert gr.dtype == leaf.dtype == torch.float32, name
        if cfg_name == "none":
            assert_bitwise_equal(y, y_ref)
            for actual, expected in zip(got, ref):
                assert_bitwise_equal(actual, expected)


def test_autocast_quantizes_the_autocast_dtype_copy():
    # Under autocast the operands are cast to bf16 first (as autocast does) and the bf16 copy is quantized.
    cfg = FakeQuantConfig(input="mxfp8e4m3", weight="mxfp4")
    x, w = _leaf((M, K), torch.float32, 121), _leaf((N, K), torch.float32, 122)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quant_linear(x, w, None, cfg)
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    assert_bitwise_equal(y.detach(), F.linear(quant_dequant(xb, cfg.input), quant_dequant(wb, cfg.weight)))


@pytest.mark.cuda
@pytest.mark.parametrize("cfg_name", ["none", "quantized"])
def test_cuda_autocast_dtypes_match_plain_torch(cfg_name):
    cfg = FakeQuantConfig() if cfg_name == "none" else ROLES_CFG
    x = _leaf((2, M // 2, K), torch.float32, 131).detach().cuda().requires_grad_()
    w = _leaf((N, K), torch.float32, 132).detach().cuda().requires_grad_()
    for amp_dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=amp_dtype):
            y, y_ref = quant_linear(x, w, None, cfg), F.linear(x, w)
            z, z_ref = quant_matmul(x, w.t(), cfg), torch.matmul(x, w.t())
        assert y.dtype == y_ref.dtype == z.dtype == z_ref.dtype == amp_dtype
        (dx,) = torch.autograd.grad(y.float().sum(), x)
        assert dx.dtype == torch.float32
        if cfg_name == "none":
            assert_bitwise_equal(y, y_ref)
            assert_bitwise_equal(z, z_ref)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("fidelity", ["faithful", "reference"])
def test_functions_save_no_more_than_plain_torch(fidelity):
    cfg = OVERRIDES_CFG.replace(fidelity=fidelity, query="mxfp8e4m3", key="mxfp8e4m3", value="mxfp8e4m3",
                                grad_attn_output="mxfp8e5m2")
    x, w, b = _leaf((2, M // 2, K), torch.float32, 141), _leaf((N, K), torch.float32, 142), _leaf((N,), torch.float32, 143)
    a3, b3 = _leaf((3, M, K), torch.float32, 144), _leaf((3, K, N), torch.float32, 145)
    q = _leaf((2, 2, 20, 16), torch.float32, 146)
    pairs = [
        (lambda: quant_linear(x, w, b, cfg), lambda: F.linear(x, w, b)),
        (lambda: quant_matmul(a3, b3, cfg), lambda: torch.matmul(a3, b3)),
        (lambda: quant_bmm(a3, b3, cfg), lambda: torch.bmm(a3, b3)),
        (lambda: quant_baddbmm(a3[..., :N], a3, b3, 0.0, 0.5, cfg),
         lambda: torch.baddbmm(a3[..., :N], a3, b3, beta=0.0, alpha=0.5)),
        (lambda: quant_attention(q, q, q, config=cfg), lambda: F.scaled_dot_product_attention(q, q, q)),
    ]
    for ours, plain in pairs:
        plain_bytes = _saved_bytes(plain)
        assert plain_bytes > 0
        assert _saved_bytes(ours) <= plain_bytes


def test_linear_saves_exactly_its_high_precision_inputs():
    x, w = _leaf((M, K), torch.float32, 151), _leaf((N, K), torch.float32, 152)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quant_linear(x, w, None, ROLES_CFG)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), w.data_ptr()]


# ----------------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    x, w = torch.randn(4, K), torch.randn(N, K)
    with pytest.raises(TypeError, match="config must be a FakeQuantConfig, got str"):
        quant_linear(x, w, None, "mxfp4")
    with pytest.raises(ValueError, match=r"x \(4, 48\) and weight \(36, 40\) do not match"):
        quant_linear(x, torch.randn(N, 40), None, ROLES_CFG)
    with pytest.raises(TypeError, match="must be a floating tensor, got torch.int64"):
        quant_matmul(torch.ones(4, K, dtype=torch.long), w.t(), ROLES_CFG)
    with pytest.raises(ValueError, match=r"cannot be multiplied"):
        quant_matmul(x, w, ROLES_CFG)
    with pytest.raises(ValueError, match=r"must be \[B, M, K\] and \[B, K, N\]"):
        quant_bmm(torch.randn(2, 4, K), torch.randn(3, K, N), ROLES_CFG)
    with pytest.raises(TypeError, match="alpha must be a number"):
        quant_baddbmm(torch.randn(2, 4, N), torch.randn(2, 4, K), torch.randn(2, K, N), 1.0, "1", ROLES_CFG)


def test_gemm_plans_follow_the_gemm_table():
    lin = gemm_plan(OVERRIDES_CFG, "linear")
    assert [QType(q).q_dim for q in lin] == [-1, -1, -1, -2, -2, -2]
    assert QType(lin.b_dgrad) == QType("mxfp6e3m2").dim(-2) and QType(lin.a_wgrad) == QType("mxfp6e2m3").dim(-2)
    mm = gemm_plan(OVERRIDES_CFG, "matmul")
    assert [QType(q).q_dim for q in mm] == [-1, -2, -1, -1, -2, -2]
    ref = gemm_plan(OVERRIDES_CFG.replace(fidelity="reference"), "linear")
    assert [QType(q).q_dim for q in ref] == [-1] * 6


# ------------------------------------------------------------------------------- compatibility names
def test_mxfp_matmul_and_baddbmm_quantize_every_gemm_operand_in_the_mx_format():
    from fakequant.mxfp import mxfp_baddbmm, mxfp_matmul

    a, b = _leaf((2, M // 2, K), torch.float32, 161), _leaf((2, K, N), torch.float32, 162)
    g = _leaf((2, M // 2, N), torch.float32, 163).detach()
    fmt = QType("e4m3k8b16")  # microxcaling fp8_e4m3 with E8M0 floor scales, blocks of 16
    c = mxfp_matmul(a, b, elem_format="fp8_e4m3", block_size=16)
    da, db = _grads(c, g, a, b)
    a_, b_ = a.detach(), b.detach()
    assert_bitwise_equal(c, torch.matmul(quant_dequant(a_, fmt.dim(-1)), quant_dequant(b_, fmt.dim(-2))))
    assert_bitwise_equal(da, torch.matmul(quant_dequant(g, fmt.dim(-1)), quant_dequant(b_, fmt.dim(-1)).mT))
    assert_bitwise_equal(db, torch.matmul(quant_dequant(a_, fmt.dim(-2)).mT, quant_dequant(g, fmt.dim(-2))))

    inp = _leaf((2, M // 2, N), torch.bfloat16, 164)
    a16, b16 = a.detach().bfloat16(), b.detach().bfloat16()
    out = mxfp_baddbmm(inp, a16, b16, beta=0.0, alpha=0.5)  # defaults: fp8_e5m2, blocks of 32
    e5m2 = QType("e5m2k8b32")
    assert out.dtype == torch.bfloat16  # the input dtype, as torch.baddbmm
    assert_bitwise_equal(out.detach(), torch.baddbmm(inp.detach(), quant_dequant(a16, e5m2), quant_dequant(b16, e5m2.dim(-2)),
                                                     beta=0.0, alpha=0.5))
    with pytest.raises(ValueError, match="elem_format 'fp8' is not one of fp8_e5m2, fp8_e4m3"):
        mxfp_matmul(a, b, elem_format="fp8")
    with pytest.raises(ValueError, match="block_size=0 must be an int >= 1"):
        mxfp_matmul(a, b, block_size=0)


def test_quant_dequant_tensor_and_qkv_compatibility_names():
    from fakequant import compat

    x = _leaf((3, 40), torch.bfloat16, 171)
    g = _leaf((3, 40), torch.bfloat16, 172).detach()
    y = compat.quant_dequant_tensor(x, "mxfp8_e4m3", QType("mxfp8e5m2").dim(0))
    y.backward(g)
    assert y.dtype == torch.bfloat16
    assert_bitwise_equal(y.detach(), quant_dequant(x.detach(), "e4m3k8b32"))  # the earlier name: OCP floor scale
    assert_bitwise_equal(x.grad, quant_dequant(g, QType("mxfp8e5m2").dim(0)))
    assert_bitwise_equal(compat.quant_dequant_tensor(x, elem_format="fp4_e2m1").detach(),
                         quant_dequant(x.detach(), "e2m1k8b32"))
    with pytest.raises(ValueError, match=r"forward_qtype='mxfp9' is neither one of mxfp8_e4m3, .* nor a QType"):
        compat.quant_dequant_tensor(x, "mxfp9")

    q, k, v = (_leaf((2, 4, 40), torch.bfloat16, s) for s in (173, 174, 175))
    outs = compat.quant_dequant_qkv(q, k, v)  # mxfp8_e4m3 forward and backward
    for t, o in zip((q, k, v), outs):
        assert o.dtype == torch.bfloat16
        expected = compat.quant_dequant_tensor_with_backward(t, "mxfp8_e4m3", None, True, "mxfp8_e4m3")
        assert_bitwise_equal(o, expected)
    sum(o.float().sum() for o in outs).backward()
    assert_bitwise_equal(q.grad, quant_dequant(torch.ones_like(q), "e4m3k8b32"))
    q32 = q.detach().float()
    assert compat.quant_dequant_qkv(q32, q32, q32, elem_format="fp8_e5m2")[0].dtype == torch.float32


def test_hifp_matmul_and_baddbmm_quantize_every_gemm_operand_in_hif8():
    from fakequant.hifp import hifp_baddbmm, hifp_matmul

    hif8 = QType("hif8")  # elementwise: the axis does not matter, the operand set does
    a, b = _leaf((2, M // 2, K), torch.bfloat16, 181), _leaf((K, N), torch.bfloat16, 182)
    g = _leaf((2, M // 2, N), torch.bfloat16, 183).detach()
    c = hifp_matmul(a, b)
    da, db = _grads(c, g, a, b)
    a_, b_ = a.detach(), b.detach()
    a2, g2 = a_.reshape(-1, K), g.reshape(-1, N)
    assert c.dtype == torch.bfloat16
    assert_bitwise_equal(c, torch.matmul(quant_dequant(a_, hif8), quant_dequant(b_, hif8)))
    assert_bitwise_equal(da, quant_dequant(g2, hif8).mm(quant_dequant(b_, hif8).t()).view(a.shape))
    assert_bitwise_equal(db, quant_dequant(a2, hif8).t().mm(quant_dequant(g2, hif8)))

    inp, a3, b3 = _leaf((3, M, N), torch.float32, 184), _leaf((3, M, K), torch.float32, 185), _leaf((3, K, N), torch.float32, 186)
    out = hifp_baddbmm(inp, a3, b3, beta=0.5, alpha=2.0)
    (dinp,) = torch.autograd.grad(out, (inp,), g.float().new_ones(3, M, N))
    expected = torch.baddbmm(inp.detach(), quant_dequant(a3.detach(), hif8), quant_dequant(b3.detach(), hif8),
                             beta=0.5, alpha=2.0)
    assert_bitwise_equal(out.detach(), expected)
    assert_bitwise_equal(dinp, torch.full((3, M, N), 0.5))  # input's gradient stays high precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hifp_matmul(a3, b3).dtype == torch.bfloat16  # autocast's dtype, as torch.matmul
