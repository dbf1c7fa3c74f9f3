"""The numerics monitor: how well each GEMM operand survives its format, and where the first NaN/inf came from.

``NumericsMonitor`` is an observer (``fakequant.observe``): give it to ``fakequant.patch(..., observers=[mon])``
(or ``attach_observer``), tell it the step with ``mon.step(n)`` before each training step, and read
``mon.collect()`` after it. ``fakequant.lightning.FakeQuantCallback`` does all of this and logs the result.
Usable without Lightning::

    mon = NumericsMonitor(every_n_steps=10)
    fakequant.patch(model, config, observers=[mon])
    for step, batch in enumerate(loader):
        mon.step(step)
        loss = model(batch); loss.backward(); opt.step()
        metrics = mon.collect()          # {} except every 10th step
        if mon.first_nonfinite: raise RuntimeError(mon.first_nonfinite.message)

Every ``every_n_steps`` steps, per patched layer, GEMM and operand role (averaged over the calls in the step,
e.g. micro-batches), it records:

* ``sqnr_db``: 10·log10(Σx² / Σ(x − q)²) of the quantized operand q against its high-precision value x
  (``fakequant.metrics.sqnr_db``; inf when exact);
* ``saturated_frac``: the fraction of elements clipped at the top of their block's range: |x| above the
  largest quantized magnitude of its block, t, by more than round-to-nearest could explain (more than half
  a grid step at t: 2^(floor(log2 t) − m − 1), m the element's mantissa bits; so for MXFP4, t = 6·2^s and
  |x| > 7·2^s). The block is ``qtype.block_len`` elements along the quantization axis, the whole axis for
  per-tensor scales, the element itself for element formats such as hif8;
* ``flushed_frac``: the fraction of non-zero elements quantized to zero (as ``fakequant.metrics.error_stats``);
* the distribution of block scale exponents ``floor(log2(block amax)) − emax`` (emax of the element format:
  the OCP floor-rule shared exponent for MX, the E2M1 emax 2 for NVFP4/NVF4 and HiF4, 0 otherwise), kept as
  a histogram in ``history`` and reported as ``scale_exp_min``, ``scale_exp_mean``, ``scale_exp_max``.
  Element formats without a block (block length 1: hif8, casts) have no block scale and report none.

Metric names are stable: ``fakequant/<layer>/<gemm>.<role>/<stat>`` (``<layer>`` is the module's
fully-qualified name, ``functional`` for ``patch_functional`` calls).

Non-finite values are looked for at every step (not only every N), in both the high-precision operand and
its quantized copy; the first one is kept in ``first_nonfinite`` (layer, GEMM, role, step, which tensor, how
many NaN/inf) and ``on_nonfinite`` is called once with it.

Public: ``NumericsMonitor``, ``NonFinite``, ``OperandStats``, ``STATS``, ``metric_name``, ``operand_stats``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .metrics import sqnr_db
from .observe import OperandEvent
from .qtype import QType

__all__ = ["NumericsMonitor", "NonFinite", "OperandStats", "STATS", "metric_name", "operand_stats"]

STATS = ("sqnr_db", "saturated_frac", "flushed_frac", "scale_exp_min", "scale_exp_mean", "scale_exp_max")

# Element mantissa bits and emax of the fixed-layout families (formats.md): used for the saturation
# tolerance and the scale exponent. Block floats read theirs from the QType.
_FIXED_ELEMENT = {
    "nvfp4": (1, 2), "nvf4": (1, 2), "hif4": (1, 2),  # E2M1-like 4-bit elements
    "hif8": (0, 0),  # tapered: the top binades keep no mantissa bit, so only clear clipping counts
    "tmx": (1, 0), "nf4": (1, 0), "nf4_double": (1, 0), "int8sym": (7, 0),
}
_CAST_MANTISSA = {"fp16": 10, "bf16": 7, "fp32": 23}


def metric_name(layer: str, gemm: str, role: str, stat: str) -> str:
    """``fakequant/<layer>/<gemm>.<role>/<stat>``; a functional call (layer ``""``) is ``functional``."""
    return f"fakequant/{layer or 'functional'}/{gemm}.{role}/{stat}"


@dataclass(frozen=True)
class NonFinite:
    """The first NaN/inf seen in a patched GEMM: where, when, and whether it came in with the operand
    (``tensor="high-precision"``) or was made by the quantizer (``tensor="quantized"``)."""

    layer: str
    gemm: str
    role: str
    step: int
    tensor: str
    nan: int
    inf: int
    numel: int
    qtype: str

    @property
    def message(self) -> str:
        return (
            f"fakequant: first non-finite value at step {self.step} in layer {self.layer or '<functional>'!r}, "
            f"GEMM {self.gemm}, role {self.role}: the {self.tensor} operand has {self.nan} NaN and {self.inf} "
            f"inf of {self.numel} elements (format {self.qtype})"
        )


@dataclass
class OperandStats:
    """Statistics of one (layer, GEMM, role) at one recorded step, summed over the calls of that step."""

    calls: int = 0
    sqnr_db_sum: float = 0.0
    saturated: int = 0
    flushed: int = 0
    nonzero: int = 0
    numel: int = 0
    scale_exp_hist: Counter = field(default_factory=Counter)

    def metrics(self) -> dict[str, float]:
        out = {
            "sqnr_db": self.sqnr_db_sum / max(self.calls, 1),
            "saturated_frac": self.saturated / max(self.numel, 1),
            "flushed_frac": self.flushed / max(self.nonzero, 1),
        }
        if self.scale_exp_hist:
            n = sum(self.scale_exp_hist.values())
            out["scale_exp_min"] = float(min(self.scale_exp_hist))
            out["scale_exp_mean"] = sum(e * c for e, c in self.scale_exp_hist.items()) / n
            out["scale_exp_max"] = float(max(self.scale_exp_hist))
        return out


def _mantissa_and_emax(q: QType) -> tuple[int, int]:
    if q.is_block_float:
        return q.man_bits, q.exp_max
    if q.family == "cast":
        return _CAST_MANTISSA.get(q.name, 7), 0
    return _FIXED_ELEMENT.get(q.family, (0, 0))


def _blocks(x: Tensor, q: QType) -> Tensor:
    """|x| as [..., n_blocks, block] along the quantization axis (zero padded); the whole axis for per-tensor
    scales (block_len None)."""
    a = x.detach().float().abs()
    if a.dim() == 0:
        a = a.reshape(1)
    a = a.movedim(q.q_dim, -1)  # (..., L)
    length = a.shape[-1]
    bl = length if q.block_len is None else q.block_len
    pad = (-length) % bl
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(*a.shape[:-1], -1, bl)  # (..., n_blocks, bl)


def operand_stats(hp: Tensor, quantized: Tensor, qtype: QType) -> OperandStats:
    """The statistics of one quantized operand (one call); see the module docstring for the definitions."""
    man, emax = _mantissa_and_emax(qtype)
    x = hp.detach().float()
    qv = quantized.detach().float()
    st = OperandStats(calls=1, sqnr_db_sum=sqnr_db(x, qv), numel=x.numel())
    nonzero = x != 0
    st.nonzero = int(nonzero.sum())
    st.flushed = int(((qv == 0) & nonzero).sum())
    ax, aq = _blocks(x, qtype), _blocks(qv, qtype)  # (..., n_blocks, bl)
    top = aq.amax(dim=-1, keepdim=True)  # the largest quantized magnitude of each block, t
    half_step = torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent - man - 2)  # 2^(floor(log2 t)-m-1)
    st.saturated = int(((ax > top + half_step) & (top > 0)).sum())
    if ax.shape[-1] > 1:
        amax = ax.amax(dim=-1)
        amax = amax[(amax > 0) & torch.isfinite(amax)]
        exps = torch.frexp(amax).exponent - 1 - emax  # floor(log2 amax) - emax, exact
        if exps.numel():
            values, counts = torch.unique(exps, return_counts=True)
            st.scale_exp_hist.update(dict(zip(values.tolist(), counts.tolist())))
    return st


class NumericsMonitor:
    """Observer recording per layer/GEMM/role quantization statistics every ``every_n_steps`` steps and the
    first non-finite operand at any step. See the module docstring."""

    def __init__(self, every_n_steps: int | None = 50, check_nonfinite: bool = True,
                 on_nonfinite: Callable[[NonFinite], None] | None = None) -> None:
        if every_n_steps is not None and (
                isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"NumericsMonitor: every_n_steps must be a positive int or None (no statistics, only the "
                f"non-finite check), got {every_n_steps!r}"
            )
        if not isinstance(check_nonfinite, bool):
            raise TypeError(f"NumericsMonitor: check_nonfinite must be a bool, got {check_nonfinite!r}")
        if on_nonfinite is not None and not callable(on_nonfinite):
            raise TypeError("NumericsMonitor: on_nonfinite must be a callable (NonFinite) -> None or None")
        self.every_n_steps = every_n_steps
        self.check_nonfinite = check_nonfinite
        self.on_nonfinite = on_nonfinite
        self.current_step = 0
        self.active = True  # False: events are ignored (the Lightning callback pauses it during validation)
        self.first_nonfinite: NonFinite | None = None
        # step -> {(layer, gemm, role): OperandStats}, for every recorded step
        self.history: dict[int, dict[tuple[str, str, str], OperandStats]] = {}
        self._pending: set[tuple[int, tuple[str, str, str]]] = set()  # recorded since the last collect()

    def step(self, n: int) -> None:
        """The training step the next operands belong to (an optimizer step: micro-batches share it)."""
        self.current_step = int(n)

    @property
    def recording(self) -> bool:
        return self.every_n_steps is not None and self.current_step % self.every_n_steps == 0

    def __call__(self, event: OperandEvent) -> None:
        if not self.active:
            return
        if self.check_nonfinite and self.first_nonfinite is None:
            self._check_finite(event)
        if not self.recording:
            return
        st = operand_stats(event.hp, event.quantized, event.qtype)
        key = (event.layer, event.gemm, event.role)
        self._pending.add((self.current_step, key))
        at_step = self.history.setdefault(self.current_step, {})
        acc = at_step.get(key)
        if acc is None:
            at_step[key] = st
            return
        acc.calls += st.calls
        acc.sqnr_db_sum += st.sqnr_db_sum
        acc.saturated += st.saturated
        acc.flushed += st.flushed
        acc.nonzero += st.nonzero
        acc.numel += st.numel
        acc.scale_exp_hist.update(st.scale_exp_hist)

    def _check_finite(self, event: OperandEvent) -> None:
        for tensor, t in (("high-precision", event.hp), ("quantized", event.quantized)):
            if bool(torch.isfinite(t).all()):
                continue
            d = t.detach()
            self.first_nonfinite = NonFinite(
                event.layer, event.gemm, event.role, self.current_step, tensor, int(torch.isnan(d).sum()),
                int(torch.isinf(d).sum()), d.numel(), str(event.qtype),
            )
            if self.on_nonfinite is not None:
                self.on_nonfinite(self.first_nonfinite)
            return

    def collect(self) -> dict[str, float]:
        """The metrics of the operands recorded since the last call, by stable name (``{}`` on steps that
        record nothing): each one's statistics over its whole step so far (micro-batches add up); they stay
        in ``history``. Infinite SQNR (an exact operand) is reported as inf."""
        pending, self._pending = sorted(self._pending), set()
        out = {}
        for step, (layer, gemm, role) in pending:
            for stat, value in self.history[step][(layer, gemm, role)].metrics().items():
                out[metric_name(layer, gemm, role, stat)] = value
        return out

    def worst(self, k: int = 3, step: int | None = None) -> list[tuple[str, str, str, float]]:
        """The ``k`` operands with the lowest SQNR at ``step`` (default: the last recorded step), as
        (layer, gemm, role, sqnr_db): which layer hurts."""
        if not self.history:
            return []
        step = max(self.history) if step is None else step
        rows = [(l, g, r, st.metrics()["sqnr_db"]) for (l, g, r), st in self.history.get(step, {}).items()]
        rows = [row for row in rows if math.isfinite(row[3])] or rows
        return sorted(rows, key=lambda row: row[3])[:k]
