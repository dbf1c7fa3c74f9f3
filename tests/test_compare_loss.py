"""compare-loss: each input kind on checked-in fixtures (tests/data/loss_logs/README.md lists their numbers),
alignment, gap numbers worked by hand, the --max-gap exit code both ways, error messages, and the PNG."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakequant import compare_loss as cl
from fakequant.cli import main
from fakequant.compare_loss import Run, align, check_gaps, gap_table, load_run, plot_runs, smooth

LOGS = Path(__file__).parent / "data" / "loss_logs"
REPO = Path(__file__).parent.parent
FIXTURES = [LOGS / "bf16", LOGS / "mxfp8.log", LOGS / "mxfp4.csv", LOGS / "nvfp4"]
STEPS = list(range(10, 101, 10))
BF16 = [4.0, 3.5, 3.2, 3.0, 2.8, 2.6, 2.5, 2.4, 2.2, 2.0]


def f32(x: float) -> float:
    """What a TensorBoard simple_value (float32) holds for x."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def fixture_runs() -> list[Run]:
    return [load_run(p) for p in FIXTURES]


# ------------------------------------------------------------------------------------------- readers


def test_lightning_csv_folder():
    run = load_run(LOGS / "bf16")
    assert (run.name, run.metric) == ("bf16", "train_loss")
    assert run.steps.tolist() == STEPS and run.values.tolist() == BF16
    assert run.source.endswith("version_0/metrics.csv")
    # the version folder and the file itself read the same and get the same name
    for p in (LOGS / "bf16/lightning_logs/version_0", LOGS / "bf16/lightning_logs/version_0/metrics.csv"):
        again = load_run(p)
        assert again.name == "bf16" and again.values.tolist() == BF16
    # val rows leave train_loss empty and vice versa
    val = load_run(LOGS / "bf16", metric="val_loss")
    assert val.steps.tolist() == [50, 100] and val.values.tolist() == [2.9, 2.1]
    # comma-separated metric names: the first one present wins
    assert load_run(LOGS / "bf16", metric="val/loss,val_loss").metric == "val_loss"


def test_lightning_latest_version_by_number(tmp_path):
    for version, loss in (("version_2", 1.0), ("version_10", 2.0)):  # 10 > 2 though "version_10" < "version_2"
        (tmp_path / "lightning_logs" / version).mkdir(parents=True)
        (tmp_path / "lightning_logs" / version / "metrics.csv").write_text(f"epoch,step,train_loss\n0,1,{loss}\n")
    run = load_run(tmp_path)
    assert run.values.tolist() == [2.0]
    assert run.notes == ("read version_10, the latest of 2 version folders",)


def test_folder_with_several_runs_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("step,loss\n1,1.0\n")
    with pytest.raises(ValueError, match=r"holds metrics.csv files of several runs .*a.*b.*; pass one of them"):
        load_run(tmp_path)


def test_tensorboard_fixture_written_by_summarywriter():
    # nvfp4/version_0 was written by torch.utils.tensorboard.SummaryWriter (make_tensorboard_fixture.py)
    run = load_run(LOGS / "nvfp4")
    assert (run.name, run.metric) == ("nvfp4", "train_loss")
    assert run.steps.tolist() == STEPS
    assert run.values.tolist() == [f32(v) for v in (4.0, 3.5, 3.21, 3.0, 2.8, 2.61, 2.5, 2.4, 2.2, 1.98)]
    val = load_run(LOGS / "nvfp4", metric="val_loss")
    assert val.steps.tolist() == [50, 100] and val.values.tolist() == [f32(2.9), f32(2.08)]
    event_file = next((LOGS / "nvfp4/version_0").glob("events.out.tfevents.*"))
    assert load_run(event_file).values.tolist() == run.values.tolist() and load_run(event_file).name == "nvfp4"


def test_crc32c_check_value():
    crc = 0xE3069283  # CRC-32C of b"123456789", the standard check value
    assert cl._masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# A minimal protobuf / TFRecord writer for events TensorBoard's own writers produce but PyTorch's does not.
def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + (_varint(len(payload)) + payload if wire == 2 else payload)


def _record(event: bytes) -> bytes:
    header = struct.pack("<Q", len(event))
    return header + struct.pack("<I", cl._masked_crc32c(header)) + event + struct.pack("<I", cl._masked_crc32c(event))


def _scalar_event(step: int, tag: str, tensor: bytes) -> bytes:
    value = _field(1, 2, tag.encode()) + _field(8, 2, tensor)
    return _field(1, 1, struct.pack("<d", 1.7e9)) + _field(2, 0, _varint(step)) + _field(5, 2, _field(1, 2, value))


def test_tensorboard_tensor_summaries_and_truncated_tail(tmp_path):
    # TF2 tf.summary.scalar writes a 0-d TensorProto: dtype (1) DT_FLOAT=1 with float_val (5), or
    # DT_DOUBLE=2 with tensor_content (4); a histogram-like tensor with several values is not a scalar.
    records = [_field(3, 2, b"brain.Event:2"),
               _scalar_event(1, "loss", _field(1, 0, _varint(1)) + _field(5, 2, struct.pack("<f", 2.5))),
               _scalar_event(2, "loss", _field(1, 0, _varint(2)) + _field(4, 2, struct.pack("<d", 2.25))),
               _scalar_event(2, "hist", _field(1, 0, _varint(1)) + _field(5, 2, struct.pack("<3f", 1, 2, 3)))]
    data = b"".join(_record(r) for r in records)
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(data + _record(records[1])[:-7])  # a record cut short, as when the writer is still running
    run = load_run(path)
    assert run.metric == "loss" and run.steps.tolist() == [1, 2] and run.values.tolist() == [2.5, 2.25]
    assert "ignored a truncated last record" in run.notes[0]
    with pytest.raises(ValueError, match=r"no scalar tag matches metric 'val_loss'; available: \['loss'\]"):
        load_run(path, metric="val_loss")


def test_tensorboard_summarywriter_roundtrip(tmp_path):
    pytest.importorskip("tensorboard")  # torch's SummaryWriter needs it; the reader does not
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run"))
    for step in range(0, 50, 7):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.close()
    run = load_run(tmp_path / "run")
    assert run.metric == "train/loss" and run.steps.tolist() == list(range(0, 50, 7))
    assert run.values.tolist() == [f32(1.0 / (s + 1)) for s in range(0, 50, 7)]


def test_plain_csv():
    run = load_run(LOGS / "mxfp4.csv")
    assert (run.name, run.metric) == ("mxfp4", "loss")
    assert run.steps.tolist() == STEPS
    assert run.values.tolist() == [4.1, 3.6, 3.3, 3.1, 2.9, 2.7, 2.6, 2.5, 2.31, 2.06]


def test_plain_csv_headerless_and_repeated_steps(tmp_path):
    p = tmp_path / "resumed.csv"
    p.write_text("0,3.0\n10,2.0\n20,1.5\n10,2.5\n20,1.25\n30,1.0\n")  # resumed from step 10: the rerun wins
    run = load_run(p)
    assert run.steps.tolist() == [0, 10, 20, 30] and run.values.tolist() == [3.0, 2.5, 1.25, 1.0]
    assert run.notes == ("2 repeated steps, kept the last value of each",)


def test_megatron_log_drops_nan_and_skipped_iterations():
    run = load_run(LOGS / "mxfp8.log")
    assert (run.name, run.metric) == ("mxfp8", "lm loss")
    # 30: "lm loss: NAN"; 50: a loss printed but 1 skipped iteration; 70: all 10 skipped, no loss printed
    assert run.steps.tolist() == [10, 20, 40, 60, 80, 90, 100]
    assert run.values.tolist() == [4.04, 3.52, 3.03, 2.62, 2.42, 2.233, 2.02]
    assert run.notes == ("dropped 3 of 10 lines: 1 with a nan/inf loss, 2 with skipped or nan iterations",)
    val = load_run(LOGS / "mxfp8.log", metric="val lm loss")
    assert val.steps.tolist() == [50, 100] and val.values.tolist() == [2.95, 2.15]
    assert load_run(LOGS / "mxfp8.log", metric="grad norm").values.tolist() == [2.345] * 7


# ---------------------------------------------------------------------------------- alignment, gaps


def test_alignment_on_baseline_steps_interpolates_missing_ones():
    bf16, mxfp8 = load_run(LOGS / "bf16"), load_run(LOGS / "mxfp8.log")
    steps, values = align([bf16, mxfp8], bf16)
    assert steps.tolist() == STEPS
    assert values[0].tolist() == BF16
    # dropped Megatron steps 30, 50, 70 are interpolated between their neighbours
    expected = [4.04, 3.52, (3.52 + 3.03) / 2, 3.03, (3.03 + 2.62) / 2, 2.62, (2.62 + 2.42) / 2, 2.42, 2.233, 2.02]
    assert values[1].tolist() == pytest.approx(expected, rel=1e-15)


def test_alignment_off_grid_and_ranges():
    base = Run("base", [0, 10, 20, 30], [4.0, 3.0, 2.0, 1.0])
    other = Run("other", [5, 15, 25], [10.0, 20.0, 40.0])  # logs between the baseline's steps
    steps, values = align([base, other], base)
    assert steps.tolist() == [10, 20]  # 0 and 30 lie outside other's range: never extrapolated
    assert values.tolist() == [[3.0, 2.0], [15.0, 30.0]]
    # an exactly logged step keeps its value beside a NaN neighbour (np.interp would give NaN)
    nan_next = Run("nan_next", [10, 20, 30], [1.0, math.nan, 3.0])
    assert np.isnan(cl._interp_at(nan_next, np.array([15]))[0])
    assert cl._interp_at(nan_next, np.array([10, 30])).tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"no steps in common with the baseline 'base' .*far: 100-200"):
        align([base, Run("far", [100, 200], [1.0, 1.0])], base)


def test_gap_table_numbers_by_hand():
    table = gap_table(fixture_runs(), "bf16")
    # 10 common steps, window = ceil(0.2 * 10) = 2 steps: 90 and 100, baseline 2.2 and 2.0
    assert (table.window, table.n_window, table.n_common) == ((90, 100), 2, 10)
    mxfp8, mxfp4, nvfp4 = table.row("mxfp8"), table.row("mxfp4"), table.row("nvfp4")
    # mxfp8: (2.233 - 2.2) / 2.2 = 1.5%, (2.02 - 2.0) / 2.0 = 1%
    assert mxfp8.mean_gap == pytest.approx((0.015 + 0.01) / 2) and mxfp8.max_gap == pytest.approx(0.015)
    # mxfp4: 0.11 / 2.2 = 5%, 0.06 / 2 = 3%
    assert mxfp4.mean_gap == pytest.approx(0.04) and mxfp4.max_gap == pytest.approx(0.05)
    # nvfp4 (float32 values): 0% and -1%; signed, so a lower loss gives a negative gap
    assert nvfp4.mean_gap == pytest.approx(-0.005, abs=1e-7) and nvfp4.max_gap == pytest.approx(0.0, abs=1e-7)
    assert mxfp4.final == 2.06 and mxfp4.last_step == 100 and not mxfp4.ends_early
    base = table.row("bf16")
    assert base.is_baseline and (base.mean_gap, base.max_gap, base.final) == (0.0, 0.0, 2.0)
    assert check_gaps(table, 0.045) == []
    assert check_gaps(table, 0.03) == ["mxfp4: mean gap +4.00% > 3.00%"]


def test_gap_table_window_frac_and_baseline_choice():
    table = gap_table(fixture_runs(), "bf16", window_frac=0.5)  # 5 steps: 60..100
    assert table.window == (60, 100)
    gaps = [0.1 / 2.6, 0.1 / 2.5, 0.1 / 2.4, 0.11 / 2.2, 0.06 / 2.0]
    assert table.row("mxfp4").mean_gap == pytest.approx(sum(gaps) / 5)
    assert table.row("mxfp4").max_gap == pytest.approx(0.05)
    # baseline by name: gaps of bf16 relative to mxfp4 at 90, 100
    flipped = gap_table(fixture_runs(), "mxfp4")
    assert flipped.row("bf16").mean_gap == pytest.approx((-0.11 / 2.31 - 0.06 / 2.06) / 2)
    assert gap_table(fixture_runs()).baseline == "bf16"  # default: the first run
    with pytest.raises(ValueError, match=r"baseline 'fp32' is not one of the runs \['bf16', 'mxfp8', "):
        gap_table(fixture_runs(), "fp32")
    with pytest.raises(ValueError, match=r"window_frac must be in \(0, 1\], got 0"):
        gap_table(fixture_runs(), "bf16", window_frac=0)


def test_gate_fails_on_nonfinite_and_early_end():
    base = Run("base", range(0, 100, 10), [1.0] * 10)
    diverged = Run("diverged", range(0, 100, 10), [1.0] * 8 + [math.nan, math.inf])
    late_by_one = Run("late_by_one", range(1, 91, 10), [1.0] * 9)  # 1, 11, ..., 81: within one interval of 90
    table = gap_table([base, diverged, late_by_one], "base")
    assert table.window == (70, 80)  # common steps: base's inside [1, 81], 10..80; the last ceil(0.2 * 8) = 2
    assert check_gaps(table, 0.5) == ["diverged: mean gap is nan (non-finite loss in the window)"]
    short = Run("short", range(0, 50, 10), [1.0] * 5)  # stops at 40 of 90: crashed, or stopped on a NaN
    table = gap_table([base, short], "base")
    assert table.window == (40, 40)  # common steps end where the short run ends
    assert table.row("short").mean_gap == 0.0 and table.row("short").ends_early
    assert check_gaps(table, 0.5) == ["short: log ends at step 40, the baseline's at 90"]


def test_smooth():
    run = Run("r", [0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, math.nan])
    # trailing mean over 2 logged points (1 at the start); a NaN only spoils the windows holding it
    assert smooth(run, 2).values[:4].tolist() == [1.0, 1.5, 2.5, 3.5] and math.isnan(smooth(run, 2).values[4])
    assert smooth(Run("r", [0, 1, 2], [3.0, 6.0, 9.0]), 3).values.tolist() == [3.0, 4.5, 6.0]
    assert smooth(run, 1) is run
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        smooth(run, 0)


# -------------------------------------------------------------------------------------------- the CLI


def test_cli_max_gap_exit_code_both_ways(tmp_path, capsys):
    args = ["compare-loss", *map(str, FIXTURES), "--out", str(tmp_path / "p.png")]
    assert main(args + ["--max-gap", "0.045"]) == 0
    out = capsys.readouterr().out
    assert "| mxfp4 | 100 | 2.0600 | +4.00% | +5.00% | ok |" in out and "PASS" in out
    assert "gaps relative to 'bf16' over steps 90-100 (the last 2 of 10 common steps" in out
    assert main(args + ["--max-gap", "0.03"]) == 1
    captured = capsys.readouterr()
    assert "| mxfp4 | 100 | 2.0600 | +4.00% | +5.00% | FAIL |" in captured.out
    assert "| mxfp8 | 100 | 2.0200 | +1.25% | +1.50% | ok |" in captured.out
    assert captured.err == "FAIL mxfp4: mean gap +4.00% > 3.00%\n"
    assert main(args) == 0  # no --max-gap: a report, never a failure


def test_cli_labels_baseline_smooth(tmp_path, capsys):
    out = tmp_path / "p.png"
    code = main(["compare-loss", *map(str, FIXTURES), "--labels", "a,b,c,d", "--baseline", "c", "--smooth", "2",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.stat().st_size > 0
    assert "gaps relative to 'c'" in text and "(smoothed over 2 points)" in text
    # c = mxfp4 smoothed over 2 points: final (2.31 + 2.06) / 2 = 2.185
    assert "| c | 100 | 2.1850 | baseline | baseline |" in text
    assert "b: " in text and "dropped 3 of 10 lines" in text  # the Megatron notes are printed


@pytest.mark.parametrize("content, match", [
    ("", r"empty\.csv: file is empty"),
    ("step,loss\n", r"empty\.csv: no data rows under the header \['step', 'loss'\]"),
    ("epoch,loss\n0,1.0\n", r"empty\.csv: no step column \(one of \['step', "),
    ("step,loss\n1,abc\n", r"empty\.csv, line 2, column 'loss': cannot read 'abc' as a number"),
    ("step,accuracy\n1,0.5\n", r"empty\.csv: no column matches any default loss name; available: \['accuracy'\]"),
    ("step,loss\n1,\n", r"empty\.csv: column 'loss' has no values"),
])
def test_bad_csv_messages_name_the_file(tmp_path, content, match):
    p = tmp_path / "empty.csv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_run(p)


def test_bad_inputs_messages(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"nope\.log: no such file or directory"):
        load_run(tmp_path / "nope.log")
    (tmp_path / "empty.log").write_text("")
    with pytest.raises(ValueError, match=r"empty\.log: file is empty"):
        load_run(tmp_path / "empty.log")
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a CSV or TensorBoard file, and no Megatron-style"):
        load_run(tmp_path / "notes.txt")
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"junk\.bin: not a CSV or TensorBoard file"):
        load_run(tmp_path / "junk.bin")
    (tmp_path / "events.out.tfevents.0.bad").write_bytes(b"not an event file at all")
    with pytest.raises(ValueError, match=r"events\.out\.tfevents\.0\.bad: not a TensorBoard event file"):
        load_run(tmp_path / "events.out.tfevents.0.bad")
    (tmp_path / "nanonly.log").write_text("iteration 1/ 2 | lm loss: nan |\niteration 2/ 2 | lm loss: nan |\n")
    with pytest.raises(ValueError, match=r"nanonly\.log: no usable 'lm loss' values \(dropped 2 of 2 lines"):
        load_run(tmp_path / "nanonly.log")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match=r"emptydir: no metrics.csv \(Lightning CSV logger\) or events"):
        load_run(tmp_path / "emptydir")
    # the CLI prints the message with the file's name and exits 2
    assert main(["compare-loss", str(LOGS / "bf16"), str(tmp_path / "empty.log"), "--out", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fakequant compare-loss: error: ") and "empty.log: file is empty" in err
    assert main(["compare-loss", str(LOGS / "bf16"), str(tmp_path / "gone"), "--out", ""]) == 2
    assert "gone: no such file or directory" in capsys.readouterr().err
    assert main(["compare-loss", *map(str, FIXTURES[:2]), "--labels", "x", "--out", ""]) == 2
    assert "--labels: 1 labels for 2 runs" in capsys.readouterr().err
    assert main(["compare-loss", *map(str, FIXTURES[:2]), "--metric", "val_loss", "--out", ""]) == 2
    assert "mxfp8.log: no logged value matches metric 'val_loss'; available: [" in capsys.readouterr().err


def test_png_is_written_and_readable(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    runs = fixture_runs()
    out = plot_runs(runs, tmp_path / "sub" / "loss.png", "bf16", window=(90, 100))
    assert out.stat().st_size > 0
    pixels = image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    # two panels (train and validation) as the demo draws them; colours follow the run across panels
    vals = [load_run(p, metric="val_loss,val lm loss") for p in (LOGS / "bf16", LOGS / "mxfp8.log", LOGS / "nvfp4")]
    both = plot_runs({"train loss": runs, "validation loss": vals}, tmp_path / "both.png", "bf16", zoom_frac=None)
    assert image.imread(both).shape[0] > pixels.shape[0]


def test_script_runs_the_subcommand(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "compare_loss.py"), *map(str, FIXTURES), "--max-gap", "0.03",
           "--out", str(tmp_path / "p.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "FAIL mxfp4" in done.stderr and (tmp_path / "p.png").stat().st_size > 0
