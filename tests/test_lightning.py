"""FakeQuantCallback with Lightning's Trainer on a tiny GPT (CPU, a few steps each)."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import fakequant.lightning as fql
from fakequant import FakeQuantConfig, FakeQuantLinear
from fakequant.lightning import FakeQuantCallback

from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch

GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32)
LAYER = "model.h.0.mlp.c_fc"


class TinyModule(pl.LightningModule):
    """TinyGPT on one fixed batch (so a resumed run sees the same data), recording each step's loss."""

    def __init__(self, plant_inf_at: int | None = None) -> None:
        super().__init__()
        self.model = TinyGPT(GPT)
        self.plant_inf_at = plant_inf_at
        self.losses: list[float] = []
        self.patched_when_optimizers_built: bool | None = None

    def training_step(self, batch, batch_idx):
        if self.global_step == self.plant_inf_at:
            with torch.no_grad():
                self.model.h[0].mlp.c_fc.weight[0, 0] = float("inf")
        _, loss = self.model(*batch)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        self.patched_when_optimizers_built = isinstance(self.model.h[0].mlp.c_fc, FakeQuantLinear)
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _loader(n: int = 64):
    x, y = synthetic_batch(GPT, 2, seed=3)
    data = [(x[i % 2], y[i % 2]) for i in range(2 * n)]
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def _trainer(callbacks, max_steps: int, logger=False, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, deterministic=True, **kw)


def _fit(callbacks, max_steps: int, seed: int = 0, module: TinyModule | None = None, **kw) -> TinyModule:
    pl.seed_everything(seed, verbose=False)
    module = module or TinyModule()
    _trainer(callbacks, max_steps, **kw).fit(module, _loader())
    return module


# ----------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"config_or_recipe": "nope"}, ValueError, r"unknown recipe 'nope': give one of bf16, hif4, .*mxfp8"),
    ({"config_or_recipe": 3}, TypeError, r"config_or_recipe must be a FakeQuantConfig, a recipe name \(bf16, "),
    ({"config_or_recipe": {"weigth": "mxfp4"}}, ValueError, r"unknown key\(s\) 'weigth'; allowed: input, weight"),
    ({"start_step": -1}, ValueError, r"start_step=-1 is not allowed; start_step must be an int >= 0"),
    ({"start_step": True}, ValueError, r"start_step=True is not allowed"),
    ({"monitor_every_n_steps": 0}, ValueError, r"monitor_every_n_steps must be a positive int or None"),
    ({"stop_on_nonfinite": "yes"}, TypeError, r"stop_on_nonfinite must be True or False"),
    ({"module_filter": 3}, TypeError, r"module_filter=3 is not allowed; it must be a regex, a callable"),
    ({"module_filter": "(["}, ValueError, r"module_filter='\(\[' is not allowed"),
    ({"saver": "dump/"}, TypeError, r"saver must be None or an observer"),
])
def test_bad_arguments_are_refused_with_the_allowed_values(kwargs, error, match):
    kwargs = {"config_or_recipe": "mxfp8", **kwargs}
    with pytest.raises(error, match=match):
        FakeQuantCallback(**kwargs)


def test_config_recipe_path_and_module_filter_are_accepted():
    cb = FakeQuantCallback(FakeQuantConfig.from_recipe("nvfp4"), module_filter=r"mlp\.")
    assert cb.config.include == (r"mlp\.",) and str(cb.config.weight) == "nvfp4"
    assert FakeQuantCallback({"weight": "mxfp4"}).config.input is None


# -------------------------------------------------------------------------------------------- fitting
def test_patches_once_before_the_optimizers_and_unpatches_in_teardown(monkeypatch):
    calls = []
    real_patch = fql.patch
    monkeypatch.setattr(fql, "patch", lambda *a, **k: calls.append(a[0]) or real_patch(*a, **k))
    cb = FakeQuantCallback("mxfp8", module_filter=r"mlp\.", monitor_every_n_steps=None, verbose=False)
    module = TinyModule()
    trainer = _trainer([cb], 3, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, _loader(), _loader(1))
    assert len(calls) == 1 and calls[0] is module
    assert module.patched_when_optimizers_built is True
    assert cb.report.names == ["model.h.0.mlp.c_fc", "model.h.0.mlp.c_proj"]  # the filter applied
    assert not any(isinstance(m, FakeQuantLinear) for m in module.modules())  # unpatched after fit
    assert "forward" not in vars(module.model.h[0].mlp.c_fc)  # forward never wrapped


def test_warm_up_is_plain_torch_until_start_step_then_quantized():
    plain = _fit([], 5).losses
    cb = FakeQuantCallback("mxfp4", start_step=3, monitor_every_n_steps=None, verbose=False)
    warm = _fit([cb], 5).losses
    assert warm[:3] == plain[:3]  # bit for bit: quantization is off
    assert warm[3] != plain[3] and warm[4] != plain[4]
    always = _fit([FakeQuantCallback("mxfp4", monitor_every_n_steps=None, verbose=False)], 5).losses
    assert always[1] != plain[1]


def test_resume_from_checkpoint_keeps_the_checkpoints_quantization(tmp_path):
    straight = _fit([FakeQuantCallback("mxfp4", start_step=1, monitor_every_n_steps=None, verbose=False)], 4).losses

    pl.seed_everything(0, verbose=False)
    first = TinyModule()
    trainer = _trainer([FakeQuantCallback("mxfp4", start_step=1, monitor_every_n_steps=None, verbose=False)], 2)
    trainer.fit(first, _loader())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]["FakeQuantCallback"]
    assert state["formats"]["weight"] == "e2m1k8b32" and state["start_step"] == 1

    # Resumed with a callback built for another recipe: the checkpoint's formats win, with a warning.
    resumed_cb = FakeQuantCallback("bf16", monitor_every_n_steps=None, verbose=False)
    second = TinyModule()
    with pytest.warns(UserWarning, match="resuming with the checkpoint's formats"):
        _trainer([resumed_cb], 4).fit(second, _loader(), ckpt_path=ckpt)
    assert str(resumed_cb.config.weight) == "e2m1k8b32" and resumed_cb.start_step == 1
    assert first.losses + second.losses == straight  # the same numbers as the uninterrupted run


def test_monitor_metrics_reach_the_logger(tmp_path):
    cb = FakeQuantCallback("mxfp8", monitor_every_n_steps=2, verbose=False)
    _fit([cb], 4, logger=CSVLogger(tmp_path, name="run", version=""), log_every_n_steps=1)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    name = f"fakequant/{LAYER}/fprop.weight/sqnr_db"
    logged = {int(r["step"]): float(r[name]) for r in rows if r.get(name)}
    assert sorted(logged) == [0, 2] and all(20 < v < 40 for v in logged.values())
    for stat in ("saturated_frac", "flushed_frac", "scale_exp_min", "scale_exp_mean", "scale_exp_max"):
        assert f"fakequant/{LAYER}/wgrad.grad_output/{stat}" in rows[0]
    assert any(r.get("train_loss") for r in rows)


def test_planted_inf_is_reported_with_layer_gemm_role_and_stops_the_run_when_asked():
    cb = FakeQuantCallback("mxfp8", monitor_every_n_steps=None, stop_on_nonfinite=True, verbose=False)
    pl.seed_everything(0, verbose=False)
    module = TinyModule(plant_inf_at=2)
    trainer = _trainer([cb], 10)
    with pytest.warns(UserWarning, match=rf"first non-finite value at step 2 in layer '{LAYER}', GEMM fprop, "
                                         r"role weight: .* 1 inf .*; stopping training"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 3  # stopped after the step that saw it, not at max_steps=10
    nf = cb.first_nonfinite
    assert (nf.layer, nf.gemm, nf.role, nf.step, nf.tensor) == (LAYER, "fprop", "weight", 2, "high-precision")

    # Without stop_on_nonfinite the run goes on and still says where the inf came from.
    cb = FakeQuantCallback("mxfp8", monitor_every_n_steps=None, verbose=False)
    pl.seed_everything(0, verbose=False)
    trainer = _trainer([cb], 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModule(plant_inf_at=2), _loader())
    assert trainer.global_step == 5 and cb.first_nonfinite.layer == LAYER
    assert any("first non-finite value at step 2" in str(w.message) for w in caught)


def test_a_tensor_saver_rides_along_as_an_observer(tmp_path):
    from fakequant.saver import TensorSaver

    saver = TensorSaver(tmp_path / "dump", steps=[1], layers=r"mlp\.c_fc$", what=("hp", "quantized"))
    _fit([FakeQuantCallback("mxfp8", monitor_every_n_steps=None, saver=saver, verbose=False)], 3)
    files = sorted(p.relative_to(tmp_path / "dump").as_posix() for p in (tmp_path / "dump").rglob("*.safetensors"))
    assert files and all(f.startswith("rank_0/step_000001/model.h.0.mlp.c_fc.") for f in files)
    assert len(files) == 6  # fprop, dgrad, wgrad x their two operands
