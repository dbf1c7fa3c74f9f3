"""Ascend NPU implementations of fakequant's formats, registered into ``fakequant.dispatch`` for ``npu``.

Importing this package tries ``import torch_npu``:

* **torch_npu imports**: every format family is registered as backend ``npu`` for device type ``npu``
  (``fakequant.dispatch.register``), so ``fakequant.quant_dequant`` - and through it autograd and patching -
  uses these implementations for tensors on an Ascend device, after the dispatcher's self-test against the
  reference. The implementations are ``fakequant_npu.portable`` (float32 / int32 operators only, tiled,
  bounded memory; see its docstring), and for MX with the floor scale rule on Ascend 950 the native
  ``torch_npu.npu_dynamic_mx_quant`` behind its own self-test (``fakequant_npu.native``).
* **torch_npu does not import** (any machine without CANN): nothing is registered, the import still
  succeeds, and ``status()`` (and ``fakequant.dispatch.describe()`` where the dispatcher shows backend
  status) says why.

Nothing else in fakequant imports ``torch_npu``.

Public: ``status``, ``register``, ``FAMILIES``, ``REGISTERED``, ``native_mx`` (the ``NativeMx`` in use, or
``None``), and the submodules ``portable``, ``native``, ``ops_allowed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fakequant.qtype import QType

from . import native, ops_allowed, portable

__all__ = ["status", "register", "FAMILIES", "REGISTERED", "native_mx", "portable", "native", "ops_allowed"]

BACKEND = "npu"
DEVICE_TYPE = "npu"
FAMILIES = tuple(portable.FAMILY_IMPLS)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

REGISTERED: tuple[str, ...] = ()  # families registered for "npu" by this process
native_mx: native.NativeMx | None = None
_STATUS = {"ok": False, "reason": "not initialised"}


def status() -> tuple[bool, str]:
    """``(registered, reason)``: whether the NPU implementations are registered, and why (not)."""
    return _STATUS["ok"], _STATUS["reason"]


def _set_status(ok: bool, reason: str) -> None:
    _STATUS["ok"], _STATUS["reason"] = ok, reason
    from fakequant import dispatch

    # The dispatcher shows each backend's availability in describe() where it offers this hook.
    report = getattr(dispatch, "set_backend_status", None)
    if report is not None:
        report(BACKEND, ok, reason)


_SCALE_MODES = ("floor", "round", "ceil", "rceil")  # what portable's block-float engine implements


def _check(x: Tensor, q: QType) -> tuple[bool, str]:
    """Capability of the NPU implementations for this call (the dispatcher falls back quietly on False)."""
    if x.dtype not in _DTYPES:
        return False, f"the NPU implementations take float32, bfloat16 or float16 tensors, not {x.dtype}"
    if q.scale_mode is not None and q.scale_mode not in _SCALE_MODES:
        return False, f"scale mode {q.scale_mode!r} has no NPU implementation; the reference runs it"
    return True, ""


def register(torch_npu=None) -> tuple[bool, str]:
    """Register the NPU implementations of every family (``FAMILIES``) for device type ``npu``.

    ``torch_npu`` is the module to use (default: ``import torch_npu``; tests pass a stand-in). Returns
    ``status()``. Calling it again re-registers (replacing the previous entries).
    """
    global REGISTERED, native_mx
    if torch_npu is None:
        try:
            import torch_npu  # noqa: F811  (registers the "npu" device with torch)
        except Exception as err:  # ImportError without CANN; OSError/RuntimeError for a broken CANN
            REGISTERED, native_mx = (), None
            _set_status(False, (
                f"not registered: torch_npu is not importable ({type(err).__name__}: {err}); on Ascend, install "
                "CANN and then `pip install fakequant[npu]`"
            ))
            return status()
    from fakequant import dispatch

    native_mx = native.NativeMx(torch_npu, portable.FAMILY_IMPLS["mx"])
    for family in FAMILIES:
        if family == "mx":
            fn, note = native_mx, "portable; npu_dynamic_mx_quant on Ascend 950 for floor-scale e4m3/e5m2/e2m1 k8 after its self-test"
        else:
            fn, note = portable.FAMILY_IMPLS[family], "portable"
        dispatch.register(BACKEND, family, DEVICE_TYPE, fn, _check, note=note, replace=True)
    REGISTERED = FAMILIES
    version = getattr(torch_npu, "__version__", "unknown version")
    _set_status(True, f"registered for {len(FAMILIES)} families (torch_npu {version})")
    return status()


register()
