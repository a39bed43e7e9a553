"""`dali::*` custom ops: one op a file (schema, fake kernel, reference)."""

from . import cpu_attention as _cpu_attention  # noqa: F401  (defines dali::cpu_attention)
from . import cpu_experts as _cpu_experts  # noqa: F401  (defines dali::cpu_experts[_submit|_wait])
from . import cpu_linear as _cpu_linear  # noqa: F401  (defines dali::cpu_linear)
from . import gpu_experts as _gpu_experts  # noqa: F401  (defines dali::gpu_experts)
from . import moe_hybrid as _moe_hybrid  # noqa: F401  (defines dali::moe_hybrid)
from . import prefetch_next as _prefetch_next  # noqa: F401  (defines dali::prefetch_next)
from . import quantized_linear as _quantized_linear  # noqa: F401  (defines dali::quantized_linear)
from .expert_math import expert_forward, moe_reference
from .library import all_op_names
from .moe_hybrid import moe_hybrid

__all__ = ["all_op_names", "expert_forward", "moe_hybrid", "moe_reference"]
