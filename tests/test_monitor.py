"""The numerics monitor without Lightning: hand-worked statistics, the recording schedule, NaN/inf origin."""

from __future__ import annotations

import math

import pytest
import torch

from fakequant import FakeQuantConfig, QType, patch, quant_dequant
from fakequant.metrics import sqnr_db
from fakequant.monitor import NumericsMonitor, metric_name, operand_stats

from .tiny_gpt import GPTConfig, TinyGPT, synthetic_batch

GPT = GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32)


def test_operand_stats_on_a_hand_worked_mxfp4_block():
    # One block of 32 along the last dim; amax 7.5: floor(log2 7.5) = 2 = emax(E2M1) -> shared exponent 0.
    x = torch.ones(1, 32)
    x[0, 0] = 7.5  # above 6 (the largest E2M1) by more than half the top step (1): clipped -> saturated
    x[0, 1] = 6.5  # rounds to 6 within half a step: not saturated
    x[0, 2] = 0.1  # below half the smallest subnormal (0.5): flushed to zero
    x[0, 3] = -7.5  # clipped to -6: saturated
    q = QType("mxfp4:scale=floor")
    y = quant_dequant(x, q)
    assert y[0, :4].tolist() == [6.0, 6.0, 0.0, -6.0]
    st = operand_stats(x, y, q)
    m = st.metrics()
    assert st.saturated == 2 and m["saturated_frac"] == 2 / 32
    assert st.flushed == 1 and m["flushed_frac"] == 1 / 32
    assert dict(st.scale_exp_hist) == {0: 1}
    assert m["scale_exp_min"] == m["scale_exp_max"] == m["scale_exp_mean"] == 0.0
    assert m["sqnr_db"] == sqnr_db(x, y)


def test_scale_exponents_follow_the_block_amax_along_the_quantization_axis():
    # Two blocks along dim 0 (the axis of this QType): amax 1.0 -> 0 - 2 = -2; amax 64 -> 6 - 2 = 4.
    x = torch.cat([torch.full((32, 3), 0.5), torch.full((32, 3), 2.0)])
    x[0, :] = 1.0
    x[40, :] = 64.0
    q = QType("mxfp4").dim(0)
    st = operand_stats(x, quant_dequant(x, q), q)
    assert dict(st.scale_exp_hist) == {-2: 3, 4: 3}
    # an element format has no block scale: no scale statistics
    h = QType("hif8")
    assert "scale_exp_min" not in operand_stats(x, quant_dequant(x, h), h).metrics()


def test_monitor_records_every_n_steps_under_stable_names():
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    mon = NumericsMonitor(every_n_steps=2)
    report = patch(model, FakeQuantConfig.from_recipe("mxfp8"), observers=[mon])
    batch = synthetic_batch(GPT, 2)
    collected = []
    for step in range(4):
        mon.step(step)
        model(*batch)[1].backward()
        collected.append(mon.collect())
    assert [bool(c) for c in collected] == [True, False, True, False]
    assert sorted(mon.history) == [0, 2]
    names = collected[0]
    assert len(names) == len(report) * 6 * 6  # layers x operands x statistics (all block formats)
    key = metric_name("h.0.mlp.c_fc", "wgrad", "grad_output", "sqnr_db")
    assert key == "fakequant/h.0.mlp.c_fc/wgrad.grad_output/sqnr_db" and 20 < names[key] < 40
    assert metric_name("", "fprop", "query", "sqnr_db") == "fakequant/functional/fprop.query/sqnr_db"
    worst = mon.worst(2)
    assert len(worst) == 2 and worst[0][3] <= worst[1][3]


def test_monitor_reports_the_first_nonfinite_operand_and_where_it_came_from():
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    seen = []
    mon = NumericsMonitor(every_n_steps=None, on_nonfinite=seen.append)  # no statistics, only the check
    patch(model, FakeQuantConfig.from_recipe("mxfp8"), observers=[mon])
    batch = synthetic_batch(GPT, 2)
    mon.step(0)
    model(*batch)[1].backward()
    assert mon.first_nonfinite is None and mon.collect() == {}
    with torch.no_grad():
        model.h[0].mlp.c_proj.weight[3, 5] = float("inf")
    mon.step(1)
    model(*batch)[1].backward()
    nf = mon.first_nonfinite
    assert (nf.layer, nf.gemm, nf.role, nf.step, nf.tensor, nf.inf) == ("h.0.mlp.c_proj", "fprop", "weight", 1,
                                                                         "high-precision", 1)
    assert seen == [nf]  # reported once
    assert "step 1 in layer 'h.0.mlp.c_proj', GEMM fprop, role weight" in nf.message


def test_an_overflow_made_by_the_quantizer_is_told_apart():
    lin = torch.nn.Linear(4, 4)
    mon = NumericsMonitor(every_n_steps=1)
    patch(lin, FakeQuantConfig(input="hif8:saturate=false"), observers=[mon])
    lin(torch.tensor([[1e6, 1.0, 1.0, 1.0]]))
    nf = mon.first_nonfinite
    assert (nf.layer, nf.gemm, nf.role, nf.tensor) == ("", "fprop", "input", "quantized")
    assert math.isinf(nf.inf) is False and nf.inf == 1


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps must be a positive int or None"):
        NumericsMonitor(every_n_steps=0)
    with pytest.raises(TypeError, match="check_nonfinite must be a bool"):
        NumericsMonitor(check_nonfinite="yes")
