"""nf4 and nf4B<BO>b<B> references (formats.md §9): hand-worked blocks, hypothesis properties."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType
from fakequant.formats._common import round_int
from fakequant.formats.nf4 import NF4_CODES, NF4_THRESHOLDS, _INTERVAL_SHIFT, _nf4_search_tables, _rhaz_

from .conftest import assert_bitwise_equal

NAN, INF = float("nan"), float("inf")
FAMILIES = ("nf4", "nf4_double")
DOUBLE = ("nf4B8b8", "nf4B4b16", "nf4B2b4", "nf4B3b5")  # the golden forms and two odd ones
PROPS = settings(max_examples=30, deadline=None)


def _f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _pad(values, n: int) -> torch.Tensor:
    return torch.tensor(list(values) + [0.0] * (n - len(values)), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# nf4 by hand

C = [torch.tensor(c, dtype=torch.float32).item() for c in NF4_CODES]  # the codes as float32
T = [torch.tensor(t, dtype=torch.float32).item() for t in NF4_THRESHOLDS]

NF4_BY_HAND = [
    # A = 2, so fl32(1/A) = 0.5 and every fl32(c * A) = 2c exactly.
    ((2.0,), (2 * C[15],)),       # v = 1 exceeds all 15 thresholds: code 15 = 1
    ((2.0, 1.0), (2.0, 2 * C[12])),  # v = 0.5: above t_11 = 0.389, below t_12 = 0.5017 -> code 12 = 0.4407
    ((2.0, -0.5), (2.0, 2 * C[4])),  # v = -0.25: above t_3 = -0.3397, below t_4 = -0.2346 -> code 4
    ((2.0, 0.1), (2.0, 2 * C[8])),   # v = 0.05: above t_7 = 0.0398, below t_8 = 0.1203 -> code 8
    ((2.0, -0.05, -0.0), (2.0, 0.0, 0.0)),  # v = -0.025 and -0: code 7 = 0, always +0 (nf4 has no -0)
    ((-2.0, 1.4), (-2.0, 2 * C[14])),  # v = 0.7: code 14; the block max -2 gives v = -1 -> code 0 = -1
    # An exact tie takes the smaller index: with A = 1, x = t_7 gives v = t_7, which does not exceed t_7.
    ((1.0, T[7]), (1.0, 0.0)),
    ((1.0, T[12]), (1.0, C[12])),
    # The code book is asymmetric: 0.7229568 is code 14, but -0.7229568 lies between t_0 and t_1 -> code 1.
    ((1.0, C[14]), (1.0, C[14])),
    ((-1.0, -C[14]), (-1.0, C[1])),
]


@pytest.mark.parametrize("values, expected", NF4_BY_HAND)
def test_nf4_by_hand(values, expected):
    out = fakequant.quant_dequant(_pad(values, 64), "nf4")
    assert_bitwise_equal(out[: len(expected)], torch.tensor(expected, dtype=torch.float32))


def test_nf4_zero_block_and_nan_block():
    # Block 0 is all zero (A = 0 -> +0), block 1 holds an inf (NaN), block 2 a NaN (NaN), block 3 finite.
    x = torch.cat([_pad([-0.0], 64), _pad([1, INF], 64), _pad([NAN], 64), _pad([2.0, 1.0], 64)])
    out = fakequant.quant_dequant(x, "nf4")
    assert_bitwise_equal(out[:64], torch.zeros(64))
    assert torch.isnan(out[64:192]).all()
    assert out[192:194].tolist() == [2.0, 2 * C[12]]


def test_nf4_tiny_absmax_follows_the_count_rule():
    # A = 3 * 2^-149 < 2^-128: fl32(1/A) = inf, so v = ±inf for nonzero x (codes 15 and 0) and v = 0 * inf =
    # NaN for zeros, which exceeds no threshold: code 0 = -1, so zeros give -A. This is §9's count taken
    # literally, as bitsandbytes' comparison tree does, and the golden case nf4-mixed_bf16 holds such a block.
    a = 3 * 2.0**-149
    out = fakequant.quant_dequant(_pad([a, -(2.0**-149)], 64), "nf4")
    assert out[:3].tolist() == [a, -a, -a]


# --------------------------------------------------------------------------------------------------------
# nf4B by hand

NF4_DOUBLE_BY_HAND = [
    # nf4B2b4: an outer block of 2 groups of 4. Group 0 (7, 3.5, -1, 0): gm = gmm = 7, so t = 448, tq = 448,
    # gd = 7; k = RHAZ(|x|/7 * 7) = 7, 4 (3.5 is a tie, away from zero), 1, 0; fl32(k/7) * 7 = 7, 4, 1, 0.
    # Group 1 (1.1, 0.5, -0.2, 0.05): t = fl32(1.1/7) * 448 = 70.4 -> E4M3 (step 8 in [64, 128)) 72,
    # gd = fl32(72/448) * 7 = 1.125; k = 7, 3 (3.18), 1 (1.27), 0 (0.32) -> 1.125, fl32(3/7) * 1.125, ...
    ("nf4B2b4", (7, 3.5, -1, 0, 1.1, 0.5, -0.2, 0.05),
     (7, 4, -1, 0, 1.125, 0.4821428656578064, -0.1607142984867096, 0)),
    # Signs follow §0 (unlike nf4): a negative input that rounds to zero gives -0; -0 gives +0.
    # gm = 1 = gmm: gd = 1, k = RHAZ(0.49) = 0 -> -0, RHAZ(0.5) = 1 (tie away) -> fl32(1/7).
    ("nf4B2b4", (1, -0.07, 1 / 14, -0.0), (1, -0.0, 0.1428571492433548, 0)),
    # A zero group next to a live one gives zeros; a group with an inf is NaN and is left out of gmm, so the
    # other group keeps gd = gm = 2 (t = 448).
    ("nf4B2b4", (0, -0.0, 0, 0, 2, 1, 0, 0), (0, 0, 0, 0, 2, 1.1428571939468384, 0, 0)),
    ("nf4B2b4", (INF, 5, 0, 0, 2, 1, 0, 0), (NAN, NAN, NAN, NAN, 2, 1.1428571939468384, 0, 0)),
    # The E4M3 step of the group maximum rounds half away from zero: gmm = 7, gm = 1.3125 = 7 * 3/16, so
    # t = 3/16 * 448 = 84 = 1.0101b * 2^6, halfway between 80 and 88 -> 88 (ties to even would give 80);
    # gd = fl32(88/448) * 7 = 1.375. k = 7 -> 1.375; 0.65 -> 3.47 -> 3 -> fl32(3/7) * 1.375.
    ("nf4B2b4", (7, 0, 0, 0, 1.3125, 0.65, 0, 0), (7, 0, 0, 0, 1.375, 0.5892857313156128, 0, 0)),
]


@pytest.mark.parametrize("name, values, expected", NF4_DOUBLE_BY_HAND)
def test_nf4_double_by_hand(name, values, expected):
    out = fakequant.quant_dequant(_f32(*values), name)
    assert_bitwise_equal(out, _f32(*expected))


def test_rhaz_ties_and_neighbours():
    # nf4B's k uses a two-pass exact RHAZ; every tie n + 1/2 in [0, 8] and the float32 on each side of it,
    # and the value 0.5 - 2^-25 where floor(t + 0.5) goes wrong, against the reference round_int.
    ties = torch.arange(0, 8, dtype=torch.float32) + 0.5
    t = torch.cat([ties, ties.nextafter(torch.tensor(0.0)), ties.nextafter(torch.tensor(9.0)),
                   torch.arange(0, 9, dtype=torch.float32), _f32(0.5 - 2**-25, 2**-149, 0.0),
                   torch.rand(10000) * 8])
    assert torch.equal(_rhaz_(t.clone()), round_int(t, "nearest"))


def test_search_tables_count_thresholds_below():
    # nf4's index search (a count below each 12-bit interval plus one comparison) against the 15 comparisons
    # of the definition, on every 4099th float32 pattern and the 64 patterns around each threshold (NaN is
    # -inf by then). A one-off run checked all 2^32 patterns.
    below, threshold = _nf4_search_tables(torch.device("cpu"))
    t = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32)
    around = (t.view(torch.int32)[:, None] + torch.arange(-32, 32, dtype=torch.int32)).reshape(-1)
    v = torch.cat([torch.arange(-(2**31), 2**31, 4099, dtype=torch.int64).to(torch.int32), around])
    v = v.view(torch.float32).nan_to_num(nan=-INF, posinf=INF, neginf=-INF)
    interval = torch.bitwise_right_shift(v.view(torch.int32), _INTERVAL_SHIFT).bitwise_and_(0xFFF).long()
    index = below[interval] + (v > threshold[interval]).float()
    assert torch.equal(index, (v[:, None] > t).sum(1).float())


# --------------------------------------------------------------------------------------------------------
# Properties

# Magnitudes within 2^±20 (and zeros): scaling by 2^±40 keeps every intermediate a normal float32.
_finite = st.floats(-(2.0**20), 2.0**20, width=32).map(lambda v: 0.0 if 0 < abs(v) < 2.0**-20 else v)


@st.composite
def _tensors(draw):
    rows, cols = draw(st.integers(1, 2)), draw(st.integers(1, 100))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (rows, cols), elements=_finite)))


def _minus(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-y, except +0 where x is ±0 (inputs ±0 give +0, §0 Sign)."""
    return torch.where(x == 0, 0.0, -y)


@pytest.mark.parametrize("name", DOUBLE)
@PROPS
@given(x=_tensors())
def test_nf4_double_sign_symmetry(name, x):
    # gm, gmm, t, tq and gd come from magnitudes, k from |x|, and the sign is applied last: q(-x) = -q(x)
    # (+0 for ±0 inputs). nf4 has no such property: its code book is asymmetric (see test_nf4_by_hand).
    assert_bitwise_equal(fakequant.quant_dequant(-x, name), _minus(fakequant.quant_dequant(x, name), x))


@pytest.mark.parametrize("name", ("nf4",) + DOUBLE)
@PROPS
@given(x=_tensors(), k=st.integers(-40, 40))
def test_power_of_two_equivariance(name, x, k):
    # nf4: fl32(1/A) scales by 2^-k exactly, so v and the code are unchanged and c*A scales by 2^k.
    # nf4B: gm/gmm, t, tq and |x|/gm are ratios and unchanged; gd = fl32(tq/448) * gmm scales by 2^k.
    # Exact while everything stays a normal float32 (hence magnitudes within 2^±20 and k within ±40).
    out = fakequant.quant_dequant(x, name)
    assert_bitwise_equal(fakequant.quant_dequant(x * 2.0**k, name), out * 2.0**k)


@PROPS
@given(x=_tensors())
def test_nf4_idempotent(x):
    # The block max maps to ±1 (v = ±fl32(A * fl32(1/A)), within an ulp of ±1, beyond t_0 / t_14), so the
    # quantized block has the same A, and each fl32(c * A) * fl32(1/A) is within ulps of c, far from every
    # threshold (the thresholds are midpoints): the codes come back. nf4 outputs only +0, so this is exact.
    once = fakequant.quant_dequant(x, "nf4")
    assert_bitwise_equal(fakequant.quant_dequant(once, "nf4"), once)


@pytest.mark.parametrize("name", DOUBLE)
@PROPS
@given(x=_tensors())
def test_nf4_double_idempotent_up_to_the_sign_of_zero(name, x):
    # The group max has k = 7 and gives gd, so gm' = gd; the top group has gd = gmm, so gmm' = gmm;
    # t' = fl32(gd/gmm) * 448 is within ulps of the E4M3 value tq and rounds back to it, so gd' = gd; and
    # fl32(k/7) * gd / gd * 7 is within ulps of the integer k. -0 outputs become +0 inputs (§0 Sign).
    once = fakequant.quant_dequant(x, name)
    assert_bitwise_equal(fakequant.quant_dequant(once, name), once + 0.0)


@pytest.mark.parametrize("name", ("nf4",) + DOUBLE)
@PROPS
@given(x=_tensors())
def test_other_axis_is_a_transpose(name, x):
    # Blocks run along dim; quantizing along dim 0 is quantizing the transpose along its last dim.
    assert_bitwise_equal(
        fakequant.quant_dequant(x, QType(name).dim(0)), fakequant.quant_dequant(x.T.contiguous(), name).T
    )


@PROPS
@given(x=_tensors())
def test_nf4_is_monotone_within_a_block(x):
    # v = x * fl32(1/A) is monotone in x, the index counts thresholds below v, the codes increase: sorting
    # a block's inputs sorts its outputs.
    row = x[0, :64]
    order = torch.argsort(row, stable=True)
    out = fakequant.quant_dequant(row, "nf4")[order]
    assert (out[1:] >= out[:-1]).all()


@pytest.mark.parametrize("name", ("nf4", "nf4B8b8", "nf4B4b16"))
def test_bf16_input_computes_in_fp32(name):
    torch.manual_seed(2)
    x = (torch.randn(6, 150) * torch.exp2(torch.randint(-10, 10, (6, 150)).float())).bfloat16()
    x[0, 3], x[2, :64] = -0.0, 0.0
    assert_bitwise_equal(fakequant.quant_dequant(x, name), fakequant.quant_dequant(x.float(), name).bfloat16())


@pytest.mark.parametrize("name", ("nf4", "nf4B8b8"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_not_mutated(name, dtype):
    x = torch.tensor([[7, 1, 0.3, -2.6, NAN, 0.0, -0.0, 1e-3] * 9], dtype=dtype)
    before = x.clone()
    fakequant.quant_dequant(x, QType(name).dim(0))
    fakequant.quant_dequant(x, name)
    assert_bitwise_equal(x, before)
