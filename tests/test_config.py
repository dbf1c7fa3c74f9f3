"""``FakeQuantConfig``: validation messages, overrides, (de)serialisation and the shipped recipes."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from fakequant import FakeQuantConfig, QType
from fakequant.config import (
    ATTENTION_ROLES,
    GEMM_OPERANDS,
    RECIPE_DIR,
    RUNTIME_FIELDS,
    recipe_names,
)

RECIPES = ("bf16", "mxfp8", "mxfp6", "mxfp4", "mxfp4_fwd_mxfp8_bwd", "hif8", "hif4", "nvfp4")


def test_formats_are_parsed_into_qtypes_and_none_means_high_precision():
    cfg = FakeQuantConfig(input="MXFP8E4M3", weight=QType("mxfp4"), grad_output=None, query="hif8")
    assert cfg.input == QType("mxfp8e4m3") and isinstance(cfg.input, QType)
    assert cfg.weight == QType("mxfp4") and cfg.grad_output is None and cfg.query == QType("hif8")
    assert cfg.fidelity == "faithful"
    assert not FakeQuantConfig().quantizes_linear and not FakeQuantConfig().quantizes_attention
    assert cfg.quantizes_linear and cfg.quantizes_attention


def test_overrides_apply_to_their_gemm_only():
    cfg = FakeQuantConfig(input="mxfp4", weight="mxfp4", grad_output="mxfp8e5m2", weight_for_dgrad="mxfp8e4m3",
                          input_for_wgrad="fp32")
    got = {(g, r): str(cfg.format_for(g, r)) for g, r in GEMM_OPERANDS}
    assert got == {
        ("fprop", "input"): "mxfp4", ("fprop", "weight"): "mxfp4",
        ("dgrad", "grad_output"): "mxfp8e5m2", ("dgrad", "weight"): "mxfp8e4m3",
        ("wgrad", "grad_output"): "mxfp8e5m2", ("wgrad", "input"): "fp32",
    }
    with pytest.raises(ValueError, match="no operand 'weight' in GEMM 'wgrad'; the operands are fprop/input"):
        cfg.format_for("wgrad", "weight")


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"weight": "mxfp5"}, ValueError, r"FakeQuantConfig.weight='mxfp5' is not a valid format: invalid "
                                          r"quantization format 'mxfp5': unrecognised; expected one of: an alias"),
        ({"input": 8}, TypeError, r"FakeQuantConfig.input must be a QType, a format string or None, got int \(8\)"),
        ({"key": QType("mxfp4").dim(0)}, ValueError,
         r"FakeQuantConfig.key='mxfp4:dim=0' sets dim=0, but the axis is chosen per GEMM"),
        ({"grad_output": "e2m1k8b32C"}, ValueError, r"grad_output='e2m1k8b32C'.*carry suffix is lower-case c"),
        ({"fidelity": "exact"}, ValueError, r"FakeQuantConfig.fidelity='exact' is not one of faithful, reference"),
        ({"fidelity": None}, ValueError, r"FakeQuantConfig.fidelity=None is not one of faithful, reference"),
        ({"include": "h.(0"}, ValueError, r"FakeQuantConfig.include pattern 'h.\(0' is not a valid regex"),
        ({"exclude": [3]}, TypeError, r"FakeQuantConfig.exclude entries must be regex strings or callables .*"
                                      r"got int \(3\)"),
        ({"include": 3}, TypeError, r"FakeQuantConfig.include must be a regex string, a callable .*got int \(3\)"),
    ],
)
def test_bad_fields_raise_naming_the_field_the_value_and_what_is_allowed(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        FakeQuantConfig(**kwargs)


def test_config_is_frozen_hashable_and_replace_validates():
    cfg = FakeQuantConfig(input="mxfp4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.input = QType("mxfp8e4m3")
    assert cfg == FakeQuantConfig(input=QType("e2m1k8b32c")) and hash(cfg) == hash(FakeQuantConfig(input="mxfp4"))
    assert cfg.replace(fidelity="reference").fidelity == "reference" and cfg.fidelity == "faithful"
    with pytest.raises(ValueError, match="FakeQuantConfig.fidelity='both'"):
        cfg.replace(fidelity="both")
    with pytest.raises(ValueError, match=r"FakeQuantConfig.replace: unknown key\(s\) 'inputs'; allowed: input, weight"):
        cfg.replace(inputs="mxfp4")


def test_module_filters_default_to_keeping_output_heads_in_high_precision():
    cfg = FakeQuantConfig(input="mxfp4")
    lin = nn.Linear(2, 2)
    for name in ("lm_head", "model.lm_head", "head", "output", "decoder.output_layer", "classifier"):
        assert not cfg.selects(name, lin), name
    for name in ("h.0.attn.c_attn", "model.layers.3.mlp.down_proj", "head_proj", "output.dense"):
        assert cfg.selects(name, lin), name
    only_mlp = cfg.replace(include=[r"\.mlp\."], exclude=lambda n, m: n.endswith("c_proj"))
    assert only_mlp.selects("h.0.mlp.c_fc", lin)
    assert not only_mlp.selects("h.0.mlp.c_proj", lin) and not only_mlp.selects("h.0.attn.c_attn", lin)


def test_to_dict_from_dict_round_trip():
    cfg = FakeQuantConfig(input="mxfp4", weight="e4m3k8b32:round=even", grad_output_for_wgrad="hif8",
                          attn_probs="mxfp8e4m3", fidelity="reference", include=["h"], exclude=())
    data = cfg.to_dict()
    assert data["weight"] == "e4m3k8b32:round=even" and data["grad_output"] is None and data["include"] == ["h"]
    # every field but the run-time ones (observers: not data, see tests/test_saver_config.py)
    assert set(data) == {f.name for f in dataclasses.fields(FakeQuantConfig)} - set(RUNTIME_FIELDS)
    assert FakeQuantConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"FakeQuantConfig.from_dict: unknown key\(s\) 'grad_input'; allowed:"):
        FakeQuantConfig.from_dict({"grad_input": "mxfp4"})
    with pytest.raises(TypeError, match="from_dict needs a dict, got list"):
        FakeQuantConfig.from_dict(["input"])


def test_from_yaml_reads_a_file_and_names_it_in_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("# mine\ninput: mxfp6e2m3\nweight: 'mxfp6e2m3'\ngrad_output: null\nfidelity: reference\n")
    cfg = FakeQuantConfig.from_yaml(good)
    assert cfg == FakeQuantConfig(input="mxfp6e2m3", weight="mxfp6e2m3", fidelity="reference")
    assert FakeQuantConfig.from_recipe(str(good)) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: mxfp5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: FakeQuantConfig.weight='mxfp5' is not a valid format"):
        FakeQuantConfig.from_yaml(bad)
    (tmp_path / "list.yaml").write_text("- input\n")
    with pytest.raises(ValueError, match="must hold a mapping, got list"):
        FakeQuantConfig.from_yaml(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="no such file"):
        FakeQuantConfig.from_yaml(tmp_path / "missing.yaml")


def test_every_recipe_ships_loads_and_says_what_it_models():
    assert set(RECIPES) <= set(recipe_names())
    for name in recipe_names():
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}: "), name  # the first line says what the recipe models
        cfg = FakeQuantConfig.from_recipe(name)
        assert FakeQuantConfig.from_dict(cfg.to_dict()) == cfg
        assert all(getattr(cfg, r) is None for r in ATTENTION_ROLES)  # recipes leave attention in high precision
    assert not FakeQuantConfig.from_recipe("bf16").quantizes_linear
    mixed = FakeQuantConfig.from_recipe("mxfp4_fwd_mxfp8_bwd")
    assert str(mixed.format_for("fprop", "weight")) == "e2m1k8b32"
    assert str(mixed.format_for("dgrad", "weight")) == "e4m3k8b32"
    assert str(mixed.format_for("wgrad", "input")) == "e4m3k8b32"
    assert str(mixed.format_for("wgrad", "grad_output")) == "e5m2k8b32"


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'mxfp3': give one of bf16, hif4, .*nvfp4 or a .yaml path"):
        FakeQuantConfig.from_recipe("mxfp3")
    with pytest.raises(TypeError, match="recipe must be a name or a path, got int"):
        FakeQuantConfig.from_recipe(4)
