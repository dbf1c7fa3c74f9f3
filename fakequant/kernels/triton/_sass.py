"""Offline SASS of Triton / Gluon kernels: compile for sm_90 on any machine (no GPU) and count the longest loop.

Used by ``scripts/sass_loop_mix.py`` and by a test that keeps the Gluon QuantLinear kernel's K loop within its
instruction budget. Triton's wheel ships the tools (``ptxas``, ``nvdisasm``, ``cuobjdump``); integer arguments
are specialised as divisible by 16, as a launch with 4096-wide shapes would be.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

__all__ = ["compile_sm90", "loop_mix", "registers"]

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(source_cls, fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 1):
    """``triton.compile`` of ``fn`` for an sm_90 target; ``source_cls``: ``ASTSource`` or ``GluonASTSource``."""
    names = list(signature)
    div16 = [n for n in names if signature[n] != "constexpr" and n != "M"]  # M is not specialised
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = source_cls(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, name), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_mix(cubin: bytes) -> tuple[int, collections.Counter]:
    """(instruction count, opcode counts) of the longest loop (a backward branch) in the SASS of ``cubin``."""
    labels, ops = {}, []
    for line in _tool("nvdisasm", ["-c"], cubin).splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*\s*(.*?);", line)
        if ins:
            ops.append((ins.group(1), ins.group(2)))
    best = (0, 0)
    for i, (op, args) in enumerate(ops):
        target = re.search(r"(\.L_x_\d+)", args) if op == "BRA" else None
        start = labels.get(target.group(1), i + 1) if target else i + 1
        if start <= i and i + 1 - start > best[1] - best[0]:
            best = (start, i + 1)
    body = [op for op, _ in ops[best[0]:best[1]]]
    return len(body), collections.Counter(body)


def registers(cubin: bytes) -> tuple[int, int] | None:
    """(registers per thread, stack bytes) from ``cuobjdump -res-usage``."""
    res = re.search(r"REG:(\d+) STACK:(\d+)", _tool("cuobjdump", ["-res-usage"], cubin))
    return (int(res.group(1)), int(res.group(2))) if res else None
