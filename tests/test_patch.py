"""``patch`` / ``unpatch`` / ``patch_functional`` on the tiny GPT and on Megatron-style attention."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fakequant
from fakequant import FakeQuantConfig, FakeQuantLinear, patch, patch_functional, quant_dequant, unpatch
from fakequant.config import recipe_names

from .conftest import assert_bitwise_equal
from .tiny_gpt import GPTConfig, TinyGPT, megatron_core_attention, synthetic_batch, train


GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
MXFP8 = FakeQuantConfig.from_recipe("mxfp8")
MIXED = FakeQuantConfig(input="mxfp8e4m3", weight="mxfp4", grad_output="e5m2k8b16")


def _model(cfg: GPTConfig = GPT, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(cfg)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, loss = model(*batch)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ patch
def test_patch_swaps_linears_in_place_and_reports_names_and_formats():
    model = _model()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = patch(model, MIXED)

    expected = [f"h.{i}.{m}" for i in range(GPT.n_layer) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert report.names == expected
    assert report[0].formats == {"input": "mxfp8e4m3", "weight": "mxfp4", "grad_output": "e5m2k8b16"}
    assert ("lm_head", "excluded by config.include/exclude") in report.skipped  # the head stays high precision
    assert type(model.lm_head) is nn.Linear
    for name in expected:
        module = model.get_submodule(name)
        assert type(module) is FakeQuantLinear and "forward" not in vars(module)  # class swap, no wrapper
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert re.search(r"\n  h\.0\.mlp\.c_fc +input=mxfp8e4m3  weight=mxfp4  grad_output=e5m2k8b16\n", str(report))
    assert re.search(r"\n  lm_head +not patched: excluded", str(report))


def test_extra_repr_shows_per_role_formats():
    model = _model()
    patch(model, FakeQuantConfig.from_recipe("mxfp4_fwd_mxfp8_bwd"))
    text = repr(model.h[0].mlp.c_fc)
    assert text.startswith("FakeQuantLinear(in_features=32, out_features=128, bias=True, input=e2m1k8b32")
    assert "grad_output=e5m2k8b32" in text and "weight_for_dgrad=e4m3k8b32" in text and "fidelity=faithful" in text


def test_patch_refuses_to_patch_twice_and_unpatch_refuses_an_unpatched_model():
    model = _model()
    patch(model, MXFP8)
    with pytest.raises(RuntimeError, match=r"already patched \(8 module\(s\): 'h.0.attn.c_attn'.*unpatch"):
        patch(model, MXFP8)
    assert unpatch(model)[0] == "h.0.attn.c_attn"
    with pytest.raises(RuntimeError, match="no patched modules"):
        unpatch(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        patch("model", MXFP8)
    with pytest.raises(TypeError, match="config must be a FakeQuantConfig, got str"):
        patch(_model(), "mxfp8")


def test_filters_select_modules_by_regex_and_callable():
    model = _model()
    report = patch(model, MXFP8.replace(include=r"\.mlp\.", exclude=[lambda name, m: name.startswith("h.1")]))
    assert report.names == ["h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    unpatch(model)
    report = patch(model, MXFP8.replace(exclude=()))  # nothing excluded: the (tied) head too
    assert report.names[-1] == "lm_head"


def test_subclass_keeping_forward_is_patched_and_one_overriding_forward_is_not():
    class Keeps(nn.Linear):
        pass

    class Overrides(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Keeps(32, 32), Overrides(32, 32))
    report = patch(model, MXFP8)
    assert report.names == ["0"] and isinstance(model[0], Keeps) and isinstance(model[0], FakeQuantLinear)
    assert report.skipped == (("1", "Overrides overrides forward"),)
    unpatch(model)
    assert type(model[0]) is Keeps


def test_unpatch_restores_bitwise_outputs_and_gradients():
    model, batch = _model(), synthetic_batch(GPT, 2)
    logits0, grads0 = _loss_and_grads(model, batch)
    patch(model, MXFP8)
    logits_q, grads_q = _loss_and_grads(model, batch)
    assert not torch.equal(logits_q, logits0)  # patching really changed the numbers
    unpatch(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    logits1, grads1 = _loss_and_grads(model, batch)
    assert_bitwise_equal(logits1, logits0)
    for name, g in grads0.items():
        assert_bitwise_equal(grads1[name], g)


def test_patched_linear_saves_no_more_bytes_than_a_plain_one():
    def saved_bytes(module, x):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return total

    torch.manual_seed(1)
    plain = nn.Linear(48, 40)
    patched = copy.deepcopy(plain)
    patch(patched, FakeQuantConfig.from_recipe("mxfp4_fwd_mxfp8_bwd"))
    x = torch.randn(2, 20, 48, requires_grad=True)
    plain_bytes = saved_bytes(plain, x)
    assert plain_bytes == (x.numel() + plain.weight.numel()) * 4  # plain torch saves X and W
    assert saved_bytes(patched, x) <= plain_bytes


def test_optimizer_built_before_patching_keeps_working():
    model, batch = _model(), synthetic_batch(GPT, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, batch, 2, optimizer=opt)
    patch(model, MXFP8)
    before = model.h[0].mlp.c_fc.weight.detach().clone()
    losses = train(model, batch, 2, optimizer=opt)
    assert not torch.equal(model.h[0].mlp.c_fc.weight, before) and all(math.isfinite(x) for x in losses)
    assert all(len(opt.state[p]) == 3 for p in model.parameters())  # step, exp_avg, exp_avg_sq


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("recipe", recipe_names())
def test_tiny_gpt_trains_with_every_recipe(recipe):
    model, batch = _model(), synthetic_batch(GPT, 4)
    report = patch(model, FakeQuantConfig.from_recipe(recipe))
    assert len(report) == 4 * GPT.n_layer
    losses = train(model, batch, 20)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses


def test_reference_and_faithful_fidelity_train_differently():
    batch = synthetic_batch(GPT, 4)
    runs = {}
    for fidelity in ("faithful", "reference"):
        model = _model()
        patch(model, FakeQuantConfig.from_recipe("mxfp4").replace(fidelity=fidelity))
        runs[fidelity] = train(model, batch, 6)
    # fprop quantizes X and W along K in both modes, so the first loss agrees; dgrad and wgrad differ.
    assert runs["faithful"][0] == runs["reference"][0]
    assert runs["faithful"][1:] != runs["reference"][1:]
    assert all(math.isfinite(x) for run in runs.values() for x in run)


# ------------------------------------------------------------------------------------------- functional
def _mha_inputs(seed=0, bnp=4, s=40, hn=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bnp, s, hn, generator=g).requires_grad_() for _ in range(3)]


def test_megatron_attention_inside_patch_functional_is_the_hand_built_quantized_computation():
    q, k, v = _mha_inputs()
    plain = megatron_core_attention(q, k, v)
    with patch_functional(MIXED):
        quantized = megatron_core_attention(q, k, v)
    outside = megatron_core_attention(q, k, v)

    def Q(t, role, axis):
        return quant_dequant(t, getattr(MIXED, role).dim(axis))

    # Scores: baddbmm(q in the input role along hn, kᵀ in the weight role along hn); context: bmm(P along
    # s as input, V along s as weight).
    s, hn = q.shape[1], q.shape[2]
    q_, k_, v_ = q.detach(), k.detach(), v.detach()
    scores = torch.baddbmm(torch.zeros(q.shape[0], s, s), Q(q_, "input", -1), Q(k_.transpose(1, 2), "weight", -2),
                           beta=0.0, alpha=1.0 / math.sqrt(hn))
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    expected = torch.bmm(Q(probs, "input", -1), Q(v_, "weight", -2))
    assert_bitwise_equal(quantized.detach(), expected)
    assert not torch.equal(quantized, plain)
    assert_bitwise_equal(outside, plain)  # and nothing stays patched after the block


def test_patch_functional_routes_and_restores_every_op():
    originals = (torch.matmul, torch.bmm, torch.baddbmm, F.linear, F.scaled_dot_product_attention)
    x, w = torch.randn(40, 48), torch.randn(36, 48)
    q = torch.randn(1, 2, 40, 48)
    cfg = MIXED.replace(query="mxfp4", key="mxfp4", value="mxfp4")
    with patch_functional(cfg):
        got = {
            "matmul": torch.matmul(x, w.t()), "linear": F.linear(x, w),
            "bmm": torch.bmm(x[None], w.t()[None]), "sdpa": F.scaled_dot_product_attention(q, q, q),
        }
        module_out = nn.Linear(48, 36)(x)  # nn.Linear calls F.linear, so it is routed too (see docstring)
    assert (torch.matmul, torch.bmm, torch.baddbmm, F.linear, F.scaled_dot_product_attention) == originals
    assert_bitwise_equal(got["matmul"], fakequant.quant_matmul(x, w.t(), cfg))
    assert_bitwise_equal(got["linear"], fakequant.quant_linear(x, w, None, cfg))
    assert_bitwise_equal(got["bmm"], fakequant.quant_bmm(x[None], w.t()[None], cfg))
    assert_bitwise_equal(got["sdpa"], fakequant.quant_attention(q, q, q, config=cfg))
    assert not torch.equal(got["linear"], F.linear(x, w)) and module_out.shape == (40, 36)


def test_patch_functional_restores_after_an_exception_and_nests():
    originals = (torch.matmul, torch.bmm, torch.baddbmm, F.linear, F.scaled_dot_product_attention)
    with pytest.raises(ZeroDivisionError):
        with patch_functional(MXFP8):
            1 / 0
    assert (torch.matmul, torch.bmm, torch.baddbmm, F.linear, F.scaled_dot_product_attention) == originals
    x, w = torch.randn(8, 48), torch.randn(48, 8)
    with patch_functional(MXFP8, ops=("matmul",)):
        outer = torch.matmul
        with patch_functional(MIXED, ops=("matmul", "bmm")):
            assert_bitwise_equal(torch.matmul(x, w), fakequant.quant_matmul(x, w, MIXED))
        assert torch.matmul is outer and torch.bmm is originals[1]
        assert_bitwise_equal(torch.matmul(x, w), fakequant.quant_matmul(x, w, MXFP8))
    assert torch.matmul is originals[0]


def test_patch_functional_backward_goes_through_the_quantized_gemms():
    q, k, v = _mha_inputs(seed=3)
    g = torch.randn(4, 40, 48)
    with patch_functional(MIXED, ops=("bmm", "baddbmm")):
        out = megatron_core_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    scores = fakequant.quant_baddbmm(torch.zeros(4, 40, 40), q2, k2.transpose(1, 2), 0.0, 1 / math.sqrt(48), MIXED)
    future = torch.ones(40, 40, dtype=torch.bool).triu(1)
    out2 = fakequant.quant_bmm(torch.softmax(scores.masked_fill(future, float("-inf")), -1), v2, MIXED)
    for actual, expected in zip(grads, torch.autograd.grad(out2, (q2, k2, v2), g)):
        assert_bitwise_equal(actual, expected)


def test_patch_functional_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['conv2d'\]; allowed: matmul, bmm"):
        with patch_functional(MXFP8, ops=("conv2d",)):
            pass
    with pytest.raises(TypeError, match="ops must be a sequence of op names, got 'matmul'"):
        with patch_functional(MXFP8, ops="matmul"):
            pass
    with pytest.raises(TypeError, match="config must be a FakeQuantConfig"):
        with patch_functional({"input": "mxfp8e4m3"}):
            pass


def test_sdpa_gpt_attention_quantized_under_patch_functional():
    model, batch = _model(), synthetic_batch(GPT, 2)
    logits_plain = model(batch[0])
    with patch_functional(FakeQuantConfig(query="mxfp8e4m3", key="mxfp8e4m3", value="mxfp8e4m3"),
                          ops=("scaled_dot_product_attention",)):
        logits_q = model(batch[0])
    assert not torch.equal(logits_q, logits_plain)
    assert_bitwise_equal(model(batch[0]), logits_plain)


def test_patch_functional_leaves_torch_calls_made_by_quantizers_and_backward_alone(monkeypatch):
    import fakequant.autograd as fq_autograd

    seen = []

    def matmul_quantizer(x, q):  # a stand-in quantizer that itself calls torch.matmul (x @ I == x exactly)
        seen.append(torch.matmul.__name__)
        return torch.matmul(x, torch.eye(x.shape[-1], dtype=x.dtype))

    monkeypatch.setattr(fq_autograd, "quant_dequant", matmul_quantizer)
    monkeypatch.setattr(fq_autograd, "quant_dequant_pair", lambda x, qa, qb: (matmul_quantizer(x, qa),
                                                                               matmul_quantizer(x, qb)))
    monkeypatch.setattr(fq_autograd, "quant_dequant_two", lambda a, qa, b, qb: (matmul_quantizer(a, qa),
                                                                                 matmul_quantizer(b, qb)))
    monkeypatch.setattr(fq_autograd, "quant_dequant_pair_two", lambda g, qga, qgb, a, qa, b, qb: (
        matmul_quantizer(g, qga), matmul_quantizer(g, qgb), matmul_quantizer(a, qa), matmul_quantizer(b, qb)))
    layer = nn.Linear(48, 36)
    patch(layer, MXFP8)
    a, b = torch.randn(8, 48, requires_grad=True), torch.randn(48, 36, requires_grad=True)
    with patch_functional(MXFP8):
        y = torch.matmul(a, b) + layer(a).sum()  # no recursion through the patched torch.matmul
        y.sum().backward()  # backward inside the block: the quantizers' calls stay plain too
    # Forward: 2 operands each for the matmul and the linear; backward: 4 each (dgrad and wgrad). A quantizer
    # call routed back through the wrapper would quantize again and show up here as extra calls.
    assert len(seen) == 12 and set(seen) == {"matmul"}  # and the quantizer did see the wrapper in place
    assert_bitwise_equal(y.detach(), (torch.matmul(a, b) + F.linear(a, layer.weight, layer.bias).sum()).detach())


def test_patched_megatron_gpt_trains_under_cpu_autocast():
    # The earlier library's matmul raised a dtype mismatch here; now every op returns autocast's dtype.
    model = _model(dataclasses.replace(GPT, attention="megatron"))
    patch(model, MIXED)
    idx, targets = synthetic_batch(GPT, 2)
    with patch_functional(MIXED, ops=("bmm", "baddbmm")), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and math.isfinite(loss.item())
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
