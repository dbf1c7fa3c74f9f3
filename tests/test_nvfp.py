"""nvf4 / nvfp4 reference (formats.md §8) and the E2M1 / E4M3 bit-level helpers of ``fakequant.formats.nvfp``.

Golden cases bit for bit, hand-worked blocks, every E2M1 code and E4M3 byte, and hypothesis properties
(each says why it holds, and where it stops holding).
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType
from fakequant.formats.nvfp import (
    E2M1_VALUES,
    block_scales,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    e4m3_from_bits,
    e4m3_round,
    e4m3_to_bits,
)

from .conftest import assert_bitwise_equal

NAN, INF = float("nan"), float("inf")
FAMILIES = ("nvf4", "nvfp4")
PROPS = settings(max_examples=40, deadline=None)


def _block(*values: float) -> torch.Tensor:
    """One 16-element block: the values, zero-padded."""
    return torch.tensor(list(values) + [0.0] * (16 - len(values)), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# Hand-worked blocks


NVF4_BY_HAND = [
    # The spec's example: amax 7 -> 7/6 = 1.1667 -> E4M3 (3 fraction bits) 1.125; |x|/S = 6.22, 0.89, 0.27, 2.31
    # -> E2M1 6, 1, 0.5, 2 -> times S.
    ((7, 1, 0.3, -2.6), (6.75, 1.125, 0.5625, -2.25)),
    # amax 6 -> S = 1, so the elements show E2M1's ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    # 2.5 -> 2, 3.5 -> 4, 5 -> 4; a negative value that rounds to zero keeps its sign (-0.1 -> -0).
    ((6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.1), (6, 0, 1, 1, 2, 2, 4, 4, -0.0)),
    # amax/6 = 1000 > 448: S saturates at 448; |x|/S = 13.4 saturates at 6, 4.46 -> 4, 0.22 -> -0.
    ((6000, 2000, -100), (2688, 1792, -0.0)),
    # amax 6 * 2^-10 -> amax/6 = 2^-10 is the tie between E4M3 0 and 2^-9: to even -> S = 0 -> zeros, -0 for
    # negative inputs, +0 for -0 inputs.
    ((6 * 2**-10, -2**-12, -0.0), (0, -0.0, 0)),
    # amax/6 = 1.25 * 2^-9 is an E4M3 subnormal: it rounds to S = 2^-9 (1.25 steps -> 1); |x|/S = 7.5 -> 6.
    ((7.5 * 2**-9, 2**-9), (6 * 2**-9, 2**-9)),
]


@pytest.mark.parametrize("values, expected", NVF4_BY_HAND)
def test_nvf4_by_hand(values, expected):
    out = fakequant.quant_dequant(_block(*values), "nvf4")
    assert_bitwise_equal(out[: len(expected)], torch.tensor(expected, dtype=torch.float32))


NVFP4_BY_HAND = [
    # One block whose max is the tensor max A = 2688: g = fl32(2688/A) = 1, S = E4M3(2688 * fl32(1/6)) = 448,
    # enc = fl32(1/448); |x|*enc = 6, 2.23, 0.67, 0.0011 -> 6, 2, 0.5, 0 -> q*S/g = 2688, 896, -224, 0.
    ((_block(2688, 1000, -300, 0.5),), slice(0, 4), (2688, 896, -224, 0)),
    # A second block with amax 1 under the same g = 1: S = E4M3(fl32(1/6)) = 11/64 = 0.171875,
    # enc = fl32(1/S) = 5.818; |x|*enc = 5.82, 1.75 - 0.005, 1.16, 0.29 -> 6, 1.5, 1, 0.5 -> times S.
    ((_block(2688), _block(1, 0.3, -0.2, 0.05)), slice(16, 20), (1.03125, 0.2578125, -0.171875, 0.0859375)),
    # An all-zero tensor: A = 0, g = FLT_MAX, every S = 0 -> zeros (+0 for -0 inputs).
    ((_block(0, -0.0),), slice(0, 2), (0, 0)),
]


@pytest.mark.parametrize("blocks, where, expected", NVFP4_BY_HAND)
def test_nvfp4_by_hand(blocks, where, expected):
    out = fakequant.quant_dequant(torch.cat(blocks), "nvfp4")
    assert_bitwise_equal(out[where], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("name", FAMILIES)
def test_nonfinite_makes_its_block_nan(name):
    # Block 0 holds an inf, block 1 a NaN, block 2 is finite: only blocks 0 and 1 become NaN (§0, Specials).
    x = torch.cat([_block(1, INF, 2), _block(NAN, 3), _block(7, 1, 0.3, -2.6)])
    out = fakequant.quant_dequant(x, name)
    assert torch.isnan(out[:32]).all()
    assert torch.isfinite(out[32:]).all()
    if name == "nvf4":
        assert out[32:36].tolist() == [6.75, 1.125, 0.5625, -2.25]


def test_nvfp4_tensor_max_counts_finite_elements_of_nan_blocks():
    # §8: A is the max over the finite elements of the whole tensor, including the 5376 that shares a block
    # with an inf. So A = 5376, g = 0.5, and the finite block's amax 2688 gets S = E4M3(2688 * 0.5/6) = 224.
    x = torch.cat([_block(5376, INF), _block(2688, 1000)])
    scales = block_scales(x, QType("nvfp4"))
    assert scales.tensor.item() == 0.5
    assert torch.isnan(scales.block[0]) and scales.block[1].item() == 224.0
    # enc = fl32(1/fl32(224 * 2)) = fl32(1/448): 1000 -> 2.23 -> 2 -> 2 * 224 / 0.5 = 896.
    assert fakequant.quant_dequant(x, "nvfp4")[16:18].tolist() == [2688.0, 896.0]


def test_nvfp4_all_nan_tensor_is_nan():
    # No finite element: A = 0 (zeros), but every block holds a NaN, so every block is NaN.
    assert torch.isnan(fakequant.quant_dequant(torch.full((20,), NAN), "nvfp4")).all()


# --------------------------------------------------------------------------------------------------------
# E2M1 codes and E4M3 bytes


E2M1_BY_HAND = [
    # code: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal (0.5 * m).
    (0b0000, 0.0),   # +0
    (0b0001, 0.5),   # subnormal 0.5 * 1
    (0b0010, 1.0),   # 2^0 * 1.0
    (0b0011, 1.5),   # 2^0 * 1.5
    (0b0100, 2.0),   # 2^1 * 1.0
    (0b0101, 3.0),   # 2^1 * 1.5
    (0b0110, 4.0),   # 2^2 * 1.0
    (0b0111, 6.0),   # 2^2 * 1.5, the largest
    (0b1000, -0.0),  # -0
    (0b1111, -6.0),  # sign + largest
]


@pytest.mark.parametrize("code, value", E2M1_BY_HAND)
def test_e2m1_codes_by_hand(code, value):
    assert_bitwise_equal(e2m1_decode(torch.tensor([code])), torch.tensor([value]))


def test_all_e2m1_codes_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert values[:8].tolist() == list(E2M1_VALUES)
    assert torch.equal(values[8:].abs(), values[:8]) and torch.signbit(values[8:]).all()
    assert torch.equal(e2m1_encode(values), codes)


def test_e2m1_encode_rounds_to_even_and_saturates():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, INF, -0.1, -1e9])
    # ties go to the even mantissa: 0, 1, 1, 2, 2, 4, 4; beyond 6 saturates; -0.1 rounds to -0 (code 8).
    assert e2m1_encode(values).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 7, 8, 15]
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(torch.tensor([NAN]))


def test_all_e4m3_bytes_round_trip():
    b = torch.arange(256, dtype=torch.uint8)
    values = e4m3_from_bits(b)
    # An independent decoder: torch's float8_e4m3fn is the same OCP E4M3FN encoding.
    assert_bitwise_equal(values, b.view(torch.float8_e4m3fn).float())
    assert torch.equal(e4m3_to_bits(values), b)  # 0x7F / 0xFF (NaN) keep their sign bit too
    assert torch.equal(e4m3_round(values[~torch.isnan(values)]), values[~torch.isnan(values)])


E4M3_BY_HAND = [
    (0x00, 0.0),         # +0
    (0x01, 2.0**-9),     # smallest subnormal: 1/8 * 2^-6
    (0x07, 7 * 2.0**-9), # largest subnormal
    (0x08, 2.0**-6),     # smallest normal: exponent field 1, bias 7
    (0x38, 1.0),         # exponent field 7 = bias
    (0x39, 1.125),       # one mantissa step above 1
    (0x7E, 448.0),       # largest finite: 2^8 * 1.75 (0x7F is NaN)
    (0x80, -0.0),        # -0
    (0xFE, -448.0),
]


@pytest.mark.parametrize("byte, value", E4M3_BY_HAND)
def test_e4m3_bytes_by_hand(byte, value):
    assert_bitwise_equal(e4m3_from_bits(torch.tensor([byte])), torch.tensor([value]))
    assert e4m3_to_bits(torch.tensor([value])).item() == byte


E4M3_ROUNDING = [
    (2.0**-10, 0.0),               # half the smallest subnormal: tie, to even 0
    (3 * 2.0**-10, 2 * 2.0**-9),   # 1.5 subnormal steps: tie, to even 2 steps
    (1.0625, 1.0),                 # halfway between 1 and 1.125: to even 1.0
    (1.1875, 1.25),                # halfway between 1.125 and 1.25: to even 1.25
    (464.0, 448.0),                # above 448 saturates (min(v, 448) first, never 480)
    (INF, 448.0),
    (-1.1875, -1.25),              # the magnitude rounds, the sign stays
]


@pytest.mark.parametrize("value, expected", E4M3_ROUNDING)
def test_e4m3_round_by_hand(value, expected):
    assert_bitwise_equal(e4m3_round(torch.tensor([value])), torch.tensor([expected]))


def test_e4m3_nan_bytes():
    assert e4m3_to_bits(torch.tensor([NAN, -NAN])).tolist() == [0x7F, 0xFF]
    assert torch.isnan(e4m3_from_bits(torch.tensor([0x7F, 0xFF]))).all()


@PROPS
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-448, 448, width=32)))
def test_e4m3_matches_torch_float8_cast(values):
    # Within ±448 torch's float8_e4m3fn cast is a correctly rounded ties-to-even cast: an independent check
    # of e4m3_round and e4m3_to_bits.
    v = torch.from_numpy(values)
    assert_bitwise_equal(e4m3_round(v), v.to(torch.float8_e4m3fn).float())
    assert torch.equal(e4m3_to_bits(v), v.to(torch.float8_e4m3fn).view(torch.uint8))


@PROPS
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(0, 16, width=32)))
def test_e2m1_round_matches_the_grid_definition(values):
    # e2m1_round uses add-and-subtract rounding; it must equal §8's min(grid(v; 1, 0), 6) with ties to even.
    from fakequant.formats._common import grid

    v = torch.from_numpy(values)
    assert_bitwise_equal(e2m1_round(v), torch.clamp(grid(v, 1, 0, "even"), max=6.0))


# --------------------------------------------------------------------------------------------------------
# Scales for packing


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_nvf4_scales_reproduce_the_reference(dim):
    # An nvf4 element is e2m1(|x|/S) * S with the sign of x: decoding the E4M3 byte of S and the E2M1 code of
    # the element must give quant_dequant back, bit for bit.
    torch.manual_seed(0)
    x = torch.randn(5, 40) * torch.exp2(torch.randint(-12, 12, (5, 40)).float())
    q = QType("nvf4").dim(dim)
    s = block_scales(x, q)
    assert s.tensor is None
    moved = x.movedim(dim, -1)
    assert s.block.shape == (*moved.shape[:-1], -(-moved.shape[-1] // 16))
    scale = e4m3_from_bits(e4m3_to_bits(s.block)).repeat_interleave(16, -1)[..., : moved.shape[-1]]
    codes = e2m1_encode(torch.where(moved < 0, -1.0, 1.0) * e2m1_round(moved.abs() / scale))
    out = torch.where(scale > 0, e2m1_decode(codes) * scale, torch.where(moved < 0, -0.0, 0.0))
    assert_bitwise_equal(out.movedim(-1, dim), fakequant.quant_dequant(x, q))


def test_nvfp4_scales():
    x = torch.cat([_block(2688, 1000), _block(1, 0.3), _block(0.0), _block(NAN)]).reshape(2, 32)
    s = block_scales(x, QType("nvfp4"))
    assert s.tensor.item() == 1.0  # g = fl32(2688 / 2688)
    assert s.block[0].tolist() == [448.0, 0.171875]  # E4M3(2688 * fl32(1/6)), E4M3(fl32(1/6))
    assert s.block[1, 0].item() == 0.0 and torch.isnan(s.block[1, 1])
    with pytest.raises(ValueError, match="nvf4 or nvfp4"):
        block_scales(x, QType("nf4"))


# --------------------------------------------------------------------------------------------------------
# Properties

# Magnitudes within 2^±20 (and zeros): scaling by 2^±40 keeps every intermediate a normal float32.
_finite = st.floats(-(2.0**20), 2.0**20, width=32).map(lambda v: 0.0 if 0 < abs(v) < 2.0**-20 else v)


@st.composite
def _tensors(draw, elements=_finite):
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 50))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (rows, cols), elements=elements)))


@st.composite
def _blocks_with_maxima(draw, low: int, high: int):
    """Tensors whose every 16-block along the last axis has its largest magnitude in [2^low, 2^high)."""
    unit = st.floats(-1, 1, width=32, exclude_min=True, exclude_max=True)
    x = draw(_tensors(unit.map(lambda v: 0.0 if abs(v) < 2.0**-20 else v)))  # no subnormals after 2^k
    rows, cols = x.shape
    n_blocks = -(-cols // 16)
    tops = draw(hnp.arrays(np.float32, (rows, n_blocks), elements=st.floats(1, 2, width=32, exclude_max=True)))
    exps = draw(hnp.arrays(np.int32, (rows, n_blocks), elements=st.integers(low, high - 1)))
    x[:, ::16] = torch.from_numpy(tops) * torch.where(x[:, ::16] < 0, -1.0, 1.0)  # [rows, n_blocks]
    return x * torch.exp2(torch.from_numpy(exps).float()).repeat_interleave(16, dim=1)[:, :cols]


# nvf4 block scales are normal E4M3 numbers, unsaturated, when amax/6 is in [2^-6, 448]: amax in [2^-3, 2^11).
NVF4_NORMAL = (-3, 11)


@st.composite
def _nvf4_shiftable(draw):
    """(x, k): x's block maxima and those of x * 2^k all lie in NVF4_NORMAL."""
    lo = draw(st.integers(NVF4_NORMAL[0], NVF4_NORMAL[1] - 1))
    hi = draw(st.integers(lo + 1, NVF4_NORMAL[1]))
    x = draw(_blocks_with_maxima(lo, hi))
    return x, draw(st.integers(NVF4_NORMAL[0] - lo, NVF4_NORMAL[1] - hi))


def _minus(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-y, except +0 where x is ±0 (inputs ±0 give +0, §0 Sign)."""
    return torch.where(x == 0, 0.0, -y)


@pytest.mark.parametrize("name", FAMILIES)
@PROPS
@given(x=_tensors())
def test_sign_symmetry(name, x):
    # Both scales come from magnitudes only (block amax; nvfp4's A = max |x|), elements are rounded from
    # |x|, and the sign is put back at the end: q(-x) = -q(x), with +0 for ±0 inputs.
    assert_bitwise_equal(fakequant.quant_dequant(-x, name), _minus(fakequant.quant_dequant(x, name), x))


@PROPS
@given(x=_tensors(), k=st.integers(-40, 40))
def test_nvfp4_power_of_two_equivariance(x, k):
    # A scales by 2^k, so g = fl32(2688/A) scales by 2^-k exactly; the products amax_b * g/6 and |x| * enc are
    # then unchanged, and so are S, q; q*S/g scales by 2^k. Exact as long as nothing leaves the normal range.
    out = fakequant.quant_dequant(x, "nvfp4")
    assert_bitwise_equal(fakequant.quant_dequant(x * 2.0**k, "nvfp4"), out * 2.0**k)


@PROPS
@given(xk=_nvf4_shiftable())
def test_nvf4_power_of_two_equivariance_within_e4m3_range(xk):
    # nvf4's block scale is E4M3(amax/6) itself, and E4M3 rounding commutes with 2^k only while amax/6 and
    # amax/6 * 2^k both lie in E4M3's normal range [2^-6, 448] (below it the grid is fixed, above it
    # saturates). Then S scales by 2^k, |x|/S is unchanged, and so is q; q*S scales by 2^k.
    x, k = xk
    assert_bitwise_equal(fakequant.quant_dequant(x * 2.0**k, "nvf4"), fakequant.quant_dequant(x, "nvf4") * 2.0**k)


def test_nvf4_power_of_two_equivariance_breaks_below_e4m3_normal_range():
    # amax/6 = 1.25 * 2^-9 is an E4M3 subnormal and rounds to S = 2^-9; scaled by 2^10 it is 2.5, exact in
    # E4M3. The scales differ by 2^10 * 1.25, so the element 2^-9 gives 2^-9 but 2^1 gives 2.5.
    x = _block(7.5 * 2**-9, 2**-9)
    assert fakequant.quant_dequant(x, "nvf4")[1].item() == 2.0**-9
    assert fakequant.quant_dequant(x * 2.0**10, "nvf4")[1].item() == 2.5


@PROPS
@given(x=_blocks_with_maxima(*NVF4_NORMAL))
def test_nvf4_idempotent_up_to_the_sign_of_zero(x):
    # With S normal, S is within 2^-4 of amax/6, so the block max maps to 6 and the quantized block's max is
    # exactly 6*S; requantizing gives S again, and every element q*S divides back to q exactly.
    # A -0 output (negative input rounded to zero) is a -0 input the second time, which gives +0 (§0 Sign).
    once = fakequant.quant_dequant(x, "nvf4")
    assert_bitwise_equal(fakequant.quant_dequant(once, "nvf4"), once + 0.0)


@PROPS
@given(low=st.integers(-20, 7), data=st.data())
def test_nvfp4_idempotent_up_to_the_sign_of_zero(low, data):
    # Block maxima within 2^13 of the tensor max keep every block scale amax_b * g/6 >= 448 * 2^-14 normal.
    # The top element maps to 6 * 448 / g, and fl32(2688 / fl32(2688 / fl32(2688 / A))) = fl32(2688 / A)
    # for every float32 significand (checked exhaustively), so g comes back; each block max maps to 6 * S
    # (S normal is within 2^-4 of amax_b * g/6), so S comes back, and every q*S/g multiplies back to q.
    # A -0 output is a -0 input the second time, which gives +0 (§0 Sign).
    x = data.draw(_blocks_with_maxima(low, low + 13))
    once = fakequant.quant_dequant(x, "nvfp4")
    assert_bitwise_equal(fakequant.quant_dequant(once, "nvfp4"), once + 0.0)


def test_nvf4_not_idempotent_with_subnormal_scales():
    # amax/6 just above 2^-10 rounds up to S = 2^-9, the block max quantizes to 3 * 2^-9, and 3 * 2^-9 / 6 =
    # 2^-10 is then the E4M3 tie to 0: the second pass gives zeros.
    x = _block(6 * 2.0**-10 * 1.01)
    once = fakequant.quant_dequant(x, "nvf4")
    assert once[0].item() == 3 * 2.0**-9
    assert fakequant.quant_dequant(once, "nvf4")[0].item() == 0.0


@pytest.mark.parametrize("name", FAMILIES)
@PROPS
@given(x=_tensors())
def test_other_axis_is_a_transpose(name, x):
    # Blocks run along dim; quantizing along dim 0 is quantizing the transpose along its last dim.
    assert_bitwise_equal(
        fakequant.quant_dequant(x, QType(name).dim(0)), fakequant.quant_dequant(x.T.contiguous(), name).T
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_input_computes_in_fp32(name):
    torch.manual_seed(1)
    x = (torch.randn(6, 50) * torch.exp2(torch.randint(-10, 10, (6, 50)).float())).bfloat16()
    x[0, 3], x[2, :16] = -0.0, 0.0
    assert_bitwise_equal(fakequant.quant_dequant(x, name), fakequant.quant_dequant(x.float(), name).bfloat16())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_not_mutated(name, dtype):
    x = torch.tensor([[7, 1, 0.3, -2.6, NAN, 0.0, -0.0, 1e-3] * 3], dtype=dtype)
    before = x.clone()
    fakequant.quant_dequant(x, QType(name).dim(0))
    fakequant.quant_dequant(x, name)
    assert_bitwise_equal(x, before)
