"""Host time of one fake-quantization call, by layer of the call stack (where the per-call cost goes).

A training step issues hundreds of quantizations of small operands; when the host needs longer to issue a
step than the GPU needs to run it, the host cost per call, not the kernels, sets the step time. This prints
microseconds of host time per call (no synchronisation inside the loop; a tensor small enough that the GPU
never holds the host back), for each layer from a bare tensor allocation up to the autograd Linear.

    python scripts/bench_call_overhead.py [--qtype mxfp8e4m3] [--shape 256,768] [--calls 2000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import fakequant
from fakequant import QType
from fakequant.dispatch import quant_dequant, quant_dequant_pair, quant_dequant_two


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


class _Identity(torch.autograd.Function):
    """A Python autograd Function that does nothing: the engine's own cost of a Python backward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy.mm(w), dy.t().mm(x)


def backward_parts(x, w, qtype: str) -> list:
    """The backward of the quantized Linear, op by op in the main thread, and the same through autograd."""
    q = QType(qtype)
    qn, qm, qw0 = q.dim(-1), q.dim(-2), q.dim(-2)
    xg = x.clone().requires_grad_(True)

    def manual():
        dy = x  # [M, N] with N == K here
        gd, gw = quant_dequant_pair(dy, qn, qm)
        gd.mm(quant_dequant(w.detach(), qw0))
        gw.t().mm(quant_dequant(x, qm))

    return [
        ("backward ops by hand (pair + 2 quant + 2 mm)", manual),
        ("python Function fwd+bwd, no quantization", lambda: _Identity.apply(xg, w).sum().backward()),
    ]


def timed_backward(x, w, cfg, calls: int) -> None:
    """Host time spent inside the pieces of the quantized Linear's backward (autograd runs CUDA backward
    on its own thread, which cProfile in the main thread does not see): wall time per call of each piece."""
    import fakequant.autograd as fa

    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    import fakequant.dispatch as fd
    import fakequant.kernels.triton._launch as fl
    import fakequant.kernels.triton.mx as fm

    modules = {"_qo_grad": fa, "_qo_two": fa, "_quantize_operands_two": fa, "quant_dequant_two": fa,
               "select": fd, "_fused_self_test": fd, "quant_dequant_mx_two": fm, "quant_dequant_mx_pair": fm,
               "launch": fm, "_direct": fl}
    saved = {n: getattr(m, n) for n, m in modules.items()}
    backward = fa._QuantLinear.backward
    for n, fn in saved.items():
        setattr(modules[n], n, timed(n, fn))
    fa._QuantLinear.backward = staticmethod(timed("backward (whole)", backward))
    try:
        xg = x.clone().requires_grad_(True)
        fn = lambda: fakequant.quant_linear(xg, w, None, cfg).sum().backward()  # noqa: E731
        total = per_call_us(fn, calls)
        totals.clear()
        total = per_call_us(fn, calls)
    finally:
        for n, fn in saved.items():
            setattr(modules[n], n, fn)
        fa._QuantLinear.backward = backward
    print(f"  quant_linear fwd+bwd {total:.1f} µs per call; inside it, per call:")
    for name, t in totals.items():
        print(f"    {t / (calls + 20) * 1e6:8.1f} µs  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtype", default="mxfp8e4m3")
    parser.add_argument("--shape", default="256,768")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--cprofile", type=int, default=12, help="print the top N functions of quant_dequant")
    args = parser.parse_args()
    import triton

    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape[-1], shape[-1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    q, q0 = QType(args.qtype).dim(-1), QType(args.qtype).dim(0)
    cfg = fakequant.FakeQuantConfig.from_recipe("mxfp8")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.qtype} on {shape} bf16, host µs per call (mean of {args.calls})")
    rows = [
        ("torch.empty_like", lambda: torch.empty_like(x)),
        ("x.clone() (one copy kernel)", lambda: x.clone()),
        ("quant_dequant(x, q) dim -1", lambda: quant_dequant(x, q)),
        ("quant_dequant(x, q) dim 0", lambda: quant_dequant(x, q0)),
        ("quant_dequant_pair(x, q, q0)", lambda: quant_dequant_pair(x, q, q0)),
        ("quant_dequant_two(x, q, w, q0)", lambda: quant_dequant_two(x, q, w.detach(), q0)),
        ("F.linear bf16 fwd", lambda: torch.nn.functional.linear(x, w)),
        ("quant_linear fwd (mxfp8 recipe)", lambda: fakequant.quant_linear(x, w, None, cfg)),
        ("F.linear fwd+bwd", lambda: torch.nn.functional.linear(xg, w).sum().backward()),
        ("quant_linear fwd+bwd", lambda: fakequant.quant_linear(xg, w, None, cfg).sum().backward()),
    ]
    rows += backward_parts(x, w, args.qtype)
    for name, fn in rows:
        print(f"  {per_call_us(fn, args.calls):8.1f} µs  {name}")
    timed_backward(x, w, cfg, args.calls)
    if args.cprofile:
        for name, fn in (("quant_dequant", lambda: quant_dequant(x, q)),
                         ("quant_linear fwd+bwd (main thread only)",
                          lambda: fakequant.quant_linear(xg, w, None, cfg).sum().backward())):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            print(f"--- cProfile of 500 x {name}")
            stats = pstats.Stats(prof)
            stats.sort_stats("tottime").print_stats(args.cprofile)
            stats.sort_stats("cumulative").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
