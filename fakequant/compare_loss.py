"""Loss-curve comparison: read the logs of several training runs, align them by step, plot them, and measure
how far each run drifts from a baseline (``fakequant compare-loss``; ``scripts/compare_loss.py`` calls it).

Inputs, recognised by what they are (``load_run``):

- a Lightning CSV logger folder (``metrics.csv`` in it, or in ``version_<N>`` folders below it: the highest
  ``N`` is taken) or a ``metrics.csv`` file;
- a TensorBoard event folder (``events.out.tfevents.*`` in it or below, same ``version_<N>`` rule; several
  event files in one folder are merged) or one event file: scalar summaries, both the ``simple_value`` kind
  (PyTorch ``SummaryWriter``, tensorboardX) and the one-element ``tensor`` kind (TF2 ``tf.summary.scalar``).
  A small pure-Python reader is used, so no TensorBoard install is needed;
- any other ``.csv`` file: a step column (``step``, ``iteration``, ``iter``, ``global_step``, ...) and metric
  columns, or two header-less numeric columns read as ``step,loss``;
- anything else: a Megatron-style text log, lines ``iteration  120/ 5000 | ... | lm loss: 3.456E+00 | ...``.
  Lines whose loss is NaN/inf or missing, and lines reporting skipped or NaN iterations, are dropped (and
  counted in the run's notes); ``validation loss at iteration N | lm loss value: X |`` lines give the metric
  ``val lm loss``.

Which column or tag is the loss: the first of ``DEFAULT_METRICS`` present, or ``metric=`` (a name, or several
comma-separated names tried in order). Empty cells are skipped; a step logged twice keeps its last value (a
resumed run); NaN/inf values in CSV and TensorBoard logs are kept, since a diverged run is data.

Comparison (``gap_table``): runs are aligned on the baseline's steps that lie inside every run's logged range
(the *common steps*); where a run did not log that exact step, its value is linearly interpolated between its
two neighbouring logged steps (never extrapolated). The relative gap of a run at a step is
``(run - baseline) / |baseline|``, signed, so positive means a higher loss than the baseline. Over the window
(the last ``window_frac`` of the common steps, rounded up, at least one step), the table reports the mean and
the max of that gap; ``check_gaps`` fails a run whose mean gap exceeds the tolerance, is not finite, or whose
log stops more than one logging interval before the baseline's. Smoothing (``smooth``), when asked for, is
applied to each run before alignment, so the table describes the curves that are plotted.

Public: ``Run``, ``load_run``, ``smooth``, ``align``, ``gap_table``, ``GapTable``, ``GapRow``, ``format_table``,
``check_gaps``, ``plot_runs``, ``DEFAULT_METRICS``, ``register`` (the CLI subcommand).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_METRICS",
    "GapRow",
    "GapTable",
    "Run",
    "align",
    "check_gaps",
    "format_table",
    "gap_table",
    "load_run",
    "plot_runs",
    "register",
    "smooth",
]

# Tried in this order when no metric is named: the training loss under the names Lightning scripts,
# nanoGPT-style scripts and Megatron use.
DEFAULT_METRICS = (
    "train_loss", "train/loss", "loss", "train_loss_step", "train/loss_step", "lm loss", "lm_loss",
    "train/lm_loss", "training_loss",
)
# Step columns of a CSV file, in order of preference (matched case-insensitively).
STEP_COLUMNS = ("step", "iteration", "iter", "global_step", "trainer/global_step", "_step")
# Folder names skipped when a run's name is taken from its path.
_LOGGER_DIRS = {"lightning_logs", "tb_logs", "csv_logs", "logs", "tensorboard", "tb"}
_VERSION_DIR = re.compile(r"version_(\d+)")


# --------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True, eq=False)
class Run:
    """One loss curve: ``steps`` (int64, strictly increasing) and ``values`` (float64) of equal length.

    ``source`` is the file or folder it came from, ``metric`` the column or tag read, ``notes`` what the
    reader dropped or chose (printed by the CLI).
    """

    name: str
    steps: np.ndarray
    values: np.ndarray
    source: str = ""
    metric: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        where = self.source or self.name
        if steps.shape != values.shape:
            raise ValueError(f"{where}: {steps.size} steps but {values.size} values")
        if steps.size == 0:
            raise ValueError(f"{where}: no data points")
        if np.any(np.diff(steps) <= 0):
            raise ValueError(f"{where}: steps must be strictly increasing")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def last_step(self) -> int:
        return int(self.steps[-1])

    @property
    def final(self) -> float:
        return float(self.values[-1])

    def log_interval(self) -> int:
        """The median distance between logged steps (0 for a single point)."""
        return int(np.median(np.diff(self.steps))) if self.steps.size > 1 else 0


def _finish(pairs: list[tuple[int, float]], notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sort by step, keeping the last value of a step logged more than once (a resumed run rewrites it)."""
    by_step: dict[int, float] = {}
    for step, value in pairs:
        by_step[step] = value
    if len(by_step) < len(pairs):
        notes.append(f"{len(pairs) - len(by_step)} repeated steps, kept the last value of each")
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def _choose_metric(available: Sequence[str], metric: str | None, where: str, what: str) -> str:
    wanted = [m.strip() for m in metric.split(",") if m.strip()] if metric else list(DEFAULT_METRICS)
    for m in wanted:
        if m in available:
            return m
    tried = "metric " + ", ".join(map(repr, wanted)) if metric else "any default loss name"
    raise ValueError(f"{where}: no {what} matches {tried}; available: {list(available)} "
                     f"(choose one with --metric / metric=)")


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r} as a number") from None


def _step(text: str, where: str) -> int:
    value = _number(text, where)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{where}: step {text!r} is not an integer")
    return int(value)


# ----------------------------------------------------------------------------------------- CSV files


def _read_csv(path: Path, metric: str | None) -> tuple[str, list[tuple[int, float]], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text CSV file ({err.reason} at byte {err.start})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: file is empty")
    notes: list[str] = []

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    if all(numeric(c) for c in rows[0]):  # header-less: step, loss[, ...]
        if len(rows[0]) < 2:
            raise ValueError(f"{path}: a header-less CSV needs two columns, step and loss")
        header, body, first_line = ["step", "loss"] + [f"column{i}" for i in range(2, len(rows[0]))], rows, 1
    else:
        header, body, first_line = [c.strip() for c in rows[0]], rows[1:], 2
    if not body:
        raise ValueError(f"{path}: no data rows under the header {header}")
    lower = [h.lower() for h in header]
    step_col = next((lower.index(s) for s in STEP_COLUMNS if s in lower), None)
    if step_col is None:
        raise ValueError(f"{path}: no step column (one of {list(STEP_COLUMNS)}) in the header {header}")
    candidates = [h for i, h in enumerate(header) if i != step_col]
    name = _choose_metric(candidates, metric, str(path), "column")
    col = header.index(name)
    pairs = []
    for lineno, row in enumerate(body, start=first_line):
        if col >= len(row) or step_col >= len(row) or not row[col].strip() or not row[step_col].strip():
            continue  # Lightning writes one row per logging call; other metrics leave this cell empty
        where = f"{path}, line {lineno}"
        pairs.append((_step(row[step_col], where), _number(row[col], f"{where}, column {name!r}")))
    if not pairs:
        raise ValueError(f"{path}: column {name!r} has no values")
    return name, pairs, notes


# --------------------------------------------------------------------------------- TensorBoard events
# An event file is a TFRecord stream: uint64 length, uint32 masked CRC-32C of the length, the bytes of one
# `Event` protobuf, uint32 masked CRC-32C of those bytes. Only the length CRC is checked (it is what tells an
# event file from anything else); the payload CRC would cost a pure-Python pass over every byte.


@functools.lru_cache(maxsize=1)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return tuple(table)


def _masked_crc32c(data: bytes) -> int:
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _is_event_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) == 12 and struct.unpack("<I", head[8:])[0] == _masked_crc32c(head[:8])


def _records(path: Path, notes: list[str]):
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: file is empty")
    i = 0
    while len(data) - i >= 12:
        header = data[i:i + 8]
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc32c(header):
            if i == 0:
                raise ValueError(f"{path}: not a TensorBoard event file (bad record header)")
            raise ValueError(f"{path}: corrupted event record at byte {i}")
        end = i + 12 + struct.unpack("<Q", header)[0]
        if end + 4 > len(data):
            break
        yield data[i + 12:end]
        i = end + 4
    if i < len(data):
        notes.append(f"{path.name}: ignored a truncated last record (file still being written?)")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; values are ints or bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield key >> 3, wire, value


# TensorProto dtype enum -> struct format of tensor_content
_TF_DTYPES = {1: "f", 2: "d", 3: "i", 9: "q", 19: "e"}  # DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64, DT_HALF


def _tensor_values(buf: bytes) -> list[float]:
    """Numbers in a TensorProto: tensor_content (4), float_val (5), double_val (6), int_val (7),
    int64_val (10), half_val (13); packed or not."""
    dtype, out = 1, []
    for num, wire, value in _proto_fields(buf):
        if num == 1:
            dtype = value
        elif num == 4 and dtype in _TF_DTYPES:
            fmt = _TF_DTYPES[dtype]
            out += struct.unpack(f"<{len(value) // struct.calcsize(fmt)}{fmt}", value)
        elif num == 5:
            out += struct.unpack(f"<{len(value) // 4}f", value)
        elif num == 6:
            out += struct.unpack(f"<{len(value) // 8}d", value)
        elif num in (7, 10, 13):
            ints = [value] if wire == 0 else []
            j = 0
            while wire == 2 and j < len(value):
                v, j = _varint(value, j)
                ints.append(v)
            if num == 13:  # half_val holds the float16 bits
                out += [struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0] for v in ints]
            else:
                out += [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
    return out


def _scalar_events(path: Path, notes: list[str]):
    """(tag, step, value) of every scalar summary in one event file."""
    for record in _records(path, notes):
        step, summary = 0, None
        for num, _, value in _proto_fields(record):
            if num == 2:
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif num == 5:
                summary = value
        if summary is None:
            continue
        for num, _, value in _proto_fields(summary):
            if num != 1:
                continue
            tag, number = None, None
            for vnum, _, v in _proto_fields(value):
                if vnum == 1:
                    tag = v.decode("utf-8", "replace")
                elif vnum == 2:
                    number = struct.unpack("<f", v)[0]
                elif vnum == 8:
                    numbers = _tensor_values(v)
                    number = numbers[0] if len(numbers) == 1 else None  # histograms, text: not scalars
            if tag is not None and number is not None:
                yield tag, step, float(number)


def _read_events(files: list[Path], metric: str | None, where: str):
    notes: list[str] = []
    by_tag: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        try:
            for tag, step, value in _scalar_events(f, notes):
                by_tag.setdefault(tag, []).append((step, value))
        except (ValueError, IndexError, struct.error) as err:
            msg = str(err) if str(err).startswith(str(f)) else f"{f}: unreadable event record ({err})"
            raise ValueError(msg) from None
    if len(files) > 1:
        notes.append(f"merged {len(files)} event files")
    if not by_tag:
        raise ValueError(f"{where}: no scalar summaries in {', '.join(str(f) for f in files)}")
    name = _choose_metric(sorted(by_tag), metric, where, "scalar tag")
    return name, by_tag[name], notes


# ------------------------------------------------------------------------------------ Megatron logs

_ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*\d+\s*\|(.*)$")
_VALIDATION = re.compile(r"\bvalidation loss at iteration\s+(\d+)[^|]*\|(.*)$")
_FIELD = re.compile(r"^\s*([^:|]+?)\s*:\s*(\S+)\s*$")
_SKIP_COUNTERS = ("number of skipped iterations", "number of nan iterations")


def _fields_of(text: str) -> dict[str, float]:
    out = {}
    for part in text.split("|"):
        m = _FIELD.match(part)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


def _read_megatron(path: Path, metric: str | None):
    text = path.read_bytes().decode("utf-8", "replace")
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    train, val = [], []
    for line in text.splitlines():
        if m := _ITERATION.search(line):
            train.append((int(m.group(1)), _fields_of(m.group(2))))
        elif m := _VALIDATION.search(line):
            fields = {f"val {k.removesuffix(' value')}": v for k, v in _fields_of(m.group(2)).items()}
            val.append((int(m.group(1)), fields))
    if not train and not val:
        raise ValueError(f"{path}: not a CSV or TensorBoard file, and no Megatron-style lines "
                         f"'iteration N/ M | ... | lm loss: X |' in it")
    available = sorted({k for _, f in train + val for k in f if k not in _SKIP_COUNTERS})
    name = _choose_metric(available, metric, str(path), "logged value")
    rows = val if name.startswith("val ") else train
    pairs, nan, skipped, missing = [], 0, 0, 0
    for step, fields in rows:
        skip = any(fields.get(c, 0) > 0 for c in _SKIP_COUNTERS)
        if name in fields and not math.isfinite(fields[name]):
            nan += 1
        elif skip:
            # Megatron skipped the update (loss-scale overflow or a NaN); a fully skipped interval prints
            # no loss at all, a partly skipped one the mean of the others: neither is a plain training step.
            skipped += 1
        elif name not in fields:
            missing += 1
        else:
            pairs.append((step, fields[name]))
    notes = []
    if nan or skipped or missing:
        parts = [f"{nan} with a nan/inf loss" if nan else "", f"{skipped} with skipped or nan iterations"
                 if skipped else "", f"{missing} without {name!r}" if missing else ""]
        notes.append(f"dropped {nan + skipped + missing} of {len(rows)} lines: " + ", ".join(p for p in parts if p))
    if not pairs:
        raise ValueError(f"{path}: no usable {name!r} values ({notes[0] if notes else 'none logged'})")
    return name, pairs, notes


# --------------------------------------------------------------------------------------- load_run


def _one_folder(root: Path, folders: list[Path], what: str, notes: list[str]) -> Path:
    """The folder to read when several hold logs: the latest ``version_<N>`` of one logger, else an error."""
    if len(folders) == 1:
        return folders[0]
    versions = {f: _VERSION_DIR.fullmatch(f.name) for f in folders}
    if all(versions.values()) and len({f.parent for f in folders}) == 1:
        latest = max(folders, key=lambda f: int(versions[f].group(1)))
        notes.append(f"read {latest.name}, the latest of {len(folders)} version folders")
        return latest
    listing = ", ".join(str(f) for f in sorted(folders))
    raise ValueError(f"{root}: holds {what} of several runs ({listing}); pass one of them")


def _default_name(path: Path) -> str:
    p = path.resolve()
    if p.is_file():
        if p.name != "metrics.csv" and "tfevents" not in p.name:
            return p.stem
        p = p.parent
    while (_VERSION_DIR.fullmatch(p.name) or p.name in _LOGGER_DIRS) and p.parent != p:
        p = p.parent
    return p.name or str(path)


def load_run(path: str | Path, metric: str | None = None, name: str | None = None) -> Run:
    """Read one run's loss curve from a log file or folder (see the module docstring for the kinds).

    ``metric``: the column / tag / Megatron key to read, or several comma-separated ones tried in order
    (default: the first of ``DEFAULT_METRICS`` present). ``name``: the run's label (default: taken from the
    path, skipping ``version_<N>`` and ``lightning_logs`` folders and ``metrics.csv``).
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file for anything unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    notes: list[str] = []
    if path.is_dir():
        csvs = [path / "metrics.csv"] if (path / "metrics.csv").is_file() else sorted(path.rglob("metrics.csv"))
        events = sorted(f for f in path.rglob("events.out.tfevents.*") if f.is_file())
        if csvs:
            folder = _one_folder(path, sorted({f.parent for f in csvs}), "metrics.csv files", notes)
            source = folder / "metrics.csv"
            metric_name, pairs, more = _read_csv(source, metric)
        elif events:
            folder = _one_folder(path, sorted({f.parent for f in events}), "TensorBoard event files", notes)
            source = folder
            metric_name, pairs, more = _read_events([f for f in events if f.parent == folder], metric, str(folder))
        else:
            raise ValueError(f"{path}: no metrics.csv (Lightning CSV logger) or events.out.tfevents.* "
                             f"(TensorBoard) file in this folder or below it")
    else:
        source = path
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty")
        if "tfevents" in path.name or _is_event_file(path):
            metric_name, pairs, more = _read_events([path], metric, str(path))
        elif path.suffix.lower() == ".csv":
            metric_name, pairs, more = _read_csv(path, metric)
        else:
            metric_name, pairs, more = _read_megatron(path, metric)
    notes += more
    steps, values = _finish(pairs, notes)
    return Run(name or _default_name(path), steps, values, source=str(source), metric=metric_name,
               notes=tuple(notes))


# ------------------------------------------------------------------------------------ comparison


def smooth(run: Run, k: int) -> Run:
    """Trailing moving average over ``k`` logged points (fewer at the start); ``k=1`` returns the run.

    A NaN/inf makes only the ``k`` averages whose window holds it non-finite.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"smooth: k must be an integer >= 1, got {k!r}")
    if k == 1:
        return run
    n = run.values.size
    # np.convolve sums over each window's overlap only, so a NaN stays inside the windows that hold it.
    sums = np.convolve(run.values, np.ones(k))[:n]
    values = sums / np.minimum(np.arange(1, n + 1), k)
    return Run(run.name, run.steps, values, run.source, run.metric, run.notes)


def _interp_at(run: Run, steps: np.ndarray) -> np.ndarray:
    """The run's value at each step in its range: exact where logged, else linear between its neighbours.

    (``np.interp`` is not used: it returns NaN at an exactly logged step whose neighbour is NaN.)
    """
    xs, ys = run.steps, run.values
    right = np.clip(np.searchsorted(xs, steps), 0, xs.size - 1)
    exact = xs[right] == steps
    left = np.clip(right - 1, 0, xs.size - 1)
    span = np.where(exact, 1, xs[right] - xs[left])
    w = np.where(exact, 0.0, (steps - xs[left]) / span)
    with np.errstate(invalid="ignore"):
        between = ys[left] * (1.0 - w) + ys[right] * w
    return np.where(exact, ys[right], between)


def align(runs: Sequence[Run], baseline: Run) -> tuple[np.ndarray, np.ndarray]:
    """The common steps (the baseline's steps inside every run's logged range) and the runs' values there,
    an array ``[len(runs), len(steps)]``. Raises ``ValueError`` when the runs do not overlap."""
    lo = max(int(r.steps[0]) for r in runs)
    hi = min(int(r.steps[-1]) for r in runs)
    steps = baseline.steps[(baseline.steps >= lo) & (baseline.steps <= hi)]
    if steps.size == 0:
        ranges = ", ".join(f"{r.name}: {r.steps[0]}-{r.steps[-1]} ({r.steps.size} points)" for r in runs)
        raise ValueError(f"the runs have no steps in common with the baseline {baseline.name!r} ({ranges})")
    return steps, np.stack([_interp_at(r, steps) for r in runs])


@dataclass(frozen=True)
class GapRow:
    """One run in a ``GapTable``. Gaps are fractions, signed: ``+0.02`` = 2% higher loss than the baseline."""

    name: str
    last_step: int
    final: float  # the run's own last (smoothed, if asked) value
    mean_gap: float  # over the window; 0 for the baseline
    max_gap: float
    is_baseline: bool
    ends_early: bool  # its log stops more than one logging interval before the baseline's


@dataclass(frozen=True)
class GapTable:
    """``gap_table``'s result: the rows in input order and the window they were measured over."""

    baseline: str
    window_frac: float
    window: tuple[int, int]  # first and last step of the window
    n_window: int  # common steps in the window
    n_common: int  # common steps in all
    rows: tuple[GapRow, ...]

    def row(self, name: str) -> GapRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no run {name!r}; runs: {[r.name for r in self.rows]}")


def _pick_baseline(runs: Sequence[Run], baseline: str | Run | None) -> Run:
    if not runs:
        raise ValueError("no runs to compare")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names} (set labels)")
    if baseline is None:
        return runs[0]
    if isinstance(baseline, Run):
        baseline = baseline.name
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {names}")
    return runs[names.index(baseline)]


def gap_table(runs: Sequence[Run], baseline: str | Run | None = None, window_frac: float = 0.2) -> GapTable:
    """Final loss of each run and its mean / max relative gap to ``baseline`` (a name; default the first run)
    over the last ``window_frac`` of the common steps (see the module docstring for the definitions)."""
    if not (isinstance(window_frac, (int, float)) and 0 < window_frac <= 1):
        raise ValueError(f"window_frac must be in (0, 1], got {window_frac!r}")
    base = _pick_baseline(runs, baseline)
    steps, values = align(runs, base)
    k = max(1, math.ceil(window_frac * steps.size - 1e-9))
    window = values[:, -k:]
    b = window[runs.index(base)]
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = (window - b) / np.abs(b)
    rows = []
    for i, r in enumerate(runs):
        is_base = r is base
        # A run ending early shrinks the common steps; more than one of its logging intervals short of the
        # baseline's end means it stopped (crashed, diverged, was cut), not that it logs on other steps.
        early = not is_base and r.last_step < base.last_step - max(r.log_interval(), 1)
        rows.append(GapRow(r.name, r.last_step, r.final, 0.0 if is_base else float(np.mean(gaps[i])),
                           0.0 if is_base else float(np.max(gaps[i])), is_base, early))
    return GapTable(base.name, float(window_frac), (int(steps[-k]), int(steps[-1])), k, int(steps.size),
                    tuple(rows))


def check_gaps(table: GapTable, max_gap: float) -> list[str]:
    """Why each run fails the tolerance ``max_gap`` (a fraction, e.g. 0.02); empty when all pass.

    A run fails when its mean relative gap is above ``max_gap`` or not finite, or when its log ends early.
    Runs with a lower loss than the baseline pass.
    """
    if not (isinstance(max_gap, (int, float)) and max_gap >= 0):
        raise ValueError(f"max_gap must be a number >= 0, got {max_gap!r}")
    base_last = table.row(table.baseline).last_step
    return [f for r in table.rows for f in _row_failures(r, base_last, max_gap)]


def _row_failures(r: GapRow, base_last: int, max_gap: float) -> list[str]:
    if r.is_baseline:
        return []
    failures = []
    if not math.isfinite(r.mean_gap):
        failures.append(f"{r.name}: mean gap is {r.mean_gap} (non-finite loss in the window)")
    elif r.mean_gap > max_gap:
        failures.append(f"{r.name}: mean gap {r.mean_gap:+.2%} > {max_gap:.2%}")
    if r.ends_early:
        failures.append(f"{r.name}: log ends at step {r.last_step}, the baseline's at {base_last}")
    return failures


def format_table(table: GapTable, max_gap: float | None = None) -> str:
    """A Markdown table (run, last step, final loss, mean gap, max gap[, verdict]) under a line naming the
    window and baseline."""
    def pct(x: float) -> str:
        return f"{x:+.2%}" if math.isfinite(x) else str(x)

    head = (f"gaps relative to {table.baseline!r} over steps {table.window[0]}-{table.window[1]} "
            f"(the last {table.n_window} of {table.n_common} common steps, window {table.window_frac:g})")
    cols = ["run", "last step", "final loss", "mean gap", "max gap"] + (["verdict"] if max_gap is not None else [])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table.rows:
        cells = [r.name, str(r.last_step), f"{r.final:.4f}"]
        cells += ["baseline", "baseline"] if r.is_baseline else [pct(r.mean_gap), pct(r.max_gap)]
        if max_gap is not None:
            failed = _row_failures(r, table.row(table.baseline).last_step, max_gap)
            cells.append("-" if r.is_baseline else ("FAIL" if failed else "ok"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot


def plot_runs(runs: Sequence[Run] | Mapping[str, Sequence[Run]], out: str | Path,
              baseline: str | None = None, *, title: str | None = None, ylabel: str = "loss",
              zoom_frac: float | None = 0.2, window: tuple[int, int] | None = None) -> Path:
    """Write a PNG of loss vs step, one line per run, the baseline black and dashed, axes labelled.

    ``runs``: a list of runs (one panel), or ``{panel title: runs}`` for several panels (e.g. train and
    validation loss), one per row, each run keeping its colour across panels. ``baseline``: a run name
    (default the first run of each panel). ``zoom_frac``: with a number, each panel gets a second plot of
    the end of the run with the y axis fitted to it, where gaps of a percent become visible: the steps of
    ``window`` if given (``GapTable.window``, shaded in both plots), else the last ``zoom_frac`` of the steps;
    ``None`` for the full curves only. Runs with few points get markers. Returns the path written.
    Needs matplotlib; uses no pyplot state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is an optional dependency (the lightning / dev extras)
        raise ImportError("plot_runs needs matplotlib: pip install matplotlib") from err
    panels = dict(runs) if isinstance(runs, Mapping) else {title or "": list(runs)}
    if not panels or not all(panels.values()):
        raise ValueError("plot_runs: nothing to plot")
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    names = list(dict.fromkeys(r.name for rs in panels.values() for r in rs if r.name != baseline))
    colour = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    ncols = 2 if zoom_frac else 1
    fig = Figure(figsize=(6.0 * ncols, 4.2 * len(panels)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    for row, (panel_title, panel_runs) in enumerate(panels.items()):
        base = _pick_baseline(panel_runs, baseline).name
        first = min(int(r.steps[0]) for r in panel_runs)
        last = max(int(r.steps[-1]) for r in panel_runs)
        if window is not None and window[0] < window[1]:
            lo, hi, zoom_title = window[0], window[1], f"compared window, steps {window[0]}-{window[1]}"
        else:
            lo, hi, zoom_title = last - (zoom_frac or 1) * (last - first), last, f"last {zoom_frac or 1:.0%} of steps"
        name = panel_title or "loss"
        for col in range(ncols):
            ax = axes[row][col]
            seen = []  # finite values inside the zoomed range, to fit its y axis
            for r in sorted(panel_runs, key=lambda r: r.name == base):  # the baseline drawn last, on top
                style = dict(color="black", linestyle="--", linewidth=1.8, zorder=3, label=f"{r.name} (baseline)") \
                    if r.name == base else dict(color=colour.get(r.name, "#7f7f7f"), linewidth=1.4, zorder=2,
                                                label=r.name)
                if r.steps.size <= 40:
                    style.update(marker="o", markersize=3)
                ax.plot(r.steps, r.values, **style)
                if col == 1:
                    inside = (r.steps >= lo) & (r.steps <= hi)
                    edges = [s for s in (lo, hi) if r.steps[0] <= s <= r.steps[-1]]
                    y = np.concatenate([r.values[inside], _interp_at(r, np.array(edges, dtype=np.int64))])
                    seen.append(y[np.isfinite(y)])
            if col == 0 and window is not None and window[0] < window[1]:
                ax.axvspan(window[0], window[1], color="0.85", alpha=0.5, zorder=0,
                           label="compared window")
            if col == 1:
                finite = np.concatenate(seen)
                ax.set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
                if finite.size:
                    pad = 0.08 * (finite.max() - finite.min()) or 0.01 * abs(finite.max()) or 0.01
                    ax.set_ylim(finite.min() - pad, finite.max() + pad)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{name}: {zoom_title}" if col == 1 else name, fontsize=11)
            if col == 0:  # one legend per row: the zoomed plot has no free corner and shares the colours
                ax.legend(fontsize=9, framealpha=0.85)
    if title and isinstance(runs, Mapping):
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# -------------------------------------------------------------------------------------------- CLI


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _run(args: argparse.Namespace) -> int:
    labels = args.labels
    if labels and len(labels) == 1 and "," in labels[0]:
        labels = [s.strip() for s in labels[0].split(",")]
    if labels and len(labels) != len(args.runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
    runs = [load_run(p, metric=args.metric) for p in args.runs]
    names = labels or _unique([r.name for r in runs])
    runs = [Run(n, r.steps, r.values, r.source, r.metric, r.notes) for n, r in zip(names, runs)]
    for r in runs:
        print(f"{r.name}: {r.source} [{r.metric}] {r.steps.size} points, steps {r.steps[0]}-{r.steps[-1]}"
              + "".join(f"; {n}" for n in r.notes))
    runs = [smooth(r, args.smooth) for r in runs]
    table = gap_table(runs, args.baseline, args.window_frac)
    print()
    print(format_table(table, args.max_gap) + (f"\n(smoothed over {args.smooth} points)" if args.smooth > 1 else ""))
    if args.out:
        title = runs[0].metric if len({r.metric for r in runs}) == 1 else "loss"
        written = plot_runs(runs, args.out, table.baseline, title=title, zoom_frac=args.window_frac,
                            window=table.window)
        print(f"\nwrote {written}")
    if args.max_gap is None:
        return 0
    failures = check_gaps(table, args.max_gap)
    sys.stdout.flush()  # the table first, then the reasons, in a CI log that merges the two streams
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    if not failures:
        print(f"PASS: every run's mean gap to {table.baseline!r} is within {args.max_gap:.2%}")
    return 1 if failures else 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_EPILOG = """\
examples:
  fakequant compare-loss runs/bf16 runs/mxfp4 runs/nvfp4 --out loss.png
  fakequant compare-loss bf16.log mxfp8.log --labels bf16 mxfp8 --smooth 10 --max-gap 0.02   # CI gate
  fakequant compare-loss lightning_logs/version_3 tb_run/ --metric val_loss,val/loss

exit status: 0 ok, 1 a run exceeds --max-gap (or is non-finite, or its log ends early), 2 bad input.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare-loss", help="compare loss curves of several runs against a baseline (plot, table, CI gate)",
        description="Read Lightning CSV / TensorBoard / CSV / Megatron logs, align them by step, print each "
                    "run's final loss and mean / max relative gap to the baseline over the last steps, and "
                    "plot them.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_OR_LOG",
                   help="a Lightning CSV logger or TensorBoard folder, a CSV file, or a Megatron text log")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="one name per run (default: from the paths)")
    p.add_argument("--baseline", metavar="NAME", help="the run the others are compared to (default: the first)")
    p.add_argument("--metric", metavar="NAME[,NAME...]",
                   help=f"column / tag / key to read, first present wins (default: {', '.join(DEFAULT_METRICS)})")
    p.add_argument("--smooth", type=int, default=1, metavar="K", help="trailing moving average over K points")
    p.add_argument("--window-frac", type=_fraction, default=0.2, metavar="F",
                   help="compare over the last F of the common steps (default 0.2)")
    p.add_argument("--max-gap", type=_tolerance, metavar="TOL",
                   help="exit 1 when a run's mean relative gap exceeds TOL (e.g. 0.02 = 2%%)")
    p.add_argument("--out", default="loss_curves.png", metavar="PNG",
                   help="where to write the plot (default loss_curves.png; '' for none)")
    p.set_defaults(func=_run)
