"""Offline analysis of tensors: tensor dumps (``fakequant.saver``) and single tensors saved anywhere.

Three subcommands of the ``fakequant`` command:

* ``fakequant analyze DUMP_DIR [--out REPORT_DIR] [--tensor PATH_PART ...]``: one row per dump file (rank,
  step, layer, GEMM, role) with MSE, SQNR (dB), cosine similarity, max abs error, saturated % (elements
  beyond the largest value their block can hold), flushed-to-zero % (non-zero inputs that became 0) and the
  range of scale exponents, written as ``report.md`` and ``report.csv``; ``sqnr_per_layer.png`` (bars per
  layer and GEMM operand); and for the chosen tensors (default: the one with the lowest SQNR)
  ``hist_*.png``, the histogram of |x| on a log axis with the format's representable values overlaid.
* ``fakequant error TENSOR_FILE [--formats F,...] [--dim D] [--name KEY]``: the error of many formats on one
  tensor, sorted by SQNR. ``TENSOR_FILE``: a ``.safetensors`` file (a dump file: its ``hp`` tensor, along
  its own axis unless ``--dim`` is given), or a ``.pt`` / ``.pth`` / ``.bin`` file read with
  ``torch.load(weights_only=True)`` (never unpickling code); ``--name`` picks one tensor of several.
* ``fakequant scaling-sweep TENSOR_FILE [--formats F,...] [--dim D] [--out DIR]``: for MX block floats, the
  error under each shared-exponent rule (``floor``, ``round``, ``ceil``, ``rceil``, per-block MSE-best
  ``mse``) and under offsets -2..+2 of the format's own exponent, as a table, ``scaling_sweep.csv`` and
  ``scaling_sweep.png``.

Numbers come from ``fakequant.metrics.error_stats`` (as ``fakequant report``) and the bit encodings of
``fakequant.codec`` (saturation and scales).

Public: ``analyze_dump``, ``dump_rows``, ``error_rows``, ``sweep_rows``, ``load_tensor``, ``register``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from . import codec
from .dispatch import quant_dequant
from .formats._common import pow2, to_blocks
from .metrics import REPORT_FORMATS, error_stats
from .qtype import QType
from .saver import GEMMS, ROLES, load, load_file, read_manifest

__all__ = ["analyze_dump", "dump_rows", "error_rows", "sweep_rows", "load_tensor", "register", "SWEEP_FORMATS"]

SWEEP_FORMATS = ("mxfp8e4m3", "mxfp8e5m2", "mxfp6e3m2", "mxfp6e2m3", "mxfp4")
SWEEP_RULES = ("floor", "round", "ceil", "rceil", "mse")
SWEEP_OFFSETS = (-2, -1, 0, 1, 2)

DUMP_COLUMNS = (
    "rank", "step", "layer", "gemm", "role", "qtype", "shape", "mse", "sqnr_db", "cosine", "max_abs_err",
    "saturated_pct", "flushed_pct", "scale_exp_min", "scale_exp_max",
)
_HEADINGS = {
    "qtype": "format", "mse": "MSE", "sqnr_db": "SQNR dB", "cosine": "cosine", "max_abs_err": "max abs err",
    "saturated_pct": "saturated %", "flushed_pct": "flushed %", "scale_exp_min": "scale exp min",
    "scale_exp_max": "scale exp max", "setting": "scale rule",
}


# --------------------------------------------------------------------------------------------------------
# Statistics of one tensor and its quantized copy


def tensor_stats(hp: Tensor, quantized: Tensor, qtype: QType, enc: codec.Encoded | None = None) -> dict:
    """``error_stats`` (flushed as a percentage) plus saturated % and the scale-exponent range, read off the
    format's bit encoding ``enc`` (made from ``hp`` when not given; ``None`` where the format has none)."""
    stats = error_stats(hp, quantized)
    row = {k: stats[k] for k in ("mse", "sqnr_db", "cosine", "max_abs_err")}
    row["flushed_pct"] = 100.0 * stats["flushed_frac"]
    row["saturated_pct"] = row["scale_exp_min"] = row["scale_exp_max"] = None
    if enc is None and codec.encoding_of(qtype) is not None and hp.numel():
        enc = codec.encode(hp, qtype)
    if enc is not None:
        row["saturated_pct"] = 100.0 * codec.saturated(hp, enc).double().mean().item()
        exps = codec.scale_exponents(enc, hp)
        if exps is not None and exps.numel():
            row["scale_exp_min"], row["scale_exp_max"] = int(exps.min()), int(exps.max())
    return row


def _entry_encoded(entry, hp: Tensor, q: QType):
    enc = entry.encoded
    if enc is None and codec.encoding_of(q) is not None:
        enc = codec.encode(hp, q)
    return enc


def dump_rows(dump_dir: str | Path) -> list[dict]:
    """One statistics row per dump file of ``dump_dir`` (``DUMP_COLUMNS`` plus ``path``), ordered by rank,
    step, layer (first appearance), GEMM, role."""
    dump_dir = Path(dump_dir)
    manifest = read_manifest(dump_dir)
    if not manifest:
        raise ValueError(f"{dump_dir}: its manifest.jsonl lists no dump files (nothing was dumped)")
    layer_order = list(OrderedDict.fromkeys(m["layer"] for m in manifest))
    rows = []
    for m in manifest:
        entry = load(dump_dir / m["path"])
        hp, q = entry.hp, entry.qtype
        if hp is None:
            raise ValueError(f"{entry.path}: no 'hp' tensor (dumped with what={m.get('tensors')}); analyze needs it")
        quantized = entry.quantized if entry.quantized is not None else quant_dequant(hp, q)
        row = {k: m.get(k) for k in ("rank", "step", "layer", "gemm", "role", "qtype")}
        row["shape"] = "x".join(map(str, hp.shape))
        # the stored codes, when the file has them, are those of the operand the GEMM used
        row.update(tensor_stats(hp, quantized, q, _entry_encoded(entry, hp, q)))
        row["path"] = m["path"]
        rows.append(row)
    order = {name: i for i, name in enumerate(layer_order)}
    rows.sort(key=lambda r: (r["rank"], r["step"], order[r["layer"]], _index(GEMMS, r["gemm"]),
                             _index(ROLES, r["role"]), r["path"]))
    return rows


def _index(seq, value) -> int:
    return seq.index(value) if value in seq else len(seq)


# --------------------------------------------------------------------------------------------------------
# Tables


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    heads = [_HEADINGS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on an Agg canvas: no pyplot, no global backend change)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install matplotlib (or fakequant[dev])") from None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    return path


_SERIES_COLORS = {
    ("fprop", "input"): "#1f77b4", ("fprop", "weight"): "#aec7e8",
    ("dgrad", "grad_output"): "#d62728", ("dgrad", "weight"): "#ff9896",
    ("wgrad", "grad_output"): "#2ca02c", ("wgrad", "input"): "#98df8a",
}


def plot_sqnr_per_layer(rows: list[dict], path: Path) -> Path:
    """Horizontal bars: SQNR (dB) per layer, one bar per GEMM operand, the mean over steps and ranks, with
    the spread over them as a whisker. Exact operands (infinite SQNR) are drawn at the axis end, labelled."""
    layers = list(OrderedDict.fromkeys(r["layer"] for r in rows))
    series = sorted({(r["gemm"], r["role"]) for r in rows}, key=lambda s: (_index(GEMMS, s[0]), _index(ROLES, s[1])))
    values: dict[tuple, list[float]] = {}
    for r in rows:
        values.setdefault((r["layer"], r["gemm"], r["role"]), []).append(r["sqnr_db"])
    finite = [v for vs in values.values() for v in vs if math.isfinite(v)]
    top = (max(finite) if finite else 1.0) * 1.15 + 1.0
    n_s = len(series)
    bar = 0.8 / max(n_s, 1)
    fig = _figure(10, max(2.5, 0.32 * len(layers) * max(n_s, 1) + 1.6))
    ax = fig.add_subplot()
    for j, (gemm, role) in enumerate(series):
        ys, means, lo, hi = [], [], [], []
        for i, layer in enumerate(layers):
            vs = values.get((layer, gemm, role))
            if not vs:
                continue
            capped = [min(v, top) if not math.isnan(v) else 0.0 for v in vs]
            mean = sum(capped) / len(capped)
            ys.append(i + (j - (n_s - 1) / 2) * bar)
            means.append(mean)
            lo.append(mean - min(capped))
            hi.append(max(capped) - mean)
            if any(math.isinf(v) and v > 0 for v in vs):
                ax.text(mean, ys[-1], " exact", va="center", fontsize=8)
        ax.barh(ys, means, height=bar * 0.9, xerr=[lo, hi], capsize=2, label=f"{gemm} · {role}",
                color=_SERIES_COLORS.get((gemm, role)), error_kw={"elinewidth": 0.8})
    ax.set_yticks(range(len(layers)), layers, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better")
    steps = sorted({r["step"] for r in rows})
    ranks = sorted({r["rank"] for r in rows})
    spread = "whiskers: min..max over steps/ranks" if len(steps) * len(ranks) > 1 else ""
    ax.set_title(f"SQNR per layer and GEMM operand — mean over steps {_list(steps)}, ranks {_list(ranks)}"
                 + (f"\n{spread}" if spread else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="GEMM · operand", title_fontsize=8)
    return _save(fig, path)


def _list(values) -> str:
    return ", ".join(map(str, values))


def _log_bins(a: Tensor, n: int = 80) -> Tensor:
    lo, hi = math.log10(a.min().item()), math.log10(a.max().item())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.logspace(lo, hi, n + 1, dtype=torch.float64)


_GRID_COLOR = "#c44e00"
_DENSE_GRID = 32  # more visible grid values than this are drawn as ticks along the bottom, not full lines


def _draw_grid(ax, values: list[float], label: str, lo: float | None = None, hi: float | None = None) -> None:
    """Representable values as vertical lines, or as a rug of ticks along the bottom when they are dense."""
    shown = [v for v in values if (lo is None or v >= lo) and (hi is None or v <= hi)]
    if not shown:
        return
    if len(shown) <= _DENSE_GRID:
        for i, v in enumerate(shown):
            ax.axvline(v, color=_GRID_COLOR, lw=0.8, zorder=3, label=label if i == 0 else None)
    else:
        ax.vlines(shown, 0, 0.07, transform=ax.get_xaxis_transform(), color=_GRID_COLOR, lw=0.8, zorder=3,
                  label=f"{label} ({len(shown)} values, ticks)")


def plot_histogram(hp: Tensor, quantized: Tensor, qtype: QType, title: str, path: Path,
                   enc: codec.Encoded | None = None) -> Path:
    """|x| on a log axis with the format's representable magnitudes overlaid.

    Block formats get two panels: (a) |x| with the grid at the most common block scale drawn as lines and
    the span the grid covers over all block scales shaded; (b) |x| / block scale, where every block shares
    one grid (the element format), with saturated and flushed elements counted. Formats without an encoding
    get panel (a) with the distinct quantized magnitudes as the grid when there are few of them.
    """
    a = hp.detach().double().abs().flatten()
    finite = torch.isfinite(a)
    nz = a[finite & (a > 0)]
    grid = codec.element_grid(qtype)
    scales = None if enc is None else codec.element_scales(enc)
    two = scales is not None
    fig = _figure(12 if two else 8, 4.2)
    ax = fig.add_subplot(1, 2 if two else 1, 1)
    if nz.numel():
        ax.hist(nz.numpy(), bins=_log_bins(nz).numpy(), color="#4c72b0", alpha=0.85, label="|x| (high precision)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|x|")
    ax.set_ylabel("elements")
    zeros = int((a == 0).sum())
    if scales is not None:
        s = scales.flatten()
        ok = torch.isfinite(s) & (s > 0)
        if ok.any():
            vals, counts = torch.unique(s[ok], return_counts=True)
            mode = vals[counts.argmax()].item()
            _draw_grid(ax, (grid[grid > 0] * mode).tolist(), "grid at the most common scale")
            smin, smax = s[ok].min().item(), s[ok].max().item()
            ax.axvspan(grid[grid > 0][0].item() * smin, grid[-1].item() * smax, color="#dd8452", alpha=0.08,
                       label="grid span over all block scales")
            if nz.numel():  # the data's range, with room for the top of the grid
                ax.set_xlim(nz.min().item() / 2, max(nz.max().item(), grid[-1].item() * smax) * 2)
    elif grid is not None:  # hif8: absolute values
        lo, hi = (nz.min().item() / 2, nz.max().item() * 2) if nz.numel() else (None, None)
        _draw_grid(ax, grid[grid > 0].tolist(), f"{qtype} values", lo, hi)
        if nz.numel():
            ax.set_xlim(lo, hi)
    else:
        qv = torch.unique(quantized.detach().double().abs().flatten())
        qv = qv[torch.isfinite(qv) & (qv > 0)]
        if 0 < qv.numel() <= 512:
            _draw_grid(ax, qv.tolist(), "quantized values")
        else:
            ax.text(0.02, 0.95, f"{qtype}: no representable grid drawn ({qv.numel()} distinct values)",
                    transform=ax.transAxes, fontsize=8, va="top")
    ax.set_title(f"(a) |x|, {zeros} zeros not shown" if zeros else "(a) |x|", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    if two:
        ax2 = fig.add_subplot(1, 2, 2)
        u = (hp.detach().double().abs() / scales).flatten()
        u = u[torch.isfinite(u) & (u > 0)]
        top = grid[-1].item()
        sat = codec.saturated(hp, enc)
        flushed = ((quantized == 0) & (hp != 0)).double().mean().item() * 100
        if u.numel():
            ax2.hist(u.numpy(), bins=_log_bins(u).numpy(), color="#55a868", alpha=0.85, label="|x| / block scale")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        _draw_grid(ax2, grid[grid > 0].tolist(), "element grid")
        low = grid[grid > 0][0].item() / 2  # below half the smallest element: rounds to 0 (nearest rounding)
        u_lo = u.min().item() if u.numel() else low
        u_hi = u.max().item() if u.numel() else top
        x_lo, x_hi = min(u_lo, low) / 2, max(u_hi, top) * 2
        ax2.axvspan(top, x_hi, color="#c44e52", alpha=0.12, label="beyond the largest element")
        ax2.axvspan(x_lo, low, color="#8172b3", alpha=0.12, label="rounds to 0")
        ax2.set_xlim(x_lo, x_hi)
        ax2.set_xlabel("|x| / block scale (element units)")
        ax2.set_title(f"(b) in block-scale units: saturated {sat.double().mean().item() * 100:.2f}%, "
                      f"flushed {flushed:.2f}%", fontsize=10)
        ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _hist_name(row: dict) -> str:
    name = f"hist_rank{row['rank']}_step{row['step']}_{row['layer']}.{row['gemm']}.{row['role']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def analyze_dump(dump_dir: str | Path, out: str | Path | None = None, tensors: list[str] | None = None) -> dict:
    """Write ``report.md``, ``report.csv``, ``sqnr_per_layer.png`` and the histograms of ``tensors`` (parts
    of dump-file paths; default: the lowest-SQNR file) into ``out`` (default ``DUMP_DIR/analysis``).
    Returns ``{"rows": ..., "files": [...]}``."""
    dump_dir = Path(dump_dir)
    out = dump_dir / "analysis" if out is None else Path(out)
    rows = dump_rows(dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = out / "report.md"
    title = f"# fakequant dump analysis: {dump_dir}\n\n{len(rows)} tensors. saturated %: elements beyond the " \
            f"largest value their block can hold; flushed %: non-zero inputs quantized to 0; scale exp: range of " \
            f"base-2 exponents of the block scales (– where the format has no bit encoding).\n\n"
    md.write_text(title + markdown_table(rows, DUMP_COLUMNS) + "\n")
    files.append(md)
    write_csv(rows, DUMP_COLUMNS + ("path",), out / "report.csv")
    files.append(out / "report.csv")
    files.append(plot_sqnr_per_layer(rows, out / "sqnr_per_layer.png"))
    if tensors:
        chosen = []
        for part in tensors:
            match = [r for r in rows if part in r["path"]]
            if not match:
                raise ValueError(f"--tensor {part!r} matches no dump file; files look like {rows[0]['path']!r}")
            chosen.append(match[0])
    else:
        chosen = [min(rows, key=lambda r: r["sqnr_db"] if not math.isnan(r["sqnr_db"]) else math.inf)]
    for row in chosen:
        entry = load(dump_dir / row["path"])
        q = entry.qtype
        quantized = entry.quantized if entry.quantized is not None else quant_dequant(entry.hp, q)
        title = (f"{row['layer']} · {row['gemm']} · {row['role']} — step {row['step']}, rank {row['rank']}, "
                 f"{q}, shape {row['shape']}, SQNR {_cell(row['sqnr_db'])} dB")
        files.append(plot_histogram(entry.hp, quantized, q, title, out / _hist_name(row),
                                    _entry_encoded(entry, entry.hp, q)))
    return {"rows": rows, "files": files}


# --------------------------------------------------------------------------------------------------------
# One tensor from a file


def load_tensor(path: str | Path, name: str | None = None) -> tuple[Tensor, str, int | None]:
    """``(tensor, label, axis)`` from a file: a dump file (its ``hp``, and its axis), another safetensors
    file, or a ``.pt``/``.pth``/``.bin`` file read with ``torch.load(weights_only=True)`` (a tensor or a
    dict of tensors). ``name`` picks a tensor when there are several."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    axis = None
    if path.suffix == ".safetensors":
        tensors, metadata = load_file(path)
        if "fakequant" in metadata and name is None:
            entry = load(path)
            if entry.hp is None:
                raise ValueError(f"{path}: a dump file without its 'hp' tensor")
            return entry.hp, f"{path.name} (hp)", int(entry.meta["axis"])
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Tensor):
            return obj, path.name, None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, not a tensor or a dict of tensors")
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    if name is not None:
        if name not in tensors:
            raise ValueError(f"{path}: no tensor {name!r}; it holds {sorted(tensors)}")
        return tensors[name], f"{path.name}:{name}", axis
    if len(floating) != 1:
        raise ValueError(f"{path}: holds {len(floating)} floating tensors {sorted(floating)[:8]}; pick one with --name")
    key = next(iter(floating))
    return floating[key], f"{path.name}:{key}", axis


def _formats(text: str | None, default: tuple[str, ...]) -> list[QType]:
    names = default if text is None else [f.strip() for f in text.split(",") if f.strip()]
    if not names:
        raise ValueError("--formats is empty")
    return [QType(f) for f in names]


def error_rows(x: Tensor, formats: list[QType], dim: int = -1) -> list[dict]:
    """The error of each format on ``x`` along ``dim``, best SQNR first."""
    if not x.is_floating_point():
        raise TypeError(f"the tensor must be floating, got {x.dtype}")
    rows = []
    for q in formats:
        qd = q.dim(dim)
        rows.append({"format": str(q), **tensor_stats(x, quant_dequant(x, qd), qd)})
    return sorted(rows, key=lambda r: -r["sqnr_db"] if not math.isnan(r["sqnr_db"]) else math.inf)


_ERROR_COLUMNS = ("format", "sqnr_db", "mse", "max_abs_err", "cosine", "saturated_pct", "flushed_pct",
                  "scale_exp_min", "scale_exp_max")


# --------------------------------------------------------------------------------------------------------
# Scale-rule sweep


def _offset_scales(x: Tensor, q: QType, offset: int) -> Tensor:
    """Block scales 2^(s + offset) for the exponents ``s`` of ``q``'s own rule, with the E8M0 window applied
    (formats.md §1 step 2: above k_max the block is NaN, below -k_max clamped); ``pack``'s scale layout."""
    qdim = q.q_dim % max(x.dim(), 1)
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    blocks, _ = to_blocks(x32, qdim, q.blk_size)
    s, nan_block = codec._mx_exponents(x32, q, qdim, blocks)
    zero = blocks.abs().amax(dim=-1, keepdim=True) == 0
    s = torch.where(zero, s, s + offset)  # all-zero blocks stay zeros whatever the scale
    nan_block = nan_block | (s > q.k_max)
    s = s.clamp(-q.k_max, q.k_max)
    scale = torch.where(nan_block, float("nan"), pow2(s)).squeeze(-1)
    return scale.movedim(-1, qdim).contiguous()


def sweep_rows(x: Tensor, formats: list[QType], dim: int = -1) -> list[dict]:
    """For each MX format: the error under each scale rule and each exponent offset (of its own rule)."""
    from .scale_search import quant_dequant_scaled

    rows = []
    for q in formats:
        if q.family != "mx":
            raise ValueError(f"scaling-sweep applies to MX block floats e<E>m<M>k<K>b<B> (mxfp4, mxfp8e4m3, ...); "
                             f"{q} is family {q.family!r}")
        q = q.dim(dim)
        base = q.scale_mode
        for rule in SWEEP_RULES:
            qr = q.scale(rule)
            rows.append({"format": str(q), "setting": rule, "kind": "rule", "offset": None,
                         **error_stats(x, quant_dequant(x, qr))})
        for off in SWEEP_OFFSETS:
            y = quant_dequant_scaled(x, q, _offset_scales(x, q, off))
            rows.append({"format": str(q), "setting": f"{base}{off:+d}", "kind": "offset", "offset": off,
                         **error_stats(x, y)})
    for r in rows:
        r["flushed_pct"] = 100.0 * r.pop("flushed_frac")
    return rows


_SWEEP_COLUMNS = ("format", "setting", "sqnr_db", "mse", "max_abs_err", "cosine", "flushed_pct")


def plot_sweep(rows: list[dict], title: str, path: Path) -> Path:
    """(a) SQNR of each scale rule minus the SQNR of the format's own rule (dB; > 0: better than the format's
    default), bars grouped by format, the own rule's SQNR under each format name; (b) SQNR against the
    exponent offset, one line per format. A NaN block (an offset above the E8M0 window) gives -inf SQNR,
    drawn at the bottom of the axis."""
    formats = list(OrderedDict.fromkeys(r["format"] for r in rows))
    own = {f: next(r for r in rows if r["format"] == f and r["kind"] == "offset" and r["offset"] == 0) for f in formats}
    fig = _figure(13, 4.6)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / len(SWEEP_RULES)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    deltas = []
    for j, rule in enumerate(SWEEP_RULES):
        ys = []
        for f in formats:
            v = next(r["sqnr_db"] for r in rows if r["format"] == f and r["setting"] == rule)
            base = own[f]["sqnr_db"]
            ys.append(v - base if math.isfinite(v) and math.isfinite(base) else 0.0)
        deltas += ys
        xs = [i + (j - (len(SWEEP_RULES) - 1) / 2) * width for i in range(len(formats))]
        ax.bar(xs, ys, width=width * 0.92, label=rule, color=colors[j])
    labels = [f"{f}\n{own[f]['setting'][:-2]}: {own[f]['sqnr_db']:.1f} dB" for f in formats]
    ax.set_xticks(range(len(formats)), labels, fontsize=8, rotation=12)
    ax.set_xlabel("format (own rule: its SQNR)", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    span = max([abs(d) for d in deltas] + [0.5])
    ax.set_ylim(-1.15 * span, 1.15 * span)
    ax.set_ylabel("SQNR minus the format's own rule (dB)")
    ax.set_title("(a) shared-exponent rule: > 0 is better than the format's default", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="scale rule", title_fontsize=8, ncol=len(SWEEP_RULES), loc="lower center",
              bbox_to_anchor=(0.5, -0.36))
    ax2 = fig.add_subplot(1, 2, 2)
    finite = [r["sqnr_db"] for r in rows if r["kind"] == "offset" and math.isfinite(r["sqnr_db"])]
    floor_y = min(finite + [0.0]) - 3
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, f in enumerate(formats):
        pts = [(r["offset"], r["sqnr_db"]) for r in rows if r["format"] == f and r["kind"] == "offset"]
        ax2.plot([p[0] for p in pts], [p[1] if math.isfinite(p[1]) else floor_y for p in pts],
                 marker=markers[i % len(markers)], linestyle=("-", "--", ":", "-.")[i % 4], markersize=7 - i % 3,
                 label=f)
    ax2.set_xticks(SWEEP_OFFSETS, [f"{o:+d}" if o else "0 (own rule)" for o in SWEEP_OFFSETS])
    ax2.set_xlabel("shared-exponent offset (binades) from the format's own rule")
    ax2.set_ylabel("SQNR (dB), higher is better")
    ax2.set_title("(b) exponent offset: > 0 flushes small values, < 0 saturates large ones", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# Commands


def _run_analyze(args: argparse.Namespace) -> int:
    result = analyze_dump(args.dump_dir, args.out, args.tensor)
    rows = result["rows"]
    print(f"fakequant analyze: {len(rows)} tensors from {args.dump_dir}")
    print(markdown_table(rows, DUMP_COLUMNS))
    for f in result["files"]:
        print(f"wrote {f}")
    return 0


def _run_error(args: argparse.Namespace) -> int:
    formats = _formats(args.formats, REPORT_FORMATS)
    x, label, axis = load_tensor(args.tensor_file, args.name)
    dim = args.dim if args.dim is not None else (axis if axis is not None else -1)
    rows = error_rows(x, formats, dim)
    print(f"fakequant error: {label}, shape {tuple(x.shape)}, {str(x.dtype).removeprefix('torch.')}, "
          f"quantized along dim {dim}; best SQNR first")
    print(markdown_table(rows, _ERROR_COLUMNS))
    if args.csv:
        write_csv(rows, _ERROR_COLUMNS, Path(args.csv))
        print(f"wrote {args.csv}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    formats = _formats(args.formats, SWEEP_FORMATS)
    x, label, axis = load_tensor(args.tensor_file, args.name)
    dim = args.dim if args.dim is not None else (axis if axis is not None else -1)
    rows = sweep_rows(x, formats, dim)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fakequant scaling-sweep: {label}, shape {tuple(x.shape)}, blocks along dim {dim}")
    print(markdown_table(rows, _SWEEP_COLUMNS))
    write_csv(rows, _SWEEP_COLUMNS, out / "scaling_sweep.csv")
    png = plot_sweep(rows, f"scale rules on {label} {tuple(x.shape)}, blocks along dim {dim}",
                     out / "scaling_sweep.png")
    print(f"wrote {out / 'scaling_sweep.csv'}\nwrote {png}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="error table and figures of a tensor dump (fakequant.saver)")
    p.add_argument("dump_dir", metavar="DUMP_DIR", help="the TensorSaver out_dir")
    p.add_argument("--out", default=None, help="report folder (default: DUMP_DIR/analysis)")
    p.add_argument("--tensor", action="append", default=None, metavar="PATH_PART",
                   help="draw the histogram of the dump file whose path contains this (repeatable; "
                        "default: the lowest-SQNR tensor)")
    p.set_defaults(func=_run_analyze)

    p = subparsers.add_parser("error", help="error of many formats on one tensor, sorted by SQNR")
    p.add_argument("tensor_file", metavar="TENSOR_FILE", help=".safetensors (a dump file or any), or .pt/.pth/.bin")
    p.add_argument("--formats", default=None, help=f"comma-separated QType strings (default: {','.join(REPORT_FORMATS)})")
    p.add_argument("--dim", type=int, default=None, help="quantization axis (default: a dump file's own, else -1)")
    p.add_argument("--name", default=None, help="which tensor, when the file holds several")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    p.set_defaults(func=_run_error)

    p = subparsers.add_parser("scaling-sweep", help="MX formats under each shared-exponent rule and offset")
    p.add_argument("tensor_file", metavar="TENSOR_FILE", help=".safetensors (a dump file or any), or .pt/.pth/.bin")
    p.add_argument("--formats", default=None, help=f"comma-separated MX formats (default: {','.join(SWEEP_FORMATS)})")
    p.add_argument("--dim", type=int, default=None, help="block axis (default: a dump file's own, else -1)")
    p.add_argument("--name", default=None, help="which tensor, when the file holds several")
    p.add_argument("--out", default=".", help="folder for scaling_sweep.csv and scaling_sweep.png (default: .)")
    p.set_defaults(func=_run_sweep)
