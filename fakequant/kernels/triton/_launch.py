"""Launch a Triton kernel, re-using the prepared launch of an earlier identical call.

Why: a training step issues a few hundred quantizations of small operands, and ``kernel[grid](...)`` costs
tens of microseconds of host time per call (binding the arguments, computing the specialization key,
looking up the compiled kernel), on top of each launcher's own planning (geometry, tile plan, format
constants). When the host needs longer to issue a step than the GPU needs to run it, that host time *is* the
step time (``scripts/bench_call_overhead.py``, ``docs/benchmarks.md``).

``launch(kernel, key, tensors, prepare)``: ``key`` (hashable) must determine everything ``prepare`` computes
except the tensors themselves (callers pass the QType, shape, dtype and any override). On the first call with
a key, ``prepare()`` gives the grid, positional arguments and keyword arguments, and the kernel is launched
the ordinary way, which compiles it; the compiled kernel and its argument list are kept. Later calls with the
same key, the same tensor-pointer alignments (Triton specializes on 16-byte alignment) and the same current
device launch the compiled kernel directly with the new tensors: exactly the call Triton's own
``JITFunction.run`` makes once its cache has answered, minus the work of asking it.

The direct call depends on how ``JITFunction.run`` hands arguments to the compiled kernel, so it is used only
where that code is the one this module mirrors (``direct_launch_supported``, checked once from Triton's
source) and not under ``TRITON_INTERPRET=1``; elsewhere, and with ``FAKEQUANT_DIRECT_LAUNCH=0`` (read at the
first launch), every call goes through ``kernel[grid](...)``. Either way the kernel, its specialization and
its arguments are the same.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch

__all__ = ["clear_launch_cache", "direct_launch_supported", "launch", "launch_stats"]

ENV_DIRECT = "FAKEQUANT_DIRECT_LAUNCH"
_MAX_ENTRIES = 4096  # prepared launches kept; a new key beyond it clears the cache (shapes rarely vary that much)


class _Prepared(NamedTuple):
    compiled: Any  # triton's CompiledKernel
    grid: tuple[int, int, int]
    values: tuple  # every kernel parameter in declaration order, constexprs included, tensors left as None
    slots: tuple[tuple[int, int], ...]  # (index in ``values``, index in the call's tensors) per tensor argument


_CACHE: dict[tuple, _Prepared] = {}
_TRITON: list = []  # [triton.knobs, triton.runtime.driver.driver] once direct_launch_supported() said yes
_STATS = {"direct": 0, "ordinary": 0}


@functools.lru_cache(maxsize=1)
def direct_launch_supported() -> tuple[bool, str]:
    """Whether this Triton's ``JITFunction.run`` launches a cached kernel the way ``_direct`` does."""
    if os.environ.get(ENV_DIRECT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, f"{ENV_DIRECT} is off"
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction

        source = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError) as err:  # an older Triton (no knobs), or no source to read
        return False, f"Triton's launch path cannot be inspected ({type(err).__name__}: {err})"
    expected = (("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                "launch_metadata,"), "*bound_args.values())")
    if not all(" ".join(part.split()) in " ".join(source.split()) for part in expected):
        return False, "this Triton launches kernels differently from the direct path"
    from triton.runtime.driver import driver

    _TRITON[:] = [knobs, driver]  # what _direct uses, looked up once
    return True, ""


def clear_launch_cache() -> None:
    _CACHE.clear()


def launch_stats() -> dict[str, int]:
    """How many launches went direct and how many through ``kernel[grid](...)`` (tests, benchmarks)."""
    return dict(_STATS)


def launch(kernel, key: Hashable, tensors: tuple[torch.Tensor, ...],
           prepare: Callable[[], tuple[tuple[int, ...], tuple, dict]]) -> None:
    """Launch ``kernel`` on ``tensors`` (see the module docstring); ``prepare() -> (grid, args, kwargs)``."""
    direct = tensors[0].is_cuda and direct_launch_supported()[0]
    if direct:
        device = torch.cuda.current_device()
        full_key = (kernel, key, device) + tuple(t.data_ptr() % 16 for t in tensors)
        prepared = _CACHE.get(full_key)
        if prepared is not None:
            _direct(prepared, tensors, device)
            _STATS["direct"] += 1
            return
    grid, args, kwargs = prepare()
    compiled = kernel[grid](*args, **kwargs)
    _STATS["ordinary"] += 1
    if direct and compiled is not None:
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        prepared = _prepare_direct(kernel, compiled, grid, args, kwargs, tensors)
        if prepared is not None:
            _CACHE[full_key] = prepared


def _prepare_direct(kernel, compiled, grid, args, kwargs, tensors) -> _Prepared | None:
    values = []
    for i, param in enumerate(inspect.signature(kernel.fn).parameters.values()):
        if i < len(args):
            values.append(args[i])
        elif param.name in kwargs:
            values.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            values.append(param.default)
        else:
            raise TypeError(f"{kernel.fn.__name__}: no value for parameter {param.name!r}")
    slots = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            owner = next((j for j, t in enumerate(tensors) if v is t), None)
            if owner is None:
                return None  # a tensor the key does not stand for: never launched directly
            slots.append((i, owner))
            values[i] = None  # keep no reference to this call's tensors
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    return _Prepared(compiled, grid3, tuple(values), tuple(slots))


def _direct(p: _Prepared, tensors: tuple[torch.Tensor, ...], device: int) -> None:
    knobs, driver = _TRITON
    values = list(p.values)
    for slot, owner in p.slots:
        values[slot] = tensors[owner]
    stream = driver.active.get_current_stream(device)
    c = p.compiled
    enter = knobs.runtime.launch_enter_hook  # a profiler's hook wants the launch metadata; else it is None
    metadata = None if enter is None else c.launch_metadata(p.grid, stream, *values)
    c.run(p.grid[0], p.grid[1], p.grid[2], stream, c.function, c.packed_metadata, metadata, enter,
          knobs.runtime.launch_exit_hook, *values)
