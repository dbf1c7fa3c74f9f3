"""CPU throughput of the plain-torch reference, one QType per family (issue: foundation, item 9).

Prints MB/s of *input* for a 4096x4096 float32 tensor and its bf16 copy, the median of a few runs, with
the torch version and core count, and each family's speed as a fraction of the fastest.

    python scripts/bench_reference.py [--size 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fakequant
from fakequant import QType

FAMILIES = {
    "mx": "mxfp8e4m3", "mx (fp4)": "mxfp4", "mx int": "e0m7k8b32c", "mx_hier": "e2m1K1k3B2b16off20",
    "hifx": "hifx4_v12", "tmx": "tmx6", "hif8": "hif8", "hif4": "hif4", "nvf4": "nvf4", "nvfp4": "nvfp4",
    "nf4": "nf4", "nf4_double": "nf4B4b16", "int8sym": "int8sym", "cast": "bf16",
}


def throughput(x: torch.Tensor, q: QType, repeat: int) -> float:
    fakequant.quant_dequant(x[:64], q)  # warm-up (imports, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fakequant.quant_dequant(x, q, backend="torch")
        times.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / statistics.median(times) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"tensor {args.size}x{args.size}")
    x32 = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for family, name in FAMILIES.items():
        q = QType(name)
        rows.append((family, name, throughput(x32, q, args.repeat), throughput(x32.bfloat16(), q, args.repeat)))
    fastest = max(r[2] for r in rows)
    print("| family | qtype | fp32 MB/s | bf16 MB/s | fp32 / fastest |")
    print("|---|---|---|---|---|")
    for family, name, f32, b16 in rows:
        print(f"| {family} | {name} | {f32:.0f} | {b16:.0f} | {f32 / fastest:.2f} |")
    print(f"slowest fp32: {min(r[2] for r in rows):.0f} MB/s; slowest bf16: {min(r[3] for r in rows):.0f} MB/s")


if __name__ == "__main__":
    main()
