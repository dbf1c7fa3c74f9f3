"""GPU throughput of the Triton kernels next to a plain copy, the torch reference and torch.compile of it.

For every family, axis -1 and 0, bfloat16 and float32, on an 8192 x 8192 tensor: median time
(``triton.testing.do_bench``), GB/s counting one read and one write of the tensor, % of a plain copy
(``y.copy_(x)``, same dtype and size, measured in the same run), and the speed-ups over the plain-torch
reference and over ``torch.compile`` of the reference. Prints the GPU, torch and triton versions first and a
table last; ``--json`` writes every number.

    python scripts/bench_kernels.py                      # the table (torch.compile included)
    python scripts/bench_kernels.py --no-compile         # skip torch.compile (it compiles one graph per row)
    python scripts/bench_kernels.py --sweep --json s.json  # time each tile configuration of each kernel
    python scripts/bench_kernels.py --families mx hif8 --dtypes bf16

The Triton numbers go through ``fakequant.quant_dequant(x, q, backend="triton")`` (dispatch included), after a
check that the result equals the reference bit for bit on the benchmark tensor itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

# The formats benchmarked per family (the bench baseline list; tests use the same names).
FAMILIES = {
    "mx": "mxfp8e4m3",
    "mx_fp4": "mxfp4",
    "hif8": "hif8",
    "hif4": "hif4",
    "hifx": "hifx4_v12",
    "tmx": "tmx6",
    "nvf4": "nvf4",
    "nvfp4": "nvfp4",
    "nf4": "nf4",
    "int8sym": "int8sym",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Tile configurations tried by --sweep: row mode (axis -1) as (elements per tile, warps), so that one list
# serves every block size; column mode as (columns, blocks along the axis, warps); hif8 (elementwise) as
# (elements, warps); int8sym as (rows, chunk, warps) along -1 and (columns, chunk, warps) along 0.
ROW_SWEEP = [(512, 2), (1024, 2), (1024, 4), (2048, 4), (4096, 4)]
COL_SWEEP = [(32, 1, 1), (64, 2, 4), (128, 1, 4), (256, 1, 8), (512, 1, 4), (64, 4, 4),
             # (columns, blocks, warps, scalar): unvectorised columns, whole block columns per thread
             (32, 1, 1, True), (64, 1, 2, True), (128, 1, 4, True), (128, 2, 4, True), (256, 1, 8, True),
             (128, 4, 4, True), (64, 4, 2, True)]
HIF8_SWEEP = [(1024, 2), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]
INT8_ROW_SWEEP = [(1, 8192, 2), (1, 8192, 4), (1, 8192, 8)]
INT8_COL_SWEEP = [(16, 256, 4), (32, 256, 8), (16, 1024, 8), (128, 64, 4, True), (256, 32, 8, True),
                  (128, 128, 4, True), (64, 128, 2, True), (32, 256, 1, True)]


def _launcher(family: str):
    from fakequant.dispatch import TRITON_KERNELS

    import importlib

    module, func = TRITON_KERNELS[family].split(":")
    return getattr(importlib.import_module(f"fakequant.kernels.triton.{module}"), func)


_SMOKE = []  # set by --smoke: CPU under TRITON_INTERPRET=1, wall-clock timing (checks the script, not speed)


def _time(fn) -> float:
    if _SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _gbps(nbytes: int, ms: float) -> float:
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _tile(family: str, q, axis: int, cfg) -> tuple[int, int, int]:
    block = q.block_len or 1
    if family == "hif8":
        return (cfg[0], 1, cfg[1])
    if family == "int8sym":
        return cfg
    if axis == -1:
        elems, warps = cfg
        return (max(1, elems // block), 1, warps)
    cols, nblk, warps = cfg[:3]
    return (nblk, cols, warps) + tuple(cfg[3:])


def _sweep_list(family: str, axis: int):
    if family == "hif8":
        return HIF8_SWEEP if axis == -1 else []
    if family == "int8sym":
        return INT8_ROW_SWEEP if axis == -1 else INT8_COL_SWEEP
    return ROW_SWEEP if axis == -1 else COL_SWEEP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--axes", nargs="*", type=int, default=[-1, 0])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--no-reference", action="store_true", help="skip the eager reference too")
    parser.add_argument("--compile-budget", type=float, default=420.0,
                        help="stop compiling new torch.compile graphs after this many seconds")
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration (no baselines)")
    parser.add_argument("--pair", action="store_true",
                        help="also time the fused two-axis MX kernel against two single-axis calls")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--smoke", action="store_true",
                        help="run on CPU under TRITON_INTERPRET=1 (set it yourself) to check the script")
    args = parser.parse_args()
    if args.smoke:
        _SMOKE.append(True)

    import triton

    import fakequant
    from fakequant import QType
    from fakequant.formats import reference_quant_dequant

    if args.smoke:
        dev = torch.device("cpu")
        gpu = "none (--smoke: CPU interpreter)"
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        gpu = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    header = (f"GPU: {gpu}; "
              f"torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}; "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(header, flush=True)
    n = args.size
    results = {"header": header, "size": n, "rows": [], "sweep": []}
    copy_ms = {}
    for dname in args.dtypes:
        x = torch.randn(n, n, device=dev, dtype=DTYPES[dname])
        y = torch.empty_like(x)
        copy_ms[dname] = _time(lambda: y.copy_(x))
        gb = _gbps(x.numel() * x.element_size(), copy_ms[dname])
        print(f"copy {dname}: {copy_ms[dname]:.4f} ms, {gb:.0f} GB/s", flush=True)
        results["copy_" + dname] = {"ms": copy_ms[dname], "gbps": gb}
        del x, y

    t_compile_spent = 0.0
    rows = []
    for fam in args.families:
        name = FAMILIES[fam]
        kernel_family = QType(name).family
        for dname in args.dtypes:
            torch.manual_seed(0)
            x = torch.randn(n, n, device=dev, dtype=DTYPES[dname])
            nbytes = x.numel() * x.element_size()
            for axis in args.axes:
                q = QType(name).dim(axis)
                want = reference_quant_dequant(x, q)
                if args.sweep:
                    launcher = _launcher(kernel_family)
                    for cfg in _sweep_list(kernel_family, axis):
                        tile = _tile(kernel_family, q, axis, cfg)
                        if axis != -1 and kernel_family not in ("hif8", "int8sym") and \
                                tile[0] * tile[1] * (q.block_len or 1) > 16384:
                            continue  # too many elements per program for registers
                        try:
                            got = launcher(x, q, tile=tile)
                            ok = bool(((got == want) | (got.isnan() & want.isnan())).all())
                            ms = _time(lambda: launcher(x, q, tile=tile))
                        except Exception as err:  # a configuration that does not compile (resources)
                            print(f"sweep {fam} {dname} axis {axis} tile {tile}: failed {type(err).__name__}: "
                                  f"{str(err)[:120]}", flush=True)
                            continue
                        pct = 100 * copy_ms[dname] / ms
                        print(f"sweep {fam:8s} {dname} axis {axis:2d} tile {str(tile):16s} {ms:.4f} ms "
                              f"{_gbps(nbytes, ms):6.0f} GB/s {pct:5.1f}% of copy{'' if ok else '  MISMATCH'}",
                              flush=True)
                        results["sweep"].append({"family": fam, "dtype": dname, "axis": axis, "tile": tile,
                                                 "ms": ms, "pct_copy": pct, "exact": ok})
                    del want
                    continue
                got = fakequant.quant_dequant(x, q, backend="triton")
                exact = bool(((got == want) | (got.isnan() & want.isnan())).all())
                del got
                ms = _time(lambda: fakequant.quant_dequant(x, q, backend="triton"))
                row = {"family": fam, "qtype": name, "dtype": dname, "axis": axis, "triton_ms": ms,
                       "gbps": _gbps(nbytes, ms), "pct_copy": 100 * copy_ms[dname] / ms, "exact": exact}
                if kernel_family == "nvfp4":  # the block pass alone, given the tensor maximum
                    from fakequant.kernels.triton import nvfp

                    row["nvfp4_amax_pass_ms"] = _time(lambda: nvfp.tensor_amax(x))
                    amax_f = nvfp.tensor_amax(x).view(torch.float32)
                    row["nvfp4_given_amax_ms"] = _time(lambda: nvfp.quant_dequant_nvfp4(x, q, amax=amax_f))
                    row["nvfp4_given_amax_pct_copy"] = 100 * copy_ms[dname] / row["nvfp4_given_amax_ms"]
                if not args.no_reference:
                    row["ref_ms"] = _time(lambda: reference_quant_dequant(x, q))
                del want
                rows.append(row)
                print(_format_row(row), flush=True)
            del x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    # torch.compile of the reference: one graph per row, in priority order (bf16 axis -1 of every family
    # first) until the time budget is spent
    if not args.no_compile and not args.sweep:
        order = sorted(rows, key=lambda r: (r["dtype"] != "bf16", r["axis"] != -1))
        for row in order:
            if t_compile_spent >= args.compile_budget:
                break
            torch.manual_seed(0)
            x = torch.randn(n, n, device=dev, dtype=DTYPES[row["dtype"]])
            q = QType(row["qtype"]).dim(row["axis"])
            t0 = time.perf_counter()
            try:
                torch._dynamo.reset()
                cfn = torch.compile(lambda t, q=q: reference_quant_dequant(t, q))
                cfn(x)
                row["compiled_ms"] = _time(lambda: cfn(x))
            except Exception as err:
                row["compiled_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            t_compile_spent += time.perf_counter() - t0
            print("compiled " + _format_row(row), flush=True)
            del x
    if args.pair and not args.sweep:
        results["pair"] = _bench_pair(n, dev)
    results["rows"] = rows
    if rows:
        print()
        print(header)
        print("copy: " + ", ".join(f"{d} {copy_ms[d]:.4f} ms ({_gbps(args.size**2 * DTYPES[d].itemsize, copy_ms[d]):.0f} GB/s)"
                                   for d in args.dtypes))
        print("| family | qtype | dtype | axis | triton ms | GB/s | % of copy | reference ms | compiled ms | "
              "x reference | x compiled | exact |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(_format_md(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _bench_pair(n: int, dev) -> dict:
    """mxfp8e4m3 along both axes of one bf16 tensor: the fused pair kernel vs two single-axis kernels."""
    from fakequant import QType, dispatch

    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    qa, qb = QType("mxfp8e4m3"), QType("mxfp8e4m3").dim(0)
    fused = _time(lambda: dispatch.quant_dequant_pair(x, qa, qb, backend="triton"))
    two = _time(lambda: (fakequant_qd(x, qa), fakequant_qd(x, qb)))
    out = {"fused_ms": fused, "two_calls_ms": two}
    print(f"pair mxfp8e4m3 bf16 {n}x{n} along -1 and 0: fused {fused:.4f} ms, two calls {two:.4f} ms "
          f"({two / fused:.2f}x)", flush=True)
    return out


def fakequant_qd(x, q):
    import fakequant

    return fakequant.quant_dequant(x, q, backend="triton")


def _format_row(r: dict) -> str:
    s = (f"{r['family']:8s} {r['qtype']:10s} {r['dtype']} axis {r['axis']:2d}: {r['triton_ms']:.4f} ms "
         f"{r['gbps']:6.0f} GB/s {r['pct_copy']:5.1f}% of copy")
    if "ref_ms" in r:
        s += f" | ref {r['ref_ms']:.3f} ms ({r['ref_ms'] / r['triton_ms']:.1f}x)"
    if "compiled_ms" in r:
        s += f" | compiled {r['compiled_ms']:.3f} ms ({r['compiled_ms'] / r['triton_ms']:.1f}x)"
    if "compiled_error" in r:
        s += f" | compile failed: {r['compiled_error'][:80]}"
    if "nvfp4_amax_pass_ms" in r:
        s += (f" | amax pass {r['nvfp4_amax_pass_ms']:.4f} ms; block pass given amax {r['nvfp4_given_amax_ms']:.4f} ms"
              f" = {r['nvfp4_given_amax_pct_copy']:.1f}% of copy")
    return s + ("" if r["exact"] else "  MISMATCH")


def _format_md(r: dict) -> str:
    ref = f"{r['ref_ms']:.3f}" if "ref_ms" in r else "-"
    comp = f"{r['compiled_ms']:.3f}" if "compiled_ms" in r else "-"
    xr = f"{r['ref_ms'] / r['triton_ms']:.1f}" if "ref_ms" in r else "-"
    xc = f"{r['compiled_ms'] / r['triton_ms']:.1f}" if "compiled_ms" in r else "-"
    return (f"| {r['family']} | {r['qtype']} | {r['dtype']} | {r['axis']} | {r['triton_ms']:.4f} | {r['gbps']:.0f} | "
            f"{r['pct_copy']:.1f}% | {ref} | {comp} | {xr} | {xc} | {'yes' if r['exact'] else 'NO'} |")


if __name__ == "__main__":
    main()
