"""Real low-bit storage: 4-bit codes two per byte plus one scale byte per block.

``pack`` turns a tensor into the bytes that hardware and checkpoints store (FP4 E2M1 codes, E8M0 or E4M3
block scales), and ``unpack`` turns them back into exactly what ``fakequant.quant_dequant`` returns for the
same QType, bit for bit. ``dequantize_packed`` reads MXFP4 checkpoints in the DeepSeek-V4 and GPT-OSS
layouts.

Byte formats (``shared/spec/formats.md`` §1, §8; OCP MX v1.0):

* **E2M1 code** (4 bits): sign in bit 3, then 2 exponent bits and 1 mantissa bit; magnitudes
  ``(0, 0.5, 1, 1.5, 2, 3, 4, 6)[code & 7]``. Code 8 is ``-0``, which ``pack`` writes for a negative input
  that quantizes to zero (formats.md §0, Sign).
* **Nibble packing**: element ``2k`` of the packing axis in the low nibble of byte ``k``, element ``2k+1`` in
  the high nibble; an odd length gets a zero high nibble in its last byte.
* **E8M0 scale byte**: ``2^(byte - 127)`` for bytes 0..254; byte 255 is NaN (OCP). MX blocks that are NaN
  (a NaN/inf inside, or a scale above the window, formats.md §1 step 2) store 255 and all-zero codes.
* **E4M3 scale byte** (NVFP4): OCP E4M3FN, sign bit 7, 4 exponent bits with bias 7, 3 mantissa bits; 0x7F is
  NaN. ``nvfp4`` also keeps its per-tensor float32 encode scale ``g`` (``Packed.tensor_scale``).

Layout of ``pack(x, q, pack_axis)``: ``codes`` is ``x``'s shape with the packing axis halved (rounded up);
``scales`` is ``x``'s shape with the quantization axis ``q.q_dim`` replaced by its number of blocks (the
axis zero-padded to a multiple of the block, as ``quant_dequant`` does). The two axes may differ: a weight
``[N, K]`` quantized along N for the dgrad GEMM is still packed along K, its scales are ``[ceil(N/32), K]``.

Public: ``pack``, ``unpack``, ``Packed``, ``dequantize_packed``, ``pack_nibbles``, ``unpack_nibbles``,
``e2m1_encode``, ``e2m1_decode``, ``e8m0_encode``, ``e8m0_decode``, ``e4m3_encode``, ``e4m3_decode``,
``as_torch_fp4``, ``as_torch_scales``, ``PACKABLE``, ``SCALE_255_RULES``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import as_qtype, check_input
from .formats._common import FLT_MAX, exponent, pow2, saturating_cast, to_blocks
from .formats.mx import ElementFormat, quantize_elements, scale_exponent
from .formats.nvfp import E2M1_VALUES, block_scales, e2m1_decode, e2m1_round
from .formats.nvfp import e4m3_from_bits as e4m3_decode
from .formats.nvfp import e4m3_to_bits as e4m3_encode
from .qtype import QType

__all__ = [
    "pack",
    "unpack",
    "Packed",
    "dequantize_packed",
    "pack_nibbles",
    "unpack_nibbles",
    "e2m1_encode",
    "e2m1_decode",
    "e8m0_encode",
    "e8m0_decode",
    "e4m3_encode",
    "e4m3_decode",
    "as_torch_fp4",
    "as_torch_scales",
    "PACKABLE",
    "SCALE_255_RULES",
    "E8M0_BIAS",
    "E8M0_NAN",
]

E8M0_BIAS = 127
E8M0_NAN = 255
E2M1 = ElementFormat(2, 1)
PACKABLE = "an MX block float with E2M1 elements (mxfp4, e2m1k<K>b<B>[c], any modifiers), nvf4 or nvfp4"
# How ``dequantize_packed`` reads E8M0 byte 255; see its docstring.
SCALE_255_RULES = ("nan", "inf")

_FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_E4M3 = getattr(torch, "float8_e4m3fn", None)


# --------------------------------------------------------------------------------------------------------
# Codes, nibbles and scale bytes


def _e2m1_table(device: torch.device) -> Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _magnitude_codes(magnitude: Tensor) -> Tensor:
    """Index 0..7 (int32) of exact E2M1 magnitudes; ``bucketize`` counts the table entries below the value."""
    return torch.bucketize(magnitude.contiguous(), _e2m1_table(magnitude.device), out_int32=True)


def e2m1_encode(values: Tensor) -> Tensor:
    """4-bit E2M1 codes (``uint8`` 0..15, sign in bit 3) of float ``values``; off-grid values round to
    nearest even and saturate at ±6, ``-0.0`` encodes as 8, NaN raises (E2M1 has no NaN)."""
    values = values.to(torch.float32)
    if torch.isnan(values).any():
        raise ValueError("e2m1_encode: E2M1 has no NaN encoding; mask NaN blocks before encoding")
    index = _magnitude_codes(e2m1_round(values.abs()))
    return (index | (torch.signbit(values).to(torch.int32) << 3)).to(torch.uint8)


def pack_nibbles(codes: Tensor, axis: int = -1) -> Tensor:
    """Two 4-bit codes per byte along ``axis``: element 2k in the low nibble, 2k+1 in the high nibble.
    An odd length is padded with a zero code. ``codes`` holds integers 0..15 (any integer dtype)."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_nibbles needs integer codes 0..15, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_nibbles: codes must be in 0..15")
    moved = codes.to(torch.uint8).movedim(axis, -1)
    if moved.shape[-1] % 2:
        moved = torch.nn.functional.pad(moved, (0, 1))
    pairs = moved.unflatten(-1, (-1, 2))  # [..., L/2, 2]
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed.movedim(-1, axis).contiguous()


def unpack_nibbles(packed: Tensor, axis: int = -1, length: int | None = None) -> Tensor:
    """Inverse of ``pack_nibbles``: ``uint8`` codes 0..15, twice as long along ``axis`` (or ``length``)."""
    packed = _as_bytes(packed, "packed codes")
    moved = packed.movedim(axis, -1)
    codes = torch.stack((moved & 0x0F, moved >> 4), dim=-1).flatten(-2)  # [..., 2 * L/2]
    if length is not None:
        if not 2 * moved.shape[-1] - 1 <= length <= 2 * moved.shape[-1]:
            raise ValueError(f"unpack_nibbles: length {length} does not fit {moved.shape[-1]} packed bytes")
        codes = codes[..., :length]
    return codes.movedim(-1, axis).contiguous()


def e8m0_encode(scale: Tensor) -> Tensor:
    """E8M0 bytes of float power-of-two ``scale`` values 2^-127..2^127; NaN gives 255.

    Anything else (not a power of two, zero, negative, infinite, out of range) raises ``ValueError``: a
    silent rounding here would make the stored tensor differ from the one that was trained.
    """
    scale = scale.to(torch.float32)
    nan = torch.isnan(scale)
    safe = torch.where(nan, 1.0, scale)
    e = exponent(torch.where(safe > 0, safe, 1.0))
    exact = (safe > 0) & torch.isfinite(safe) & (pow2(e.clamp(-149, 127)) == safe) & (e >= -127) & (e <= 127)
    if not bool(exact.all()):
        bad = safe[~exact][0].item()
        raise ValueError(f"e8m0_encode: scales must be powers of two 2^-127..2^127 or NaN, got {bad!r}")
    return torch.where(nan, E8M0_NAN, e + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(scale_bytes: Tensor, rule: str = "nan") -> Tensor:
    """Float32 scales ``2^(byte - 127)`` of E8M0 bytes (``uint8`` or ``float8_e8m0fnu``).

    Byte 255 is NaN under ``rule="nan"`` (OCP MX) and ``+inf`` under ``rule="inf"`` (the exponent 128 that
    some loaders compute, which no float32 holds). Byte 0 is 2^-127, a float32 subnormal.
    """
    _check_rule(rule)
    b = _as_bytes(scale_bytes, "E8M0 scales").to(torch.int32)
    special = float("nan") if rule == "nan" else float("inf")
    return torch.where(b == E8M0_NAN, special, pow2((b - E8M0_BIAS).clamp(max=127)))


def _check_rule(rule: str) -> None:
    if rule not in SCALE_255_RULES:
        raise ValueError(f"scale byte 255 rule {rule!r} is not one of {', '.join(map(repr, SCALE_255_RULES))}")


def _as_bytes(t: Tensor, what: str) -> Tensor:
    """A uint8 view of packed bytes given as uint8, int8, float4_e2m1fn_x2 or a float8 dtype."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.int8 or t.dtype in (_FP4_X2, _E8M0, _E4M3):
        return t.view(torch.uint8)
    raise TypeError(f"{what} must be uint8, int8 or a packed float dtype viewing bytes, got {t.dtype}")


def as_torch_fp4(codes: Tensor) -> Tensor:
    """``codes`` (packed along the last axis) viewed as ``torch.float4_e2m1fn_x2``; unchanged when the
    installed torch lacks that dtype."""
    return codes if _FP4_X2 is None else codes.view(_FP4_X2)


def as_torch_scales(scales: Tensor, qtype: QType | str) -> Tensor:
    """Scale bytes viewed as ``torch.float8_e8m0fnu`` (MX) or ``torch.float8_e4m3fn`` (nvf4/nvfp4), where
    the installed torch has the dtype; unchanged otherwise."""
    dtype = _E8M0 if _pack_kind(as_qtype(qtype)) == "mx" else _E4M3
    return scales if dtype is None else scales.view(dtype)


# --------------------------------------------------------------------------------------------------------
# pack / unpack


class Packed(tuple):
    """``(codes, scales)`` from ``pack``, with what ``unpack`` needs besides them as attributes.

    Unpacks like the pair the issue names (``codes, scales = pack(x, q)``); ``tensor_scale`` is nvfp4's
    0-dim float32 encode scale (``None`` otherwise); ``qtype``, ``shape``, ``dtype`` and ``pack_axis``
    describe the source tensor. ``p.unpack()`` gives ``quant_dequant(x, q)`` back.
    """

    def __new__(cls, codes: Tensor, scales: Tensor, *, tensor_scale: Tensor | None, qtype: QType,
                shape: torch.Size, dtype: torch.dtype, pack_axis: int) -> Packed:
        self = super().__new__(cls, (codes, scales))
        self.tensor_scale = tensor_scale
        self.qtype = qtype
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.pack_axis = pack_axis
        return self

    @property
    def codes(self) -> Tensor:
        return self[0]

    @property
    def scales(self) -> Tensor:
        return self[1]

    def unpack(self) -> Tensor:
        return unpack(self.codes, self.scales, self.qtype, self.shape, tensor_scale=self.tensor_scale,
                      dtype=self.dtype, pack_axis=self.pack_axis)

    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and the tensor scale."""
        total = self.codes.numel() + self.scales.numel()
        return total + (0 if self.tensor_scale is None else 4)


def _pack_kind(q: QType) -> str:
    if q.family == "mx" and (q.exp_bits, q.man_bits) == (2, 1):
        return "mx"
    if q.family in ("nvf4", "nvfp4"):
        return q.family
    raise ValueError(f"cannot pack {str(q)!r}: packing needs {PACKABLE}")


def _axis(axis: int, rank: int, what: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{what} must be an int, got {type(axis).__name__}")
    if not -rank <= axis < rank:
        raise ValueError(f"{what}={axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def mx_block_exponents(blocks: Tensor, q: QType, scale_mode: str | None = None) -> tuple[Tensor, Tensor]:
    """Shared exponents ``s`` (int32, ``[..., n_blocks, 1]``) of float32 MX ``blocks`` ``[..., n_blocks, B]``
    and the mask of NaN blocks, exactly as the reference ``quant_dequant`` chooses them (formats.md §1 steps
    1-2: the scale rule, an all-zero block at E(amax) = -126, NaN above the window, clamp below)."""
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    k_max = q.k_max
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    nonfinite = ~torch.isfinite(amax)
    positive = amax > 0
    safe = torch.where(positive & ~nonfinite, amax, torch.ones_like(amax))
    s = scale_exponent(safe, fmt, scale_mode or q.scale_mode, q.round_mode)
    s = torch.where(positive, s, torch.full_like(s, -126 - fmt.emax))
    nan_block = nonfinite | (s > k_max)
    return torch.clamp(s, -k_max, k_max), nan_block


def _mx_codes(blocks: Tensor, q: QType, s: Tensor, nan_block: Tensor) -> Tensor:
    """Signed E2M1 codes (int32) of float32 ``blocks`` at shared exponents ``s``; zero codes in NaN blocks."""
    magnitude = quantize_elements(blocks.abs() * pow2(-s), E2M1, q.round_mode)
    codes = _magnitude_codes(magnitude) | ((blocks < 0).to(torch.int32) << 3)
    return codes.masked_fill(nan_block, 0)


def _scales_to_exponents(scales: Tensor, q: QType, expected: torch.Size) -> tuple[Tensor, Tensor]:
    """Given power-of-two block scales in ``pack``'s scale layout moved to ``[..., n_blocks]``, the
    exponents ``[..., n_blocks, 1]`` and NaN mask; scales outside the QType's window raise."""
    if scales.shape != expected:
        raise ValueError(f"scales of shape {tuple(scales.shape)} do not match the block layout {tuple(expected)}")
    byte = e8m0_encode(scales).to(torch.int32).unsqueeze(-1)
    nan_block = byte == E8M0_NAN
    s = torch.where(nan_block, 0, byte - E8M0_BIAS)
    if bool((s.abs() > q.k_max).any()):
        raise ValueError(f"scales must lie in 2^-{q.k_max}..2^{q.k_max} for {str(q)!r}")
    return s, nan_block


def pack(x: Tensor, qtype: QType | str, pack_axis: int = -1, *, scales: Tensor | None = None) -> Packed:
    """Quantize ``x`` with ``qtype`` along ``qtype.q_dim`` and store it as 4-bit codes packed along
    ``pack_axis`` plus one scale byte per block (layout in the module docstring).

    ``qtype``: an MX block float with E2M1 elements (any scale and rounding mode, any block size and scale
    bits; E8M0 scale bytes), ``nvf4`` or ``nvfp4`` (E4M3 scale bytes). ``scales`` (MX only) overrides the
    QType's scale rule with given power-of-two block scales in the scale layout (for example
    ``fakequant.scale_search.mse_scales(x, q)``); NaN marks a NaN block.
    Returns a ``Packed`` ``(codes, scales)`` with ``unpack(*p, q, x.shape, dtype=x.dtype, ...)`` (or
    ``p.unpack()``) equal bit for bit to ``quant_dequant(x, q)``.
    """
    q = as_qtype(qtype)
    kind = _pack_kind(q)
    qdim = check_input(x, q)
    shape, rank = x.shape, max(x.dim(), 1)
    paxis = _axis(pack_axis, rank, "pack_axis")
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    tensor_scale = None
    if x.numel() == 0:
        return _pack_empty(x32, q, qdim, paxis, shape, x.dtype)
    if kind == "mx":
        blocks, restore = to_blocks(x32, qdim, q.blk_size)  # [..., n_blocks, B]
        if scales is None and q.scale_mode == "mse":  # a QType with the MSE scale rule, once QType has it
            from .scale_search import mse_scales

            scales = mse_scales(x, q)
        if scales is None:
            s, nan_block = mx_block_exponents(blocks, q)
        else:
            s, nan_block = _scales_to_exponents(scales.movedim(qdim, -1), q, blocks.shape[:-1])
        codes = restore(_mx_codes(blocks, q, s, nan_block))
        scale_bytes = torch.where(nan_block, E8M0_NAN, s + E8M0_BIAS).to(torch.uint8).squeeze(-1)
    else:
        if scales is not None:
            raise ValueError(f"scales= overrides MX scales only; {q.family} scales follow formats.md §8")
        blocks, restore = to_blocks(x32, qdim, 16)
        bs = block_scales(x32, q.dim(qdim))  # E4M3 values [..., n_blocks], NaN for NaN blocks
        s = bs.block.unsqueeze(-1)
        a = blocks.abs()
        if kind == "nvf4":
            y = a / torch.where(s > 0, s, 1.0)  # formats.md §8: fl32(|x| / S)
        else:
            g = tensor_scale = bs.tensor
            one = torch.ones((), dtype=torch.float32, device=x.device)
            enc = torch.minimum(one / (s * (one / g)), torch.full_like(one, FLT_MAX))  # TE's order
            y = a * enc
        magnitude = e2m1_round(y)
        codes = _magnitude_codes(torch.where(s > 0, magnitude, 0.0)) | ((blocks < 0).to(torch.int32) << 3)
        codes = restore(codes.masked_fill(torch.isnan(s), 0))
        scale_bytes = e4m3_encode(bs.block)
    # A 0-dim x is handled as shape (1,) throughout: one byte of codes, one scale byte.
    packed_codes = pack_nibbles(codes, paxis)
    scale_bytes = scale_bytes.movedim(-1, qdim).contiguous()
    return Packed(packed_codes, scale_bytes, tensor_scale=tensor_scale, qtype=q.dim(qdim), shape=shape,
                  dtype=x.dtype, pack_axis=paxis)


def _pack_empty(x32: Tensor, q: QType, qdim: int, paxis: int, shape: torch.Size, dtype: torch.dtype) -> Packed:
    block = q.blk_size if q.family == "mx" else 16
    code_shape, scale_shape = list(x32.shape), list(x32.shape)
    code_shape[paxis] = (code_shape[paxis] + 1) // 2
    scale_shape[qdim] = -(-scale_shape[qdim] // block)
    empty = lambda s: torch.empty(s, dtype=torch.uint8, device=x32.device)  # noqa: E731
    g = torch.tensor(FLT_MAX, device=x32.device) if q.family == "nvfp4" else None  # A = 0 (formats.md §8)
    return Packed(empty(code_shape), empty(scale_shape), tensor_scale=g, qtype=q.dim(qdim), shape=shape,
                  dtype=dtype, pack_axis=paxis)


def unpack(codes: Tensor, scales: Tensor, qtype: QType | str, shape, *, tensor_scale: Tensor | None = None,
           dtype: torch.dtype = torch.float32, pack_axis: int = -1) -> Tensor:
    """Decode ``pack``'s bytes back to a tensor of ``shape`` and ``dtype``: equal bit for bit to
    ``quant_dequant(x, qtype)`` for the ``x`` that was packed (with ``dtype=x.dtype``).

    ``codes``: uint8 (or int8 / float4_e2m1fn_x2) packed along ``pack_axis``. ``scales``: uint8 (or the
    float8 view) in the scale layout. ``tensor_scale``: nvfp4's encode scale (required for nvfp4).
    Scale byte 255 (E8M0) and 0x7F (E4M3) decode to NaN blocks.
    """
    q = as_qtype(qtype)
    kind = _pack_kind(q)
    shape = torch.Size(shape)
    rank = max(len(shape), 1)
    if not -rank <= q.q_dim < rank:
        raise ValueError(f"quantization axis dim={q.q_dim} is out of range for a tensor of rank {len(shape)}")
    qdim, paxis = q.q_dim % rank, _axis(pack_axis, rank, "pack_axis")
    full = shape if len(shape) else torch.Size([1])
    if shape.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=codes.device)
    codes = _as_bytes(codes, "codes").reshape(*full[:paxis], -1, *full[paxis + 1:])
    code = unpack_nibbles(codes, paxis, full[paxis]).to(torch.int32)
    block = q.blk_size if kind == "mx" else 16
    n_blocks = -(-full[qdim] // block)
    want = (*full[:qdim], n_blocks, *full[qdim + 1:])
    scale_bytes = _as_bytes(scales, "scales").reshape(want).movedim(qdim, -1).unsqueeze(-1)
    code_blocks, restore = to_blocks(code, qdim, block)  # zero-padded codes decode to +0, cropped after
    magnitude = _e2m1_table(code.device)[code_blocks & 7]
    if kind == "mx":
        value = torch.clamp(magnitude * e8m0_decode(scale_bytes), max=FLT_MAX)
    else:
        value = magnitude * e4m3_decode(scale_bytes)  # exact: at most 2 + 4 significant bits
        if kind == "nvfp4":
            if tensor_scale is None:
                raise ValueError("unpack of nvfp4 needs tensor_scale (Packed.tensor_scale from pack)")
            value = value / tensor_scale.to(device=value.device, dtype=torch.float32)
    value = torch.where((code_blocks & 8) != 0, -value, value)
    return saturating_cast(restore(value), dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# Checkpoint layouts


def dequantize_packed(blocks: Tensor, scales: Tensor, block_size: int = 32, dtype: torch.dtype = torch.bfloat16,
                      layout: str = "deepseek", scale_255: str = "nan") -> Tensor:
    """Dequantize MXFP4 bytes from a checkpoint (E2M1 codes, low nibble first, E8M0 block scales).

    Layouts:

    * ``"deepseek"`` (DeepSeek-V4): ``blocks`` ``[..., K // 2]`` and ``scales`` ``[..., K // block_size]``;
      returns ``[..., K]``. This is ``pack``'s layout for ``QType("mxfp4")`` along the last axis.
    * ``"gpt_oss"`` (GPT-OSS): ``blocks`` ``[..., G, block_size // 2]`` and ``scales`` ``[..., G]``;
      returns ``[..., G * block_size]``, in the natural ``(out, in)`` orientation (no transpose).

    ``blocks`` may be uint8 or int8 (or float4_e2m1fn_x2), ``scales`` uint8 or ``float8_e8m0fnu``. Each
    element is ``±code_value * 2^(byte - 127)`` computed exactly and rounded once to ``dtype``.

    Scale byte 255 (no real checkpoint holds it), by ``scale_255``:

    * ``"nan"`` (default, OCP MX v1.0): the whole block is NaN.
    * ``"inf"``: the byte is read as exponent 128, the convention of loaders that compute
      ``ldexp(value, byte - 127)``: every nonzero element overflows to ±inf, zeros stay ±0 (we keep the
      exact product; a floating ``0 * 2^128`` would give NaN, which no format intends).
    """
    if layout not in ("deepseek", "gpt_oss"):
        raise ValueError(f"layout {layout!r} is not one of 'deepseek', 'gpt_oss'")
    _check_rule(scale_255)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even int >= 2, got {block_size!r}")
    b = _as_bytes(blocks, "blocks")
    sb = _as_bytes(scales, "scales")
    if layout == "deepseek":
        if b.dim() < 1 or b.shape[:-1] != sb.shape[:-1] or b.shape[-1] * 2 != sb.shape[-1] * block_size:
            raise ValueError(
                f"deepseek layout needs blocks [..., K/2] and scales [..., K/{block_size}] with the same leading "
                f"dims, got {tuple(b.shape)} and {tuple(sb.shape)}"
            )
        b = b.unflatten(-1, (sb.shape[-1], block_size // 2))  # [..., G, bs/2]
    elif b.dim() < 2 or b.shape[:-1] != sb.shape or b.shape[-1] * 2 != block_size:
        raise ValueError(
            f"gpt_oss layout needs blocks [..., G, {block_size // 2}] and scales [..., G], "
            f"got {tuple(b.shape)} and {tuple(sb.shape)}"
        )
    code = unpack_nibbles(b, -1).to(torch.int32)  # [..., G, bs]
    magnitude = _e2m1_table(b.device)[code & 7]
    byte = sb.to(torch.int32).unsqueeze(-1)  # [..., G, 1]
    value = magnitude * pow2((byte - E8M0_BIAS).clamp(max=127))  # exact in float32 (products below 2^130)
    if scale_255 == "nan":
        value = torch.where(byte == E8M0_NAN, float("nan"), value)
    else:
        value = torch.where((byte == E8M0_NAN) & (magnitude > 0), float("inf"), value)
    value = torch.where((code & 8) != 0, -value, value)
    # 6 * 2^127 overflows float32 to inf, as rounding the exact value to any float dtype would.
    return value.flatten(-2).to(dtype)
