"""Choose the implementation of ``quant_dequant`` per format family and device type.

The table is visible and printable (``describe()``): ``(family, device type) -> {backend: Implementation}``.
Backends are ``torch`` (the plain-torch reference in ``fakequant.formats``, the truth, on any device),
``triton`` (``fakequant.kernels.triton``, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``) and
``npu`` (registered by ``fakequant_npu`` through ``register``).

Selection for ``quant_dequant(x, q, backend=None)``:

* ``backend`` given, or else ``FAKEQUANT_BACKEND`` set (the only environment variable fakequant reads,
  read here at call time): that backend is **explicit**. If it has no implementation of ``q.family`` for
  ``x.device.type``, if its capability check says no, or if it fails its self-test, ``RuntimeError`` is
  raised with the reason.
* Otherwise **automatic**: the device type's automatic order (``cuda``: triton, torch; ``npu``: npu, torch;
  anything else: torch) is walked and the first implementation whose capability check passes and whose
  self-test passes is used. A capability miss falls back quietly; a refused self-test falls back with a
  ``RuntimeWarning`` naming the mismatch.

**Self-test.** The first time a non-reference implementation is used for a (backend, format, device type,
dtype), a canary tensor (random values at many scales, ties, subnormals, signed zeros, zero blocks, a NaN
and an inf inside blocks, values near the format's and dtype's limits) is quantized along both axes by the
implementation and by the reference; any bitwise difference (NaN equal to NaN, -0 distinct from +0) refuses
the implementation for that key for the rest of the process.

Public: ``quant_dequant``, ``register``, ``describe``, ``select``, ``Implementation``, ``BACKENDS``,
``reset_self_tests``; ``quant_dequant_pair`` (one tensor, two formats/axes, one pass where a kernel fuses it);
``quant_dequant_two`` (two tensors, one launch where a kernel fuses them); ``quant_dequant_pair_two`` (both).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .formats import REFERENCE_IMPLS, as_qtype, check_input, reference_quant_dequant
from .qtype import FAMILIES, QType

__all__ = [
    "quant_dequant", "quant_dequant_pair", "quant_dequant_two", "quant_dequant_pair_two", "register", "describe",
    "select", "Implementation", "BACKENDS",
    "reset_self_tests", "set_backend_status", "canary", "ENV_BACKEND", "TRITON_KERNELS",
]

BACKENDS = ("torch", "triton", "npu")
ENV_BACKEND = "FAKEQUANT_BACKEND"
ANY_DEVICE = "*"

Check = Callable[[Tensor, QType], "tuple[bool, str]"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute ``quant_dequant`` for a format family on a device type.

    ``fn`` is a callable ``(x, q) -> Tensor`` or a lazy ``"module:function"`` string, resolved at each call
    (so importing fakequant never imports Triton, and tests can monkeypatch the module attribute).
    ``check(x, q) -> (ok, reason)`` says whether it can run this call; ``reason`` feeds errors and skips.
    ``auto``: eligible for automatic selection on this device type.
    """

    backend: str
    family: str
    device_type: str
    fn: Callable[[Tensor, QType], Tensor] | str
    check: Check | None = None
    auto: bool = True
    note: str = ""

    def resolve(self) -> Callable[[Tensor, QType], Tensor]:
        if callable(self.fn):
            return self.fn
        module, func = self.fn.split(":")
        return getattr(_module(module), func)  # looked up per call: tests monkeypatch kernels

    def can_run(self, x: Tensor, q: QType) -> tuple[bool, str]:
        return (True, "") if self.check is None else self.check(x, q)

    @property
    def is_reference(self) -> bool:
        return self.backend == "torch"


@dataclass
class _State:
    table: dict[tuple[str, str], dict[str, Implementation]] = field(default_factory=dict)
    auto_order: dict[str, list[str]] = field(default_factory=dict)
    self_tests: dict[tuple, tuple[bool, str]] = field(default_factory=dict)
    chosen: dict[tuple[str, str], str] = field(default_factory=dict)
    warned: set = field(default_factory=set)
    status: dict[str, tuple[bool, str]] = field(default_factory=dict)
    # (QType, axis, device type, dtype, requested backend) -> the Implementation chosen for it: a call that
    # was decided once (capability checked, self-test passed) is decided the same way again, in a lookup
    fast: dict[tuple, Implementation] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _State()


# ---------------------------------------------------------------------------------------------- registry
def register(
    backend: str,
    families: str | tuple[str, ...] | list[str],
    device_types: str | tuple[str, ...] | list[str],
    fn: Callable[[Tensor, QType], Tensor] | str,
    check: Check | None = None,
    *,
    auto: bool = True,
    note: str = "",
    replace: bool = False,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``families`` on ``device_types``.

    ``fakequant_npu`` calls ``register("npu", families, "npu", fn, check)``. With ``auto=True`` the backend is
    put ahead of the reference in the device type's automatic order. Registering an existing
    (backend, family, device type) raises ``ValueError`` unless ``replace=True``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    families = (families,) if isinstance(families, str) else tuple(families)
    device_types = (device_types,) if isinstance(device_types, str) else tuple(device_types)
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"family {fam!r} is not one of {', '.join(FAMILIES)}")
    if not callable(fn) and not (isinstance(fn, str) and fn.count(":") == 1):
        raise TypeError(f"fn must be a callable or a 'module:function' string, got {fn!r}")
    with _STATE.lock:
        for dev in device_types:
            for fam in families:
                slot = _STATE.table.setdefault((fam, dev), {})
                if backend in slot and not replace:
                    raise ValueError(
                        f"{backend!r} already implements {fam!r} on {dev!r}; pass replace=True to override"
                    )
                slot[backend] = Implementation(backend, fam, dev, fn, check, auto, note)
            if auto and backend != "torch" and dev != ANY_DEVICE:
                order = _STATE.auto_order.setdefault(dev, [])
                if backend not in order:
                    order.append(backend)
        _STATE.self_tests.clear()
        _STATE.fast.clear()


def set_backend_status(backend: str, ok: bool, reason: str) -> None:
    """A backend reports whether it is usable in this process (``describe()`` prints it); ``fakequant_npu``
    calls this whether or not ``torch_npu`` imports."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    _STATE.status[backend] = (bool(ok), str(reason))


def _candidates(family: str, device_type: str) -> dict[str, Implementation]:
    merged = dict(_STATE.table.get((family, ANY_DEVICE), {}))
    merged.update(_STATE.table.get((family, device_type), {}))
    return merged


def _env_backend() -> str | None:
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_BACKEND}={value!r} is not one of {', '.join(BACKENDS)} (unset it for automatic choice)"
        )
    return value


def select(x: Tensor, q: QType | str, backend: str | None = None) -> Implementation:
    """The implementation ``quant_dequant(x, q, backend)`` would use (running the self-test if due)."""
    q = as_qtype(q)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)} (or None for automatic)")
    requested = backend if backend is not None else _env_backend()
    dev = x.device.type
    key = (q, q.q_dim, dev, x.dtype, requested)
    impl = _STATE.fast.get(key)
    if impl is None:
        impl = _select(x, q, requested, dev)
        if not (dev == "cpu" and impl.backend == "triton"):  # the interpreter switch is read per call
            _STATE.fast[key] = impl
    return impl


def _select(x: Tensor, q: QType, requested: str | None, dev: str) -> Implementation:
    impls = _candidates(q.family, dev)
    if requested is not None:
        impl = impls.get(requested)
        if impl is None:
            have = ", ".join(sorted(impls)) or "none"
            raise RuntimeError(
                f"backend {requested!r} has no implementation of format family {q.family!r} ({q.desc}) on "
                f"{dev!r} tensors; implementations there: {have}"
            )
        ok, reason = impl.can_run(x, q)
        if not ok:
            raise RuntimeError(f"backend {requested!r} cannot run {q.desc!r} on this tensor: {reason}")
        if not impl.is_reference:
            passed, why = _self_test(impl, x, q)
            if not passed:
                raise RuntimeError(f"backend {requested!r} failed its self-test for {q.desc!r}: {why}")
        _note_choice(q.family, dev, impl.backend)
        return impl
    for name in _STATE.auto_order.get(dev, []):
        impl = impls.get(name)
        if impl is None or not impl.auto or impl.is_reference:
            continue
        ok, _ = impl.can_run(x, q)
        if not ok:
            continue
        passed, why = _self_test(impl, x, q)
        if passed:
            _note_choice(q.family, dev, impl.backend)
            return impl
        key = (impl.backend, q.family, dev, _format_key(q), x.dtype)
        if key not in _STATE.warned:
            _STATE.warned.add(key)
            warnings.warn(
                f"fakequant: the {impl.backend} kernel for {q.desc!r} on {dev} ({x.dtype}) failed its self-test "
                f"against the reference and is not used; falling back to the reference: {why}",
                RuntimeWarning,
                stacklevel=3,
            )
    impl = impls["torch"]
    _note_choice(q.family, dev, impl.backend)
    return impl


def _note_choice(family: str, dev: str, backend: str) -> None:
    _STATE.chosen[(family, dev)] = backend


# -------------------------------------------------------------------------------------------- public API
def quant_dequant(x: Tensor, qtype: QType | str, backend: str | None = None) -> Tensor:
    """Quantize then dequantize ``x`` in format ``qtype`` along ``qtype.q_dim``; same shape and dtype out.

    ``backend=None`` chooses automatically (module docstring); ``"torch"``, ``"triton"`` or ``"npu"`` force
    one and raise ``RuntimeError`` with the reason when it cannot run.
    """
    q = as_qtype(qtype)
    check_input(x, q)
    impl = select(x, q, backend)
    if impl.is_reference or x.numel() == 0:
        return reference_quant_dequant(x, q)
    return impl.resolve()(x, q)


def quant_dequant_pair(x: Tensor, q_a: QType | str, q_b: QType | str, backend: str | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(quant_dequant(x, q_a), quant_dequant(x, q_b))``, bit for bit, in one pass over ``x`` where a kernel
    fuses the two: Triton, two MX formats along the last two axes of ``x`` (one each), power-of-two blocks
    (``fakequant.kernels.triton.mx.fusable_pair``). That is autograd's ``grad_output`` for dgrad (along N)
    and wgrad (along M) in one read, or a weight for fprop and dgrad. Otherwise, two calls.

    The fused kernel has its own self-test (the canary through both axes); a refusal falls back to two calls
    with a warning, or raises when ``backend`` (or ``FAKEQUANT_BACKEND``) is explicit.
    """
    q_a, q_b = as_qtype(q_a), as_qtype(q_b)
    check_input(x, q_a)
    check_input(x, q_b)
    impl_a = select(x, q_a, backend)
    impl_b = select(x, q_b, backend)
    if impl_a.backend == impl_b.backend == "triton" and x.numel() > 0 and q_a.family == q_b.family == "mx":
        mod = _triton_module("mx")
        if mod.fusable_pair(x, q_a, q_b) and _fused_self_test("pair", mod, x, q_a, q_b, backend):
            return mod.quant_dequant_mx_pair(x, q_a, q_b)
    return quant_dequant(x, q_a, impl_a.backend), quant_dequant(x, q_b, impl_b.backend)


def quant_dequant_two(x_a: Tensor, q_a: QType | str, x_b: Tensor, q_b: QType | str, backend: str | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``(quant_dequant(x_a, q_a), quant_dequant(x_b, q_b))``, bit for bit, in one kernel launch where one
    fuses them: Triton, two MX formats, tensors of one dtype on one device (a GEMM's two operands). Saves the
    host one launch per pair, which is what a training step of small operands is limited by. Otherwise, two
    calls. The fused launch has its own self-test; a refusal falls back to two calls with a warning, or
    raises when ``backend`` (or ``FAKEQUANT_BACKEND``) is explicit."""
    q_a, q_b = as_qtype(q_a), as_qtype(q_b)
    check_input(x_a, q_a)
    check_input(x_b, q_b)
    impl_a = select(x_a, q_a, backend)
    impl_b = select(x_b, q_b, backend)
    if (impl_a.backend == impl_b.backend == "triton" and q_a.family == q_b.family == "mx"
            and x_a.dtype == x_b.dtype and x_a.device == x_b.device and x_a.numel() > 0 and x_b.numel() > 0):
        mod = _triton_module("mx")
        if _fused_self_test("two", mod, x_a, q_a, q_b, backend):
            return mod.quant_dequant_mx_two(x_a, q_a, x_b, q_b)
    return quant_dequant(x_a, q_a, impl_a.backend), quant_dequant(x_b, q_b, impl_b.backend)


def quant_dequant_pair_two(g: Tensor, q_ga: QType | str, q_gb: QType | str, x_a: Tensor, q_a: QType | str,
                           x_b: Tensor, q_b: QType | str, backend: str | None = None) -> tuple[Tensor, ...]:
    """``(*quant_dequant_pair(g, q_ga, q_gb), *quant_dequant_two(x_a, q_a, x_b, q_b))``, bit for bit, in one
    kernel launch where one fuses all four: Triton, MX formats, a fusable pair on ``g``, one dtype and
    device. That is a Linear's whole backward quantization (grad_output for dgrad and wgrad, the weight for
    dgrad, the input for wgrad). Otherwise the pair and the two, each fused where it can be. The fused
    launch has its own self-test, as the pair's."""
    q_ga, q_gb, q_a, q_b = (as_qtype(q) for q in (q_ga, q_gb, q_a, q_b))
    for t, q in ((g, q_ga), (g, q_gb), (x_a, q_a), (x_b, q_b)):
        check_input(t, q)
    impls = [select(t, q, backend) for t, q in ((g, q_ga), (g, q_gb), (x_a, q_a), (x_b, q_b))]
    if (all(i.backend == "triton" for i in impls) and all(q.family == "mx" for q in (q_ga, q_gb, q_a, q_b))
            and g.dtype == x_a.dtype == x_b.dtype and g.device == x_a.device == x_b.device
            and min(g.numel(), x_a.numel(), x_b.numel()) > 0):
        mod = _triton_module("mx")
        if mod.fusable_pair(g, q_ga, q_gb) and _fused_self_test("pair_two", mod, g, q_ga, q_gb, backend, (q_a, q_b)):
            return mod.quant_dequant_mx_pair_two(g, q_ga, q_gb, x_a, q_a, x_b, q_b)
    return (*quant_dequant_pair(g, q_ga, q_gb, backend), *quant_dequant_two(x_a, q_a, x_b, q_b, backend))


def _fused_self_test(kind: str, mod, x: Tensor, q_a: QType, q_b: QType, backend: str | None,
                     more: tuple[QType, ...] = ()) -> bool:
    """Whether the fused Triton ``kind`` ("pair": one tensor, two axes; "two": two tensors) passes its
    self-test for these formats on ``x``'s device and dtype; a failure warns once (or raises when the
    backend is explicit) and the caller runs the separate kernels."""
    key = (kind, x.device.type, q_a, q_b, x.dtype, *more)
    result = _STATE.self_tests.get(key)
    if result is None:
        result = _STATE.self_tests[key] = _run_fused_self_test(kind, mod, x, q_a, q_b, more)
    passed, why = result
    if passed:
        return True
    if backend is not None or _env_backend() is not None:
        raise RuntimeError(f"the fused Triton {kind} kernel failed its self-test for {q_a.desc!r}, {q_b.desc!r}: {why}")
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(f"fakequant: the fused Triton {kind} kernel for {q_a.desc!r}, {q_b.desc!r} failed its "
                      f"self-test and is not used (separate kernels instead): {why}", RuntimeWarning, stacklevel=3)
    return False


def _run_fused_self_test(kind: str, mod, x: Tensor, q_a: QType, q_b: QType, more: tuple[QType, ...] = ()
                         ) -> tuple[bool, str]:
    """Canaries through the fused kernel ``kind`` against the reference: for a pair, one canary along both of
    its last two axes in ``x``'s axis order; for each single tensor, a 2-D canary along its own axis."""

    def single(q: QType) -> tuple[Tensor, QType]:
        return canary(q, x.dtype, x.device), q.dim(-1 if q.q_dim == -1 else 0)

    try:
        cases = []  # (canary, QType) per output, in the kernel's output order
        if kind in ("pair", "pair_two"):
            c = canary(q_a, x.dtype, x.device)
            a_axis, b_axis = q_a.q_dim % x.dim(), q_b.q_dim % x.dim()
            cases += [(c, q_a.dim(-1 if a_axis > b_axis else 0)), (c, q_b.dim(-1 if b_axis > a_axis else 0))]
            args = (c, cases[0][1], cases[1][1])
            if kind == "pair_two":
                cases += [single(q) for q in more]
                args += (cases[2][0], cases[2][1], cases[3][0], cases[3][1])
            got = getattr(mod, f"quant_dequant_mx_{kind}")(*args)
        else:  # two
            cases = [single(q_a), single(q_b)]
            got = mod.quant_dequant_mx_two(cases[0][0], cases[0][1], cases[1][0], cases[1][1])
        for out, (c, q) in zip(got, cases):
            bad = _mismatches(out, reference_quant_dequant(c, q))
            if bad:
                return False, f"{q.desc}: {bad}"
        return True, "passed"
    except Exception as err:  # noqa: BLE001 - a kernel that cannot run is refused, with the reason
        return False, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------- self-test
def _format_key(q: QType) -> str:
    return q.dim(-1).desc


def reset_self_tests() -> None:
    """Forget every self-test result, warning and recorded choice (for tests, after monkeypatching)."""
    with _STATE.lock:
        _STATE.self_tests.clear()
        _STATE.warned.clear()
        _STATE.chosen.clear()
        _STATE.fast.clear()


def canary(q: QType, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A small deterministic tensor that exercises a format's corner cases (2-D, both axes ragged)."""
    block = q.block_len or 64
    cols = max(2 * block + 3, 67)
    rows = max(block + 5, 21)
    gen = torch.Generator().manual_seed(0x5EED)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    # many scales: each row and each column block at its own power of two
    row_scale = torch.randint(-40, 41, (rows, 1), generator=gen).double()
    col_scale = torch.randint(-8, 9, (1, cols), generator=gen).double()
    x = x * torch.exp2(row_scale + col_scale)
    finfo = torch.finfo(dtype)
    flat = x.view(-1)
    n = flat.numel()
    specials = [
        0.5, 1.5, 2.5, -2.5, 0.25, 0.75, 3.5, 5.0, 6.0, 7.0, 448.0, 57344.0, 32768.0, 40960.0,  # ties, limits
        2.0**-126, 2.0**-130, -(2.0**-133), 2.0**-140, 2.0**-149, 2.0**-24, 2.0**-14, 2.0**-22, 2.0**-23,
        finfo.max, -finfo.max, finfo.max / 3, finfo.tiny, -0.0, 0.0, 1.0 - 2.0**-9, 1.0 + 2.0**-8,
    ]
    for i, v in enumerate(specials):
        flat[(i * 37 + 11) % n] = v
    x[3, :] = 0.0  # a zero row (zero blocks along -1)
    x[:, 5] = -0.0  # a signed-zero column
    x[7, 2] = float("nan")  # NaN inside a block
    x[9, cols - 2] = float("inf")  # inf inside the ragged last block
    x[rows - 2, 1] = float("-inf")
    x[11, :] = torch.linspace(-4.0, 4.0, cols, dtype=torch.float64)  # exact halves and quarters
    return x.to(dtype).to(device)


def _self_test(impl: Implementation, x: Tensor, q: QType) -> tuple[bool, str]:
    key = (impl.backend, q.family, x.device.type, _format_key(q), x.dtype)
    result = _STATE.self_tests.get(key)
    if result is None:
        result = _run_self_test(impl, q, x.dtype, x.device)
        _STATE.self_tests[key] = result
    return result


def _run_self_test(impl: Implementation, q: QType, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    try:
        c = canary(q, dtype, device)
        fn = impl.resolve()
        for dim in (-1, 0):
            qd = q.dim(dim)
            ok, reason = impl.can_run(c, qd)
            if not ok:
                continue
            got = fn(c, qd)
            want = reference_quant_dequant(c, qd)
            bad = _mismatches(got, want)
            if bad:
                return False, bad + f" (canary {tuple(c.shape)}, dim={dim}, {dtype})"
    except Exception as err:  # a kernel that cannot even run its canary is refused with the error
        return False, f"{type(err).__name__}: {err}"
    return True, "passed"


def _mismatches(got: Tensor, want: Tensor) -> str:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)}/{got.dtype} instead of {tuple(want.shape)}/{want.dtype}"
    a, b = got.float(), want.float()
    same = (torch.isnan(a) & torch.isnan(b)) | ((a == b) & (torch.signbit(a) == torch.signbit(b)))
    bad = int((~same).sum())
    if bad == 0:
        return ""
    idx = tuple(int(i) for i in (~same).nonzero()[0])
    return f"{bad} of {same.numel()} elements differ, first at {idx}: got {a[idx].item()!r}, reference {b[idx].item()!r}"


# ---------------------------------------------------------------------------------------------- describe
def describe(file=None) -> str:
    """Print (to ``file``, default stdout) and return the dispatch table, the automatic order per device
    type, the self-test results and the choices made so far in this process."""
    lines = [f"fakequant dispatch ({ENV_BACKEND}={os.environ.get(ENV_BACKEND, '') or 'unset'})"]
    lines.append("automatic order: " + "; ".join(
        f"{dev}: {' > '.join([*order, 'torch'])}" for dev, order in sorted(_STATE.auto_order.items())
    ) + "; other devices: torch")
    lines.append(f"{'family':<11} {'device':<6} backends")
    for (fam, dev), impls in sorted(_STATE.table.items()):
        parts = []
        for name, impl in impls.items():
            extra = [] if impl.auto or dev == ANY_DEVICE else ["explicit only"]
            if impl.note:
                extra.append(impl.note)
            parts.append(name + (f" ({'; '.join(extra)})" if extra else ""))
        lines.append(f"{fam:<11} {dev:<6} {', '.join(parts)}")
    if _STATE.self_tests:
        lines.append("self-tests:")
        for key, (ok, why) in sorted(_STATE.self_tests.items(), key=str):
            if key[0] in ("pair", "two", "pair_two"):
                kind, dev, *qs = key
                dtype = qs.pop(2)
                what = f"triton fused {kind} " + " + ".join(q.desc for q in qs)
            else:
                backend, _, dev, fmt, dtype = key
                what = f"{backend} {fmt}"
            lines.append(f"  {what} on {dev} {str(dtype).replace('torch.', '')}: "
                         f"{'passed' if ok else 'REFUSED: ' + why}")
    if _STATE.status:
        lines.append("backend status: " + "; ".join(
            f"{b}: {'available' if ok else 'unavailable'}{' (' + why + ')' if why else ''}"
            for b, (ok, why) in sorted(_STATE.status.items())))
    if _STATE.chosen:
        lines.append("chosen: " + ", ".join(f"{fam}@{dev} -> {b}" for (fam, dev), b in sorted(_STATE.chosen.items())))
    text = "\n".join(lines)
    print(text, file=file if file is not None else sys.stdout)
    return text


# ----------------------------------------------------------------------------------- built-in registrations
# The Triton kernels: family -> module in fakequant.kernels.triton and its launcher.
TRITON_KERNELS = {
    "mx": "mx:quant_dequant_mx",
    "hif8": "hifloat:quant_dequant_hif8",
    "hif4": "hifloat:quant_dequant_hif4",
    "hifx": "hifloat:quant_dequant_hifx",
    "tmx": "tmx:quant_dequant_tmx",
    "nvf4": "nvfp:quant_dequant_nvf4",
    "nvfp4": "nvfp:quant_dequant_nvfp4",
    "nf4": "nf4:quant_dequant_nf4",
    "int8sym": "intq:quant_dequant_int8sym",
}
_TRITON_STATUS: list = []  # [(ok, reason)] once probed


def _module(name: str):
    """The module ``name``, imported on first use; later calls are a ``sys.modules`` lookup (importlib's
    own path costs microseconds, on every quantization)."""
    return sys.modules.get(name) or importlib.import_module(name)


def _triton_module(name: str):
    return _module(f"fakequant.kernels.triton.{name}")


def _triton_available() -> tuple[bool, str]:
    if not _TRITON_STATUS:
        try:
            import triton  # noqa: F401

            _TRITON_STATUS.append((True, f"triton {triton.__version__}"))
        except Exception as err:  # ImportError, or a broken install
            _TRITON_STATUS.append((False, f"triton does not import ({type(err).__name__}: {err})"))
        set_backend_status("triton", *_TRITON_STATUS[0])
    return _TRITON_STATUS[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_check(x: Tensor, q: QType) -> tuple[bool, str]:
    ok, reason = _triton_available()
    if not ok:
        return ok, reason
    reason = ""
    dev = x.device.type
    if dev == "cpu" and not _interpreting():
        return False, "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    if dev not in ("cuda", "cpu"):
        return False, f"Triton kernels run on CUDA tensors, not {dev!r}"
    if x.dtype not in _TRITON_DTYPES:
        return False, f"dtype {x.dtype} is not supported by the Triton kernels (float32, bfloat16, float16)"
    if q.scale_mode == "mse":
        return False, "scale mode 'mse' (per-block scale search) has no Triton kernel; the reference runs it"
    return True, ""


def _cast_any(x: Tensor, q: QType) -> Tensor:
    # a plain IEEE cast round trip is one fused elementwise op in torch already, on every device
    return reference_quant_dequant(x, q)


def _register_builtins() -> None:
    register("torch", tuple(REFERENCE_IMPLS) + ("cast",), ANY_DEVICE, reference_quant_dequant,
             note="reference")
    for family, target in TRITON_KERNELS.items():
        fn = f"fakequant.kernels.triton.{target}"
        register("triton", family, "cuda", fn, _triton_check)
        register("triton", family, "cpu", fn, _triton_check, auto=False, note="TRITON_INTERPRET=1")
    register("triton", "cast", ("cuda", "cpu"), _cast_any, _triton_check, auto=False, note="torch cast")


_register_builtins()
