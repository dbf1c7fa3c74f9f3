"""The built-in training demo (``fakequant demo``) and single runs from a YAML config (``fakequant train``).

``fakequant demo`` trains the same small GPT once per recipe (default ``bf16 mxfp8 mxfp4 hif8 hif4 nvfp4``)
with the same seed and the same batches in the same order, and lays the loss curves side by side::

    fakequant demo                                   # about 10 minutes on a 2-core CPU
    fakequant demo --recipes bf16,mxfp4 --steps 100 --out runs_small

Data: the source files of the Python standard library of the running interpreter (found through
``sysconfig``, so nothing is downloaded), read in sorted order as bytes (a 256-symbol byte-level model);
every 10th file goes to validation. Model: nanoGPT's shape (pre-LN blocks, GELU MLP, tied embedding and
head, ``F.scaled_dot_product_attention``), 4 layers of width 128 by default. Only the ``nn.Linear`` layers of
the blocks are fake-quantized (the recipes' roles); the output head keeps high precision (the default
``exclude`` of ``FakeQuantConfig``), as do attention's BMMs.

Output (``--out``, default ``runs``): ``<recipe>/metrics.csv`` (Lightning ``CSVLogger``: ``train_loss`` every
step, ``val_loss`` every 50 steps, and the numerics monitor's ``fakequant/...`` statistics),
``loss_curves.png`` (train and validation loss vs step, one line per recipe, bf16 black and dashed, with
a zoom on the compared window), and ``summary.md``: final losses, the mean relative gap of each recipe's
training loss (trailing mean over ``SMOOTH`` steps) to bf16 over the last 20% of steps, and a verdict against
``TOLERANCE`` (made with ``fakequant.compare_loss``: ``fakequant compare-loss runs/bf16 runs/mxfp4 --smooth 10``
prints the same numbers), plus the operands with the lowest SQNR at the last monitored step: which layer
hurts.

``fakequant train --config FILE.yaml [--section.key VALUE ...]`` runs one training with the same model and
data from a LightningCLI-style YAML (``model``, ``data``, ``trainer``, ``fakequant`` sections; see
``recipes/train/gpt_stdlib.yaml``), or from a plain recipe file (``recipes/mxfp8.yaml``: the demo's settings
with that recipe). ``--trainer.devices 2 --trainer.strategy ddp`` works on CPU; each rank prints its final
(all-reduced) training loss.

Public: ``GPT``, ``GPTLightning``, ``StdlibBytes``, ``stdlib_bytes``, ``run_demo``, ``train_from_config``,
``DEFAULT_RECIPES``, ``TOLERANCE``, ``DEMO_DEFAULTS``, ``load_train_config``, ``dotted_overrides``. The
subcommands are registered by ``fakequant.demo_cli`` (which imports this module, and Lightning, only when
they run).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPT", "GPTLightning", "StdlibBytes", "stdlib_bytes", "run_demo", "train_from_config", "DEFAULT_RECIPES",
    "TOLERANCE", "DEMO_DEFAULTS", "load_train_config", "dotted_overrides",
]

DEFAULT_RECIPES = ("bf16", "mxfp8", "mxfp4", "hif8", "hif4", "nvfp4")
# The verdict: a recipe is "ok" when its training loss is on average within 2% of bf16's over the last 20% of
# the steps (same seed, same batches, so the gap is the formats' doing). 8-bit formats are expected to pass;
# 4-bit formats without stochastic rounding or Hadamard transforms typically do not at this scale.
TOLERANCE = 0.02
WINDOW_FRAC = 0.2
# The training loss is that of each step's own batch, which swings by ±0.2 from batch to batch (the same
# swings in every run, since the batches are the same): a trailing average over 10 steps shows the curves
# apart. The gaps are measured on the same averaged curves (they differ from the raw ones by a few 0.01%).
SMOOTH = 10

# Folders of the standard library that are not its source proper (installed packages, the test suite, IDLE).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}

# The demo's settings, chosen so that six recipes finish in about 10 minutes on a 2-core CPU (Lightning's
# progress bar shows the rate): 4 layers of width 128 (0.84M parameters; the fake-quantized GEMMs dominate the
# time, each operand re-quantized per GEMM by the plain-torch reference), 128-byte context, 16 sequences per
# step, 300 steps (~0.6M tokens: the loss falls from 5.5 (ln 256) to ~2.3). lr 1e-3: at 3e-3 the runs are
# unstable enough that which recipe escapes the early plateau first, not its format, decides the gap.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "lr": 1e-3, "warmup_steps": 30,
              "weight_decay": 0.1},
    "data": {"batch_size": 16, "val_batches": 4, "seed": 1234},
    "trainer": {"max_steps": 300, "val_check_interval": 50, "log_every_n_steps": 1, "accelerator": "cpu",
                "devices": 1},
    "fakequant": {"recipe": "bf16", "start_step": 0, "monitor_every_n_steps": 50, "stop_on_nonfinite": False},
    "seed_everything": 1234,
    "threads": 0,  # torch intra-op threads; 0 = leave torch's default
}


# ------------------------------------------------------------------------------------------------ data
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path below the stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(f"no Python source files under the standard library folder {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def stdlib_bytes(val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the bytes of the standard library's sources as uint8 tensors; every ``val_every``-th
    file (in sorted order) is validation. Deterministic for a given Python installation."""
    train, val = bytearray(), bytearray()
    for i, path in enumerate(stdlib_files()):
        (val if i % val_every == val_every - 1 else train).extend(path.read_bytes() + b"\n\n")
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(val), dtype=torch.uint8))


class _Windows(torch.utils.data.Dataset):
    """``n`` windows of ``block + 1`` bytes at offsets drawn once from ``seed``: sample i is the same in every
    run, whatever the recipe. Items: (x, y) = (window[:-1], window[1:]) as int64."""

    def __init__(self, data: torch.Tensor, block: int, n: int, seed: int) -> None:
        if data.numel() <= block + 1:
            raise ValueError(f"the text has {data.numel()} bytes, fewer than block_size + 1 = {block + 1}")
        g = torch.Generator().manual_seed(seed)
        self.data, self.block = data, block
        self.offsets = torch.randint(0, data.numel() - block - 1, (n,), generator=g)

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int):
        w = self.data[self.offsets[i]: self.offsets[i] + self.block + 1].long()
        return w[:-1], w[1:]


class StdlibBytes(pl.LightningDataModule):
    """The standard library's source bytes as next-byte prediction windows (see the module docstring).

    The training set holds ``max_steps × batch_size × world_size`` windows, so every run of a given length
    sees the same batches in the same order; validation is ``val_batches`` fixed batches.
    """

    def __init__(self, batch_size: int = 16, val_batches: int = 4, seed: int = 1234, block_size: int = 128,
                 max_steps: int = 300) -> None:
        super().__init__()
        self.batch_size, self.val_batches, self.seed = batch_size, val_batches, seed
        self.block_size, self.max_steps = block_size, max_steps

    def setup(self, stage: str) -> None:
        train, val = stdlib_bytes()
        world = self.trainer.world_size if self.trainer is not None else 1
        self.train_set = _Windows(train, self.block_size, self.max_steps * self.batch_size * world, self.seed)
        self.val_set = _Windows(val, self.block_size, self.val_batches * self.batch_size, self.seed + 1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False)


# ----------------------------------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """nanoGPT's shape: token + position embeddings, pre-LN blocks, final LayerNorm, head tied to the
    token embedding. ``forward(idx)`` returns logits (B, T, vocab)."""

    def __init__(self, vocab_size: int = 256, block_size: int = 128, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"GPT: n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(_Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                # GPT-2: residual projections scaled down by sqrt(2 · n_layer)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class GPTLightning(pl.LightningModule):
    """``GPT`` trained with AdamW, linear warm-up then cosine decay to 10% of ``lr``; logs ``train_loss``
    (every step) and ``val_loss``, both averaged over ranks."""

    def __init__(self, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, block_size: int = 128,
                 vocab_size: int = 256, lr: float = 1e-3, warmup_steps: int = 30, weight_decay: float = 0.1,
                 max_steps: int = 300) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.95))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            t = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------ one run
_SECTIONS = ("model", "data", "trainer", "fakequant", "seed_everything", "threads", "out", "name")


def _merge(base: dict, changes: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if key not in _SECTIONS:
            raise ValueError(f"{where}: unknown section {key!r}; allowed: {', '.join(_SECTIONS)}")
        if isinstance(value, dict):
            out.setdefault(key, {})
            if not isinstance(out[key], dict):
                raise ValueError(f"{where}: {key!r} is not a section")
            out[key].update(value)
        else:
            out[key] = value
    return out


def _fit(cfg: dict, out_dir: Path, name: str, enable_progress_bar: bool = True) -> dict:
    """Train once with the merged config ``cfg``; logs go to ``out_dir/name/metrics.csv``. Returns the
    rank's final metrics and the callback."""
    from lightning.pytorch.loggers import CSVLogger

    from .lightning import FakeQuantCallback

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model_kw, data_kw, trainer_kw, fq_kw = (dict(cfg.get(k) or {}) for k in ("model", "data", "trainer", "fakequant"))
    max_steps = int(trainer_kw.get("max_steps", DEMO_DEFAULTS["trainer"]["max_steps"]))
    recipe = fq_kw.pop("recipe", None) or fq_kw.pop("config", None) or "bf16"
    callback = FakeQuantCallback(recipe, **fq_kw)
    pl.seed_everything(int(cfg.get("seed_everything", 1234)), verbose=False)
    module = GPTLightning(**model_kw, max_steps=max_steps)
    data = StdlibBytes(**data_kw, block_size=module.hparams.block_size, max_steps=max_steps)
    trainer_kw.setdefault("enable_checkpointing", False)
    trainer_kw.setdefault("enable_model_summary", False)
    trainer_kw.setdefault("enable_progress_bar", enable_progress_bar)
    trainer_kw.setdefault("num_sanity_val_steps", 0)
    trainer = pl.Trainer(**trainer_kw, callbacks=[callback],
                         logger=CSVLogger(save_dir=str(out_dir), name=name, version=""))
    trainer.fit(module, datamodule=data)
    final = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"metrics": final, "callback": callback, "rank": trainer.global_rank, "step": trainer.global_step,
            "log_dir": trainer.logger.log_dir}


# ---------------------------------------------------------------------------------------------- demo
def _check_recipes(recipes: list[str]) -> list[str]:
    from .config import FakeQuantConfig, recipe_names

    if not recipes:
        raise ValueError(f"--recipes: give at least one recipe ({', '.join(recipe_names())})")
    for r in recipes:
        FakeQuantConfig.from_recipe(r)  # a bad name fails here, listing the recipes, before any training
    if len(set(recipes)) != len(recipes):
        raise ValueError(f"--recipes: each recipe once, got {recipes}")
    return recipes


def run_demo(recipes=DEFAULT_RECIPES, steps: int | None = None, out: str | Path = "runs", devices: int = 1,
             accelerator: str = "cpu", threads: int = 0, progress_bar: bool = True, overrides: dict | None = None) -> dict:
    """Train the demo GPT once per recipe (same seed, same batches) and write the metrics, the plot and the
    summary under ``out``; returns {"summary": text, "failures": [...], "seconds": {recipe: s}, ...}."""
    recipes = _check_recipes(list(recipes))
    out = Path(out)
    base = _merge(DEMO_DEFAULTS, overrides or {}, "run_demo")
    if steps is not None:
        if steps < 10:
            raise ValueError(f"--steps must be >= 10, got {steps}")
        base["trainer"]["max_steps"] = steps
        base["trainer"]["val_check_interval"] = min(base["trainer"]["val_check_interval"], max(1, steps // 6))
        base["model"]["warmup_steps"] = min(base["model"]["warmup_steps"], max(1, steps // 10))
        base["fakequant"]["monitor_every_n_steps"] = min(base["fakequant"]["monitor_every_n_steps"], max(1, steps // 6))
    base["trainer"].update(devices=devices, accelerator=accelerator)
    if threads:
        base["threads"] = threads
    seconds, worst = {}, {}
    for recipe in recipes:
        cfg = copy.deepcopy(base)
        cfg["fakequant"]["recipe"] = recipe
        print(f"\n=== {recipe} ===", flush=True)
        t0 = time.perf_counter()
        result = _fit(cfg, out, recipe, enable_progress_bar=progress_bar)
        seconds[recipe] = time.perf_counter() - t0
        if result["rank"] != 0:
            continue
        worst[recipe] = result["callback"].monitor.worst(3)
        nonfinite = result["callback"].first_nonfinite
        if nonfinite is not None:
            worst[recipe] = [("non-finite", nonfinite.message, "", float("nan"))] + worst[recipe]
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        return {}
    summary, failures = _summarise(recipes, out, seconds, worst, base)
    return {"summary": summary, "failures": failures, "seconds": seconds, "out": out}


def _summarise(recipes: list[str], out: Path, seconds: dict, worst: dict, cfg: dict) -> tuple[str, list[str]]:
    from .compare_loss import check_gaps, format_table, gap_table, load_run, plot_runs, smooth

    train = [smooth(load_run(out / r, metric="train_loss", name=r), SMOOTH) for r in recipes]
    val = [load_run(out / r, metric="val_loss", name=r) for r in recipes]
    baseline = "bf16" if "bf16" in recipes else recipes[0]
    table = gap_table(train, baseline, WINDOW_FRAC)
    val_table = gap_table(val, baseline, WINDOW_FRAC)
    failures = check_gaps(table, TOLERANCE)
    png = plot_runs({f"train loss (trailing mean of {SMOOTH} steps)": train, "validation loss": val},
                    out / "loss_curves.png", baseline,
                    title=f"fakequant demo: GPT on the Python standard library, {cfg['trainer']['max_steps']} steps",
                    window=table.window)
    m, d = cfg["model"], cfg["data"]
    lines = [
        "# fakequant demo",
        "",
        f"GPT ({m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads, context {m['block_size']} bytes) "
        f"trained {cfg['trainer']['max_steps']} steps of {d['batch_size']} sequences on the Python "
        f"{sys.version_info.major}.{sys.version_info.minor} standard library sources (byte-level), "
        f"seed {cfg['seed_everything']}, same batches for every recipe.",
        "",
        f"Verdict: a recipe is **ok** when its mean training-loss gap to {baseline} over the last "
        f"{WINDOW_FRAC:.0%} of the steps is at most {TOLERANCE:.0%} (`fakequant.demo.TOLERANCE`). Training loss: "
        f"trailing mean over {SMOOTH} steps of each step's batch loss (the same batches in every run).",
        "",
        "## Training loss",
        "",
        format_table(table, TOLERANCE),
        "",
        "## Validation loss",
        "",
        format_table(val_table),
        "",
        "## Lowest SQNR operands at the last monitored step (which layer hurts)",
        "",
        "| recipe | layer | operand | SQNR dB |",
        "|---|---|---|---|",
    ]
    for r in recipes:
        rows = worst.get(r) or []
        if not rows:
            lines.append(f"| {r} | - | - | (nothing quantized) |")
        for layer, gemm, role, db in rows:
            if layer == "non-finite":
                lines.append(f"| {r} | {gemm} | | |")
            else:
                lines.append(f"| {r} | {layer} | {gemm}.{role} | {db:.1f} |")
    lines += ["", "## Wall time", "", "| recipe | seconds |", "|---|---|"]
    lines += [f"| {r} | {seconds[r]:.0f} |" for r in recipes]
    lines += ["", f"Plot: `{png.name}`. Compare again with: `fakequant compare-loss "
              + " ".join(f"{out}/{r}" for r in recipes) + f" --smooth {SMOOTH} --max-gap {TOLERANCE}`", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text, failures


# ---------------------------------------------------------------------------------------------- train
def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def dotted_overrides(pairs: list[str], where: str) -> dict:
    """``["--trainer.devices", "2", "--fakequant.recipe=mxfp4"]`` -> ``{"trainer": {"devices": 2}, ...}``."""
    out: dict = {}
    i = 0
    while i < len(pairs):
        arg = pairs[i]
        if not arg.startswith("--"):
            raise ValueError(f"{where}: unexpected argument {arg!r}; overrides look like --trainer.devices 2")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(pairs):
                raise ValueError(f"{where}: {arg} needs a value")
            value, i = pairs[i + 1], i + 1
        i += 1
        section, dot, field = key.partition(".")
        if section not in _SECTIONS:
            raise ValueError(f"{where}: unknown section {section!r} in {arg}; allowed: {', '.join(_SECTIONS)}")
        if dot:
            out.setdefault(section, {})[field] = _parse_value(value)
        else:
            out[section] = _parse_value(value)
    return out


def load_train_config(path: str | Path, overrides: dict | None = None) -> dict:
    """The merged training config of a YAML file: a LightningCLI-style file (sections ``model``, ``data``,
    ``trainer``, ``fakequant``, ``seed_everything``, ``threads``, ``out``, ``name``) over ``DEMO_DEFAULTS``, or a
    plain recipe file (``FakeQuantConfig`` keys), trained with the demo's settings."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping, got {type(data).__name__}")
    if data and not set(data) <= set(_SECTIONS):
        from .config import FakeQuantConfig

        FakeQuantConfig.from_yaml(path)  # a recipe file: validate it (errors name the file and key)
        data = {"fakequant": {"recipe": str(path)}, "name": path.stem}
    return _merge(_merge(DEMO_DEFAULTS, data, str(path)), overrides or {}, "overrides")


def train_from_config(path: str | Path, overrides: dict | None = None) -> dict:
    cfg = load_train_config(path, overrides)
    out = Path(cfg.get("out") or "runs")
    recipe = cfg["fakequant"].get("recipe", "bf16")
    name = cfg.get("name") or f"{Path(path).stem}_{Path(str(recipe)).stem}"  # gpt_stdlib_mxfp8
    return _fit(cfg, out, name)
