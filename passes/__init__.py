"""FX graph passes of the dali backend, run in the order of `pipeline.PASSES`."""

from .context import PassContext, WeightBinding
from .find_moe_regions import MoeRegion, RefusedRegion, find_moe_regions
from .pipeline import PASSES, run_passes
from .replace_moe_dispatch import replace_moe_dispatch

__all__ = [
    "PASSES",
    "MoeRegion",
    "PassContext",
    "RefusedRegion",
    "WeightBinding",
    "find_moe_regions",
    "replace_moe_dispatch",
    "run_passes",
]
