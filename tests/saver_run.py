"""A tiny GPT trained a few steps with a ``TensorSaver``, and the operands captured by hand (module hooks and
``.grad``) to compare the dumps against. Shared by ``test_saver.py`` and ``test_analyze.py``."""

from __future__ import annotations

from pathlib import Path

import torch

from fakequant import FakeQuantConfig, patch
from fakequant.saver import TensorSaver

from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch

GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=64)
# One format per encoding of fakequant.codec, so every dump holds each kind of packed codes.
CONFIG = FakeQuantConfig(
    input="mxfp4", weight="hif4", grad_output="mxfp8e5m2",
    weight_for_dgrad="nvfp4", input_for_wgrad="int8sym", grad_output_for_wgrad="hif8",
)
LAYERS = ("h.0.attn.c_attn", "h.1.mlp.c_proj")
LAYER_REGEX = r"^h\.0\.attn\.c_attn$|^h\.1\.mlp\.c_proj$"
STEPS = (1, 3)
N_STEPS = 5
OPERANDS = (
    ("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output"), ("dgrad", "weight"),
    ("wgrad", "grad_output"), ("wgrad", "input"),
)


def train_with_saver(out_dir: str | Path, capture: bool = False, via_config: bool = False, **saver_kwargs):
    """Train ``N_STEPS`` steps of the tiny GPT with a saver on ``LAYERS`` at ``STEPS`` (overridable through
    ``saver_kwargs``), given to ``patch`` as an observer or, with ``via_config``, in ``CONFIG.observers``.
    Returns ``(saver, losses, captured)``; ``captured[(step, layer)]`` holds the layer's input ``x``,
    ``weight``, output gradient ``dy``, input gradient ``dx`` and weight gradient ``dw`` of that step, taken
    with hooks independent of fakequant (when ``capture``)."""
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    kwargs = {"steps": STEPS, "layers": LAYER_REGEX, **saver_kwargs}
    saver = TensorSaver(out_dir, **kwargs)
    if via_config:
        patch(model, CONFIG.replace(observers=(saver,)))
    else:
        patch(model, CONFIG, observers=(saver,))
    modules = {name: model.get_submodule(name) for name in LAYERS}
    batch = synthetic_batch(GPT, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    captured: dict = {}
    current = {"step": None}

    def hook(name):
        def forward_hook(module, args, out):
            if current["step"] is None:
                return
            rec = captured.setdefault((current["step"], name), {})
            x = args[0]
            rec["x"], rec["weight"] = x.detach().clone(), module.weight.detach().clone()
            out.register_hook(lambda g: rec.__setitem__("dy", g.detach().clone()))
            x.register_hook(lambda g: rec.__setitem__("dx", g.detach().clone()))
        return forward_hook

    if capture:
        for name, m in modules.items():
            m.register_forward_hook(hook(name))
    losses = []
    for step in range(N_STEPS):
        saver.step(step)
        current["step"] = step if capture and step in STEPS else None
        _, loss = model(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if current["step"] is not None:
            for name, m in modules.items():
                captured[(step, name)]["dw"] = m.weight.grad.detach().clone()
        opt.step()
        losses.append(loss.item())
    return saver, losses, captured
