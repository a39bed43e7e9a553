"""The MoE layers of a model as every rank sees them: specs, expert subsets, fingerprints."""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from dali_compile.experts_interface import UnsupportedExpertsError, experts_modules, spec_of_module
from dali_compile.runtime.layer_spec import LayerSpec

_SAMPLES_PER_TENSOR = 1 << 16  # bytes of each expert tensor the checksum reads (strided): cheap at any size


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module, LayerSpec]]:
    """(name, experts module, its LayerSpec) of every MoE layer, in model order; a clear error if none."""
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"dali distributed: {type(model).__name__} has no fused experts module "
                         "(transformers' @use_experts_implementation); the distributed mode serves those")
    try:
        return [(name, module, spec_of_module(module, name)) for name, module in modules]
    except UnsupportedExpertsError as error:
        raise ValueError(f"dali distributed: an experts module dali cannot run: {error}") from None


def structure_of(model: nn.Module, layers=None) -> dict:
    """What the shadow must share with the main model whatever its precision: layers, experts and sizes."""
    from dali_compile.experts_interface import top_k_of

    layers = layers or moe_layers(model)
    spec = layers[0][2]
    return dict(layers=len(layers), experts=spec.num_experts, hidden=spec.hidden_size,
                intermediate=spec.intermediate_size, top_k=top_k_of(model),
                vocab=getattr(getattr(model, "config", None), "vocab_size", None))


def subset_spec(spec: LayerSpec, experts: list[int]) -> LayerSpec:
    """The layer restricted to `experts` (local expert i is experts[i]), as new tensors: the model's own can
    then be freed."""
    index = torch.tensor(experts, dtype=torch.long)
    return spec.with_tensors(*(None if t is None else t.detach().index_select(0, index).contiguous()
                               for t in spec.tensors()))


def fingerprint(spec: LayerSpec, experts: list[int]) -> str:
    """A hash of the layout, the shapes and a strided sample of the bytes of `experts`' weights: two ranks
    that built different models (another checkpoint, seed or dtype) disagree on it."""
    digest = hashlib.sha256(repr(spec.layout).encode())
    for tensor in spec.tensors():
        if tensor is None:
            digest.update(b"none")
            continue
        digest.update(repr((tuple(tensor.shape[1:]), tensor.dtype)).encode())
        for expert in experts:
            data = tensor[expert].detach().contiguous().reshape(-1).view(torch.uint8)
            stride = max(1, data.numel() // _SAMPLES_PER_TENSOR)
            digest.update(data[::stride].numpy().tobytes())
    return digest.hexdigest()


def drop_weights(model: nn.Module) -> None:
    """Free every parameter and buffer of `model` (a worker keeps only its own expert copies)."""
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and param.device.type != "meta":  # meta: never read (loading.py)
                    param.data = torch.empty(0, dtype=param.dtype)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(0, dtype=buffer.dtype)
