"""``fakequant.nn.QuantLinear``: the torch backend is the fake-quant reference bit for bit; state_dict round
trips into an empty skeleton; ``.to(dtype)`` leaves the packed weight alone; the triton backend (CPU
interpreter here, H100 in the ``cuda`` tests) agrees with torch within bf16 matmul rounding."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import fakequant  # noqa: E402
from fakequant import QType  # noqa: E402
from fakequant.nn import QuantLinear  # noqa: E402
from fakequant.packing import pack  # noqa: E402

from .conftest import assert_bitwise_equal  # noqa: E402

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
WEIGHT_FORMATS = ["mxfp4", "e2m1k8b32", "e2m1k8b16:round=even", "nvf4", "nvfp4"]


def _rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def _linear(out_f=40, in_f=96, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return lin.to(dtype)


@pytest.mark.parametrize("wq", WEIGHT_FORMATS)
@pytest.mark.parametrize("iq", [None, "mxfp4:scale=floor", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_is_the_fake_quant_reference(wq, iq, dtype, bias):
    lin = _linear(bias=bias, dtype=dtype)
    ql = QuantLinear.from_linear(lin, weight_qtype=wq, input_qtype=iq)
    x = torch.randn(3, 5, 96).to(dtype)  # 3-D: leading dims are kept
    xq = x if iq is None else fakequant.quant_dequant(x, iq)
    expected = F.linear(xq, fakequant.quant_dequant(lin.weight.detach(), wq), lin.bias)
    assert_bitwise_equal(ql(x), expected)
    assert_bitwise_equal(ql.dequantize_weight(dtype), fakequant.quant_dequant(lin.weight.detach(), wq))


def test_constructor_is_a_superset_of_linear():
    ql = QuantLinear(96, 40, bias=False, device="cpu", dtype=torch.bfloat16)
    assert ql.bias is None and ql.weight_codes.shape == (40, 48) and ql.weight_scales.shape == (40, 3)
    ql = QuantLinear(33, 8, True, dtype=torch.float16, weight_qtype="nvfp4")
    assert ql.bias.dtype == torch.float16 and ql.weight_codes.shape == (8, 17) and ql.weight_scales.shape == (8, 3)
    assert ql.weight_tensor_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="cannot pack 'mxfp8e4m3'"):
        QuantLinear(32, 8, weight_qtype="mxfp8e4m3")
    with pytest.raises(ValueError, match="along in_features"):
        QuantLinear(32, 8, weight_qtype=QType("mxfp4").dim(0))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        QuantLinear(32, 8, backend="cuda")
    with pytest.raises(ValueError, match="in_features must be an int"):
        QuantLinear(-1, 8)


@pytest.mark.parametrize("wq", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_into_empty_skeleton(wq, bias):
    lin = _linear(bias=bias)
    ql = QuantLinear.from_linear(lin, weight_qtype=wq, input_qtype="mxfp4", backend="torch")
    x = torch.randn(7, 96)
    y = ql(x)
    sd = ql.state_dict()
    assert sd["weight_codes"].dtype == torch.uint8 and sd["weight_scales"].dtype == torch.uint8
    assert ("weight_tensor_scale" in sd) == (wq == "nvfp4") and ("bias" in sd) == bias
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    skeleton = QuantLinear(backend="torch")  # no sizes, default format: everything comes from the checkpoint
    skeleton.load_state_dict(torch.load(buf))
    assert (skeleton.in_features, skeleton.out_features) == (96, 40)
    assert skeleton.weight_qtype == ql.weight_qtype and skeleton.input_qtype == ql.input_qtype
    assert_bitwise_equal(skeleton(x), y)


def test_state_dict_round_trip_with_transform():
    g = torch.Generator().manual_seed(3)
    t = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]  # an orthogonal (rotation) transform per block
    lin = _linear()
    ql = QuantLinear.from_linear(lin, weight_qtype="mxfp4", transform=t, backend="torch")
    x = torch.randn(4, 96)
    ref = lin(x)
    assert _rel_l2(ql(x), ref) < 0.2  # 4-bit weights in the rotated space still compute x Wᵀ
    skeleton = QuantLinear()
    skeleton.load_state_dict(ql.state_dict())
    skeleton.backend = "torch"
    assert_bitwise_equal(skeleton(x), ql(x))
    per_block = QuantLinear.from_linear(lin, weight_qtype="mxfp4", transform=t.expand(3, 32, 32), backend="torch")
    assert_bitwise_equal(per_block(x), ql(x))
    with pytest.raises(ValueError, match="does not tile"):
        QuantLinear(96, 8, transform=torch.eye(5))


@pytest.mark.parametrize("wq", ["mxfp4", "nvfp4"])
def test_to_dtype_leaves_packed_weight_untouched(wq):
    ql = QuantLinear.from_linear(_linear(), weight_qtype=wq, backend="torch")
    codes, scales = ql.weight_codes.clone(), ql.weight_scales.clone()
    ts = None if ql.weight_tensor_scale is None else ql.weight_tensor_scale.clone()
    w32 = ql.dequantize_weight(torch.float32)
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.float64),
                    lambda m: m.float()):
        convert(ql)
        assert ql.weight_codes.dtype == torch.uint8 and torch.equal(ql.weight_codes, codes)
        assert ql.weight_scales.dtype == torch.uint8 and torch.equal(ql.weight_scales, scales)
        if ts is not None:
            assert ql.weight_tensor_scale.dtype == torch.float32 and torch.equal(ql.weight_tensor_scale, ts)
        assert_bitwise_equal(ql.dequantize_weight(torch.float32), w32)
    ql.to(torch.bfloat16)
    assert ql.bias.dtype == torch.bfloat16  # the bias follows the dtype, as nn.Linear's does
    y = ql(torch.randn(2, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # .to(device) moves the packed state (the meta device stands in for a GPU here)
    ql.to("meta")
    assert ql.weight_codes.device.type == "meta" and ql.weight_codes.dtype == torch.uint8
    if ts is not None:
        assert ql.weight_tensor_scale.device.type == "meta" and ql.weight_tensor_scale.dtype == torch.float32


def test_native_scale_views_and_bits():
    ql = QuantLinear.from_linear(_linear(in_f=128), weight_qtype="mxfp4")
    if hasattr(torch, "float8_e8m0fnu"):
        assert ql.weight_scales_native.dtype == torch.float8_e8m0fnu
    assert ql.weight_bits_per_element() == 4.25  # 4 bits + one byte per 32
    nv = QuantLinear.from_linear(_linear(in_f=128), weight_qtype="nvfp4")
    if hasattr(torch, "float8_e4m3fn"):
        assert nv.weight_scales_native.dtype == torch.float8_e4m3fn
    assert nv.weight_bits_per_element() == pytest.approx(4.5 + 32 / (40 * 128))


def test_mse_and_hessian_scales_pack_into_quant_linear():
    from fakequant.scale_search import hessian_scales, mse_scales, quant_dequant_mse, quant_dequant_scaled

    lin = _linear(in_f=128)
    w = lin.weight.detach()
    ql = QuantLinear.from_linear(lin, weight_qtype="e2m1k8b32", scales=mse_scales(w, "e2m1k8b32"))
    assert_bitwise_equal(ql.dequantize_weight(), quant_dequant_mse(w, "e2m1k8b32"))
    x = torch.randn(64, 128)
    s = hessian_scales(w, X=x, qtype="e2m1k8b32")
    ql = QuantLinear.from_linear(lin, weight_qtype="e2m1k8b32", scales=s)
    assert_bitwise_equal(ql.dequantize_weight(), quant_dequant_scaled(w, "e2m1k8b32", s))


def test_backend_choice():
    ql = QuantLinear.from_linear(_linear(), weight_qtype="mxfp4")
    x = torch.randn(2, 96)
    assert ql._resolve_backend(x) == "torch"  # automatic: CPU tensors take the reference
    ql.backend = "triton"
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
            ql(x)
    with pytest.raises(ValueError, match="95 features, in_features=96"):
        ql(torch.randn(2, 95))


# ----------------------------------------------------------------------------------------- triton backend
triton_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not HAS_TRITON, reason="needs Triton's CPU interpreter"
)


@triton_cpu
@pytest.mark.parametrize("wq", WEIGHT_FORMATS)
@pytest.mark.parametrize("shape", [(3, 40, 96), (17, 33, 70), (1, 16, 64)])
def test_triton_interpreter_parity(wq, shape):
    """The fused kernel (under the interpreter) against the torch backend: odd M, N, K (K not a multiple of
    the tile or the block), bias, every weight format; within bf16 matmul rounding."""
    m, n, k = shape
    lin = _linear(out_f=n, in_f=k, seed=m)
    x = torch.randn(m, k)
    ref = QuantLinear.from_linear(lin, weight_qtype=wq, input_qtype="mxfp4", backend="torch")
    tri = QuantLinear.from_linear(lin, weight_qtype=wq, input_qtype="mxfp4", backend="triton")
    assert _rel_l2(tri(x), ref(x)) < 1e-2
    xb = x.to(torch.bfloat16)
    y = tri(xb)
    assert y.dtype == torch.bfloat16 and _rel_l2(y, ref(xb)) < 1e-2


@triton_cpu
def test_triton_interpreter_swapped_operands():
    from fakequant.kernels.triton.quant_linear import TileConfig, quant_linear

    w = torch.randn(48, 160)
    p = pack(w, "nvfp4")
    x = torch.randn(5, 160)
    b = torch.randn(48)
    ref = x @ fakequant.quant_dequant(w, "nvfp4").T + b
    y = quant_linear(x, p.codes, p.scales, block=16, e4m3=True, tensor_scale=p.tensor_scale, bias=b,
                     config=TileConfig(16, 16, 64, 1, 4, 1, 2, swap_ab=True))
    assert _rel_l2(y, ref) < 1e-2


@triton_cpu
def test_triton_interpreter_split_k():
    """Split-K reduces in the kernel (atomic partial sums, the last slice writes Y) and leaves its workspace
    and counters at zero, so the next launch is right too."""
    from fakequant.kernels.triton import quant_linear as qlk

    w = torch.randn(32, 256)
    codes, scales = pack(w, "mxfp4")
    b = torch.randn(32)
    for m in (5, 5, 3):
        x = torch.randn(m, 256)
        ref = x @ fakequant.quant_dequant(w, "mxfp4").T + b
        for cfg in (qlk.TileConfig(16, 16, 64, 2, 4, 1, 2), qlk.TileConfig(16, 32, 64, 3, 4, 1, 2)):
            y = qlk.quant_linear(x, codes, scales, block=32, bias=b, config=cfg)
            assert y.dtype == torch.float32 and _rel_l2(y, ref) < 1e-2
    assert all(not t.any() for t in qlk._WORKSPACE.values())
    with pytest.raises(ValueError, match="expected codes"):
        qlk.quant_linear(x, codes[:, :-1], scales, block=32)


@triton_cpu
@pytest.mark.parametrize("wq", ["mxfp4", "nvfp4"])
def test_triton_interpreter_dequantize(wq):
    from fakequant.kernels.triton import quant_linear as qlk

    w = torch.randn(40, 200)
    p = pack(w, wq)
    block = 32 if wq == "mxfp4" else 16
    deq = qlk.dequantize(p.codes, p.scales, k=200, block=block, e4m3=wq != "mxfp4", tensor_scale=p.tensor_scale,
                         dtype=torch.float32)
    assert_bitwise_equal(deq, p.unpack())  # the plain decode path is exact
    x = torch.randn(6, 200)
    y = qlk.quant_linear(x, p.codes, p.scales, block=block, e4m3=wq != "mxfp4", tensor_scale=p.tensor_scale,
                         config=qlk.CONFIGS_LARGE_M[-1]._replace(decode_asm=False))
    assert_bitwise_equal(y, F.linear(x, p.unpack()))


# ------------------------------------------------------------------------------------------------ GPU (H100)
@pytest.mark.cuda
@pytest.mark.parametrize("wq", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 16, 100, 4096])
@pytest.mark.parametrize("nk", [(4096, 4096), (1000, 2080)])
def test_triton_matches_torch_on_gpu(wq, m, nk):
    """Backend parity on the GPU: the tuned fused kernel vs the torch backend (bf16 activations quantized to
    mxfp4, bf16 output), relative L2 below 1e-2; odd N and K (K not a multiple of the K tile)."""
    n, k = nk
    torch.manual_seed(m)
    w = torch.randn(n, k, device="cuda") * 0.02
    b = torch.randn(n, device="cuda")
    ql = QuantLinear.from_weight(w, b, weight_qtype=wq, input_qtype="mxfp4").to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ql.backend = "torch"
    ref = ql(x)
    ql.backend = None
    assert ql._resolve_backend(x) == "triton"
    y = ql(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    rel = _rel_l2(y, ref)
    print(f"{wq} M={m} N={n} K={k}: relative L2 {rel:.2e}")
    assert rel < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("e4m3", [False, True])
def test_every_tile_configuration_on_gpu(e4m3):
    """Every candidate configuration (plain and inline-PTX decode, swapped operands, split-K) computes the
    same product; the tuner also refuses any that does not, but a wrong one must fail here first."""
    from fakequant.kernels.triton.quant_linear import ALL_CONFIGS, quant_linear

    torch.manual_seed(0)
    n, k, m = 1000, 2080, 37
    wq = "nvfp4" if e4m3 else "mxfp4"
    w = torch.randn(n, k, device="cuda") * 0.02
    p = pack(w, wq)
    wd = p.unpack().double()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ wd.T + b.double()
    bad = []
    for cfg in ALL_CONFIGS:
        if (cfg.gluon or cfg.wgmma) and e4m3:
            continue  # MX scales only
        rows = cfg.block_m - 3 if cfg.gluon else m  # a Gluon configuration serves batches up to block_m
        for _ in range(2):  # twice: split-K must leave its workspace and counters ready for the next launch
            y = quant_linear(x[:rows], p.codes, p.scales, block=16 if e4m3 else 32, e4m3=e4m3,
                             tensor_scale=p.tensor_scale, bias=b, config=cfg)
            rel = _rel_l2(y, ref[:rows])
            if not rel < 1e-2:
                bad.append((cfg, rel))
    assert not bad, bad


@pytest.mark.cuda
def test_split_k_is_race_free_on_gpu():
    """Every split-K configuration, 60 launches each on fresh activations, every result checked: the in-kernel
    reduction must never read a partial sum before it lands (a missing fence did, intermittently)."""
    from fakequant.kernels.triton.quant_linear import ALL_CONFIGS, quant_linear

    torch.manual_seed(2)
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    p = pack(w, "mxfp4")
    wd = p.unpack().double()
    bad = []
    for cfg in [c for c in ALL_CONFIGS if c.split_k > 1]:  # the Gluon ones included (batch 4..16 here)
        for i in range(60):
            x = torch.randn(4 + i % 13, 4096, device="cuda", dtype=torch.bfloat16)
            rel = _rel_l2(quant_linear(x, p.codes, p.scales, block=32, config=cfg), x.double() @ wd.T)
            if not rel < 1e-2:
                bad.append((cfg, i, rel))
    print(f"split-K stress: {len(bad)} wrong results")
    assert not bad, bad[:5]


@pytest.mark.cuda
@pytest.mark.parametrize("wq", ["mxfp4", "nvfp4"])
def test_dequantize_and_dequant_gemm_on_gpu(wq):
    from fakequant.kernels.triton import quant_linear as qlk

    torch.manual_seed(1)
    w = torch.randn(1000, 2080, device="cuda") * 0.02
    p = pack(w, wq)
    e4m3, block = wq != "mxfp4", 16 if wq != "mxfp4" else 32
    for asm in (False, True):
        cfg = qlk.CONFIGS_LARGE_M[-1]._replace(decode_asm=asm)
        deq = qlk.dequantize(p.codes, p.scales, k=2080, block=block, e4m3=e4m3, tensor_scale=p.tensor_scale,
                             dtype=torch.float32, config=cfg)
        assert _rel_l2(deq, p.unpack()) < 1e-6
        x = torch.randn(300, 2080, device="cuda", dtype=torch.bfloat16)
        y = qlk.quant_linear(x, p.codes, p.scales, block=block, e4m3=e4m3, tensor_scale=p.tensor_scale, config=cfg)
        assert _rel_l2(y, x.double() @ p.unpack().double().T) < 1e-2


# ------------------------------------------------------------------------------- Gluon kernel (batch <= 16)
def _gluon_decode_model(b: torch.Tensor, e: torch.Tensor, big: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Gluon kernel's inline PTX computes for code bytes ``b`` and scale bytes ``e`` (int64), in
    torch: the bit placement, then bf16 multiplies (float32 products of bf16 values are exact; rounding to
    bf16 is what ``mul.rn.bf16x2`` does)."""
    d = ((b * 0x40040) & 0x01C001C0) | ((b * 0x1001000) & 0x80008000)

    def from_bits(bits):  # 16-bit patterns (int64) -> bf16
        return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)

    def factor(bits):
        return from_bits(bits).float()

    lo, hi = from_bits(d & 0xFFFF).float(), from_bits(d >> 16).float()
    if big:
        f1 = factor((torch.clamp(e, max=128) + 126) << 7)
        f2 = torch.where(e == 255, torch.tensor(float("nan")), factor((torch.clamp(e, min=128) - 1) << 7))
        out = [(v * f1).to(torch.bfloat16).float() * f2 for v in (lo, hi)]
    else:
        f1 = factor((e + 126) << 7)
        out = [v * f1 for v in (lo, hi)]
    return out[0].to(torch.bfloat16), out[1].to(torch.bfloat16)


@pytest.mark.parametrize("big", [False, True])
def test_gluon_decode_arithmetic_is_exact(big):
    """The Gluon kernels' decode (``quant_linear_gluon._decode_asm``), modelled bit for bit on the CPU: every
    code byte with every scale byte it may see (<= 128 for the one-multiply path, all 256 with BIG_SCALES)
    gives E2M1(low nibble, high nibble) x 2^(e-127) exactly, in bf16, and byte 255 gives NaN."""
    pytest.importorskip("triton")
    from fakequant.kernels.triton import quant_linear_gluon as qlg

    for factors in (1, 2):  # per byte i: taken out of the word by prmt (zero-extended), then the modelled steps
        word = qlg._decode_asm(factors).splitlines()
        for i in range(4):
            at = word.index(f"prmt.b32 b, $8, 0, {0x4440 + i:#x};")
            steps = ["mul.lo.u32 m, b, 0x40040;", "mul.lo.u32 s, b, 0x1001000;", "and.b32 m, m, 0x01C001C0;",
                     "and.b32 s, s, 0x80008000;", "or.b32 d, m, s;", "mul.rn.bf16x2 d, d, $9;"]
            steps += ["mul.rn.bf16x2 d, d, $10;"] * (factors - 1) + [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, d;"]
            assert word[at + 1:at + 1 + len(steps)] == steps
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    e2m1 = torch.cat([e2m1, -e2m1])
    b = torch.arange(256).repeat_interleave(256 if big else 129)
    e = torch.arange(256 if big else 129).repeat(256)
    lo, hi = _gluon_decode_model(b, e, big)
    scale = torch.where(e == 255, torch.tensor(float("nan"), dtype=torch.float64), torch.exp2(e.double() - 127))
    assert_bitwise_equal(lo, (e2m1[b & 15] * scale).to(torch.bfloat16))
    assert_bitwise_equal(hi, (e2m1[b >> 4] * scale).to(torch.bfloat16))


@pytest.mark.parametrize("shape_split", [((8, 1, 1, 2, 8), 1), ((8, 1, 2, 1, 16), 1), ((1, 4, 2, 1, 16), 8)])
def test_gluon_kernel_compiles_for_hopper_within_its_instruction_budget(shape_split):
    """Compiled ahead of time for sm_90 (no GPU needed): the layout conversions that put the decoded bytes and
    the activations into the MMA fragments are asserted trivial by the compiler (no data moves), and the K
    loop stays near 4 SASS instructions per weight element (the Triton-language kernel needs about 6.5), with
    no register spills; warps along K (rank-3 MMA) and along rows alike."""
    pytest.importorskip("triton")
    from fakequant.kernels.triton import quant_linear_gluon as qlg

    if qlg.gluon is None:
        pytest.skip("this triton has no Gluon")
    from triton.experimental.gluon._runtime import GluonASTSource

    from fakequant.kernels.triton._sass import compile_sm90, loop_mix, registers

    shape, split_k = qlg.SmallMShape(*shape_split[0]), shape_split[1]
    signature, constexprs = qlg.compile_signature(shape, split_k)
    kernel = compile_sm90(GluonASTSource, qlg._small_m_kernel, signature, constexprs, shape.num_warps)
    n, mix = loop_mix(kernel.asm["cubin"])
    per_element = n / (shape.rows * shape.block_k / (32 * shape.num_warps))
    assert 3.0 < per_element < 4.5, (per_element, mix.most_common(8))
    assert mix["HMMA"] > 0 and mix["LDS"] == 0 and mix["STS"] == 0  # tensor cores, no shared-memory staging
    assert registers(kernel.asm["cubin"])[1] == 0  # no stack (spills)


def test_gluon_tile_configurations_name_valid_program_shapes():
    """Every Gluon candidate maps to a program shape (warps, rows, K per step consistent, powers of two), and one
    that does not is refused with a message naming the values and the rule."""
    pytest.importorskip("triton")
    from fakequant.kernels.triton import quant_linear as qlk
    from fakequant.kernels.triton import quant_linear_gluon as qlg

    for cfg in (c for c in qlk.ALL_CONFIGS if c.gluon):
        shape = qlk._small_m_shape(cfg)  # what the launcher uses, validated once per configuration
        assert (shape.rows, shape.block_k, shape.num_warps, shape.block_m) == (cfg.block_n, cfg.block_k,
                                                                                cfg.num_warps, cfg.block_m)
        assert qlk._small_m_shape(cfg) is shape
    for bad in [(8, 24, 1024, 8, 8), (8, 16, 1000, 8, 8), (12, 16, 1024, 8, 8), (8, 16, 1024, 8, 3)]:
        with pytest.raises(ValueError, match="no Gluon program shape"):
            qlg.SmallMShape.from_tile(*bad)


def test_tuner_offers_only_gluon_configurations_that_serve_the_whole_batch_bucket(monkeypatch):
    """A configuration tuned for a batch bucket is reused for every batch in it, so a Gluon candidate must serve
    the bucket's largest batch (block_m 8 only for buckets up to 8), and needs K a multiple of 8. Checked on the
    CPU with the device test stubbed to say "Hopper"."""
    pytest.importorskip("triton")
    from fakequant.kernels.triton import quant_linear as qlk

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(qlk.quant_linear_gluon, "available", lambda device=None: True)
    cuda = torch.device("cuda")
    assert [qlk._m_bucket(m) for m in (1, 2, 4, 5, 8, 9, 16, 17, 300)] == [1, 4, 4, 8, 8, 16, 16, 64, 4096]
    for m in (1, 3, 6, 8, 9, 16):
        gluon = [c for c in qlk._candidates(m, 4096, 32, False, cuda) if c.gluon]
        assert gluon and all(c.block_m >= qlk._m_bucket(m) for c in gluon), (m, gluon)
        assert any(c.block_m == 8 for c in gluon) == (m <= 8)
    assert not [c for c in qlk._candidates(4, 4100, 32, False, cuda) if c.gluon]  # K not a multiple of 8
    assert not [c for c in qlk._candidates(4, 4096, 16, True, cuda) if c.gluon]  # NVFP4 scales
    assert not [c for c in qlk._candidates(4, 4096, 32, False, torch.device("cpu")) if c.gluon]


@pytest.mark.parametrize("shape", [(8, 128, 256, 5), (8, 128, 128, 3)])
def test_wgmma_kernel_compiles_for_hopper_with_asynchronous_mmas(shape):
    """The large-batch wgmma kernel compiled ahead of time for sm_90 (no GPU needed): per K tile one group of
    four asynchronous HGMMAs with a single arrive and a single wait (ptxas serialises them, one wait per MMA, when
    an operand's registers are reused too early), the decoded weight stored with four 16-byte stores, X copied
    with 16-byte ``cp.async``, at most 6.5 instructions per decoded weight, and no register spills."""
    pytest.importorskip("triton")
    from fakequant.kernels.triton import quant_linear_wgmma as qlw

    if qlw.gluon is None:
        pytest.skip("this triton has no Gluon")
    from triton.experimental.gluon._runtime import GluonASTSource

    from fakequant.kernels.triton._sass import compile_sm90, loop_mix, registers

    warps, rows, block_m, x_stages = shape
    signature, constexprs = qlw.compile_signature(warps, rows, block_m, x_stages)
    kernel = compile_sm90(GluonASTSource, qlw._large_m_kernel, signature, constexprs, warps)
    n, mix = loop_mix(kernel.asm["cubin"])
    assert mix["HGMMA"] == qlw.BLOCK_K // 16 and mix["WARPGROUP"] == 2, mix.most_common(12)
    assert mix["STS"] == 4 and mix["LDGSTS"] == block_m * qlw.BLOCK_K * 2 // 16 // (32 * warps)
    assert n / (rows * qlw.BLOCK_K / (32 * warps)) < 6.5, (n, mix.most_common(12))
    assert registers(kernel.asm["cubin"])[1] == 0


def test_quant_linear_caches_the_largest_scale_byte_until_the_buffer_changes():
    ql = QuantLinear.from_weight(torch.randn(32, 64) * 0.02, None, weight_qtype="mxfp4", input_qtype=None)
    first = ql._max_scale_byte()
    assert first == int(ql.weight_scales.max()) <= 128
    ql.weight_scales[0, 0] = 200  # in place: the version counter moves
    assert ql._max_scale_byte() == 200
    ql.load_state_dict(QuantLinear.from_weight(torch.randn(32, 64), None, weight_qtype="mxfp4",
                                               input_qtype=None).state_dict())
    assert ql._max_scale_byte() == int(ql.weight_scales.max())


def _hard_mx_weights(n: int, k: int):
    """(packed mxfp4 weight with scale bytes above 128, a zero block and a NaN block in row 7; packed weight whose
    scale bytes are all <= 128) on the GPU."""
    w = torch.randn(n, k, device="cuda") * 0.02
    w[:4] *= 5000  # scale bytes above 128
    w[5, 64:96] = 0  # a zero block
    p = pack(w, "mxfp4")
    p.scales[7, 3] = 255  # NaN block: row 7 of Y is NaN
    small = pack(torch.randn(n, k, device="cuda") * 0.02, "mxfp4")
    assert int(small.scales.max()) <= 128
    return p, small


def _check_mx_kernel(configs, batches, n, k, dtype) -> list:
    """Each configuration on ``_hard_mx_weights``, with bias, both decode paths (``max_scale_byte`` unknown: two
    multiplies; known and <= 128: one), each launch twice: the failures (batch, config, what)."""
    from fakequant.kernels.triton import quant_linear as qlk

    p, small = _hard_mx_weights(n, k)
    wd, small_wd = p.unpack().double(), small.unpack().double()
    small_max = int(small.scales.max())
    b = torch.randn(n, device="cuda", dtype=dtype)
    finite = torch.ones(n, dtype=torch.bool, device="cuda")
    finite[7] = False
    bad = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.to(torch.bfloat16).double() @ wd.T + b.double()
        small_ref = x.to(torch.bfloat16).double() @ small_wd.T
        for cfg in configs:
            if cfg.gluon and m > cfg.block_m:
                continue  # refused with a ValueError (test_gluon_kernel_on_gpu)
            for _ in range(2):
                y = qlk.quant_linear(x, p.codes, p.scales, block=32, bias=b, config=cfg)
                rel = _rel_l2(y[:, finite], ref[:, finite])
                if not (rel < 1e-2 and bool(torch.isnan(y[:, 7]).all()) and y.dtype == dtype):
                    bad.append((m, cfg, rel))
                y = qlk.quant_linear(x, small.codes, small.scales, block=32, config=cfg, max_scale_byte=small_max)
                if not _rel_l2(y, small_ref) < 1e-2:
                    bad.append((m, cfg, "one multiply", _rel_l2(y, small_ref)))
    return bad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gluon_kernel_on_gpu(dtype):
    """The Gluon batch <= 16 kernel on ragged shapes (N not a multiple of the rows per program, K not a
    multiple of a program step), every configuration on batches up to its block_m, with bias, blocks with
    scale bytes above 128, a NaN scale (255) and zero blocks: equal to the float64 product of the same
    operands within bf16 rounding, NaN exactly in the outputs of rows with a NaN block, and the split-K
    scratch left at zero; more rows than block_m, or K not a multiple of 8, refused with a clear error."""
    from fakequant.kernels.triton import quant_linear as qlk

    torch.manual_seed(3)
    k = 2080 + 40
    gluon = [c for c in qlk.ALL_CONFIGS if c.gluon]
    assert gluon
    bad = _check_mx_kernel(gluon, (1, 5, 8, 9, 16), 1000, k, dtype)
    assert not bad, bad[:4]
    assert all(not t.any() for t in qlk._WORKSPACE.values())
    p = pack(torch.randn(64, k, device="cuda"), "mxfp4")
    for cfg in gluon:  # more rows than block_m
        with pytest.raises(ValueError, match="Gluon configuration"):
            qlk.quant_linear(torch.randn(cfg.block_m + 1, k, device="cuda", dtype=dtype), p.codes, p.scales,
                             block=32, config=cfg)
    p = pack(torch.randn(64, 100, device="cuda"), "mxfp4")  # K not a multiple of 8
    with pytest.raises(ValueError, match="K a multiple of 8"):
        qlk.quant_linear(torch.randn(1, 100, device="cuda", dtype=dtype), p.codes, p.scales, block=32,
                         config=gluon[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wgmma_kernel_on_gpu(dtype):
    """The Gluon wgmma kernel, every configuration, on batches below, at and across its tiles (1, 200, 300,
    513: rows past M), N not a multiple of its rows and K not a multiple of 64, with the hard weights of
    ``_hard_mx_weights``; and K not a multiple of 8 (``cp.async`` alignment) refused with a clear error."""
    from fakequant.kernels.triton import quant_linear as qlk

    torch.manual_seed(4)
    wgmma = [c for c in qlk.ALL_CONFIGS if c.wgmma]
    assert wgmma
    bad = _check_mx_kernel(wgmma, (1, 200, 300, 513), 1000, 2080 + 40, dtype)
    assert not bad, bad[:4]
    p = pack(torch.randn(64, 100, device="cuda"), "mxfp4")
    with pytest.raises(ValueError, match="wgmma configuration"):
        qlk.quant_linear(torch.randn(300, 100, device="cuda", dtype=dtype), p.codes, p.scales, block=32,
                         config=wgmma[0])
