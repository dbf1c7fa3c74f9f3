"""Which format each tensor role gets: ``FakeQuantConfig`` and the named recipes in ``recipes/``.

A config names a QType (or ``None`` = high precision) per role of a linear layer (``input``, ``weight``,
``grad_output``), optional per-GEMM overrides, the attention roles, the fidelity mode and which modules
``fakequant.patch`` selects. It is frozen and validated on construction: a bad field raises ``ValueError``
or ``TypeError`` naming the field, the value and what is allowed (DESIGN.md, "Words"; STYLE.md item 2).

A config may also carry ``observers`` (``fakequant.observe``, e.g. a ``fakequant.saver.TensorSaver``), which
``patch``, ``patch_functional`` and the Lightning callback attach with the ones they are given. They are
run-time objects, not formats: they take no part in equality, hashing, ``repr`` or ``to_dict``.

Public: ``FakeQuantConfig``, ``ROLES``, ``GEMM_OVERRIDES``, ``ATTENTION_ROLES``, ``FIDELITIES``,
``DEFAULT_EXCLUDE``, ``RUNTIME_FIELDS``, ``RECIPE_DIR``, ``recipe_names``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from .observe import Observer, check_observers
from .qtype import QType

__all__ = [
    "FakeQuantConfig", "ROLES", "GEMM_OVERRIDES", "ATTENTION_ROLES", "FIDELITIES", "DEFAULT_EXCLUDE",
    "RUNTIME_FIELDS", "RECIPE_DIR", "recipe_names",
]

ROLES = ("input", "weight", "grad_output")
# override field -> (role it overrides, GEMM it applies to); DESIGN.md's GEMM table.
GEMM_OVERRIDES = {
    "input_for_wgrad": ("input", "wgrad"),
    "weight_for_dgrad": ("weight", "dgrad"),
    "grad_output_for_dgrad": ("grad_output", "dgrad"),
    "grad_output_for_wgrad": ("grad_output", "wgrad"),
}
ATTENTION_ROLES = ("query", "key", "value", "attn_probs", "grad_attn_output")
FORMAT_FIELDS = ROLES + tuple(GEMM_OVERRIDES) + ATTENTION_ROLES
FIDELITIES = ("faithful", "reference")
# Output heads keep high precision by default (embeddings are not nn.Linear and are never patched).
DEFAULT_EXCLUDE = (r"(^|\.)(lm_head|head|output|output_layer|embed_out|classifier)$",)
FILTER_FIELDS = ("include", "exclude")
# Fields that are not data: left out of to_dict and refused by from_dict / YAML recipes.
RUNTIME_FIELDS = ("observers",)
# recipes/ at the top of a checkout; a built wheel carries the same files as fakequant/recipes/.
RECIPE_DIR = next(
    (d for d in (Path(__file__).resolve().parent.parent / "recipes", Path(__file__).resolve().parent / "recipes")
     if d.is_dir()),
    Path(__file__).resolve().parent.parent / "recipes",
)

# The (GEMM, operand role) pairs of a linear layer, in the order fprop, dgrad, wgrad.
GEMM_OPERANDS = (
    ("fprop", "input"), ("fprop", "weight"),
    ("dgrad", "grad_output"), ("dgrad", "weight"),
    ("wgrad", "grad_output"), ("wgrad", "input"),
)

ModuleFilter = Union[str, Callable[[str, Any], bool]]


def recipe_names() -> tuple[str, ...]:
    """Names accepted by ``FakeQuantConfig.from_recipe`` (the ``*.yaml`` files in ``recipes/``)."""
    return tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))


# ----------------------------------------------------------------------------------------- validation
def _validate_format(name: str, value: Any) -> QType | None:
    """A QType, a QType string or None; the axis is chosen per GEMM, so only the default one is allowed."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = QType(value)
        except ValueError as err:
            raise ValueError(f"FakeQuantConfig.{name}={value!r} is not a valid format: {err}") from None
    if not isinstance(value, QType):
        raise TypeError(
            f"FakeQuantConfig.{name} must be a QType, a format string or None, got {type(value).__name__} "
            f"({value!r})"
        )
    if value.q_dim != -1:
        raise ValueError(
            f"FakeQuantConfig.{name}={str(value)!r} sets dim={value.q_dim}, but the axis is chosen per GEMM "
            f"(its reduction dimension, DESIGN.md); give the format without dim"
        )
    return value


def _validate_fidelity(value: Any) -> str:
    if not isinstance(value, str) or value not in FIDELITIES:
        raise ValueError(f"FakeQuantConfig.fidelity={value!r} is not one of {', '.join(FIDELITIES)}")
    return value


def _validate_filters(name: str, value: Any) -> tuple[ModuleFilter, ...]:
    """A regex string, a callable ``(name, module) -> bool``, or a list/tuple of them."""
    if isinstance(value, str) or callable(value):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"FakeQuantConfig.{name} must be a regex string, a callable (name, module) -> bool, or a list of "
            f"them, got {type(value).__name__} ({value!r})"
        )
    for item in value:
        if isinstance(item, str):
            try:
                re.compile(item)
            except re.error as err:
                raise ValueError(f"FakeQuantConfig.{name} pattern {item!r} is not a valid regex: {err}") from None
        elif not callable(item):
            raise TypeError(
                f"FakeQuantConfig.{name} entries must be regex strings or callables (name, module) -> bool, "
                f"got {type(item).__name__} ({item!r})"
            )
    return tuple(value)


def _validate_observers(value: Any) -> tuple[Observer, ...]:
    return tuple(check_observers(value, "FakeQuantConfig.observers"))


def _validate_keys(keys: Any, where: str, serialised: bool = False) -> None:
    """Known field names only; ``serialised``: data fields only (observers cannot come from a dict/YAML)."""
    allowed = [f.name for f in dataclasses.fields(FakeQuantConfig) if not (serialised and f.name in RUNTIME_FIELDS)]
    runtime = [k for k in keys if serialised and k in RUNTIME_FIELDS]
    if runtime:
        raise ValueError(
            f"{where}: {', '.join(map(repr, runtime))} cannot be serialised (run-time objects); pass them as "
            f"FakeQuantConfig(..., observers=...) or config.replace(observers=...)"
        )
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class FakeQuantConfig:
    """Per-role formats for training-time fake quantization.

    Roles of ``Y = X Wᵀ`` (and of ``matmul(A, B)``, where A plays ``input`` and B plays ``weight``):
    ``input``, ``weight``, ``grad_output``; ``None`` leaves the role in high precision. A role's format
    applies to every GEMM it appears in (fprop, dgrad, wgrad) unless an override names that GEMM:
    ``input_for_wgrad``, ``weight_for_dgrad``, ``grad_output_for_dgrad``, ``grad_output_for_wgrad``
    (``None`` = same as the role; ``"fp32"`` = high precision for that GEMM only).

    Attention (``quant_attention`` and ``F.scaled_dot_product_attention`` under ``patch_functional``):
    ``query``, ``key``, ``value``, optionally ``attn_probs`` (softmax output P; setting it computes attention
    explicitly instead of through SDPA) and ``grad_attn_output`` (dO, the gradient of the attention output).

    ``fidelity``: ``"faithful"`` quantizes every operand of every GEMM from its high-precision value along
    that GEMM's reduction dimension; ``"reference"`` quantizes each tensor along its last dimension and reuses
    it, as the earlier library did.

    ``include`` / ``exclude``: which ``nn.Linear`` modules ``patch`` selects, as regexes searched in the
    fully-qualified name or callables ``(name, module) -> bool``. Empty ``include`` selects every Linear;
    ``exclude`` defaults to output-head names (``lm_head``, ``head``, ``output``, ...).

    ``observers``: callables ``(OperandEvent) -> None`` (``fakequant.observe``; a ``TensorSaver``, a
    ``NumericsMonitor``) that ``patch``, ``patch_functional`` and ``FakeQuantCallback`` attach in addition to
    their own ``observers`` argument (an observer given both ways is attached once). They ride along with the
    config so that whoever builds it decides what is watched, but they are not part of what it describes:
    two configs that differ only in observers are equal and hash alike (so plan caches are shared), and
    ``repr``, ``to_dict`` and recipes leave them out. ``replace`` keeps them unless told otherwise. The
    ``quant_*`` functions of ``fakequant.autograd`` do not use them (they have no layer name to report).
    """

    input: QType | str | None = None
    weight: QType | str | None = None
    grad_output: QType | str | None = None
    input_for_wgrad: QType | str | None = None
    weight_for_dgrad: QType | str | None = None
    grad_output_for_dgrad: QType | str | None = None
    grad_output_for_wgrad: QType | str | None = None
    query: QType | str | None = None
    key: QType | str | None = None
    value: QType | str | None = None
    attn_probs: QType | str | None = None
    grad_attn_output: QType | str | None = None
    fidelity: str = "faithful"
    include: tuple[ModuleFilter, ...] = ()
    exclude: tuple[ModuleFilter, ...] = field(default=DEFAULT_EXCLUDE)
    observers: tuple[Observer, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in FORMAT_FIELDS:
            object.__setattr__(self, name, _validate_format(name, getattr(self, name)))
        object.__setattr__(self, "fidelity", _validate_fidelity(self.fidelity))
        for name in FILTER_FIELDS:
            object.__setattr__(self, name, _validate_filters(name, getattr(self, name)))
        object.__setattr__(self, "observers", _validate_observers(self.observers))

    # ------------------------------------------------------------------------------------------ queries
    def format_for(self, gemm: str, role: str) -> QType | None:
        """The format of operand ``role`` in ``gemm`` (``fprop``/``dgrad``/``wgrad``), overrides applied."""
        if (gemm, role) not in GEMM_OPERANDS:
            allowed = ", ".join(f"{g}/{r}" for g, r in GEMM_OPERANDS)
            raise ValueError(f"no operand {role!r} in GEMM {gemm!r}; the operands are {allowed}")
        override = getattr(self, f"{role}_for_{gemm}", None)
        return override if override is not None else getattr(self, role)

    @property
    def quantizes_linear(self) -> bool:
        """True when some operand of some linear GEMM is quantized."""
        return any(self.format_for(g, r) is not None for g, r in GEMM_OPERANDS)

    @property
    def quantizes_attention(self) -> bool:
        return any(getattr(self, r) is not None for r in ATTENTION_ROLES)

    def role_formats(self, attention: bool = False) -> dict[str, str | None]:
        """Role -> canonical format string (``None`` = high precision); overrides only where set."""
        out: dict[str, str | None] = {r: _fmt(getattr(self, r)) for r in ROLES}
        out.update({o: str(getattr(self, o)) for o in GEMM_OVERRIDES if getattr(self, o) is not None})
        if attention:
            out.update({r: _fmt(getattr(self, r)) for r in ATTENTION_ROLES})
        return out

    def selects(self, name: str, module: Any) -> bool:
        """Whether ``patch`` should patch the module called ``name`` (include, then exclude)."""
        if self.include and not any(_matches(f, name, module) for f in self.include):
            return False
        return not any(_matches(f, name, module) for f in self.exclude)

    def replace(self, **changes: Any) -> FakeQuantConfig:
        """A copy with some fields changed (validated again); ``observers`` too (kept when not given)."""
        _validate_keys(changes, "FakeQuantConfig.replace")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """Plain data: formats as canonical strings (or None), filters as lists. Callables stay callables.
        ``observers`` are left out (run-time objects, not part of the config's identity)."""
        out: dict[str, Any] = {name: _fmt(getattr(self, name)) for name in FORMAT_FIELDS}
        out["fidelity"] = self.fidelity
        for name in FILTER_FIELDS:
            out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FakeQuantConfig:
        if not isinstance(data, dict):
            raise TypeError(f"FakeQuantConfig.from_dict needs a dict, got {type(data).__name__}")
        _validate_keys(data, "FakeQuantConfig.from_dict", serialised=True)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> FakeQuantConfig:
        """Load a YAML mapping of the ``to_dict`` keys (a recipe file)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"FakeQuantConfig.from_yaml: no such file {str(path)!r}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"FakeQuantConfig.from_yaml: {str(path)!r} must hold a mapping, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}: {err}") from None

    @classmethod
    def from_recipe(cls, name_or_path: str | Path) -> FakeQuantConfig:
        """A named recipe from ``recipes/`` (``"mxfp8"``, ...) or the path of a YAML file."""
        if not isinstance(name_or_path, (str, Path)):
            raise TypeError(f"recipe must be a name or a path, got {type(name_or_path).__name__}")
        names = recipe_names()
        if isinstance(name_or_path, str) and name_or_path in names:
            return cls.from_yaml(RECIPE_DIR / f"{name_or_path}.yaml")
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return cls.from_yaml(path)
        raise ValueError(f"unknown recipe {str(name_or_path)!r}: give one of {', '.join(names)} or a .yaml path")


def _fmt(q: QType | None) -> str | None:
    return None if q is None else str(q)


def _matches(flt: ModuleFilter, name: str, module: Any) -> bool:
    if isinstance(flt, str):
        return re.search(flt, name) is not None
    return bool(flt(name, module))
