"""The async pair's schemas keep a compiled graph from breaking a job (`dali::cpu_experts_submit` / `_wait`).

# T tokens, K top-k, E experts, H hidden, I intermediate

A job reads its inputs after the submit has returned and must be waited on exactly once. Inductor
compiles each story below and must not:
- reuse an input's buffer before the job has read it (the wait declares every tensor the job reads);
- drop a wait whose result is unused (the job would leak, and later jobs queue behind it);
- merge two identical submits (one job lost, or one handle waited twice).
Jobs are counted by their handles, which are issued in sequence and never reused.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_cpu_experts import busy_job
from torch._inductor.utils import run_and_get_code

from dali_compile.ops import cpu_experts as ops
from dali_compile.runtime import cpu_extension

pytestmark = pytest.mark.inductor

E, H, I, K = 8, 64, 32, 2  # noqa: E741
FLAGS = (True, False, False, "silu", 0.0, 0.0)  # Mixtral's layout


def _weights(gen):
    return torch.randn(E, 2 * I, H, generator=gen) * 0.1, torch.randn(E, H, I, generator=gen) * 0.1


def _probe_handle() -> int:
    """Submits and waits a one-token job; its handle tells how many jobs were submitted before it."""
    up, down = torch.zeros(1, 2, 4), torch.zeros(1, 4, 1)
    args = (torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), up, down, None, None, None)
    handle = torch.ops.dali.cpu_experts_submit(*args, *FLAGS)
    torch.ops.dali.cpu_experts_wait(handle, *args)
    return int(handle)


def _jobs_submitted_by(fn, *args):
    """fn(*args), and the number of real (non-empty) jobs it submitted."""
    before = _probe_handle()
    result = fn(*args)
    return result, _probe_handle() - before - 1


# ---- inputs computed in the graph


def _route(x, router):
    """A decode step's routing, all computed in the graph: hidden [T, H], ids [T, K], topk_weights [T, K]
    fp32 (renormalised) and the CPU's experts, mask [E] bool (the more loaded half)."""
    hidden = torch.nn.functional.rms_norm(x, (H,))
    probs = torch.softmax(hidden @ router.T, dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    load = probs.sum(dim=0)
    return hidden, ids, weights, load > load.median()


def _other_work(a, b, c):
    """Stands in for the GPU experts: new tensors of the routing tensors' sizes and dtypes ([T, K] fp32,
    [E] bool, [T, H]), so inductor may place them in buffers that the routing no longer needs."""
    return torch.tanh(a @ b[:, :K]), (c @ b[:, :E]).sum(dim=0) > 0, a @ b[:, :H]


def _step(x, router, up, down, a, b, c):
    hidden, ids, weights, mask = _route(x, router)
    inputs = (hidden, ids, weights, up, down, None, None, mask)
    handle = torch.ops.dali.cpu_experts_submit(*inputs, *FLAGS)
    other = _other_work(a, b, c)
    return torch.ops.dali.cpu_experts_wait(handle, *inputs), other


def _buffers_released_while_pending(code: str) -> list[str]:
    """The job inputs that inductor computed (bufN) and that the generated code deletes or hands to
    another tensor between the submit and the wait: free for reuse while the job may still read them."""
    submit = re.search(r"torch\.ops\.dali\.cpu_experts_submit\.default\(([^)]*)\)", code)
    wait = code.index("torch.ops.dali.cpu_experts_wait.default(", submit.end())
    inputs = [a for a in submit.group(1).split(", ")[:8] if re.fullmatch(r"buf\d+", a)]
    pending = code[submit.end() : wait]
    return [name for name in inputs if re.search(rf"\bdel {name}\b|= {name};", pending)]


@pytest.mark.usefixtures("cpu_runtime")  # the race needs the C++ jobs (the reference computes at submit)
def test_inputs_computed_in_the_graph_stay_intact_until_the_job_reads_them():
    """A compiled step computes hidden, topk_weights and the mask, submits, computes other tensors of
    the same sizes, then waits. No buffer the job reads is released before the wait (so inductor cannot
    put the other tensors in it), and with the job queued behind a slow one, so that it reads its inputs
    only after the other work has run, the result equals the reference."""
    gen = torch.Generator().manual_seed(0)
    T = 5
    up, down = _weights(gen)
    x, router = torch.randn(T, H, generator=gen), torch.randn(E, H, generator=gen)
    a, b, c = torch.randn(T, 16, generator=gen), torch.randn(16, H, generator=gen), torch.randn(3, 16, generator=gen)
    args = (x, router, up, down, a, b, c)
    hidden, ids, weights, mask = _route(x, router)
    assert 0 < int(mask[ids].sum()) < ids.numel(), "the case must split the slots between the CPU and elsewhere"
    want = ops.cpu_experts_reference(hidden, ids, weights, up, down, None, None, mask, *FLAGS)

    # Inductor's reordering passes would move the other work after the wait here (next to its use, or
    # to lower the peak); in program order it runs while the job is pending, as GPU work does.
    with torch._inductor.config.patch(reorder_for_locality=False, reorder_for_peak_memory=False):
        compiled = torch.compile(_step, backend="inductor", fullgraph=True)
        _, (code,) = run_and_get_code(compiled, *args)  # compiles: a slow job queued now would end first
    assert _buffers_released_while_pending(code) == []
    for _ in range(3):
        slow, slow_args = busy_job()
        (got, other), jobs = _jobs_submitted_by(compiled, *args)
        torch.ops.dali.cpu_experts_wait(slow, *slow_args[:8])
        assert jobs == 1
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        for got_other, want_other in zip(other, _other_work(a, b, c), strict=True):
            torch.testing.assert_close(got_other, want_other)
    assert cpu_extension.outstanding_jobs() == 0


# ---- an unused wait


@pytest.mark.parametrize("returns_handle", [False, True], ids=["nothing_used", "handle_returned"])
def test_unused_wait_still_runs(returns_handle):
    """A step waits for a job but never uses the result (say, a layer whose CPU part was switched off
    downstream). Each call still submits one job and waits for it: nothing is outstanding afterwards.
    With the handle also returned, dropping only the wait would leak the job."""
    gen = torch.Generator().manual_seed(1)
    up, down = _weights(gen)
    hidden, ids = torch.randn(3, H, generator=gen), torch.randint(0, E, (3, K), generator=gen)
    weights = torch.rand(3, K, generator=gen)

    def step(hidden, ids, weights):
        inputs = (hidden, ids, weights, up, down, None, None, None)
        handle = torch.ops.dali.cpu_experts_submit(*inputs, *FLAGS)
        torch.ops.dali.cpu_experts_wait(handle, *inputs)
        return (hidden * 2, handle) if returns_handle else hidden * 2

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    for _ in range(2):  # the first call compiles, the second reuses the graph
        _, jobs = _jobs_submitted_by(compiled, hidden, ids, weights)
        assert jobs == 1
        assert cpu_extension.outstanding_jobs() == 0


# ---- two identical submits


class _TwoIdenticalJobs(torch.nn.Module):
    """Submits the same job twice, then waits for both: the experts' contributions, twice over."""

    def __init__(self, gen):
        super().__init__()
        up, down = _weights(gen)
        self.up, self.down = torch.nn.Parameter(up), torch.nn.Parameter(down)

    def forward(self, hidden, ids, weights):
        inputs = (hidden, ids, weights, self.up, self.down, None, None, None)
        first = torch.ops.dali.cpu_experts_submit(*inputs, *FLAGS)
        second = torch.ops.dali.cpu_experts_submit(*inputs, *FLAGS)
        return torch.ops.dali.cpu_experts_wait(first, *inputs) + torch.ops.dali.cpu_experts_wait(second, *inputs)


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("mode", ["training", "freezing"])
def test_identical_submits_stay_two_jobs(mode):
    """Two submits with the same arguments in one graph are two jobs, each waited once. Where graphs are
    deduplicated (CSE): the joint graph of a model whose weights require grad (training), and an
    inference graph with inductor's freezing, which folds the weights into constants."""
    gen = torch.Generator().manual_seed(2)
    model = _TwoIdenticalJobs(gen)
    hidden, ids = torch.randn(4, H, generator=gen), torch.randint(0, E, (4, K), generator=gen)
    weights = torch.rand(4, K, generator=gen)
    want = 2 * ops.cpu_experts_reference(hidden, ids, weights, model.up.detach(), model.down.detach(), None, None,
                                         None, *FLAGS)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    grad = torch.enable_grad() if mode == "training" else torch.no_grad()
    with grad, torch._inductor.config.patch(freezing=mode == "freezing"):
        for _ in range(2):
            got, jobs = _jobs_submitted_by(compiled, hidden, ids, weights)
            assert jobs == 2
            torch.testing.assert_close(got.detach(), want, rtol=2e-5, atol=1e-6)
            assert cpu_extension.outstanding_jobs() == 0


# ---- the check behind the wait's arguments, on both paths


@pytest.mark.parametrize("path", ["cpp", "reference"])
def test_wait_given_a_copy_of_an_input_says_so(path, monkeypatch):
    """A copy of topk_weights (what a reused or rematerialised buffer would be) is refused by the C++
    wait and by the reference path alike; the job is consumed either way."""
    if path == "cpp" and not cpu_extension.cpu_extension_available():
        pytest.skip("the C++ runtime is disabled or failed to build")
    if path == "reference":
        monkeypatch.setattr(ops, "_native", lambda *tensors: False)
    gen = torch.Generator().manual_seed(3)
    up, down = _weights(gen)
    inputs = [torch.randn(2, H, generator=gen), torch.randint(0, E, (2, K), generator=gen),
              torch.rand(2, K, generator=gen), up, down, None, None, None]
    handle = torch.ops.dali.cpu_experts_submit(*inputs, *FLAGS)
    copied = [*inputs[:2], inputs[2].clone(), *inputs[3:]]
    with pytest.raises(ValueError, match="topk_weights is not the tensor given to dali::cpu_experts_submit"):
        torch.ops.dali.cpu_experts_wait(handle, *copied)
    with pytest.raises(ValueError, match="already waited"):
        torch.ops.dali.cpu_experts_wait(handle, *inputs)
    assert cpu_extension.outstanding_jobs() == 0 and ops._reference_jobs.outstanding() == 0
