"""`dali_compile.offload`: run a MoE model whose experts do not fit the GPU.

    model = dali_compile.offload(model, device="cuda", expert_memory="12GiB", policy="dali")
    model.generate(...)                                    # eager
    torch.compile(model, backend="dali")(...)              # or compiled
    dali_compile.offload_stats(model)                      # hits, copies, CPU/GPU split, times

Non-expert weights move to the device; expert weights stay in host memory (pinned on CUDA, in place
of the originals: never two full copies); a pool of expert slots within `expert_memory` (a hard
limit) holds each layer's cache and the staging slots; every experts module is switched to the "dali"
experts implementation, so each MoE layer's step is one `dali::moe_hybrid` call that the hybrid
runtime serves (`runtime/hybrid.py`). `device="emulated"` runs the same runtime on a CPU-only machine
against a test double of the GPU (its timings mean nothing, its counters do).
"""

from __future__ import annotations

import gc
import traceback

import torch
import torch.nn as nn

from .experts_interface import (
    IMPLEMENTATION_NAME,
    UnsupportedExpertsError,
    experts_implementations,
    experts_modules,
    register_experts_interface,
    restore_experts_implementations,
    spec_of_module,
    top_k_of,
)
from .runtime.accelerator import make_accelerator, parse_bytes
from .runtime.expert_cache import fitting_prefetch_count, plan_slots
from .runtime.hybrid import HybridRuntime
from .runtime.planner import CostModel
from .runtime.policies import make_policy
from .runtime.prefetch import ResidualPredictor, default_prefetch_count, find_router, measure_residuals
from .runtime.registry import layer_registry

_RUNTIME_ATTRIBUTE = "_dali_runtime"


def offload(model: nn.Module, device: str | torch.device = "cuda", expert_memory: int | str = "12GiB",
            policy: str = "dali", cost_model: CostModel | None = None, refresh_costs: bool = False,
            prefetch: int | None = None, transient_memory: int | str = "256MiB", **policy_options) -> nn.Module:
    """Prepare `model` (a transformers MoE model, on the CPU) for hybrid CPU/GPU expert execution.

    device: 'cuda', 'cuda:N', or 'emulated' (CPU-only test double). expert_memory: the budget for
    expert slots on the device, bytes or a string like '12GiB' (a hard limit; below one expert is an
    error except for policy='all_cpu'). policy: 'dali' (default), 'all_cpu', 'layerwise', 'on_demand',
    'lru', 'cache_cpu_miss', 'threshold'; policy_options go to the policy. cost_model: skip profiling
    (else measured on first use and stored; `refresh_costs=True` measures again). prefetch: P, the experts
    of the next MoE layer copied early from a residual-corrected prediction (default for 'dali': 1 for 8
    experts, 4 for 64 or more; 0 for the other policies); its 2P slots come out of the budget, and P shrinks
    to leave the policy at least one slot. Calibrate the prediction with `dali_compile.calibrate(model)`.
    transient_memory: the bound on one layer step's transient buffers (outside the expert budget): steps
    with more tokens run in chunks that fit it (see runtime/hybrid.py). Returns the model.
    """
    if getattr(model, _RUNTIME_ATTRIBUTE, None) is not None:
        raise RuntimeError("offload: this model is already offloaded (call dali_compile.release(model) first)")
    budget = parse_bytes(expert_memory)
    transient_bytes = parse_bytes(transient_memory)
    if transient_bytes <= 0:
        raise ValueError(f"offload: transient_memory must be above 0, got {transient_memory!r}")
    chosen = make_policy(policy, **policy_options)
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"offload: {type(model).__name__} has no fused experts module (transformers' "
                         "@use_experts_implementation); dali offloads those")
    if not hasattr(model, "set_experts_implementation") or not register_experts_interface():
        raise RuntimeError("offload needs a transformers version with the experts interface (>= 5.17)")
    try:
        specs = [(name, spec_of_module(m, name)) for name, m in modules]
    except UnsupportedExpertsError as error:
        raise ValueError(f"offload: an experts module dali cannot run: {error}") from None
    for name, spec in specs:
        if spec.device.type != "cpu":
            raise ValueError(f"offload: load the model on the CPU first ({name} experts are on {spec.device})")

    if prefetch is None:
        prefetch = default_prefetch_count(specs[0][1].num_experts) if policy == "dali" else 0
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"offload: prefetch must be an int >= 0, got {prefetch!r}")
    prefetch = fitting_prefetch_count(chosen, specs, budget, prefetch)
    predictor = None
    if prefetch:
        hidden_size = specs[0][1].hidden_size
        routers = [find_router(model.get_submodule(name.rpartition(".")[0]), spec.num_experts, hidden_size)
                   for name, spec in specs]
        predictor = ResidualPredictor(routers, specs[0][1].num_experts, hidden_size)
    # refuse before anything about the model changes
    plan_slots(chosen, specs, budget, top_k_of(model, default=2), 2 * prefetch)
    accelerator = make_accelerator(device, budget)
    undo = _Undo(model, accelerator)
    try:
        runtime = _convert(model, modules, specs, accelerator, chosen, cost_model, refresh_costs, predictor,
                           prefetch, transient_bytes, undo)
    except BaseException as error:  # Ctrl-C included: never leave a half-converted model
        undo.roll_back(error)
        raise
    setattr(model, _RUNTIME_ATTRIBUTE, runtime)
    return model


def _convert(model, modules, specs, accelerator, policy, cost_model, refresh, predictor, prefetch,
             transient_bytes: int, undo: _Undo) -> HybridRuntime:
    """The steps of `offload` that change the model, each recorded in `undo` before it starts."""
    expert_tensors = {id(t) for _, spec in specs for t in spec.tensors() if t is not None}
    _move_non_experts(model, accelerator.device, expert_tensors, undo)
    _pin_experts(modules, accelerator)
    specs = [(name, spec_of_module(m, name)) for name, m in modules]  # a pinned copy replaced a refused one
    undo.specs = [spec for _, spec in specs]
    undo.existing_handles = {layer_registry().lookup(spec) for spec in undo.specs} - {None}
    undo.save_experts_implementation()
    model.set_experts_implementation(IMPLEMENTATION_NAME)
    runtime = HybridRuntime(accelerator, specs, policy, cost_model, top_k_of(model, default=2), predictor=predictor,
                            prefetch=prefetch, transient_bytes=transient_bytes)
    undo.runtime = runtime
    if cost_model is None and policy.needs_cost:
        runtime.profile_costs(refresh=refresh)
    return runtime


class _Undo:
    """What `offload` changed so far, and how to put it back: a failure at any step (pinning, the pool,
    profiling, the runtime itself, Ctrl-C) leaves the model as it was, runnable eagerly and offloadable
    again, with no runtime, handle, registration or pool memory left behind.

    Expert tensors that CUDA refused to pin in place were replaced by pinned copies (same values, on the
    CPU); they stay so: keeping the originals for a rollback would hold two full copies of the experts."""

    def __init__(self, model: nn.Module, accelerator):
        self.model = model
        self.accelerator = accelerator
        self.parameters: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its original data)
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.implementations: list[tuple[nn.Module, object]] | None = None
        self.specs: list = []
        self.existing_handles: set[int] = set()
        self.runtime: HybridRuntime | None = None

    def save_experts_implementation(self) -> None:
        self.implementations = experts_implementations(self.model)

    def roll_back(self, error: BaseException) -> None:
        failures = []
        for step in (self.accelerator.synchronize, self._release_handles, self.accelerator.close,
                     self._restore_implementation, self._restore_tensors):
            try:
                step()
            except Exception as failure:  # keep undoing; the original error is the one to raise
                failures.append(f"{step.__name__}: {failure!r}")
        if failures:
            error.add_note("dali: offload's rollback also failed in " + "; ".join(failures))
        # The traceback's frames hold the half-built runtime (its pool): let it go now, not when the
        # caller drops the exception (a REPL keeps the last one).
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__.tb_next)
        self.runtime = None
        gc.collect()  # the runtime's layers and the runtime refer to each other

    def _release_handles(self) -> None:
        """Handles the runtime registered (new ones) or attached to (existing ones, which a graph compiled
        before the offload may name: kept). Not `runtime.close()`, which would release those too; the
        runtime's pool goes with the runtime, which nothing refers to once these are gone."""
        registry = layer_registry()
        for spec in self.specs:
            handle = registry.lookup(spec)
            if handle is None:
                continue
            if handle in self.existing_handles:
                registry.detach(handle)
            else:
                registry.release(handle)

    def _restore_implementation(self) -> None:
        restore_experts_implementations(self.implementations or [])

    def _restore_tensors(self) -> None:
        with torch.no_grad():
            for param, data in self.parameters:
                param.data = data
            for module, name, buffer in self.buffers:
                module._buffers[name] = buffer


def runtime_of(model: nn.Module) -> HybridRuntime:
    runtime = getattr(model, _RUNTIME_ATTRIBUTE, None)
    if runtime is None:
        raise ValueError("this model was not offloaded with dali_compile.offload")
    return runtime


def offload_stats(model: nn.Module) -> dict:
    """Per-layer and total counters of an offloaded model: hits, misses, copies, bytes copied, experts and
    (token, expert) pairs on the CPU and GPU, seconds planning, computing, copying and waiting."""
    return runtime_of(model).stats()


def refresh_costs(model: nn.Module) -> CostModel:
    """Profile the offloaded model's cost model again (after a hardware or thread-count change) and store it."""
    return runtime_of(model).profile_costs(refresh=True)


# A built-in calibration sample: plain English prose, for models whose tokenizer the user passes.
SAMPLE_TEXT = (
    "The river rose slowly through the night, and by morning the low fields near the village were under "
    "water. Farmers moved their animals to the hills, while the children watched from the old stone bridge. "
    "In the afternoon the rain stopped, the clouds broke apart, and the sun lit the flooded land like glass. "
    "Everyone agreed that the harvest would be late this year, but nobody had been hurt, and that mattered most."
)


def calibrate(model: nn.Module, inputs=None, tokenizer=None) -> list[torch.Tensor]:
    """Measure the residual vectors of the prefetch predictor on `inputs` and store them with the runtime.

    inputs: a string or list of strings (needs `tokenizer`), token ids (LongTensor [T] or [B, T]), or None
    for the built-in sample text (with `tokenizer`; without one, the sample's bytes taken as token ids
    modulo the vocabulary, for tokenizer-less test models). Returns res_vec(l) for every MoE layer but the
    last ([H] fp32 each); `save_calibration` / `load_calibration` keep them in a file.
    """
    runtime = runtime_of(model)
    if runtime.predictor is None:
        raise ValueError("calibrate: this model was offloaded without prefetching (prefetch=0)")
    input_ids = _calibration_ids(model, SAMPLE_TEXT if inputs is None else inputs, tokenizer)
    runtime.prefetching = False  # the predictor must not call routers while their inputs are captured
    try:
        residuals = measure_residuals(model, runtime.predictor.routers, input_ids)
    finally:
        runtime.prefetching = runtime.prefetch > 0
    runtime.predictor.set_residuals([r.to(runtime.accelerator.device) for r in residuals])
    return residuals


def _calibration_ids(model: nn.Module, inputs, tokenizer) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        ids = inputs
    elif isinstance(inputs, (str, list)):
        texts = [inputs] if isinstance(inputs, str) else inputs
        if tokenizer is not None:
            ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"]], dtype=torch.long)
        elif inputs is SAMPLE_TEXT:
            vocab = model.config.vocab_size
            ids = torch.tensor(list(SAMPLE_TEXT.encode()), dtype=torch.long) % vocab
        else:
            raise ValueError("calibrate: text needs a tokenizer (pass tokenizer=...), or pass token ids")
    else:
        raise TypeError(f"calibrate: inputs must be text, token ids or None, got {type(inputs).__name__}")
    if ids.numel() < 1:
        raise ValueError("calibrate: the calibration input is shorter than one token")
    return ids.reshape(1, -1) if ids.dim() == 1 else ids


def save_calibration(model: nn.Module, path) -> None:
    """Write the predictor's residual vectors to `path` (torch.save of a list of [H] fp32 tensors)."""
    runtime = runtime_of(model)
    if runtime.predictor is None or any(r is None for r in runtime.predictor.residuals):
        raise ValueError("save_calibration: the model has not been calibrated (dali_compile.calibrate)")
    torch.save([r.cpu() for r in runtime.predictor.residuals], path)


def load_calibration(model: nn.Module, path) -> None:
    """Read residual vectors written by `save_calibration`; an error if they belong to another model."""
    runtime = runtime_of(model)
    if runtime.predictor is None:
        raise ValueError("load_calibration: this model was offloaded without prefetching (prefetch=0)")
    residuals = torch.load(path, weights_only=True)
    if not isinstance(residuals, list) or not all(isinstance(r, torch.Tensor) for r in residuals):
        raise ValueError(f"load_calibration: {path} is not a dali calibration file")
    runtime.predictor.set_residuals([r.float().to(runtime.accelerator.device) for r in residuals])


def release(model: nn.Module) -> None:
    """Detach the model's layers from the runtime and free its expert memory (the model stays offloaded in
    layout: call offload again to run it)."""
    runtime_of(model).close()
    setattr(model, _RUNTIME_ATTRIBUTE, None)


def _move_non_experts(model: nn.Module, device: torch.device, expert_tensors: set[int], undo: _Undo,
                      move=None) -> None:
    """Non-expert parameters and buffers to `device`, the originals kept in `undo` until offload succeeds.
    `move(tensor)`: how a tensor gets there (default `.to(device)`, nothing for the CPU; tests pass a copy)."""
    if move is None:
        if device.type == "cpu":
            return
        move = lambda tensor: tensor.to(device)  # noqa: E731
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in expert_tensors:
                undo.parameters.append((param, param.data))
                param.data = move(param.data)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                undo.buffers.append((module, name, buffer))
                module._buffers[name] = move(buffer)


def _pin_experts(modules, accelerator) -> None:
    if accelerator.device.type == "cpu":  # the emulated device copies from plain host memory
        return
    for _, module in modules:
        for param in module.parameters(recurse=False):
            # In place where CUDA allows it (runtime/host_memory.py); a fallback copy replaces the original
            # one tensor at a time: never two full copies of the experts.
            param.data = accelerator.prepare_host_weight(param.data)
