"""``fakequant.export``: a tiny GPT trained with the ``mxfp4`` recipe, exported to packed ``QuantLinear``s,
gives bit for bit the fake-quant model's outputs on CPU, and its exported weights take at most 4.3 bits per
element on disk."""

from __future__ import annotations

import copy

import pytest
import torch

import fakequant
from fakequant.config import FakeQuantConfig
from fakequant.export import export
from fakequant.nn import QuantLinear
from fakequant.patch import patch

from .conftest import assert_bitwise_equal
from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch, train

CFG = GPTConfig(n_embd=128, n_head=4, n_layer=2)


def _trained(recipe: str, steps: int = 3, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(CFG)
    patch(model, FakeQuantConfig.from_recipe(recipe))
    if steps:
        losses = train(model, synthetic_batch(CFG, 2, seq=16, seed=seed), steps)
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] <= losses[0]
    return model.eval()


@pytest.fixture(scope="module")
def trained_mxfp4():
    return _trained("mxfp4")


@pytest.fixture
def mxfp4_model(trained_mxfp4):
    return copy.deepcopy(trained_mxfp4)


def test_export_reproduces_fake_quant_outputs_bit_for_bit(mxfp4_model):
    model = mxfp4_model
    idx, _ = synthetic_batch(CFG, 3, seed=11)
    with torch.no_grad():
        before = model(idx)
    report = export(model, backend="torch")
    assert len(report) == 4 * CFG.n_layer and "h.0.mlp.c_fc" in report.names
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.names)
    assert "lm_head" not in report.names  # the recipe keeps the (tied) head in high precision
    with torch.no_grad():
        after = model(idx)
    assert_bitwise_equal(after, before)
    assert "4.250 bits/weight" in str(report)


def test_exported_weights_on_disk(mxfp4_model, tmp_path):
    """Every exported weight in one safetensors file (codes and scale bytes, file header included)."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = mxfp4_model
    export(model)
    tensors, elements = {}, 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            tensors[f"{name}.weight_codes"] = m.weight_codes.contiguous()
            tensors[f"{name}.weight_scales"] = m.weight_scales.contiguous()
            elements += m.in_features * m.out_features
    path = tmp_path / "weights.safetensors"
    safetensors.save_file(tensors, str(path))
    bits = 8 * path.stat().st_size / elements
    print(f"exported weights on disk: {bits:.4f} bits per element ({path.stat().st_size} bytes, {elements} weights)")
    assert bits <= 4.3, f"{bits:.4f} bits per weight on disk"
    # and the file decodes to the same weights (DeepSeek layout: blocks [out, in/2], scales [out, in/32])
    loaded = safetensors.load_file(str(path))
    m = model.get_submodule("h.1.mlp.c_proj")
    w = fakequant.packing.dequantize_packed(loaded["h.1.mlp.c_proj.weight_codes"],
                                            loaded["h.1.mlp.c_proj.weight_scales"], dtype=torch.float32)
    assert_bitwise_equal(w, m.dequantize_weight(torch.float32))


def test_exported_state_dict_loads_into_a_fresh_exported_skeleton(mxfp4_model):
    model = mxfp4_model
    export(model)
    torch.manual_seed(123)
    fresh = TinyGPT(CFG)
    patch(fresh, FakeQuantConfig.from_recipe("mxfp4"))
    export(fresh)
    fresh.load_state_dict(model.state_dict())
    idx, _ = synthetic_batch(CFG, 2, seed=5)
    with torch.no_grad():
        assert_bitwise_equal(fresh.eval()(idx), model(idx))


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4_fwd_mxfp8_bwd"])
def test_other_packable_recipes(recipe):
    model = _trained(recipe, steps=1)
    idx, _ = synthetic_batch(CFG, 2, seed=3)
    with torch.no_grad():
        before = model(idx)
    report = export(model)
    assert len(report) == 4 * CFG.n_layer
    with torch.no_grad():
        assert_bitwise_equal(model(idx), before)


def test_unpackable_weights_are_skipped_with_the_reason():
    model = _trained("mxfp8", steps=0)
    report = export(model)
    assert len(report) == 0 and len(report.skipped) == 4 * CFG.n_layer
    assert "cannot pack" in report.skipped[0][1] and "not exported" in str(report)
    with pytest.raises(RuntimeError, match="no fake-quant Linear"):
        export(TinyGPT(CFG))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export("model")
