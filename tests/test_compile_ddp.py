"""A patched model under ``torch.compile`` and under DDP (``gloo``, two CPU processes)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fakequant import FakeQuantConfig, patch

from .conftest import assert_bitwise_equal, end_gloo_worker, free_port
from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch


GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
RECIPE = "mxfp4_fwd_mxfp8_bwd"  # different formats per GEMM, so the backward re-quantization is exercised


def _step(model: nn.Module, params_of: nn.Module, *inputs):
    params_of.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = out[1] if isinstance(out, tuple) else out.square().mean()
    loss.backward()
    logits = out[0] if isinstance(out, tuple) else out
    return logits.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters()}


def test_compiled_patched_gpt_equals_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    patch(model, FakeQuantConfig.from_recipe(RECIPE))
    batch = synthetic_batch(GPT, 2)
    logits_eager, grads_eager = _step(model, model, *batch)
    torch._dynamo.reset()
    # fullgraph=True: the autograd functions and the quantizer (an opaque custom op) trace without a break.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        logits, grads = _step(compiled, model, *batch)
        assert_bitwise_equal(logits, logits_eager)
        for name, g in grads_eager.items():
            assert_bitwise_equal(grads[name], g)


def test_inductor_compiled_patched_mlp_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 36))
    patch(model, FakeQuantConfig.from_recipe(RECIPE))
    x = torch.randn(2, 20, 48)
    y_eager, grads_eager = _step(model, model, x)
    torch._dynamo.reset()
    y, grads = _step(torch.compile(model, fullgraph=True), model, x)
    assert_bitwise_equal(y, y_eager)  # every GEMM and quantizer runs the same kernels
    for name, g in grads_eager.items():
        if name.endswith("bias"):
            # db = Σ_M dY is a plain reduction (no GEMM, no quantizer); inductor generates its own summation
            # order for it, exactly as it does for an unpatched nn.Linear, so only fp32 rounding may differ.
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6)
        else:
            assert_bitwise_equal(grads[name], g)


# ------------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyGPT(GPT)
        report = patch(model, FakeQuantConfig.from_recipe(RECIPE))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
        shard = synthetic_batch(GPT, 2, seed=1 + rank)  # each rank trains on its own data
        common = synthetic_batch(GPT, 2, seed=100)
        train_losses, common_losses = [], []
        for _ in range(3):
            _, loss = ddp(*shard)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # gradients all-reduced by DDP
            opt.step()
            train_losses.append(loss.item())
            with torch.no_grad():
                common_losses.append(model(*common)[1].item())
        torch.save(
            {"patched": len(report), "train": train_losses, "common": common_losses,
             "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    end_gloo_worker()  # reached only when the worker succeeded


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_cpu_processes_give_identical_losses_and_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["patched"] == r1["patched"] == 4 * GPT.n_layer
    assert r0["train"] != r1["train"]  # the ranks saw different data ...
    assert r0["common"] == r1["common"]  # ... yet hold the same model after every step
    assert all(math.isfinite(x) for x in r0["common"] + r0["train"])
    for name, p in r0["params"].items():
        assert_bitwise_equal(r1["params"][name], p)
