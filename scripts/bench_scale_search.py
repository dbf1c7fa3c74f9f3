"""MSE-optimal E8M0 scale search vs the plain loop over all 254 scales, on CPU, and the error it saves.

    python scripts/bench_scale_search.py                      # 4096 x 4096 Gaussian, full naive loop (minutes)
    python scripts/bench_scale_search.py --naive-rows 512     # naive loop on the first 512 rows, scaled up

Prints torch's version and thread count, the wall and process-CPU time (CPU time is the steadier figure on a
shared machine) of ``mse_scales`` (median of --repeat runs) and of
``naive_mse_scales`` (one run; with --naive-rows < rows its time is scaled by rows / naive-rows, which is
exact up to noise since the loop's cost is linear in the rows), their ratio, that both chose scales with
the same block errors on the rows both saw, and the mean squared error of mxfp4 with floor (OCP), round
(the mxfp4 default), ceil and MSE scales on the tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fakequant
from fakequant import QType
from fakequant.scale_search import mse_scales, naive_mse_scales, quant_dequant_mse, quant_dequant_scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--naive-rows", type=int, default=None, help="rows for the naive loop (default: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--format", default="mxfp4")
    args = parser.parse_args()
    q = QType(args.format)
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.format} on {args.rows}x{args.cols} "
          f"Gaussian weights")

    times, cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fast = mse_scales(w, q)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t_fast, c_fast = statistics.median(times), statistics.median(cpu)

    n = args.naive_rows or args.rows
    t0, c0 = time.perf_counter(), time.process_time()
    slow = naive_mse_scales(w[:n], q)
    t_slow = (time.perf_counter() - t0) * args.rows / n
    c_slow = (time.process_time() - c0) * args.rows / n
    err = lambda s: ((quant_dequant_scaled(w[:n], q, s) - w[:n]).double() ** 2).reshape(n, -1, q.blk_size).sum(-1)  # noqa: E731
    same = torch.equal(err(fast[:n]), err(slow))
    scaled = "" if n == args.rows else f" (timed on {n} rows, x{args.rows / n:g})"
    print(f"mse_scales        {t_fast:8.3f} s wall {c_fast:8.3f} s CPU  (median of {args.repeat})")
    print(f"naive 254-scale   {t_slow:8.3f} s wall {c_slow:8.3f} s CPU{scaled}")
    print(f"speed-up          {t_slow / t_fast:8.1f}x wall {c_slow / c_fast:6.1f}x CPU   same block errors as the naive "
          f"loop: {same}")

    mse = {
        "floor (OCP)": fakequant.quant_dequant(w, q.scale("floor")),
        "round (mxfp4 default)": fakequant.quant_dequant(w, q.scale("round")),
        "ceil": fakequant.quant_dequant(w, q.scale("ceil")),
        "mse": quant_dequant_mse(w, q),
    }
    mse = {k: float(((v - w).double() ** 2).mean()) for k, v in mse.items()}
    for k, v in mse.items():
        print(f"MSE {k:22s} {v:.6e}   mse scales save {100 * (1 - mse['mse'] / v):5.2f}%")


if __name__ == "__main__":
    main()
