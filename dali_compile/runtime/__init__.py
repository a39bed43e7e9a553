"""Run-time state behind the `dali::*` ops: layer descriptions and their handles."""

from .layer_spec import ACTIVATIONS, Activation, ExpertLayout, ExpertQuantization, LayerSpec
from .registry import LayerRegistry, UnknownLayerError, layer_registry

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ExpertLayout",
    "ExpertQuantization",
    "LayerRegistry",
    "LayerSpec",
    "UnknownLayerError",
    "layer_registry",
]
