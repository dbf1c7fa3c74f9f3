"""Rules every reference family follows (formats.md §0), checked for one QType of each family.

The per-family numerics are pinned by the golden files and the family test modules; here we check the
contract around them: dtypes, axes, padding, special shapes, non-mutation and errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType

from .conftest import assert_bitwise_equal

ONE_PER_FAMILY = [
    "mxfp4", "e4m3k8b32:round=even:scale=rceil", "e0m3k8b32c", "e2m1K1k3B2b16off20", "hifx4_v12", "tmx6",
    "hif8", "hif8:saturate=false", "hif4", "nvf4", "nvfp4", "nf4", "nf4B4b16", "int8sym", "bf16", "fp16",
]


def _sample(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes spread over many binades, so blocks mix large and tiny values.
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    return x.to(dtype)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bf16_and_fp16_inputs_equal_fp32_computation(name):
    """Arithmetic is float32 for every dtype (formats.md §0, §12.2): bf16 in == fp32 of the same values."""
    q = QType(name)
    for dtype in (torch.bfloat16, torch.float16):
        x = _sample((6, 130), seed=1).to(dtype)
        before = x.clone()
        out = fakequant.quant_dequant(x, q)
        assert out.dtype == dtype and out.shape == x.shape
        assert_bitwise_equal(out, fakequant.quant_dequant(x.float(), q).to(dtype) if dtype == torch.bfloat16
                             else _saturate_to_fp16(fakequant.quant_dequant(x.float(), q)))
        assert_bitwise_equal(x, before)  # never mutated


def _saturate_to_fp16(y: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(torch.float16).max
    return torch.where(torch.isinf(y), y, y.clamp(-big, big)).half()


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_any_axis_equals_moving_that_axis_last(name):
    """Quantizing along axis d is quantizing the transposed tensor along its last axis."""
    x = _sample((3, 70, 5), seed=2)
    for d in (0, 1, -2):
        expected = fakequant.quant_dequant(x.movedim(d, -1).contiguous(), QType(name)).movedim(-1, d)
        assert_bitwise_equal(fakequant.quant_dequant(x, QType(name).dim(d)), expected)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_non_contiguous_views(name):
    base = _sample((40, 96), seed=3)
    view = base.t()[::2]  # strided, non-contiguous
    assert not view.is_contiguous()
    assert_bitwise_equal(fakequant.quant_dequant(view, QType(name)),
                         fakequant.quant_dequant(view.contiguous(), QType(name)))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_empty_and_zero_dim(name):
    empty = torch.empty(3, 0)
    assert fakequant.quant_dequant(empty, QType(name)).shape == (3, 0)
    scalar = torch.tensor(2.75)
    out = fakequant.quant_dequant(scalar, QType(name))
    assert out.shape == () and out.dtype == scalar.dtype
    assert_bitwise_equal(out.reshape(1), fakequant.quant_dequant(scalar.reshape(1), QType(name)))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_all_zero_input_gives_zeros(name):
    z = torch.zeros(4, 64)
    assert_bitwise_equal(fakequant.quant_dequant(z, QType(name)), z)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_large_tensors_in_pieces_equal_whole(name, monkeypatch):
    """reference_quant_dequant quantizes a large tensor in pieces split along another axis (every family but
    nvfp4, whose scale is per tensor); the result is the one of the whole tensor, on every axis and dtype."""
    x = _sample((9, 5, 130), seed=6)
    x[1, 2, :40] = -0.0  # -0 and NaN in some pieces only
    x[4, 0, 3] = float("nan")
    for d in (0, 1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            q, xd = QType(name).dim(d), x.to(dtype)
            monkeypatch.setattr(fakequant.formats._common, "PIECE_ELEMENTS", 1 << 30)
            whole = fakequant.quant_dequant(xd, q, backend="torch")
            monkeypatch.setattr(fakequant.formats._common, "PIECE_ELEMENTS", 600)
            pieces = fakequant.quant_dequant(xd, q, backend="torch")
            assert pieces.is_contiguous()
            assert_bitwise_equal(pieces, whole)


def test_padding_does_not_change_values():
    """A ragged tail is padded with zeros, which never raise a block maximum."""
    x = _sample((2, 45), seed=4)
    padded = torch.nn.functional.pad(x, (0, 19))  # 64 = 2 blocks of 32
    out = fakequant.quant_dequant(x, QType("mxfp4"))
    assert_bitwise_equal(out, fakequant.quant_dequant(padded, QType("mxfp4"))[:, :45])


def test_errors():
    with pytest.raises(TypeError, match="floating tensor"):
        fakequant.quant_dequant(torch.arange(4), QType("mxfp4"))
    with pytest.raises(ValueError, match=r"dim=2 is out of range for a tensor of rank 2"):
        fakequant.quant_dequant(torch.ones(2, 3), QType("mxfp4").dim(2))
    with pytest.raises(ValueError, match="unrecognised"):
        fakequant.quant_dequant(torch.ones(2), "mxfp5")
    with pytest.raises(TypeError, match="QType or a format string"):
        fakequant.quant_dequant(torch.ones(2), 4)


# ---------------------------------------------------------------------------------- MX properties
_finite = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(_finite, min_size=1, max_size=70), st.integers(-40, 40),
       st.sampled_from(["mxfp4", "e4m3k8b32", "e5m2k8b16c", "e0m3k8b32c", "e3m2k8b8:scale=rceil"]))
def test_mx_sign_symmetry_and_power_of_two_equivariance(values, shift, name):
    """MX has a free shared scale: multiplying a block by 2^j only moves its E8M0 exponent by j, so the
    result scales exactly while the scale stays inside [-127, 127] (we keep far from both ends); the sign is
    taken from the input, so negating the input negates the output."""
    x = torch.tensor(values, dtype=torch.float32)
    q = QType(name)
    y = fakequant.quant_dequant(x, q)
    assert_bitwise_equal(fakequant.quant_dequant(-x, q), torch.where(x == 0, y, -y))
    scaled = x * 2.0**shift
    if torch.isfinite(scaled).all() and (x.abs().max() == 0 or x[x != 0].abs().min() > 2.0**-60):
        assert_bitwise_equal(fakequant.quant_dequant(scaled, q), y * 2.0**shift)


@settings(max_examples=60, deadline=None)
@given(st.lists(_finite, min_size=1, max_size=70), st.sampled_from(["e4m3k8b32", "e2m1k8b32", "e0m7k8b32"]))
def test_mx_floor_scale_is_idempotent(values, name):
    """With the floor rule a quantized block keeps its maximum's exponent, so its values are on the grid
    of the same scale and quantize to themselves, except that a -0 output comes back as +0 (±0 in → +0)."""
    x = torch.tensor(values, dtype=torch.float32)
    y = fakequant.quant_dequant(x, QType(name))
    assert_bitwise_equal(fakequant.quant_dequant(y, QType(name)), y + 0.0)  # y + 0.0 turns -0 into +0


@pytest.mark.parametrize("man_bits", [10, 23])
def test_e8_elements_span_float32(man_bits):
    """E = 8 elements have emax 128, one binade beyond float32 (the arithmetic runs one binade lower).
    With E8M0 scales every element keeps its own exponent, so the result is the input rounded half away
    to M fraction bits (no element here reaches max_norm); a float64 oracle computes that directly."""
    x = _sample((8, 64), seed=5)
    x[0, 0] = 3e38  # a block maximum in float32's top binade
    xd = x.double()
    mant, e = torch.frexp(xd.abs())
    t = mant * 2.0 ** (man_bits + 1)
    rounded = torch.floor(t) + ((t - torch.floor(t)) >= 0.5)
    expected = torch.copysign(rounded / 2.0 ** (man_bits + 1) * torch.exp2(e.double()), xd).float()
    assert_bitwise_equal(fakequant.quant_dequant(x, QType(f"e8m{man_bits}k8b32")), expected)
