"""The quantization-error report: every format on built-in tensors, as a table (``fakequant report``).

Built-in tensors are generated from a fixed seed (no download): Gaussian, heavy-tailed (Student t, 3 degrees
of freedom) and activations with outlier rows and channels, the three shapes of data that separate formats
with a per-block scale from those with a per-tensor one.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from .dispatch import quant_dequant
from .metrics import REPORT_FORMATS, error_stats
from .qtype import QType

__all__ = ["builtin_tensors", "error_table", "format_table", "register"]


def builtin_tensors(rows: int = 256, cols: int = 1024, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(rows, cols, generator=g)
    # Student t with 3 dof = normal / sqrt(chi2_3 / 3), drawn from normals so the generator is reused.
    chi2 = torch.randn(rows, cols, 3, generator=g).square().sum(-1)
    heavy = torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()
    outliers = torch.randn(rows, cols, generator=g)
    outliers[torch.randperm(rows, generator=g)[: rows // 32]] *= 100.0  # a few rows of large activations
    outliers[:, torch.randperm(cols, generator=g)[:4]] *= 30.0  # and a few outlier channels
    return {"gaussian": gaussian, "heavy_tailed": heavy, "outlier_rows": outliers}


def error_table(formats: list[str], tensors: dict[str, Tensor], dim: int = -1) -> list[dict]:
    rows = []
    for name, x in tensors.items():
        for fmt in formats:
            q = QType(fmt).dim(dim)
            rows.append({"tensor": name, "format": str(q), **error_stats(x, quant_dequant(x, q))})
    return rows


def format_table(rows: list[dict], columns: tuple[str, ...] = ("tensor", "format", "sqnr_db", "mse",
                                                                "max_abs_err")) -> str:
    """A Markdown table; numbers in 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        QType(f)  # fail on a bad name before any work
    rows = error_table(formats, builtin_tensors(seed=args.seed), dim=args.dim)
    print(f"fakequant error report: built-in tensors 256x1024, seed {args.seed}, quantized along dim {args.dim}")
    print(format_table(sorted(rows, key=lambda r: (r["tensor"], -r["sqnr_db"]))))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="quantization error of every format on built-in tensors")
    p.add_argument("--formats", default=",".join(REPORT_FORMATS), help="comma-separated QType strings")
    p.add_argument("--dim", type=int, default=-1, help="quantization axis (default -1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
