"""Record the routing of a model run through the hybrid runtime, in the shared traces' npz format.

# T tokens, S steps (forward calls), L MoE layers, K top-k, H hidden, E experts

    model = dali_compile.offload(model, device="cuda", expert_memory="12GiB")
    with record_routing(model) as recording:
        model.generate(input_ids, max_new_tokens=64)
    recording.save("routing.npz")            # numpy.load("routing.npz")["stream_expert_ids"]: [T, L, K]

The runtime calls the recorder at every MoE layer step with what `dali::moe_hybrid` receives: the gate
input (the experts' input, which is also the router's) and the routing the model's router chose. The
tokens of one forward call are rows in order (a [B, S] batch flattened row-major, as the MoE layers see
it); later calls append, so a generate() gives the prompt's rows, then one row per sequence per new token.
Eager and compiled models alike: the compiled graph calls the same runtime.

The file (numpy.savez, no pickled objects) holds:
- `stream_expert_ids` [T, L, K]: expert ids, int8 when E <= 127 (as the shared traces), else int16;
- `stream_scores` float32 [T, L, K]: the weights the model combines the experts with (for a softmax
  router renormalising over the top-k, as Qwen3-MoE or Mixtral, the renormalised scores);
- `stream_gate_inputs` [T, L, H] float16 by default (`gate_dtype`), unless recording without them;
- `stream_token_ids` int32 [T]: the input token ids, -1 where the model was given embeddings instead;
- `step_tokens` int32 [S]: the rows of each forward call (prefill, then decode steps);
- `num_experts`, `top_k`, `hidden_size` (int64 scalars), `moe_layer_numbers` int32 [L] (the decoder layer
  number in each MoE layer's module name, -1 if none) and `moe_layer_names` (unicode [L]).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, np.float16: np.float16, np.float32: np.float32,
           "float16": np.float16, "float32": np.float32}


def expert_id_dtype(num_experts: int) -> type:
    """int8 while every id fits (E <= 127, as the shared traces), else int16 (E <= 32767), else int32."""
    if num_experts <= 127:
        return np.int8
    return np.int16 if num_experts <= 32767 else np.int32


def layer_number(name: str) -> int:
    """The decoder layer number in a module name ('model.layers.3.mlp.experts' -> 3), -1 if there is none."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return int(numbers[-1]) if numbers else -1


class RoutingRecorder:
    """Collects every MoE layer step of one offloaded model; attach with `record_routing(model)`.

    The runtime calls it as recorder(layer, gate_input [T, H], topk_ids [T, K], topk_weights [T, K]), layers
    0 .. L-1 in order within each forward call. A call whose layers disagree on T or K, or that skips a layer,
    is an error (the rows of layers would no longer be the same tokens).
    """

    def __init__(self, layer_names: list[str], num_experts: int, hidden_size: int, gate_inputs: bool = True,
                 gate_dtype=torch.float16):
        if not layer_names:
            raise ValueError("RoutingRecorder: the model has no MoE layer to record")
        if gate_dtype not in _DTYPES:
            raise ValueError(f"RoutingRecorder: gate_dtype must be float16 or float32, got {gate_dtype!r}")
        self.layer_names = list(layer_names)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.gate_inputs = gate_inputs
        self.gate_dtype = _DTYPES[gate_dtype]
        self.top_k: int | None = None
        self._steps: list[dict[str, np.ndarray]] = []  # complete forward calls, each with [T, L, ...] arrays
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []  # layers of the current call
        self._tokens: np.ndarray | None = None  # the current call's input ids, from the embedding hook
        self._runtime = None
        self._hook = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_tokens(self) -> int:
        """T: the rows recorded so far (complete forward calls only)."""
        return sum(int(step["ids"].shape[0]) for step in self._steps)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    # -- called by the runtime ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, layer: int, gate_input: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        if layer != len(self._pending):
            raise RuntimeError(f"RoutingRecorder: MoE layer {layer} ran while layer {len(self._pending)} of the "
                               f"current forward call was expected (layers 0 .. {self.num_layers - 1} in order); an "
                               "earlier call stopped half way? clear() the recorder")
        tokens, k = topk_ids.shape
        if self.top_k is None:
            self.top_k = int(k)
        if k != self.top_k or tuple(topk_weights.shape) != (tokens, k) or gate_input.shape[0] != tokens:
            raise ValueError(f"RoutingRecorder: layer {layer} got ids {tuple(topk_ids.shape)}, weights "
                             f"{tuple(topk_weights.shape)} and gate input {tuple(gate_input.shape)}; expected "
                             f"[T, {self.top_k}] and [T, {self.hidden_size}]")
        if self._pending and tokens != self._pending[0][0].shape[0]:
            raise ValueError(f"RoutingRecorder: layer {layer} got {tokens} tokens, layer 0 of the same call "
                             f"{self._pending[0][0].shape[0]}")
        ids = topk_ids.detach().to("cpu").numpy().astype(expert_id_dtype(self.num_experts))
        weights = topk_weights.detach().to("cpu", torch.float32).numpy()
        gate = None
        if self.gate_inputs:
            gate = gate_input.detach().reshape(tokens, -1).to("cpu", torch.float32).numpy().astype(self.gate_dtype)
        self._pending.append((ids, weights, gate))
        if len(self._pending) == self.num_layers:
            self._commit()

    def _commit(self) -> None:
        ids, weights, gates = zip(*self._pending, strict=True)
        tokens = ids[0].shape[0]
        token_ids = self._tokens if self._tokens is not None and self._tokens.size == tokens else None
        step = {
            "ids": np.stack(ids, axis=1),
            "weights": np.stack(weights, axis=1),
            "tokens": token_ids if token_ids is not None else np.full(tokens, -1, dtype=np.int32),
        }
        if self.gate_inputs:
            step["gates"] = np.stack(gates, axis=1)
        self._steps.append(step)
        self._pending, self._tokens = [], None

    def _see_input_ids(self, module, args, kwargs) -> None:
        """Embedding pre-hook: the input ids of the forward call about to reach the MoE layers."""
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self._tokens = ids.detach().reshape(-1).to("cpu", torch.int32).numpy()

    # -- attaching --------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> RoutingRecorder:
        """Observe `model`'s runtime (an error if the model is not offloaded or already recorded)."""
        runtime = _runtime_of(model)
        if runtime.recorder is not None:
            raise RuntimeError("record_routing: this model's runtime already has a recorder attached")
        runtime.recorder = self
        self._runtime = runtime
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Module):
            self._hook = embeddings.register_forward_pre_hook(self._see_input_ids, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._runtime is not None and self._runtime.recorder is self:
            self._runtime.recorder = None
        self._runtime = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- results ----------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything recorded (and a half-recorded call)."""
        self._steps, self._pending, self._tokens = [], [], None

    def arrays(self) -> dict[str, np.ndarray]:
        """What `save` writes (see the module docstring), as numpy arrays."""
        if self._pending:
            raise ValueError(f"RoutingRecorder: the last forward call stopped after {len(self._pending)} of "
                             f"{self.num_layers} MoE layers; clear() and run it again")
        if not self._steps:
            raise ValueError("RoutingRecorder: nothing recorded: run the model (forward or generate) while the "
                             "recorder is attached (with record_routing(model) as recording: ...)")
        out = {
            "stream_expert_ids": np.concatenate([s["ids"] for s in self._steps]),
            "stream_scores": np.concatenate([s["weights"] for s in self._steps]),
            "stream_token_ids": np.concatenate([s["tokens"] for s in self._steps]).astype(np.int32),
            "step_tokens": np.array([s["ids"].shape[0] for s in self._steps], dtype=np.int32),
            "num_experts": np.array(self.num_experts, dtype=np.int64),
            "top_k": np.array(self.top_k, dtype=np.int64),
            "hidden_size": np.array(self.hidden_size, dtype=np.int64),
            "moe_layer_numbers": np.array([layer_number(n) for n in self.layer_names], dtype=np.int32),
            "moe_layer_names": np.array(self.layer_names, dtype=np.str_),
        }
        if self.gate_inputs:
            out["stream_gate_inputs"] = np.concatenate([s["gates"] for s in self._steps])
        return out

    def save(self, path: str | Path) -> Path:
        """Write the recording to `path` (numpy.savez; '.npz' is appended if missing); returns the path."""
        arrays = self.arrays()
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        np.savez(path, **arrays)
        return path


def _runtime_of(model: nn.Module):
    from dali_compile.offload import runtime_of  # offload imports the runtime package: import it late

    try:
        return runtime_of(model)
    except ValueError:
        raise ValueError("record_routing: the model is not offloaded; the recorder observes the hybrid runtime, so "
                         "run dali_compile.offload(model, ...) first (policy='all_cpu' needs no GPU and no cost "
                         "model)") from None


def record_routing(model: nn.Module, gate_inputs: bool = True, gate_dtype=torch.float16) -> RoutingRecorder:
    """A `RoutingRecorder` attached to the offloaded `model`; use as a context manager (it detaches on exit)
    or call `detach()`. gate_inputs=False leaves out the [T, L, H] gate inputs; gate_dtype: float16 or float32."""
    runtime = _runtime_of(model)
    layers = runtime.layers
    recorder = RoutingRecorder([layer.name for layer in layers], runtime.num_experts, layers[0].spec.hidden_size,
                               gate_inputs=gate_inputs, gate_dtype=gate_dtype)
    return recorder.attach(model)
