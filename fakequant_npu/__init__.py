"""Ascend NPU implementations of fakequant's formats (registered into ``fakequant.dispatch``).

Nothing is registered yet; importing this package is always safe, with or without ``torch_npu``.
"""

__all__: list[str] = []
