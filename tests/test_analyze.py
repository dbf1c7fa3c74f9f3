"""``fakequant analyze``, ``error`` and ``scaling-sweep`` on the tiny-GPT dump of ``saver_run``."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from fakequant import QType, quant_dequant
from fakequant.analyze import dump_rows, error_rows, load_tensor, sweep_rows, tensor_stats
from fakequant.cli import main
from fakequant.metrics import sqnr_db
from fakequant.saver import read_manifest, save_file

from .saver_run import LAYERS, OPERANDS, STEPS, train_with_saver

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dump")
    train_with_saver(out)
    return out


def _png_ok(path, min_w=600, min_h=250):
    """The file opens as a PNG of a sensible size with more than one colour on it."""
    from matplotlib.image import imread

    img = imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (path, w, h)
    assert float(img[..., :3].std()) > 0.05, path


def test_analyze_writes_tables_and_figures(dump, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", str(dump), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(STEPS) * len(LAYERS) * len(OPERANDS)
    assert f"{n} tensors" in printed
    names = sorted(p.name for p in out.iterdir())
    hist = [x for x in names if x.startswith("hist_")]
    assert names == sorted(["report.md", "report.csv", "sqnr_per_layer.png"] + hist) and len(hist) == 1
    md = (out / "report.md").read_text().splitlines()
    assert md[4].startswith("| rank | step | layer | gemm | role | format | shape | MSE | SQNR dB | cosine |")
    assert sum(1 for line in md if line.startswith("| 0 |")) == n
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["layer"] for r in rows} == set(LAYERS)
    for r in rows:
        assert float(r["sqnr_db"]) > 5 and 0.9 < float(r["cosine"]) <= 1.0
        assert 0 <= float(r["flushed_pct"]) <= 100 and 0 <= float(r["saturated_pct"]) <= 100
        if r["qtype"].startswith("hif8"):
            assert r["scale_exp_min"] == ""  # HiF8 has no scales
        else:
            assert int(r["scale_exp_min"]) <= int(r["scale_exp_max"])
    # the histogram is the worst tensor's
    worst = min(rows, key=lambda r: float(r["sqnr_db"]))
    assert hist[0] == f"hist_rank0_step{worst['step']}_{worst['layer']}.{worst['gemm']}.{worst['role']}.png"
    _png_ok(out / "sqnr_per_layer.png")
    _png_ok(out / hist[0], min_w=900)
    # a chosen tensor, and a format without codes (hif8, one panel)
    assert main(["analyze", str(dump), "--out", str(out), "--tensor", "step_000003/h.1.mlp.c_proj.wgrad.grad_output"]) == 0
    _png_ok(out / "hist_rank0_step3_h.1.mlp.c_proj.wgrad.grad_output.png", min_w=500)


def test_dump_rows_match_the_metrics(dump):
    rows = dump_rows(dump)
    assert [(r["step"], r["layer"]) for r in rows] == sorted(
        [(r["step"], r["layer"]) for r in rows], key=lambda t: (t[0], LAYERS.index(t[1])))
    from fakequant.saver import load

    r = rows[0]
    entry = load(dump / r["path"])
    assert r["sqnr_db"] == sqnr_db(entry.hp, entry.quantized)
    assert r["shape"] == "x".join(map(str, entry.hp.shape))


def test_error_command_on_a_dump_entry_and_on_pt_files(dump, tmp_path, capsys):
    entry = dump / read_manifest(dump)[0]["path"]
    assert main(["error", str(entry), "--formats", "mxfp4,hif4,nvfp4,mxfp8e4m3,bf16"]) == 0
    out = capsys.readouterr().out
    assert "quantized along dim -1" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| format")]
    sqnr = [float(line.split("|")[2]) for line in table]
    assert len(table) == 5 and sqnr == sorted(sqnr, reverse=True) and table[0].startswith("| bf16 ")
    # .pt read with weights_only=True: a tensor, or a dict picked with --name
    x = torch.randn(8, 64)
    torch.save(x, tmp_path / "x.pt")
    torch.save({"w": x, "b": torch.zeros(8)}, tmp_path / "sd.pt")
    save_file({"only": x}, tmp_path / "x.safetensors")
    for args in (["x.pt"], ["sd.pt", "--name", "w"], ["x.safetensors"]):
        assert main(["error", str(tmp_path / args[0]), *args[1:], "--formats", "mxfp4", "--dim", "0"]) == 0
        out = capsys.readouterr().out
        expected = sqnr_db(x, quant_dequant(x, QType("mxfp4").dim(0)))
        assert f"| mxfp4 | {expected:.4g} |" in out
    assert main(["error", str(tmp_path / "sd.pt")]) == 2
    assert "pick one with --name" in capsys.readouterr().err
    assert main(["error", str(tmp_path / "x.pt"), "--formats", "mxfp9"]) == 2


def test_error_rows_and_saturation():
    x = torch.tensor([[7.0, 1.0, 0.3, -0.25, 5.7] + [0.0] * 27])
    rows = {r["format"]: r for r in error_rows(x, [QType("e2m1k8b32"), QType("mxfp4"), QType("tmx6")])}
    assert rows["e2m1k8b32"]["saturated_pct"] == pytest.approx(100 / 32)  # 7 -> 6
    assert rows["mxfp4"]["saturated_pct"] == 0.0
    assert rows["tmx6"]["saturated_pct"] is None  # no bit encoding: not measured
    stats = tensor_stats(x, quant_dequant(x, QType("mxfp4")), QType("mxfp4"))
    assert stats["flushed_pct"] == pytest.approx(100 * 2 / 5)  # 0.3 -> 0, -0.25 -> -0 (of 5 non-zeros)
    assert (stats["scale_exp_min"], stats["scale_exp_max"]) == (1, 1)


def test_scaling_sweep(dump, tmp_path, capsys):
    entry = dump / read_manifest(dump)[0]["path"]
    out = tmp_path / "sweep"
    assert main(["scaling-sweep", str(entry), "--formats", "mxfp4,mxfp8e4m3,e0m3k8b32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mxfp4 | mse |" in printed and "| mxfp4 | round-2 |" in printed
    _png_ok(out / "scaling_sweep.png", min_w=1000)
    with open(out / "scaling_sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 10
    x, _, axis = load_tensor(entry)
    rows = sweep_rows(x, [QType("mxfp4"), QType("e2m3k8b32")], axis)
    by = {(r["format"], r["setting"]): r["sqnr_db"] for r in rows}
    for fmt, own in (("mxfp4", "round"), ("e2m3k8b32", "floor")):
        assert by[(fmt, f"{own}+0")] == by[(fmt, own)]  # offset 0 is the format's own rule
        # the per-block MSE-best scale beats every rule on the total error
        assert all(by[(fmt, "mse")] >= by[(fmt, r)] - 1e-9 for r in ("floor", "round", "ceil", "rceil"))
    # an offset is a power-of-two scale change of the own rule: +1 on floor = ceil for non-power-of-two maxima
    assert math.isfinite(by[("mxfp4", "round+2")])
    with pytest.raises(ValueError, match="MX block floats"):
        sweep_rows(x, [QType("hif4")])
