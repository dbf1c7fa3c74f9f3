"""``tmx<N>`` reference (formats.md §5): hand-worked blocks, a literal oracle and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType

from .conftest import assert_bitwise_equal

SOME_TMX = ["tmx3", "tmx4", "tmx6", "tmx8", "tmx10", "tmx16", "tmx25"]



def _qd(x: torch.Tensor, name: str) -> torch.Tensor:
    return fakequant.quant_dequant(x, QType(name))


def _block(values: list[float], length: int = 16) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (length - len(values)))


# ------------------------------------------------------------------------------------------ hand-worked
def test_tmx6_hand_worked_block():
    """tmx6, M = 4. Pairs (3.3, 0.1) (0.6, 0) (-0.1, 0) (3.99, 0): e2 = 1, -1, -4, 1, so eb = 1 and
    Q = max(e2, 0) = 1, 0, 0, 1. Elements are RHAZ(|x| * 2^(3-Q)) / 8 * 2^Q, mantissa capped at 15/8."""
    out = _qd(_block([3.3, 0.1, 0.6, 0, -0.1, 0, 3.99]), "tmx6")
    expected = _block([
        3.25,  # Q = 1: 3.3 * 4 = 13.2 -> 13, 13/8 * 2
        0,  # Q = 1: 0.1 * 4 = 0.4 -> 0
        0.625,  # Q = 0: 0.6 * 8 = 4.8 -> 5, 5/8
        0,
        -0.125,  # Q = 0 (eb - 1, not its own -4): -0.1 * 8 = -0.8 -> -1, -1/8
        0,
        3.75,  # Q = 1: 3.99 * 4 = 15.96 -> 16 = mantissa 2: capped at 15/8 * 2
    ])
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize(
    "name, values, expected",
    [
        # tmx3 (M = 1): mantissa 1 only, so each pair keeps one power of two 2^Q or 0.
        ("tmx3", [3.0 * 2.0**-149, 2.0**-149], [2.0**-148, 2.0**-148]),  # Q = -148: t = 1.5, 0.5 -> 1, 1
        # Pairs (0.9, 0.2) (0.3, 0): e2 = -1, -2, eb = -1, Q = -1, -2. t = |x| * 2^-Q: 1.8 -> 2 is mantissa 2,
        # capped at 1 (0.5); 0.4 -> 0; 1.2 -> 1 (0.25).
        ("tmx3", [0.9, 0.2, 0.3], [0.5, 0.0, 0.25]),
        # tmx25 (M = 23): the grid of a subnormal block is finer than fp32's, so its values come back exactly.
        ("tmx25", [3.0 * 2.0**-149, -(2.0**-149)], [3.0 * 2.0**-149, -(2.0**-149)]),
        # Largest values: Q = 127 and the mantissa capped at 2 - 2^(1-M) (here M = 4: 15/8 * 2^127).
        ("tmx6", [3.4e38, 1.0], [15 / 8 * 2.0**127, 0.0]),
    ],
)
def test_extreme_blocks(name, values, expected):
    assert_bitwise_equal(_qd(_block(values), name), _block(expected))


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_special_value_makes_only_its_block_nan(special):
    x = torch.linspace(-3, 5, 48).reshape(1, -1)  # three blocks of 16
    x[0, 20] = special
    out = _qd(x, "tmx6")
    assert torch.isnan(out[:, 16:32]).all()
    assert_bitwise_equal(out[:, :16], _qd(x[:, :16], "tmx6"))
    assert_bitwise_equal(out[:, 32:], _qd(x[:, 32:], "tmx6"))


def test_signed_zeros_and_zero_blocks():
    out = _qd(_block([-0.0, 0.0, -1e-30, 100.0]), "tmx6")
    assert not torch.signbit(out[:2]).any()  # ±0 in -> +0
    assert out[2].item() == 0 and torch.signbit(out[2])  # a negative input that rounds to zero -> -0
    assert_bitwise_equal(_qd(-torch.zeros(3, 16), "tmx8"), torch.zeros(3, 16))  # all-zero blocks: +0


def test_ragged_tail_and_axis():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 37, generator=g)
    assert_bitwise_equal(_qd(x, "tmx6"), _qd(torch.nn.functional.pad(x, (0, 11)), "tmx6")[:, :37])
    assert_bitwise_equal(fakequant.quant_dequant(x, QType("tmx6").dim(0)), _qd(x.t().contiguous(), "tmx6").t())


# ------------------------------------------------------------------------------------------ oracle
def _tmx_oracle(row: list[float], m: int) -> list[float]:
    """formats.md §5 transcribed one element at a time, in float64 (fp32 values and 2^±171 are exact)."""
    n = len(row)
    row = row + [0.0] * ((-n) % 16)
    out = []
    for b in range(0, len(row), 16):
        block = row[b:b + 16]
        if not all(math.isfinite(v) for v in block):
            out += [math.nan] * 16
            continue
        e2 = [math.frexp(m_)[1] - 1 if m_ > 0 else -math.inf
              for m_ in (max(abs(block[i]), abs(block[i + 1])) for i in range(0, 16, 2))]
        eb = max(e2)
        for i, v in enumerate(block):
            q = max(e2[i // 2], eb - 1)
            if q == -math.inf:  # all-zero block
                out.append(0.0)
                continue
            k = min(math.floor(abs(v) * 2.0 ** (m - 1 - q) + 0.5), 2**m - 1)  # RHAZ, exact in float64
            r = k * 2.0 ** (q + 1 - m)
            out.append(-r if v < 0 else r)
    return out[:n]


@st.composite
def _tensors(draw, exp_lo: int = -149, exp_hi: int = 126, max_len: int = 70):
    """Significands in [1, 2) at exponents in [exp_lo, exp_hi] with mixed signs and zeros."""
    n = draw(st.integers(1, max_len))
    sig = draw(st.lists(st.floats(1.0, 2.0, exclude_max=True, width=32), min_size=n, max_size=n))
    exp = draw(st.lists(st.integers(exp_lo, exp_hi), min_size=n, max_size=n))
    sign = draw(st.lists(st.sampled_from([1.0, -1.0, 0.0]), min_size=n, max_size=n))
    return torch.tensor(np.array(sig, np.float32) * np.exp2(np.array(exp, np.float32)) * np.array(sign, np.float32))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(3, 25))
def test_matches_a_literal_oracle(data, n):
    """Over the whole fp32 range: blocks of subnormals (Q down to -149 needs 2^(M+148), outside fp32) and
    blocks near FLT_MAX, for every N; exponent windows keep some blocks narrow so pairs interact."""
    lo = data.draw(st.integers(-149, 120), label="exponent low")
    x = data.draw(_tensors(exp_lo=lo, exp_hi=min(lo + data.draw(st.integers(0, 30)), 126)), label="x")
    expected = torch.tensor(_tmx_oracle(x.tolist(), n - 2), dtype=torch.float32)
    assert_bitwise_equal(_qd(x, f"tmx{n}"), expected)


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(_tensors(), st.sampled_from(SOME_TMX))
def test_sign_symmetry(x, name):
    """Pair exponents come from magnitudes, RHAZ is symmetric and the sign is put back from the input,
    so q(-x) = -q(x); inputs ±0 give +0."""
    y = _qd(x, name)
    assert_bitwise_equal(_qd(-x, name), torch.where(x == 0, y, -y))


@settings(max_examples=40, deadline=None)
@given(_tensors(exp_lo=-80, exp_hi=80), st.integers(-40, 40), st.sampled_from(SOME_TMX))
def test_power_of_two_equivariance(x, shift, name):
    """tmx has a free shared scale: Q = max(e2, eb - 1) is relative to the data with no clamp, so scaling
    by 2^j moves every Q by j and leaves every t = |x| * 2^(M-1-Q) alone (values stay normal fp32 here)."""
    assert_bitwise_equal(_qd(x * 2.0**shift, name), _qd(x, name) * 2.0**shift)


@settings(max_examples=40, deadline=None)
@given(_tensors(), st.sampled_from(SOME_TMX))
def test_idempotence(x, name):
    """The mantissa cap keeps a pair's outputs below 2^(Q+1), and a top pair's maximum (>= 2^eb, which is
    on the grid) stays >= 2^eb, so eb and every Q are unchanged and the values are on their grids: tmx
    maps its outputs to themselves, up to the sign of zero (-0 -> +0)."""
    y = _qd(x, name)
    assert_bitwise_equal(_qd(y, name), y + 0.0)


@settings(max_examples=30, deadline=None)
@given(_tensors(exp_lo=-126, exp_hi=126), st.sampled_from(SOME_TMX))
def test_bf16_input_is_computed_in_fp32(x, name):
    """A bf16 input (8 significant bits) rounded to a grid keeps at most 8 bits (a grid finer than the
    input's leaves it unchanged; the cap only bites for M <= 8), so the fp32 result casts back exactly."""
    xb = x.bfloat16()
    before = xb.clone()
    assert_bitwise_equal(_qd(xb, name), _qd(xb.float(), name).bfloat16())
    assert_bitwise_equal(xb, before)
