"""The dispatch table: selection rules, FAKEQUANT_BACKEND, explicit errors, register(), describe(), the
self-test canary and the fused pair helper. Kernel numerics are tested in test_triton_parity.py."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import fakequant  # noqa: E402
from fakequant import QType, dispatch  # noqa: E402
from fakequant.formats import reference_quant_dequant  # noqa: E402

from .conftest import bitwise_mismatches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CI without triton
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("FAKEQUANT_BACKEND", raising=False)
    dispatch.reset_self_tests()
    yield
    dispatch.reset_self_tests()


def test_cpu_automatic_choice_is_the_reference():
    x = torch.randn(4, 64)
    assert dispatch.select(x, "mxfp4").backend == "torch"
    assert bitwise_mismatches(fakequant.quant_dequant(x, "mxfp4"), reference_quant_dequant(x, "mxfp4")) == 0


def test_every_family_has_a_reference_on_every_device():
    for family in ("mx", "mx_hier", "hifx", "tmx", "hif8", "hif4", "nvf4", "nvfp4", "nf4", "nf4_double", "int8sym",
                   "cast"):
        assert "torch" in dispatch._candidates(family, "cpu")
        assert "torch" in dispatch._candidates(family, "cuda")
        assert "torch" in dispatch._candidates(family, "npu")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="backend 'cuda' is not one of torch, triton, npu"):
        fakequant.quant_dequant(torch.randn(4, 32), "mxfp4", backend="cuda")


def test_env_backend_is_read_at_call_time_and_validated(monkeypatch):
    x = torch.randn(4, 32)
    monkeypatch.setenv("FAKEQUANT_BACKEND", "torch")
    assert dispatch.select(x, "mxfp4").backend == "torch"
    monkeypatch.setenv("FAKEQUANT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FAKEQUANT_BACKEND='tpu' is not one of torch, triton, npu"):
        fakequant.quant_dequant(x, "mxfp4")


def test_explicit_backend_without_implementation_raises_with_reason():
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="backend 'npu' has no implementation of format family 'mx'"):
        fakequant.quant_dequant(x, "mxfp4", backend="npu")


@needs_triton
def test_explicit_triton_on_fp64_raises_capability_reason():
    x = torch.randn(4, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported by the Triton kernels"):
        fakequant.quant_dequant(x, "mxfp4", backend="triton")
    # automatic choice falls back quietly to the reference
    assert fakequant.quant_dequant(x, "mxfp4").dtype == torch.float64


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fakequant.quant_dequant(x, "mxfp4", backend="triton")


def test_register_rejects_bad_input_and_duplicates(monkeypatch):
    monkeypatch.setattr(dispatch, "_STATE", dispatch._State())
    with pytest.raises(ValueError, match="backend 'gpu' is not one of"):
        dispatch.register("gpu", "mx", "cuda", lambda x, q: x)
    with pytest.raises(ValueError, match="family 'mxx' is not one of"):
        dispatch.register("npu", "mxx", "npu", lambda x, q: x)
    with pytest.raises(TypeError, match="fn must be a callable"):
        dispatch.register("npu", "mx", "npu", "no_colon")
    dispatch.register("npu", "mx", "npu", lambda x, q: x)
    with pytest.raises(ValueError, match="already implements 'mx' on 'npu'"):
        dispatch.register("npu", "mx", "npu", lambda x, q: x)
    dispatch.register("npu", "mx", "npu", lambda x, q: x, replace=True)
    assert dispatch._STATE.auto_order["npu"] == ["npu"]


def test_registered_backend_is_chosen_automatically_after_its_self_test(monkeypatch):
    """A backend registered for a device type (as fakequant_npu does) runs its canary, then serves calls."""
    calls = []

    def impl(x, q):
        calls.append(q.desc)
        return reference_quant_dequant(x, q)

    monkeypatch.setattr(dispatch, "_STATE", dispatch._State())
    dispatch._register_builtins()
    dispatch.register("npu", "mx", "cpu", impl, lambda x, q: (True, ""))  # pretend CPU is an NPU
    x = torch.randn(8, 64)
    y = fakequant.quant_dequant(x, "mxfp4")
    assert dispatch.select(x, "mxfp4").backend == "npu"
    assert bitwise_mismatches(y, reference_quant_dequant(x, "mxfp4")) == 0
    assert len(calls) == 3  # canary along -1 and 0, then the call itself
    assert "mx@cpu -> npu" in dispatch.describe(file=open(os.devnull, "w"))


def test_broken_registered_backend_is_refused_with_a_warning(monkeypatch):
    def off_by_one_ulp(x, q):
        y = reference_quant_dequant(x, q)
        return torch.nextafter(y, torch.full_like(y, float("inf")))

    monkeypatch.setattr(dispatch, "_STATE", dispatch._State())
    dispatch._register_builtins()
    dispatch.register("npu", "hif8", "cpu", off_by_one_ulp)
    x = torch.randn(8, 64)
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        y = fakequant.quant_dequant(x, "hif8")
    assert bitwise_mismatches(y, reference_quant_dequant(x, "hif8")) == 0
    with pytest.raises(RuntimeError, match="failed its self-test.*elements differ"):
        fakequant.quant_dequant(x, "hif8", backend="npu")
    text = dispatch.describe(file=open(os.devnull, "w"))
    assert "REFUSED" in text and "npu hif8 on cpu float32" in text


def test_canary_covers_the_corner_cases():
    c = dispatch.canary(QType("mxfp4"), torch.float32, "cpu")
    assert c.dim() == 2 and c.shape[1] % 32 != 0 and c.shape[0] > 32
    assert torch.isnan(c).any() and torch.isinf(c).any()
    assert (c == 0).any() and torch.signbit(c[c == 0]).any()
    tiny = c[(c != 0) & torch.isfinite(c)].abs()
    assert (tiny < 2.0**-126).any()  # subnormals
    exponents = torch.frexp(c[torch.isfinite(c) & (c != 0)])[1]
    assert int(exponents.max() - exponents.min()) > 60  # many scales


def test_describe_prints_the_table(capsys):
    text = dispatch.describe()
    out = capsys.readouterr().out
    assert text in out
    assert "FAKEQUANT_BACKEND=unset" in text
    assert "mx          cuda   triton" in text
    assert "cuda: triton > torch" in text


@needs_triton
def test_quant_dequant_two_matches_two_calls():
    x, w = torch.randn(70, 96), torch.randn(36, 96)
    qa, qb = QType("mxfp8e4m3"), QType("mxfp4").dim(0)
    a, b = dispatch.quant_dequant_two(x, qa, w, qb, backend="triton")
    assert bitwise_mismatches(a, reference_quant_dequant(x, qa)) == 0
    assert bitwise_mismatches(b, reference_quant_dequant(w, qb)) == 0
    assert "fused two" in dispatch.describe(file=open(os.devnull, "w"))
    # not fusable (a hif8 operand; mixed dtypes): two calls, same numbers
    a, b = dispatch.quant_dequant_two(x, QType("hif8"), w, qb, backend="triton")
    assert bitwise_mismatches(a, reference_quant_dequant(x, QType("hif8"))) == 0
    a, b = dispatch.quant_dequant_two(x, qa, w.bfloat16(), qb, backend="triton")
    assert b.dtype == torch.bfloat16 and bitwise_mismatches(b, reference_quant_dequant(w.bfloat16(), qb)) == 0


@needs_triton
def test_quant_dequant_pair_two_matches_separate_calls():
    dy, w, x = torch.randn(70, 36), torch.randn(36, 96), torch.randn(70, 96)
    qs = (QType("e5m2k8b32"), QType("e5m2k8b32").dim(0), QType("mxfp8e4m3").dim(0), QType("mxfp4").dim(0))
    outs = dispatch.quant_dequant_pair_two(dy, qs[0], qs[1], w, qs[2], x, qs[3], backend="triton")
    for out, t, q in zip(outs, (dy, dy, w, x), qs):
        assert bitwise_mismatches(out, reference_quant_dequant(t, q)) == 0
    assert "fused pair_two" in dispatch.describe(file=open(os.devnull, "w"))
    # a non-MX operand: the pair and the two separately, same numbers
    outs = dispatch.quant_dequant_pair_two(dy, qs[0], qs[1], w, QType("hif8"), x, qs[3], backend="triton")
    assert bitwise_mismatches(outs[2], reference_quant_dequant(w, QType("hif8"))) == 0
    assert bitwise_mismatches(outs[1], reference_quant_dequant(dy, qs[1])) == 0


@needs_triton
def test_broken_two_tensor_kernel_is_refused_by_its_self_test(monkeypatch):
    import fakequant.kernels.triton.mx as mx_kernels

    real = mx_kernels.quant_dequant_mx_two

    def one_ulp_off(x_a, q_a, x_b, q_b):
        y_a, y_b = real(x_a, q_a, x_b, q_b)
        return y_a, torch.nextafter(y_b, torch.full_like(y_b, float("inf")))

    monkeypatch.setattr(mx_kernels, "quant_dequant_mx_two", one_ulp_off)
    dispatch.reset_self_tests()
    try:
        x, w = torch.randn(8, 64), torch.randn(16, 64)
        with pytest.raises(RuntimeError, match="fused Triton two kernel failed its self-test"):
            dispatch.quant_dequant_two(x, "mxfp8e4m3", w, "mxfp4", backend="triton")
    finally:
        dispatch.reset_self_tests()


@needs_triton
def test_quant_dequant_pair_matches_two_calls():
    x = torch.randn(70, 96)
    qa, qb = QType("mxfp8e4m3"), QType("mxfp4").dim(0)
    a, b = dispatch.quant_dequant_pair(x, qa, qb, backend="triton")
    assert bitwise_mismatches(a, reference_quant_dequant(x, qa)) == 0
    assert bitwise_mismatches(b, reference_quant_dequant(x, qb)) == 0
    assert "fused pair" in dispatch.describe(file=open(os.devnull, "w"))
    # not fusable (hif8 is elementwise, odd block): two calls, same numbers
    a, b = dispatch.quant_dequant_pair(x, QType("hif8"), QType("e4m3k8b24").dim(0), backend="triton")
    assert bitwise_mismatches(b, reference_quant_dequant(x, QType("e4m3k8b24").dim(0))) == 0
    # reference backend: two reference calls
    a, b = dispatch.quant_dequant_pair(x, qa, qb)
    assert bitwise_mismatches(a, reference_quant_dequant(x, qa)) == 0


def test_quant_dequant_checks_its_input():
    with pytest.raises(TypeError, match="floating tensor"):
        fakequant.quant_dequant(torch.ones(4, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(ValueError, match="out of range"):
        fakequant.quant_dequant(torch.ones(4, 32), QType("mxfp4").dim(3))
