"""`dali::cpu_experts` and its async pair: routed experts computed on the CPU, per top-k slot.

# T tokens, K top-k, E experts, H hidden, I intermediate, X = 2I (gated) or I

    cpu_experts(hidden[T, H], topk_ids[T, K], topk_weights[T, K], up, down, up_bias?, down_bias?,
                expert_mask[E]?, gated, interleaved, transposed, activation, alpha, limit,
                up_scales?, down_scales?) -> [T, K, H] fp32
    cpu_experts_submit(<same arguments>) -> handle [1] int64      (returns at once)
    cpu_experts_wait(handle, hidden, topk_ids, topk_weights, up, down, up_bias?, down_bias?,
                     expert_mask?, up_scales?, down_scales?) -> [T, K, H] fp32   (the submit's very tensors)

    out[t, k] = topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t])   if expert_mask[topk_ids[t, k]]
              = 0                                                          otherwise

Each slot's contribution is computed with fp32 accumulation; the caller sums over k in order, so
splitting the experts between the CPU (mask) and the GPU (~mask) changes nothing beyond rounding.
Weights are the model's own tensors, read in place: up [E, X, H] (transposed [E, H, X]), down
[E, H, I] (transposed [E, I, H]), biases up [E, X], down [E, H]; gated rows are [gate; up] or
interleaved (gate 0::2, up 1::2), exactly as `ExpertLayout` and `expert_math` define them.
`alpha` only matters for clamped_swiglu, `limit` for clamped_swiglu and clamped_silu. hidden and
the weights share one dtype (float32, bfloat16 or float16); ids are int64 or int32; topk_weights
any float dtype.

Quantized experts (`up_scales` and `down_scales` given, layer_spec's module docstring): up and down
hold int8 codes (or uint8, two int4 codes a byte) in row form, [E, X, H * bits/8] and [E, H, I * bits/8],
with float16 scales [E, X, H / G_up] and [E, H, I / G_down] (formats of ops/quantized_linear.py; bits
from the codes' dtype, each group size from its scales' shape); hidden and the biases are float32,
bfloat16 or float16. Quantized experts multiply their codes by activations rounded to int8, per token and group
(`quantized_linear.activation_group`: int4, the weight's groups; int8, 32 columns where 32 divides the row), against
a scale of max |x| / 127 (`quantized_linear.round_activations`): the input of the up projection and that of the
down projection.

The schemas are declared here and only here. The CPU kernels are C++ (csrc/, registered when
`dali_compile.runtime.cpu_extension` loads the library); the CompositeExplicitAutograd kernels
below load it on first use and otherwise run the PyTorch reference, which is also the test oracle.

Handles: a positive handle names one queued job, which keeps its input tensors alive until it has
run and must be waited on exactly once (an unknown or already waited handle is an error). Handle 0
is the empty job, returned when no slot is selected for the CPU: it runs nothing and waits to zeros.

Why the wait takes every tensor the job reads: the job reads them after the submit has returned, so
in a compiled graph they must stay live and unchanged until the wait. Declared on the wait, they are
(inductor frees or reuses a buffer after its last declared use, which would otherwise be the submit).
The wait checks that they are the submit's very tensors (same data_ptr and shape), so a caller (or a
compiler pass) that hands it copies gets a clear error instead of a race.
"""

from __future__ import annotations

import itertools
import threading

import torch
from torch._library.effects import EffectType

from dali_compile.runtime import cpu_extension
from dali_compile.runtime.layer_spec import ACTIVATIONS, CLAMPED_ACTIVATIONS, LayerSpec

from .expert_math import dequantize_expert, expert_inputs, gate_and_activate, layout_from_flags
from .library import define_op
from .quantized_linear import CODE_BITS

NAME = "dali::cpu_experts"
SUBMIT_NAME = "dali::cpu_experts_submit"
WAIT_NAME = "dali::cpu_experts_wait"

# Every tensor a job reads, in the order both halves of the async pair take them.
_TENSORS = (
    "Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor up, Tensor down, Tensor? up_bias, "
    "Tensor? down_bias, Tensor? expert_mask"
)
# The scales of quantized experts come last, with defaults, so that calls on plain experts name none.
_SCALES = "Tensor? up_scales=None, Tensor? down_scales=None"
_TENSOR_NAMES = ("hidden", "topk_ids", "topk_weights", "up", "down", "up_bias", "down_bias", "expert_mask",
                 "up_scales", "down_scales")
_FLAGS = "bool gated, bool interleaved, bool transposed, str activation, float alpha, float limit"
_ARGS = f"({_TENSORS}, {_FLAGS}, {_SCALES})"
define_op(NAME, _ARGS + " -> Tensor")
define_op(SUBMIT_NAME, _ARGS + " -> Tensor")
define_op(WAIT_NAME, f"(Tensor handle, {_TENSORS}, {_SCALES}) -> Tensor")

EMPTY_JOB = 0
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_NUM_ARGS = 16  # of the op and its submit; the wait takes a handle and _TENSOR_NAMES


def _full(args, length: int = _NUM_ARGS) -> tuple:
    """The arguments with trailing defaults filled in (the dispatcher leaves out trailing None scales)."""
    return (*args, *(None,) * (length - len(args)))


def _job_tensors(args) -> tuple:
    """The tensors a call of the op or its submit reads, in the wait's order (args as the schema's)."""
    args = _full(args)
    return (*args[:8], *args[14:16])


def _check_quantized(op, up, down, up_scales, down_scales, E, H, I, X) -> None:
    if up_scales is None or down_scales is None:
        raise ValueError(f"{op}: quantized experts need both up_scales and down_scales")
    if up.dtype not in CODE_BITS or down.dtype != up.dtype:
        raise TypeError(f"{op}: quantized expert codes must both be int8 or both uint8 (int4), got {up.dtype} and "
                        f"{down.dtype}")
    bits = CODE_BITS[up.dtype]
    for name, codes, scales, rows, columns in (("up", up, up_scales, X, H), ("down", down, down_scales, H, I)):
        want = (E, rows, columns * bits // 8)
        if tuple(codes.shape) != want:
            raise ValueError(f"{op}: int{bits} {name} codes have shape {tuple(codes.shape)} but {want} was expected")
        groups = scales.shape[-1] if scales.dim() == 3 else 0
        if (scales.dtype != torch.float16 or scales.dim() != 3 or tuple(scales.shape[:2]) != (E, rows) or not groups
                or columns % groups or (bits == 4 and (columns // groups) % 2)):
            raise ValueError(f"{op}: {name}_scales must be float16 [{E}, {rows}, {columns} / G] for a group size G "
                             f"dividing {columns}" + (" (even for int4)" if bits == 4 else "")
                             + f", got {scales.dtype} {tuple(scales.shape)}")


def check_args(
    op, hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask,
    gated, interleaved, transposed, activation, up_scales=None, down_scales=None,
) -> None:
    """The checks that need no data: shared by the fake kernels and the reference (C++ has its own)."""
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: topk_ids must be [T, K] with T = {hidden.shape[0]}, got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_weights must have the shape of topk_ids, got {tuple(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"{op}: topk_weights must be floating point, got {topk_weights.dtype}")
    if up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{op}: expert weights must be 3-D, got up {tuple(up.shape)} and down {tuple(down.shape)}")
    quantized = up_scales is not None or down_scales is not None
    if quantized:
        if transposed:
            raise ValueError(f"{op}: quantized experts are stored in row form (transposed=False)")
        if hidden.dtype not in _WEIGHT_DTYPES:
            raise TypeError(f"{op}: hidden must be one of {_WEIGHT_DTYPES}, got {hidden.dtype}")
    elif up.dtype not in _WEIGHT_DTYPES or down.dtype != up.dtype:
        raise TypeError(f"{op}: expert weights must share one of {_WEIGHT_DTYPES}, got {up.dtype} and {down.dtype}")
    elif hidden.dtype != up.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but the expert weights are {up.dtype}; they must match")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if (interleaved or activation in CLAMPED_ACTIVATIONS) and not gated:
        raise ValueError(f"{op}: interleaved layouts and {'/'.join(CLAMPED_ACTIVATIONS)} need gated=True")
    E = up.shape[0]
    H, I = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    if quantized and down.dtype == torch.uint8:
        I *= 2
    X = 2 * I if gated else I
    if hidden.shape[1] != H:
        raise ValueError(f"{op}: hidden size {hidden.shape[1]} does not match the experts' {H}")
    expected = {}
    if quantized:
        _check_quantized(op, up, down, up_scales, down_scales, E, H, I, X)
    else:
        expected["down"] = (tuple(down.shape), (E, I, H) if transposed else (E, H, I))
        expected["up"] = (tuple(up.shape), (E, H, X) if transposed else (E, X, H))
    for bias in (up_bias, down_bias):
        if bias is not None and bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: the expert biases must be in hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if up_bias is not None:
        expected["up_bias"] = (tuple(up_bias.shape), (E, X))
    if down_bias is not None:
        expected["down_bias"] = (tuple(down_bias.shape), (E, H))
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{op}: {name} has shape {got} but {want} was expected for this layout")
    if expert_mask is not None and (expert_mask.dtype != torch.bool or tuple(expert_mask.shape) != (E,)):
        raise ValueError(
            f"{op}: expert_mask must be bool [E] = [{E}], got {expert_mask.dtype} {tuple(expert_mask.shape)}"
        )


def _check(op, args) -> None:
    args = _full(args)
    check_args(op, *args[:12], *args[14:16])


# Fake kernels: shapes only, never runtime state.
@torch.library.register_fake(NAME)
def _cpu_experts_fake(*args):
    _check(NAME, args)
    hidden, topk_ids = args[0], args[1]
    return hidden.new_empty((hidden.shape[0], topk_ids.shape[1], hidden.shape[1]), dtype=torch.float32)


@torch.library.register_fake(SUBMIT_NAME)
def _cpu_experts_submit_fake(*args):
    _check(SUBMIT_NAME, args)
    return args[0].new_empty((1,), dtype=torch.int64)


def _check_wait_shapes(hidden, topk_ids, topk_weights) -> None:
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{WAIT_NAME}: hidden must be [T, H] and topk_ids [T, K], got "
                         f"{tuple(hidden.shape)} and {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{WAIT_NAME}: topk_weights must have the shape of topk_ids, got {tuple(topk_weights.shape)}")


@torch.library.register_fake(WAIT_NAME)
def _cpu_experts_wait_fake(handle, hidden, topk_ids, topk_weights, *weights_and_mask):
    _check_wait_shapes(hidden, topk_ids, topk_weights)
    return hidden.new_empty((hidden.shape[0], topk_ids.shape[1], hidden.shape[1]), dtype=torch.float32)


def cpu_experts_reference(
    hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask,
    gated, interleaved, transposed, activation, alpha, limit, up_scales=None, down_scales=None,
) -> torch.Tensor:
    """The op in plain PyTorch, fp32 (`expert_math`'s gate/activation; quantized experts dequantized):
    oracle and fallback. Any device."""
    check_args(NAME, hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask,
               gated, interleaved, transposed, activation, up_scales, down_scales)
    E = up.shape[0]
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= E):
        raise IndexError(f"{NAME}: expert id out of range for {E} experts: {topk_ids.tolist()}")
    layout = layout_from_flags(gated, interleaved, transposed, up_bias is not None, activation, alpha, limit)
    T, K = topk_ids.shape
    out = torch.zeros(T * K, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).float()
    for expert in torch.unique(flat_ids).tolist():
        if expert_mask is not None and not bool(expert_mask[expert]):
            continue
        rows = (flat_ids == expert).nonzero().squeeze(1)
        x = hidden[rows // K].float()
        if up_scales is None:
            w_up, w_down = up[expert].float(), down[expert].float()
        else:
            bits = CODE_BITS[up.dtype]
            w_up = dequantize_expert(up[expert], up_scales[expert], bits)
            w_down = dequantize_expert(down[expert], down_scales[expert], bits)
            x = expert_inputs(up, up_scales, bits, x)
        h = x @ w_up if transposed else x @ w_up.T
        if up_bias is not None:
            h = h + up_bias[expert].float()
        y = gate_and_activate(layout, h)
        if up_scales is not None:
            y = expert_inputs(down, down_scales, bits, y)
        y = y @ w_down if transposed else y @ w_down.T
        if down_bias is not None:
            y = y + down_bias[expert].float()
        out[rows] = y * flat_weights[rows, None]
    return out.view(T, K, hidden.shape[1])


def _identities(tensors) -> tuple:
    """(data_ptr, shape) of each job input, None for an absent optional one: what the wait compares."""
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape)) for t in tensors)


def _check_same_inputs(handle: int, submitted: tuple, given: tuple) -> None:
    """Raises unless the wait was given the submit's very tensors (see the module docstring)."""
    for name, want, got in zip(_TENSOR_NAMES, submitted, given, strict=True):
        if want != got:
            raise ValueError(
                f"{WAIT_NAME}: {name} is not the tensor given to {SUBMIT_NAME} for handle {handle} "
                f"((data_ptr, shape) submitted {want or 'absent'}, waited with {got or 'absent'}); "
                "pass the submit's very tensors, so that they stay alive and unchanged until the job has read them"
            )


class _ReferenceJobs:
    """Submit/wait for the reference path: the work runs at submit, the wait hands the result back once,
    after the same input check as the C++ wait."""

    def __init__(self):
        self._lock = threading.Lock()
        self._results: dict[int, tuple[torch.Tensor, tuple]] = {}
        self._next = itertools.count(1)

    def submit(self, result: torch.Tensor, inputs: tuple) -> int:
        with self._lock:
            handle = next(self._next)
            self._results[handle] = (result, _identities(inputs))
        return handle

    def wait(self, handle: int, inputs: tuple) -> torch.Tensor:
        with self._lock:
            if handle in self._results:
                result, submitted = self._results.pop(handle)
                _check_same_inputs(handle, submitted, _identities(inputs))
                return result
            issued = 0 < handle < next(self._next)  # burns a number; handles only need to be unique
        if issued:
            raise ValueError(f"{WAIT_NAME}: handle {handle} was already waited on (each job is waited exactly once)")
        raise ValueError(f"{WAIT_NAME}: unknown handle {handle} (not returned by {SUBMIT_NAME})")

    def outstanding(self) -> int:
        with self._lock:
            return len(self._results)


_reference_jobs = _ReferenceJobs()


def _native(*tensors) -> bool:
    """True when the C++ CPU kernels can take this call: all tensors on the CPU and the library loaded
    (loading registers them for the CPU key, so re-dispatching reaches C++, not this function again)."""
    if not all(t is None or t.device.type == "cpu" for t in tensors) or not cpu_extension.cpu_extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CPU")


def _cpu_experts_composite(*args):
    if _native(*_job_tensors(args)):
        return torch.ops.dali.cpu_experts.default(*args)
    return cpu_experts_reference(*_full(args))


def _cpu_experts_submit_composite(*args):
    if _native(*_job_tensors(args)):
        return torch.ops.dali.cpu_experts_submit.default(*args)
    expert_mask = args[7]
    if expert_mask is not None and not bool(expert_mask[args[1].reshape(-1).long()].any()):
        handle = EMPTY_JOB
    else:
        handle = _reference_jobs.submit(cpu_experts_reference(*_full(args)), _job_tensors(args))
    return torch.tensor([handle], dtype=torch.int64, device=args[0].device)


def _cpu_experts_wait_composite(handle, *inputs):
    inputs = _full(inputs, len(_TENSOR_NAMES))
    if _native(handle, *inputs):
        return torch.ops.dali.cpu_experts_wait.default(handle, *inputs)
    if handle.dtype != torch.int64 or handle.numel() != 1:
        raise ValueError(f"{WAIT_NAME}: handle must be the int64 [1] tensor returned by {SUBMIT_NAME}")
    hidden, topk_ids, topk_weights = inputs[:3]
    _check_wait_shapes(hidden, topk_ids, topk_weights)
    value = int(handle.item())
    if value == EMPTY_JOB:
        return hidden.new_zeros((hidden.shape[0], topk_ids.shape[1], hidden.shape[1]), dtype=torch.float32)
    return _reference_jobs.wait(value, inputs)


# A kernel registered directly for CPU (the C++ one, once loaded) takes precedence over these.
torch.library.impl(NAME, "CompositeExplicitAutograd")(_cpu_experts_composite)
torch.library.impl(SUBMIT_NAME, "CompositeExplicitAutograd")(_cpu_experts_submit_composite)
torch.library.impl(WAIT_NAME, "CompositeExplicitAutograd")(_cpu_experts_wait_composite)

# Neither half of the pair may be dropped, merged or reordered against the other submits and waits.
# - has_side_effect: FX's and inductor's dead-code elimination keep a call whose result is unused (an
#   unused wait still consumes its job; otherwise the job would leak and later jobs queue behind it).
# - An ORDERED effect: AOT autograd threads an effect token through every call (`with_effects`), so
#   two calls with identical arguments still differ in their token. has_side_effect alone does not
#   stop common-subexpression elimination: `fx_graph_cse` (run on the joint graph by the partitioner,
#   and by inductor's freezing) compares target and arguments only, so two identical submits would
#   become one job (and the two waits one wait). The token also keeps the calls in program order.
for _op in (torch.ops.dali.cpu_experts_submit.default, torch.ops.dali.cpu_experts_wait.default):
    torch.fx.node.has_side_effect(_op)
    torch.library._register_effectful_op(_op, EffectType.ORDERED)


def spec_args(spec: LayerSpec) -> tuple:
    """A layer's weights and layout as the op arguments: (up, down, up_bias, down_bias) after expert_mask,
    (gated, interleaved, transposed, activation, alpha, limit) after them and (up_scales, down_scales) last."""
    layout, act = spec.layout, spec.layout.activation
    weights = (spec.up_weight, spec.down_weight, spec.up_bias, spec.down_bias)
    flags = (layout.gated, layout.interleaved, layout.transposed, act.name, act.alpha or 0.0, act.limit or 0.0)
    return weights, flags, (spec.up_scales, spec.down_scales)


def cpu_experts(
    spec: LayerSpec,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slot contributions [T, K, H] fp32 of the experts selected by expert_mask (bool [E]; None = all).

    hidden [T, H] in the layer's dtype, topk_ids [T, K] int64/int32, topk_weights [T, K] floating.
    """
    (up, down, up_bias, down_bias), flags, scales = spec_args(spec)
    return torch.ops.dali.cpu_experts(hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask, *flags,
                                      *scales)


def cpu_experts_submit(
    spec: LayerSpec,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queue `cpu_experts` on the runtime's threads; returns a handle [1] int64 at once (GIL released)."""
    (up, down, up_bias, down_bias), flags, scales = spec_args(spec)
    return torch.ops.dali.cpu_experts_submit(
        hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask, *flags, *scales
    )


def cpu_experts_wait(
    handle: torch.Tensor,
    spec: LayerSpec,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block until the job is done (GIL released) and return its [T, K, H] fp32 contributions.

    spec, hidden [T, H], topk_ids [T, K], topk_weights [T, K] and expert_mask [E] must be the very
    ones given to `cpu_experts_submit` (checked): the job reads them until it is done.
    """
    (up, down, up_bias, down_bias), _, scales = spec_args(spec)
    return torch.ops.dali.cpu_experts_wait(
        handle, hidden, topk_ids, topk_weights, up, down, up_bias, down_bias, expert_mask, *scales
    )
