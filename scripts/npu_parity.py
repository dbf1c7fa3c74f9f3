"""Bit-for-bit parity of the NPU code path (``fakequant_npu.portable``) with the reference, at volume.

For every format family, random and adversarial tensors (``tests.test_npu_backend.adversarial``: wide
scales, raw bit patterns, ties, format limits, scale-rule boundaries, NaN/inf inside blocks, zero rows,
subnormals, huge values, ulp nudges) are quantized by both, cycling through the family's QTypes
(``PARITY_QTYPES``), float32 / bfloat16 / float16 inputs, both axes, and three tile sizes, until at least
``--elements`` elements per family have been compared. NaN equals NaN; -0 and +0 differ.

    python scripts/npu_parity.py                      # 10^7 elements per family
    python scripts/npu_parity.py --elements 200000 --families mx,nvfp4

Exit status 1 if any element differs.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fakequant import QType  # noqa: E402
from fakequant.formats import reference_quant_dequant  # noqa: E402
from fakequant_npu import portable  # noqa: E402
from tests.conftest import bitwise_mismatches  # noqa: E402
from tests.test_npu_backend import PARITY_QTYPES, adversarial  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILES = (None, 4099, 65536)  # default (2^20), odd small, medium


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run_family(family: str, target: int, seed: int, chunk: int) -> tuple[int, int, int, list[str], float]:
    """Compare until ``target`` elements; returns (elements, comparisons, mismatches, failures, seconds)."""
    start = time.perf_counter()
    elements = comparisons = mismatches = 0
    failures: list[str] = []
    # the QType changes fastest, so every QType of the family meets every dtype / axis / tile size early
    combos = itertools.cycle(itertools.product(TILES, (-1, 0), DTYPES, PARITY_QTYPES[family]))
    step = 0
    while elements < target:
        tiles, dim, dtype, desc = next(combos)
        q = QType(desc).dim(dim)
        block = q.block_len or 64
        cols = max(block, (1024 // block) * block) + 1 + step % 13  # ragged last block
        rows = max(1, chunk // cols)
        x = adversarial(rows, cols, seed=seed + 7919 * step)
        if dim == 0:
            x = x.t().contiguous()  # the axis of length `cols` first
        x = x.to(dtype)
        bad = bitwise_mismatches(portable.quant_dequant(x, q, tile_elements=tiles), reference_quant_dequant(x, q))
        elements += x.numel()
        comparisons += 1
        if bad:
            mismatches += bad
            failures.append(f"{q} {dtype} tiles={tiles} seed={seed + 7919 * step}: {bad} elements")
        step += 1
    return elements, comparisons, mismatches, failures, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=float, default=1e7, help="elements per family (default 1e7)")
    parser.add_argument("--families", default=",".join(PARITY_QTYPES), help="comma-separated families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=1 << 16, help="elements per comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: no oversubscription)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(PARITY_QTYPES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(PARITY_QTYPES)}")
    torch.set_num_threads(args.threads)
    print(f"fakequant {_commit()}  torch {torch.__version__}  python {platform.python_version()}  "
          f"{platform.machine()}  threads {torch.get_num_threads()}")
    print(f"NPU code path (fakequant_npu.portable, CPU tensors) vs reference; >= {int(args.elements):,} elements "
          f"per family; dtypes fp32/bf16/fp16, dims -1/0, tiles default/4099/65536")
    print(f"{'family':<11} {'qtypes':>6} {'elements':>12} {'comparisons':>11} {'mismatches':>10} {'seconds':>8}")
    total_bad = 0
    for family in families:
        n, c, bad, failures, secs = run_family(family, int(args.elements), args.seed, args.chunk)
        total_bad += bad
        print(f"{family:<11} {len(PARITY_QTYPES[family]):>6} {n:>12,} {c:>11,} {bad:>10,} {secs:>8.1f}", flush=True)
        for line in failures[:5]:
            print(f"    MISMATCH {line}")
    print("PASS: every element equal bit for bit" if total_bad == 0 else f"FAIL: {total_bad:,} elements differ")
    return 0 if total_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
