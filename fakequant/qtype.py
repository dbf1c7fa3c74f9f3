"""The ``QType`` format grammar (``shared/spec/qtype.md``).

A ``QType`` is a parsed, validated, hashable description of one quantization format: its family,
element format, block sizes, scale and rounding rules, and the axis to quantize along. Parsing is
eager, so a bad string fails where the user wrote it, not deep inside a training step.

Public: ``QType``, ``FAMILIES``, ``ROUND_MODES``, ``SCALE_MODES``, ``GRAMMAR``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["QType", "FAMILIES", "ROUND_MODES", "SCALE_MODES", "GRAMMAR"]

FAMILIES = (
    "mx", "mx_hier", "hifx", "tmx", "hif8", "hif4", "nvf4", "nvfp4", "nf4", "nf4_double", "int8sym", "cast",
)
ROUND_MODES = ("nearest", "even", "floor")
SCALE_MODES = ("floor", "round", "ceil", "rceil", "mse")
MODIFIER_KEYS = ("round", "scale", "saturate", "dim")

# alias -> (exp_bits, man_bits); every alias is k8 b32 with the carry suffix (spec/qtype.md §1).
ALIASES = {
    "mxfp4": (2, 1),
    "mxfp6e3m2": (3, 2),
    "mxfp6e2m3": (2, 3),
    "mxfp8e4m3": (4, 3),
    "mxfp8e5m2": (5, 2),
}
_ALIAS_OF_FIELDS = {fields: name for name, fields in ALIASES.items()}

# Fixed rules of the non-block families (spec/qtype.md §3): these are what round_mode reports.
_FIXED_ROUND = {
    "hif8": "nearest", "hif4": "nearest", "hifx": "nearest", "tmx": "nearest",
    "nvf4": "even", "nvfp4": "even", "int8sym": "even", "nf4": "nearest", "nf4_double": "nearest", "cast": "even",
}
_FIXED_RULE_TEXT = {
    "nearest": "ties away from zero", "even": "ties to even",
}

GRAMMAR = (
    "an alias (mxfp4, mxfp6e3m2, mxfp6e2m3, mxfp8e4m3, mxfp8e5m2); a special name (fp16, bf16, fp32, int8sym, "
    "hif8, hif4, nvf4, nvfp4, nf4, hifx<N>_v12 with N in 2..5, tmx<N> with N in 3..25, nf4B<BO>b<B>); "
    "a block float e<E>m<M>k<K>b<B>[c]; or a hierarchical block float e<E>m<M>K<KO>k<K>B<BO>b<B>[c][off<N>]"
)

_NUM = "([0-9]+)"
_BLOCK_RE = re.compile(f"e{_NUM}m{_NUM}k{_NUM}b{_NUM}(c?)")
_HIER_RE = re.compile(f"e{_NUM}m{_NUM}K{_NUM}k{_NUM}B{_NUM}b{_NUM}(c?)(?:off{_NUM})?")
_HIFX_RE = re.compile(f"hifx{_NUM}_v12")
_TMX_RE = re.compile(f"tmx{_NUM}")
_NF4D_RE = re.compile(f"nf4b{_NUM}b{_NUM}")
_DIM_RE = re.compile("-?[0-9]+")
_SIMPLE_SPECIALS = ("fp16", "bf16", "fp32", "int8sym", "hif8", "hif4", "nvf4", "nvfp4", "nf4")

# Block lengths of the fixed-layout families (spec/qtype.md §1, special names).
_FIXED_BLOCK = {"hif8": 1, "hif4": 64, "hifx": 64, "tmx": 16, "nvf4": 16, "nvfp4": 16, "nf4": 64, "cast": 1}

# Fields that define a QType's value besides the axis (equality and hash).
_VALUE_FIELDS = (
    "family", "name", "exp_bits", "man_bits", "k_bits", "k_outer_bits", "blk_size", "blk_outer_size", "offset",
    "round_mode", "scale_mode", "saturating",
)


def _format_error(desc: str, what: str) -> ValueError:
    return ValueError(f"invalid quantization format {desc!r}: {what}; expected one of: {GRAMMAR}")


def _check_range(desc: str, label: str, value: int, lo: int, hi: int | None) -> None:
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise _format_error(desc, f"{label}={value} must be {allowed}")


class QType:
    """One quantization format plus its axis. Build it from a string: ``QType("mxfp4").dim(0)``.

    Every modifier returns a new QType except ``dim_`` (kept for the earlier API), which sets the axis in
    place and does not move the QType inside a set or dict, since the hash ignores the axis.
    """

    # ``_key``: the value tuple, computed once (QTypes key the kernel and dispatch caches on every call)
    __slots__ = _VALUE_FIELDS + ("q_dim", "_key")

    def __init__(self, desc: str | QType) -> None:
        if isinstance(desc, QType):
            for field in self.__slots__:
                object.__setattr__(self, field, getattr(desc, field))
            return
        if not isinstance(desc, str):
            raise TypeError(f"quantization format must be a str, got {type(desc).__name__}")
        fmt, *mods = desc.split(":")
        self._parse_format(desc, fmt)
        for mod in mods:
            self._apply_modifier_string(desc, mod)

    # ----------------------------------------------------------------------------------------------- parsing
    def _set(self, **fields: Any) -> None:
        for key, value in fields.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_key", None)  # recomputed on demand from the new values

    def _parse_format(self, desc: str, fmt: str) -> None:
        self._set(
            family=None, name=None, exp_bits=None, man_bits=None, k_bits=None, k_outer_bits=None, blk_size=None,
            blk_outer_size=None, offset=None, round_mode="nearest", scale_mode=None, saturating=True, q_dim=-1,
        )
        if not fmt.isascii() or not fmt:
            raise _format_error(desc, "unrecognised")
        low = fmt.lower()
        if low in ALIASES:
            e, m = ALIASES[low]
            self._set_block(desc, "mx", e, m, 8, 32, "round")
            return
        if low in _SIMPLE_SPECIALS:
            family = {"fp16": "cast", "bf16": "cast", "fp32": "cast"}.get(low, low)
            self._set(family=family, name=low)
            self._set_fixed_rules()
            return
        if match := _HIFX_RE.fullmatch(low):
            n = int(match[1])
            if not 2 <= n <= 5:
                raise _format_error(desc, f"hifx<N>_v12 needs N in 2..5, got {n}")
            self._set(family="hifx", name=f"hifx{n}_v12", man_bits=n - 1)
            self._set_fixed_rules()
            return
        if match := _TMX_RE.fullmatch(low):
            n = int(match[1])
            if not 3 <= n <= 25:
                raise _format_error(desc, f"tmx<N> needs N in 3..25, got {n}")
            self._set(family="tmx", name=f"tmx{n}", man_bits=n - 2)
            self._set_fixed_rules()
            return
        if match := _NF4D_RE.fullmatch(low):
            outer, inner = int(match[1]), int(match[2])
            if outer < 1 or inner < 1:
                raise _format_error(desc, "block sizes must be >= 1")
            self._set(family="nf4_double", name="nf4_double", blk_outer_size=outer, blk_size=inner)
            self._set_fixed_rules()
            return
        if match := _BLOCK_RE.fullmatch(fmt):
            e, m, k, b = (int(g) for g in match.groups()[:4])
            self._set_block(desc, "mx", e, m, k, b, "round" if match[5] else "floor")
            return
        if match := _HIER_RE.fullmatch(fmt):
            e, m, ko, k, bo, b = (int(g) for g in match.groups()[:6])
            _check_range(desc, "outer scale bits K", ko, 0, 8)
            _check_range(desc, "outer block size B", bo, 1, None)
            off = None if match[8] is None else int(match[8])
            if off is not None:
                _check_range(desc, "exponent offset off", off, 0, 1023)
            self._set_block(desc, "mx_hier", e, m, k, b, "round" if match[7] else "floor")
            self._set(k_outer_bits=ko, blk_outer_size=bo, offset=off)
            return
        if fmt.endswith("C") and (_BLOCK_RE.fullmatch(fmt[:-1] + "c") or _HIER_RE.fullmatch(fmt[:-1] + "c")):
            raise _format_error(desc, "unrecognised (the carry suffix is lower-case c)")
        if "C" in fmt and _HIER_RE.fullmatch(fmt.replace("C", "c")):
            raise _format_error(desc, "unrecognised (the carry suffix is lower-case c)")
        raise _format_error(desc, "unrecognised")

    def _set_block(self, desc: str, family: str, e: int, m: int, k: int, b: int, scale_mode: str) -> None:
        if e == 1 or e > 8:
            raise _format_error(desc, f"exponent bits E={e} must be 0 or 2..8 (E1Mx is E0M(x+1))")
        _check_range(desc, "mantissa bits m", m, 1, 23)
        _check_range(desc, "scale bits k", k, 1, 8)
        if b < 1:
            raise _format_error(desc, "block sizes must be >= 1")
        self._set(family=family, exp_bits=e, man_bits=m, k_bits=k, blk_size=b, scale_mode=scale_mode)

    def _set_fixed_rules(self) -> None:
        self._set(round_mode=_FIXED_ROUND[self.family])

    def _apply_modifier_string(self, desc: str, mod: str) -> None:
        key, sep, value = mod.partition("=")
        key_low = key.lower()
        if not sep or key_low not in MODIFIER_KEYS or not mod.isascii():
            raise ValueError(
                f"invalid quantization format {desc!r}: unknown modifier {mod!r}; "
                f"allowed keys: {', '.join(MODIFIER_KEYS)} (written key=value after ':')"
            )
        value_low = value.lower()
        if key_low == "dim":
            if not _DIM_RE.fullmatch(value):
                raise ValueError(f"invalid quantization format {desc!r}: dim={value!r} must be an integer")
            self._set(q_dim=int(value))
        elif key_low == "saturate":
            if value_low not in ("true", "false"):
                raise ValueError(f"invalid quantization format {desc!r}: saturate={value!r} must be true or false")
            self._check_saturate(value_low == "true")
            self._set(saturating=value_low == "true")
        else:
            allowed = ROUND_MODES if key_low == "round" else SCALE_MODES
            try:
                self._check_mode(key_low, value_low, allowed)
            except ValueError as err:
                raise ValueError(f"invalid quantization format {desc!r}: {err}") from None
            self._set(**{f"{key_low}_mode": value_low})

    # ------------------------------------------------------------------------------------------- validation
    @property
    def is_block_float(self) -> bool:
        """True for the ``e…k…b…`` / ``e…K…k…B…b…`` forms (aliases included): the only ones with modes."""
        return self.family in ("mx", "mx_hier")

    def _check_mode(self, kind: str, value: Any, allowed: tuple[str, ...]) -> None:
        if not self.is_block_float:
            rule = _FIXED_RULE_TEXT.get(self.round_mode, self.round_mode)
            raise ValueError(
                f".{kind}({value!r}) is not allowed for {self.desc!r}: family {self.family!r} has a fixed rule "
                f"(rounding {rule}); .round() and .scale() apply to block floats e<E>m<M>k<K>b<B> only"
            )
        if not isinstance(value, str) or value.lower() not in allowed:
            raise ValueError(f"{kind} mode {value!r} is not one of {', '.join(allowed)}")
        if kind == "scale" and value.lower() == "mse" and self.family != "mx":
            raise ValueError(
                f"scale mode 'mse' (per-block MSE-optimal E8M0 search) applies to e<E>m<M>k<K>b<B> block floats, "
                f"not the hierarchical form {self.desc!r}"
            )

    def _check_saturate(self, flag: Any) -> None:
        if not isinstance(flag, bool):
            raise TypeError(f"saturate flag must be a bool, got {type(flag).__name__}")
        if not flag and self.family != "hif8":
            raise ValueError(
                f".saturate(False) is only allowed for hif8, not {self.desc!r} (family {self.family!r})"
            )

    # -------------------------------------------------------------------------------------------- modifiers
    def _with(self, **fields: Any) -> QType:
        new = QType(self)
        new._set(**fields)
        return new

    def dim(self, d: int) -> QType:
        """A new QType quantized along axis ``d`` (negative counts from the end)."""
        return self._with(q_dim=_check_dim(d))

    def dim_(self, d: int) -> QType:
        """Set the axis in place and return self (the earlier API); the hash does not change."""
        self._set(q_dim=_check_dim(d))
        return self

    def copy(self) -> QType:
        return QType(self)

    def round(self, mode: str) -> QType:
        """Element rounding: ``nearest`` (ties away), ``even`` (ties to even), ``floor`` (toward zero)."""
        self._check_mode("round", mode, ROUND_MODES)
        return self._with(round_mode=mode.lower())

    def scale(self, mode: str) -> QType:
        """Shared-exponent rule: ``floor``, ``round`` (the ``c`` suffix), ``ceil``, ``rceil``, or ``mse`` (per
        block, the E8M0 scale with the smallest squared error; ``fakequant.scale_search``)."""
        self._check_mode("scale", mode, SCALE_MODES)
        return self._with(scale_mode=mode.lower())

    def saturate(self, flag: bool) -> QType:
        """``False`` makes hif8 overflow give ±inf; ``True`` is the default everywhere."""
        self._check_saturate(flag)
        return self._with(saturating=flag)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"QType is immutable; use .dim()/.round()/.scale()/.saturate() (tried to set {key})")

    # ------------------------------------------------------------------------------------- derived numbers
    @property
    def block_len(self) -> int | None:
        """Padding unit along the axis; ``None`` for int8sym (one scale for the whole axis)."""
        if self.family == "int8sym":
            return None
        if self.family in ("mx_hier", "nf4_double"):
            return self.blk_size * self.blk_outer_size
        if self.family == "mx":
            return self.blk_size
        return _FIXED_BLOCK[self.family]

    @property
    def exp_max(self) -> int | None:
        """Element emax (formats.md §1): 2^(E-1), one less for e5m2; M-1 for integer elements."""
        if self.exp_bits is None:
            return None
        if self.exp_bits == 0:
            return 0
        if (self.exp_bits, self.man_bits) == (5, 2):
            return 2 ** (self.exp_bits - 1) - 1
        return 2 ** (self.exp_bits - 1)

    @property
    def exp_min(self) -> int | None:
        if self.exp_bits is None:
            return None
        return 0 if self.exp_bits == 0 else 2 - 2 ** (self.exp_bits - 1)

    @property
    def fp_val_max(self) -> float | None:
        """Largest element magnitude (max_norm); 2^M - 1 for integer elements."""
        if self.exp_bits is None:
            return None
        if self.exp_bits == 0:
            return float(2**self.man_bits - 1)
        if (self.exp_bits, self.man_bits) == (4, 3):
            return 448.0
        return 2.0**self.exp_max * (2 - 2.0**-self.man_bits)

    @property
    def k_max(self) -> int | None:
        if self.k_bits is None:
            return None
        return 2 ** (self.k_bits + (self.k_outer_bits or 0) - 1) - 1

    @property
    def exp_offset(self) -> int | None:
        """Hierarchical forms: offset of the group exponent window (formats.md §3)."""
        if self.family != "mx_hier":
            return None
        base = self.man_bits - 1 if self.exp_bits == 0 else self.exp_max
        if self.offset is None:
            return base
        return self.offset - self.k_max - 1 + base

    # --------------------------------------------------------------------------------------- text and value
    @property
    def desc(self) -> str:
        return self._format_part() + "".join(f":{k}={v}" for k, v in self._modifier_parts())

    def _format_part(self) -> str:
        if not self.is_block_float:
            if self.family == "nf4_double":
                return f"nf4B{self.blk_outer_size}b{self.blk_size}"
            return self.name
        carry = "c" if self.scale_mode == "round" else ""
        fields = (self.exp_bits, self.man_bits)
        if self.family == "mx":
            if carry and self.k_bits == 8 and self.blk_size == 32 and fields in _ALIAS_OF_FIELDS:
                return _ALIAS_OF_FIELDS[fields]
            return f"e{self.exp_bits}m{self.man_bits}k{self.k_bits}b{self.blk_size}{carry}"
        off = "" if self.offset is None else f"off{self.offset}"
        return (
            f"e{self.exp_bits}m{self.man_bits}K{self.k_outer_bits}k{self.k_bits}"
            f"B{self.blk_outer_size}b{self.blk_size}{carry}{off}"
        )

    def _modifier_parts(self) -> list[tuple[str, str]]:
        parts = []
        if self.is_block_float and self.round_mode != "nearest":
            parts.append(("round", self.round_mode))
        if self.is_block_float and self.scale_mode not in ("floor", "round"):
            parts.append(("scale", self.scale_mode))
        if not self.saturating:
            parts.append(("saturate", "false"))
        if self.q_dim != -1:
            parts.append(("dim", str(self.q_dim)))
        return parts

    def __str__(self) -> str:
        return self.desc

    def __repr__(self) -> str:
        return f"QType({self.desc!r})"

    def _value(self) -> tuple:
        key = self._key
        if key is None:
            key = tuple(getattr(self, f) for f in _VALUE_FIELDS)
            object.__setattr__(self, "_key", key)
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QType):
            return NotImplemented
        return self is other or (self.q_dim == other.q_dim and self._value() == other._value())

    def __hash__(self) -> int:
        return hash(self._value())

    def __reduce__(self):
        return (QType, (self.desc,))


def _check_dim(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"quantization axis must be an int, got {type(d).__name__} ({d!r})")
    return d
