"""The ``fakequant demo`` and ``fakequant train`` subcommands (the work is in ``fakequant.demo``).

Kept apart from ``fakequant.demo`` so that building the ``fakequant`` parser does not import Lightning; the
handlers import it when they run.

``fakequant train`` takes LightningCLI-style overrides after ``--config``: ``--trainer.devices 2``,
``--trainer.strategy=ddp``, ``--fakequant.recipe mxfp4``, ``--model.n_layer 2``; values are read as YAML
(``2`` is an int, ``null`` is None).
"""

from __future__ import annotations

import argparse
import time

__all__ = ["register"]

_DEFAULT_RECIPES = "bf16,mxfp8,mxfp4,hif8,hif4,nvfp4"  # = fakequant.demo.DEFAULT_RECIPES (checked by a test)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    t0 = time.perf_counter()
    result = run_demo(recipes, args.steps, args.out, args.devices, args.accelerator, args.threads)
    _close_distributed()
    if not result:  # a non-zero rank of a multi-device run: rank zero writes the summary
        return 0
    print("\n" + result["summary"])
    print(f"wrote {result['out']}/summary.md, {result['out']}/loss_curves.png and "
          f"{result['out']}/<recipe>/metrics.csv; demo wall time {time.perf_counter() - t0:.0f} s")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .demo import dotted_overrides, train_from_config

    result = train_from_config(args.config, dotted_overrides(args.overrides, "fakequant train"))
    m = result["metrics"]
    print(f"rank {result['rank']}: step {result['step']} train_loss {m.get('train_loss', float('nan')):.6f} "
          f"val_loss {m.get('val_loss', float('nan')):.6f} (logs: {result['log_dir']})", flush=True)
    _close_distributed()
    return 0


def _close_distributed() -> None:
    """End the process group of a multi-device run on every rank once all its training is done. Lightning
    leaves it open; a gloo group still open when the interpreter shuts down can abort a rank after a run that
    finished ("terminate called without an active exception", seen in about one run in ten). The barrier
    lets every rank reach this point before any tears its connections down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _DottedOverridesParser(argparse.ArgumentParser):
    """Keeps the arguments it does not know (``--section.key VALUE``) in ``overrides`` instead of refusing
    them; ``fakequant.demo.dotted_overrides`` checks them with messages naming the allowed sections."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        namespace.overrides = list(extra)
        return namespace, []


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="train a small GPT on the Python standard library once per recipe and compare the losses",
        description="Train the same small byte-level GPT on the Python standard library's sources once per "
                    "recipe (same seed and batches), then write <out>/<recipe>/metrics.csv, "
                    "<out>/loss_curves.png and <out>/summary.md (about 10 minutes on a 2-core CPU).")
    p.add_argument("--recipes", default=_DEFAULT_RECIPES,
                   help=f"comma-separated recipe names or .yaml paths (default {_DEFAULT_RECIPES})")
    p.add_argument("--steps", type=int, default=None, help="training steps per recipe (default 300)")
    p.add_argument("--out", default="runs", help="output folder (default runs)")
    p.add_argument("--devices", type=int, default=1, help="devices per run (Lightning Trainer devices, default 1)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto, ... (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=_run_demo)

    t = subparsers.add_parser(
        "train", help="one training run from a LightningCLI-style YAML (model, data, trainer, fakequant)",
        description="Train the demo GPT from a YAML config with sections model, data, trainer, fakequant (recipe, "
                    "start_step, monitor_every_n_steps, stop_on_nonfinite), seed_everything, threads, out, name; "
                    "or from a plain recipe file. Override any key with --section.key VALUE, e.g. "
                    "--trainer.devices 2 --trainer.strategy ddp --fakequant.recipe mxfp4.")
    t.__class__ = _DottedOverridesParser
    t.add_argument("--config", required=True,
                   help="YAML file (e.g. recipes/train/gpt_stdlib.yaml, or a recipe such as recipes/mxfp8.yaml)")
    t.set_defaults(func=_run_train)
