"""fakequant: training-time fake quantization for PyTorch.

Quantize-then-dequantize in higher precision, with straight-through gradients, for MXFP8/6/4, HiF8, HiF4,
NVFP4, NF4 and any custom ``e<E>m<M>k<K>b<B>`` block format. Start with ``QType`` and ``quant_dequant``.
"""

from .dispatch import quant_dequant
from .qtype import QType
from .config import FakeQuantConfig
from .autograd import quant_attention, quant_baddbmm, quant_bmm, quant_linear, quant_matmul, quant_ste
from .patch import FakeQuantLinear, PatchReport, attach_observer, detach_observer, patch, patch_functional, unpatch
from .observe import OperandEvent
from .compat import quant_dequant_qkv, quant_dequant_tensor, quant_dequant_tensor_with_backward

# The Ascend backend registers itself into the dispatch table when torch_npu imports; without it this
# import registers nothing and records why (``fakequant.dispatch.describe()``).
import fakequant_npu as _fakequant_npu  # noqa: E402,F401
from . import packing, scale_search  # noqa: E402  (real low-bit storage, MSE / Hessian scale search)
from .nn import QuantLinear  # noqa: E402
from .export import ExportReport, export  # noqa: E402  (binds fakequant.export to the function)

__version__ = "0.1.0"

__all__ = ["QType", "quant_dequant", "__version__"]
__all__ += [
    "FakeQuantConfig", "quant_linear", "quant_matmul", "quant_bmm", "quant_baddbmm", "quant_attention", "quant_ste",
    "patch", "unpatch", "patch_functional", "FakeQuantLinear", "PatchReport",
    "attach_observer", "detach_observer", "OperandEvent",
    "quant_dequant_tensor", "quant_dequant_tensor_with_backward", "quant_dequant_qkv",
]
__all__ += ["packing", "scale_search", "QuantLinear", "export", "ExportReport"]
