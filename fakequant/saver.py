"""Tensor dumps: the operands of chosen GEMMs at chosen steps on chosen ranks, as safetensors files.

``TensorSaver`` is an observer (``fakequant.observe``): hand it to ``fakequant.patch(model, config,
observers=(saver,))``, put it in the config (``config.replace(observers=(saver,))``, which ``patch``,
``patch_functional`` and the Lightning callback use), attach it to a patched model
(``fakequant.patch.attach_observer(model, saver)`` or ``saver.attach(model)``), or give it to the Lightning
callback (``FakeQuantCallback(saver=saver)``); and tell it the step: the callback does (for a saver in its
config too), a plain loop calls ``saver.step(n)`` at the start of each training step. Each selected operand
of each selected GEMM becomes one file::

    out_dir/rank_{r}/step_{s:06d}/{layer}.{gemm}.{role}.safetensors
    out_dir/manifest.jsonl

``{layer}`` is the module's fully-qualified name with every character outside ``[A-Za-z0-9_.-]`` replaced by
``_`` (and, when anything was replaced or the name is empty, as for ``patch_functional`` calls, a ``-`` and
8 hex digits of its SHA-1, so two names never share a file). A file holds the tensors ``hp`` (the
high-precision operand), ``quantized`` (the fake-quantized operand the GEMM used) and, for formats with a
bit encoding (``fakequant.codec``: MX, NVFP4, HiF8, HiF4, int8sym), ``packed.codes``, ``packed.scales``
and the format's other ``packed.*`` parts; its metadata (safetensors ``__metadata__["fakequant"]``, JSON)
gives layer, GEMM, role, step, rank, the format with its axis (``qtype``, ``axis``), dtype and shape, and the
encoding (``packed``). ``load(path)`` reads a file back (no pickle anywhere) and ``load(path).decode()``
rebuilds the quantized tensor from the codes, bit for bit.

**Manifest.** One ``out_dir/manifest.jsonl`` lists every file of every rank: the file's metadata plus
``path`` (relative to ``out_dir``) and ``bytes``. A rank appends a file's line right after the file is
renamed into place, so every listed file is complete. Ranks share this one file, so each change to it holds
an exclusive lock: ``fcntl.flock`` on the manifest itself (re-checked after an ``overwrite`` replaced it
by rename), or, where ``fcntl`` does not exist, a ``.manifest.jsonl.lock`` file created with ``O_EXCL``
that exists only while held. A line goes in with one
``os.write`` on an ``O_APPEND`` descriptor, so lines of concurrent ranks never interleave.
``read_manifest(out_dir)`` reads it, by rank then in the order written.

**Safety.** A file is written to a hidden temporary name in its folder and renamed into place, and only if
no file has that name, so readers never see a partial file and nothing is overwritten. A rank with an
earlier dump in ``out_dir`` (a non-empty ``rank_{r}/`` or lines of rank ``r`` in the manifest) is refused
with ``FileExistsError`` when the saver is made, before anything is written, and again before the rank's
first file, unless ``overwrite=True``, which (before that first file) removes the rank's manifest lines and
then deletes its folder; other ranks' folders and lines are left alone. Once the files of a rank would
exceed ``max_bytes``, the rank stops dumping, warns once and the run goes on.

Public: ``TensorSaver``, ``every``, ``load``, ``DumpEntry``, ``read_manifest``, ``sanitise``,
``save_file``, ``load_file``, ``GEMMS``, ``ROLES``, ``WHAT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

try:
    import fcntl
except ImportError:  # Windows: an O_EXCL lock file instead (_manifest_lock)
    fcntl = None

import torch
from torch import Tensor

from . import codec
from .observe import GEMMS, OPERAND_ROLES, OperandEvent
from .qtype import QType

__all__ = [
    "TensorSaver", "every", "load", "DumpEntry", "read_manifest", "sanitise", "save_file", "load_file",
    "GEMMS", "ROLES", "WHAT", "MANIFEST",
]

ROLES = OPERAND_ROLES
WHAT = ("hp", "quantized", "packed")
CALLS = ("first", "all")
MANIFEST = "manifest.jsonl"
EXCL_LOCK = "." + MANIFEST + ".lock"  # without fcntl: exists while the lock is held
LOCK_TIMEOUT_S = 60.0  # without fcntl: how long to wait for the lock file before blaming a crashed run
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 1 << 30  # per rank
PACKED_PREFIX = "packed."


# --------------------------------------------------------------------------------------------------------
# safetensors, written and read here (a few lines, no dependency, never pickle)

# https://github.com/huggingface/safetensors: 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded with spaces to 8 bytes, then the data.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _tensor_bytes(t: Tensor) -> bytes:
    if t.dtype not in _ST_DTYPES:
        raise TypeError(f"cannot store dtype {t.dtype} in safetensors here; allowed: {list(_ST_DTYPES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def serialize(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (in name order) and string ``metadata``."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is big-endian")
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = _tensor_bytes(tensors[name])
        header[name] = {"dtype": _ST_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def deserialize(data: bytes, where: str = "<bytes>") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors ``data``; ``ValueError`` naming ``where`` if it is malformed."""
    if len(data) < 8:
        raise ValueError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{where}: not a safetensors file (header length {n} beyond the file's end)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not a safetensors file (header is not JSON: {err})") from None
    metadata = header.pop("__metadata__", None) or {}
    body = bytearray(data[8 + n:])
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _ST_NAMES.get(info.get("dtype"))
        begin, stop = info["data_offsets"]
        if dtype is None or begin != end or stop > len(body):
            raise ValueError(f"{where}: tensor {name!r} has an unsupported dtype or bad offsets ({info})")
        shape = [int(s) for s in info["shape"]]
        if stop == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            raw = torch.frombuffer(body, dtype=torch.uint8, count=stop - begin, offset=begin)
            tensors[name] = raw.view(dtype).reshape(shape).clone()
        end = stop
    if end != len(body):
        raise ValueError(f"{where}: {len(body) - end} bytes after the last tensor")
    return tensors, metadata


def save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file atomically (temporary name, then rename); refuses to replace an existing
    file. Returns the number of bytes written."""
    data = serialize(tensors, metadata)
    _write_new(Path(path), data)
    return len(data)


def load_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (any writer's; no pickle)."""
    path = Path(path)
    return deserialize(path.read_bytes(), str(path))


def _write_new(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if path.exists():
            raise FileExistsError(f"{path} exists; fakequant never overwrites a dump file")
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------
# The manifest: one file shared by every rank, each change under an exclusive lock

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


@contextlib.contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[int]:
    """Hold the exclusive lock of ``out_dir``'s manifest, so that appends of concurrent ranks and the
    rewrite of ``overwrite=True`` happen one at a time; yields a descriptor of the manifest opened for
    appending (created if missing).

    POSIX: ``flock`` on the manifest itself. A rewrite replaces the manifest by rename, so a rank that opened
    the old file and waited for its lock checks, once it holds it, that its file is still the one at that
    path, and otherwise locks the new one. Without ``fcntl``: the lock is the existence of
    ``.manifest.jsonl.lock``, created with ``O_EXCL`` and removed on release."""
    manifest = out_dir / MANIFEST
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_BINARY
    if fcntl is None:
        lock_path = out_dir / EXCL_LOCK
        lock_fd = _take_lock_file(lock_path)
        try:
            fd = os.open(manifest, flags, 0o644)
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)
            lock_path.unlink()
        return
    fd = os.open(manifest, flags, 0o644)
    try:
        while True:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(manifest)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                break
            os.close(fd)  # replaced while this rank waited: lock the file now at that path
            fd = os.open(manifest, flags, 0o644)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _take_lock_file(path: Path, timeout: float | None = None) -> int:
    """Create ``path`` exclusively, retrying while another process holds it; ``TimeoutError`` after
    ``timeout`` seconds (default ``LOCK_TIMEOUT_S``), since only a crashed holder keeps it that long."""
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    deadline, delay = time.monotonic() + timeout, 0.001
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        except (FileExistsError, PermissionError):  # Windows: PermissionError while the holder deletes it
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"TensorSaver: the manifest lock {path} has been held for over {timeout:g} s; if no run is "
                    f"writing into {path.parent}, a crashed run left it behind: delete it"
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        else:
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for whoever finds it stale
            return fd


def _append_line(out_dir: Path, entry: dict) -> None:
    """Append one manifest line: one ``os.write`` of the whole line on an ``O_APPEND`` descriptor, under
    the lock, so lines of concurrent ranks never interleave. No fsync: the line describes a file that is
    already in place, and a line lost to a power cut only hides that file."""
    data = (json.dumps(entry) + "\n").encode()
    manifest = out_dir / MANIFEST
    with _manifest_lock(out_dir) as fd:
        written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"TensorSaver: only {written} of the {len(data)} bytes of a line reached {manifest} "
                      f"(disk full?); that line is broken")


def _parse_manifest(manifest: Path, whole_lines_only: bool = False) -> list[tuple[dict, bytes]]:
    """Each line of ``manifest`` as (entry, its raw bytes with newline), in file order; ``ValueError``
    naming ``file:line`` for a line that is not a JSON object with an int ``rank`` and a str ``path``.
    ``whole_lines_only``: skip a last line without its newline (a rank may be appending it right now)."""
    entries = []
    for i, raw in enumerate(manifest.read_bytes().splitlines(keepends=True), start=1):
        if not raw.strip() or (whole_lines_only and not raw.endswith(b"\n")):
            continue
        try:
            entry = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest}:{i}: not a JSON line ({err}): {raw[:80]!r}") from None
        if not _is_entry(entry):
            raise ValueError(f"{manifest}:{i}: not a dump-file line (needs a JSON object with an int 'rank' and "
                             f"a str 'path'): {raw[:80]!r}")
        entries.append((entry, raw))
    return entries


def _is_entry(entry: Any) -> bool:
    rank = entry.get("rank") if isinstance(entry, dict) else None
    return isinstance(entry, dict) and isinstance(entry.get("path"), str) and type(rank) is int


def _listed_ranks(out_dir: Path) -> Counter:
    """rank -> number of manifest lines (none without a manifest). Read without the lock, which would create
    the lock file: a saver refused for an earlier dump must leave the folder exactly as it was. Appends
    and rewrites are single writes and renames, so at most the last line is partial, and it is skipped."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return Counter()
    return Counter(entry["rank"] for entry, _ in _parse_manifest(manifest, whole_lines_only=True))


def _drop_rank_lines(out_dir: Path, rank: int) -> int:
    """Remove the lines of ``rank`` from the manifest; returns how many. Under the lock the manifest is
    rewritten to a temporary file and renamed over the old one, so a reader sees the old or the new
    manifest, never half of one, and no other rank's line is lost."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return 0
    with _manifest_lock(out_dir):
        entries = _parse_manifest(manifest)
        keep = [raw if raw.endswith(b"\n") else raw + b"\n" for entry, raw in entries if entry["rank"] != rank]
        dropped = len(entries) - len(keep)
        if dropped:
            tmp = out_dir / f".{MANIFEST}.tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(b"".join(keep))
                    f.flush()
                    os.fsync(f.fileno())  # the old lines are gone after the rename: the new ones must be there
                os.replace(tmp, manifest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return dropped


# --------------------------------------------------------------------------------------------------------
# Selection


class every:
    """Step rule: every ``n`` steps from ``start`` (``start``, ``start + n``, ...), before ``stop`` if given.
    ``TensorSaver(..., steps=every(100))``."""

    def __init__(self, n: int, start: int = 0, stop: int | None = None) -> None:
        for name, v in (("n", n), ("start", start)) + ((("stop", stop),) if stop is not None else ()):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"every: {name} must be an int, got {type(v).__name__} ({v!r})")
        if n < 1 or start < 0:
            raise ValueError(f"every: needs n >= 1 and start >= 0, got n={n}, start={start}")
        self.n, self.start, self.stop = n, start, stop

    def __call__(self, step: int) -> bool:
        return step >= self.start and (self.stop is None or step < self.stop) and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        stop = "" if self.stop is None else f", stop={self.stop}"
        return f"every({self.n}, start={self.start}{stop})"


def _step_rule(steps: Any) -> Callable[[int], bool]:
    if isinstance(steps, (bool, int)):
        raise TypeError(
            f"TensorSaver: steps={steps!r} is ambiguous; pass [{steps}] for that one step or "
            f"fakequant.saver.every({steps}) for every {steps} steps"
        )
    if callable(steps):
        return steps
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise TypeError(
            f"TensorSaver: steps must be a list/range/set of step numbers, every(n) or a callable "
            f"(step) -> bool, got {type(steps).__name__}"
        )
    if isinstance(steps, range):
        return steps.__contains__
    chosen = list(steps)
    bad = [s for s in chosen if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"TensorSaver: steps must be non-negative ints, got {bad[:3]!r}")
    return frozenset(chosen).__contains__


def _layer_rule(layers: Any) -> Callable[[str], bool]:
    if layers is None:
        return lambda name: True
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as err:
            raise ValueError(f"TensorSaver: layers={layers!r} is not a valid regex ({err})") from None
        return lambda name: pattern.search(name) is not None
    if callable(layers):
        return layers
    raise TypeError(f"TensorSaver: layers must be a regex string, a callable (name) -> bool or None, "
                    f"got {type(layers).__name__}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        chosen = tuple(value)
    except TypeError:
        raise TypeError(f"TensorSaver: {name} must be a sequence of names, got {type(value).__name__}") from None
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise ValueError(f"TensorSaver: {name}={value!r} must be a non-empty subset of {', '.join(allowed)}")
    return chosen


def _ranks(ranks: Any) -> frozenset[int] | None:
    if ranks is None:
        return None
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks,)
    chosen = tuple(ranks)
    if not chosen or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in chosen):
        raise ValueError(f"TensorSaver: ranks={ranks!r} must be non-negative ints (or None for every rank)")
    return frozenset(chosen)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def sanitise(name: str) -> str:
    """A file-name-safe form of a layer name: characters outside ``[A-Za-z0-9_.-]`` become ``_``; if anything
    changed, or the name is empty or starts with a dot, ``-`` and 8 hex digits of the name's SHA-1 follow
    (``""`` -> ``functional-da39a3ee``), so distinct names stay distinct files."""
    safe = _UNSAFE.sub("_", name)
    if safe == name and name and not name.startswith("."):
        return name
    return f"{safe.lstrip('.') or 'functional'}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _current_rank() -> int | None:
    """This process's rank under torch.distributed, or ``None`` when no process group is up."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------
# The saver


class TensorSaver:
    """Dump GEMM operands to safetensors files (layout and guarantees in the module docstring).

    Args:
        out_dir: the dump folder (made if missing).
        steps: which steps: a list / set / range of step numbers, ``every(n, start=0)``, or a callable
            ``(step) -> bool``. The step is the number last passed to ``step(n)``.
        layers: a regex searched in each layer's fully-qualified name (as ``FakeQuantConfig.include``), a
            callable ``(name) -> bool``, or ``None`` for every layer.
        gemms: subset of ``fprop``, ``dgrad``, ``wgrad``.
        roles: subset of ``input``, ``weight``, ``grad_output`` (and the attention roles ``query``, ``key``,
            ``value``, ``attn_probs``, ``grad_attn_output``).
        ranks: the ranks that dump (``None``: every rank); the rank is ``torch.distributed.get_rank()``, or 0
            without a process group.
        what: subset of ``hp``, ``quantized``, ``packed`` (codes and scales, for formats with an encoding).
        max_bytes: the most bytes of dump files one rank writes (``None``: no limit); the file that would
            pass it is not written, the rank stops dumping and warns once, and the run goes on.
        overwrite: ``False`` (default) refuses a rank with an earlier dump in ``out_dir`` (files in its
            folder or its lines in the manifest); ``True`` removes that rank's manifest lines and deletes its
            folder before its first new file (other ranks' folders and lines stay).
        calls: ``"first"`` (default) dumps the first call of each (layer, GEMM, role) in a step, so gradient
            accumulation and activation recomputation dump once per step; ``"all"`` dumps every call, the
            n-th (n >= 1) as ``{layer}.{gemm}.{role}.call{n}.safetensors`` (``patch_functional`` calls all
            share the layer name ``""``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        steps: Any,
        layers: str | Callable[[str], bool] | None = None,
        gemms: Iterable[str] = GEMMS,
        roles: Iterable[str] = ("input", "weight", "grad_output"),
        ranks: Iterable[int] | int | None = (0,),
        what: Iterable[str] = WHAT,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        overwrite: bool = False,
        calls: str = "first",
    ) -> None:
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"TensorSaver: out_dir must be a path, got {type(out_dir).__name__}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"TensorSaver: out_dir {self.out_dir} exists and is not a folder")
        self._in_step = _step_rule(steps)
        self.steps = steps
        self._layer_ok = _layer_rule(layers)
        self.layers = layers
        self.gemms = _choice("gemms", gemms, GEMMS)
        self.roles = _choice("roles", roles, ROLES)
        self.ranks = _ranks(ranks)
        self.what = _choice("what", what, WHAT)
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"TensorSaver: max_bytes={max_bytes!r} must be a positive int or None")
        self.max_bytes = max_bytes
        if not isinstance(overwrite, bool):
            raise TypeError(f"TensorSaver: overwrite must be a bool, got {type(overwrite).__name__}")
        self.overwrite = overwrite
        if calls not in CALLS:
            raise ValueError(f"TensorSaver: calls={calls!r} is not one of {', '.join(CALLS)}")
        self.calls = calls

        self._lock = threading.Lock()
        self._step: int | None = None
        self._active = False  # the current step is selected on an active rank
        self._rank: int | None = None
        self._rank_dir: Path | None = None  # made (and checked) before the rank's first file
        self._seen: dict[tuple[str, str, str], int] = {}
        self._layer_cache: dict[str, bool] = {}
        self._names: dict[str, str] = {}
        self._warned: set[str] = set()
        self.files: list[Path] = []
        self.bytes_written = 0
        self.stopped = False
        if not overwrite:
            self._refuse_earlier_dumps()

    # ------------------------------------------------------------------------------------------ ranks
    def _dumping_ranks_here(self, listed: Iterable[int]) -> list[int]:
        """Ranks whose earlier dumps would stop this process: its own when a process group is up, else the
        configured ones (``None``: every rank with a folder or ``listed`` in the manifest).

        The manifest is shared, so by the time rank 1 builds its saver, rank 0 may already have listed files
        of this very run: once the rank is known only its own lines count, never another rank's. Before the
        process group is up no rank can have dumped yet (the group's start waits for every rank), so checking
        the configured ranks then finds only earlier runs."""
        rank = _current_rank()
        if rank is not None:
            return [rank] if self.ranks is None or rank in self.ranks else []
        if self.ranks is None:
            folders = {int(p.name[5:]) for p in self.out_dir.glob("rank_*") if p.name[5:].isdigit()}
            return sorted(folders | set(listed))
        return sorted(self.ranks)

    def _refuse_earlier_dumps(self, ranks: Iterable[int] | None = None) -> None:
        """``FileExistsError`` if one of ``ranks`` (default: ``_dumping_ranks_here``) has files in its folder
        or lines in the manifest. Reads only: a refused saver has written nothing."""
        listed = _listed_ranks(self.out_dir)
        for r in self._dumping_ranks_here(listed) if ranks is None else ranks:
            folder = self.out_dir / f"rank_{r}"
            if listed[r] or (folder.is_dir() and any(folder.iterdir())):
                n = sum(1 for _ in folder.rglob(f"*{SUFFIX}"))
                raise FileExistsError(
                    f"TensorSaver: rank {r} already has a dump in {self.out_dir} from an earlier run "
                    f"({n} tensor files in {folder}, {listed[r]} lines in {MANIFEST}); nothing was written. "
                    f"Choose a new out_dir, delete {self.out_dir}, or pass overwrite=True (which removes rank "
                    f"{r}'s lines from {MANIFEST} and deletes {folder} before this run's first file)"
                )

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return self._rank if self._rank is not None else (_current_rank() or 0)

    # ------------------------------------------------------------------------------------------- steps
    def step(self, n: int) -> bool:
        """Set the current training step (call it before the step's forward). Returns whether this step
        dumps on this rank."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"TensorSaver.step: the step must be a non-negative int, got {n!r}")
        with self._lock:
            self._step = n
            self._seen.clear()
            self._rank = _current_rank() or 0
            on_rank = self.ranks is None or self._rank in self.ranks
            self._active = on_rank and not self.stopped and bool(self._in_step(n))
            return self._active

    @property
    def current_step(self) -> int | None:
        return self._step

    def close(self) -> None:
        """Stop dumping until the next ``step(n)``. Every file is complete and listed as soon as it is written,
        so nothing is lost without calling this (the Lightning callback calls it at teardown)."""
        with self._lock:
            self._active = False

    def __enter__(self) -> TensorSaver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach(self, model: torch.nn.Module) -> list[str]:
        """``fakequant.patch.attach_observer(model, self)``: observe every patched layer of ``model``."""
        from .patch import attach_observer

        return attach_observer(model, self)

    def detach(self, model: torch.nn.Module) -> list[str]:
        from .patch import detach_observer

        return detach_observer(model, self)

    # --------------------------------------------------------------------------------------- observer
    def wants(self, layer: str, gemm: str, role: str) -> bool:
        """Whether an operand (layer, GEMM, role) would be dumped now (step, rank, filters, budget)."""
        if not self._active or self.stopped or gemm not in self.gemms or role not in self.roles:
            return False
        ok = self._layer_cache.get(layer)
        if ok is None:
            ok = self._layer_cache[layer] = bool(self._layer_ok(layer))
        return ok

    def __call__(self, event: OperandEvent) -> None:
        if self._step is None:
            self._warn_once("no_step", "TensorSaver got operands before saver.step(n) was called; nothing is "
                                       "dumped until the loop (or the Lightning callback) calls saver.step(n)")
            return
        if not self.wants(event.layer, event.gemm, event.role):
            return
        with self._lock:
            key = (event.layer, event.gemm, event.role)
            call = self._seen.get(key, 0)
            self._seen[key] = call + 1
            if call and self.calls == "first":
                return
            if self.stopped:
                return
            self._dump(event, call)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------- files
    def _file_name(self, layer: str, gemm: str, role: str, call: int) -> str:
        safe = self._names.get(layer)
        if safe is None:
            safe = self._names[layer] = sanitise(layer)
        extra = f".call{call}" if call else ""
        return f"{safe}.{gemm}.{role}{extra}{SUFFIX}"

    def _prepare_rank_dir(self) -> Path:
        """The rank folder, checked (or, with ``overwrite``, cleared) before the rank's first file. Only this
        rank's lines and folder are looked at: other ranks may be listing files of this run already."""
        folder = self.out_dir / f"rank_{self._rank}"
        if self._rank_dir != folder:
            if self.overwrite:
                # Lines first, then files: a crash in between leaves files no line lists, never the reverse.
                _drop_rank_lines(self.out_dir, self._rank)
                if folder.exists():
                    shutil.rmtree(folder)
            else:
                self._refuse_earlier_dumps([self._rank])
            folder.mkdir(parents=True, exist_ok=True)
            self._rank_dir = folder
        return folder

    def _contents(self, event: OperandEvent) -> tuple[dict[str, Tensor], dict]:
        q = event.qtype if isinstance(event.qtype, QType) else QType(str(event.qtype))
        hp = event.hp.detach()
        meta: dict[str, Any] = {
            "layer": event.layer, "gemm": event.gemm, "role": event.role, "step": self._step, "rank": self._rank,
            "qtype": str(q), "axis": q.q_dim, "dtype": _dtype_name(hp.dtype), "shape": list(hp.shape),
        }
        tensors: dict[str, Tensor] = {}
        if "hp" in self.what:
            tensors["hp"] = hp.to("cpu", copy=True)
        if "quantized" in self.what:
            tensors["quantized"] = event.quantized.detach().to("cpu", copy=True)
        meta["packed"] = None
        if "packed" in self.what:
            reason = codec.no_encoding_reason(q)
            if reason is not None:
                meta["packed_note"] = f"no bit encoding: {reason}"
            else:
                try:
                    enc = codec.encode(hp.to("cpu"), q)
                except (ValueError, TypeError, RuntimeError) as err:  # a dump must never stop training
                    meta["packed_note"] = f"encoding failed: {err}"
                    self._warn_once("encode", f"TensorSaver: could not encode {event.layer} {event.gemm} "
                                              f"{event.role} as {q}: {err}; files keep hp/quantized only")
                else:
                    meta["packed"] = enc.meta
                    tensors.update({PACKED_PREFIX + k: v for k, v in enc.tensors.items()})
                    # The codes decode to the tensor the GEMM used unless a kernel disagreed with the reference.
                    exact = _bitwise_equal(codec.decode(enc.tensors, enc.meta), event.quantized.detach().cpu())
                    meta["packed_exact"] = exact
                    if not exact:
                        self._warn_once("inexact", f"TensorSaver: the codes of {event.layer} {event.gemm} "
                                                   f"{event.role} ({q}) do not decode to the quantized operand the "
                                                   f"GEMM used (a backend differs from the reference)")
        meta["tensors"] = {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
        return tensors, meta

    def _dump(self, event: OperandEvent, call: int) -> None:
        tensors, meta = self._contents(event)
        if call:
            meta["call"] = call
        data = serialize(tensors, {"format": "pt", "fakequant": json.dumps(meta)})
        if self.max_bytes is not None and self.bytes_written + len(data) > self.max_bytes:
            self.stopped = True
            self._active = False
            warnings.warn(
                f"TensorSaver: max_bytes={self.max_bytes} reached on rank {self._rank} after {len(self.files)} "
                f"files ({self.bytes_written} bytes; the next file needs {len(data)}); no more tensors are dumped "
                f"on this rank, training continues",
                RuntimeWarning, stacklevel=3,
            )
            return
        folder = self._prepare_rank_dir() / f"step_{self._step:06d}"
        folder.mkdir(exist_ok=True)
        path = folder / self._file_name(event.layer, event.gemm, event.role, call)
        _write_new(path, data)
        self.files.append(path)
        self.bytes_written += len(data)
        # Listed only now that the file is in place: every listed file is complete.
        _append_line(self.out_dir, {"path": path.relative_to(self.out_dir).as_posix(), "bytes": len(data), **meta})

    def __repr__(self) -> str:
        return (f"TensorSaver({str(self.out_dir)!r}, steps={self.steps!r}, layers={self.layers!r}, "
                f"gemms={self.gemms}, roles={self.roles}, ranks={None if self.ranks is None else sorted(self.ranks)}, "
                f"what={self.what}, max_bytes={self.max_bytes})")


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.float(), b.float()
    same = (torch.isnan(a) & torch.isnan(b)) | ((a == b) & (torch.signbit(a) == torch.signbit(b)))
    return bool(same.all())


# --------------------------------------------------------------------------------------------------------
# Reading dumps


class DumpEntry(NamedTuple):
    """One dump file: ``tensors`` (``hp``, ``quantized``, ``packed.*``), ``meta`` (the JSON metadata) and
    its ``path``; ``tensors, meta, path = load(p)``."""

    tensors: dict[str, Tensor]
    meta: dict
    path: Path

    @property
    def hp(self) -> Tensor | None:
        return self.tensors.get("hp")

    @property
    def quantized(self) -> Tensor | None:
        return self.tensors.get("quantized")

    @property
    def qtype(self) -> QType:
        return QType(self.meta["qtype"])

    @property
    def encoded(self) -> codec.Encoded | None:
        """The codes and scales as a ``fakequant.codec.Encoded`` (``None`` when the file has none)."""
        if not self.meta.get("packed"):
            return None
        parts = {k[len(PACKED_PREFIX):]: v for k, v in self.tensors.items() if k.startswith(PACKED_PREFIX)}
        return codec.Encoded(parts, self.meta["packed"])

    def decode(self) -> Tensor:
        """The quantized tensor rebuilt from the codes and scales (bit for bit ``quantized``)."""
        enc = self.encoded
        if enc is None:
            raise ValueError(f"{self.path}: no packed codes ({self.meta.get('packed_note', 'not dumped')})")
        return codec.decode(enc.tensors, enc.meta)


def load(path: str | os.PathLike) -> DumpEntry:
    """Read one dump file: its tensors and metadata (no pickle). ``load(p).decode()`` rebuilds the quantized
    tensor from the codes."""
    path = Path(path)
    tensors, metadata = load_file(path)
    if "fakequant" not in metadata:
        raise ValueError(f"{path}: a safetensors file, but not a fakequant dump (no 'fakequant' metadata)")
    return DumpEntry(tensors, json.loads(metadata["fakequant"]), path)


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """The lines of a dump folder's ``manifest.jsonl``, by rank, then in the order written. Each line has
    ``path`` (relative to ``out_dir``), ``bytes`` and the file's metadata. ``ValueError`` naming
    ``file:line`` for a line that is not a dump-file entry. Takes no lock (the folder may be read-only); a
    line being appended at that moment may read as broken."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no dump folder {out_dir}")
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {MANIFEST}: not a fakequant dump folder")
    return sorted((entry for entry, _ in _parse_manifest(manifest)), key=lambda entry: entry["rank"])  # stable
