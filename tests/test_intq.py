"""int8sym reference (formats.md §10): hand-worked slices, hypothesis properties."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType

from .conftest import assert_bitwise_equal

NAN, INF = float("nan"), float("inf")
FLT_MAX = torch.finfo(torch.float32).max
PROPS = settings(max_examples=40, deadline=None)


INT8SYM_BY_HAND = [
    # amax 127 -> step 1: 63.5 is a tie -> even 64; -0.5 -> even 0 with the input's sign (-0); 1.5 -> 2.
    ((127, 63.5, -0.5, 1.5), (127, 64, -0.0, 2)),
    # amax 254 -> step 2: 1/2 = 0.5 -> 0; 3/2 = 1.5 -> 2 -> 4; -0 input -> +0.
    ((254, 1, 3, -0.0), (254, 0, 4, 0)),
    # amax 1 -> step = fl32(1/127); 0.5/step = 63.5 (to within an ulp, 63.500004) -> 64; 64 * step rounds.
    ((1, 0.5), (1, (torch.tensor(1.0) / 127 * 64).item())),
    # A zero slice gives zeros, never 0/0 = NaN (an earlier-system bug, §12.5).
    ((0, -0.0, 0), (0, 0, 0)),
    # A slice with an inf or a NaN is NaN as a whole.
    ((1, INF, 2), (NAN, NAN, NAN)),
    ((NAN, 5, -3), (NAN, NAN, NAN)),
    # amax = FLT_MAX: 127 * fl32(FLT_MAX/127) rounds up to inf, which saturates to FLT_MAX (§0 Output).
    ((FLT_MAX, -FLT_MAX), (FLT_MAX, -FLT_MAX)),
    # amax = 63 * 2^-149: fl32(amax/127) underflows to 0, which gives zeros like a zero slice.
    ((63 * 2.0**-149, -(2.0**-149)), (0, -0.0)),
]


@pytest.mark.parametrize("values, expected", INT8SYM_BY_HAND)
def test_int8sym_by_hand(values, expected):
    out = fakequant.quant_dequant(torch.tensor(values, dtype=torch.float32), "int8sym")
    assert_bitwise_equal(out, torch.tensor(expected, dtype=torch.float32))


def test_one_scale_per_slice_along_dim():
    # Row 0 has amax 127 (step 1), row 1 amax 254 (step 2); along dim 0 each column is its own slice.
    x = torch.tensor([[127.0, 1.0], [254.0, 3.0]])
    assert fakequant.quant_dequant(x, "int8sym").tolist() == [[127.0, 1.0], [254.0, 4.0]]
    step = 3.0 / 127  # column 1: amax 3
    col = fakequant.quant_dequant(x, QType("int8sym").dim(0))[:, 1]
    assert col.tolist() == [(torch.tensor(3.0) / 127 * 42).item(), 3.0] and round(1.0 / step) == 42


# --------------------------------------------------------------------------------------------------------
# Properties

# Magnitudes within 2^±20 (and zeros): scaling by 2^±40 keeps every intermediate a normal float32.
_finite = st.floats(-(2.0**20), 2.0**20, width=32).map(lambda v: 0.0 if 0 < abs(v) < 2.0**-20 else v)


@st.composite
def _tensors(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (rows, cols), elements=_finite)))


@PROPS
@given(x=_tensors())
def test_sign_symmetry(x):
    # step comes from max |x|, q from |x|, the sign is applied last: q(-x) = -q(x), +0 for ±0 inputs.
    out = fakequant.quant_dequant(x, "int8sym")
    assert_bitwise_equal(fakequant.quant_dequant(-x, "int8sym"), torch.where(x == 0, 0.0, -out))


@PROPS
@given(x=_tensors(), k=st.integers(-40, 40), dim=st.sampled_from([0, 1]))
def test_power_of_two_equivariance(x, k, dim):
    # step = fl32(amax/127) scales by 2^k exactly, |x|/step is unchanged, q * step scales by 2^k (all normal).
    q = QType("int8sym").dim(dim)
    assert_bitwise_equal(fakequant.quant_dequant(x * 2.0**k, q), fakequant.quant_dequant(x, q) * 2.0**k)


@PROPS
@given(x=_tensors(), dim=st.sampled_from([0, 1]))
def test_idempotent_up_to_the_sign_of_zero(x, dim):
    # The slice max maps to q = 127, so the new amax is fl32(127 * step), and fl32(fl32(127 * s)/127) = s for
    # every s = fl32(a/127) (checked exhaustively over all float32 significands; it fails for other s), so the
    # step comes back; each fl32(q * step)/step is within an ulp of the integer q <= 127 and rounds back.
    # A -0 output (negative input rounded to zero) is a -0 input the second time, which gives +0 (§0 Sign).
    q = QType("int8sym").dim(dim)
    once = fakequant.quant_dequant(x, q)
    assert_bitwise_equal(fakequant.quant_dequant(once, q), once + 0.0)


@PROPS
@given(x=_tensors())
def test_other_axis_is_a_transpose(x):
    assert_bitwise_equal(
        fakequant.quant_dequant(x, QType("int8sym").dim(0)), fakequant.quant_dequant(x.T.contiguous(), "int8sym").T
    )


@PROPS
@given(x=_tensors())
def test_at_most_255_levels_per_slice(x):
    # Every output is an integer in [-127, 127] times the slice's step.
    out = fakequant.quant_dequant(x, "int8sym")
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    live = step > 0
    k = torch.where(live, out / torch.where(live, step, 1.0), 0.0)
    assert (k.abs() <= 127.0001).all() and torch.allclose(k, k.round(), atol=1e-3)


def test_bf16_input_computes_in_fp32():
    torch.manual_seed(3)
    x = (torch.randn(6, 33) * torch.exp2(torch.randint(-10, 10, (6, 33)).float())).bfloat16()
    x[0, 3], x[2] = -0.0, 0.0
    for q in (QType("int8sym"), QType("int8sym").dim(0)):
        assert_bitwise_equal(fakequant.quant_dequant(x, q), fakequant.quant_dequant(x.float(), q).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_not_mutated(dtype):
    x = torch.tensor([[7, 1, 0.3, -2.6, NAN, 0.0, -0.0, 1e-3], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=dtype)
    before = x.clone()
    fakequant.quant_dequant(x, QType("int8sym").dim(0))
    fakequant.quant_dequant(x, "int8sym")
    assert_bitwise_equal(x, before)
