"""The built-in demo and ``fakequant train``: deterministic outputs, the summary and plot, 2-process DDP on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from fakequant import cli
from fakequant.demo import DEFAULT_RECIPES, load_train_config, run_demo, stdlib_bytes, stdlib_files
from fakequant.demo_cli import _DEFAULT_RECIPES

ROOT = Path(__file__).resolve().parent.parent
TRAIN_YAML = ROOT / "recipes" / "train" / "gpt_stdlib.yaml"
# A model small enough for a test: one layer of width 32, 32-byte context, 4 sequences per step.
TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}, "data": {"batch_size": 4,
        "val_batches": 1}, "threads": 1}
TINY_ARGS = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
             "--data.batch_size", "4", "--data.val_batches", "1", "--threads", "1"]


def test_stdlib_text_is_found_and_split_deterministically():
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    train, val = stdlib_bytes()
    assert train.numel() > 1_000_000 and 0.05 < val.numel() / train.numel() < 0.2


def test_same_seed_twice_gives_identical_metrics_and_writes_summary_and_plot(tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        result = run_demo(["bf16", "mxfp4"], steps=12, out=tmp_path / name, progress_bar=False, overrides=TINY)
        outs.append(tmp_path / name)
    for recipe in ("bf16", "mxfp4"):
        a, b = ((o / recipe / "metrics.csv").read_bytes() for o in outs)
        assert a == b and b"train_loss" in a and b"val_loss" in a
    assert b"fakequant/model.h.0.c_fc/fprop.input/sqnr_db" in (outs[0] / "mxfp4" / "metrics.csv").read_bytes()
    summary = (outs[0] / "summary.md").read_text()
    assert re.search(r"\| mxfp4 \| 11 \| [0-9.]+ \| [+-][0-9.]+% \| [+-][0-9.]+% \| (ok|FAIL) \|", summary)
    assert "within" not in summary or "2%" in summary
    assert "| bf16 | 11 |" in summary and "Lowest SQNR" in summary
    png = outs[0] / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["failures"] == [] or all(f.startswith("mxfp4") for f in result["failures"])


def test_cli_defaults_match_the_module_and_bad_input_is_refused(capsys):
    assert _DEFAULT_RECIPES == ",".join(DEFAULT_RECIPES)
    assert cli.main(["demo", "--recipes", "bf16,nope", "--steps", "10"]) == 2
    assert "unknown recipe 'nope': give one of bf16" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(TRAIN_YAML), "--trainr.devices", "2"]) == 2
    assert "unknown section 'trainr' in --trainr.devices; allowed: model, data, trainer" in capsys.readouterr().err


def test_train_config_merges_yaml_overrides_and_accepts_a_plain_recipe_file():
    cfg = load_train_config(TRAIN_YAML, {"trainer": {"devices": 2}, "fakequant": {"recipe": "nvfp4"}})
    assert cfg["trainer"]["devices"] == 2 and cfg["trainer"]["max_steps"] == 300
    assert cfg["fakequant"] == {"recipe": "nvfp4", "start_step": 0, "monitor_every_n_steps": 50,
                                "stop_on_nonfinite": True}
    plain = load_train_config(ROOT / "recipes" / "mxfp8.yaml")
    assert plain["fakequant"]["recipe"].endswith("mxfp8.yaml") and plain["name"] == "mxfp8"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_ddp_train_on_cpu_logs_the_same_loss_on_both_ranks(tmp_path):
    cmd = [sys.executable, "-m", "fakequant.cli", "train", "--config", str(TRAIN_YAML), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
           "--trainer.enable_progress_bar", "false", "--fakequant.recipe", "mxfp8", "--out", str(tmp_path),
           *TINY_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = re.findall(r"rank (\d): step (\d+) train_loss ([0-9.]+)", proc.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], proc.stdout
    assert {s for _, s, _ in lines} == {"3"}
    assert lines[0][2] == lines[1][2]  # the loss both ranks log (all-reduced) is the same
    assert (tmp_path / "gpt_stdlib_mxfp8" / "metrics.csv").is_file()
