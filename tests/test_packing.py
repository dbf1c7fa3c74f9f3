"""``fakequant.packing``: byte formats worked by hand, pack/unpack equal to ``quant_dequant`` bit for bit, and
the DeepSeek-V4 / GPT-OSS checkpoint layouts decoded from hand-built bytes."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import QType
from fakequant.packing import (
    Packed,
    as_torch_fp4,
    as_torch_scales,
    dequantize_packed,
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    pack,
    pack_nibbles,
    unpack,
    unpack_nibbles,
)

from .conftest import assert_bitwise_equal

NAN = float("nan")


def _sample(shape, seed=0, dtype=torch.float32, spread=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-spread, spread, shape, generator=g).float())
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- byte formats

# (value, code, why)
E2M1_TABLE = [
    (0.0, 0b0000, "+0: exponent 0, mantissa 0"),
    (0.5, 0b0001, "subnormal: mantissa 1 at exponent 0 is 0.5"),
    (1.0, 0b0010, "exponent field 1 (bias 1): 2^0"),
    (1.5, 0b0011, "2^0 * 1.5"),
    (2.0, 0b0100, "exponent field 2: 2^1"),
    (3.0, 0b0101, "2^1 * 1.5"),
    (4.0, 0b0110, "exponent field 3: 2^2"),
    (6.0, 0b0111, "2^2 * 1.5, the largest magnitude"),
    (-0.0, 0b1000, "-0 keeps its sign bit (a negative input that quantized to zero)"),
    (-0.5, 0b1001, "sign in bit 3"),
    (-3.0, 0b1101, "sign | 0101"),
    (-6.0, 0b1111, "sign | 0111"),
]


@pytest.mark.parametrize("value, code, why", E2M1_TABLE)
def test_e2m1_codes_by_hand(value, code, why):
    assert int(e2m1_encode(torch.tensor([value]))[0]) == code, why
    back = e2m1_decode(torch.tensor([code]))
    assert_bitwise_equal(back, torch.tensor([value]))


def test_e2m1_encode_rounds_and_saturates():
    # 0.25 ties to even (0); 0.75 ties to even (1.0); 5 ties to even (4); 7 and inf saturate to 6
    vals = torch.tensor([0.25, 0.75, 5.0, 7.0, float("inf"), -float("inf")])
    assert e2m1_encode(vals).tolist() == [0, 2, 6, 7, 7, 15]
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(torch.tensor([NAN]))


def test_nibble_order_by_hand():
    # element 2k -> low nibble, 2k+1 -> high nibble; an odd length pads a zero high nibble
    codes = torch.tensor([[0x1, 0x2, 0x3, 0xF, 0x9]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0xF3, 0x09]]
    assert torch.equal(unpack_nibbles(packed, length=5), codes)
    # along axis 0
    assert pack_nibbles(codes.T, axis=0).tolist() == [[0x21], [0xF3], [0x09]]
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        pack_nibbles(torch.tensor([1.0]))


# (scale, byte, why)
E8M0_TABLE = [
    (1.0, 127, "bias 127: 2^0"),
    (2.0**-127, 0, "byte 0 is 2^-127 (a float32 subnormal), not zero"),
    (2.0**127, 254, "the largest finite scale"),
    (0.5, 126, "2^-1"),
    (2.0**10, 137, "2^10"),
]


@pytest.mark.parametrize("scale, byte, why", E8M0_TABLE)
def test_e8m0_by_hand(scale, byte, why):
    assert int(e8m0_encode(torch.tensor([scale]))[0]) == byte, why
    assert e8m0_decode(torch.tensor([byte], dtype=torch.uint8)).item() == scale, why


def test_e8m0_byte_255_rules_and_errors():
    b = torch.tensor([255], dtype=torch.uint8)
    assert torch.isnan(e8m0_decode(b)).all()  # OCP: NaN
    assert e8m0_decode(b, rule="inf").item() == float("inf")
    assert int(e8m0_encode(torch.tensor([NAN]))[0]) == 255
    for bad in (3.0, 0.0, -2.0, float("inf"), 2.0**-130):
        with pytest.raises(ValueError, match="powers of two"):
            e8m0_encode(torch.tensor([bad]))
    with pytest.raises(ValueError, match="'nan', 'inf'"):
        e8m0_decode(b, rule="zero")


# (value, byte, why) for the NVFP4 block scale
E4M3_TABLE = [
    (1.0, 0x38, "exponent 7 (bias 7), mantissa 0"),
    (448.0, 0x7E, "the largest finite E4M3FN value: 1.75 * 2^8"),
    (2.0**-9, 0x01, "the smallest subnormal"),
    (1.125, 0x39, "mantissa 001"),
    (-2.0, 0xC0, "sign bit 7"),
]


@pytest.mark.parametrize("value, byte, why", E4M3_TABLE)
def test_e4m3_scale_bytes_by_hand(value, byte, why):
    assert int(e4m3_encode(torch.tensor([value]))[0]) == byte, why
    assert e4m3_decode(torch.tensor([byte])).item() == value, why
    assert torch.isnan(e4m3_decode(torch.tensor([0x7F]))).all()


# ------------------------------------------------------------------------------------------- pack / unpack

SEED_SHAPES = [(32,), (64, 32), (16, 128, 64), (3, 50), (7, 33)]
SEED_QTYPES = ["e2m1k8b32", "e2m1k8b32:scale=ceil", "mxfp4"]  # floor (OCP), ceil (the seed's OAS), round


def _seed_cases():
    for shape in SEED_SHAPES:
        for qdim in range(len(shape)):
            for pack_axis in sorted({len(shape) - 1, qdim}):
                yield shape, qdim, pack_axis


@pytest.mark.parametrize("name", SEED_QTYPES)
@pytest.mark.parametrize("shape, qdim, pack_axis", list(_seed_cases()))
def test_seed_matrix_unpack_equals_quant_dequant(name, shape, qdim, pack_axis):
    """Seed 000's matrix: every shape, quantization axis equal to and different from the packing axis
    (lengths 50, 33, 7, 3 are not multiples of 32), floor and ceil scales."""
    q = QType(name).dim(qdim)
    x = _sample(shape, seed=len(shape) * 100 + qdim)
    codes, scales = p = pack(x, q, pack_axis)
    expected_codes = list(shape)
    expected_codes[pack_axis] = (shape[pack_axis] + 1) // 2
    expected_scales = list(shape)
    expected_scales[qdim] = -(-shape[qdim] // 32)
    assert codes.dtype == torch.uint8 and list(codes.shape) == expected_codes
    assert scales.dtype == torch.uint8 and list(scales.shape) == expected_scales
    ref = fakequant.quant_dequant(x, q)
    got = unpack(codes, scales, q, shape, pack_axis=pack_axis)
    assert_bitwise_equal(got, ref)
    assert_bitwise_equal(p.unpack(), ref)
    # The stored values are a fixed point: packing them again stores the same numbers.
    if name == "e2m1k8b32":
        again = pack(ref, q, pack_axis)
        assert torch.equal(again.scales, scales)
        # -0 inputs give +0 (formats.md §0), so a stored -0 (code 8) comes back as code 0
        strip = lambda c: unpack_nibbles(c, pack_axis).masked_fill(unpack_nibbles(c, pack_axis) == 8, 0)
        assert torch.equal(strip(again.codes), strip(codes))


@pytest.mark.parametrize("name", ["mxfp4", "e2m1k8b32:scale=rceil:round=even", "e2m1k4b7:round=floor", "nvf4",
                                  "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpack_equals_quant_dequant_with_specials(name, dtype):
    """Extremes: values near the dtype's max (saturation), subnormals, zero and -0 blocks, NaN and inf
    inside blocks (NaN blocks: E8M0 byte 255 / E4M3 0x7F), every dtype."""
    fin = torch.finfo(dtype)
    x = _sample((24, 48), seed=3)
    x[0] *= fin.max / 8
    x[1] *= fin.tiny
    x[2] = 0.0
    x[3] = -0.0
    x[4, 5] = NAN
    x[5, 7] = -float("inf")
    x[6, 0] = fin.max
    x = x.to(dtype)
    for qdim in (0, 1):
        q = QType(name).dim(qdim)
        p = pack(x, q)
        assert_bitwise_equal(unpack(*p, q, x.shape, tensor_scale=p.tensor_scale, dtype=dtype),
                             fakequant.quant_dequant(x, q))


def test_nan_block_bytes():
    x = torch.ones(2, 32)
    x[1, 3] = NAN
    codes, scales = pack(x, QType("mxfp4"))
    assert scales[:, 0].tolist() == [125, 255]  # block max 1: s = E(1) - emax = -2; NaN block -> 255
    assert codes[1].tolist() == [0] * 16  # NaN blocks store zero codes
    codes, scales = pack(x, QType("nvf4"))
    sixth = e4m3_encode(torch.tensor(1 / 6)).item()  # S = E4M3(amax / 6)
    assert scales.tolist() == [[sixth, sixth], [0x7F, sixth]]  # blocks of 16: only the first holds the NaN


def test_mxfp4_block_by_hand():
    """formats.md §1's example block (7, 1, 0.3, -0.25, 5.7) under e2m1k8b32: s = 0 -> (6, 1, 0.5, -0.5, 6)."""
    x = torch.tensor([7.0, 1.0, 0.3, -0.25, 5.7])
    codes, scales = pack(x, QType("e2m1k8b32"))
    assert scales.tolist() == [127]
    # codes 0111 0010 0001 1001 0111 -> bytes (low, high): 0x27, 0x91, 0x07
    assert codes.tolist() == [0x27, 0x91, 0x07]


def test_nvfp4_tensor_scale_and_nbytes():
    x = _sample((4, 64), seed=5)
    p = pack(x, "nvfp4")
    assert p.tensor_scale is not None and p.tensor_scale.dtype == torch.float32 and p.tensor_scale.dim() == 0
    assert p.nbytes() == 4 * 32 + 4 * 4 + 4
    with pytest.raises(ValueError, match="tensor_scale"):
        unpack(p.codes, p.scales, "nvfp4", x.shape)
    assert pack(x, "nvf4").tensor_scale is None


def test_zero_dim_and_empty():
    x = torch.tensor(-3.3)
    p = pack(x, "mxfp4")
    assert_bitwise_equal(p.unpack(), fakequant.quant_dequant(x, QType("mxfp4")))
    e = torch.empty(0, 32)
    p = pack(e, "mxfp4")
    assert p.codes.shape == (0, 16) and p.unpack().shape == (0, 32)


def test_pack_errors():
    with pytest.raises(ValueError, match="cannot pack 'mxfp8e4m3'"):
        pack(torch.ones(32), "mxfp8e4m3")
    with pytest.raises(ValueError, match="cannot pack 'hif4'"):
        pack(torch.ones(64), "hif4")
    with pytest.raises(ValueError, match="pack_axis=2"):
        pack(torch.ones(4, 32), "mxfp4", pack_axis=2)
    with pytest.raises(ValueError, match="axis dim=3"):
        pack(torch.ones(4, 32), QType("mxfp4").dim(3))
    with pytest.raises(TypeError, match="floating"):
        pack(torch.ones(4, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(ValueError, match="MX scales only"):
        pack(torch.ones(32), "nvf4", scales=torch.ones(2))


def test_torch_dtype_views():
    x = _sample((8, 64))
    codes, scales = pack(x, "mxfp4")
    fp4 = as_torch_fp4(codes)
    e8 = as_torch_scales(scales, "mxfp4")
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert fp4.dtype == torch.float4_e2m1fn_x2 and e8.dtype == torch.float8_e8m0fnu
        # torch's own E8M0 decoding agrees with ours
        assert torch.equal(e8.float(), e8m0_decode(scales))
    # unpack and dequantize_packed take the views directly
    assert_bitwise_equal(unpack(fp4, e8, "mxfp4", x.shape), fakequant.quant_dequant(x, "mxfp4"))
    assert torch.equal(dequantize_packed(fp4, e8, dtype=torch.float32), unpack(codes, scales, "mxfp4", x.shape))
    e4 = as_torch_scales(pack(x, "nvf4").scales, "nvf4")
    if hasattr(torch, "float8_e4m3fn"):
        assert e4.dtype == torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------ checkpoint layouts


def _hand_block():
    """One 32-element block whose codes are 0..15 twice, and its bytes (low nibble = even element)."""
    codes = torch.arange(32) % 16
    values = e2m1_decode(codes)  # 0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, ..., -6, twice
    packed = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)  # 0x10, 0x32, 0x54, 0x76, 0x98, ...
    assert packed[:4].tolist() == [0x10, 0x32, 0x54, 0x76]
    return packed, values


def test_deepseek_layout_by_hand():
    packed, values = _hand_block()
    blocks = torch.stack([torch.cat([packed, packed]), torch.cat([packed, packed])])  # [2, 32] -> K = 64
    scales = torch.tensor([[127, 130], [120, 0]], dtype=torch.uint8)  # 2^0, 2^3, 2^-7, 2^-127
    out = dequantize_packed(blocks, scales, dtype=torch.float32, layout="deepseek")
    assert out.shape == (2, 64)
    expected = torch.stack([
        torch.cat([values, values * 8]),
        torch.cat([values * 2.0**-7, values * 2.0**-127]),
    ])
    assert_bitwise_equal(out, expected)
    # int8 blocks and float8_e8m0fnu scales give the same
    if hasattr(torch, "float8_e8m0fnu"):
        alt = dequantize_packed(blocks.view(torch.int8), scales.view(torch.float8_e8m0fnu), dtype=torch.float32)
        assert_bitwise_equal(alt, expected)
    # bf16 output rounds the exact value once
    assert_bitwise_equal(dequantize_packed(blocks, scales), expected.to(torch.bfloat16))


def test_gpt_oss_layout_by_hand():
    packed, values = _hand_block()
    blocks = torch.stack([packed, packed, packed]).reshape(1, 3, 16)  # [..., G=3, 16]
    scales = torch.tensor([[126, 127, 140]], dtype=torch.uint8)
    out = dequantize_packed(blocks, scales, dtype=torch.float32, layout="gpt_oss")
    assert out.shape == (1, 96)
    assert_bitwise_equal(out, torch.cat([values * 0.5, values, values * 2.0**13]).unsqueeze(0))
    # the same bytes in the deepseek layout decode to the same numbers
    assert_bitwise_equal(dequantize_packed(blocks.reshape(1, 48), scales, dtype=torch.float32), out)


def test_byte_255_rules_both_layouts():
    packed, values = _hand_block()
    scales = torch.tensor([255], dtype=torch.uint8)
    for layout, blocks in (("deepseek", packed), ("gpt_oss", packed.reshape(1, 16))):
        nan_rule = dequantize_packed(blocks, scales, dtype=torch.float32, layout=layout)
        assert torch.isnan(nan_rule).all()
        inf_rule = dequantize_packed(blocks, scales, dtype=torch.float32, layout=layout, scale_255="inf")
        expected = torch.where(values == 0, values, torch.copysign(torch.tensor(float("inf")), values))
        assert_bitwise_equal(inf_rule.reshape(-1), expected)  # ±inf, zeros keep their sign
        bf = dequantize_packed(blocks, scales, layout=layout, scale_255="inf")
        assert bf.dtype == torch.bfloat16 and torch.isinf(bf).sum() == 28


def test_deepseek_layout_equals_pack_of_mxfp4_floor():
    """A tensor packed along its last axis with OCP MXFP4 is a DeepSeek-layout checkpoint."""
    w = _sample((16, 256), seed=9, dtype=torch.bfloat16)
    q = QType("e2m1k8b32")
    codes, scales = pack(w, q)
    assert_bitwise_equal(dequantize_packed(codes, scales, dtype=torch.bfloat16), fakequant.quant_dequant(w, q))
    g = dequantize_packed(codes.reshape(16, 8, 16), scales, dtype=torch.bfloat16, layout="gpt_oss")
    assert_bitwise_equal(g, fakequant.quant_dequant(w, q))


def test_dequantize_packed_errors():
    with pytest.raises(ValueError, match="deepseek layout"):
        dequantize_packed(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="gpt_oss layout"):
        dequantize_packed(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), layout="gpt_oss")
    with pytest.raises(ValueError, match="layout 'llama'"):
        dequantize_packed(torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), layout="llama")
    with pytest.raises(ValueError, match="scale byte 255 rule"):
        dequantize_packed(torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), scale_255="max")
    with pytest.raises(TypeError, match="blocks must be uint8"):
        dequantize_packed(torch.zeros(16), torch.zeros(1, dtype=torch.uint8))


def test_packed_is_a_pair():
    p = pack(_sample((2, 32)), "mxfp4")
    assert isinstance(p, Packed) and len(p) == 2
    codes, scales = p
    assert codes is p.codes and scales is p.scales
