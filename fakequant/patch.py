"""Put a model's GEMMs on fake-quantized operands without touching the model's code.

* ``patch(model, config)`` turns every selected ``nn.Linear`` into a ``FakeQuantLinear`` by changing the
  module's class in place: same object, same parameters, same hooks, same ``state_dict`` keys, so an
  optimizer built before patching keeps working. The class defines ``forward``; nothing is wrapped. It
  refuses a model that is already patched and returns a ``PatchReport`` of what it touched.
* ``unpatch(model)`` gives every patched module its original class back.
* Observers (``fakequant.observe``): ``patch(model, config, observers=(obs,))`` stores them on each patched
  module with its fully-qualified name; ``attach_observer(model, obs)`` / ``detach_observer(model, obs)``
  add and remove them later; ``patch_functional(config, observers=...)`` does the same for a block. Both
  also attach ``config.observers`` (the config's own, first; an observer given both ways once).
* ``with patch_functional(config):`` routes ``torch.matmul``, ``torch.bmm``, ``torch.baddbmm``,
  ``F.linear`` and ``F.scaled_dot_product_attention`` calls made inside the block (Megatron-style attention,
  Hugging Face SDPA attention) through ``fakequant.autograd``, and restores them on exit, exceptions
  included. Tensor methods and operators (``a @ b``, ``a.bmm(b)``) are not routed.

Public: ``patch``, ``unpatch``, ``patch_functional``, ``attach_observer``, ``detach_observer``,
``set_enabled``, ``is_enabled``, ``FakeQuantLinear``, ``PatchReport``, ``PatchedLayer``, ``FUNCTIONAL_OPS``.
"""

from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autograd as _ag
from .config import FakeQuantConfig
from .observe import Observer, ObserverSite, check_observers

__all__ = [
    "patch", "unpatch", "patch_functional", "attach_observer", "detach_observer", "set_enabled", "is_enabled",
    "FakeQuantLinear", "PatchReport",
    "PatchedLayer", "FUNCTIONAL_OPS",
]


# --------------------------------------------------------------------------------------------- modules
class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose fprop, dgrad and wgrad run on fake-quantized operands.

    Made only by ``fakequant.patch`` (which swaps the class of an existing ``nn.Linear``); the formats live in
    ``fakequant_config``, a plain attribute, so ``state_dict`` is that of the original module. Its observers
    sit in ``_fakequant_site`` (``None`` when there are none).
    """

    fakequant_config: FakeQuantConfig

    def forward(self, input: Tensor) -> Tensor:
        return _ag._apply_linear(input, self.weight, self.bias, self._fakequant_plan, self._fakequant_site)

    def extra_repr(self) -> str:
        cfg = self.fakequant_config
        roles = ", ".join(f"{role}={fmt or 'none'}" for role, fmt in cfg.role_formats().items())
        return f"{super().extra_repr()}, {roles}, fidelity={cfg.fidelity}"


_CLASS_CACHE: dict[type, type] = {nn.Linear: FakeQuantLinear}


def _fake_quant_class(cls: type) -> type:
    """``FakeQuantLinear`` for ``nn.Linear``; for a subclass that keeps ``nn.Linear.forward``, a subclass of
    both, so that ``isinstance`` checks against the user's class still hold."""
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"FakeQuant{cls.__name__}", (FakeQuantLinear, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


@dataclass(frozen=True)
class PatchedLayer:
    """One patched module: its fully-qualified name and the format of each role (None = high precision)."""

    name: str
    formats: dict[str, str | None]


@dataclass(frozen=True)
class PatchReport:
    """What ``patch`` did: the patched layers in module order, and the ``nn.Linear`` modules it left alone
    with the reason."""

    layers: tuple[PatchedLayer, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    fidelity: str = "faithful"

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[PatchedLayer]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> PatchedLayer:
        return self.layers[i]

    def __str__(self) -> str:
        lines = [f"fakequant: patched {len(self.layers)} Linear module(s), fidelity={self.fidelity}"]
        width = max([len(layer.name) for layer in self.layers] + [4])
        for layer in self.layers:
            roles = "  ".join(f"{r}={f or 'none'}" for r, f in layer.formats.items())
            lines.append(f"  {layer.name or '<root>':<{width}}  {roles}")
        for name, why in self.skipped:
            lines.append(f"  {name or '<root>':<{width}}  not patched: {why}")
        return "\n".join(lines)


def _check_model(model: object, where: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def patch(model: nn.Module, config: FakeQuantConfig, observers: Sequence[Observer] = ()) -> PatchReport:
    """Fake-quantize every selected ``nn.Linear`` of ``model`` in place; returns a ``PatchReport``.

    Selected: ``nn.Linear`` modules (and subclasses that do not override ``forward``) whose fully-qualified
    name passes ``config.include`` / ``config.exclude``. ``config.observers`` and ``observers`` (each observer
    once) are called with an ``OperandEvent`` for every operand each patched layer quantizes
    (``fakequant.observe``). Raises ``RuntimeError`` if ``model`` is already patched.
    """
    _check_model(model, "patch")
    _ag._check_config(config, "patch")
    observers = _all_observers(config, observers, "patch")
    already = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if already:
        shown = ", ".join(repr(n) for n in already[:3]) + (", ..." if len(already) > 3 else "")
        raise RuntimeError(
            f"patch: the model is already patched ({len(already)} module(s): {shown}); "
            f"call fakequant.unpatch(model) first"
        )
    plan = _ag.gemm_plan(config, "linear")
    formats = config.role_formats()
    layers, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if type(module).forward is not nn.Linear.forward:
            skipped.append((name, f"{type(module).__name__} overrides forward"))
            continue
        if not config.selects(name, module):
            skipped.append((name, "excluded by config.include/exclude"))
            continue
        module.__class__ = _fake_quant_class(type(module))
        module.fakequant_config = config
        module._fakequant_plan = plan
        module._fakequant_name = name
        module._fakequant_site = ObserverSite(name, list(observers)) if observers else None
        layers.append(PatchedLayer(name, dict(formats)))
    return PatchReport(tuple(layers), tuple(skipped), config.fidelity)


def unpatch(model: nn.Module) -> list[str]:
    """Give every patched module of ``model`` its original class back; returns their names.

    Raises ``RuntimeError`` if nothing in ``model`` is patched.
    """
    _check_model(model, "unpatch")
    restored = []
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            # The original class is the one after FakeQuantLinear in the MRO (nn.Linear or the user's subclass).
            mro = type(module).__mro__
            module.__class__ = mro[mro.index(FakeQuantLinear) + 1]
            del module.fakequant_config
            del module._fakequant_plan
            del module._fakequant_name
            del module._fakequant_site
            restored.append(name)
    if not restored:
        raise RuntimeError("unpatch: the model has no patched modules (fakequant.patch was not applied)")
    return restored


def _patched_modules(model: nn.Module, where: str) -> list[FakeQuantLinear]:
    _check_model(model, where)
    modules = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not modules:
        raise RuntimeError(f"{where}: the model has no patched modules (call fakequant.patch first)")
    return modules


def set_enabled(model: nn.Module, enabled: bool) -> list[str]:
    """Switch fake quantization of every patched module of ``model`` off (plain GEMMs, bit for bit) or back
    on, without unpatching: a bf16 warm-up before quantized training. Returns the modules' names."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_enabled: enabled must be a bool, got {type(enabled).__name__}")
    modules = _patched_modules(model, "set_enabled")
    for module in modules:
        config = module.fakequant_config if enabled else _HIGH_PRECISION
        module._fakequant_plan = _ag.gemm_plan(config, "linear")
    return [m._fakequant_name for m in modules]


def is_enabled(module: nn.Module) -> bool:
    """Whether a patched module currently fake-quantizes (see ``set_enabled``)."""
    return module._fakequant_plan == _ag.gemm_plan(module.fakequant_config, "linear")


_HIGH_PRECISION = FakeQuantConfig()


def _same(a: Observer, b: Observer) -> bool:
    # Identity, except that bound methods are made afresh at each attribute access (``events.append``).
    bound = (types.MethodType, types.BuiltinMethodType)
    return a is b or (isinstance(a, bound) and isinstance(b, bound) and a == b)


def _all_observers(config: FakeQuantConfig, observers: Sequence[Observer], where: str) -> list[Observer]:
    """The config's observers, then those of the ``observers`` argument that are not among them: a saver put
    in the config and also passed to ``patch`` must not dump every operand twice."""
    merged = list(config.observers)
    for observer in check_observers(observers, where):
        if not any(_same(o, observer) for o in merged):
            merged.append(observer)
    return merged


def attach_observer(model: nn.Module, observer: Observer) -> list[str]:
    """Add ``observer`` to every patched module of ``model``; returns their names. An observer already
    attached to a module is not added twice."""
    check_observers((observer,), "attach_observer")
    names = []
    for module in _patched_modules(model, "attach_observer"):
        if module._fakequant_site is None:
            module._fakequant_site = ObserverSite(module._fakequant_name, [])
        if not any(_same(o, observer) for o in module._fakequant_site.observers):
            module._fakequant_site.observers.append(observer)
        names.append(module._fakequant_name)
    return names


def detach_observer(model: nn.Module, observer: Observer) -> list[str]:
    """Remove ``observer`` from every patched module of ``model`` that has it; returns their names. A module
    left without observers goes back to the observer-free path."""
    names = []
    for module in _patched_modules(model, "detach_observer"):
        site = module._fakequant_site
        if site is None or not any(_same(o, observer) for o in site.observers):
            continue
        site.observers[:] = [o for o in site.observers if not _same(o, observer)]
        if not site.observers:
            module._fakequant_site = None
        names.append(module._fakequant_name)
    return names


# ------------------------------------------------------------------------------------------ functional
# op name -> (namespace, attribute). The originals are autograd's own references, looked up at import.
FUNCTIONAL_OPS = ("matmul", "bmm", "baddbmm", "linear", "scaled_dot_product_attention")
_TARGETS = {
    "matmul": (torch, "matmul", _ag._matmul),
    "bmm": (torch, "bmm", _ag._bmm),
    "baddbmm": (torch, "baddbmm", _ag._baddbmm),
    "linear": (F, "linear", _ag._linear),
    "scaled_dot_product_attention": (F, "scaled_dot_product_attention", _ag._sdpa),
}
_local = threading.local()


def _plain_call() -> bool:
    """True inside a fakequant op (its own GEMMs and quantizers) and during backward: call the original."""
    return (
        getattr(_local, "depth", 0) > 0
        or getattr(_ag._QUANTIZING, "depth", 0) > 0
        or torch._C._current_autograd_node() is not None
    )


@contextlib.contextmanager
def _inside() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _floating(*tensors: object) -> bool:
    return all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors)


def _with_out(result: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return result
    with torch.no_grad():
        return out.copy_(result)


def _make_wrappers(config: FakeQuantConfig, site: ObserverSite | None = None) -> dict:
    mm_plan = _ag.gemm_plan(config, "matmul")
    lin_plan = _ag.gemm_plan(config, "linear")

    def matmul(input, other, *, out=None):
        if _plain_call() or not _floating(input, other):
            return _ag._matmul(input, other) if out is None else _ag._matmul(input, other, out=out)
        with _inside():
            return _with_out(_ag._apply_matmul(input, other, mm_plan, site), out)

    def bmm(input, mat2, *, out=None):
        if _plain_call() or not _floating(input, mat2):
            return _ag._bmm(input, mat2) if out is None else _ag._bmm(input, mat2, out=out)
        with _inside():
            return _with_out(_ag._apply_bmm(input, mat2, mm_plan, site), out)

    def baddbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
        if _plain_call() or not _floating(input, batch1, batch2):
            kw = {} if out is None else {"out": out}
            return _ag._baddbmm(input, batch1, batch2, beta=beta, alpha=alpha, **kw)
        with _inside():
            return _with_out(_ag._apply_baddbmm(input, batch1, batch2, beta, alpha, mm_plan, site), out)

    def linear(input, weight, bias=None):
        if _plain_call() or not _floating(input, weight):
            return _ag._linear(input, weight, bias)
        with _inside():
            return _ag._apply_linear(input, weight, bias, lin_plan, site)

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if _plain_call() or not _floating(query, key, value):
            return _ag._sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        with _inside():
            return _ag.quant_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       config=config, observer_site=site)

    wrappers = {
        "matmul": matmul, "bmm": bmm, "baddbmm": baddbmm, "linear": linear,
        "scaled_dot_product_attention": scaled_dot_product_attention,
    }
    for name, fn in wrappers.items():
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = f"fakequant.patch_functional's {name}: quantized with {config!r}."
        fn.__wrapped__ = _TARGETS[name][2]
    return wrappers


@contextlib.contextmanager
def patch_functional(
    config: FakeQuantConfig, ops: Sequence[str] = FUNCTIONAL_OPS, observers: Sequence[Observer] = (),
) -> Iterator[FakeQuantConfig]:
    """Route the functional ops in ``ops`` through the fake-quant autograd functions inside the block.

    ``torch.matmul``/``torch.bmm``/``torch.baddbmm``: first operand in the ``input`` role, second in the
    ``weight`` role; ``F.linear``: as a patched Linear; ``F.scaled_dot_product_attention``: the attention
    roles. Calls made by fakequant itself and during backward use the plain ops. The previous functions are
    restored on exit, also after an exception; blocks can nest.

    Note that ``nn.Linear.forward`` calls ``F.linear``, so with ``"linear"`` in ``ops`` every unpatched
    ``nn.Linear`` run inside the block is quantized too, whatever ``config.exclude`` says; pass
    ``ops=("bmm", "baddbmm")`` (say) to quantize attention only.

    ``config.observers`` and ``observers`` (each observer once) see every operand quantized inside the
    block, with layer ``""``.
    """
    _ag._check_config(config, "patch_functional")
    if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
        raise TypeError(f"patch_functional: ops must be a sequence of op names, got {ops!r}")
    unknown = [op for op in ops if op not in FUNCTIONAL_OPS]
    if unknown:
        raise ValueError(f"patch_functional: unknown op(s) {unknown!r}; allowed: {', '.join(FUNCTIONAL_OPS)}")
    observers = _all_observers(config, observers, "patch_functional")
    wrappers = _make_wrappers(config, ObserverSite("", observers) if observers else None)
    saved = []
    try:
        for op in dict.fromkeys(ops):
            namespace, attr, _ = _TARGETS[op]
            saved.append((namespace, attr, getattr(namespace, attr)))
            setattr(namespace, attr, wrappers[op])
        yield config
    finally:
        for namespace, attr, previous in reversed(saved):
            setattr(namespace, attr, previous)
