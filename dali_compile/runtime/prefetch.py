"""Residual-based prefetching (DALI, arXiv 2602.03495): predict the next MoE layer's experts early.

# L MoE layers, T tokens, H hidden, E experts

While layer l runs, its gate input x_l is known. Layer l+1's gate input is x_{l+1} = x_l + (attention
and MLP residual updates in between); their mean over calibration tokens, res_vec(l), corrects x_l
towards it. The predictor applies layer l+1's own router module to x_l + res_vec(l), so every router
form (softmax or sigmoid, bias, group-limited top-k) is applied exactly as the model applies it, and
counts predicted tokens per expert. Without calibration res_vec = 0: the plain next-gate predictor.

A wrong prediction only costs time: a prefetched expert is an exact copy of its weights in a slot
counted against the expert budget, used only if layer l+1 really routes to it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .fused_router import DTYPE_CODES, FusedPrefetch, RouterForm, recognise
from .planner import greedy_plan


def default_prefetch_count(num_experts: int) -> int:
    """P by expert count, as the paper: 1 for 8 experts, 4 for 64 or more (2 in between)."""
    if num_experts <= 8:
        return 1
    return 4 if num_experts >= 64 else 2


def prefetch_choice(counts: np.ndarray, mass: np.ndarray, cached: np.ndarray, cost, count: int) -> np.ndarray:
    """The experts to copy ahead from a prediction (tokens per expert [E], routing weight per expert [E]) for a
    layer whose cache holds `cached` (bool [E]): among the predicted experts not cached, those the planner would
    put on the GPU (all of them without a cost model), most predicted tokens first, then most routing weight
    (ties are the rule at one token per step), at most `count`. int64 ids."""
    experts = np.flatnonzero(counts).astype(np.int64, copy=False)
    resident = cached[experts]
    if cost is not None and experts.size:
        wanted = greedy_plan(experts, counts[experts], resident, cost, count).on_gpu & ~resident
    else:
        wanted = ~resident
    candidates = experts[wanted]
    return candidates[np.lexsort((-mass[candidates], -counts[candidates]))][:count]


_UNRECOGNISED = object()  # ResidualPredictor._forms: a router not probed yet


def find_router(block: nn.Module, num_experts: int, hidden_size: int) -> nn.Module:
    """The MoE block's router: the child module with a [E, H] weight (named gate or router in transformers)."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden_size):
            return child
    raise ValueError(f"no router with a [{num_experts}, {hidden_size}] weight in {type(block).__name__}")


def routed(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-k expert ids [T, K] the router gives x [T, H] (the int tensor among its outputs) and their
    routing weights [T, K] (the float output of the same shape; None if the router returns none)."""
    return routing_of(router(x))


def routing_of(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-k expert ids [T, K] and routing weights [T, K] (or None) in a router's output."""
    outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
    ids = next((t for t in outputs if not t.is_floating_point() and t.dim() == 2), None)
    if ids is None:
        raise ValueError("the router returns no [T, K] integer expert ids")
    weights = next((t for t in outputs if t.is_floating_point() and t.shape == ids.shape), None)
    return ids, weights


def routed_ids(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The top-k expert ids [T, K] the router gives x [T, H]."""
    return routed(router, x)[0]


class ResidualPredictor:
    """Predicts layer l+1's per-expert workload from layer l's gate input."""

    def __init__(self, routers: list[nn.Module], num_experts: int, hidden_size: int):
        self.routers = routers
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.residuals: list[torch.Tensor | None] = [None] * max(len(routers) - 1, 0)
        # Per layer: the residual in the gate input's device and dtype (converted once, not every step),
        # and where the router's ids and weights sit in its output tuple (found once, by `routing_of`).
        self._converted: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._positions: dict[int, tuple[int, int | None, int]] = {}  # ids, weights, the larger
        # Routers the C path computes (fused_router), recognised on first use; None: the module runs.
        self._forms: dict[int, RouterForm | None] = {}
        self._fused: FusedPrefetch | None = None

    def set_residuals(self, residuals: list[torch.Tensor]) -> None:
        if len(residuals) != len(self.residuals):
            raise ValueError(f"calibration has {len(residuals)} residual vectors, the model needs "
                             f"{len(self.residuals)} (one per MoE layer but the last): calibrated on another model?")
        for layer, res in enumerate(residuals):
            if tuple(res.shape) != (self.hidden_size,):
                raise ValueError(f"residual vector {layer} has shape {tuple(res.shape)}, the model's hidden size is "
                                 f"{self.hidden_size}: calibrated on another model?")
        self.residuals = list(residuals)
        self._converted.clear()

    def predict(self, layer: int, gate_input: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Predicted tokens per expert [E] of layer `layer` + 1 from layer `layer`'s gate input [T, H], and the
        summed routing weight per expert [E] (to rank experts with equal counts: at one token per step every
        predicted expert has one token)."""
        if self.fused_choice(layer, gate_input, None, None, 0) is not None:
            return self._fused.counts.copy(), self._fused.mass.copy()
        return self.counts_of(*self.predicted_routing(layer, gate_input))

    def fused_choice(self, layer: int, gate_input: torch.Tensor, slot_of_expert: np.ndarray | None, cost,
                     count: int) -> np.ndarray | None:
        """prefetch_choice(*predict(layer, gate_input), slot_of_expert >= 0, cost, count) in one C call
        (fused_router), the same prediction `predict` gives; None where the router or the input is not one the
        C path takes (then use predict and prefetch_choice)."""
        router = self.routers[layer + 1]
        x = gate_input if gate_input.dim() == 2 else gate_input.reshape(-1, self.hidden_size)
        if x.device.type != "cpu" or x.dtype not in DTYPE_CODES or x.stride(-1) != 1 or not _hookless(router):
            return None
        form = self._forms.get(layer + 1, _UNRECOGNISED)
        if form is _UNRECOGNISED or form is not None and form.weight is not router.weight:  # new, or replaced
            form = self._forms[layer + 1] = recognise(router, self.num_experts, self.hidden_size)
        if form is None:
            return None
        if self._fused is None:
            self._fused = FusedPrefetch(self.num_experts)
        residual = self._residual(layer, torch.device("cpu"), torch.float32)
        taken = self._fused.run(form, x, residual, slot_of_expert, cost, count)
        return None if taken < 0 else self._fused.chosen[:taken].copy()

    def predicted_routing(self, layer: int, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer `layer` + 1's router applied to layer `layer`'s gate input [T, H] plus the residual vector:
        its top-k expert ids [T, K] and routing weights [T, K] (None if the router gives none)."""
        if torch.is_grad_enabled():  # entering no_grad costs ~7 us: only where it is needed (not in generate)
            with torch.no_grad():
                return self.predicted_routing(layer, gate_input)
        x = gate_input if gate_input.dim() == 2 else gate_input.reshape(-1, self.hidden_size)
        residual = self._residual(layer, x.device, x.dtype)
        return self._routed(layer + 1, x if residual is None else x + residual)

    def _residual(self, layer: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """res_vec(layer) on `device` in `dtype`, contiguous (converted once), or None without calibration."""
        res = self.residuals[layer]
        if res is None:
            return None
        key = (layer, device, dtype)
        converted = self._converted.get(key)
        if converted is None:
            converted = self._converted[key] = res.to(device=device, dtype=dtype).contiguous()
        return converted

    def counts_of(self, ids: torch.Tensor, weights: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per expert [E] and summed routing weight per expert [E] (float64) of a routing."""
        flat_ids = _host_numpy(ids).reshape(-1)
        counts = np.bincount(flat_ids, minlength=self.num_experts)
        if weights is None:
            return counts, np.zeros(self.num_experts)
        weights = weights if weights.dtype == torch.float32 else weights.float()
        return counts, np.bincount(flat_ids, weights=_host_numpy(weights).reshape(-1), minlength=self.num_experts)

    def _routed(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`routed(routers[layer], x)`, reading the router's output at the positions found on the first call."""
        router = self.routers[layer]
        # Straight to forward when no hook would run: Module.__call__'s hook checks cost ~4 us a call
        out = router.forward(x) if _hookless(router) else router(x)
        positions = self._positions.get(layer)
        if positions is not None and isinstance(out, tuple) and len(out) > positions[2]:
            ids, weights = out[positions[0]], None if positions[1] is None else out[positions[1]]
            if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2:
                return ids, weights
        ids, weights = routing_of(out)
        if isinstance(out, tuple):
            at_ids, at_weights = _position(out, ids), None if weights is None else _position(out, weights)
            self._positions[layer] = (at_ids, at_weights, max(at_ids, at_weights or 0))
        return ids, weights


def _host_numpy(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array (no copy for a CPU tensor: `.cpu()` alone is a dispatch)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _hookless(module: nn.Module) -> bool:
    """True when calling `module` would run its forward and nothing else (no hook of its own or global)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks or nn.modules.module._global_backward_hooks
                or nn.modules.module._global_backward_pre_hooks)


def _position(items: tuple, tensor: torch.Tensor) -> int:
    return next(i for i, item in enumerate(items) if item is tensor)


@torch.no_grad()
def measure_residuals(model: nn.Module, routers: list[nn.Module], input_ids: torch.Tensor) -> list[torch.Tensor]:
    """res_vec(l) = mean over the calibration tokens of (gate input of layer l+1 - gate input of layer l),
    captured at the routers' inputs while the model runs `input_ids`; fp32, on the CPU."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() < 1 or input_ids.is_floating_point():
        raise ValueError(f"calibration needs at least one token id, got a tensor of shape {tuple(input_ids.shape)}")
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args):
            captured[index] = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
        return hook

    handles = [router.register_forward_pre_hook(capture(i)) for i, router in enumerate(routers)]
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(routers):
        raise RuntimeError(f"calibration saw {len(captured)} of {len(routers)} routers run")
    return [(captured[l + 1] - captured[l]).mean(dim=0) for l in range(len(routers) - 1)]
