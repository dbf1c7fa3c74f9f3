"""HiF8, HiF4 and hifx<N>_v12 references (formats.md §4, §6, §7), the HiF8 codec and ``hifp.quant_hif8``.

The golden cases (tests/test_golden.py) pin the numbers; the code table and the spec's examples are checked row by row; the
properties below are the ones each format actually has (each test says why it holds).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fakequant
from fakequant import QType
from fakequant.formats.hifloat import hif8_decode, hif8_encode
from fakequant.hifp import quant_hif8

from .conftest import DATA, assert_bitwise_equal

CODE_TABLE = json.loads((DATA / "hif8_codes.json").read_text())
FAMILIES = ("hif8", "hif4", "hifx")
HIFX = ["hifx2_v12", "hifx3_v12", "hifx4_v12", "hifx5_v12"]
BLOCK_FORMATS = ["hif4", *HIFX]
ALL_FORMATS = ["hif8", "hif8:saturate=false", *BLOCK_FORMATS]



def _qd(x: torch.Tensor, name: str | QType) -> torch.Tensor:
    return fakequant.quant_dequant(x, QType(name) if isinstance(name, str) else name)


def _table_value(entry: dict) -> float:
    return float(entry["value"])  # "nan", "inf", "-inf" parse as floats too


# ------------------------------------------------------------------------------------------ HiF8 codec
def test_decode_matches_the_code_table():
    assert [e["code"] for e in CODE_TABLE] == list(range(256))
    expected = torch.tensor([_table_value(e) for e in CODE_TABLE], dtype=torch.float32)
    decoded = hif8_decode(torch.arange(256, dtype=torch.uint8))
    assert decoded.dtype == torch.float32
    assert_bitwise_equal(decoded, expected)
    # The specials sit where the layout puts them: -0's code is NaN, 1.5 * 2^15's codes are ±inf.
    assert [i for i in range(256) if math.isnan(decoded[i])] == [0x80]
    assert decoded[0x6F] == math.inf and decoded[0xEF] == -math.inf
    # Other integer dtypes decode alike.
    assert_bitwise_equal(hif8_decode(torch.arange(256, dtype=torch.int32)), expected)


def test_encode_inverts_decode():
    codes = torch.arange(256, dtype=torch.uint8)
    values = hif8_decode(codes)
    encoded = hif8_encode(values)
    assert encoded.dtype == torch.uint8
    finite_or_inf = ~torch.isnan(values)
    assert torch.equal(encoded[finite_or_inf], codes[finite_or_inf])
    assert encoded[0x80] == 0x80  # NaN -> the NaN code


@pytest.mark.parametrize(
    "value, code, saturated_code",
    [
        (0.3, 50, 50),  # 0 01 10 010: 2^-2 * 1.25 = 0.3125, the HiF8 rounding of 0.3
        (5.7, 35, 35),  # 0 01 00 011: 2^2 * 1.375 = 5.5
        (-99.0, 0xCA, 0xCA),  # 1 10 010 10: -(2^6 * 1.5) = -96
        (1.5e-7, 1, 1),  # 0 0000 001: the denormal 2^-22
        (-1e-7, 0, 0),  # flushed to +0 (HiF8 has no -0: its code is NaN)
        (-0.0, 0, 0),  # +0
        (45000.0, 0x6F, 0x6E),  # overflow: the inf code, or 32768 = 0 11 0111 0 when saturating
        (-math.inf, 0xEF, 0xEE),  # -inf, or -32768
        (math.nan, 0x80, 0x80),  # NaN
    ],
)
def test_encode_examples(value, code, saturated_code):
    x = torch.tensor([value])
    assert hif8_encode(x).item() == code
    assert hif8_encode(x, saturate=True).item() == saturated_code


def test_encode_is_the_code_of_the_rounded_value():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).float())
    x[:4] = torch.tensor([math.nan, math.inf, -0.0, 1e-30])
    for saturate in (False, True):
        rounded = _qd(x, QType("hif8").saturate(saturate))
        codes = hif8_encode(x, saturate=saturate)
        assert torch.equal(codes, hif8_encode(rounded, saturate=saturate))
        assert_bitwise_equal(hif8_decode(codes), rounded)
    assert torch.equal(hif8_encode(x.bfloat16()), hif8_encode(x.bfloat16().float()))  # any floating dtype


def test_codec_rejects_wrong_dtypes():
    with pytest.raises(TypeError, match="floating"):
        hif8_encode(torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        hif8_decode(torch.ones(3))


# ----------------------------------------------------------------------------------- HiF8 rounding
@pytest.mark.parametrize(
    "value, expected",
    [
        (0.3, 0.3125),  # E = -2, 3 mantissa bits: 0.3 * 2^5 = 9.6 -> 10, 10 * 2^-5
        (5.7, 5.5),  # E = 2, 3 bits: 5.7 * 2 = 11.4 -> 11, 11 / 2
        (99.0, 96.0),  # E = 6, 2 bits: 99 * 2^-4 = 6.1875 -> 6, 6 * 2^4
        (1.5e-7, 2.0**-22),  # in [2^-23, 2^-22): the smallest denormal 2^-22
        (1e-7, 0.0),  # below 2^-23: +0
        (45000.0, 32768.0),  # >= 40960: saturates to the largest finite value
        (-45000.0, -32768.0),
        (40959.99609375, 32768.0),  # just below the overflow threshold 1.25 * 2^15
        (2.0**-23, 2.0**-22),  # the tie between 0 and 2^-22 goes away from zero
        (1.0625, 1.125),  # tie at 3 bits (8.5 -> 9): away from zero
        (2.0**-16 * 1.5, 2.0**-15),  # denormal binade rounds up into the first normal one
        (-(2.0**-30), 0.0),  # negative flush is +0 too
        (math.inf, 32768.0),  # ±inf saturate by default
        (-math.inf, -32768.0),
    ],
)
def test_hif8_examples(value, expected):
    out = _qd(torch.tensor([value]), "hif8")
    assert_bitwise_equal(out, torch.tensor([expected]))


@pytest.mark.parametrize(
    "value, expected",
    [
        (45000.0, math.inf),  # >= 40960 overflows to inf without saturation
        (-40960.0, -math.inf),  # the overflow threshold itself (a tie) goes away from zero
        (40959.99609375, 32768.0),  # just below it stays finite
        (math.inf, math.inf),
        (-math.inf, -math.inf),
        (math.nan, math.nan),
        (0.3, 0.3125),  # everything else as saturating
    ],
)
def test_hif8_unsaturated_examples(value, expected):
    out = _qd(torch.tensor([value]), QType("hif8").saturate(False))
    assert_bitwise_equal(out, torch.tensor([expected]))


def _hif8_oracle(a: np.ndarray, saturate: bool) -> np.ndarray:
    """Nearest value of the code table with ties away from zero, in float64 (every value and midpoint is
    exact there); 40960 is the midpoint between 32768 and the would-be next value 49152 (the inf code)."""
    grid = np.array(sorted({_table_value(e) for e in CODE_TABLE if math.isfinite(_table_value(e))
                            and _table_value(e) >= 0}) + [49152.0])
    mag = np.abs(a)
    hi = np.clip(np.searchsorted(grid, mag, side="left"), 1, len(grid) - 1)
    lo_val, hi_val = grid[hi - 1], grid[hi]
    q = np.where(mag - lo_val < hi_val - mag, lo_val, hi_val)  # a tie takes the larger magnitude
    q = np.where(mag >= hi_val, hi_val, q)
    q = np.where(q > 32768.0, 32768.0 if saturate else np.inf, q)
    return np.where((a < 0) & (q > 0), -q, q)  # +0 only


@pytest.mark.parametrize("saturate", [True, False])
def test_hif8_sweep_against_the_code_table(saturate):
    """Every finite HiF8 value, every midpoint between neighbours, and the float32 numbers next to each,
    on both signs, against the table oracle: this sweeps every encoding and every rounding boundary."""
    values = sorted({_table_value(e) for e in CODE_TABLE if math.isfinite(_table_value(e))} | {49152.0})
    values = np.array([v for v in values if v >= 0])
    points = np.concatenate([values, (values[:-1] + values[1:]) / 2, [2.0**-24, 2.0**-130, 2.0**100, 2.0**127]])
    p32 = torch.tensor(points, dtype=torch.float32)
    assert np.array_equal(p32.double().numpy(), points)  # the midpoints are exact in fp32
    p32 = torch.cat([p32, torch.nextafter(p32, torch.tensor(0.0)), torch.nextafter(p32, torch.tensor(math.inf))])
    p32 = torch.cat([p32, -p32])
    expected = torch.tensor(_hif8_oracle(p32.double().numpy(), saturate), dtype=torch.float32)
    assert_bitwise_equal(_qd(p32, QType("hif8").saturate(saturate)), expected)


def test_hif8_is_not_power_of_two_equivariant():
    """Why no scaling property is claimed for HiF8: its mantissa width depends on the binade (3 bits near
    1, 1 bit from 2^8) and the range is fixed, so 1.0625 * 2^k does not round the same way for every k."""
    assert _qd(torch.tensor([1.0625]), "hif8").item() == 1.125  # 3 bits: the tie rounds up
    assert _qd(torch.tensor([1.0625 * 256]), "hif8").item() == 256.0  # 1 bit: 272 -> 256, not 288


# --------------------------------------------------------------------------------- HiF4 and hifx
def _block(values: list[float], length: int = 64) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (length - len(values)))


def test_hif4_hand_worked_block():
    """Block (7, 1, 0.3, -0.25 | 5.7, 0, 0, 0 | 0.9, 0, ...): Vmax * c = 0.998046875 = 1 - 2^-9, a bf16 tie
    that goes to even 1.0, so SF = 1 and REC = 1. Group 0 has V8 = 7 >= 4 (f8 = 1); its quads have maxima
    7 and 5.7 >= 2 * 2 (f4 = 1), so D = 2 and k = RHAZ(|x|). Group 1 has 0.9 < 4 and < 2: D = 0, k = RHAZ(4|x|)."""
    out = _qd(_block([7, 1, 0.3, -0.25, 5.7, 0, 0, 0, 0.9]), "hif4")
    expected = _block([
        7,  # k = 7: 7/4 * 2^2 * 1
        1,  # k = 1
        0,  # 0.3 -> k = 0, +0
        -0.0,  # -0.25 -> k = 0, a negative input gives -0
        6,  # 5.7 -> k = 6
        0, 0, 0,
        1,  # D = 0: 4 * 0.9 = 3.6 -> k = 4, 4/4 * 2^0 * 1
    ])
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize(
    "values, expected",
    [
        # SF rounds twice: fl32(7.89726 * c) = 1.1259765625 -> bf16 1.125, an E6M2 tie -> even 1.0. So REC = 1,
        # D = 2 and 7.897 -> k = 8, capped at 7: 7.0 (a single rounding to E6M2 would give SF = 1.25 and 7.5).
        ([7.8972601890563965], [7.0]),
        # SF = bf16(8.77 * c = 1.25041) = 1.25, REC = bf16(0.8) = 0.80078125, not 0.8. 8.77: D = 2,
        # fl32(8.77 * REC) = 7.02 -> k = 7, 7/4 * 4 * 1.25 = 8.75. 0.7809 (group 1, D = 0): 4 * 0.62533 = 2.5013
        # -> k = 3, 3/4 * 1.25 = 0.9375 (with REC = 0.8 it would be 2.4989 -> 2, 0.625).
        ([8.77, 0, 0, 0, 0, 0, 0, 0, 0.7809], [8.75, 0, 0, 0, 0, 0, 0, 0, 0.9375]),
        # Thresholds are inclusive. SF = 1 (7 * c -> 1.0), REC = 1. Group 1: V8 = 4 >= 4 (f8 = 1) and its quad
        # 4 >= 2 * 2 (f4 = 1): D = 2, 4 -> 4 and 1.3 -> k = 1, 1.0. Group 2: V8 = 2 < 4 (f8 = 0), quad 2 >= 2
        # (f4 = 1): D = 1, 2 -> k = 4, 2.0 and 0.3 -> 4 * 0.3 / 2 = 0.6 -> k = 1, 0.5.
        ([7, 0, 0, 0, 0, 0, 0, 0, 4, 1.3, 0, 0, 0, 0, 0, 0, 2, 0.3],
         [7, 0, 0, 0, 0, 0, 0, 0, 4, 1.0, 0, 0, 0, 0, 0, 0, 2, 0.5]),
    ],
)
def test_hif4_rounding_steps(values, expected):
    assert_bitwise_equal(_qd(_block(values), "hif4"), _block(expected))


def test_hif4_largest_output():
    """SF is clamped at 49152, so a huge block gives k = 7 at D = 2: 7/4 * 4 * 49152 = 344064."""
    out = _qd(_block([1e30, -3e38, 1.0]), "hif4")
    assert out[0].item() == 344064.0 and out[1].item() == -344064.0


def test_hifx_hand_worked_block():
    """hifx4_v12 (M = 3), block (5, 0, 0, 0, 7.9, 0, 0, 0, 0.3, ...): e64 = E(7.9) = 2, base = 0.
    Group 0: e8 = 2, d8 = clamp(2 - 0 - 1) = 1; quad 0 (max 5): d4 = clamp(2 - 0 - 1) = 1, Q = 2;
    quad 1 (max 7.9): Q = 2. Group 1 (0.3, E = -2): d8 = 0, d4 = 0, Q = 0. Elements RHAZ(|x| * 2^(2-Q)) / 4 *
    2^Q with the mantissa capped at 1.75."""
    out = _qd(_block([5, 0, 0, 0, 7.9, 0, 0, 0, 0.3]), "hifx4_v12")
    expected = _block([
        5,  # 5 * 2^0 = 5 -> 5/4 * 4
        0, 0, 0,
        7,  # 7.9 -> 8 would be mantissa 2: capped at 1.75 * 4 = 7
        0, 0, 0,
        0.25,  # Q = 0: 0.3 * 4 = 1.2 -> 1, 1/4 * 1
    ])
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("name", HIFX)
def test_hifx_saturates_once_base_clips(name):
    """formats.md §12.7: base clips at 16, so the largest output is (2 - 2^(1-M)) * 2^18 (1e7 too)."""
    m = QType(name).man_bits
    out = _qd(torch.tensor([1e7, -1e30, 3.0]), name)
    top = (2 - 2.0 ** (1 - m)) * 2.0**18
    assert out[0].item() == top and out[1].item() == -top


@pytest.mark.parametrize("name", BLOCK_FORMATS)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_special_value_makes_only_its_block_nan(name, special):
    x = torch.linspace(-3, 5, 3 * 64).reshape(1, -1)  # three blocks of 64
    x[0, 70] = special  # in the second block
    out = _qd(x, name)
    assert torch.isnan(out[0, 64:128]).all()
    assert_bitwise_equal(out[:, :64], _qd(x[:, :64], name))
    assert_bitwise_equal(out[:, 128:], _qd(x[:, 128:], name))


def test_hif8_specials_are_elementwise():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    assert_bitwise_equal(_qd(x, "hif8"), torch.tensor([math.nan, 32768.0, -32768.0, 1.0]))
    assert_bitwise_equal(_qd(x, "hif8:saturate=false"), torch.tensor([math.nan, math.inf, -math.inf, 1.0]))


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_signed_zeros(name):
    """±0 in -> +0; a negative input that quantizes to zero is -0, except in HiF8, which has only +0."""
    x = _block([-0.0, 0.0, -1e-30, 1e-30, 100.0])
    out = _qd(x, name)
    assert not torch.signbit(out[:2]).any()
    assert out[2].item() == 0 and bool(torch.signbit(out[2])) == (not name.startswith("hif8"))
    assert not torch.signbit(out[3])


# ------------------------------------------------------------------------ literal oracles (float64)
def _exp(v: float) -> float:
    return math.frexp(v)[1] - 1 if v > 0 else -math.inf  # E(v), E(0) = -inf


def _rhaz(t: float) -> float:
    return math.floor(t + 0.5)  # exact in float64: t has at most 24 significant bits


def _signed(x: float, r: float) -> float:
    return -r if x < 0 else r  # -0 for a negative input that rounds to zero, +0 for ±0


def _blocks_of(row: list[float], size: int) -> list[list[float]]:
    row = row + [0.0] * ((-len(row)) % size)
    return [row[i:i + size] for i in range(0, len(row), size)]


def _hifx_oracle(row: list[float], m: int) -> list[float]:
    """formats.md §4 transcribed one element at a time, in float64 (every value here is exact)."""
    out = []
    for block in _blocks_of(row, 64):
        if not all(math.isfinite(v) for v in block):
            out += [math.nan] * 64
            continue
        quads = [block[i:i + 4] for i in range(0, 64, 4)]
        e4 = [_exp(max(abs(v) for v in quad)) for quad in quads]
        e8 = [max(e4[2 * g], e4[2 * g + 1]) for g in range(8)]
        base = min(max(max(e8) - 2, -46), 16)
        for i, quad in enumerate(quads):
            d8 = min(max(e8[i // 2] - base - 1, 0), 1)
            d4 = min(max(e4[i] - base - d8, 0), 1)
            q = base + d8 + d4
            for v in quad:
                mant = min(_rhaz(abs(v) * 2.0 ** (m - 1 - q)) / 2.0 ** (m - 1), 2 - 2.0 ** (1 - m))
                out.append(_signed(v, mant * 2.0**q))
    return out[: len(row)]


def _bf16_value(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).bfloat16().item()


def _fl32(v: float) -> float:
    return float(np.float32(v))


def _hif4_oracle(row: list[float]) -> list[float]:
    """formats.md §7 transcribed one element at a time: fl32 products rounded once, bf16 and E6M2 steps."""
    out = []
    for block in _blocks_of(row, 64):
        if not all(math.isfinite(v) for v in block):
            out += [math.nan] * 64
            continue
        v16 = [max(abs(v) for v in block[i:i + 4]) for i in range(0, 64, 4)]
        v8 = [max(v16[2 * g], v16[2 * g + 1]) for g in range(8)]
        sf = min(max(_bf16_value(_fl32(max(v8) * 0.142578125)), 2.0**-48), 49152.0)
        e = _exp(sf)
        sf = round(sf * 2.0 ** (2 - e)) * 2.0 ** (e - 2)  # E6M2: Python's round() is half-to-even
        rec = _bf16_value(_fl32(1.0 / sf))
        for i, v in enumerate(block):
            f8 = int(_fl32(v8[i // 8] * rec) >= 4)
            f4 = int(_fl32(v16[i // 4] * rec) >= 2 * 2**f8)
            d = f8 + f4
            k = min(_rhaz(4 * _fl32(abs(v) * rec) / 2**d), 7)
            out.append(_signed(v, k / 4 * 2**d * sf))
    return out[: len(row)]


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from(HIFX))
def test_hifx_matches_a_literal_oracle(data, name):
    """Against §4 written out per element, over the whole fp32 range (subnormals, both clamps of base)."""
    x = data.draw(_tensors(exp_lo=-149, exp_hi=126, max_len=130), label="x")
    expected = torch.tensor(_hifx_oracle(x.tolist(), QType(name).man_bits), dtype=torch.float32)
    assert_bitwise_equal(_qd(x, name), expected)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_hif4_matches_a_literal_oracle(data):
    """Against §7 written out per element (no folded factors), over the whole fp32 range."""
    lo, hi = data.draw(st.sampled_from([(-149, 126), (-60, 20), (-3, 3)]), label="exponent range")
    x = data.draw(_tensors(exp_lo=lo, exp_hi=hi, max_len=130), label="x")
    assert_bitwise_equal(_qd(x, "hif4"), torch.tensor(_hif4_oracle(x.tolist()), dtype=torch.float32))


# ---------------------------------------------------------------------------------------- properties
@st.composite
def _tensors(draw, exp_lo: int = -40, exp_hi: int = 40, max_len: int = 140):
    """A row of float32 values: significands in [1, 2) at exponents spread over [exp_lo, exp_hi], with
    signs and exact zeros mixed in, so blocks hold large and tiny values together."""
    n = draw(st.integers(1, max_len))
    sig = draw(st.lists(st.floats(1.0, 2.0, exclude_max=True, width=32), min_size=n, max_size=n))
    exp = draw(st.lists(st.integers(exp_lo, exp_hi), min_size=n, max_size=n))
    sign = draw(st.lists(st.sampled_from([1.0, -1.0, 0.0]), min_size=n, max_size=n))
    return torch.tensor(np.array(sig, np.float32) * np.exp2(np.array(exp, np.float32)) * np.array(sign, np.float32))


@settings(max_examples=40, deadline=None)
@given(_tensors(exp_lo=-130, exp_hi=126), st.sampled_from(ALL_FORMATS))
def test_sign_symmetry(x, name):
    """Every step reads magnitudes only (block maxima, exponents, RHAZ is symmetric) and the sign is put
    back from the input, so q(-x) = -q(x); inputs ±0 give +0, and HiF8 has only +0."""
    y = _qd(x, name)
    minus = _qd(-x, name)
    hif8 = name.startswith("hif8")
    expected = torch.where((x == 0) | ((y == 0) & hif8), y.abs(), -y)
    assert_bitwise_equal(minus, expected)


def _block_max_exponents(x: torch.Tensor) -> torch.Tensor:
    """E(max |x|) of each non-zero 64-block of a row."""
    vmax = torch.nn.functional.pad(x.abs(), (0, (-len(x)) % 64)).reshape(-1, 64).amax(dim=1)
    return torch.frexp(vmax[vmax > 0])[1] - 1


@settings(max_examples=40, deadline=None)
@given(_tensors(exp_lo=-30, exp_hi=12), st.data(), st.sampled_from(HIFX))
def test_hifx_power_of_two_equivariance_within_the_base_clamp(x, data, name):
    """hifx's scale is a free power of two (base = e64 - 2) as long as base stays inside [-46, 16]: then
    scaling a block by 2^j moves e4, e8, e64, base and Q by j and leaves every t = |x| * 2^(M-1-Q) alone."""
    e64 = _block_max_exponents(x)
    assume(len(e64) > 0)
    shift = data.draw(st.integers(-44 - int(e64.min()), 18 - int(e64.max())), label="shift")
    assert_bitwise_equal(_qd(x * 2.0**shift, name), _qd(x, name) * 2.0**shift)


@settings(max_examples=40, deadline=None)
@given(_tensors(exp_lo=-30, exp_hi=12), st.data())
def test_hif4_power_of_two_equivariance_within_the_scale_clamp(x, data):
    """Inside SF's clamp [2^-48, 49152] every HiF4 step is a relative rounding (bf16, E6M2, fl32 products
    with REC) that commutes with 2^j, so scaling a block scales its output. The clamp is what breaks it at
    both ends (next test): unlike MX, HiF4 has no free scale there."""
    e = _block_max_exponents(x)
    assume(len(e) > 0)
    # Vmax in [2^-44, 2^16) keeps Vmax * c = Vmax * 0.142578125 inside [2^-47, 2^14], well within the clamp.
    shift = data.draw(st.integers(-44 - int(e.min()), 15 - int(e.max())), label="shift")
    assert_bitwise_equal(_qd(x * 2.0**shift, "hif4"), _qd(x, "hif4") * 2.0**shift)


def test_hif4_scale_clamp_breaks_equivariance():
    """At the ends of SF's range the scale stops following the data, so scaling no longer commutes."""
    x = _block([1e-20, 3e-21])
    assert _qd(x, "hif4")[0].item() * 2.0**40 != _qd(x * 2.0**40, "hif4")[0].item()


@settings(max_examples=40, deadline=None)
@given(_tensors(exp_lo=-140, exp_hi=126), st.sampled_from(["hif8", "hif8:saturate=false", *HIFX]))
def test_idempotence(x, name):
    """HiF8 values are on the grid and ±32768 / ±inf map to themselves. hifx's mantissa cap keeps every
    output of a quad below 2^(Q+1) while the block's top value keeps its binade, so a quantized block has
    the same base, d8 and d4 and its values are on the grid. Both only up to the sign of zero (-0 -> +0).
    HiF4 has no such property: its scale follows the block maximum after rounding."""
    y = _qd(x, name)
    assert_bitwise_equal(_qd(y, name), y + 0.0)  # y + 0.0 turns -0 into +0


@settings(max_examples=30, deadline=None)
@given(_tensors(exp_lo=-126, exp_hi=126), st.sampled_from(ALL_FORMATS))
def test_bf16_input_is_computed_in_fp32(x, name):
    """The wrapper computes on the exact fp32 values and every HiFloat result of a bf16 input has at most
    8 significant bits inside bf16's range, so it casts back exactly."""
    xb = x.bfloat16()
    before = xb.clone()
    assert_bitwise_equal(_qd(xb, name), _qd(xb.float(), name).bfloat16())
    assert_bitwise_equal(xb, before)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_input_never_mutated(name):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 100, generator=g) * 1e3
    x[0, :3] = torch.tensor([-0.0, math.nan, math.inf])
    for t in (x, x.t(), x.half()):
        before = t.clone()
        _qd(t, QType(name).dim(0))
        _qd(t, name)
        assert_bitwise_equal(t, before)


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_ragged_tail_is_zero_padded(name):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 100, generator=g)
    padded = torch.nn.functional.pad(x, (0, 28))  # two blocks of 64
    assert_bitwise_equal(_qd(x, name), _qd(padded, name)[:, :100])


# ------------------------------------------------------------------------------- per-tensor quant_hif8
def test_quant_hif8_hand_worked():
    """amax = 4: scale = 8/4 = 2 (exact). 4 -> 8 -> hif8 8 -> 4; -0.9 -> -1.8 -> hif8 -1.75 (E = 0, 3 bits:
    14.4 -> 14) -> -0.875; ±0 -> +0."""
    out = quant_hif8(torch.tensor([4.0, -0.9, 0.0, -0.0]))
    assert_bitwise_equal(out, torch.tensor([4.0, -0.875, 0.0, 0.0]))


def test_quant_hif8_specials_zeros_and_dtypes():
    x = torch.tensor([[1.0, 2.0], [3.0, math.inf]])
    assert torch.isnan(quant_hif8(x)).all()  # NaN or ±inf anywhere: all NaN
    assert torch.isnan(quant_hif8(torch.tensor([math.nan, 1.0]))).all()
    assert_bitwise_equal(quant_hif8(torch.tensor([0.0, -0.0])), torch.zeros(2))  # amax 0: zeros (+0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.linspace(-3, 7, 50).to(dtype)
        before = x.clone()
        out = quant_hif8(x)
        assert out.dtype == dtype and out.shape == x.shape
        assert_bitwise_equal(x, before)
    assert quant_hif8(torch.empty(0, 3)).shape == (0, 3)
    with pytest.raises(TypeError, match="floating"):
        quant_hif8(torch.arange(3))


def test_quant_hif8_routes_through_quant_dequant(monkeypatch):
    """The elementwise HiF8 step goes through dispatch, so fast backends serve quant_hif8 too."""
    import fakequant.hifp as hifp

    calls = []
    real = hifp.quant_dequant

    def spy(x, q, *args, **kwargs):
        calls.append(QType(q))
        return real(x, q, *args, **kwargs)

    monkeypatch.setattr(hifp, "quant_dequant", spy)
    quant_hif8(torch.tensor([1.0, 2.0]))
    assert calls == [QType("hif8")]
