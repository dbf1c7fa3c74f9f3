"""``QuantLinear``: an inference Linear whose weight is stored packed (4-bit codes + block scale bytes).

``y = Q_in(x) · dequant(W)ᵀ + b``: the activation is fake-quantized with ``input_qtype`` (along its last
dim, the GEMM's reduction dim, as fprop does in training) and multiplied with the stored weight.

Stored state (all in ``state_dict``, loadable into an empty ``QuantLinear()`` skeleton):

* ``weight_codes`` ``[out, ceil(in/2)]`` uint8: E2M1 codes, two per byte (``fakequant.packing``);
* ``weight_scales`` ``[out, ceil(in/B)]`` uint8: the block scales in their own byte format, E8M0 for MX
  QTypes and E4M3 for nvf4/nvfp4 (``weight_scales_native`` views them as ``float8_e8m0fnu`` /
  ``float8_e4m3fn``);
* ``weight_tensor_scale``: nvfp4's per-tensor float32 encode scale (absent otherwise);
* ``transform`` (optional): a per-block input transform ``[G, G]`` (shared) or ``[in/G, G, G]``; the input's
  blocks of G are multiplied by it before quantization, and the weight is stored in the transformed space;
* ``bias`` (a Parameter, like ``nn.Linear``'s); the formats and sizes in ``_extra_state``.

``.to(dtype)`` / ``.half()`` leave the packed bytes and the tensor scale untouched (the bias and the
transform follow the dtype, as they would in ``nn.Linear``); ``.to(device)`` moves everything.

Backends: ``torch`` dequantizes the weight with ``fakequant.packing.unpack`` (bit for bit
``quant_dequant`` of the trained weight) and calls ``F.linear``: the reference, and what ``fakequant.export``
reproduces exactly. ``triton`` runs ``fakequant.kernels.triton.quant_linear``: the 4-bit tiles are decoded
in registers and multiplied on the tensor cores in bf16 (float32 sums). ``backend=None`` chooses per call:
``triton`` for CUDA tensors when Triton imports and the format is supported, else ``torch``; an explicit
backend that cannot run raises with the reason (``triton`` also runs CPU tensors under
``TRITON_INTERPRET=1``).

Public: ``QuantLinear``, ``QUANT_LINEAR_BACKENDS``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import quant_dequant
from .formats import as_qtype
from .packing import Packed, _pack_kind, as_torch_scales, pack, unpack
from .qtype import QType

__all__ = ["QuantLinear", "QUANT_LINEAR_BACKENDS"]

QUANT_LINEAR_BACKENDS = ("torch", "triton")
# Buffers that keep their dtype under .to(dtype) / .half() (the packed weight and its float32 tensor scale).
_DTYPE_IMMUNE = ("weight_codes", "weight_scales", "weight_tensor_scale")
# Cast round trips that are exact for these input dtypes are skipped (as fakequant.autograd does).
_EXACT_CASTS = {"fp32": (torch.float32, torch.bfloat16, torch.float16), "bf16": (torch.bfloat16,),
                "fp16": (torch.float16,)}


def _weight_qtype(q: QType | str) -> QType:
    q = as_qtype(q)
    _pack_kind(q)  # raises for formats that cannot be stored packed
    if q.q_dim not in (-1, 1):
        raise ValueError(
            f"QuantLinear stores the weight [out, in] quantized along in_features (dim=-1), got dim={q.q_dim} "
            f"in {str(q)!r}"
        )
    return q.dim(-1)


def _block(q: QType) -> int:
    return q.blk_size if q.family == "mx" else 16


def _quantize_input(x: Tensor, q: QType | None) -> Tensor:
    if q is None or (q.family == "cast" and x.dtype in _EXACT_CASTS.get(q.name, ())):
        return x
    y = quant_dequant(x, q)
    return y.contiguous() if x.is_contiguous() else y


def _triton_check(x: Tensor, q: QType) -> tuple[bool, str]:
    """Whether the triton backend can run this call: (ok, reason)."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.device.type != "cuda" and not interpret:
        return False, f"the Triton kernel runs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device.type}"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False, f"input dtype {x.dtype} is not bfloat16, float16 or float32"
    block = _block(q)
    if block % 2 or 64 % block:
        return False, f"scale block {block} of {str(q)!r} is not an even divisor of 64"
    return True, ""


class QuantLinear(nn.Module):
    """A Linear with a packed 4-bit weight; see the module docstring.

    Constructor: ``nn.Linear``'s arguments (all optional, so ``QuantLinear()`` is an empty skeleton for
    ``load_state_dict``) plus ``weight_qtype`` (``mxfp4``-family, ``nvf4`` or ``nvfp4``, along in_features),
    ``input_qtype`` (any QType or ``None`` for no activation quantization), ``backend`` (``None``,
    ``"torch"``, ``"triton"``) and ``transform``. The weight bytes start at zero; fill them with
    ``QuantLinear.from_weight`` / ``from_linear`` / ``load_packed`` or ``load_state_dict``.
    """

    def __init__(
        self,
        in_features: int = 0,
        out_features: int = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_qtype: QType | str = "mxfp4",
        input_qtype: QType | str | None = None,
        backend: str | None = None,
        transform: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"QuantLinear: {name} must be an int >= 0, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_qtype = _weight_qtype(weight_qtype)
        self.input_qtype = None if input_qtype is None else as_qtype(input_qtype)
        self.backend = backend
        block = _block(self.weight_qtype)
        self.register_buffer("weight_codes", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, -(-in_features // block), dtype=torch.uint8,
                                                          device=device))
        nvfp4 = self.weight_qtype.family == "nvfp4"
        self.register_buffer("weight_tensor_scale",
                             torch.ones((), dtype=torch.float32, device=device) if nvfp4 else None)
        self.register_buffer("transform", None)
        self._scale_max: tuple | None = None  # (buffer identity, largest scale byte): see _max_scale_byte
        if transform is not None:
            self.transform = self._check_transform(transform).to(device=device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None and value not in QUANT_LINEAR_BACKENDS:
            raise ValueError(f"QuantLinear backend {value!r} is not one of {', '.join(QUANT_LINEAR_BACKENDS)} "
                             f"(or None for automatic)")
        self._backend = value

    @property
    def weight_scales_native(self) -> Tensor:
        """``weight_scales`` viewed as ``float8_e8m0fnu`` (MX) or ``float8_e4m3fn`` (NVFP4) where torch has them."""
        return as_torch_scales(self.weight_scales, self.weight_qtype)

    def packed_weight(self) -> Packed:
        """The stored weight as ``fakequant.packing.Packed`` (codes, scales, tensor scale)."""
        return Packed(self.weight_codes, self.weight_scales, tensor_scale=self.weight_tensor_scale,
                      qtype=self.weight_qtype, shape=torch.Size((self.out_features, self.in_features)),
                      dtype=torch.float32, pack_axis=1)

    def weight_bits_per_element(self) -> float:
        """Bits of packed storage (codes, scales, tensor scale) per weight element."""
        n = self.in_features * self.out_features
        return 8 * self.packed_weight().nbytes() / n if n else 0.0

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[out, in]`` as stored: bit for bit ``quant_dequant(W, weight_qtype)`` in ``dtype``."""
        return unpack(self.weight_codes, self.weight_scales, self.weight_qtype,
                      (self.out_features, self.in_features), tensor_scale=self.weight_tensor_scale,
                      dtype=dtype, pack_axis=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight_qtype}, input={self.input_qtype or 'none'}, backend={self.backend or 'auto'}"
                + (", transform" if self.transform is not None else ""))

    # -------------------------------------------------------------------------------------- constructors
    def load_packed(self, packed: Packed) -> QuantLinear:
        """Store ``fakequant.packing.pack(W, self.weight_qtype)`` of a weight ``[out, in]``; returns self."""
        codes, scales = packed
        want_c = (self.out_features, (self.in_features + 1) // 2)
        want_s = (self.out_features, -(-self.in_features // _block(self.weight_qtype)))
        if tuple(codes.shape) != want_c or tuple(scales.shape) != want_s or packed.pack_axis != 1:
            raise ValueError(f"packed weight of codes {tuple(codes.shape)} / scales {tuple(scales.shape)} does not "
                             f"fit {self.out_features}x{self.in_features} (expected {want_c} / {want_s}, packed "
                             f"along in_features)")
        with torch.no_grad():
            self.weight_codes.copy_(codes)
            self.weight_scales.copy_(scales)
            if self.weight_tensor_scale is not None:
                self.weight_tensor_scale.copy_(packed.tensor_scale)
        return self

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        weight_qtype: QType | str = "mxfp4",
        input_qtype: QType | str | None = None,
        scales: Tensor | None = None,
        transform: Tensor | None = None,
        backend: str | None = None,
    ) -> QuantLinear:
        """Pack a high-precision ``weight`` ``[out, in]`` (and copy ``bias``). ``scales``: MX block scales to use
        instead of the QType's rule (``fakequant.scale_search.mse_scales`` / ``hessian_scales``). With a
        ``transform`` the weight is stored in the transformed space so that the layer still computes
        ``x · weightᵀ`` up to quantization."""
        if weight.dim() != 2:
            raise ValueError(f"QuantLinear.from_weight: weight must be [out, in], got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None, device=weight.device,
                    dtype=None if bias is None else bias.dtype, weight_qtype=weight_qtype,
                    input_qtype=input_qtype, backend=backend, transform=transform)
        w = weight.detach()
        if layer.transform is not None:
            w = layer._transform_weight(w)
        layer.load_packed(pack(w, layer.weight_qtype, pack_axis=1, scales=scales))
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_qtype: QType | str = "mxfp4",
                    input_qtype: QType | str | None = None, scales: Tensor | None = None,
                    transform: Tensor | None = None, backend: str | None = None) -> QuantLinear:
        """``from_weight(linear.weight, linear.bias, ...)``."""
        return cls.from_weight(linear.weight, linear.bias, weight_qtype=weight_qtype, input_qtype=input_qtype,
                               scales=scales, transform=transform, backend=backend)

    # ------------------------------------------------------------------------------------------ transform
    def _check_transform(self, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() not in (2, 3) or t.shape[-1] != t.shape[-2]:
            raise ValueError("transform must be a floating [G, G] (shared) or [in/G, G, G] (per block) tensor")
        g = t.shape[-1]
        if self.in_features % g or (t.dim() == 3 and t.shape[0] != self.in_features // g):
            raise ValueError(f"transform of shape {tuple(t.shape)} does not tile in_features={self.in_features}")
        return t.detach().clone()

    def _apply_transform(self, x: Tensor) -> Tensor:
        t = self.transform.to(dtype=x.dtype)
        g = t.shape[-1]
        xb = x.unflatten(-1, (-1, g))  # [..., in/G, G]
        y = xb @ t if t.dim() == 2 else torch.einsum("...jg,jgh->...jh", xb, t)
        return y.flatten(-2)

    def _transform_weight(self, w: Tensor) -> Tensor:
        """``W' `` with ``x T W'ᵀ = x Wᵀ``: per block, ``W'_j = W_j T_j^{-T}`` (float64 solve)."""
        t = self.transform.double()
        g = t.shape[-1]
        inv_t = torch.linalg.inv(t).transpose(-1, -2)
        wb = w.double().unflatten(-1, (-1, g))  # [out, in/G, G]
        w2 = wb @ inv_t if t.dim() == 2 else torch.einsum("njg,jgh->njh", wb, inv_t)
        return w2.flatten(-2).to(w.dtype)

    # --------------------------------------------------------------------------------------------- forward
    def _resolve_backend(self, x: Tensor) -> str:
        if self.backend == "torch":
            return "torch"
        ok, reason = _triton_check(x, self.weight_qtype)
        if self.backend == "triton":
            if not ok:
                raise RuntimeError(f"QuantLinear backend 'triton' cannot run this input: {reason}")
            return "triton"
        return "triton" if ok and x.device.type == "cuda" else "torch"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, in_features={self.in_features}")
        bias = self.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.transform is not None:
            x = self._apply_transform(x)
        x = _quantize_input(x, self.input_qtype)
        if self._resolve_backend(x) == "torch":
            return F.linear(x, self.dequantize_weight(x.dtype), bias)
        from .kernels.triton.quant_linear import quant_linear

        e4m3 = self.weight_qtype.family != "mx"
        y = quant_linear(x.reshape(-1, self.in_features), self.weight_codes, self.weight_scales,
                         block=_block(self.weight_qtype), e4m3=e4m3, tensor_scale=self.weight_tensor_scale,
                         bias=bias, max_scale_byte=None if e4m3 else self._max_scale_byte())
        return y.reshape(*x.shape[:-1], self.out_features)

    def _max_scale_byte(self) -> int:
        """The largest scale byte, recomputed (one device sync) only when the buffer changes: data pointer and
        version counter, so ``.to()``, ``copy_`` and ``load_state_dict`` all invalidate it. It lets the Triton
        backend use its one-multiply decode when no block needs more (see ``quant_linear(max_scale_byte=)``)."""
        s = self.weight_scales
        key = (s.data_ptr(), s._version, s.device)
        if self._scale_max is None or self._scale_max[0] != key:
            self._scale_max = (key, int(s.max()) if s.numel() else 0)
        return self._scale_max[1]

    # ------------------------------------------------------------------------------------ state handling
    def get_extra_state(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "weight_qtype": str(self.weight_qtype),
                "input_qtype": None if self.input_qtype is None else str(self.input_qtype)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.in_features, self.out_features = int(state["in_features"]), int(state["out_features"])
        self.weight_qtype = _weight_qtype(state["weight_qtype"])
        self.input_qtype = None if state["input_qtype"] is None else QType(state["input_qtype"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A skeleton's buffers may have other shapes (an empty QuantLinear()) or be absent (no tensor scale,
        # no transform, no bias): make each local tensor match what the checkpoint holds, on our device, so
        # that the default copy succeeds; drop optional ones the checkpoint does not have.
        device = self.weight_codes.device
        has_extra = prefix + "_extra_state" in state_dict
        for name in ("weight_codes", "weight_scales", "weight_tensor_scale", "transform"):
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict:
                src = state_dict[key]
                if cur is None or cur.shape != src.shape or cur.dtype != src.dtype:
                    self._buffers[name] = torch.empty_like(src, device=device)
            elif has_extra and name in ("weight_tensor_scale", "transform"):
                self._buffers[name] = None
        key = prefix + "bias"
        if key in state_dict:
            src = state_dict[key]
            if self.bias is None or self.bias.shape != src.shape:
                self.bias = nn.Parameter(torch.empty_like(src, device=device))
        elif has_extra and self.bias is not None and self.bias.numel() == 0:
            self.bias = None  # an empty skeleton built with the default bias=True, loading a bias-free layer
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the float32 tensor scale (and, where torch treats them as floats,
        # fp8 views); keep the packed state's dtype and value, moving it to wherever fn moved the rest.
        saved = {n: self._buffers[n] for n in _DTYPE_IMMUNE if self._buffers.get(n) is not None}
        super()._apply(fn, recurse=recurse)
        for name, orig in saved.items():
            cur = self._buffers[name]
            if cur.dtype != orig.dtype:
                self._buffers[name] = orig.to(device=cur.device)
        return self
