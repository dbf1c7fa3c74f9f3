"""Observers: see every GEMM operand as it is fake-quantized (forward and backward).

An observer is any callable ``(OperandEvent) -> None``. It is threaded explicitly, never through global state:

* ``fakequant.patch(model, config, observers=(obs,))`` stores them on each patched module with its
  fully-qualified name; ``attach_observer(model, obs)`` / ``detach_observer(model, obs)`` (in
  ``fakequant.patch``) add and remove them on an already patched model;
* ``fakequant.patch_functional(config, observers=(obs,))`` for functional calls (layer ``""``).

The autograd functions receive an ``ObserverSite`` (or ``None``) and, after quantizing an operand, call
each observer with one ``OperandEvent``. Without observers the site is ``None`` and nothing else happens
(no extra work, and torch.compile traces the same graph as before).

An event holds the live tensors of the step: observers must not modify them, and must copy what they keep
(``event.hp.detach().clone()``). Observers run inside autograd (forward under no-grad, backward inside
the engine), so they should only read.

Public: ``OperandEvent``, ``Observer``, ``ObserverSite``, ``GEMMS``, ``OPERAND_ROLES``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .qtype import QType

__all__ = ["OperandEvent", "Observer", "ObserverSite", "GEMMS", "OPERAND_ROLES"]

GEMMS = ("fprop", "dgrad", "wgrad")
OPERAND_ROLES = (
    "input", "weight", "grad_output", "query", "key", "value", "attn_probs", "grad_attn_output",
)
# Role names of the A, B and dC operands of ``C = A·B`` (a linear layer, matmul, bmm, baddbmm).
LINEAR_ROLES = ("input", "weight", "grad_output")


@dataclass(frozen=True)
class OperandEvent:
    """One operand of one GEMM, just fake-quantized.

    ``layer``: the patched module's fully-qualified name (``""`` for a functional call); ``gemm``: one of
    ``fprop``, ``dgrad``, ``wgrad``; ``role``: one of ``OPERAND_ROLES``; ``qtype``: the format, with the
    axis it was quantized along; ``hp``: the high-precision operand; ``quantized``: its fake-quantized copy
    (the same object as ``hp`` when the format is an exact cast).
    """

    layer: str
    gemm: str
    role: str
    qtype: QType
    hp: Tensor
    quantized: Tensor


Observer = Callable[[OperandEvent], None]


@functools.lru_cache(maxsize=1024)
def _parse(desc: str) -> QType:
    return QType(desc)


class ObserverSite:
    """Where operands are observed: a layer name, its observers and the role names of the operands A, B
    and dC. ``observers`` is a list owned by the patched module (or the ``patch_functional`` block), so
    attaching or detaching on a patched model takes effect at the next GEMM."""

    __slots__ = ("layer", "observers", "roles")

    def __init__(self, layer: str, observers: list[Observer], roles: tuple[str | None, ...] = LINEAR_ROLES):
        self.layer = layer
        self.observers = observers
        self.roles = roles

    def with_roles(self, *roles: str | None) -> ObserverSite:
        """The same layer and observers for a GEMM whose operands play other roles (attention)."""
        return ObserverSite(self.layer, self.observers, tuple(roles))

    # Observers run eagerly on real tensors: under torch.compile this is a graph break (only with observers).
    @torch.compiler.disable
    def notify(self, gemm: str, role: str | None, qtype: str, hp: Tensor, quantized: Tensor) -> None:
        if role is None:
            return
        event = OperandEvent(self.layer, gemm, role, _parse(qtype), hp, quantized)
        for observer in tuple(self.observers):
            observer(event)

    def __repr__(self) -> str:
        return f"ObserverSite(layer={self.layer!r}, observers={len(self.observers)}, roles={self.roles})"


def check_observers(observers: object, where: str) -> list[Observer]:
    """A list of callables from a sequence of them; ``TypeError`` naming the bad entry otherwise."""
    if callable(observers):
        observers = (observers,)
    if isinstance(observers, (str, bytes)) or not isinstance(observers, (list, tuple)):
        raise TypeError(f"{where}: observers must be a sequence of callables (OperandEvent) -> None, "
                        f"got {type(observers).__name__}")
    for obs in observers:
        if not callable(obs):
            raise TypeError(f"{where}: observer {obs!r} is not callable; an observer is (OperandEvent) -> None")
    return list(observers)
