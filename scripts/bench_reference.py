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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"tensor {args.size}x{args.size}")
    x32 = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for family, name in FAMILIES.items():
        q = QType(name)
        rows.append((family, name, throughput(x32, q, args.repeat), throughput(x32.bfloat16(), q, args.repeat)))
    # The cast family is a dtype conversion (no quantizer; bf16 -> bf16 is a no-op), so it is listed but
    # not the yardstick for "fastest".
    fastest = max(r[2] for r in rows if r[0] != "cast")
    print("| family | qtype | fp32 MB/s | bf16 MB/s | fp32 / fastest |")
    print("|---|---|---|---|---|")
    for family, name, f32, b16 in rows:
        print(f"| {family} | {name} | {f32:.0f} | {b16:.0f} | {f32 / fastest:.2f} |")
    slow32 = min(rows, key=lambda r: r[2])
    slow16 = min(rows, key=lambda r: r[3])
    print(f"slowest fp32: {slow32[0]} {slow32[2]:.0f} MB/s ({slow32[2] / fastest:.2f} of the fastest quantizer); "
          f"slowest bf16: {slow16[0]} {slow16[3]:.0f} MB/s")


if __name__ == "__main__":
    main()
