"""The kernel launcher's prepared-launch cache (``fakequant.kernels.triton._launch``).

CPU: the direct path is never taken under the interpreter, the argument list a direct launch would pass is
built in the kernel's declaration order with no reference kept to the first call's tensors, and the check
that this Triton launches kernels the way the direct path mirrors. GPU (``cuda``): for every family, calls
that go direct give bit for bit the reference's results on fresh tensors, also when a tensor's alignment
differs from the first call's (a different compiled specialization, so a different cache entry).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import fakequant  # noqa: E402
from fakequant import QType  # noqa: E402
from fakequant.formats import reference_quant_dequant  # noqa: E402
from fakequant.kernels.triton import _launch  # noqa: E402

from .conftest import bitwise_mismatches  # noqa: E402


@triton.jit
def _probe_kernel(a_ptr, b_ptr, n, SCALE: tl.constexpr, FLAG: tl.constexpr = True):
    pass  # never launched: only its parameter list is read


def test_direct_argument_list_follows_declaration_order_and_drops_tensors():
    a, b = torch.zeros(4), torch.zeros(4)
    prepared = _launch._prepare_direct(_probe_kernel, object(), (3,), (a, b, 4), {"SCALE": 2.0, "num_warps": 4},
                                       (a, b))
    assert prepared.grid == (3, 1, 1)
    assert prepared.values == (None, None, 4, 2.0, True)  # num_warps is an option, not a parameter
    assert prepared.slots == ((0, 0), (1, 1))


def test_direct_argument_list_maps_a_repeated_tensor_to_every_slot():
    a, b = torch.zeros(4), torch.zeros(4)
    prepared = _launch._prepare_direct(_probe_kernel, object(), (1,), (a, b, 4), {"SCALE": 1.0}, (a, b, b))
    assert prepared.slots == ((0, 0), (1, 1))
    again = _launch._prepare_direct(_probe_kernel, object(), (1,), (a, a, 4), {"SCALE": 1.0}, (a,))
    assert again.slots == ((0, 0), (1, 0))


def test_a_tensor_the_key_does_not_cover_is_never_launched_directly():
    a, b, other = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    assert _launch._prepare_direct(_probe_kernel, object(), (1,), (a, other, 4), {"SCALE": 1.0}, (a, b)) is None


def test_missing_parameter_raises_naming_it():
    a = torch.zeros(4)
    with pytest.raises(TypeError, match="no value for parameter 'SCALE'"):
        _launch._prepare_direct(_probe_kernel, object(), (1,), (a, a, 4), {}, (a,))


def test_this_triton_is_recognised_or_the_reason_is_given():
    ok, reason = _launch.direct_launch_supported()
    assert ok or reason  # never refused silently
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if version >= (3, 4):  # the launch path the direct call mirrors (JITFunction.run with knobs)
        assert ok, reason


def test_interpreter_never_launches_directly():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter path")
    before = _launch.launch_stats()["direct"]
    x = torch.randn(8, 64)
    for _ in range(3):
        fakequant.quant_dequant(x, "mxfp8e4m3", backend="triton")
    assert _launch.launch_stats()["direct"] == before


FAMILY_QTYPES = ["mxfp8e4m3", "mxfp4:dim=0", "hif8", "hif4", "hifx4_v12:dim=0", "tmx6", "nvf4", "nvfp4",
                 "nf4", "int8sym", "int8sym:dim=0"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", FAMILY_QTYPES)
def test_gpu_direct_launches_equal_the_reference(name):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU with compiled (not interpreted) Triton")
    if not _launch.direct_launch_supported()[0]:
        pytest.skip(_launch.direct_launch_supported()[1])
    q = QType(name)
    before = _launch.launch_stats()["direct"]
    for seed in range(4):
        torch.manual_seed(seed)
        base = torch.randn(257 * 130 + 1, device="cuda", dtype=torch.bfloat16) * 4.0 ** (seed - 2)
        # seeds 0, 1: 16-byte aligned; seeds 2, 3: a view one element in (another specialization)
        x = (base[:-1] if seed < 2 else base[1:]).view(257, 130)
        got = fakequant.quant_dequant(x, q, backend="triton")
        assert bitwise_mismatches(got, reference_quant_dequant(x, q)) == 0, (name, seed)
    assert _launch.launch_stats()["direct"] >= before + 2  # the second call of each alignment went direct
