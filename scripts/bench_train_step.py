"""Training-step time (and peak memory) of the tests' GPT per recipe, as ratios to the bf16 recipe.

Every recipe runs in the same process on the same model, data and optimizer, so the ratios compare like
with like; the bf16 recipe (nothing quantized) is the baseline and always runs first.

On CUDA, steps run back to back and each is timed with CUDA events (the training throughput: the host may
issue the next step while the GPU runs this one); ``--sync-every-step`` times each step between two
synchronisations instead, as a loop that reads the loss every step runs. ``--profile N`` then shows where
the time goes (device-kernel time, host issue time, top kernels and host functions).

    python scripts/bench_train_step.py --threads 1                       # tiny GPT on CPU, all recipes
    python scripts/bench_train_step.py --recipes bf16,mxfp8,mxfp4 --steps 20
    python scripts/bench_train_step.py --device cuda --preset gpt2-small # 12 layers, d=768, T=1024, batch 8,
                                                                         # bf16 weights, AdamW
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' GPT is the benchmark's model

import fakequant  # noqa: E402
from fakequant import FakeQuantConfig  # noqa: E402
from fakequant.config import recipe_names  # noqa: E402
from tests.tiny_gpt import GPTConfig, TinyGPT, synthetic_batch  # noqa: E402

PRESETS = {
    # name: (model config, batch, dtype of weights)
    "tiny": (GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64), 4, torch.float32),
    "small": (GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=256), 8, torch.float32),
    "gpt2-small": (GPTConfig.gpt2_small(), 8, torch.bfloat16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "bf16"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_recipe(recipe: str, args, cfg: GPTConfig, batch_size: int, dtype: torch.dtype, device: torch.device):
    """Median step time (s), peak memory (bytes or None on CPU) and the last loss of one recipe."""
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device=device, dtype=dtype)
    config = FakeQuantConfig.from_recipe(recipe).replace(fidelity=args.fidelity)
    if config.quantizes_linear:
        fakequant.patch(model, config)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx, targets = synthetic_batch(cfg, batch_size, args.seq, seed=0, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if args.sync_every_step or device.type != "cuda":
        times, loss = _timed_synced(step_model, opt, idx, targets, device, args)
    else:
        times, loss = _timed_streaming(step_model, opt, idx, targets, device, args)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if args.profile:
        profile_steps(recipe, lambda: _train_step(step_model, opt, idx, targets), device, args.profile)
    del model, opt, step_model
    return statistics.median(times), peak, loss


def _timed_synced(model, opt, idx, targets, device, args) -> tuple[list[float], float]:
    """Each step timed on its own: synchronise, run the step, synchronise (and read the loss). The host
    then starts every step with an idle GPU, as a loop that logs the loss every step does."""
    times, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss_t = _train_step(model, opt, idx, targets)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        loss = loss_t.item()
    return times, loss


def _timed_streaming(model, opt, idx, targets, device, args) -> tuple[list[float], float]:
    """Steps issued back to back, as a loop that does not read results every step: the host may issue step
    n + 1 while the GPU runs step n. Step n's time is the GPU time between CUDA events recorded at its start
    and at the next step's start, so it measures the training throughput; one synchronisation at the end."""
    for _ in range(args.warmup):
        _train_step(model, opt, idx, targets)
    _sync(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    events[0].record()
    for i in range(args.steps):
        loss_t = _train_step(model, opt, idx, targets)
        events[i + 1].record()
    _sync(device)
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])], loss_t.item()


def _train_step(model, opt, idx, targets) -> torch.Tensor:
    _, loss = model(idx, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _host_profile(recipe: str, step, device: torch.device, top: int, n: int) -> None:
    """The host's share: the Python functions that take the most time of their own over ``n`` steps."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    _sync(device)
    print(f"\n[{recipe}] host functions by own time over {n} steps (cProfile):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def profile_steps(recipe: str, step, device: torch.device, top: int, n: int = 3) -> None:
    """Where a recipe's step time goes: device-kernel time per step (the GPU's busy time), host time to
    issue one step (when it exceeds the device time, the step is launch-bound), and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t0) / n  # without a sync: the time the host needs to issue a step
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        _sync(device)
    _host_profile(recipe, step, device, top, n)
    events = prof.key_averages()
    # device-side events (kernels, memcpy/memset), not the host ops that launched them
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith(("CUDA", "XPU", "PrivateUse1"))]
    busy = sum(e.self_device_time_total for e in kernels) / n / 1e3
    print(f"\n[{recipe}] device-kernel time {busy:.1f} ms/step, host issue time {host * 1e3:.1f} ms/step, "
          f"{sum(e.count for e in kernels) // n} kernels/step")
    quant = sum(e.self_device_time_total for e in kernels if "_kernel" in e.key and e.key.startswith("_")) / n / 1e3
    print(f"  of which fakequant's Triton kernels: {quant:.2f} ms/step")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        per = e.self_device_time_total / n / 1e3
        print(f"  {per:7.2f} ms  {e.count // n:5d}x  {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--recipes", default=",".join(recipe_names()),
                        help=f"comma-separated names from: {', '.join(recipe_names())}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq", type=int, default=None, help="sequence length; default: the preset's context")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype; default: the preset's")
    parser.add_argument("--fidelity", choices=("faithful", "reference"), default="faithful")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier for tiny CPU shapes")
    parser.add_argument("--sync-every-step", action="store_true",
                        help="time each step between two synchronisations (reading the loss every step) instead "
                             "of back-to-back steps timed with CUDA events (the training throughput)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="after timing, profile 3 steps of each recipe and print its device time per step, "
                             "its host time per step and its TOP most expensive device kernels")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg, batch_size, dtype = PRESETS[args.preset]
    batch_size = args.batch or batch_size
    dtype = DTYPES[args.dtype] if args.dtype else dtype
    device = torch.device(args.device)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in recipe_names()]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(recipe_names())}")
    recipes = [BASELINE] + [r for r in recipes if r != BASELINE]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    seq = args.seq or cfg.block_size
    print(f"torch {torch.__version__}, fakequant {fakequant.__version__}, device {device} ({name}), "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"model: {args.preset} (layers {cfg.n_layer}, d {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.vocab_size}), "
          f"batch {batch_size}, T {seq}, weights {dtype}, AdamW, fidelity {args.fidelity}, "
          f"compile {args.compile}, median of {args.steps} steps after {args.warmup} warm-up, "
          f"{'each step synchronised' if args.sync_every_step or device.type != 'cuda' else 'steps back to back (CUDA events)'}")
    results = {}
    for recipe in recipes:
        results[recipe] = run_recipe(recipe, args, cfg, batch_size, dtype, device)
    base_time, base_peak, _ = results[BASELINE]
    print()
    print("| recipe | step ms | time / bf16 | peak MiB | memory / bf16 | last loss |")
    print("|---|---|---|---|---|---|")
    for recipe, (t, peak, loss) in results.items():
        mem = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        mem_ratio = "n/a" if peak is None else f"{peak / base_peak:.2f}"
        print(f"| {recipe} | {t * 1e3:.1f} | {t / base_time:.2f} | {mem} | {mem_ratio} | {loss:.4f} |")
    if device.type == "cpu":
        print("\n(peak memory is measured on CUDA only)")


if __name__ == "__main__":
    main()
