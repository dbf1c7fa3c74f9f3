"""Every Triton kernel against the plain-torch reference, bit for bit (atol = rtol = 0, NaN == NaN, -0 != +0).

CPU: the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before any kernel module
is imported when no GPU is present) on small adversarial tensors: random values at many scales, exact ties,
subnormals, zero and signed-zero blocks, NaN/inf inside blocks, values at the dtype's limits, axis lengths
that are not a multiple of the block, axis 0 and -1, 3-D tensors, non-contiguous inputs, float32 / bfloat16 /
float16. Also every golden ``quant_dequant`` case through ``backend="triton"``.

GPU (``@pytest.mark.cuda``, run on the device machine): the same comparison over at least 10^8 elements per
family, printing the mismatch count per family (it must be 0).

The self-test tests break a kernel by one ulp and check that dispatch refuses it: a warning and the
reference on automatic choice, ``RuntimeError`` on an explicit one.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

triton = pytest.importorskip("triton")

import fakequant  # noqa: E402
from fakequant import QType, dispatch  # noqa: E402
from fakequant.formats import reference_quant_dequant  # noqa: E402

from .conftest import DATA, bitwise_mismatches  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the interpreter evaluates both sides of every tl.where in numpy, which warns about the side not taken
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Formats per family: the aliases, every scale rule and element rounding, integer elements, odd block sizes
# and scale widths. Families whose kernel is not registered yet are skipped with the dispatcher's reason.
QTYPES = {
    "mx": [
        "mxfp4", "mxfp6e3m2", "mxfp6e2m3", "mxfp8e4m3", "mxfp8e5m2", "e2m1k8b32", "e4m3k8b32:scale=rceil",
        "e5m2k8b32:scale=ceil", "e2m1k8b32:round=even", "e3m2k8b16:round=floor", "e0m7k8b32c", "e0m3k8b32",
        "e0m1k8b32c", "e0m5k8b32c:round=floor", "e0m4k8b16:scale=rceil:round=even", "e4m3k8b24",
        "e2m3k6b7:scale=ceil", "e7m10k8b8", "e0m23k8b4c", "e6m5k3b5:round=even:scale=rceil", "e3m4k5b64c",
    ],
    "mx_hier": ["e2m1K1k3B2b16off20", "e4m3K2k4B4b8c", "e0m3K1k2B2b16c"],
    "hifx": ["hifx2_v12", "hifx3_v12", "hifx4_v12", "hifx5_v12"],
    "tmx": ["tmx3", "tmx6", "tmx12", "tmx25"],
    "hif8": ["hif8", "hif8:saturate=false"],
    "hif4": ["hif4"],
    "nvf4": ["nvf4"],
    "nvfp4": ["nvfp4"],
    "nf4": ["nf4"],
    "nf4_double": ["nf4B4b16", "nf4B8b8"],
    "int8sym": ["int8sym"],
}
ALL_QTYPES = [(fam, name) for fam, names in QTYPES.items() for name in names]


def _device() -> str:
    return "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def _skip_unless_triton(q: QType, x: torch.Tensor) -> None:
    impls = dispatch._candidates(q.family, x.device.type)
    if "triton" not in impls:
        pytest.skip(f"no Triton kernel registered for family {q.family!r} yet")
    ok, reason = impls["triton"].can_run(x, q)
    if not ok:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------------ inputs
def adversarial(shape: tuple[int, ...], dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    """Random values at many scales with every corner case mixed in, in ``dtype``.

    Scales are shared by runs of 8 elements of the flattened tensor (so blocks along the last axis have a
    few binades, blocks along other axes a wide range), mantissas are Gaussian, small integers (exact ties
    on coarse grids) or exact halves; then subnormals, zeros, -0, zero runs, values near the dtype's largest
    finite value, and (with ``specials``) a sprinkle of NaN and ±inf.
    """
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    lo, hi = (-20, 12) if dtype == torch.float16 else (-60, 60)
    coarse = torch.randint(lo, hi + 1, (n // 8 + 1,), generator=g).repeat_interleave(8)[:n]
    e = coarse + torch.randint(-3, 4, (n,), generator=g)
    kind = torch.randint(0, 4, (n,), generator=g)
    gauss = torch.randn(n, generator=g, dtype=torch.float64)
    ints = torch.randint(-16, 17, (n,), generator=g).double() / 8
    halves = torch.randint(-8, 8, (n,), generator=g).double() + 0.5
    mant = torch.where(kind == 0, gauss, torch.where(kind == 1, ints, torch.where(kind == 2, halves, gauss * 3)))
    x = mant * torch.exp2(e.double())
    u = torch.rand(n, generator=g)
    finfo = torch.finfo(dtype)
    sub_lo = {torch.float32: -149, torch.bfloat16: -133, torch.float16: -24}[dtype]
    sub = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(sub_lo, sub_lo + 30, (n,), generator=g).double()
    )
    x = torch.where(u < 0.03, sub, x)
    x = torch.where((u >= 0.03) & (u < 0.07), torch.zeros_like(x), x)
    x = torch.where((u >= 0.07) & (u < 0.09), torch.full_like(x, -0.0), x)
    big = finfo.max * (0.5 + torch.rand(n, generator=g, dtype=torch.float64) / 2)
    x = torch.where((u >= 0.09) & (u < 0.095), big * torch.sign(gauss), x)
    runs = (torch.rand(n // 16 + 1, generator=g) < 0.05).repeat_interleave(16)[:n]
    x = torch.where(runs, torch.zeros_like(x), x)
    if specials:
        x = torch.where((u >= 0.095) & (u < 0.0965), torch.full_like(x, float("nan")), x)
        x = torch.where((u >= 0.0965) & (u < 0.0975), torch.full_like(x, float("inf")) * torch.sign(gauss), x)
    return x.to(dtype).reshape(shape)


def _shapes(q: QType) -> list[tuple[tuple[int, ...], int, bool]]:
    """(shape, dim, transpose) cases: ragged lengths along -1 and 0, a 3-D middle axis, a transposed view."""
    b = q.block_len or 48
    ragged = 3 * b + b // 2 + 1  # not a multiple of the block
    return [
        ((13, ragged), -1, False),
        ((ragged, 11), 0, False),
        ((3, ragged, 5), 1, False),
        ((2, 5, 2 * b), -1, False),
        ((2 * b + 3, 7), 1, True),  # x.t(): non-contiguous, quantized along its last axis
    ]


def _special_rate(q: QType) -> bool:
    # per-tensor scaling (nvfp4) turns a whole tensor NaN on one NaN: keep specials for a dedicated case
    return q.family != "nvfp4"


# ------------------------------------------------------------------------------------------ CPU parity
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("family,name", ALL_QTYPES, ids=[n for _, n in ALL_QTYPES])
def test_kernel_matches_reference_exact(family, name, dtype):
    device = _device()
    q0 = QType(name)
    _skip_unless_triton(q0, torch.empty(1, dtype=dtype, device=device))
    for i, (shape, dim, transpose) in enumerate(_shapes(q0)):
        x = adversarial(shape, dtype, seed=zlib.crc32(f"{name}/{i}".encode()), specials=_special_rate(q0)).to(device)
        if transpose:
            x = x.t()
            assert not x.is_contiguous()
        q = q0.dim(dim)
        before = x.clone()
        got = fakequant.quant_dequant(x, q, backend="triton")
        want = reference_quant_dequant(x, q)
        assert got.shape == x.shape and got.dtype == x.dtype
        bad = bitwise_mismatches(got, want)
        assert bad == 0, f"{name} {DTYPE_IDS[dtype]} shape={tuple(x.shape)} dim={dim}: {bad} elements differ"
        assert bitwise_mismatches(x, before) == 0  # the input is never modified


@pytest.mark.parametrize("family,name", [(f, n) for f, n in ALL_QTYPES if f == "nvfp4"] or [("nvfp4", "nvfp4")])
def test_per_tensor_specials_exact(family, name):
    """nvfp4's tensor scale: one NaN/inf makes the whole tensor NaN; an all-zero tensor gives zeros."""
    device = _device()
    q = QType(name)
    _skip_unless_triton(q, torch.empty(1, device=device))
    for x in (
        adversarial((9, 70), torch.float32, 1, specials=True),
        torch.zeros(5, 33),
        torch.full((4, 16), -0.0),
        torch.randn(6, 48),
    ):
        x = x.to(device)
        assert bitwise_mismatches(fakequant.quant_dequant(x, q, backend="triton"), reference_quant_dequant(x, q)) == 0


# Small tiles: many programs per launch, partial tiles at every edge (the interpreter otherwise runs one
# big tile). (family, qtype, launcher, tiles to try as (blocks or rows, columns or chunk, warps)).
SMALL_TILES = [
    ("mx", "mxfp8e4m3", "mx:quant_dequant_mx", [(2, 4, 4), (4, 2, 4), (2, 4, 4, True)]),
    ("mx", "e4m3k8b24:scale=rceil", "mx:quant_dequant_mx", [(2, 4, 4), (1, 8, 4)]),
    ("hif8", "hif8", "hifloat:quant_dequant_hif8", [(64, 1, 4)]),
    ("hif4", "hif4", "hifloat:quant_dequant_hif4", [(2, 4, 4), (1, 8, 4, True)]),
    ("hifx", "hifx4_v12", "hifloat:quant_dequant_hifx", [(2, 4, 4), (1, 8, 4, True)]),
    ("tmx", "tmx5", "tmx:quant_dequant_tmx", [(2, 4, 4), (2, 4, 4, True)]),
    ("nvf4", "nvf4", "nvfp:quant_dequant_nvf4", [(2, 4, 4), (2, 4, 4, True)]),
    ("nvfp4", "nvfp4", "nvfp:quant_dequant_nvfp4", [(2, 4, 4), (2, 4, 4, True)]),
    ("nf4", "nf4", "nf4:quant_dequant_nf4", [(2, 4, 4), (1, 8, 4, True)]),
    # int8sym: (rows or columns, chunk, warps[, scalar]); chunks shorter than the slice take two walks
    ("int8sym", "int8sym", "intq:quant_dequant_int8sym", [(2, 16, 4), (4, 32, 4), (4, 32, 4, True)]),
]


@pytest.mark.parametrize("family,name,launcher,tiles", SMALL_TILES, ids=[t[1] for t in SMALL_TILES])
def test_small_tiles_many_programs_exact(family, name, launcher, tiles):
    import importlib

    device = _device()
    module, func = launcher.split(":")
    fn = getattr(importlib.import_module(f"fakequant.kernels.triton.{module}"), func)
    for dtype in (torch.float32, torch.bfloat16):
        for shape, dim in (((7, 203), -1), ((203, 9), 0), ((3, 150, 5), 1)):
            x = adversarial(shape, dtype, seed=zlib.crc32(f"tiles/{name}/{shape}".encode()),
                            specials=family != "nvfp4").to(device)
            q = QType(name).dim(dim)
            want = reference_quant_dequant(x, q)
            for tile in tiles:
                got = fn(x, q, tile=tile)
                bad = bitwise_mismatches(got, want)
                assert bad == 0, f"{name} {DTYPE_IDS[dtype]} {shape} dim={dim} tile={tile}: {bad} differ"


def test_nvfp4_fast_and_exact_quotient_paths():
    """nvfp4's fl32(q*S/g): the per-block shortcut (ordinary data) and the per-element division (tiles with a
    block whose quotients leave the normal range: tiny blocks next to a huge one) both match."""
    device = _device()
    q = QType("nvfp4")
    _skip_unless_triton(q, torch.empty(1, device=device))
    g = torch.Generator().manual_seed(7)
    plain = torch.randn(64, 96, generator=g)
    wide = plain.clone()
    wide[0, :16] *= 2.0**100
    wide[5, 16:32] *= 2.0**-60
    wide[9, :] *= 2.0**-120
    for x in (plain, wide, plain * 2.0**-126, plain.bfloat16(), wide.bfloat16()):
        x = x.to(device)
        for dim in (-1, 0):
            assert bitwise_mismatches(fakequant.quant_dequant(x, q.dim(dim), backend="triton"),
                                      reference_quant_dequant(x, q.dim(dim))) == 0


def test_nvfp4_with_a_given_tensor_maximum():
    from fakequant.kernels.triton.nvfp import quant_dequant_nvfp4

    device = _device()
    x = adversarial((9, 80), torch.bfloat16, 11, specials=False).to(device)
    a = x.float().abs()
    amax = a[torch.isfinite(a)].max().reshape(1)
    q = QType("nvfp4")
    assert bitwise_mismatches(quant_dequant_nvfp4(x, q, amax=amax), reference_quant_dequant(x, q)) == 0
    with pytest.raises(TypeError, match="one-element float32"):
        quant_dequant_nvfp4(x, q, amax=amax.double())


def test_exact_ties_table():
    """Hand-worked MX cases (formats.md §1-§2 examples) through the kernel."""
    device = _device()
    rows = [
        # (format, block, expected): each row one block
        ("e2m1k8b32", [7, 1, 0.3, -0.25, 5.7], [6, 1, 0.5, -0.5, 6]),  # s = 0; -0.25 ties away to -0.5
        ("e2m1k8b32:round=even", [7, 1, 0.3, -0.25, 5.7], [6, 1, 0.5, -0.0, 6]),  # -0.25 ties to even: -0
        ("mxfp4", [7, 1, 0.3, -0.25, 5.7], [8, 1, 0, -0.0, 6]),  # 7 has significand 1.75 >= sqrt 2: s = 1
        ("e0m3k8b32c", [7.8, 1, 0.3, -6.6], [8, 2, 0, -6]),  # 7.8 would round to 8: carry, g = 1
    ]
    for name, block, expected in rows:
        x = torch.tensor(block, dtype=torch.float32, device=device)
        _skip_unless_triton(QType(name), x)
        got = fakequant.quant_dequant(x, name, backend="triton")
        assert bitwise_mismatches(got, torch.tensor(expected, dtype=torch.float32, device=device)) == 0, (name, got)


def _golden_cases():
    cases = torch.load(DATA / "qtype_public.pt", weights_only=True)["cases"]
    return [c for c in cases if c["kind"] == "quant_dequant"]


@pytest.mark.parametrize("family", sorted(QTYPES))
def test_golden_cases_through_triton(family):
    device = _device()
    cases = [c for c in _golden_cases() if QType(c["qtype"]).family == family]
    if not cases:
        pytest.skip(f"no golden quant_dequant case for {family}")
    ran = 0
    for case in cases:
        q = QType(case["qtype"]).dim(case["dim"])
        for key, value in (case.get("mods") or {}).items():
            q = getattr(q, key)(value)
        x = case["input"].to(device)
        impl = dispatch._candidates(q.family, x.device.type).get("triton")
        if impl is None or not impl.can_run(x, q)[0]:
            continue
        got = fakequant.quant_dequant(x, q, backend="triton")
        assert bitwise_mismatches(got.cpu(), case["expected"]) == 0, (case["qtype"], case.get("tag"))
        ran += 1
    if ran == 0:
        pytest.skip(f"no Triton kernel for {family} yet")


def test_launcher_checks_inputs():
    from fakequant.kernels.triton.mx import quant_dequant_mx

    device = _device()
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported"):
        quant_dequant_mx(torch.zeros(4, 32, dtype=torch.float64, device=device), QType("mxfp4"))
    with pytest.raises(ValueError, match="out of range"):
        quant_dequant_mx(torch.zeros(4, 32, device=device), QType("mxfp4").dim(2))
    with pytest.raises(ValueError, match="expected an e<E>m<M>k<K>b<B> QType"):
        quant_dequant_mx(torch.zeros(4, 32, device=device), QType("hif8"))
    empty = torch.zeros(0, 32, device=device)
    assert quant_dequant_mx(empty, QType("mxfp4")).shape == (0, 32)


# ---------------------------------------------------------------------------------- self-test refusal
def _off_by_one_ulp(real):
    """``real``, with one finite nonzero output moved one ulp (of the output dtype) away from zero."""
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

    def broken(x, q):
        y = real(x, q)
        flat = y.view(-1)
        k = int((torch.isfinite(flat) & (flat != 0)).nonzero()[0])
        flat.view(int_view[y.dtype])[k] += 1
        return y

    return broken


@pytest.fixture
def broken_mx_kernel(monkeypatch):
    """The Triton MX launcher, off by one ulp in one element; dispatch forgets earlier self-tests."""
    import fakequant.kernels.triton.mx as mx_kernels

    monkeypatch.setattr(mx_kernels, "quant_dequant_mx", _off_by_one_ulp(mx_kernels.quant_dequant_mx))
    dispatch.reset_self_tests()
    yield
    dispatch.reset_self_tests()


def _make_triton_automatic(monkeypatch, device_type):
    """On CPU the interpreter is explicit-only; let automatic choice consider it for this test."""
    state = dispatch._STATE
    impl = state.table[("mx", device_type)]["triton"]
    monkeypatch.setitem(state.table[("mx", device_type)], "triton",
                        dispatch.Implementation(impl.backend, impl.family, impl.device_type, impl.fn, impl.check, True))
    monkeypatch.setitem(state.auto_order, device_type, ["triton"])


def test_self_test_refuses_broken_kernel_and_falls_back(broken_mx_kernel, monkeypatch):
    device = _device()
    if device == "cpu":
        _make_triton_automatic(monkeypatch, "cpu")
    x = adversarial((8, 64), torch.float32, 3).to(device)
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        got = fakequant.quant_dequant(x, "mxfp4")
    assert bitwise_mismatches(got, reference_quant_dequant(x, QType("mxfp4"))) == 0
    assert dispatch.select(x, "mxfp4").backend == "torch"
    assert "REFUSED" in dispatch.describe(file=open(os.devnull, "w"))


def test_self_test_refusal_is_an_error_when_explicit(broken_mx_kernel, monkeypatch):
    x = adversarial((8, 64), torch.float32, 4).to(_device())
    with pytest.raises(RuntimeError, match="failed its self-test.*differ"):
        fakequant.quant_dequant(x, "mxfp8e4m3", backend="triton")
    monkeypatch.setenv("FAKEQUANT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="failed its self-test"):
        fakequant.quant_dequant(x, "mxfp8e4m3")


def test_self_test_passes_for_the_real_kernel():
    dispatch.reset_self_tests()
    x = torch.randn(4, 64, device=_device())
    impl = dispatch.select(x, "mxfp4", backend="triton")
    assert impl.backend == "triton"
    text = dispatch.describe(file=open(os.devnull, "w"))
    assert "triton mxfp4" in text and "passed" in text


# --------------------------------------------------------------------------------------- GPU, >= 1e8
GPU_ELEMENTS = 10**8


def _gpu_cases(family: str):
    """(qtype, dtype, dim, shape) cases totalling at least 10^8 elements for ``family``."""
    names = QTYPES[family]
    shapes = [((4096, 4099), -1), ((4101, 4096), 0), ((64, 1031, 257), 1), ((2048, 8192), -1)]
    cases, total, i = [], 0, 0
    while total < GPU_ELEMENTS:
        shape, dim = shapes[i % len(shapes)]
        cases.append((names[i % len(names)], DTYPES[i % 3], dim, shape))
        total += math.prod(shape)
        i += 1
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("family", sorted(QTYPES))
def test_gpu_parity_1e8_elements(family):
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    q0 = QType(QTYPES[family][0])
    _skip_unless_triton(q0, torch.empty(1, device="cuda"))
    total = bad_total = 0
    for k, (name, dtype, dim, shape) in enumerate(_gpu_cases(family)):
        torch.manual_seed(k)
        x = _gpu_adversarial(shape, dtype, specials=_special_rate(q0))
        q = QType(name).dim(dim)
        got = fakequant.quant_dequant(x, q, backend="triton")
        want = reference_quant_dequant(x, q)
        bad = bitwise_mismatches(got, want)
        total += x.numel()
        bad_total += bad
        if bad:
            print(f"  {family} {name} {DTYPE_IDS[dtype]} {shape} dim={dim}: {bad} mismatches")
        del x, got, want
    print(f"GPU parity {family}: {total} elements, {bad_total} mismatches ({torch.cuda.get_device_name()})")
    assert total >= GPU_ELEMENTS
    assert bad_total == 0


def _gpu_adversarial(shape, dtype, specials=True):
    """``adversarial`` built on the GPU (same recipe, torch's CUDA generator)."""
    n = math.prod(shape)
    dev = "cuda"
    lo, hi = (-20, 12) if dtype == torch.float16 else (-60, 60)
    coarse = torch.randint(lo, hi + 1, (n // 8 + 1,), device=dev).repeat_interleave(8)[:n]
    e = (coarse + torch.randint(-3, 4, (n,), device=dev)).float()
    kind = torch.randint(0, 4, (n,), device=dev)
    gauss = torch.randn(n, device=dev)
    ints = torch.randint(-16, 17, (n,), device=dev).float() / 8
    halves = torch.randint(-8, 8, (n,), device=dev).float() + 0.5
    mant = torch.where(kind == 0, gauss, torch.where(kind == 1, ints, torch.where(kind == 2, halves, gauss * 3)))
    x = mant * torch.exp2(e)
    u = torch.rand(n, device=dev)
    sub_lo = {torch.float32: -149, torch.bfloat16: -133, torch.float16: -24}[dtype]
    sub = torch.randn(n, device=dev) * torch.exp2(torch.randint(sub_lo, sub_lo + 30, (n,), device=dev).float())
    x = torch.where(u < 0.03, sub, x)
    x = torch.where((u >= 0.03) & (u < 0.07), 0.0, x)
    x = torch.where((u >= 0.07) & (u < 0.09), -0.0, x)
    big = torch.finfo(dtype).max * (0.5 + torch.rand(n, device=dev) / 2)
    x = torch.where((u >= 0.09) & (u < 0.095), big * torch.sign(gauss), x)
    if specials:
        x = torch.where((u >= 0.095) & (u < 0.0965), float("nan"), x)
        x = torch.where((u >= 0.0965) & (u < 0.0975), float("inf") * torch.sign(gauss), x)
    return x.to(dtype).reshape(shape)


@pytest.mark.cuda
def test_gpu_self_test_refuses_broken_kernel(broken_mx_kernel):
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        got = fakequant.quant_dequant(x, "mxfp8e4m3")
    assert bitwise_mismatches(got, reference_quant_dequant(x, QType("mxfp8e4m3"))) == 0


# ------------------------------------------------------------------------------------ fused pair kernel
PAIRS = [("mxfp8e4m3", "mxfp8e4m3"), ("mxfp4", "e4m3k8b16"), ("e0m7k8b32c", "e5m2k8b64:scale=rceil:round=even")]


@pytest.mark.parametrize("qa,qb", PAIRS)
def test_fused_pair_matches_reference_exact(qa, qb):
    """One read, two quantizations (along -1 and -2): each output equals its separate reference."""
    device = _device()
    from fakequant.kernels.triton.mx import quant_dequant_mx_pair

    for k, (shape, dtype) in enumerate((((70, 96), torch.float32), ((33, 45), torch.bfloat16),
                                        ((2, 64, 130), torch.float16), ((128, 128), torch.bfloat16))):
        x = adversarial(shape, dtype, seed=zlib.crc32(f"pair/{qa}/{qb}/{k}".encode())).to(device)
        for q_a, q_b in ((QType(qa), QType(qb).dim(-2)), (QType(qa).dim(-2), QType(qb))):
            got_a, got_b = quant_dequant_mx_pair(x, q_a, q_b)
            assert bitwise_mismatches(got_a, reference_quant_dequant(x, q_a)) == 0, (shape, dtype, q_a)
            assert bitwise_mismatches(got_b, reference_quant_dequant(x, q_b)) == 0, (shape, dtype, q_b)


@pytest.mark.cuda
def test_gpu_fused_pair_exact():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    from fakequant.kernels.triton.mx import quant_dequant_mx_pair

    total = bad = 0
    for k, (qa, qb) in enumerate(PAIRS):
        for dtype in DTYPES:
            x = _gpu_adversarial((4100, 4097), dtype)
            q_a, q_b = QType(qa), QType(qb).dim(-2)
            got_a, got_b = quant_dequant_mx_pair(x, q_a, q_b)
            bad += bitwise_mismatches(got_a, reference_quant_dequant(x, q_a))
            bad += bitwise_mismatches(got_b, reference_quant_dequant(x, q_b))
            total += 2 * x.numel()
    print(f"GPU fused pair: {total} outputs, {bad} mismatches ({torch.cuda.get_device_name()})")
    assert bad == 0


# --------------------------------------------------------------------------- two tensors in one launch
TWOS = [("mxfp8e4m3", (70, 96), "mxfp8e4m3:dim=0", (33, 45)), ("mxfp4:dim=0", (2, 64, 130), "e5m2k8b16", (9, 33)),
        ("e0m7k8b32c:dim=1", (3, 40, 7), "e4m3k8b64:scale=ceil:round=even", (5, 130))]


@pytest.mark.parametrize("qa,sa,qb,sb", TWOS)
def test_two_tensors_in_one_launch_match_reference_exact(qa, sa, qb, sb):
    """A GEMM's two operands, each with its own format, axis and tile, in one launch: each output equals
    its own reference, whatever the dtype."""
    device = _device()
    from fakequant.kernels.triton.mx import quant_dequant_mx_two

    for k, dtype in enumerate(DTYPES):
        x_a = adversarial(sa, dtype, seed=zlib.crc32(f"two/a/{qa}/{k}".encode())).to(device)
        x_b = adversarial(sb, dtype, seed=zlib.crc32(f"two/b/{qb}/{k}".encode())).to(device)
        got_a, got_b = quant_dequant_mx_two(x_a, QType(qa), x_b, QType(qb))
        assert bitwise_mismatches(got_a, reference_quant_dequant(x_a, QType(qa))) == 0, (qa, dtype)
        assert bitwise_mismatches(got_b, reference_quant_dequant(x_b, QType(qb))) == 0, (qb, dtype)


def test_two_tensors_refuse_mixed_dtypes():
    from fakequant.kernels.triton.mx import quant_dequant_mx_two

    with pytest.raises(ValueError, match="must share dtype and device"):
        quant_dequant_mx_two(torch.ones(4, 32), QType("mxfp4"), torch.ones(4, 32, dtype=torch.bfloat16), QType("mxfp4"))


@pytest.mark.cuda
def test_gpu_two_tensors_in_one_launch_exact():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    from fakequant.kernels.triton.mx import quant_dequant_mx_two

    total = bad = 0
    for qa, _, qb, _ in TWOS:
        for dtype in DTYPES:
            x_a, x_b = _gpu_adversarial((8192, 768), dtype), _gpu_adversarial((2304, 768), dtype)
            q_a, q_b = QType(qa).dim(-1 if QType(qa).q_dim == -1 else 0), QType(qb).dim(-1 if QType(qb).q_dim == -1 else 0)
            got_a, got_b = quant_dequant_mx_two(x_a, q_a, x_b, q_b)
            bad += bitwise_mismatches(got_a, reference_quant_dequant(x_a, q_a))
            bad += bitwise_mismatches(got_b, reference_quant_dequant(x_b, q_b))
            total += x_a.numel() + x_b.numel()
    print(f"GPU two-tensor launch: {total} outputs, {bad} mismatches ({torch.cuda.get_device_name()})")
    assert bad == 0


@pytest.mark.parametrize("qg,qa,qb", [("e5m2k8b32", "mxfp8e4m3:dim=0", "mxfp8e4m3:dim=0"),
                                      ("mxfp4", "e0m7k8b32c:dim=0", "e4m3k8b16:scale=rceil:dim=0")])
def test_pair_and_two_in_one_launch_match_reference_exact(qg, qa, qb):
    """A Linear's backward in one launch: grad_output along N and along M, weight and input along their
    own axes; each output equals its own reference, whatever the dtype, and either order of the pair."""
    device = _device()
    from fakequant.kernels.triton.mx import quant_dequant_mx_pair_two

    for k, dtype in enumerate(DTYPES):
        g = adversarial((70, 96), dtype, seed=zlib.crc32(f"p2/g/{qg}/{k}".encode())).to(device)
        x_a = adversarial((96, 40), dtype, seed=zlib.crc32(f"p2/a/{qa}/{k}".encode())).to(device)
        x_b = adversarial((70, 40), dtype, seed=zlib.crc32(f"p2/b/{qb}/{k}".encode())).to(device)
        q_n, q_m, q_a, q_b = QType(qg), QType(qg).dim(-2), QType(qa), QType(qb)
        for order in ((q_n, q_m), (q_m, q_n)):
            outs = quant_dequant_mx_pair_two(g, *order, x_a, q_a, x_b, q_b)
            for out, (t, q) in zip(outs, ((g, order[0]), (g, order[1]), (x_a, q_a), (x_b, q_b))):
                assert bitwise_mismatches(out, reference_quant_dequant(t, q)) == 0, (q, dtype)


@pytest.mark.cuda
def test_gpu_pair_and_two_in_one_launch_exact():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    from fakequant.kernels.triton.mx import quant_dequant_mx_pair_two

    total = bad = 0
    for dtype in DTYPES:
        g, w, x = (_gpu_adversarial(s, dtype) for s in ((8192, 3072), (3072, 768), (8192, 768)))
        qs = (QType("e5m2k8b32"), QType("e5m2k8b32").dim(-2), QType("mxfp8e4m3").dim(-2), QType("mxfp4").dim(-2))
        outs = quant_dequant_mx_pair_two(g, qs[0], qs[1], w, qs[2], x, qs[3])
        for out, t, q in zip(outs, (g, g, w, x), qs):
            bad += bitwise_mismatches(out, reference_quant_dequant(t, q))
            total += t.numel()
    print(f"GPU pair + two in one launch: {total} outputs, {bad} mismatches ({torch.cuda.get_device_name()})")
    assert bad == 0
