"""`dali::cpu_linear`: a dense linear layer on the CPU runtime, the weight-bound matmuls of a decode step.

# T rows (every leading dimension of x), N output features, C input features

    cpu_linear(x[..., C], weight[N, C], bias[N]?) -> [..., N]      in x's dtype

    out = x @ weight.T + bias, accumulated in fp32 and rounded once to x's dtype

x, weight and bias share one dtype (float32, bfloat16 or float16) and live on the CPU; the weight is
read in place (unit stride in its last dimension). Small row counts (decode) run the runtime's
streaming kernel on its thread pool, which reads each weight byte once; from
`cpu_extension.get_linear_gemm_min_rows()` rows on (prefill) the call goes to ATen's fp32 GEMM, with
16-bit weights widened chunk by chunk. The `replace_cpu_linears` pass puts this op in place of every
CPU `linear` of a compiled graph.

The schema is declared here and only here; the CPU kernel is C++ (`csrc/binding/linear_ops.cpp`),
registered when `dali_compile.runtime.cpu_extension` loads the library. The CompositeExplicitAutograd
kernel below loads it on first use and otherwise runs the PyTorch reference, also the test oracle.
"""

from __future__ import annotations

import torch

from dali_compile.runtime import cpu_extension

from .library import define_op

NAME = "dali::cpu_linear"
define_op(NAME, "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The checks that need no data: shared by the fake kernel and the reference (C++ has its own)."""
    if weight.dim() != 2:
        raise ValueError(f"{NAME}: weight must be 2-D [N, C], got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"{NAME}: weight must be one of {DTYPES}, got {weight.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{NAME}: x must have at least one dimension")
    if x.dtype != weight.dtype:
        raise TypeError(f"{NAME}: x is {x.dtype} but weight is {weight.dtype}; they must have the same dtype")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{NAME}: x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if bias is not None:
        if bias.dtype != weight.dtype:
            raise TypeError(f"{NAME}: bias is {bias.dtype} but weight is {weight.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{NAME}: bias must be [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    devices = {t.device.type for t in (x, weight, bias) if t is not None}
    if devices != {"cpu"}:
        raise ValueError(f"{NAME}: x, weight and bias must be CPU tensors, got {sorted(devices)}")


@torch.library.register_fake(NAME)
def _cpu_linear_fake(x, weight, bias):
    check_args(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def cpu_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op in plain PyTorch with fp32 accumulation: oracle and fallback."""
    check_args(x, weight, bias)
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _cpu_linear_composite(x, weight, bias):
    # Loading the library registers the C++ kernel for the CPU key, so re-dispatching reaches it, not this.
    if cpu_extension.cpu_extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CPU"):
        return torch.ops.dali.cpu_linear.default(x, weight, bias)
    return cpu_linear_reference(x, weight, bias)


# A kernel registered directly for CPU (the C++ one, once loaded) takes precedence over this.
torch.library.impl(NAME, "CompositeExplicitAutograd")(_cpu_linear_composite)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """linear's gradients in plain PyTorch: a graph traced with gradients on stays differentiable."""
    x, weight = ctx.saved_tensors
    rows_grad, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_weight = rows_grad.T @ rows_x if ctx.needs_input_grad[1] else None
    grad_bias = rows_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


torch.library.register_autograd(NAME, _backward, setup_context=_setup_context)


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., C] @ weight[N, C].T (+ bias [N]) -> [..., N] in x's dtype, on the CPU runtime."""
    return torch.ops.dali.cpu_linear(x, weight, bias)
