"""`dali_compile.load(path, ...)`: a local Hugging Face checkpoint to a ready model, in one call.

    model = dali_compile.load("/models/Qwen3-30B-A3B", device="cuda", expert_memory="auto",
                              quantize={"experts": "int4"})
    model.generate(input_ids.cuda(), max_new_tokens=64)

transformers reads the checkpoint (its conventions: legacy per-expert tensors or fused ones, sharded or
not, renamed keys), shard by shard, and each tensor goes where it will live: with `device="cuda"` the
non-expert weights straight to the GPU and the experts to host memory; quantized tensors through dali's
quantizer as they are read (both through transformers' quantizer interface: load_quantizer.py), so the
full-precision model never exists in host memory. Before anything is read, the checkpoint is checked
against its config on the meta device (a model with no MoE layer, a quantization the layers cannot take)
and against the host's memory (memory_budget.py); after reading, any weight the checkpoint lacks or has in
another shape is an error, never a randomly initialised model.

Then `device="cpu"`: every expert runs in the C++ CPU runtime (the "dali" experts implementation, eager or
under `torch.compile(backend="dali")`). `device="emulated"` or `"cuda"`: the model is offloaded
(`dali_compile.offload`) with `expert_memory` bytes of expert slots; `"auto"` measures what the device
has left (memory_budget.py) and prints the arithmetic. `load_summary(model)` returns what was done.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .experts_interface import IMPLEMENTATION_NAME, experts_modules, register_experts_interface, spec_of_module
from .memory_budget import (
    ExpertBudget,
    auto_expert_budget,
    available_host_memory,
    device_free_memory,
    format_bytes,
    probe_forward,
    return_freed_memory,
)
from .quantization import DEFAULT_GROUP_SIZE, FORMATS, _check_layer, _checked_experts, _dense_linears
from .runtime.accelerator import parse_bytes
from .runtime.expert_cache import expert_bytes

logger = logging.getLogger("dali_compile")

_SUMMARY_ATTRIBUTE = "_dali_load_summary"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


class LoadError(ValueError):
    """The checkpoint, the options or the machine do not allow this load; nothing was loaded."""


@dataclass(frozen=True)
class LoadSummary:
    path: str
    device: str
    dtype: torch.dtype
    quantize: dict | None
    expert_memory: int | None  # bytes of expert slots on the device (None on the CPU)
    budget_note: str  # how expert_memory was chosen
    seconds: float
    host_bytes: int  # weights resident in host memory
    device_bytes: int  # weights on the device plus the expert budget


def load(path, device: str = "cpu", expert_memory: int | str = "auto", quantize: dict | None = None,
         policy: str = "dali", dtype: torch.dtype | str | None = None, context_length: int = 4096,
         group_size: int = DEFAULT_GROUP_SIZE, progress: bool = True, **offload_options) -> nn.Module:
    """A ready model from the local checkpoint directory `path`; see the module docstring.

    device: 'cpu', 'emulated' (the CPU test double of a GPU), 'cuda' or 'cuda:N'. expert_memory: the expert
    budget on the device, bytes, a string like '12GiB', or 'auto' (ignored on the CPU, where every expert runs
    on the CPU). quantize: None or {'experts': 'int8'|'int4'|None, 'dense': ...} (as `dali_compile.quantize`,
    with `group_size`). policy and offload_options: as `dali_compile.offload`. dtype: the weights' dtype
    (default the checkpoint's). context_length: the tokens the KV cache must hold, for the auto budget."""
    start = time.perf_counter()
    _checked_directory(path)  # before the options: a wrong path is the likeliest mistake
    kind = _device_kind(device)
    quantize = _checked_quantize(quantize, kind)
    if kind == "cpu" and expert_memory != "auto":
        raise LoadError(f"load: expert_memory={expert_memory!r} is for device 'emulated' or 'cuda'; on the CPU every "
                        "expert runs on the CPU")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise LoadError(f"load: context_length must be a positive int, got {context_length!r}")
    directory, config, dtype = _opened(path, dtype)
    context_length = _within_positions(context_length, config)
    meta = _meta_model(config, dtype, directory)
    _check_quantizable(meta, quantize, group_size)
    shards = _shard_files(directory)
    host_needed = _host_bytes_needed(meta, quantize, group_size, kind)
    _check_host_memory(host_needed, max(f.stat().st_size for f in shards), directory)
    place_on = torch.device(device) if kind == "cuda" else None
    del meta
    if progress:
        print(f"dali_compile.load: {directory} ({len(shards)} shard{'s' * (len(shards) > 1)}, "
              f"{format_bytes(sum(f.stat().st_size for f in shards))}) as {str(dtype).removeprefix('torch.')}"
              f"{_quantize_text(quantize)}, to {device}; host memory needed about {format_bytes(host_needed)}",
              flush=True)
    model = _read_checkpoint(directory, dtype, quantize, group_size, place_on, shards if progress else None)
    budget, note = None, "every expert on the CPU"
    if kind == "cpu":
        register_experts_interface()
        model.set_experts_implementation(IMPLEMENTATION_NAME)
    else:
        budget, note = _expert_memory(model, device, expert_memory, context_length)
        if progress:
            print(f"dali_compile.load: {note}", flush=True)
        from .offload import offload

        offload(model, device=device, expert_memory=budget, policy=policy, **offload_options)
    host, on_device = _resident_bytes(model)
    summary = LoadSummary(str(directory), str(device), dtype, quantize, budget, note, time.perf_counter() - start,
                          host, on_device + (budget or 0))
    setattr(model, _SUMMARY_ATTRIBUTE, summary)
    return model


def load_summary(model: nn.Module) -> LoadSummary:
    summary = getattr(model, _SUMMARY_ATTRIBUTE, None)
    if summary is None:
        raise ValueError("load_summary: this model was not loaded with dali_compile.load")
    return summary


# ------------------------------------------------------------------------------------------ checks before reading


def _checked_directory(path) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        hint = ""
        if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/", "~")):
            hint = (f"; {path!r} looks like a Hugging Face Hub id: dali reads local directories only (nothing is "
                    f"downloaded), e.g. after `huggingface-cli download {path} --local-dir DIR`")
        raise LoadError(f"load: {directory} is not a directory (a local Hugging Face checkpoint: config.json and "
                        f"safetensors shards){hint}")
    if not (directory / "config.json").is_file():
        raise LoadError(f"load: {directory} has no config.json; it is not a Hugging Face checkpoint directory")
    return directory.resolve()


def _opened(path, dtype) -> tuple[Path, object, torch.dtype]:
    """The checked checkpoint directory, its config (not stored quantized by another tool) and the dtype to
    read it in."""
    directory = _checked_directory(path)
    config = _read_config(directory)
    _check_not_prequantized(config, directory)
    return directory, config, _resolved_dtype(dtype, config)


def _device_kind(device) -> str:
    name = str(device)
    if name in ("cpu", "emulated", "emulated-sync", "emulated-async"):
        return name.split("-")[0]
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        kind = None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"load: device {name!r} but CUDA is not available here; use 'cpu' or 'emulated'")
        return "cuda"
    raise LoadError(f"load: device must be 'cpu', 'emulated', 'cuda' or 'cuda:N', got {device!r}")


def _checked_quantize(quantize, kind: str) -> dict | None:
    if quantize is None:
        return None
    if not isinstance(quantize, dict) or not set(quantize) <= {"experts", "dense"}:
        raise LoadError(f"load: quantize must be None or a dict with keys 'experts' and/or 'dense', got {quantize!r}")
    for key, value in quantize.items():
        if value is not None and value not in FORMATS:
            raise LoadError(f"load: quantize[{key!r}]={value!r}; choose 'int8', 'int4' or None")
    quantize = {"experts": quantize.get("experts"), "dense": quantize.get("dense")}
    if kind == "cuda" and quantize["dense"] is not None:
        raise LoadError("load: quantized dense linears run on the CPU only; on CUDA quantize the experts only "
                        "(quantize={'experts': ...})")
    return quantize if any(quantize.values()) else None


def _read_config(directory: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise LoadError(f"load: {directory}/config.json cannot be read by transformers: {error}") from None


def _check_not_prequantized(config, directory: Path) -> None:
    """A checkpoint stored quantized by another tool (GPT-OSS's mxfp4, fp8, GPTQ, AWQ, ...) holds formats dali's
    kernels do not read; reading it through transformers' own quantizer would leave modules dali cannot run."""
    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        method = stored.get("quant_method") if isinstance(stored, dict) else getattr(stored, "quant_method", stored)
        raise LoadError(f"load: {directory} is stored quantized ({method}); dali reads bf16, fp16 or fp32 checkpoints "
                        "and quantizes them itself (quantize={'experts': 'int4'}): use the model's unquantized "
                        "release")


def _within_positions(context_length: int, config) -> int:
    """The KV cache never holds more positions than the model has (max_position_embeddings)."""
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(context_length, positions) if isinstance(positions, int) and positions > 0 else context_length


def _resolved_dtype(dtype, config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LoadError(f"load: dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LoadError(f"load: dtype {dtype}; dali runs bfloat16, float16 and float32 weights")
    return dtype


def _meta_model(config, dtype: torch.dtype, directory: Path) -> nn.Module:
    """The model's structure without memory, to check and size it before reading a byte."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        raise LoadError(f"load: {directory} is not a causal language model transformers can build: {error}") from None
    if not experts_modules(meta):
        raise LoadError(f"load: {directory} ({type(meta).__name__}) has no MoE layer with fused experts "
                        "(transformers' @use_experts_implementation); dali runs Mixture-of-Experts models")
    return meta


def _check_quantizable(meta: nn.Module, quantize: dict | None, group_size: int) -> None:
    if quantize is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise LoadError(f"load: group size {group_size!r} must be an even int >= 2")
    try:
        if quantize["dense"] is not None:
            for name, linear in _dense_linears(meta):
                _check_layer(name, linear, FORMATS[quantize["dense"]], group_size)
        if quantize["experts"] is not None:
            _checked_experts(meta, FORMATS[quantize["experts"]], group_size)
    except (TypeError, ValueError, RuntimeError) as error:
        raise LoadError(f"load: {error}".replace("dali_compile.quantize: ", "")) from None


def _shard_files(directory: Path) -> list[Path]:
    """The checkpoint's shards, each one's header read (a damaged or truncated shard is an error naming it)."""
    from safetensors import safe_open

    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise LoadError(f"load: {directory} has no .safetensors file (dali loads safetensors checkpoints)")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as error:  # safetensors' own error type is not an OSError
            raise LoadError(f"load: {shard} is not a readable safetensors file: {_first_line(error)}") from None
    return shards


def _quantized_bytes(numel: int, columns: int, bits: int, group: int) -> int:
    """Codes and float16 scales of a weight with `numel` elements in rows of `columns`."""
    return numel * bits // 8 + (numel // columns) * (columns // group) * 2


def _host_bytes_needed(meta: nn.Module, quantize: dict | None, group_size: int, kind: str) -> int:
    """Bytes of the loaded model's host-resident tensors (quantized sizes where quantized; on CUDA the experts)."""
    sizes: dict[int, int] = {}  # tensor id -> bytes (tied tensors once)
    for tensor in list(meta.parameters()) + list(meta.buffers()):
        sizes[id(tensor)] = tensor.numel() * tensor.element_size()
    expert_ids = set()
    for _, module in experts_modules(meta):
        for tensor in module.parameters(recurse=False):
            expert_ids.add(id(tensor))
            if quantize is not None and quantize["experts"] is not None and tensor.dim() == 3:
                bits = FORMATS[quantize["experts"]]
                columns = tensor.shape[1] if module.is_transposed else tensor.shape[2]
                sizes[id(tensor)] = _quantized_bytes(tensor.numel(), columns, bits, columns if bits == 8 else
                                                     group_size)
    if quantize is not None and quantize["dense"] is not None:
        bits = FORMATS[quantize["dense"]]
        for _, linear in _dense_linears(meta):
            columns = linear.in_features
            sizes[id(linear.weight)] = _quantized_bytes(linear.weight.numel(), columns, bits,
                                                        columns if bits == 8 else group_size)
    if kind == "cuda":
        return sum(sizes[i] for i in expert_ids)
    return sum(sizes.values())


def _check_host_memory(needed: int, largest_shard: int, directory: Path) -> None:
    available = available_host_memory()
    if needed + largest_shard > available:
        raise LoadError(f"load: not enough host memory for {directory}: the loaded model needs about "
                        f"{format_bytes(needed)} plus up to one shard ({format_bytes(largest_shard)}) while loading, "
                        f"and {format_bytes(available)} is available. Quantize (quantize={{'experts': 'int4'}}), "
                        "offload to a GPU, or free memory")


def _quantize_text(quantize: dict | None) -> str:
    if quantize is None:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in quantize.items() if v is not None) + ")"


# ------------------------------------------------------------------------------------------------------- reading


@contextmanager
def _transformers_progress(enabled: bool):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _read_checkpoint(directory: Path, dtype: torch.dtype, quantize: dict | None, group_size: int,
                     place_on: torch.device | None, progress_of: list[Path] | None,
                     keep: frozenset | None = None) -> nn.Module:
    """The model as transformers reads it, quantized and placed on the way (`place_on`: the device for every
    parameter outside the experts modules; None: the CPU; `keep`: the parameters to read, the others stay on
    the meta device; None: all; `progress_of`: the checked shards, a bar each; None: no progress)."""
    from transformers import AutoModelForCausalLM

    from .load_progress import ShardProgress
    from .load_quantizer import Problems, forget_quantizer, load_config

    extra, problems = {}, Problems()
    bars = None if progress_of is None else ShardProgress(progress_of)
    if quantize is not None or place_on is not None or keep is not None or bars is not None:
        quantize = quantize or {"experts": None, "dense": None}
        extra["quantization_config"] = load_config(quantize["experts"], quantize["dense"], group_size, place_on,
                                                   keep, bars, problems)
    try:
        with _transformers_progress(False):  # one bar per shard instead (load_progress.py)
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, local_files_only=True, output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError) as error:  # a damaged shard, a shape the config does not have
        if problems:  # the hook's own refusals say more than transformers' summary of them
            raise LoadError(f"load: reading {directory} failed (a tensor's shape differs from config.json's): "
                            f"{_some(problems)}") from None
        hint = " (a tensor's shape differs from config.json's)" if "mismatched" in str(error) else ""
        raise LoadError(f"load: reading {directory} failed{hint}: {_first_line(error)}") from None
    problems = []
    if info.get("missing_keys"):
        problems.append(f"weights missing from the checkpoint: {_some(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"weights whose shape differs from the config's: {_some(info['mismatched_keys'])}")
    if problems:
        raise LoadError(f"load: {directory} does not match its config.json; " + "; ".join(problems))
    if info.get("unexpected_keys"):
        logger.warning("dali_compile.load: %s has tensors the model does not use: %s", directory,
                       _some(info["unexpected_keys"]))
    forget_quantizer(model)
    return_freed_memory()
    return model.eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _some(keys) -> str:
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


# ----------------------------------------------------------------------------------------------- the expert budget


def _expert_memory(model: nn.Module, device, expert_memory, context_length: int) -> tuple[int, str]:
    if expert_memory != "auto":
        try:
            budget = parse_bytes(expert_memory)
        except (TypeError, ValueError) as error:
            raise LoadError(f"load: expert_memory: {error}") from None
        return budget, f"expert_memory={format_bytes(budget)} (given)"
    budget = measure_auto_budget(model, device, context_length)
    return budget.budget, budget.describe()


def measure_auto_budget(model: nn.Module, device, context_length: int) -> ExpertBudget:
    """`expert_memory="auto"` for a loaded, not yet offloaded model: one probe forward with every expert on the
    CPU (an offload with no expert slots, released after) measures the KV cache and activations."""
    from .offload import offload, release, runtime_of

    modules = experts_modules(model)
    slot_bytes = expert_bytes(spec_of_module(modules[0][1], modules[0][0]))
    total_experts = sum(module.num_experts for _, module in modules)
    offload(model, device=device, expert_memory=0, policy="all_cpu", prefetch=0)
    try:
        accelerator_device = runtime_of(model).accelerator.device
        probe = probe_forward(model, accelerator_device)
    finally:
        release(model)
    free, total, where = device_free_memory(accelerator_device)
    if accelerator_device.type != "cuda":  # the emulated device: its non-expert weights count against it too
        free -= _resident_bytes(model)[0] - sum(p.numel() * p.element_size() for _, m in modules
                                                for p in m.parameters(recurse=False))
    budget = auto_expert_budget(free, total, probe, context_length, slot_bytes, total_experts, where)
    if budget.slots < 1:
        raise LoadError(f"load: the device has no room for one expert ({budget.describe()}); pass a smaller "
                        "context_length, quantize the experts, or use device='cpu'")
    return budget


def _resident_bytes(model: nn.Module) -> tuple[int, int]:
    """(host, device) bytes of the model's parameters and buffers, each tensor once."""
    seen, host, device = set(), 0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu":
            host += nbytes
        else:
            device += nbytes
    return host, device


def read_checkpoint(path, dtype: torch.dtype | str | None = None, experts_of_layers=None) -> nn.Module:
    """The model of the checkpoint at `path`, read on the CPU with the checks of `load` (no placement,
    quantization or offload). `experts_of_layers(number of MoE layers)`: read only the experts of those MoE
    layers (indices in model order); every other parameter stays on the meta device and is never held in full
    (a distributed worker's model: it serves those layers' experts and nothing else)."""
    directory, config, dtype = _opened(path, dtype)
    keep = None
    if experts_of_layers is not None:
        modules = experts_modules(_meta_model(config, dtype, directory))
        layers = list(experts_of_layers(len(modules)))
        if any(not 0 <= layer < len(modules) for layer in layers):
            raise LoadError(f"load: MoE layers {layers} outside the model's {len(modules)}")
        keep = frozenset(f"{modules[layer][0]}.{name}" for layer in layers
                         for name, _ in modules[layer][1].named_parameters(recurse=False))
    _shard_files(directory)
    return _read_checkpoint(directory, dtype, None, DEFAULT_GROUP_SIZE, None, None, keep)
