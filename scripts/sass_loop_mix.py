"""Instruction mix of the QuantLinear kernels' K loop, compiled for sm_90 on any machine (no GPU needed).

    python scripts/sass_loop_mix.py                      # the tuned Triton-language and Gluon batch<=16 configs
    python scripts/sass_loop_mix.py --triton 16x64x512:4:3 --gluon 8:1:2:1:16:1

Each kernel is compiled with Triton's own toolchain for a Hopper target (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``; integer arguments specialised as divisible by 16, as a launch with 4096-wide
shapes would be), disassembled with the ``nvdisasm`` shipped in Triton's wheel, and the longest loop (a
backward branch) is counted: SASS instructions per weight element per thread, and the most frequent opcodes.
That count bounds the kernels at batch <= 16, where decoding the weight, not reading it, takes the time
(``docs/benchmarks.md``). Registers and stack come from ``cuobjdump -res-usage``.

The figures depend on the Triton version (the GPU machines run 3.6); the script prints the one it used.
"""

from __future__ import annotations

import argparse

import triton
from triton.compiler import ASTSource

from fakequant.kernels.triton import quant_linear as qlk
from fakequant.kernels.triton import quant_linear_gluon as qlg
from fakequant.kernels.triton._sass import compile_sm90, loop_mix, registers

def report(label: str, kernel, elements_per_thread: float) -> None:
    n, mix = loop_mix(kernel.asm["cubin"])
    regs, stack = registers(kernel.asm["cubin"]) or ("?", "?")
    print(f"{label}: loop {n} instructions = {n / elements_per_thread:.2f} per weight element per thread; "
          f"registers {regs}, stack {stack}")
    print("    " + " ".join(f"{op}={k}" for op, k in mix.most_common(12)))


def triton_kernel(block_n: int, block_k: int, num_warps: int, num_stages: int, split_k: int = 2) -> None:
    sig = {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8", "gscale_ptr": "*fp32", "bias_ptr": "*bf16",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KC": "i32",
           "KS": "i32", "stride_xm": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_ym": "i32"}
    cx = dict(BLK=32, E4M3=False, DIV_G=False, HAS_BIAS=False, SPLIT_K=split_k, BLOCK_M=16, BLOCK_N=block_n,
              BLOCK_K=block_k, GROUP_M=8, DECODE_ASM=True, SWAP_AB=False, INTERPRET=False)
    sig.update(dict.fromkeys(cx, "constexpr"))
    k = compile_sm90(ASTSource, qlk._quant_linear_kernel, sig, cx, num_warps, num_stages)
    report(f"Triton-language kernel 16x{block_n}x{block_k}, {num_warps} warps, {num_stages} stages", k,
           block_n * block_k / (32 * num_warps))


def gluon_kernel(shape: qlg.SmallMShape, split_k: int) -> None:
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, constexprs = qlg.compile_signature(shape, split_k)
    k = compile_sm90(GluonASTSource, qlg._small_m_kernel, signature, constexprs, shape.num_warps)
    report(f"Gluon kernel {shape}, {shape.rows} rows x {shape.block_k} weights per step, split-K {split_k}", k,
           shape.rows * shape.block_k / (32 * shape.num_warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", default="16x32x512:4:3", help="16xBNxBK:warps:stages of the Triton kernel")
    parser.add_argument("--gluon", default="8:1:1:2:8:1",
                        help="k_warps:row_warps:row_groups:pieces:block_m:split-K of the Gluon kernel")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_90")
    _, bn, bk = (int(v) for v in args.triton.split(":")[0].split("x"))
    warps, stages = (int(v) for v in args.triton.split(":")[1:])
    triton_kernel(bn, bk, warps, stages)
    if qlg.gluon is None:
        print("Gluon is not available in this Triton")
    else:
        *shape, split_k = (int(v) for v in args.gluon.split(":"))
        gluon_kernel(qlg.SmallMShape(*shape), split_k)


if __name__ == "__main__":
    main()
