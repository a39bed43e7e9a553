"""The routing recorder: what it writes is the model's own routing, in the shared traces' npz layout.

The routing is captured independently of dali with forward hooks on the routers (which the offloaded model
still runs itself: only the experts go through the runtime), and compared row by row with the recording.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dali_compile
from dali_compile.offload import runtime_of
from dali_compile.runtime.prefetch import find_router, routed_ids
from dali_compile.runtime.recorder import RoutingRecorder, expert_id_dtype, layer_number, record_routing
from dali_compile.tiny_models import tiny_model

# Each test runs on both modes of the emulated accelerator (synchronous, asynchronous with random delays).
pytestmark = pytest.mark.usefixtures("emulated_mode")

PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))  # B=2 sequences, 6 tokens
NEW_TOKENS = 3


@pytest.fixture
def offloaded():
    """Tiny Qwen3-MoE (16 experts, top-4, 2 MoE layers) offloaded all-CPU on the emulated device."""
    model = dali_compile.offload(tiny_model("qwen3_moe"), device="emulated", expert_memory="1MiB", policy="all_cpu")
    yield model
    dali_compile.release(model)


def routers_of(model) -> list[torch.nn.Module]:
    E, H = model.config.num_experts, model.config.hidden_size
    return [find_router(layer.mlp, E, H) for layer in model.model.layers]


def router_routing(model, run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [T, L, K], weights [T, L, K], router inputs [T, L, H]) as the routers themselves produced them
    while `run()` ran, each forward call's tokens in order."""
    seen = {i: [] for i in range(model.config.num_hidden_layers)}

    def hook(index):
        def capture(module, args, out):
            _, weights, ids = out
            seen[index].append((ids, weights, args[0].reshape(ids.shape[0], -1)))
        return capture

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers_of(model))]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [[torch.cat(part) for part in zip(*seen[i], strict=True)] for i in sorted(seen)]
    return tuple(torch.stack([layer[j] for layer in per_layer], dim=1) for j in range(3))


def test_records_the_models_own_routing_over_prefill_and_decode(offloaded):
    """A forward of a [2, 6] batch and a greedy generate of 3 tokens: every row of the recording is the routing
    the routers chose for that token, its gate input, and its token id; steps append in order."""
    model = offloaded

    def run():
        model(PROMPT)
        model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)

    with record_routing(model, gate_dtype=torch.float32) as recording:
        want_ids, want_weights, want_inputs = router_routing(model, run)
    got = recording.arrays()

    B, S, L, K = *PROMPT.shape, 2, 4
    # forward (12 rows), generate's prefill (12 rows), then one row per sequence per decode step; generate's
    # last token needs no forward
    T = 2 * B * S + B * (NEW_TOKENS - 1)
    assert got["stream_expert_ids"].shape == (T, L, K) and got["stream_expert_ids"].dtype == np.int8
    assert got["stream_scores"].shape == (T, L, K) and got["stream_scores"].dtype == np.float32
    assert got["stream_gate_inputs"].shape == (T, L, model.config.hidden_size)
    assert got["step_tokens"].tolist() == [B * S, B * S] + [B] * (NEW_TOKENS - 1)
    assert torch.equal(torch.from_numpy(got["stream_expert_ids"]).long(), want_ids)
    assert torch.equal(torch.from_numpy(got["stream_scores"]), want_weights.float())
    assert torch.equal(torch.from_numpy(got["stream_gate_inputs"]), want_inputs.float())
    assert got["stream_token_ids"][: B * S].tolist() == PROMPT.reshape(-1).tolist()
    assert (got["stream_token_ids"] >= 0).all()
    assert int(got["num_experts"]) == 16 and int(got["top_k"]) == K
    assert got["moe_layer_numbers"].tolist() == [0, 1]


def test_recorded_gate_inputs_reproduce_the_routing(offloaded):
    """The routers applied to the recorded (fp32) gate inputs give back the recorded expert ids: the gate
    inputs are what a residual predictor needs to be evaluated offline."""
    model = offloaded
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with record_routing(model, gate_dtype=torch.float32) as recording, torch.no_grad():
        model(ids)
    got = recording.arrays()
    for layer, router in enumerate(routers_of(model)):
        with torch.no_grad():
            again = routed_ids(router, torch.from_numpy(got["stream_gate_inputs"][:, layer]))
        assert torch.equal(again, torch.from_numpy(got["stream_expert_ids"][:, layer]).long())


def test_round_trip_through_the_file(offloaded, tmp_path):
    """save() writes exactly arrays() (fp16 gate inputs by default), no pickled objects, '.npz' appended."""
    model = offloaded
    with record_routing(model) as recording, torch.no_grad():
        model(PROMPT)
    path = recording.save(tmp_path / "routing")
    assert path == tmp_path / "routing.npz"
    want = recording.arrays()
    assert want["stream_gate_inputs"].dtype == np.float16
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(want)
        for name in want:
            assert data[name].dtype == want[name].dtype, name
            assert np.array_equal(data[name], want[name]), name
        assert data["moe_layer_names"].tolist() == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_without_gate_inputs(offloaded):
    model = offloaded
    with record_routing(model, gate_inputs=False) as recording, torch.no_grad():
        model(PROMPT)
    assert "stream_gate_inputs" not in recording.arrays()
    assert recording.num_tokens == PROMPT.numel() and recording.num_steps == 1


def test_detaches_on_exit_and_records_only_inside(offloaded):
    model = offloaded
    runtime = runtime_of(model)
    with record_routing(model) as recording, torch.no_grad():
        model(PROMPT)
    assert runtime.recorder is None
    with torch.no_grad():
        model(PROMPT)  # not recorded
    assert recording.num_tokens == PROMPT.numel()
    with record_routing(model) as again:  # a model can be recorded again once the first recorder is gone
        assert runtime.recorder is again


def test_clear_errors(offloaded):
    """Not offloaded, two recorders at once, nothing recorded, a forward call stopped half way."""
    with pytest.raises(ValueError, match="not offloaded.*dali_compile.offload"):
        record_routing(tiny_model("qwen3_moe"))
    model = offloaded
    with record_routing(model) as recording:
        with pytest.raises(RuntimeError, match="already has a recorder"):
            record_routing(model)
        with pytest.raises(ValueError, match="nothing recorded"):
            recording.save("unused.npz")
        H = model.config.hidden_size
        recording(0, torch.zeros(3, H), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))
        with pytest.raises(ValueError, match="stopped after 1 of 2 MoE layers"):
            recording.arrays()
        with pytest.raises(RuntimeError, match="layer 0 ran while layer 1"):
            recording(0, torch.zeros(3, H), torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))
        with pytest.raises(ValueError, match="layer 1 got 2 tokens"):
            recording(1, torch.zeros(2, H), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))
        recording.clear()
        with torch.no_grad():
            model(PROMPT)  # recording works again after clear()
        assert recording.num_tokens == PROMPT.numel()


@pytest.mark.parametrize(("num_experts", "dtype"), [
    (8, np.int8),       # Mixtral
    (127, np.int8),     # the largest E whose ids all fit int8 (the shared traces' type)
    (128, np.int16),    # Qwen3-30B-A3B: by E as the issue states (int8 keeps one spare value above the ids)
    (256, np.int16),    # DeepSeek-V3
])
def test_expert_id_dtype(num_experts, dtype):
    assert expert_id_dtype(num_experts) is dtype


def test_layer_number_and_bad_options():
    assert layer_number("model.layers.12.mlp.experts") == 12
    assert layer_number("experts") == -1
    with pytest.raises(ValueError, match="gate_dtype"):
        RoutingRecorder(["a"], 8, 4, gate_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no MoE layer"):
        RoutingRecorder([], 8, 4)
