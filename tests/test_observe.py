"""Observers see every GEMM operand, forward and backward, with layer, GEMM, role and format."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fakequant import FakeQuantConfig, OperandEvent, attach_observer, detach_observer, patch, patch_functional, unpatch
from fakequant.config import GEMM_OPERANDS

from .conftest import assert_bitwise_equal
from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch


GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32)


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    logits, loss = model(*batch)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_observers_see_each_operand_of_each_gemm_once_per_step():
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    events: list[OperandEvent] = []
    report = patch(model, FakeQuantConfig.from_recipe("mxfp4_fwd_mxfp8_bwd"), observers=[events.append])
    _step(model, synthetic_batch(GPT, 2))
    seen = Counter((e.layer, e.gemm, e.role) for e in events)
    assert seen == Counter({(name, g, r): 1 for name in report.names for g, r in GEMM_OPERANDS})
    by_key = {(e.layer, e.gemm, e.role): e for e in events}
    fc = model.h[0].mlp.c_fc
    e = by_key[("h.0.mlp.c_fc", "fprop", "weight")]
    assert e.hp is fc.weight and str(e.qtype) == str(e.qtype.dim(-1)) and e.qtype.q_dim == -1
    assert not torch.equal(e.quantized, e.hp)
    assert by_key[("h.0.mlp.c_fc", "dgrad", "weight")].qtype.q_dim == -2  # W along N for dgrad
    assert "e4m3" in str(by_key[("h.0.mlp.c_fc", "wgrad", "input")].qtype)  # the per-GEMM override


def test_observers_change_no_number_and_attach_detach_work_on_a_patched_model():
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    batch = synthetic_batch(GPT, 2)
    patch(model, FakeQuantConfig.from_recipe("mxfp8"))
    logits0, grads0 = _step(model, batch)
    events: list[OperandEvent] = []
    names = attach_observer(model, events.append)
    assert len(names) == 4 and attach_observer(model, events.append) == names  # not added twice
    logits1, grads1 = _step(model, batch)
    assert len(events) == 4 * len(GEMM_OPERANDS)
    assert_bitwise_equal(logits1, logits0)
    for n, g in grads0.items():
        assert_bitwise_equal(grads1[n], g)
    assert detach_observer(model, events.append) == names
    assert all(m._fakequant_site is None for m in model.modules() if hasattr(m, "_fakequant_site"))
    events.clear()
    _step(model, batch)
    assert events == []
    unpatch(model)
    with pytest.raises(RuntimeError, match="no patched modules"):
        attach_observer(model, events.append)


def test_bad_observers_are_refused():
    with pytest.raises(TypeError, match="not callable"):
        patch(torch.nn.Linear(4, 4), FakeQuantConfig.from_recipe("mxfp8"), observers=[3])
    with pytest.raises(TypeError, match="sequence of callables"):
        with patch_functional(FakeQuantConfig.from_recipe("mxfp8"), observers="x"):
            pass


def test_patch_functional_observers_name_the_attention_roles():
    q = torch.randn(1, 2, 32, 32, requires_grad=True)
    fmt = "mxfp8e4m3"
    sdpa_cfg = FakeQuantConfig(query=fmt, key=fmt, value=fmt, grad_attn_output=fmt)
    events: list[OperandEvent] = []
    with patch_functional(sdpa_cfg, ops=("scaled_dot_product_attention",), observers=[events.append]):
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert Counter((e.layer, e.gemm, e.role) for e in events) == Counter(
        {("", "fprop", "query"): 1, ("", "fprop", "key"): 1, ("", "fprop", "value"): 1,
         ("", "dgrad", "grad_attn_output"): 1})
    events.clear()
    with patch_functional(sdpa_cfg.replace(attn_probs=fmt), ops=("scaled_dot_product_attention",),
                          observers=[events.append]):
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    roles = {(e.gemm, e.role) for e in events}
    assert roles == {
        ("fprop", "query"), ("fprop", "key"), ("dgrad", "key"), ("wgrad", "query"),
        ("fprop", "attn_probs"), ("fprop", "value"), ("dgrad", "grad_attn_output"), ("dgrad", "value"),
        ("wgrad", "attn_probs"), ("wgrad", "grad_attn_output"),
    }


def test_compiled_model_with_an_observer_still_reports_events():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    events: list[OperandEvent] = []
    patch(model, FakeQuantConfig.from_recipe("mxfp8"), observers=[events.append])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # graph breaks allowed with observers
    compiled(torch.randn(4, 32)).square().mean().backward()
    assert {(e.layer, e.gemm) for e in events} >= {("0", "fprop"), ("2", "fprop")}
    assert all(type(e.hp) is torch.Tensor or isinstance(e.hp, torch.nn.Parameter) for e in events)  # real tensors
