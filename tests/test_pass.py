"""The MoE rewrite pass on hand-built graphs: where it must fire, where it must not, and its traps."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from handwritten_models import DenseMLP, HandWrittenLM, StackedHeadAttention, TopKTokenPooling
from helpers import FP32_RTOL, compile_dali, count_moe_calls, num_moe_layers, relative_max_error

import dali_compile
from dali_compile.backend import DaliCompileError, rewrite_graph
from dali_compile.tiny_models import tiny_model


def _captured_graph(fn, *args, **kwargs):
    """The dynamo graph and example inputs of fn(*args) (one graph expected)."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=capture, **kwargs)(*args)
    assert len(captured) == 1, f"expected one graph, dynamo produced {len(captured)}"
    return captured[0]


def test_handwritten_gpt_fast_style_moe_is_rewritten():
    """Not transformers: top-k routing over stacked w13/w2 with the combine outside the experts module."""
    torch.manual_seed(0)
    model = HandWrittenLM().eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        want = model(ids)
        compiled = compile_dali(model)
        got = compiled(ids)
        calls = count_moe_calls(compiled, ids)
    report = dali_compile.last_report()
    assert report.num_rewritten == 2 and not report.refused, str(report)
    assert calls == 2
    assert relative_max_error(got, want) <= FP32_RTOL


@pytest.mark.parametrize(
    "module, x",
    [
        # a dense gated MLP: same math as an expert, but no routing and no stacked weights
        (DenseMLP(), torch.randn(5, 16)),
        # per-head weights stacked as [heads, H, d]: stacked 3-D tensors, but no routing input
        (StackedHeadAttention(), torch.randn(5, 16)),
        # a top-k that selects tokens, followed by a stacked-table lookup: top-k, but not routing
        (TopKTokenPooling(), torch.randn(7, 16)),
    ],
    ids=["dense_mlp", "attention", "topk_not_routing"],
)
def test_pass_does_not_fire(module, x):
    module.eval()
    with torch.no_grad():
        want = module(x)
        got = compile_dali(module)(x)
    report = dali_compile.last_report()
    assert report.num_rewritten == 0, str(report)
    assert not report.refused, f"a non-MoE module must not even be reported as refused:\n{report}"
    assert relative_max_error(got, want) <= FP32_RTOL


def test_deepseek_inplace_router_scatter_survives():
    """DeepSeek's group-limited router writes its mask with scatter_ and never reads the result by name:
    a graph-wide dead-code elimination deletes it and routing silently breaks. The pass must keep it."""
    model = tiny_model("deepseek_v3")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        gm, example_inputs = _captured_graph(model, ids)

        def scatters(g):
            return sum(1 for n in g.graph.nodes if "scatter_" in str(n.target))

        before = scatters(gm)
        rewritten, ctx = rewrite_graph(gm, example_inputs, dali_compile.DaliConfig(inductor=False))
        assert before == num_moe_layers(model) and scatters(rewritten) == before
        assert ctx.report.num_rewritten == num_moe_layers(model)
        outputs = rewritten(*example_inputs)  # dynamo returns the cache tensors first, logits last
        assert relative_max_error(outputs[-1], model(ids).logits) <= FP32_RTOL


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_dynamic_shapes_share_symints_across_layers(family):
    """dynamic=True: size arithmetic (s0 * K, ...) is shared across layers; rewriting one layer must not
    break the next, and one graph must serve several sequence lengths."""
    model = tiny_model(family)
    compiled = compile_dali(model, dynamic=True)
    with torch.no_grad():
        for length in (3, 6, 9):
            ids = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(length))
            assert relative_max_error(compiled(ids).logits, model(ids).logits) <= FP32_RTOL
    reports = dali_compile.reports()
    assert len(reports) == 1, "one dynamic graph should serve every length"
    assert reports[0].num_rewritten == num_moe_layers(model)


@pytest.fixture
def fresh_graph_break_warning(monkeypatch):
    """The graph-break warning is once per process; each test that checks it starts unwarned."""
    import dali_compile.backend

    monkeypatch.setattr(dali_compile.backend, "_warned_graph_break", False)


def test_eager_experts_warn_once_and_stay_correct(fresh_graph_break_warning):
    """transformers' 'eager' experts break dynamo's graph at nonzero: warn with the fix, change nothing."""
    model = tiny_model("mixtral", experts_implementation="eager")
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(UserWarning, match="set_experts_implementation"):
            got = compile_dali(model)(ids).logits
    assert sum(r.num_rewritten for r in dali_compile.reports()) == 0
    assert any(r.refused for r in dali_compile.reports())
    assert relative_max_error(got, want) <= FP32_RTOL


def test_replaced_expert_weights_are_used_not_stale_ones():
    """Swap a layer's expert Parameter after compiling: the compiled model must use the new weights."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 96, (1, 5))
    compiled = compile_dali(model)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        compiled(ids)
        experts.gate_up_proj = torch.nn.Parameter(torch.randn_like(experts.gate_up_proj))
        want = model(ids).logits
        got = compiled(ids).logits
    assert relative_max_error(got, want) <= FP32_RTOL


def test_hidden_dtype_differing_from_expert_weights_is_refused_not_broken():
    """Under autocast-like mixing (fp32 activations, bf16 experts) the region is left as it was, with a reason,
    instead of being rewritten into an op call that would fail at run time."""
    torch.manual_seed(0)
    from handwritten_models import HandWrittenMoE

    module = HandWrittenMoE(E=4, K=2, H=8, I=6).eval()
    module.experts.to(torch.bfloat16)
    original = module.experts.forward
    module.experts.forward = lambda x, ids: original(x.to(torch.bfloat16), ids).float()
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = module(x)
        got = compile_dali(module)(x)
    report = dali_compile.last_report()
    assert report.num_rewritten == 0
    assert any("bfloat16" in r.reason for r in report.refused), str(report)
    assert relative_max_error(got, want) <= FP32_RTOL


def test_options_are_validated_by_name():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match="unknown option 'inductr'"):
        torch.compile(model, backend="dali", options={"inductr": False})(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="option 'inductor' must be bool"):
        torch.compile(model, backend="dali", options={"inductor": "no"})(torch.randn(2, 4))


def test_cpu_threads_option_sizes_the_runtime_pool():
    from dali_compile.runtime import cpu_extension

    if not cpu_extension.cpu_extension_available():
        pytest.skip("the C++ CPU runtime is not built here")
    with pytest.raises(Exception, match="'cpu_threads' must be >= 0"):
        torch.compile(torch.nn.Linear(4, 4), backend="dali", options={"cpu_threads": -1})(torch.randn(2, 4))
    torch._dynamo.reset()
    before = cpu_extension.get_num_threads()
    try:
        model = tiny_model("qwen3_moe")
        ids = torch.randint(0, 96, (1, 4))
        with torch.no_grad():
            want = model(ids).logits
            got = torch.compile(model, backend="dali", options={"inductor": False, "cpu_threads": 1})(ids).logits
        assert cpu_extension.get_num_threads() == 1
        assert relative_max_error(got, want) <= FP32_RTOL
    finally:
        cpu_extension.set_num_threads(before)


def test_strict_mode_raises_on_a_refused_region(fresh_graph_break_warning):
    model = tiny_model("mixtral", experts_implementation="eager")
    with pytest.raises(Exception, match="strict"), pytest.warns(UserWarning):
        torch.compile(model, backend="dali", options={"inductor": False, "strict": True})(
            torch.randint(0, 96, (1, 4))
        )
    assert isinstance(DaliCompileError("x"), RuntimeError)


def test_rewrite_option_off_reports_but_keeps_graph():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 96, (1, 4))
    with torch.no_grad():
        compiled = torch.compile(model, backend="dali", options={"inductor": False, "rewrite": False})
        assert count_moe_calls(compiled, ids) == 0
    assert dali_compile.last_report().num_rewritten == 0


@pytest.mark.skipif(not torch.__version__.startswith("2.13"), reason="dynamo's node names are pinned for torch 2.13")
def test_rewritten_graph_snapshot():
    torch.manual_seed(0)
    from handwritten_models import HandWrittenMoE

    module = HandWrittenMoE(E=4, K=2, H=8, I=6).eval()
    with torch.no_grad():
        gm, example_inputs = _captured_graph(module, torch.randn(3, 8))
        rewritten, _ = rewrite_graph(gm, example_inputs, dali_compile.DaliConfig(inductor=False))
    code = "\n".join(line.rstrip() for line in rewritten.code.strip().splitlines() if line.strip())
    code = code.replace(f"layer={dali_compile.last_report().rewritten[0].layer}", "layer=<handle>")
    code = code.replace(f", {dali_compile.last_report().rewritten[0].layer})", ", <handle>)")
    assert_expected_inline(code, """\
def forward(self, L_x_ : torch.Tensor, L_self_modules_gate_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_experts_parameters_w13_ : torch.nn.parameter.Parameter, L_self_modules_experts_parameters_w2_ : torch.nn.parameter.Parameter):
    l_x_ = L_x_
    l_self_modules_gate_parameters_weight_ = L_self_modules_gate_parameters_weight_
    l_self_modules_experts_parameters_w13_ = L_self_modules_experts_parameters_w13_
    l_self_modules_experts_parameters_w2_ = L_self_modules_experts_parameters_w2_
    flat = l_x_.reshape(-1, 8)
    cpu_linear_default = torch.ops.dali.cpu_linear.default(flat, l_self_modules_gate_parameters_weight_, None);  l_self_modules_gate_parameters_weight_ = None
    scores = torch.nn.functional.softmax(cpu_linear_default, dim = -1);  cpu_linear_default = None
    topk = torch.topk(scores, 2, dim = -1);  scores = None
    weights = topk[0]
    ids = topk[1];  topk = None
    sum_1 = weights.sum(dim = -1, keepdim = True)
    weights_1 = weights / sum_1;  weights = sum_1 = None
    moe_hybrid_default = torch.ops.dali.moe_hybrid.default(flat, ids, weights_1, <handle>);  flat = ids = weights_1 = None
    view_as = moe_hybrid_default.view_as(l_x_);  moe_hybrid_default = l_x_ = None
    return (view_as,)""")
