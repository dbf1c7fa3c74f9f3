"""A TensorSaver attached through the config (``FakeQuantConfig.observers``): patch, patch_functional and the
Lightning callback use it, once, and the config's identity ignores it."""

from __future__ import annotations

import pytest
import torch

from fakequant import FakeQuantConfig, patch, patch_functional
from fakequant.saver import TensorSaver, load, read_manifest, sanitise

from .conftest import assert_bitwise_equal
from .saver_run import CONFIG, GPT, LAYERS, OPERANDS, STEPS, train_with_saver
from .tiny_gpt import TinyGPT, synthetic_batch


def _dumped(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------ the field
def test_observers_are_validated_and_left_out_of_identity_and_serialisation():
    events = []
    cfg = FakeQuantConfig(input="mxfp4", observers=[events.append])
    assert cfg.observers == (events.append,) and isinstance(cfg.observers, tuple)
    plain = FakeQuantConfig(input="mxfp4")
    assert cfg == plain and hash(cfg) == hash(plain) and repr(cfg) == repr(plain)
    assert "observers" not in cfg.to_dict() and FakeQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(weight="mxfp4").observers == cfg.observers  # replace keeps them ...
    assert cfg.replace(observers=()).observers == ()                # ... unless told otherwise
    assert FakeQuantConfig(observers=print).observers == (print,)   # one callable is a sequence of one
    with pytest.raises(TypeError, match=r"FakeQuantConfig.observers: observer 3 is not callable"):
        FakeQuantConfig(observers=[print, 3])
    with pytest.raises(TypeError, match=r"FakeQuantConfig.observers: observers must be a sequence of callables"):
        FakeQuantConfig(observers="dump/")
    with pytest.raises(ValueError, match=r"from_dict: 'observers' cannot be serialised .*config.replace\(observers="):
        FakeQuantConfig.from_dict({"input": "mxfp4", "observers": []})


# ------------------------------------------------------------------------------------------ patch
def test_a_saver_in_the_config_dumps_what_a_saver_passed_to_patch_dumps(tmp_path):
    by_argument, _, _ = train_with_saver(tmp_path / "argument")
    by_config, _, _ = train_with_saver(tmp_path / "config", via_config=True)  # patch gets no observers
    expected = sorted(f"rank_0/step_{s:06d}/{layer}.{g}.{r}.safetensors" for s in STEPS for layer in LAYERS
                      for g, r in OPERANDS)
    assert _dumped(tmp_path / "config") == _dumped(tmp_path / "argument") == expected
    assert [m["path"] for m in read_manifest(tmp_path / "config")] == [
        p.relative_to(tmp_path / "config").as_posix() for p in by_config.files]
    for name in expected:
        a, c = load(tmp_path / "argument" / name), load(tmp_path / "config" / name)
        assert a.meta == c.meta
        assert_bitwise_equal(c.quantized, a.quantized)
        assert_bitwise_equal(c.decode(), c.quantized)
    assert len(by_argument.files) == len(by_config.files) == len(expected)


def test_a_saver_given_both_ways_is_attached_once(tmp_path):
    # calls="all" would write a .call1 file for each operand seen twice
    saver = TensorSaver(tmp_path, steps=[0], layers=r"^h\.0\.attn\.c_attn$", calls="all")
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    patch(model, CONFIG.replace(observers=(saver,)), observers=(saver,))
    assert len(model.get_submodule("h.0.attn.c_attn")._fakequant_site.observers) == 1
    saver.step(0)
    _, loss = model(*synthetic_batch(GPT, 2))
    loss.backward()
    names = [p.name for p in saver.files]
    assert len(names) == 6 and not [n for n in names if ".call" in n]


def test_patch_functional_uses_the_configs_observers(tmp_path):
    saver = TensorSaver(tmp_path, steps=[0], gemms=("fprop",), roles=("input", "weight"), calls="all")
    seen = []
    cfg = FakeQuantConfig(input="mxfp4", weight="mxfp8e4m3", observers=(saver,))
    saver.step(0)
    a, b = torch.randn(4, 64), torch.randn(64, 8)
    with patch_functional(cfg, ops=("matmul",), observers=(seen.append, saver)):
        torch.matmul(a, b)
    stem = sanitise("")
    assert sorted(p.name for p in saver.files) == [f"{stem}.fprop.input.safetensors", f"{stem}.fprop.weight.safetensors"]
    assert [(e.gemm, e.role) for e in seen] == [("fprop", "input"), ("fprop", "weight")]  # the argument's too


# ------------------------------------------------------------------------------------------ Lightning
def test_the_lightning_callback_steps_and_closes_a_saver_in_its_config(tmp_path):
    pytest.importorskip("lightning")
    from fakequant.lightning import FakeQuantCallback

    from .test_lightning import LAYER, _fit

    saver = TensorSaver(tmp_path, steps=[1], layers=r"mlp\.c_fc$", what=("hp", "quantized"))
    cfg = FakeQuantConfig.from_recipe("mxfp8").replace(observers=(saver,))
    cb = FakeQuantCallback(cfg, monitor_every_n_steps=None, verbose=False)
    _fit([cb], 3)
    assert _dumped(tmp_path) == sorted(f"rank_0/step_000001/{LAYER}.{g}.{r}.safetensors" for g, r in OPERANDS)
    assert {m["step"] for m in read_manifest(tmp_path)} == {1}
    assert saver.current_step == 2 and not saver.wants(LAYER, "fprop", "input")  # stepped, then closed
