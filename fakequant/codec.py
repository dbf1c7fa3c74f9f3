"""Bit encodings of fake-quantized tensors: the codes and scales a dump stores, each with an exact decode.

``encode(x, qtype)`` quantizes ``x`` the way ``fakequant.quant_dequant`` does and returns the integer codes
and scales of the result; ``decode(tensors, meta)`` turns them back into exactly ``quant_dequant(x, qtype)``,
bit for bit (NaN blocks, signed zeros and the cast to ``x``'s dtype included). ``fakequant.saver`` stores
them in tensor dumps; ``fakequant.analyze`` reads scales and saturation off them.

Encodings (``shared/spec/formats.md``; "scale layout" = ``x``'s shape with the quantization axis replaced by
its number of blocks, the axis zero-padded to whole blocks as ``quant_dequant`` does):

========== ====================================== =========================================================
encoding   formats                                tensors
========== ====================================== =========================================================
``fp4``    MX with E2M1 elements (``mxfp4``,      ``fakequant.packing``: ``codes`` E2M1 nibbles two per byte
           ``e2m1k<K>b<B>[c]``), ``nvf4``,        along ``pack_axis``; ``scales`` E8M0 (MX) or E4M3
           ``nvfp4``                              (NVFP4) bytes; ``tensor_scale`` (nvfp4's float32 ``g``)
``mx``     other MX block floats ``e<E>m<M>``     ``codes``: sign, E exponent bits (bias 2^(E-1) - 1; field
           with 1 + E + M <= 8 bits, and integer  0 = subnormal), M mantissa bits, one byte per element, or
           elements ``e0m<M>`` with M <= 7        two per byte when the code has <= 4 bits; integers are
                                                  sign-magnitude (sign, then k of k / 2^(M-1)); ``scales``
                                                  E8M0 bytes (255 = NaN block, codes 0)
``hif8``   ``hif8`` (either saturation)           ``codes``: HiF8 bytes (``formats.hifloat.hif8_encode``)
``hif4``   ``hif4``                               ``codes``: sign + 3-bit k nibbles, two per byte; per
                                                  64-block ``scales`` E6M2 bytes ((e + 48) << 2 | m, 0xFF =
                                                  NaN block), ``group_bits`` (bit g: group g takes f8 = 1),
                                                  ``quad_bits`` [..., 2] (bit i of byte j: quad 8j + i takes
                                                  f4 = 1; quad 2g + h is half h of group g)
``int8``   ``int8sym``                            ``codes``: sign-magnitude bytes (bit 7 sign, q in 0..127);
                                                  ``scales``: the float32 step per slice (0 for a slice
                                                  that quantizes to zeros, NaN for a NaN slice)
========== ====================================== =========================================================

Sign-magnitude keeps ``-0``, which the spec gives a negative input that rounds to zero (§0). Formats with no
encoding here (``ENCODING_GAPS``): hierarchical MX ``e<E>m<M>K..B..``, ``hifx*_v12``, ``tmx*``, ``nf4``,
``nf4B*b*``, the casts ``fp16``/``bf16``/``fp32``, and MX formats whose codes are wider than 8 bits (E = 8,
or 1 + E + M > 8); ``encoding_of(q)`` returns ``None`` for them and ``no_encoding_reason(q)`` says why.

Public: ``encode``, ``decode``, ``Encoded``, ``encoding_of``, ``no_encoding_reason``, ``element_grid``,
``element_scales``, ``saturated``, ``scale_exponents``, ``ENCODINGS``, ``ENCODING_GAPS``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import packing
from .formats import as_qtype, check_input
from .formats._common import FLT_MAX, exponent, grid, pow2, saturating_cast, to_blocks
from .formats.hifloat import HIF4_C, HIF4_SF_MAX, HIF4_SF_MIN, HIF8_MAX, hif8_decode, hif8_encode
from .formats.intq import INT8_MAX
from .formats.mx import ElementFormat, quantize_elements
from .formats.nvfp import E2M1_VALUES
from .qtype import QType

__all__ = [
    "encode", "decode", "Encoded", "encoding_of", "no_encoding_reason", "element_grid", "element_scales", "saturated",
    "scale_exponents", "ENCODINGS", "ENCODING_GAPS",
]

ENCODINGS = ("fp4", "mx", "hif8", "hif4", "int8")
ENCODING_GAPS = {
    "mx_hier": "hierarchical MX scales (two levels of exponents per outer block) have no byte layout here",
    "hifx": "hifx*_v12 has no byte layout here",
    "tmx": "tmx* has no byte layout here",
    "nf4": "nf4 has no byte layout here",
    "nf4_double": "nf4B*b* has no byte layout here",
    "cast": "a cast is its own encoding: the quantized tensor in that dtype",
}
_HIF4_BLOCK = 64
_HIF4_NAN_SCALE = 0xFF  # E6M2 exponent 15, mantissa 3 = 57344 > 49152, never a real scale


class Encoded(NamedTuple):
    """``tensors``: the integer codes and scales (names as in the module docstring); ``meta``: what
    ``decode`` needs besides them (``encoding``, ``qtype`` with its axis, ``shape``, ``dtype``,
    ``pack_axis``, ``code_bits``), JSON-serialisable."""

    tensors: dict[str, Tensor]
    meta: dict


# --------------------------------------------------------------------------------------------------------
# Which formats have an encoding


def _mx_code_bits(q: QType) -> int:
    return 1 + q.man_bits if q.exp_bits == 0 else 1 + q.exp_bits + q.man_bits


def encoding_of(qtype: QType | str) -> str | None:
    """The name of ``qtype``'s encoding (one of ``ENCODINGS``), or ``None`` when it has none here."""
    q = as_qtype(qtype)
    if q.family in ("nvf4", "nvfp4") or (q.family == "mx" and (q.exp_bits, q.man_bits) == (2, 1)):
        return "fp4"
    if q.family == "mx":
        return "mx" if _mx_code_bits(q) <= 8 else None
    return {"hif8": "hif8", "hif4": "hif4", "int8sym": "int8"}.get(q.family)


def no_encoding_reason(qtype: QType | str) -> str | None:
    """Why ``qtype`` has no encoding (``None`` when it has one)."""
    q = as_qtype(qtype)
    if encoding_of(q) is not None:
        return None
    if q.family == "mx":
        return f"{q}: {_mx_code_bits(q)}-bit element codes; only codes of at most 8 bits are stored"
    return f"{q}: {ENCODING_GAPS[q.family]}"


# --------------------------------------------------------------------------------------------------------
# encode


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _axis(axis: int, rank: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
        raise ValueError(f"pack_axis={axis!r} is out of range for a tensor of rank {rank}")
    return axis % rank


def encode(x: Tensor, qtype: QType | str, pack_axis: int = -1) -> Encoded:
    """Codes and scales of ``quant_dequant(x, qtype)`` (layout in the module docstring).

    ``pack_axis``: the axis along which 4-bit codes share a byte (any axis; the quantization axis is
    ``qtype.q_dim``). Raises ``ValueError`` for a format without an encoding (``no_encoding_reason``).
    """
    q = as_qtype(qtype)
    kind = encoding_of(q)
    if kind is None:
        raise ValueError(f"cannot encode: {no_encoding_reason(q)}")
    qdim = check_input(x, q)
    rank = max(x.dim(), 1)
    paxis = _axis(pack_axis, rank)
    meta = {
        "encoding": kind, "qtype": str(q.dim(qdim - rank)), "shape": list(x.shape), "dtype": _dtype_name(x.dtype),
        "pack_axis": paxis - rank,
    }
    if kind == "fp4":
        p = packing.pack(x, q, paxis)
        tensors = {"codes": p.codes, "scales": p.scales}
        if p.tensor_scale is not None:
            tensors["tensor_scale"] = p.tensor_scale.reshape(()).to(torch.float32)
        return Encoded(tensors, {**meta, "code_bits": 4})
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    if x.numel() == 0:
        raise ValueError("cannot encode an empty tensor")
    if kind == "mx":
        tensors, bits = _encode_mx(x32, q, qdim, paxis)
    elif kind == "hif8":
        tensors, bits = {"codes": hif8_encode(x32, saturate=q.saturating)}, 8
    elif kind == "hif4":
        tensors, bits = _encode_hif4(x32, qdim, paxis), 4
    else:
        tensors, bits = _encode_int8(x32, qdim), 8
    return Encoded(tensors, {**meta, "code_bits": bits})


def _mx_exponents(x32: Tensor, q: QType, qdim: int, blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Shared exponents ``[..., n_blocks, 1]`` and NaN mask, as the reference (or the MSE search) picks them."""
    if q.scale_mode == "mse":
        from .scale_search import mse_scales

        scales = mse_scales(x32, q).movedim(qdim, -1)
        return packing._scales_to_exponents(scales, q, blocks.shape[:-1])
    return packing.mx_block_exponents(blocks, q)


def _encode_mx(x32: Tensor, q: QType, qdim: int, paxis: int) -> tuple[dict[str, Tensor], int]:
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    blocks, restore = to_blocks(x32, qdim, q.blk_size)  # [..., n_blocks, B]
    s, nan_block = _mx_exponents(x32, q, qdim, blocks)
    # formats.md §1 step 3 exactly as the reference: y = |x| / 2^s, q = min(grid(y), max_norm); 1 + E + M <= 8
    # means E <= 6, so the reference works at the block scale itself (no frame binade).
    mag = quantize_elements(blocks.abs() * pow2(-s), fmt, q.round_mode)
    mag = torch.where(nan_block, 0.0, mag)
    if fmt.is_int:
        field = (mag * 2.0 ** (fmt.man_bits - 1)).to(torch.int32)  # k of k / 2^(M-1), exact
        value_bits = fmt.man_bits
    else:
        normal = mag >= 2.0**fmt.emin
        e = torch.where(normal, exponent(torch.where(normal, mag, 1.0)), fmt.emin)
        # normal: (1 + m / 2^M) 2^e, field e - emin + 1; subnormal: m 2^(emin - M), field 0 (exact integers)
        man = (mag * pow2(fmt.man_bits - e)).to(torch.int32) - torch.where(normal, 1 << fmt.man_bits, 0)
        exp_field = torch.where(normal, e - fmt.emin + 1, 0)
        field = (exp_field << fmt.man_bits) | man
        value_bits = fmt.exp_bits + fmt.man_bits
    codes = field | ((blocks < 0) & ~nan_block).to(torch.int32) << value_bits
    codes = restore(codes).to(torch.uint8)
    bits = value_bits + 1
    if bits <= 4:
        codes = packing.pack_nibbles(codes, paxis)
    scale_bytes = torch.where(nan_block, packing.E8M0_NAN, s + packing.E8M0_BIAS).to(torch.uint8).squeeze(-1)
    return {"codes": codes, "scales": scale_bytes.movedim(-1, qdim).contiguous()}, bits


def _hif4_parts(x32: Tensor, qdim: int):
    """HiF4's per-block numbers, formats.md §7 steps 1-3 exactly as ``quant_dequant_hif4`` computes them."""
    blocks, restore = to_blocks(x32, qdim, _HIF4_BLOCK)  # [..., n, 64]
    quads = blocks.unflatten(-1, (8, 2, 4))  # [..., n, 8 groups, 2 quads, 4]
    a = quads.abs()
    v16 = a.amax(dim=-1)  # [..., n, 8, 2]
    v8 = v16.amax(dim=-1, keepdim=True)  # [..., n, 8, 1]
    vmax = v8.amax(dim=-2, keepdim=True)  # [..., n, 1, 1]
    sf = _bf16(vmax * HIF4_C).clamp(HIF4_SF_MIN, HIF4_SF_MAX)
    sf = grid(sf, 2, -48, "even")
    rec = _bf16(1.0 / sf)
    f8 = v8 * rec >= 4  # [..., n, 8, 1]
    pow_f8 = 1.0 + f8.to(torch.float32)
    f4 = v16 * rec >= 2 * pow_f8  # [..., n, 8, 2]
    return quads, restore, a, vmax, sf, rec, f8, f4


def _bf16(v: Tensor) -> Tensor:
    return v.to(torch.bfloat16).to(torch.float32)


def _encode_hif4(x32: Tensor, qdim: int, paxis: int) -> dict[str, Tensor]:
    quads, restore, a, vmax, sf, rec, f8, f4 = _hif4_parts(x32, qdim)
    pow_d = (1.0 + f8.to(torch.float32)) * (1.0 + f4.to(torch.float32))  # 2^D
    twice_up = (8.0 * rec) / pow_d
    k = torch.ceil(torch.floor(a * twice_up.unsqueeze(-1)) * 0.5).clamp(max=7)  # RHAZ, as round_scaled
    nan = ~torch.isfinite(vmax)  # [..., n, 1, 1]
    k = torch.where(nan.unsqueeze(-1), 0.0, k).to(torch.int32)
    sign = ((quads + 0.0) < 0) & ~nan.unsqueeze(-1)  # copysign(k, x + 0.0): -0 in gives +0
    codes = restore((k | (sign.to(torch.int32) << 3)).flatten(-3))
    codes = packing.pack_nibbles(codes.to(torch.uint8), paxis)
    # E6M2 scale byte: SF = 2^e (1 + m/4) with e in -48..15.
    sf_safe = torch.where(nan, 1.0, sf).squeeze(-1).squeeze(-1)  # [..., n]
    e = exponent(sf_safe)
    m = (sf_safe * pow2(2 - e)).to(torch.int32) - 4
    scale = ((e + 48) << 2) | m
    scale = torch.where(nan.squeeze(-1).squeeze(-1), _HIF4_NAN_SCALE, scale).to(torch.uint8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=x32.device)
    group_bits = (f8.squeeze(-1).to(torch.int32) * weights).sum(-1).to(torch.uint8)  # [..., n]
    quad = f4.flatten(-2).unflatten(-1, (2, 8)).to(torch.int32)  # [..., n, 2 bytes, 8 bits]
    quad_bits = (quad * weights).sum(-1).to(torch.uint8)  # [..., n, 2]
    nan_n = nan.squeeze(-1).squeeze(-1)
    group_bits = group_bits.masked_fill(nan_n, 0)
    quad_bits = quad_bits.masked_fill(nan_n.unsqueeze(-1), 0)
    return {
        "codes": codes, "scales": scale.movedim(-1, qdim).contiguous(),
        "group_bits": group_bits.movedim(-1, qdim).contiguous(),
        "quad_bits": quad_bits.movedim(-2, qdim).contiguous(),
    }


def _int8_steps(x32: Tensor, qdim: int) -> tuple[Tensor, Tensor]:
    """int8sym's divisor and multiplier per slice (formats.md §10, as ``quant_dequant_int8sym``)."""
    amax = x32.abs().amax(dim=qdim, keepdim=True)
    step = amax / torch.tensor(INT8_MAX, dtype=torch.float32, device=x32.device)
    live = step > 0
    step_div = torch.where(live, step, 1.0)
    step_mul = torch.where(torch.isfinite(amax), torch.where(live, step, 0.0), float("nan"))
    return step_div, step_mul


def _encode_int8(x32: Tensor, qdim: int) -> dict[str, Tensor]:
    step_div, step_mul = _int8_steps(x32, qdim)
    q = (x32.abs() / step_div).round().clamp(max=INT8_MAX)
    q = torch.where(torch.isfinite(q) & (step_mul > 0), q, 0.0).to(torch.int32)
    codes = q | ((x32 < 0).to(torch.int32) << 7)
    return {"codes": codes.to(torch.uint8), "scales": step_mul}


# --------------------------------------------------------------------------------------------------------
# decode


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r} in the encoding metadata")
    return dtype


def decode(tensors: dict[str, Tensor], meta: dict) -> Tensor:
    """The fake-quantized tensor that ``encode`` encoded: equal bit for bit to ``quant_dequant(x, qtype)``.

    ``tensors``: the codes and scales from ``encode`` (names as in the module docstring); ``meta``: its
    ``Encoded.meta`` (``encoding``, ``qtype``, ``shape``, ``dtype``, ``pack_axis``).
    """
    kind = meta.get("encoding")
    if kind not in ENCODINGS:
        raise ValueError(f"unknown encoding {kind!r}; known: {', '.join(ENCODINGS)}")
    q = QType(meta["qtype"])
    shape = torch.Size(meta["shape"])
    dtype = _dtype(meta["dtype"])
    paxis = int(meta.get("pack_axis", -1))
    if kind == "fp4":
        return packing.unpack(tensors["codes"], tensors["scales"], q, shape, tensor_scale=tensors.get("tensor_scale"),
                              dtype=dtype, pack_axis=paxis)
    full = shape if len(shape) else torch.Size([1])
    rank = len(full)
    qdim, paxis = q.q_dim % rank, paxis % rank
    codes = tensors["codes"]
    if kind == "hif8":
        return saturating_cast(hif8_decode(codes), dtype).reshape(shape)
    if kind == "int8":
        c = codes.to(torch.int32)
        value = (c & 0x7F).to(torch.float32)
        value = torch.where((c & 0x80) != 0, -value, value) * tensors["scales"]
        return saturating_cast(value.clamp(-FLT_MAX, FLT_MAX), dtype).reshape(shape)
    if kind == "hif4":
        return _decode_hif4(tensors, full, qdim, paxis, dtype).reshape(shape)
    return _decode_mx(tensors, q, int(meta["code_bits"]), full, qdim, paxis, dtype).reshape(shape)


def _unpacked_codes(codes: Tensor, bits: int, full: torch.Size, paxis: int) -> Tensor:
    if bits <= 4:
        codes = packing.unpack_nibbles(codes, paxis, full[paxis])
    return codes.reshape(full).to(torch.int32)


def _decode_mx(tensors, q: QType, bits: int, full, qdim: int, paxis: int, dtype) -> Tensor:
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    code = _unpacked_codes(tensors["codes"], bits, full, paxis)
    blocks, restore = to_blocks(code, qdim, q.blk_size)  # [..., n_blocks, B]; padding decodes to +0
    scale_byte = tensors["scales"].movedim(qdim, -1).to(torch.int32).unsqueeze(-1)  # [..., n_blocks, 1]
    value_bits = bits - 1
    field = blocks & ((1 << value_bits) - 1)
    if fmt.is_int:
        mag = field.to(torch.float32) * 2.0 ** (1 - fmt.man_bits)
    else:
        exp_field = field >> fmt.man_bits
        man = (field & ((1 << fmt.man_bits) - 1)).to(torch.float32)
        sub = man * 2.0 ** (fmt.emin - fmt.man_bits)
        norm = (man + 2.0**fmt.man_bits) * pow2(exp_field + fmt.emin - 1 - fmt.man_bits)
        mag = torch.where(exp_field == 0, sub, norm)
    nan_block = scale_byte == packing.E8M0_NAN
    s = torch.where(nan_block, 0, scale_byte - packing.E8M0_BIAS)
    value = torch.clamp(mag * torch.where(nan_block, float("nan"), pow2(s)), max=FLT_MAX)
    value = torch.where((blocks >> value_bits) != 0, -value, value)
    return saturating_cast(restore(value), dtype)


def _decode_hif4(tensors, full, qdim: int, paxis: int, dtype) -> Tensor:
    code = _unpacked_codes(tensors["codes"], 4, full, paxis)
    blocks, restore = to_blocks(code, qdim, _HIF4_BLOCK)  # [..., n, 64]
    quads = blocks.unflatten(-1, (8, 2, 4))  # [..., n, 8, 2, 4]
    scale = tensors["scales"].movedim(qdim, -1).to(torch.int32)  # [..., n]
    e, m = (scale >> 2) - 48, scale & 3
    sf = (m + 4).to(torch.float32) * pow2(e - 2)
    nan = scale == _HIF4_NAN_SCALE
    bit = torch.arange(8, dtype=torch.int32, device=code.device)
    f8 = (tensors["group_bits"].movedim(qdim, -1).to(torch.int32).unsqueeze(-1) >> bit) & 1  # [..., n, 8]
    f4 = (tensors["quad_bits"].movedim(qdim, -2).to(torch.int32).unsqueeze(-1) >> bit) & 1  # [..., n, 2, 8]
    f4 = f4.flatten(-2).unflatten(-1, (8, 2))  # [..., n, 8, 2]
    pow_d = (1.0 + f8.unsqueeze(-1).to(torch.float32)) * (1.0 + f4.to(torch.float32))  # [..., n, 8, 2]
    sf = torch.where(nan, float("nan"), sf)[..., None, None]  # [..., n, 1, 1]
    down = (0.25 * sf) * pow_d  # as quant_dequant_hif4: k * ((SF / 4) * 2^D)
    mag = (quads & 7).to(torch.float32) * down.unsqueeze(-1)
    value = torch.where((quads & 8) != 0, -mag, mag)
    return saturating_cast(restore(value.flatten(-3)), dtype)


# --------------------------------------------------------------------------------------------------------
# What the analysis reads off an encoding


def _mx_top_code(fmt: ElementFormat) -> int:
    """The code (without sign) of the largest element magnitude."""
    if fmt.is_int:
        return 2**fmt.man_bits - 1
    e = fmt.emax
    man = round((fmt.max_value / 2.0**e - 1) * 2**fmt.man_bits)
    return ((e - fmt.emin + 1) << fmt.man_bits) | man


def element_grid(qtype: QType | str) -> Tensor | None:
    """The non-negative magnitudes one element can take, in units of its block scale (MX: times 2^s; nvf4 /
    nvfp4: times the E4M3 scale; hif4: times SF; int8sym: times the step; hif8: absolute values), float64,
    sorted. ``None`` for formats without an encoding."""
    q = as_qtype(qtype)
    kind = encoding_of(q)
    if kind is None:
        return None
    if kind == "fp4":
        return torch.tensor(E2M1_VALUES, dtype=torch.float64)
    if kind == "mx":
        fmt = ElementFormat(q.exp_bits, q.man_bits)
        if fmt.is_int:
            return torch.arange(2**fmt.man_bits, dtype=torch.float64) * 2.0 ** (1 - fmt.man_bits)
        vals = [m * 2.0 ** (fmt.emin - fmt.man_bits) for m in range(2**fmt.man_bits)]
        for e in range(fmt.emin, fmt.emax + 1):
            vals += [(1 + m / 2**fmt.man_bits) * 2.0**e for m in range(2**fmt.man_bits)]
        return torch.tensor(sorted(v for v in set(vals) if v <= fmt.max_value), dtype=torch.float64)
    if kind == "hif8":
        v = hif8_decode(torch.arange(128)).double()
        return torch.sort(v[torch.isfinite(v)]).values
    if kind == "hif4":
        k = torch.arange(8, dtype=torch.float64) / 4
        return torch.unique(torch.cat([k, 2 * k, 4 * k]))
    return torch.arange(int(INT8_MAX) + 1, dtype=torch.float64)


def _block_layout(enc: Encoded) -> tuple[int, int]:
    """(quantization axis, block length) of an encoding's scale layout; int8sym's block is the whole axis."""
    q = QType(enc.meta["qtype"])
    full = enc.meta["shape"] or [1]
    qdim = q.q_dim % len(full)
    kind = enc.meta["encoding"]
    if kind == "int8":
        return qdim, full[qdim]
    if kind == "hif4":
        return qdim, _HIF4_BLOCK
    if kind == "fp4" and q.family in ("nvf4", "nvfp4"):
        return qdim, 16
    return qdim, q.blk_size


def scale_exponents(enc: Encoded, hp: Tensor | None = None) -> Tensor | None:
    """Base-2 exponents (int32, one per block or slice) of the scales of an encoding, NaN blocks and zero
    scales left out, and with ``hp`` (the encoded tensor) its all-zero blocks too, whose stored scale is a
    placeholder. ``None`` for ``hif8`` (no scales)."""
    kind, t = enc.meta["encoding"], enc.tensors
    if kind == "hif8":
        return None
    q = QType(enc.meta["qtype"])
    live = None
    if hp is not None:
        qdim, block = _block_layout(enc)
        x = (hp.reshape(1) if hp.dim() == 0 else hp).to(torch.float32)
        blocks, _ = to_blocks(x, qdim, block)
        live = (blocks.abs().amax(dim=-1) > 0).movedim(-1, qdim)  # the scale layout
    if kind == "hif4":
        b = t["scales"].to(torch.int32)
        keep = b != _HIF4_NAN_SCALE
        e = (b >> 2) - 48
    elif kind in ("mx", "fp4") and q.family == "mx":  # E8M0 bytes
        b = t["scales"].to(torch.int32)
        keep = b != packing.E8M0_NAN
        e = b - packing.E8M0_BIAS
    else:
        if kind == "int8":
            v = t["scales"].to(torch.float32)
        else:
            v = packing.e4m3_decode(t["scales"])
            if "tensor_scale" in t:  # nvfp4: the effective scale S / g
                v = v / t["tensor_scale"].to(torch.float32)
        keep = torch.isfinite(v) & (v > 0)
        e = exponent(torch.where(keep, v, 1.0))
    if live is not None:
        keep = keep & live
    return e[keep].flatten()


def element_scales(enc: Encoded) -> Tensor | None:
    """The scale of each element's block (or slice), float64 of the encoded tensor's shape, so that
    ``|quantized| / scale`` lies on ``element_grid``: 2^s (MX), S (nvf4), S / g (nvfp4), SF (hif4), the step
    (int8sym); NaN in NaN blocks. ``None`` for hif8 (no scales)."""
    kind, meta, t = enc.meta["encoding"], enc.meta, enc.tensors
    if kind == "hif8":
        return None
    q = QType(meta["qtype"])
    full = torch.Size(meta["shape"]) if meta["shape"] else torch.Size([1])
    qdim, block = _block_layout(enc)
    b = t["scales"]
    if kind == "int8":
        per_block = b.to(torch.float64)
    elif kind == "hif4":
        s = b.to(torch.int32)
        per_block = ((s & 3) + 4).to(torch.float64) * torch.exp2(((s >> 2) - 50).to(torch.float64))
        per_block = torch.where(s == _HIF4_NAN_SCALE, float("nan"), per_block)
    elif q.family in ("nvf4", "nvfp4"):
        per_block = packing.e4m3_decode(b).to(torch.float64)
        if "tensor_scale" in t:
            per_block = per_block / t["tensor_scale"].to(torch.float64)
    else:
        s = b.to(torch.int32)
        per_block = torch.exp2((s - packing.E8M0_BIAS).to(torch.float64))
        per_block = torch.where(s == packing.E8M0_NAN, float("nan"), per_block)
    per_element = per_block.repeat_interleave(block, dim=qdim).narrow(qdim, 0, full[qdim])
    return per_element.reshape(torch.Size(meta["shape"]))


def saturated(hp: Tensor, enc: Encoded) -> Tensor:
    """Mask of the elements whose magnitude exceeds the largest value their block (or slice) can represent:
    the code is the top magnitude and ``|hp|`` is above the decoded value. Shape of ``hp``."""
    kind, meta = enc.meta["encoding"], enc.meta
    q = QType(meta["qtype"])
    full = torch.Size(meta["shape"]) if meta["shape"] else torch.Size([1])
    paxis = int(meta["pack_axis"]) % len(full)
    if kind == "hif8":
        top = hif8_decode(enc.tensors["codes"]).abs() == HIF8_MAX
    else:
        bits = int(meta["code_bits"])
        code = _unpacked_codes(enc.tensors["codes"], bits, full, paxis)
        value_mask = (1 << (bits - 1)) - 1
        if kind == "fp4" or kind == "hif4":
            top_code = 7
        elif kind == "int8":
            top_code = int(INT8_MAX)
        else:
            top_code = _mx_top_code(ElementFormat(q.exp_bits, q.man_bits))
        top = (code & value_mask) == top_code
    quantized = decode(enc.tensors, meta).reshape(full).to(torch.float32)
    a = hp.reshape(full).to(torch.float32).abs()
    return (top & (a > quantized.abs())).reshape(hp.shape)
