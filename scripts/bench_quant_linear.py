"""The fused 4-bit-weight linear kernel vs a bf16 ``torch.nn.functional.linear`` of the same shape (GPU).

    python scripts/bench_quant_linear.py                             # 4096x4096 and 8192x8192, batch 1-16, 4096
    python scripts/bench_quant_linear.py --format nvfp4 --json out.json

For each weight shape N x K and batch M: the weight is packed (``fakequant.packing.pack``), the kernel is tuned
for the batch bucket (``fakequant.kernels.triton.quant_linear``), its output is checked against the float64
product of the same bf16 activations and dequantized weight (relative L2), and both ops are timed in the same
run on the same activations:

* **graph**: a CUDA graph of R back-to-back calls, each on its own copy of the weight (R copies span at least
  3x the L2 cache, so every call streams its weight from HBM), replayed; median over trials, per call.
  This is the GPU time of the op itself, the figure the ratios use.
* **events**: ``triton.testing.do_bench`` (L2 flushed before each call, one launch per call): adds the host
  launch cost, which matters at batch 1-16 where the ops take a few microseconds.
* **launch**: an empty Triton kernel, same graph timing: the fixed cost every call pays.
* **read floor**: per weight shape, the fastest of a few plain streaming kernels that only read the packed bytes
  (codes and scales, cold, same graph timing) and xor them: no fused kernel can beat it, so it says how much
  of a target time is left for decoding and multiplying.

"fused" is the fastest fused-kernel configuration the tuner measured (with MX weights on Hopper, usually the
Gluon kernel of ``quant_linear_gluon`` at batch <= 16 and that of ``quant_linear_wgmma`` at batch 4096);
"auto" is what ``QuantLinear`` runs, the tuner's overall choice, which at large batches may be the
dequantize-then-cuBLAS path. Calls pass the largest scale byte, as ``QuantLinear`` does.

Prints the GPU name, torch / triton / CUDA versions, and a table with times, ratio (F.linear time / fused time),
achieved TFLOP/s and weight GB/s, the tuned configuration and the relative error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from fakequant.kernels.triton import quant_linear as qlk
from fakequant.packing import pack


def graph_time_us(fn_list, trials: int = 7, replays: int = 10) -> float:
    """Median per-call GPU time (us) of the calls in ``fn_list`` captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fn_list:  # warm up (allocations, lazy init) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fn_list:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (replays * len(fn_list)))
    return statistics.median(times)


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, n_words, CHUNK: tl.constexpr, ITERS: tl.constexpr):
    """Read ITERS contiguous chunks of CHUNK int32 words per program and write their xor: a pure read."""
    base = tl.program_id(0) * CHUNK * ITERS
    acc = tl.full((CHUNK,), 0, tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * CHUNK + tl.arange(0, CHUNK)
        acc ^= tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


# (words per chunk, chunks per program, warps): the best of a wider sweep on an H100 for 8.9 and 35.6 MB.
_STREAM_CONFIGS = [(1024, 1, 4), (512, 2, 4), (2048, 1, 4), (1024, 4, 8), (2048, 2, 8), (4096, 1, 8)]


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr, 1)


def read_floor_us(blobs: list[torch.Tensor]) -> float:
    """Fastest graph time (us per call) of reading one of ``blobs`` (int32, each its own copy) end to end."""
    n_words = blobs[0].numel()
    out = torch.empty(triton.cdiv(n_words, 512), dtype=torch.int32, device=blobs[0].device)
    best = float("inf")
    for chunk, iters, warps in _STREAM_CONFIGS:
        grid = (triton.cdiv(n_words, chunk * iters),)
        calls = [lambda b=b, g=grid, c=chunk, i=iters, w=warps:
                 _stream_read_kernel[g](b, out, n_words, CHUNK=c, ITERS=i, num_warps=w) for b in blobs]
        best = min(best, graph_time_us(calls))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,8192x8192", help="N x K weight shapes")
    parser.add_argument("--batches", default="1,2,4,8,16,4096")
    parser.add_argument("--format", default="mxfp4", choices=["mxfp4", "nvfp4", "nvf4"])
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_linear needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB); torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}; format {args.format}")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    launch = graph_time_us([lambda: _empty_kernel[(1,)](flag) for _ in range(20)])
    print(f"an empty Triton kernel in the same graph timing: {launch:.2f} us per launch")
    e4m3 = args.format != "mxfp4"
    block = 16 if e4m3 else 32
    rows = []
    header = (f"{'N x K':>11} {'M':>5} | {'F.linear':>9} {'fused':>9} {'ratio':>6} | {'auto':>9} {'ratio':>6} | "
              f"{'F.lin ev':>9} {'fused ev':>9} {'ratio':>6} | {'TFLOP/s':>7} {'w GB/s':>7} | {'rel L2':>8} | fused config")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") * 0.02
        p = pack(w, args.format)
        w_bf16 = p.unpack().to(torch.bfloat16)  # the same weight F.linear multiplies
        packed_bytes = p.codes.numel() + p.scales.numel()
        r_lin = max(2, math.ceil(3 * l2 / (w_bf16.numel() * 2)))
        r_q = max(2, math.ceil(3 * l2 / packed_bytes))
        lin_w = [w_bf16.clone() for _ in range(r_lin)]
        q_w = [(p.codes.clone(), p.scales.clone()) for _ in range(r_q)]
        gs = p.tensor_scale
        max_byte = None if e4m3 else int(p.scales.max())  # what QuantLinear passes (its cached maximum)
        blob = torch.cat([p.codes.flatten(), p.scales.flatten(),
                          torch.zeros(-packed_bytes % 4, dtype=torch.uint8, device="cuda")]).view(torch.int32)
        floor = read_floor_us([blob.clone() for _ in range(r_q)])
        print(f"{n:>5} x{k:>5} read floor: {floor:.2f}u to read the {packed_bytes / 1e6:.2f} MB of packed weight "
              f"({packed_bytes / floor / 1e3:.0f} GB/s)", flush=True)
        for m in (int(v) for v in args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qlk.quant_linear(x, p.codes, p.scales, block=block, e4m3=e4m3, tensor_scale=gs,
                             max_scale_byte=max_byte)  # tunes this bucket
            key = (qlk._m_bucket(m), n, k, block, e4m3, x.dtype, False)
            auto_cfg = qlk.tuned_config(key)
            fused = [(c, ms) for c, ms in qlk._TIMINGS.get(key, []) if not c.dequant_gemm]
            cfg = min(fused, key=lambda item: item[1])[0]  # the fastest fused configuration
            y = qlk.quant_linear(x, p.codes, p.scales, block=block, e4m3=e4m3, tensor_scale=gs, config=cfg,
                                 max_scale_byte=max_byte)
            ref = x.double() @ w_bf16.double().T
            rel = float((y.double() - ref).norm() / ref.norm())

            def run(c, i):
                return qlk.quant_linear(x, *q_w[i], block=block, e4m3=e4m3, tensor_scale=gs, config=c,
                                        max_scale_byte=max_byte)

            t_lin = graph_time_us([lambda i=i: F.linear(x, lin_w[i]) for i in range(r_lin)])
            t_q = graph_time_us([lambda i=i: run(cfg, i) for i in range(r_q)])
            t_auto = t_q if auto_cfg == cfg else graph_time_us([lambda i=i: run(auto_cfg, i) for i in range(r_q)])
            ev_lin = 1000 * triton.testing.do_bench(lambda: F.linear(x, w_bf16), return_mode="median")
            ev_q = 1000 * triton.testing.do_bench(lambda: run(cfg, 0), return_mode="median")
            tflops = 2 * m * n * k / t_q / 1e6
            gbs = packed_bytes / t_q / 1e3
            row = dict(gpu=props.name, n=n, k=k, m=m, format=args.format, flinear_us=t_lin, read_floor_us=floor,
                       fused_us=t_q,
                       ratio=t_lin / t_q, auto_us=t_auto, ratio_auto=t_lin / t_auto, auto_dequant_gemm=auto_cfg.dequant_gemm,
                       flinear_events_us=ev_lin, fused_events_us=ev_q, ratio_events=ev_lin / ev_q,
                       fused_tflops=tflops, weight_gbs=gbs, rel_l2=rel, config=cfg._asdict(),
                       tuner_ms=[(c._asdict(), ms) for c, ms in qlk._TIMINGS.get(key, [])],
                       refused=[(c._asdict(), str(why)) for c, why in qlk._REFUSED.get(key, [])])
            rows.append(row)
            c = cfg
            flags = [name for name in ("decode_asm", "swap_ab", "gluon", "wgmma") if getattr(c, name)]
            ctext = (f"{c.block_m}x{c.block_n}x{c.block_k} sk{c.split_k} w{c.num_warps} s{c.num_stages} "
                     f"{' '.join(flags)}{f' kw{c.k_warps}' if c.k_warps > 1 else ''}").rstrip()
            atext = "dq+gemm" if auto_cfg.dequant_gemm else "fused"
            print(f"{n:>5} x{k:>5} {m:>5} | {t_lin:>8.1f}u {t_q:>8.1f}u {t_lin / t_q:>6.2f} | {t_auto:>8.1f}u "
                  f"{t_lin / t_auto:>6.2f} | {ev_lin:>8.1f}u {ev_q:>8.1f}u {ev_lin / ev_q:>6.2f} | {tflops:>7.1f} "
                  f"{gbs:>7.0f} | {rel:>8.1e} | {ctext} (auto: {atext})", flush=True)
    refused = {(r["n"], r["k"], r["m"]): r["refused"] for r in rows if r["refused"]}
    if refused:
        print("configurations the tuner refused (wrong output or failed to run):")
        for key, items in refused.items():
            for cfg, why in items:
                print(f"  {key}: {cfg} -> {why[:120]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
