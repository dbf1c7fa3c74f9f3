"""Export a fake-quant-trained model to real packed storage: every fake-quant Linear becomes a ``QuantLinear``.

``fakequant.export(model)`` walks a model patched by ``fakequant.patch`` and replaces each
``FakeQuantLinear`` whose fprop weight format can be stored packed (``mxfp4``-family, ``nvf4``, ``nvfp4``)
by a ``fakequant.nn.QuantLinear`` holding ``pack(W, weight_qtype)`` (the weight quantized exactly as fprop
quantized it during training), the bias, and the fprop input format. On the ``torch`` backend the exported
layer computes ``F.linear(Q_in(x), unpack(...), b)`` with ``unpack(...)`` equal bit for bit to the
``quant_dequant(W)`` that the fake-quant layer multiplies, so the exported model's outputs equal the
fake-quant model's outputs bit for bit (outside ``torch.autocast``, where training quantizes the weight after
casting it to the autocast dtype).

Layers are replaced in place in their parent modules (hooks registered on the old modules do not carry
over); layers whose weight role is unquantized or in a format that cannot be packed are left as they are and
listed in the report with the reason.

Public: ``export``, ``ExportReport``, ``ExportedLayer``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .formats import as_qtype
from .nn import QuantLinear
from .packing import _pack_kind
from .patch import FakeQuantLinear

__all__ = ["export", "ExportReport", "ExportedLayer"]


@dataclass(frozen=True)
class ExportedLayer:
    """One replaced layer: its fully-qualified name, formats and packed size."""

    name: str
    weight: str
    input: str | None
    bits_per_weight: float


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` did: the replaced layers in module order and the fake-quant layers it left alone."""

    layers: tuple[ExportedLayer, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"fakequant: exported {len(self.layers)} Linear module(s) to packed storage"]
        width = max([len(layer.name) for layer in self.layers] + [len(n) for n, _ in self.skipped] + [4])
        for layer in self.layers:
            lines.append(f"  {layer.name:<{width}}  weight={layer.weight}  input={layer.input or 'none'}  "
                         f"{layer.bits_per_weight:.3f} bits/weight")
        for name, why in self.skipped:
            lines.append(f"  {name:<{width}}  not exported: {why}")
        return "\n".join(lines)


def export(model: nn.Module, *, backend: str | None = None) -> ExportReport:
    """Replace every exportable fake-quant Linear of a patched ``model`` by a ``QuantLinear``, in place.

    ``backend`` is given to each ``QuantLinear`` (``None``: chosen per call by device). Raises
    ``RuntimeError`` if the model holds no fake-quant Linear (it was not patched, or already exported).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not targets:
        raise RuntimeError("export: the model has no fake-quant Linear modules (patch it with fakequant.patch "
                           "and train it first)")
    parents = dict(model.named_modules())
    layers, skipped = [], []
    for name, module in targets:
        plan = module._fakequant_plan  # fprop formats with their axes (QTypes or their strings)
        if plan.b_fprop is None:
            skipped.append((name, "its fprop weight is not quantized (nothing to pack)"))
            continue
        weight_q = as_qtype(plan.b_fprop)
        input_q = None if plan.a_fprop is None else as_qtype(plan.a_fprop)
        try:
            _pack_kind(weight_q)
        except ValueError as err:
            skipped.append((name, str(err)))
            continue
        new = QuantLinear.from_weight(module.weight, module.bias, weight_qtype=weight_q, input_qtype=input_q,
                                      backend=backend)
        new.train(module.training)
        if name == "":
            raise RuntimeError("export: the model itself is a fake-quant Linear; wrap it in a module to export it")
        parent_name, _, child = name.rpartition(".")
        setattr(parents[parent_name], child, new)
        layers.append(ExportedLayer(name, str(weight_q), None if input_q is None else str(input_q),
                                    new.weight_bits_per_element()))
    return ExportReport(tuple(layers), tuple(skipped))
