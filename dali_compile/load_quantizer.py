"""Quantize and place weights while transformers reads a checkpoint, through transformers' quantizer interface.

`dali_compile.load(path, quantize={"experts": "int4", "dense": "int8"})` (or `device="cuda"`) passes a
`DaliLoadConfig` to `from_pretrained`. transformers then hands each weight that `param_needs_quantization`
names to `QuantizeOnLoad.convert` as soon as it has read it, after its own checkpoint conversions
(per-expert tensors of a legacy checkpoint arrive merged into the fused [E, ...] tensor of the model's
experts module), and never stores the tensor itself:
- a weight to quantize is quantized with the functions `dali_compile.quantize` uses (quantization.py), so
  quantizing on load gives the very codes and scales that quantizing after loading gives, and the host
  never holds more than one full-precision tensor beyond the quantized model (plus what transformers has
  read of the current shard);
- with a `place_on` device (CUDA), every parameter outside the experts modules goes straight there, so the
  host never holds the non-expert weights (accelerate's `device_map` would treat the host-resident experts
  as CPU-offloaded modules and hook them; this keeps them plain host tensors for `offload`);
- with a `keep` set of parameter names, every other parameter is dropped as it is read and stays on the meta
  device (a distributed worker reads only its own layers' experts);
- with a `progress` (load_progress.ShardProgress), every parameter goes through the hook (to the CPU where
  nothing else is asked), so each shard's bar sees its tensors arrive.
transformers does not compare the shapes of the weights it hands over, so `convert` does.

Dense linears keep their `nn.Linear` (its weight still on the meta device) while loading, so their bias
loads as usual; the codes wait on the module, which becomes a `QuantizedLinear` after the last shard. Expert
modules get their codes and scales as parameters at once, and their layout is marked quantized after
loading, once both projections arrived (a checkpoint without one is an error).
"""

from __future__ import annotations

import torch
from torch import nn

# This module is imported only by a load that needs the hook (loading.py), so transformers' quantizer machinery
# is imported then, not with dali_compile.
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .experts_interface import IMPLEMENTATION_NAME, experts_modules, up_weight_name
from .memory_budget import return_freed_memory
from .ops.quantized_linear import quantize_weight
from .quantization import FORMATS, _dense_linears, _install, _mark_quantized, _quantize_projection

METHOD = "dali"
_PENDING = "_dali_pending_quantized_weight"


def load_config(experts: str | None, dense: str | None, group_size: int, place_on: torch.device | None = None,
                keep: frozenset | None = None, progress=None, problems: Problems | None = None):
    """The `quantization_config=` for `from_pretrained` (formats already checked by the caller); `problems`
    collects what the hook refuses."""
    return AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD](experts=experts, dense=dense, group_size=group_size,
                                                    place_on=None if place_on is None else str(place_on), keep=keep,
                                                    progress=progress, problems=problems)


class Problems(list):
    """What the hook refused, shared with the caller: transformers deep-copies its quantization config, and some
    releases only log a conversion's own error, so the caller reads them here."""

    def __deepcopy__(self, memo):
        return self


class DaliLoadConfig(QuantizationConfigMixin):
    """dali's int8/int4 formats for `experts` and `dense` linears (csrc/README.md), and where the non-expert
    parameters go (`place_on`: None keeps them where transformers puts them)."""

    def __init__(self, experts: str | None = None, dense: str | None = None, group_size: int = 32,
                 place_on: str | None = None, keep: frozenset | None = None, progress=None,
                 problems: Problems | None = None, **_):
        self.quant_method = METHOD
        self.experts, self.dense, self.group_size, self.place_on = experts, dense, group_size, place_on
        self.keep, self.progress = keep, progress
        self.problems = Problems() if problems is None else problems

    def to_dict(self):  # these are not JSON; they never go into a saved config
        return {k: v for k, v in super().to_dict().items() if k not in ("keep", "progress", "problems")}


class QuantizeOnLoad(ConversionOps):
    """Quantizes one weight as transformers reads it; returns nothing for transformers to store."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, model=None, missing_keys=None, full_layer_name=None, **_):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        self.quantizer.quantize_tensor(model, full_layer_name, value)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class DaliQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.targets: dict[str, tuple[str, int]] = {}  # parameter name -> ("experts" | "dense" | "place", bits)
        self.arrived: set[str] = set()
        self.errors = quantization_config.problems  # what convert refused (shared with the caller)
        self.shapes: dict[str, tuple] = {}  # every parameter's shape as config.json gives it
        self.expert_dtypes: dict[str, torch.dtype] = {}  # experts module name -> its activations' dtype

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        if config.place_on is not None or config.progress is not None:
            expert_parameters = {f"{name}.{p}" for name, m in experts_modules(model)
                                 for p, _ in m.named_parameters(recurse=False)}
            for name, _ in model.named_parameters():  # experts stay on the host; the rest go to place_on
                device = "cpu" if name in expert_parameters or config.place_on is None else config.place_on
                self.targets[name] = ("place", device)
        if config.dense is not None:
            bits = FORMATS[config.dense]
            self.targets.update({f"{name}.weight": ("dense", bits) for name, _ in _dense_linears(model)})
        if config.experts is not None:
            bits = FORMATS[config.experts]
            for name, module in experts_modules(model):
                self.expert_dtypes[name] = module.down_proj.dtype
                for projection in (up_weight_name(module), "down_proj"):
                    self.targets[f"{name}.{projection}"] = ("experts", bits)
        if config.keep is not None:  # last: a dropped parameter is neither quantized nor placed
            self.targets.update({name: ("drop", 0) for name, _ in model.named_parameters()
                                 if name not in config.keep})

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.targets

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def quantize_tensor(self, model: nn.Module, name: str, value: torch.Tensor) -> None:
        kind, bits = self.targets[name]  # bits: the format's; a device for "place"
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        expected = getattr(module, attribute)
        if tuple(value.shape) != tuple(expected.shape):  # refused after loading, with every other one
            self.errors.append(_mismatch(name, value.shape, expected.shape))
            return
        if self.quantization_config.progress is not None:
            self.quantization_config.progress.advance(name, value.numel())
        if kind == "drop":  # stays on the meta device, never materialised beyond this tensor
            self.arrived.add(name)
            return
        if kind == "place":
            placed = value.to(device=bits, dtype=expected.dtype)
            module._parameters[attribute] = nn.Parameter(placed, requires_grad=expected.requires_grad)
            module._parameters[attribute]._is_hf_initialized = True
            self.arrived.add(name)
            return
        # the model's dtype, as quantize-after-load sees it (transformers skips its cast for these)
        value = value.to(device="cpu", dtype=expected.dtype)
        if kind == "experts":
            _quantize_projection(module, attribute, value, bits, self.quantization_config.group_size)
            for new in (attribute, f"{attribute}_scales"):  # loaded: transformers must not initialise them
                getattr(module, new)._is_hf_initialized = True
        else:  # the codes wait on the linear, which becomes a QuantizedLinear after loading (its bias too)
            group = value.shape[1] if bits == 8 else self.quantization_config.group_size
            setattr(module, _PENDING, (group, *quantize_weight(value, bits, group)))
        self.arrived.add(name)
        del value
        return_freed_memory()

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.quantization_config.progress is not None:
            self.quantization_config.progress.close()
        # With a quantizer present some transformers releases (5.17) store a tensor of any shape in the
        # parameters it sets itself: compare them all here, as it does without one.
        for name, param in model.named_parameters():
            if name not in self.targets and name in self.shapes and tuple(param.shape) != self.shapes[name]:
                self.errors.append(_mismatch(name, param.shape, self.shapes[name]))
        if self.errors:
            raise ValueError(f"tensors whose shape differs from config.json's (mismatched): {'; '.join(self.errors)}")
        config = self.quantization_config
        self._quantize_loaded_elsewhere(model)
        for name, linear in _dense_linears(model):
            pending = linear.__dict__.pop(_PENDING, None)
            if pending is not None:
                _install(model, name, linear, FORMATS[config.dense], *pending)
        if config.experts is not None:
            for name, module in experts_modules(model):
                if module.down_proj.device.type != "meta":  # not dropped
                    _mark_quantized(module, FORMATS[config.experts], self.expert_dtypes[name])
            model.set_experts_implementation(IMPLEMENTATION_NAME)
        return model

    def _quantize_loaded_elsewhere(self, model: nn.Module) -> None:
        """Targets transformers did not pass to `convert`: a tied weight (an lm_head sharing the embeddings)
        is quantized from what it is tied to, and left as it is when only placed or dropped (it is where its
        twin went, and stays the same Parameter); one still on the meta device was not in the checkpoint."""
        absent = []
        for name in sorted(set(self.targets) - self.arrived):
            module_name, _, attribute = name.rpartition(".")
            weight = getattr(model.get_submodule(module_name), attribute)
            if weight.device.type == "meta":
                absent.append(name)
            elif self.targets[name][0] in ("experts", "dense"):
                self.quantize_tensor(model, name, weight.detach())
        if absent:
            raise ValueError(f"the checkpoint has no tensor for {', '.join(absent[:4])}"
                             f"{' ...' if len(absent) > 4 else ''}")

    def is_serializable(self, *args, **kwargs):
        return False

    @property
    def is_trainable(self):
        return False


def _mismatch(name: str, in_checkpoint, in_model) -> str:
    return f"{name}: {tuple(in_checkpoint)} in the checkpoint, {tuple(in_model)} in the model"


# Registered once per process (a reloaded module finds its method taken and keeps the first classes).
if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(METHOD)(DaliLoadConfig)
if METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(METHOD)(DaliQuantizer)


def forget_quantizer(model: nn.Module) -> None:
    """After loading: the model is a plain model whose layers dali quantized (as after `dali_compile.quantize`),
    not one transformers would treat as carrying a serialisable quantization method."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
