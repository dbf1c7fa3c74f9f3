"""Shared test helpers: bit-exact comparison and the golden data location."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def free_port() -> int:
    """A free TCP port on localhost for a gloo process group in a multi-process test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_gloo_worker() -> None:
    """End a spawned worker that ran a gloo process group, once it has finished and destroyed the group,
    without running destructors. Why: tearing down a gloo group (its last reference goes when the DDP
    reducer is freed) joins the group's run-loop thread while holding the GIL, and that thread may need the
    GIL to free its last work's thread-local state: a deadlock seen in about one run in ten (stack from
    py-spy: ProcessGroupGloo::~ProcessGroupGloo -> std::thread::join, against AsyncWork::~AsyncWork ->
    gil_scoped_acquire). The worker's files are closed by then; its exit code 0 is all the parent reads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def bitwise_mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Count elements that differ bit for bit, treating every NaN as equal and -0 != +0."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.float(), expected.float()
    same = (torch.isnan(a) & torch.isnan(e)) | ((a == e) & (torch.signbit(a) == torch.signbit(e)))
    return int((~same).sum())


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    bad = bitwise_mismatches(actual, expected)
    assert bad == 0, f"{bad} of {expected.numel()} elements differ"


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Test tensors are tiny: extra intra-op threads only add synchronisation, and on a busy 2-core CI
    machine OpenMP spin-waiting makes the elementwise quantizers tens of times slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
