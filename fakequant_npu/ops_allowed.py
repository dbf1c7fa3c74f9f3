"""The aten operators the portable NPU implementations may call (``fakequant_npu/portable.py``).

``tests/test_npu_backend.py`` runs every family under a ``TorchDispatchMode`` that records each aten
overload called and fails on any name outside ``ALLOWED_OPS`` (or inside ``FORBIDDEN_OPS``). Adding an
operator here is a claim that ``torch_npu`` runs it on the device for the dtypes the code uses (float32,
int32, bool, and fp16/bf16 only at the input/output cast), so cite where that claim comes from.

Sources (read for this list; the commit is the version read):

* **Compute kernels**: ``Ascend/op-plugin``, ``op_plugin/config/op_plugin_functions.yaml`` at commit
  0066e6bc19498cd4b17c6fa8737a68d543d5dcbc, section ``official:``. Every compute overload below appears
  there with ``acl_op`` and/or ``op_api: all_version`` (all torch_npu releases v2.1 .. v2.10). That file is
  the registration of NPU kernels for the PrivateUse1 (``npu``) dispatch key; an aten op absent from it
  and from the next file has no NPU kernel and would fall back to the CPU or fail.
* **Framework operators** (views, copies, allocation, casts): ``Ascend/pytorch``,
  ``torch_npu/csrc/aten/npu_native_functions.yaml`` at commit 0002af7c0ddc8e18a0318991105e989db4306990
  (``empty.memory_format``, ``empty_like``, ``copy_``, ``clone``, ``view``, ``_unsafe_view``, ``permute``,
  ``slice.Tensor``, ``unsqueeze``, ``alias``, ``detach``, ``scalar_tensor``, ``full_like``, ``fill_``), and
  PyTorch's own ``CompositeExplicitAutograd`` kernels, which run on every backend through the ops above:
  ``view.dtype`` (a reinterpretation of the same storage), ``_to_copy`` (``empty_strided`` + ``copy_``),
  ``lift_fresh``.

What was **not** checked: the per-dtype tables of the individual aclnn operators on Atlas A2 (910B). The
registrations above say the operator exists on the device; whether, e.g., ``aclnnAmax`` accepts int32 on a
given CANN release is only proven by running on that device, which is what the dispatcher's start-up
self-test does (a canary tensor through every registered implementation, compared with the reference).

Deliberately absent (the portable code must not need them): ``frexp``, ``ldexp``, ``log2``, ``exp2``,
``pow``, ``round`` (its tie rule on the device is not pinned down), ``bucketize``/``searchsorted``,
``index_select``/``gather`` (table lookups become ``where`` chains), anything float64, and every operator
that synchronises with the host.
"""

from __future__ import annotations

__all__ = ["ALLOWED_OPS", "FORBIDDEN_OPS", "SOURCES"]

SOURCES = {
    "op-plugin": "Ascend/op-plugin op_plugin/config/op_plugin_functions.yaml @ 0066e6bc19498cd4b17c6fa8737a68d543d5dcbc",
    "torch_npu": "Ascend/pytorch torch_npu/csrc/aten/npu_native_functions.yaml @ 0002af7c0ddc8e18a0318991105e989db4306990",
    "pytorch": "PyTorch native_functions.yaml, CompositeExplicitAutograd kernels (device-independent)",
}

# overload name (as str(func) prints it under a TorchDispatchMode) -> source key
ALLOWED_OPS: dict[str, str] = {
    # float32 arithmetic, one IEEE operation each
    "aten.add.Tensor": "op-plugin",
    "aten.sub.Tensor": "op-plugin",
    "aten.rsub.Scalar": "op-plugin",
    "aten.mul.Tensor": "op-plugin",
    "aten.div.Tensor": "op-plugin",
    "aten.neg.default": "op-plugin",
    "aten.abs.default": "op-plugin",
    "aten.floor.default": "op-plugin",
    "aten.maximum.default": "op-plugin",
    "aten.minimum.default": "op-plugin",
    "aten.clamp.default": "op-plugin",  # used on int32 exponents only
    "aten.amax.default": "op-plugin",  # used on int32 bit patterns only
    # comparisons and selection
    "aten.eq.Scalar": "op-plugin",
    "aten.eq.Tensor": "op-plugin",
    "aten.ne.Scalar": "op-plugin",
    "aten.ne.Tensor": "op-plugin",
    "aten.gt.Scalar": "op-plugin",
    "aten.gt.Tensor": "op-plugin",
    "aten.ge.Scalar": "op-plugin",
    "aten.ge.Tensor": "op-plugin",
    "aten.lt.Scalar": "op-plugin",
    "aten.lt.Tensor": "op-plugin",
    "aten.le.Scalar": "op-plugin",
    "aten.le.Tensor": "op-plugin",
    "aten.where.self": "op-plugin",
    # int32 bit operations (and bool logic, which torch routes through the bitwise ops)
    "aten.bitwise_and.Scalar": "op-plugin",
    "aten.bitwise_and.Tensor": "op-plugin",
    "aten.bitwise_or.Scalar": "op-plugin",
    "aten.bitwise_or.Tensor": "op-plugin",
    "aten.bitwise_not.default": "op-plugin",
    "aten.__lshift__.Scalar": "op-plugin",
    "aten.__lshift__.Tensor": "op-plugin",
    "aten.__rshift__.Scalar": "op-plugin",
    "aten.__rshift__.Tensor": "op-plugin",
    # allocation, padding, copies, casts
    "aten.constant_pad_nd.default": "op-plugin",
    "aten.ones_like.default": "op-plugin",
    "aten.zeros.default": "op-plugin",
    "aten.zeros_like.default": "op-plugin",
    "aten.zero_.default": "op-plugin",
    "aten.fill_.Scalar": "op-plugin",
    "aten.full_like.default": "torch_npu",
    "aten.scalar_tensor.default": "torch_npu",
    "aten.empty.memory_format": "torch_npu",
    "aten.empty_like.default": "torch_npu",
    "aten.copy_.default": "torch_npu",
    "aten.clone.default": "torch_npu",
    "aten._to_copy.default": "pytorch",
    "aten.lift_fresh.default": "pytorch",
    # views (no data movement)
    "aten.view.default": "torch_npu",
    "aten.view.dtype": "pytorch",
    "aten._unsafe_view.default": "torch_npu",
    "aten.permute.default": "torch_npu",
    "aten.slice.Tensor": "torch_npu",
    "aten.unsqueeze.default": "torch_npu",
    "aten.expand.default": "torch_npu",
    "aten.alias.default": "torch_npu",
    "aten.detach.default": "torch_npu",
}

# Never allowed, whatever the list above says: exact-exponent helpers the portable code replaces with bit
# fields, float64, and every operator that copies a value to the host (a synchronisation).
FORBIDDEN_OPS: frozenset[str] = frozenset({
    "aten.frexp.Tensor",
    "aten.ldexp.Tensor",
    "aten.log2.default",
    "aten.exp2.default",
    "aten.pow.Tensor_Scalar",
    "aten.pow.Scalar",
    "aten._local_scalar_dense.default",  # .item(), bool(tensor), int(tensor)
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.equal.default",
    "aten.allclose.default",
})
