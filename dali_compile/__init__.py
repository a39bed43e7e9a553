"""dali_compile: a torch.compile backend for MoE inference with experts split between CPU and GPU.

    model.forward = torch.compile(model.forward, backend="dali")
    print(dali_compile.last_report())

    model = dali_compile.offload(model, device="cuda", expert_memory="12GiB")   # experts beyond the GPU
    print(dali_compile.offload_stats(model)["total"])

    model = dali_compile.load("/path/to/checkpoint", device="cuda", expert_memory="auto")   # from disk
"""

from . import ops  # noqa: F401  (defines the dali::* ops)
from .config import DaliConfig, DaliOptionError
from .experts_interface import register_experts_interface
from .loading import LoadError, LoadSummary, load, load_summary
from .offload import calibrate, load_calibration, offload, offload_stats, refresh_costs, release, save_calibration
from .quantization import QuantizedLinear, quantize
from .report import CompileReport, clear_reports, last_report, reports
from .runtime import Activation, ExpertLayout, ExpertQuantization, LayerSpec, layer_registry
from .runtime.recorder import RoutingRecorder, record_routing

register_experts_interface()

__all__ = [
    "calibrate",
    "load_calibration",
    "save_calibration",
    "Activation",
    "CompileReport",
    "DaliConfig",
    "DaliOptionError",
    "ExpertLayout",
    "ExpertQuantization",
    "LayerSpec",
    "clear_reports",
    "last_report",
    "layer_registry",
    "load",
    "load_summary",
    "LoadError",
    "LoadSummary",
    "offload",
    "offload_stats",
    "quantize",
    "QuantizedLinear",
    "refresh_costs",
    "record_routing",
    "release",
    "RoutingRecorder",
    "reports",
]
