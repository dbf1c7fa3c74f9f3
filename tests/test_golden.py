"""Every golden case bit for bit (shared/golden/README.md; copied into tests/data).

The files hold inputs and the exact expected outputs of ``quantize_mx``, ``quant_dequant`` for every
QType family, the per-tensor ``quant_hif8`` and the earlier library's STE operator.
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant.compat import quant_dequant_tensor_with_backward
from fakequant.mxfp import quantize_mx

from .conftest import DATA, assert_bitwise_equal

MX_CASES = torch.load(DATA / "mx_quantize_public.pt", weights_only=True)["cases"]
QTYPE_CASES = torch.load(DATA / "qtype_public.pt", weights_only=True)["cases"]


def _qtype_of(case: dict) -> fakequant.QType:
    q = fakequant.QType(case["qtype"]).dim(case["dim"])
    for key, value in (case.get("mods") or {}).items():
        q = getattr(q, key)(value)
    return q


def _case_id(case: dict) -> str:
    return f"{case['kind']}-{case['qtype']}-{case.get('tag', '')}"


@pytest.mark.parametrize("case", MX_CASES, ids=lambda c: f"{c['id']}-{c['kwargs']['elem_format']}")
def test_quantize_mx_golden(case):
    assert_bitwise_equal(quantize_mx(case["input"], **case["kwargs"]), case["expected"])


@pytest.mark.parametrize("case", [c for c in QTYPE_CASES if c["kind"] == "quant_dequant"], ids=_case_id)
def test_quant_dequant_golden(case):
    x = case["input"]
    before = x.clone()
    assert_bitwise_equal(fakequant.quant_dequant(x, _qtype_of(case)), case["expected"])
    assert_bitwise_equal(x, before)  # the input is never mutated


@pytest.mark.parametrize("case", [c for c in QTYPE_CASES if c["kind"] == "quant_hif8_scaled"], ids=_case_id)
def test_quant_hif8_scaled_golden(case):
    from fakequant.hifp import quant_hif8

    assert_bitwise_equal(quant_hif8(case["input"]), case["expected"])


@pytest.mark.parametrize("case", [c for c in QTYPE_CASES if c["kind"].startswith("ste_")], ids=_case_id)
def test_legacy_ste_golden(case):
    x = case["input"].clone().requires_grad_(True)
    out = quant_dequant_tensor_with_backward(x, case["forward_format"], None, True, case["backward_format"])
    if case["kind"] == "ste_forward":
        assert_bitwise_equal(out.detach(), case["expected"])
    else:
        (out * case["grad_in"]).sum().backward()
        assert_bitwise_equal(x.grad, case["expected"])


def test_golden_files_cover_every_family():
    """Guard against a silently shrunken data set: the public files hold 600 and 234 cases."""
    assert len(MX_CASES) == 600
    assert len(QTYPE_CASES) == 234
    families = {_qtype_of(c).family for c in QTYPE_CASES if c["kind"] == "quant_dequant"}
    assert families >= {"mx", "mx_hier", "hifx", "tmx", "hif8", "hif4", "nvf4", "nvfp4", "nf4", "nf4_double",
                        "int8sym", "cast"}
