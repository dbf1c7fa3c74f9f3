"""TensorSaver: layout, manifest, bit-exact codes, the gradients the GEMMs used, safety, and DDP ranks."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fakequant.saver as saver_mod
from fakequant import FakeQuantConfig, QType, attach_observer, patch, quant_dequant
from fakequant.saver import (
    TensorSaver, every, load, load_file, read_manifest, sanitise, save_file, serialize, deserialize,
)

from .conftest import assert_bitwise_equal, end_gloo_worker, free_port
from .saver_run import CONFIG, GPT, LAYER_REGEX, LAYERS, N_STEPS, OPERANDS, STEPS, train_with_saver
from .tiny_gpt import TinyGPT, synthetic_batch


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dump")
    saver, losses, captured = train_with_saver(out, capture=True)
    return out, saver, losses, captured


def _snapshot(folder):
    """Every path under ``folder`` (folders too), with each file's SHA-256 and modification time."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _as_rank(monkeypatch, rank):
    """Make this process rank ``rank`` for the saver, as if a process group were up."""
    monkeypatch.setattr(saver_mod, "_current_rank", lambda: rank)


def _manifest_lines(out):
    """The raw manifest lines, each checked to be whole (newline-terminated JSON)."""
    raw = (out / "manifest.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


# ------------------------------------------------------------------------------------------ layout
def test_layout_and_manifest_are_exactly_as_specified(dump):
    out, saver, losses, _ = dump
    assert len(losses) == N_STEPS
    expected = {f"rank_0/step_{s:06d}/{layer}.{g}.{r}.safetensors" for s in STEPS for layer in LAYERS
                for g, r in OPERANDS}
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # nothing else: no temporary files, no per-rank manifest, no lock file
    assert files == expected | {"manifest.jsonl"}
    assert sorted(d.name for d in (out / "rank_0").iterdir()) == ["step_000001", "step_000003"]
    manifest = read_manifest(out)
    assert manifest == _manifest_lines(out)  # one rank: the file order is the write order
    assert [m["path"] for m in manifest] == [p.relative_to(out).as_posix() for p in saver.files]
    # the manifest lists exactly the tensor files on disk, once each, with their sizes
    on_disk = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.safetensors")}
    assert {m["path"]: m["bytes"] for m in manifest} == on_disk and len(manifest) == len(on_disk) == len(expected)
    for m in manifest:
        path = out / m["path"]
        assert m["bytes"] == path.stat().st_size
        entry = load(path)
        assert {k: v for k, v in m.items() if k not in ("path", "bytes")} == entry.meta
        layer, gemm, role = path.name.removesuffix(".safetensors").rsplit(".", 2)
        assert (m["layer"], m["gemm"], m["role"], m["rank"]) == (layer, gemm, role, 0)
        assert path.parent.name == f"step_{m['step']:06d}"
        q = CONFIG.format_for(gemm, role)
        assert QType(m["qtype"]).dim(-1) == q.dim(-1) and QType(m["qtype"]).q_dim == m["axis"]
        assert m["dtype"] == "float32" and m["shape"] == list(entry.hp.shape)
        assert m["packed"]["encoding"] in ("fp4", "mx", "hif8", "hif4", "int8") and m["packed_exact"] is True
        assert {"hp", "quantized", "packed.codes"} <= set(entry.tensors)
        assert ("packed.scales" in entry.tensors) == (m["packed"]["encoding"] != "hif8")  # HiF8 has no scales
    assert sum(m["bytes"] for m in manifest) == saver.bytes_written


def test_load_and_decode_reproduce_every_quantized_tensor_bit_for_bit(dump):
    out, *_ = dump
    encodings = set()
    for m in read_manifest(out):
        entry = load(out / m["path"])
        assert_bitwise_equal(entry.decode(), entry.quantized)
        assert_bitwise_equal(entry.quantized, quant_dequant(entry.hp, entry.qtype))  # the reference's numbers
        encodings.add(m["packed"]["encoding"])
    assert encodings == {"fp4", "mx", "hif8", "hif4", "int8"}


def test_dumped_operands_are_the_ones_the_gemms_used(dump):
    """Against hooks that know nothing of fakequant: the module input, its weight, dY and dX from tensor
    hooks, and dW from ``.grad``; the dumped quantized operands rebuild dX and dW bit for bit."""
    out, _, _, captured = dump

    def entry(step, layer, gemm, role):
        return load(out / f"rank_0/step_{step:06d}/{layer}.{gemm}.{role}.safetensors")

    for step in STEPS:
        for layer in LAYERS:
            cap = captured[(step, layer)]
            x2 = cap["x"].reshape(-1, cap["x"].shape[-1])  # [M, K]
            dy2 = cap["dy"].reshape(-1, cap["dy"].shape[-1])  # [M, N]
            e = {(g, r): entry(step, layer, g, r) for g, r in OPERANDS}
            assert_bitwise_equal(e["fprop", "input"].hp, cap["x"])
            assert_bitwise_equal(e["fprop", "weight"].hp, cap["weight"])
            assert_bitwise_equal(e["dgrad", "weight"].hp, cap["weight"])
            assert_bitwise_equal(e["dgrad", "grad_output"].hp, dy2)
            assert_bitwise_equal(e["wgrad", "grad_output"].hp, dy2)
            assert_bitwise_equal(e["wgrad", "input"].hp, x2)
            # Hand-built quantized gradients: dY along N for dgrad, along M for wgrad (DESIGN.md GEMM table).
            q_dy_dgrad = quant_dequant(dy2, QType("mxfp8e5m2").dim(-1))
            q_dy_wgrad = quant_dequant(dy2, QType("hif8").dim(-2))
            q_w_dgrad = quant_dequant(cap["weight"], QType("nvfp4").dim(-2))
            q_x_wgrad = quant_dequant(x2, QType("int8sym").dim(-2))
            assert_bitwise_equal(e["dgrad", "grad_output"].quantized, q_dy_dgrad)
            assert_bitwise_equal(e["wgrad", "grad_output"].quantized, q_dy_wgrad)
            assert_bitwise_equal(e["dgrad", "weight"].quantized, q_w_dgrad)
            assert_bitwise_equal(e["wgrad", "input"].quantized, q_x_wgrad)
            # The decoded dumps reproduce the gradients autograd produced.
            dx = e["dgrad", "grad_output"].decode().mm(e["dgrad", "weight"].decode()).view(cap["x"].shape)
            dw = e["wgrad", "grad_output"].decode().t().mm(e["wgrad", "input"].decode())
            assert_bitwise_equal(dx, cap["dx"])
            assert_bitwise_equal(dw, cap["dw"])


# ------------------------------------------------------------------------------------------ safety
def test_a_second_run_into_the_same_folder_fails_before_touching_anything(dump):
    out, *_ = dump
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"rank 0 already has a dump in .*\(24 tensor files in .*rank_0, "
                                              r"24 lines in manifest.jsonl\).*overwrite=True"):
        train_with_saver(out)
    with pytest.raises(FileExistsError, match="nothing was written"):
        TensorSaver(out, steps=[0], ranks=None)
    assert _snapshot(out) == before  # every byte, every mtime, no new file or folder


def test_the_manifest_alone_or_the_folder_alone_is_an_earlier_dump(dump, tmp_path):
    out, *_ = dump
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "manifest.jsonl").write_bytes((out / "manifest.jsonl").read_bytes())
    with pytest.raises(FileExistsError, match=r"rank 0 .*\(0 tensor files in .*, 24 lines in manifest.jsonl\)"):
        TensorSaver(tmp_path / "lines", steps=[0])
    (tmp_path / "files" / "rank_0" / "step_000001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"rank 0 .*0 lines in manifest.jsonl"):
        TensorSaver(tmp_path / "files", steps=[0])
    TensorSaver(tmp_path / "lines", steps=[0], ranks=(1,))  # rank 1 has no earlier dump there
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "files", "files/rank_0", "files/rank_0/step_000001", "lines", "lines/manifest.jsonl"]


def test_overwrite_true_replaces_only_this_ranks_folder_and_lines(tmp_path, monkeypatch):
    train_with_saver(tmp_path, steps=[1])
    _as_rank(monkeypatch, 1)
    train_with_saver(tmp_path, steps=[1], ranks=(1,))  # rank 1 is not refused by rank 0's lines
    lines_of_1 = [line for line in (tmp_path / "manifest.jsonl").read_bytes().splitlines() if b'"rank": 1' in line]
    rank_1 = _snapshot(tmp_path / "rank_1")
    (tmp_path / "notes.txt").write_text("mine")
    _as_rank(monkeypatch, 0)
    with pytest.raises(FileExistsError, match="rank 0 already has a dump"):
        train_with_saver(tmp_path, steps=[2])
    saver, _, _ = train_with_saver(tmp_path, steps=[2], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "rank_0").iterdir()) == ["step_000002"]
    manifest = read_manifest(tmp_path)
    assert [(m["rank"], m["step"]) for m in manifest] == [(0, 2)] * 12 + [(1, 1)] * 12  # by rank
    raw = (tmp_path / "manifest.jsonl").read_bytes().splitlines()
    assert raw[:12] == lines_of_1  # rank 1's lines untouched, byte for byte, still first in the file
    assert _snapshot(tmp_path / "rank_1") == rank_1 and (tmp_path / "notes.txt").read_text() == "mine"
    on_disk = {p.relative_to(tmp_path).as_posix(): p.stat().st_size for p in tmp_path.rglob("*.safetensors")}
    assert {m["path"]: m["bytes"] for m in manifest} == on_disk and len(saver.files) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary manifest left


def test_read_manifest_names_the_bad_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dump folder"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no manifest.jsonl"):
        read_manifest(tmp_path)
    good = [{"rank": 1, "path": "rank_1/a"}, {"rank": 0, "path": "rank_0/b"}, {"rank": 1, "path": "rank_1/c"}]
    text = "".join(json.dumps(m) + "\n" for m in good)
    (tmp_path / "manifest.jsonl").write_text(text)
    assert [m["path"] for m in read_manifest(tmp_path)] == ["rank_0/b", "rank_1/a", "rank_1/c"]
    (tmp_path / "manifest.jsonl").write_text(text + '{"rank": 0, "pa\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:4: not a JSON line"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(text + '\n["rank", 0]\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:5: not a dump-file line .*int 'rank'"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"manifest.jsonl:5: not a dump-file line"):
        TensorSaver(tmp_path, steps=[0])  # the earlier-dump check reads the manifest too


def test_without_fcntl_an_exclusive_lock_file_guards_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(saver_mod, "fcntl", None)
    saver, _, _ = train_with_saver(tmp_path, steps=[1])
    assert len(read_manifest(tmp_path)) == len(saver.files) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "rank_0"]  # lock file gone
    (tmp_path / ".manifest.jsonl.lock").write_text("12345\n")  # left by a crashed run
    monkeypatch.setattr(saver_mod, "LOCK_TIMEOUT_S", 0.05)
    saver = TensorSaver(tmp_path, steps=[0], overwrite=True)  # the check itself takes no lock
    model = nn.Sequential(nn.Linear(32, 32))
    patch(model, FakeQuantConfig(input="mxfp4"), observers=(saver,))
    saver.step(0)
    with pytest.raises(TimeoutError, match=r"\.manifest\.jsonl\.lock has been held for over 0.05 s.*delete it"):
        model(torch.randn(2, 32))  # overwrite=True rewrites the manifest under the lock before the first file
    assert len(read_manifest(tmp_path)) == 12 and (tmp_path / "rank_0").is_dir()  # nothing was removed


def test_max_bytes_stops_after_two_complete_files_with_one_warning(dump, tmp_path):
    sizes = [m["bytes"] for m in read_manifest(dump[0])]
    budget = sizes[0] + sizes[1] + sizes[2] - 1  # the third file would pass it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saver, losses, _ = train_with_saver(tmp_path, max_bytes=budget)
    mine = [w for w in caught if "max_bytes" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    assert "training continues" in str(mine[0].message)
    assert len(losses) == N_STEPS and saver.stopped  # the run went on
    files = sorted(p for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and [m["path"] for m in read_manifest(tmp_path)] == [
        p.relative_to(tmp_path).as_posix() for p in saver.files]
    assert sum(p.stat().st_size for p in files) == saver.bytes_written == sizes[0] + sizes[1]
    for p in files:
        entry = load(p)  # complete: parses, and decodes to its quantized tensor
        assert_bitwise_equal(entry.decode(), entry.quantized)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_load_never_unpickles(dump, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    out, *_ = dump
    for m in read_manifest(out)[:6]:
        load(out / m["path"]).decode()


def test_files_are_standard_safetensors(dump, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    out, *_ = dump
    path = out / read_manifest(out)[0]["path"]
    theirs, mine = st.load_file(str(path)), load(path).tensors
    assert theirs.keys() == mine.keys()
    for k in mine:
        assert_bitwise_equal(theirs[k], mine[k]) if mine[k].is_floating_point() else torch.equal(theirs[k], mine[k])
    # and we read what the library writes, every dtype we store
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.uint8), "c": torch.zeros(0, 2),
               "d": torch.tensor(1.5), "e": torch.randn(4).half(), "f": torch.tensor([True, False])}
    st.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    back, meta = load_file(tmp_path / "lib.safetensors")
    assert meta == {"k": "v"} and back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
    assert deserialize(serialize(tensors))[0].keys() == tensors.keys()


def test_save_file_is_atomic_and_never_overwrites(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"x": torch.ones(2)}, p)
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_file({"x": torch.zeros(2)}, p)
    assert torch.equal(load_file(p)[0]["x"], torch.ones(2))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["t.safetensors"]
    with pytest.raises(ValueError, match="not a safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
        load_file(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not a fakequant dump"):
        load(p)


# ------------------------------------------------------------------------------------------ selection
def test_step_rules():
    assert [s for s in range(12) if every(4)(s)] == [0, 4, 8]
    assert [s for s in range(12) if every(3, start=2, stop=9)(s)] == [2, 5, 8]
    for steps, chosen in (([1, 3], {1, 3}), (range(2, 8, 3), {2, 5}), (every(5), {0, 5}),
                          (lambda s: s % 4 == 1, {1, 5}), ({6}, {6})):
        saver = TensorSaver("unused", steps=steps)
        assert {s for s in range(8) if saver.step(s)} == chosen
    with pytest.raises(TypeError, match=r"ambiguous; pass \[5\] .*every\(5\)"):
        TensorSaver("unused", steps=5)
    with pytest.raises(ValueError, match="non-negative ints"):
        TensorSaver("unused", steps=[1, -2])
    with pytest.raises(TypeError, match="steps must be"):
        TensorSaver("unused", steps="1,3")


def test_bad_arguments_name_the_field_and_the_allowed_values():
    cases = [
        (dict(gemms=("fprop", "bprop")), ValueError, "gemms=.*fprop, dgrad, wgrad"),
        (dict(roles=("activation",)), ValueError, "roles=.*input, weight, grad_output"),
        (dict(what=("codes",)), ValueError, "what=.*hp, quantized, packed"),
        (dict(max_bytes=0), ValueError, "max_bytes=0 must be a positive int or None"),
        (dict(layers="h.(0"), ValueError, "not a valid regex"),
        (dict(layers=3), TypeError, "layers must be a regex"),
        (dict(ranks=(-1,)), ValueError, "ranks="),
        (dict(calls="every"), ValueError, "calls='every' is not one of first, all"),
        (dict(overwrite="yes"), TypeError, "overwrite must be a bool"),
    ]
    for kwargs, err, message in cases:
        with pytest.raises(err, match=message):
            TensorSaver("unused", steps=[0], **kwargs)
    with pytest.raises(ValueError, match="non-negative int"):
        TensorSaver("unused", steps=[0]).step(-1)


def test_filters_what_and_names(tmp_path):
    saver, _, _ = train_with_saver(tmp_path, steps=[2], layers=lambda n: n == "h.0.attn.c_attn",
                                   gemms=("dgrad",), roles=("grad_output",), what=("quantized", "packed"))
    [path] = saver.files
    assert path.relative_to(tmp_path).as_posix() == "rank_0/step_000002/h.0.attn.c_attn.dgrad.grad_output.safetensors"
    entry = load(path)
    assert "hp" not in entry.tensors and set(entry.meta["tensors"]) == {"quantized", "packed.codes", "packed.scales"}
    assert_bitwise_equal(entry.decode(), entry.quantized)
    assert sanitise("h.0.attn") == "h.0.attn"
    assert sanitise("") == "functional-da39a3ee"
    assert sanitise("a/b c") != sanitise("a_b_c") and sanitise("a/b c").startswith("a_b_c-")
    assert sanitise("..") .startswith("functional-") or not sanitise("..").startswith(".")


def test_functional_calls_formats_without_codes_and_calls_all(tmp_path):
    """patch_functional (layer ""), a format with no bit encoding (tmx), every call dumped."""
    from fakequant import patch_functional

    cfg = FakeQuantConfig(input="tmx6", weight="mxfp8e4m3")
    saver = TensorSaver(tmp_path, steps=[0], roles=("input", "weight"), gemms=("fprop",), calls="all")
    saver.step(0)
    a, b = torch.randn(4, 64), torch.randn(64, 8)
    with patch_functional(cfg, ops=("matmul",), observers=(saver,)):
        torch.matmul(a, b)
        torch.matmul(a, b)
    names = sorted(p.name for p in saver.files)
    stem = sanitise("")
    assert names == [f"{stem}.fprop.input.call1.safetensors", f"{stem}.fprop.input.safetensors",
                     f"{stem}.fprop.weight.call1.safetensors", f"{stem}.fprop.weight.safetensors"]
    entry = load(tmp_path / "rank_0/step_000000" / f"{stem}.fprop.input.safetensors")
    assert entry.meta["layer"] == "" and entry.meta["packed"] is None
    assert "no bit encoding" in entry.meta["packed_note"] and "tmx6" in entry.meta["packed_note"]
    with pytest.raises(ValueError, match="no packed codes"):
        entry.decode()
    assert load(tmp_path / "rank_0/step_000000" / f"{stem}.fprop.input.call1.safetensors").meta["call"] == 1


def test_attach_without_lightning_and_no_step_warns_once(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32))
    patch(model, FakeQuantConfig(input="mxfp4", weight="mxfp4"))
    saver = TensorSaver(tmp_path, steps=every(2))
    assert saver.attach(model) == ["0"] == attach_observer(model, saver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 32)).sum().backward()
        model(torch.randn(2, 32)).sum().backward()
    assert len([w for w in caught if "saver.step(n)" in str(w.message)]) == 1
    assert not saver.files
    for step in range(3):
        saver.step(step)
        model(torch.randn(2, 32)).sum().backward()
    assert {p.parent.name for p in saver.files} == {"step_000000", "step_000002"}
    assert saver.detach(model) == ["0"]


# ------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyGPT(GPT)
        saver = TensorSaver(out_dir, steps=[0, 1], layers=LAYER_REGEX, ranks=(0, 1))
        patch(model, CONFIG, observers=(saver,))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
        batch = synthetic_batch(GPT, 2, seed=1 + rank)
        for step in range(2):
            saver.step(step)
            _, loss = ddp(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert saver.rank == rank
    finally:
        dist.destroy_process_group()
    end_gloo_worker()  # reached only when the worker succeeded


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_ranks_write_their_own_folders(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "rank_0", "rank_1"]
    lines = _manifest_lines(tmp_path)
    per_rank = {}
    for r in (0, 1):
        mine = [m for m in lines if m["rank"] == r]
        assert all(m["path"].startswith(f"rank_{r}/") for m in mine)
        on_disk = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / f"rank_{r}").rglob("*.safetensors")}
        assert {m["path"] for m in mine} == on_disk and len(mine) == len(on_disk) == 2 * len(LAYERS) * len(OPERANDS)
        per_rank[r] = on_disk
    assert not per_rank[0] & per_rank[1]
    # same layout under each rank, different data (each rank saw its own batch)
    assert {p[len("rank_0/"):] for p in per_rank[0]} == {p[len("rank_1/"):] for p in per_rank[1]}
    x0 = load(tmp_path / "rank_0/step_000000/h.0.attn.c_attn.fprop.input.safetensors").hp
    x1 = load(tmp_path / "rank_1/step_000000/h.0.attn.c_attn.fprop.input.safetensors").hp
    assert not torch.equal(x0, x1)
    assert len(read_manifest(tmp_path)) == 2 * len(per_rank[0])


N_APPEND_STEPS = 30  # x 6 operands of one Linear: 180 files and lines per rank, written while the other rank writes


def _append_worker(rank: int, world: int, port: int, out_dir: str, lock: str) -> None:
    """Rank 0 lists files before rank 1 builds its saver (which must not count them against it); then both
    dump many small files at once, appending to the one manifest concurrently."""
    if lock == "exclusive-file":
        saver_mod.fcntl = None  # this spawned process only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Linear(32, 32))
        patch(model, FakeQuantConfig(input="mxfp4", weight="mxfp4", grad_output="mxfp8e5m2"))
        x = torch.randn(4, 32, requires_grad=True)  # so that dgrad runs: 6 operands per step
        saver = None
        if rank == 0:
            saver = TensorSaver(out_dir, steps=range(N_APPEND_STEPS), ranks=(0, 1), what=("quantized",))
            saver.attach(model)
            saver.step(0)
            model(x).sum().backward()
        dist.barrier()  # rank 0's first lines are in the manifest
        if rank == 1:
            assert len(read_manifest(out_dir)) == 6
            saver = TensorSaver(out_dir, steps=range(N_APPEND_STEPS), ranks=(0, 1), what=("quantized",))
            saver.attach(model)
        dist.barrier()
        for step in range(1 if rank == 0 else 0, N_APPEND_STEPS):
            saver.step(step)
            model(x).sum().backward()
        assert len(saver.files) == 6 * N_APPEND_STEPS
    finally:
        dist.destroy_process_group()
    end_gloo_worker()  # reached only when the worker succeeded


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("lock", ["flock", "exclusive-file"])
def test_two_processes_append_whole_lines_to_one_manifest(tmp_path, lock):
    if lock == "flock" and saver_mod.fcntl is None:
        pytest.skip("no fcntl on this platform")
    mp.spawn(_append_worker, args=(2, free_port(), str(tmp_path), lock), nprocs=2, join=True)
    lines = _manifest_lines(tmp_path)  # every line whole JSON, newline-terminated
    assert len(lines) == 2 * 6 * N_APPEND_STEPS
    files = {r: [m["path"] for m in lines if m["rank"] == r] for r in (0, 1)}
    for r in (0, 1):
        on_disk = {p.relative_to(tmp_path).as_posix(): p.stat().st_size
                   for p in (tmp_path / f"rank_{r}").rglob("*.safetensors")}
        assert {m["path"]: m["bytes"] for m in lines if m["rank"] == r} == on_disk
        assert len(files[r]) == len(set(files[r])) == len(on_disk) == 6 * N_APPEND_STEPS
        assert all(f.startswith(f"rank_{r}/") for f in files[r])
        # each rank's lines in its write order: step by step
        steps = [m["step"] for m in lines if m["rank"] == r]
        assert steps == sorted(steps)
    assert not set(files[0]) & set(files[1])
    ranks = [m["rank"] for m in lines]
    assert sum(a != b for a, b in itertools.pairwise(ranks)) > 2  # the ranks appended at once (~250 switches)
    assert [m["rank"] for m in read_manifest(tmp_path)] == [0] * len(files[0]) + [1] * len(files[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "rank_0", "rank_1"]  # no lock left
