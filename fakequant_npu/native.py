"""The optional native-operator path: ``torch_npu.npu_dynamic_mx_quant`` for MX formats on Ascend 950.

CANN's ``DynamicMxQuant`` (``aclnnDynamicMxQuant``, ``scale_alg=0``) computes, per block of ``block_size``
elements along ``axis``, ``shared_exp = floor(log2(max |V_i|)) - emax`` and ``P_i = cast(V_i / 2^shared_exp,
round_mode)`` with an E8M0 scale byte. That is formats.md §1 with the ``floor`` scale rule, K = 8, for
FP8 E4M3 / E5M2 and FP4 E2M1 elements, ``round_mode`` ``rint`` / ``round`` / ``floor`` being our ``even`` /
``nearest`` / ``floor``. The operator exists on Ascend 950 only (its documentation marks Atlas A2/A3 "not
supported").

What this module adds around the operator, so that its result can equal the reference:

* decoding: FP8 outputs are widened to float32 (exact); FP4 outputs come packed two per byte, the element
  with the even index in the low nibble (an assumption the self-test checks); the scale bytes, shaped like
  the input with the axis replaced by ``ceil(n_blocks / 2)`` and a trailing 2 (op-plugin's
  ``DynamicMxQuantKernelNpuOpApi.cpp``), are read in block order, byte ``e`` meaning ``2^(e-127)`` and
  0xFF NaN;
* the sign comes from the input (formats.md §0: ±0 in gives +0, a negative value that rounds to zero gives
  -0), an element the cast turned into NaN or inf in a finite block is the saturated ``max_norm`` (OCP
  FP8 casts without saturation give NaN for E4M3 and inf for E5M2 on overflow), and a block holding a NaN/inf is NaN, its bits read from the
  input;
* a **self-test** per (format, input dtype, device type): before the operator is used for a key, a canary
  tensor (``fakequant.dispatch.canary`` when present) is quantized along both axes by this path and by the
  portable implementation; any bitwise difference refuses the operator for that key and the portable
  implementation runs instead. The self-test synchronises with the host once per key, at its first use
  (or when ``NativeMx.run_self_tests`` is called at start-up); the quantization itself never does.

None of this can run here (no Ascend hardware). ``tests/test_npu_backend.py`` exercises the logic through
a stand-in operator written from the documentation, and a stand-in that disagrees to show the fallback.

Public: ``NativeMx``.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import torch
from torch import Tensor

from fakequant.formats import as_qtype
from fakequant.qtype import QType

from . import portable

__all__ = ["NativeMx", "ROUND_MODES", "DST_TYPES"]

ROUND_MODES = {"even": "rint", "nearest": "round", "floor": "floor"}  # our round mode -> CANN round_mode
# (exp_bits, man_bits) -> candidate torch_npu / torch dtype names for dst_type, first found wins
DST_TYPES = {
    (4, 3): ("float8_e4m3fn",),
    (5, 2): ("float8_e5m2",),
    (2, 1): ("float4_e2m1fn_x2", "float4_e2m1"),
}
_MAX_NORM = {(4, 3): 448.0, (5, 2): 57344.0, (2, 1): 6.0}
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_UNIT, _BLOCK_MAX = 32, 1024  # the operator's block_size must be a multiple of 32, at most 1024
_SCALE_ALG_FLOOR = 0


class NativeMx:
    """``npu_dynamic_mx_quant`` behind a capability check and a per-key self-test, else ``fallback``.

    ``torch_npu`` is the imported module (or a stand-in with the same attributes); ``fallback`` is the
    portable MX implementation ``(x, q) -> Tensor``.
    """

    def __init__(self, torch_npu, fallback: Callable[[Tensor, QType], Tensor], canary=None) -> None:
        self.torch_npu = torch_npu
        self.fallback = fallback
        self._canary = canary
        self.self_tests: dict[tuple, tuple[bool, str]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ capability
    def _op(self):
        return getattr(self.torch_npu, "npu_dynamic_mx_quant", None)

    def _dst_type(self, q: QType):
        for name in DST_TYPES.get((q.exp_bits, q.man_bits), ()):
            for owner in (self.torch_npu, torch):
                dtype = getattr(owner, name, None)
                if dtype is not None:
                    return dtype
        return None

    def device_name(self, device: torch.device) -> str:
        npu = getattr(self.torch_npu, "npu", None)
        get_name = getattr(npu, "get_device_name", None)
        if get_name is None:
            return ""
        try:
            return str(get_name(device.index if device.index is not None else 0))
        except Exception:  # no device visible, or an old torch_npu: not a 950
            return ""

    def capability(self, x: Tensor, q: QType) -> tuple[bool, str]:
        """Whether the operator can compute this call at all (the self-test decides if it may)."""
        if self._op() is None:
            return False, "torch_npu has no npu_dynamic_mx_quant"
        if q.family != "mx" or q.k_bits != 8 or q.scale_mode != "floor":
            return False, "the operator implements MX with an E8M0 scale (k8) and the floor scale rule only"
        if (q.exp_bits, q.man_bits) not in DST_TYPES:
            return False, f"element format e{q.exp_bits}m{q.man_bits} is not one of e4m3, e5m2, e2m1"
        if self._dst_type(q) is None:
            return False, f"this torch_npu has no dtype for e{q.exp_bits}m{q.man_bits}"
        if q.blk_size % _BLOCK_UNIT or q.blk_size > _BLOCK_MAX:
            return False, f"block size {q.blk_size} is not a multiple of 32 up to 1024"
        if q.round_mode not in ROUND_MODES:
            return False, f"round mode {q.round_mode!r} has no CANN round_mode"
        if x.dtype not in _INPUT_DTYPES:
            return False, f"input dtype {x.dtype} is not float32, bfloat16 or float16"
        name = self.device_name(x.device)
        if "950" not in name:
            return False, f"npu_dynamic_mx_quant runs on Ascend 950 only (device: {name or 'unknown'})"
        return True, ""

    # -------------------------------------------------------------------------------------- numerics
    def quant_dequant(self, x: Tensor, q: QType, tile_elements: int | None = None) -> Tensor:
        """The operator's result decoded to the reference's numbers (no capability check, no self-test)."""
        q = as_qtype(q)
        if x.numel() == 0:
            return x.clone()
        dim = q.q_dim % max(x.dim(), 1)
        x1 = x.reshape(1) if x.dim() == 0 else x
        kernel = _NativeKernel(self._op(), self._dst_type(q), q)
        out = portable._run(x1, q.dim(dim), q.blk_size, kernel, tile_elements, as_float32=False)
        return out.reshape(x.shape)

    # ------------------------------------------------------------------------------------- self-test
    def _key(self, x: Tensor, q: QType) -> tuple:
        return (q.dim(-1).desc, x.dtype, x.device.type)

    def canary(self, q: QType, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._canary is not None:
            return self._canary(q, dtype, device)
        from fakequant import dispatch

        make = getattr(dispatch, "canary", None)
        if make is not None:
            return make(q, dtype, device)
        return _local_canary(q, dtype, device)

    def self_test(self, x: Tensor, q: QType) -> tuple[bool, str]:
        """Run (once per key) and return the comparison of this path with the portable implementation."""
        key = self._key(x, q)
        with self._lock:
            result = self.self_tests.get(key)
        if result is not None:
            return result
        try:
            c = self.canary(q, x.dtype, x.device)
            result = (True, "passed")
            for dim in (-1, 0):
                qd = q.dim(dim)
                got, want = self.quant_dequant(c, qd), self.fallback(c, qd)
                bad = _mismatch_count(got, want)
                if bad:
                    result = (False, f"{bad} of {want.numel()} canary elements differ (dim={dim})")
                    break
        except Exception as err:  # an operator that cannot even run the canary is refused with the error
            result = (False, f"{type(err).__name__}: {err}")
        with self._lock:
            self.self_tests[key] = result
        return result

    def run_self_tests(self, device: torch.device | str, dtypes=(torch.bfloat16, torch.float16, torch.float32)):
        """Start-up self-tests of every format and rounding mode the operator covers, on ``device``."""
        device = torch.device(device)
        results = {}
        for (e, m) in DST_TYPES:
            for mode in ROUND_MODES:
                q = QType(f"e{e}m{m}k8b32").round(mode)
                for dtype in dtypes:
                    probe = torch.empty(0, dtype=dtype, device=device)
                    ok, why = self.capability(probe, q)
                    results[(q.desc, dtype)] = self.self_test(probe, q) if ok else (False, why)
        return results

    def use_native(self, x: Tensor, q: QType) -> tuple[bool, str]:
        ok, why = self.capability(x, q)
        if not ok:
            return False, why
        return self.self_test(x, q)

    def __call__(self, x: Tensor, q: QType) -> Tensor:
        q = as_qtype(q)
        ok, _ = self.use_native(x, q)
        return self.quant_dequant(x, q) if ok else self.fallback(x, q)


class _NativeKernel:
    """One tile ``[pc, ic, n]`` (the input's dtype, n a multiple of the block) through the operator."""

    def __init__(self, op, dst_type, q: QType) -> None:
        self.op, self.dst_type, self.q = op, dst_type, q
        self.fmt = (q.exp_bits, q.man_bits)

    def __call__(self, tile: Tensor) -> Tensor:
        q = self.q
        lead, n = tile.shape[:-1], tile.shape[-1]
        rows = math.prod(lead)
        x2 = tile.reshape(rows, n)  # [rows, n], blocks along the last axis
        y, scale_bytes = self.op(
            x2, axis=-1, round_mode=ROUND_MODES[q.round_mode], dst_type=self.dst_type, block_size=q.blk_size,
            scale_alg=_SCALE_ALG_FLOOR,
        )
        n_blocks = n // q.blk_size
        values = _decode_elements(y, self.fmt, rows, n)  # [rows, n] float32, the cast elements (sign kept)
        e = scale_bytes.reshape(rows, -1)[:, :n_blocks].to(torch.int32)  # [rows, n_blocks] in block order
        scale = torch.where(e == 255, math.nan, portable.pow2(e - 127))
        # Blocks holding a NaN/inf are NaN (read from the input, whatever the operator's scale says).
        x32 = x2.to(torch.float32)
        top = portable._abs_bits(x32).reshape(rows, n_blocks, q.blk_size).amax(dim=-1)
        scale = torch.where(top >= portable._INF_BITS, math.nan, scale)
        # In a finite block a non-finite element is a cast overflow (NaN for OCP E4M3 without saturation,
        # inf for E5M2); the reference saturates it to max_norm.
        magnitude = values.abs()
        magnitude = torch.where(magnitude <= _MAX_NORM[self.fmt], magnitude, _MAX_NORM[self.fmt])
        out = magnitude.reshape(rows, n_blocks, q.blk_size) * scale.unsqueeze(-1)
        out = portable._apply_sign(x32, out.reshape(rows, n))
        return out.reshape(*lead, n)


def _decode_elements(y: Tensor, fmt: tuple[int, int], rows: int, n: int) -> Tensor:
    if fmt != (2, 1):
        return y.reshape(rows, n).to(torch.float32)
    codes = y.reshape(rows, n // 2).view(torch.uint8).to(torch.int32)
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(rows, n)  # even index in the low nibble
    magnitude = torch.zeros(nibbles.shape, dtype=torch.float32, device=y.device)
    for code, value in enumerate(_E2M1_VALUES):
        magnitude = torch.where((nibbles & 7) == code, value, magnitude)
    return torch.where((nibbles & 8) != 0, -magnitude, magnitude)


def _mismatch_count(got: Tensor, want: Tensor) -> int:
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(want.numel(), 1)
    a, b = got.float(), want.float()
    same = (torch.isnan(a) & torch.isnan(b)) | ((a == b) & (torch.signbit(a) == torch.signbit(b)))
    return int((~same).sum())


def _local_canary(q: QType, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small deterministic canary (used only when ``fakequant.dispatch.canary`` is absent)."""
    gen = torch.Generator().manual_seed(0x5EED)
    rows, cols = 37, 2 * q.blk_size + 6
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-30, 31, (rows, 1), generator=gen).float())
    x[0, :8] = torch.tensor([0.0, -0.0, 2.0**-130, -(2.0**-149), 448.0, 500.0, 6.5, -7.0])
    x[1, 3], x[2, 5], x[3, :] = float("nan"), float("inf"), 0.0
    x[4, :] = torch.linspace(-4.0, 4.0, cols)
    return x.to(dtype).to(device)
