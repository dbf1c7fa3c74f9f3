"""fakequant.codec: the codes and scales of dumps decode to ``quant_dequant`` bit for bit."""

from __future__ import annotations

import pytest
import torch

from fakequant import QType, quant_dequant
from fakequant.codec import (
    decode, element_grid, element_scales, encode, encoding_of, no_encoding_reason, saturated, scale_exponents,
)
from fakequant.formats.mx import ElementFormat

from .conftest import assert_bitwise_equal

ENCODED = [
    "mxfp4", "e2m1k8b32", "mxfp4:scale=rceil", "nvf4", "nvfp4",  # fp4 (fakequant.packing)
    "mxfp6e3m2", "mxfp6e2m3", "mxfp8e4m3", "mxfp8e5m2", "e3m2k4b16c", "e2m3k8b32:round=even",
    "mxfp8e4m3:scale=ceil", "e4m3k8b32:scale=mse", "e0m7k8b32", "e0m3k8b32c", "e0m1k8b32", "e0m3k8b32:scale=rceil",
    "e2m2k8b8", "e3m1k6b32:round=floor",
    "hif8", "hif8:saturate=false", "hif4", "int8sym",
]


def adversarial(shape, seed=0) -> torch.Tensor:
    """Values over 40 binades with the specials of formats.md §0 planted: ±0, a tiny negative (-> -0), a
    NaN and an inf inside blocks, an all-zero run, fp32 subnormals, values near the formats' maxima."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    f = x.view(-1)
    f[:8] = torch.tensor([0.0, -0.0, -1e-30, 448.0, -6.0, 3e38, 57344.0, -32768.0])
    f[70:74] = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    f[140] = float("inf")
    f[200:264] = 0.0
    f[300:340] = 1e-40
    return x


@pytest.mark.parametrize("fmt", ENCODED)
def test_decode_equals_quant_dequant_bit_for_bit(fmt):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, dim, pack_axis in (((7, 130), -1, -1), ((7, 130), 0, -1), ((3, 5, 67), 1, 0), ((401,), 0, 0)):
            x = adversarial(shape).to(dtype)
            q = QType(fmt).dim(dim)
            enc = encode(x, q, pack_axis)
            assert all(t.dtype in (torch.uint8, torch.float32) for t in enc.tensors.values())
            assert_bitwise_equal(decode(enc.tensors, enc.meta), quant_dequant(x, q))


MX_ELEMENTS = [(2, 1), (2, 3), (3, 2), (4, 3), (5, 2), (2, 2), (3, 1), (0, 7), (0, 3), (0, 1)]


@pytest.mark.parametrize("e,m", MX_ELEMENTS)
def test_every_mx_element_code_round_trips(e, m):
    """Blocks of two: the format's largest value (so the shared exponent is 0 under `floor`) and one grid
    value, each sign; the code of the i-th grid magnitude is i, with the sign in the top bit."""
    fmt = ElementFormat(e, m)
    q = QType(f"e{e}m{m}k8b2")
    grid = element_grid(q).float()
    values = torch.cat([grid, -grid[1:]])  # an input -0 gives +0 (formats.md §0), so no -0 here
    x = torch.stack([torch.full_like(values, fmt.max_value), values], dim=-1)  # [n, 2]
    enc = encode(x, q)
    assert_bitwise_equal(decode(enc.tensors, enc.meta), x)  # every grid value is exact at scale 1
    bits = 1 + m + (e if e else 0)
    codes = enc.tensors["codes"]
    if bits <= 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)[..., :2]
    n = grid.numel()
    expected = torch.cat([torch.arange(n), torch.arange(1, n) | (1 << (bits - 1))])
    assert torch.equal(codes[:, 1].long(), expected)
    assert (enc.tensors["scales"] == 127).all()  # E8M0 byte of 2^0


def test_hand_worked_codes():
    # E4M3 (bias 7): 448 = 1.75·2^8 -> 0 1111 110; 1 -> 0 0111 000; 2^-9 (smallest subnormal) -> 0 0000 001.
    x = torch.tensor([[448.0, 1.0, 2.0**-9, -448.0]])
    enc = encode(x, QType("e4m3k8b4"))
    assert enc.tensors["codes"].tolist() == [[0x7E, 0x38, 0x01, 0xFE]] and enc.tensors["scales"].tolist() == [[127]]
    # E5M2 (bias 15): 57344 = 1.75·2^15 -> 0 11110 11 = 0x7B.  E2M3 (bias 1): 7.5 = 1.875·2^2 -> 0 11 111 = 0x1F.
    assert encode(torch.tensor([57344.0]), QType("e5m2k8b1")).tensors["codes"].tolist() == [0x7B]
    assert encode(torch.tensor([7.5]), QType("e2m3k8b1")).tensors["codes"].tolist() == [0x1F]
    # int e0m3: block (7.8, 1, 0.3, -6.6) -> g = 0 with the carry to g = 1 (formats.md §2 example): 8, 2, 0, -6
    # are k = 4, 1, 0, 3 of k/4 at s = g + M - 1 = 3 -> scale byte 130; the sign bit is bit 3.
    enc = encode(torch.tensor([7.8, 1.0, 0.3, -6.6]), QType("e0m3k8b32c"))
    codes = enc.tensors["codes"]
    assert [int(codes[0]) & 0xF, int(codes[0]) >> 4, int(codes[1]) & 0xF, int(codes[1]) >> 4] == [4, 1, 0, 8 | 3]
    assert enc.tensors["scales"].tolist() == [130]
    # HiF4: Vmax 7 -> SF = E6M2(bf16(7 · bf16(1/7))) = 1.0 -> byte (0 + 48) << 2 = 0xC0; 7 >= 4·SF sets f8 of
    # group 0 and f4 of its quad 0: D = 2, k = RHAZ(4·7/4) = 7 -> 7·2^2/4 = 7.  -0.3 -> k = RHAZ(1.2) = 1, -0.25.
    x = torch.zeros(64)
    x[0], x[8] = 7.0, -0.3
    enc = encode(x, QType("hif4"))
    assert enc.tensors["scales"].tolist() == [0xC0]
    assert enc.tensors["group_bits"].tolist() == [0b1] and enc.tensors["quad_bits"].tolist() == [[0b1, 0]]
    assert int(enc.tensors["codes"][0]) & 0xF == 7 and int(enc.tensors["codes"][4]) & 0xF == 8 | 1
    assert decode(enc.tensors, enc.meta)[[0, 8]].tolist() == [7.0, -0.25]
    # int8sym: step = 1/127 for amax 1; -0.5 -> q = RNE(63.5) = 64, sign-magnitude 0x80 | 64.
    enc = encode(torch.tensor([[1.0, -0.5, 0.0, -1e-9]]), QType("int8sym"))
    assert enc.tensors["codes"].tolist() == [[127, 0x80 | 64, 0, 0x80]]  # -1e-9 -> -0 keeps its sign
    # HiF8 codes are fakequant.formats.hifloat.hif8_encode's: 1.0 -> 0x08, 32768 -> 0x6E.
    assert encode(torch.tensor([1.0, 32768.0]), QType("hif8")).tensors["codes"].tolist() == [0x08, 0x6E]


def test_formats_without_an_encoding_say_why():
    assert [encoding_of(f) for f in ("mxfp4", "nvfp4", "mxfp8e4m3", "e0m7k8b32", "hif8", "hif4", "int8sym")] == [
        "fp4", "fp4", "mx", "mx", "hif8", "hif4", "int8"]
    for fmt, why in (("e4m3K4k4B4b8", "hierarchical"), ("hifx4_v12", "hifx"), ("tmx6", "tmx"), ("nf4", "nf4"),
                     ("nf4B8b8", "nf4B"), ("bf16", "cast"), ("e4m4k8b32", "9-bit element codes"),
                     ("e8m1k8b32", "10-bit")):
        assert encoding_of(fmt) is None and why in no_encoding_reason(fmt)
        with pytest.raises(ValueError, match="cannot encode"):
            encode(torch.ones(64), QType(fmt))
    assert no_encoding_reason("mxfp4") is None


def test_saturation_and_scales_read_off_the_codes():
    # e2m1k8b32 (floor): block (7, 1, 0.3, -0.25, 5.7): s = 0, 7 -> 6 is saturated (formats.md §1 example).
    x = torch.tensor([7.0, 1.0, 0.3, -0.25, 5.7] + [0.0] * 27)
    enc = encode(x, QType("e2m1k8b32"))
    assert saturated(x, enc).nonzero().flatten().tolist() == [0]
    assert scale_exponents(enc).tolist() == [0]
    # mxfp4 rounds the scale up (s = 1): nothing saturates.
    assert not saturated(x, encode(x, QType("mxfp4"))).any()
    # an all-zero block stores a placeholder exponent; with hp it is left out of the range
    y = torch.cat([x, torch.zeros(32)])
    enc = encode(y, QType("e2m1k8b32"))
    assert scale_exponents(enc).tolist() == [0, -127] and scale_exponents(enc, y).tolist() == [0]
    # element_scales: |quantized| / scale lies on the element grid, for every encoding with scales
    z = adversarial((5, 192), seed=3)
    z = torch.where(torch.isfinite(z), z, 1.0)
    for fmt in ("mxfp4", "mxfp8e4m3", "e0m3k8b32", "hif4", "nvf4", "int8sym"):
        enc = encode(z, QType(fmt))
        units = decode(enc.tensors, enc.meta).double().abs() / element_scales(enc)
        grid = element_grid(fmt)
        dist = (units.flatten()[:, None] - grid[None, :]).abs().min(dim=1).values
        assert float(dist[torch.isfinite(dist)].max()) < 1e-4, fmt  # int8sym: fl32(q · step) / step
    assert element_scales(encode(z, QType("hif8"))) is None
