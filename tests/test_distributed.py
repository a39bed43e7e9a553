"""The distributed mode (dali_compile/distributed/): multi-process runs with gloo over 127.0.0.1, each
checking its greedy tokens against the same model generating alone, plus faults and bad input.

Multi-process runs start the real command (`python -m dali_compile.distributed`) either under torchrun or,
for faults (torchrun ends the whole job when a rank dies), as ranks started directly with the environment
torchrun would give them.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dali_compile.distributed import serve
from dali_compile.distributed.messages import Kind, Message, _pack, _unpack
from dali_compile.distributed.shadow import Shadow
from dali_compile.distributed.topology import Topology
from dali_compile.experts_interface import experts_modules, spec_of_module
from dali_compile.hf_compat import cache_keyword
from dali_compile.runtime.accelerator import make_accelerator
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.hybrid import HybridRuntime
from dali_compile.runtime.layer_spec import Activation, ExpertLayout, LayerSpec
from dali_compile.runtime.policies import make_policy
from dali_compile.runtime.prefetch import routing_of
from dali_compile.tiny_models import tiny_model

COMMAND = [sys.executable, "-m", "dali_compile.distributed", "--max-new-tokens", "6", "--prompt-length", "8",
           "--layers", "4", "--hidden", "48"]
LAUNCH_TIMEOUT_S = 300


# -- one process --------------------------------------------------------------------------------------------------

def test_topology_assigns_layers_round_robin_and_experts_by_id():
    topology = Topology(world_size=6, groups=2, shadow=True)  # main 0, shadow 1, workers 2..5
    assert topology.worker_ranks == [2, 3, 4, 5]
    assert topology.workers_of_group(0) == [2, 4] and topology.workers_of_group(1) == [3, 5]
    assert topology.layers_of_worker(3, 5) == [1, 3]
    assert topology.experts_of_worker(4, 2, 8) == [1, 3, 5, 7]
    assert topology.experts_of_worker(4, 1, 8) == []
    assert [topology.owner(0, e) for e in range(4)] == [2, 4, 2, 4]
    assert [topology.role(r) for r in range(6)] == ["main", "shadow", "worker", "worker", "worker", "worker"]


@pytest.mark.parametrize("world_size, groups, shadow, message", [
    (3, 3, False, "3 groups but 2 workers"),
    (2, 1, True, "no worker"),
    (1, 1, False, "no worker"),
    (4, 0, False, "groups must be an int >= 1"),
])
def test_topology_refuses_impossible_layouts(world_size, groups, shadow, message):
    with pytest.raises(ValueError, match=message):
        Topology(world_size, groups, shadow)


def test_messages_carry_tensors_of_every_dtype_and_shape():
    tensors = [torch.randn(3, 5).bfloat16(), torch.arange(6).reshape(2, 3), torch.tensor([True, False]),
               torch.zeros(0, 4), torch.tensor(2.5), torch.randn(1, 2, 3, 4, dtype=torch.float16)]
    back = _unpack(_pack(tensors), len(tensors))
    for a, b in zip(tensors, back, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


class _KeptShadow(Shadow):
    """The shadow rank's code with its predictions kept instead of sent: (step, layer, speculative, ids)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def _send_prediction(self, layer, ids):
        self.sent.append((self.step, layer, self._gathered is not None, ids))


def _routed_ids(model, routers, cache, input_ids) -> dict[int, torch.Tensor]:
    """Each router's top-k ids when `model` runs `input_ids` on `cache`."""
    ids = {}
    hooks = [router.register_forward_hook(lambda m, a, out, layer=layer: ids.__setitem__(layer, routing_of(out)[0]))
             for layer, router in enumerate(routers)]
    try:
        model(input_ids=input_ids, **{cache_keyword(model): cache}, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return ids


@pytest.mark.parametrize("candidates", [1, 2, 3])
@torch.no_grad()
def test_the_shadow_speculates_from_its_most_likely_tokens_and_predicts_their_union(candidates):
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", num_hidden_layers=3).eval()
    shadow = _KeptShadow(model, Topology(world_size=3, groups=1, shadow=True), realign=True, timeout_s=1.0,
                         idle_timeout_s=1.0, lookahead=2, candidates=candidates)
    hooks = [router.register_forward_hook(shadow._routed(layer)) for layer, router in enumerate(shadow.routers)]
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    try:
        shadow._run(Message(Kind.TOKENS, 1, 0, [prompt], arg=0))
    finally:
        for hook in hooks:
            hook.remove()
    # the reference: the model alone on the prompt, then each of its most likely next tokens on a copy of its cache
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1]
    tokens = logits.topk(candidates, dim=-1).indices[0]
    assert int(tokens[0]) == int(logits.argmax(-1))
    assert [int(t) for t in shadow.own_candidates] == tokens.tolist()
    runs = [_routed_ids(model, shadow.routers, copy.deepcopy(cache), token.view(1, 1)) for token in tokens]
    ordinary = [(step, layer) for step, layer, speculative, _ in shadow.sent if not speculative]
    speculative = {layer: ids for step, layer, is_speculative, ids in shadow.sent if is_speculative and step == 2}
    assert ordinary == [(1, 0), (1, 1), (1, 2)]  # the step itself, then the next step's first 2 layers
    assert sorted(speculative) == [0, 1] and len(shadow.sent) == 5
    for layer in (0, 1):
        assert torch.equal(speculative[layer], torch.cat([run[layer] for run in runs], dim=-1))
    assert shadow.cache.get_seq_length() == prompt.shape[1]  # every speculative run was cut back
    assert shadow.counters["speculative_steps"] == 1


@torch.no_grad()
def test_a_speculative_run_that_fails_leaves_the_cache_as_it_was():
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", num_hidden_layers=3).eval()
    shadow = _KeptShadow(model, Topology(world_size=3, groups=1, shadow=True), realign=True, timeout_s=1.0,
                         idle_timeout_s=1.0, lookahead=2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    calls = []

    def fail_when_speculating(module, args, output):
        calls.append(shadow._gathered is not None)
        if shadow._gathered is not None:
            raise RuntimeError("speculative run failed")

    hook = shadow.routers[1].register_forward_hook(fail_when_speculating)
    try:
        with pytest.raises(RuntimeError, match="speculative run failed"):
            shadow._run(Message(Kind.TOKENS, 1, 0, [prompt], arg=0))
    finally:
        hook.remove()
    assert calls == [False, True]  # the step itself ran, then the first speculative run failed in layer 1
    assert shadow.cache.get_seq_length() == prompt.shape[1]


def test_hybrid_layer_contributions_sum_to_its_forward():
    torch.manual_seed(0)
    up, down = torch.randn(6, 16, 8), torch.randn(6, 8, 8)
    spec = LayerSpec(ExpertLayout(gated=True, activation=Activation("silu")), up, down, name="layer")
    runtime = HybridRuntime(make_accelerator("emulated", 2 * 10**5), [("layer", spec)], make_policy("on_demand"),
                            None, 2)
    hidden, ids, weights = torch.randn(5, 8), torch.randint(0, 6, (5, 2)), torch.rand(5, 2)
    parts = runtime.layers[0].contributions(hidden, ids, weights)
    assert parts.shape == (5, 2, 8) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(dim=1), runtime.layers[0].forward(hidden, ids, weights), rtol=0, atol=0)
    runtime.close()


def _without_rendezvous(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_serve_without_a_rendezvous_says_how_to_launch(monkeypatch):
    _without_rendezvous(monkeypatch)
    with pytest.raises(RuntimeError, match="torchrun"):
        serve(tiny_model("mixtral"))


@pytest.mark.parametrize("options, message", [
    (dict(predictor="oracle"), "predictor must be one of"),
    (dict(worker_device="tpu"), "worker_device must be one of"),
    (dict(shadow_precision="fp8"), "shadow precision must be one of|shadow_precision must be one of"),
    (dict(timeout_s=0), "timeout_s must be above 0"),
    (dict(speculative_tokens=0), "speculative candidates must be an int >= 1"),
    (dict(groups=3, predictor="none"), "3 groups but 2 workers"),
    (dict(workers=3, predictor="none"), "workers=3 but 3 processes give 2"),
    (dict(groups=2, predictor="none", world=6), "2 groups but the model has 1 MoE layers"),
])
def test_serve_refuses_bad_options_before_joining(monkeypatch, options, message):
    _without_rendezvous(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", str(options.pop("world", 3)))
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(ValueError, match=message):
        serve(model, **options)


def test_serve_refuses_a_model_without_moe_layers(monkeypatch):
    _without_rendezvous(monkeypatch)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1"), ("RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="no fused experts module"):
        serve(torch.nn.Sequential(torch.nn.Linear(4, 4)), predictor="none")


# -- several processes ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(processes: int, arguments: list[str], tmp_path) -> dict:
    result_file = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *COMMAND[1:], *arguments, "--check", "--json", str(result_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=_environment())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(result_file.read_text())


def _check_tokens(result: dict) -> dict:
    assert result["reference"] is not None and len(result["tokens"]) == 6
    assert result["tokens"] == result["reference"]
    return result["stats"]


@pytest.mark.parametrize("processes, arguments", [
    # a checkpoint directory the test writes (AutoModelForCausalLM.from_pretrained on every rank)
    (2, ["--model", "CHECKPOINT", "--groups", "1", "--predictor", "none", "--compile"]),
    (4, ["--model", "tiny:qwen3_moe", "--groups", "2", "--predictor", "shadow", "--lookahead", "2",
         "--worker-device", "emulated-async"]),
    # 3 workers in 2 groups (2 + 1: experts split by id in group 0); a one-slot budget streams in waves
    (4, ["--model", "tiny:olmoe", "--groups", "2", "--predictor", "wrong", "--worker-memory", "20KiB"]),
    (5, ["--model", "tiny:qwen2_moe", "--groups", "1", "--predictor", "residual", "--dtype", "bf16"]),
    (3, ["--model", "tiny:deepseek_v3", "--predictor", "shadow", "--shadow-precision", "int8", "--no-realign",
         "--worker-device", "cpu"]),
], ids=["1worker-none-compiled-checkpoint", "shadow-2groups", "wrong-waves-3workers", "residual-4workers-bf16",
        "int8-shadow-cpu"])
def test_distributed_generation_equals_the_model_alone(processes, arguments, tmp_path):
    if "CHECKPOINT" in arguments:
        tiny_model("mixtral", num_hidden_layers=4, hidden_size=48, vocab_size=256).save_pretrained(tmp_path / "ckpt")
        arguments = [str(tmp_path / "ckpt") if a == "CHECKPOINT" else a for a in arguments]
    stats = _check_tokens(_torchrun(processes, arguments, tmp_path))
    assert stats["lost_workers"] == {} and stats["local_pairs"] == 0 and stats["remote_pairs"] > 0
    workers = stats["workers"]
    assert len(workers) == processes - 1 - ("shadow" in arguments)
    groups = int(arguments[arguments.index("--groups") + 1]) if "--groups" in arguments else 1
    layers = {layer for w in workers.values() for layer in w["layers"]}
    assert layers == set(range(len(layers)))  # every MoE layer served, each by the workers of its group only
    assert all(layer % groups == (int(rank) - 1 - ("shadow" in arguments)) % groups
               for rank, w in workers.items() for layer in w["layers"])
    if "cpu" not in arguments:
        assert stats["copies"] > 0  # experts were loaded just in time
    if "wrong" in arguments:
        assert stats["recall"] == 0.0 and stats["prefetch_hits"] == 0
        model = tiny_model("olmoe", num_hidden_layers=4, hidden_size=48, vocab_size=256)
        slot = expert_bytes(spec_of_module(experts_modules(model)[0][1]))
        assert all(w["budget_bytes"] == 20 * 1024 < model.config.num_experts_per_tok * slot for w in workers.values())
    if "residual" in arguments:  # sent before the request of the layer before: always on time, deterministic
        assert stats["recall"] > 0.3 and stats["prefetch_hits"] > 0
    if "shadow" in arguments:  # the shadow runs on its own clock: what arrives in time depends on the load
        assert all(w["predictions"] > 0 for w in workers.values())
        assert stats["shadow"]["steps"] == stats["steps"] and stats["shadow"]["skipped_steps"] == 0
        assert (stats["shadow"]["speculative_steps"] > 0) == ("--lookahead" in arguments)


def _start_ranks(processes: int, arguments: list[str], faults: str | None = None, per_rank=None):
    port = _free_port()
    ranks = []
    for rank in range(processes):
        env = _environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                           WORLD_SIZE=str(processes))
        if faults:
            env["DALI_DISTRIBUTED_FAULT"] = faults
        extra = (per_rank or {}).get(rank, [])
        ranks.append(subprocess.Popen([*COMMAND, *arguments, *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return ranks


def _finish(ranks, timeout_s: float = LAUNCH_TIMEOUT_S) -> list[tuple[int | None, str, str]]:
    deadline, results = time.monotonic() + timeout_s, []
    for process in ranks:
        try:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            results.append((None, out, err))
            continue
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("how, predictor", [("kill", "next_gate"), ("stop", "residual")])
def test_a_worker_lost_mid_generation_falls_back_to_the_main_rank(how, predictor, tmp_path):
    """Rank 2 (group 1's only worker) is killed, or stopped (alive, silent), at step 3; the main rank notices
    (closed connection / a 4 s timeout), computes its experts itself and still generates the same tokens."""
    result_file = tmp_path / "result.json"
    ranks = _start_ranks(4, ["--model", "tiny:qwen3_moe", "--groups", "2", "--predictor", predictor,
                             "--timeout", "4", "--check", "--json", str(result_file)], faults=f"2:3:{how}")
    started = time.monotonic()
    try:
        main_code, out, err = _finish(ranks[:1])[0]
        assert main_code == 0, out[-3000:] + err[-5000:]
        elapsed = time.monotonic() - started
        stats = _check_tokens(json.loads(result_file.read_text()))
        assert "2" in stats["lost_workers"] and stats["local_pairs"] > 0
        assert stats["lost_workers"]["2"]["step"] >= 3
        if how == "stop":
            assert "within 4 s" in stats["lost_workers"]["2"]["reason"]
        assert elapsed < LAUNCH_TIMEOUT_S
        others = _finish([ranks[1], ranks[3]], timeout_s=60)  # the healthy workers stop when main closes
        assert [code for code, _, _ in others] == [0, 0], [e[-2000:] for _, _, e in others]
    finally:
        for process in ranks:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    assert ranks[2].returncode == -signal.SIGKILL


def test_a_worker_with_other_weights_is_refused_and_every_rank_stops():
    ranks = _start_ranks(3, ["--model", "tiny:mixtral", "--predictor", "none"], per_rank={2: ["--seed", "1"]})
    results = _finish(ranks, timeout_s=180)
    assert all(code is not None for code, _, _ in results), "a rank hung"
    main_code, _, main_err = results[0]
    assert main_code != 0 and "worker rank 2 holds other expert weights than the main rank" in main_err


def test_a_missing_rank_is_a_clear_rendezvous_error():
    """Rank 0 of a world of three whose other ranks never come."""
    env = _environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="3")
    done = subprocess.run([*COMMAND, "--model", "tiny:mixtral", "--rendezvous-timeout", "5"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "did not complete within 5 s" in done.stderr and "is every rank started" in done.stderr


def test_a_worker_keeps_only_its_share_of_its_groups_experts():
    """World of 5 without shadow: workers 1..4 in 2 groups; rank 3 is the second worker of group 0, so it owns
    the odd experts of layers 0 and 2 and nothing of layers 1 and 3; the model's own tensors are freed."""
    from dali_compile.distributed.worker import Worker

    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    originals = [spec_of_module(module) for _, module in experts_modules(model)]
    expected = [(t.detach().clone() if t is not None else None) for layer in (0, 2)
                for t in originals[layer].tensors()]
    worker = Worker(model, Topology(5, 2, False), rank=3, device="emulated", memory=None, timeout_s=5,
                    idle_timeout_s=5)
    assert worker.layer_ids == [0, 2] and (worker.stride, worker.position) == (2, 1)
    assert all(p.numel() == 0 for p in model.parameters())
    held = [t for layer in worker.runtime.layers for t in layer.spec.tensors()]
    for mine, full in zip(held, expected, strict=True):
        assert (mine is None) == (full is None)
        if mine is not None:
            assert torch.equal(mine, full[1::2])
    assert worker.runtime.accelerator.pool.budget_bytes == (1 + 2 * worker.runtime.prefetch) * expert_bytes(
        worker.runtime.layers[0].spec) and worker.runtime.prefetch == 2  # its share of a token's 4 experts
    worker.runtime.close()


def test_a_worker_reads_only_its_layers_experts_from_a_checkpoint(tmp_path):
    """load_for_rank on rank 3 of 5 (2 groups, no shadow): the checkpoint's experts of layers 0 and 2 are read,
    every other parameter stays on the meta device; the worker then holds what it holds from a built model."""
    from dali_compile.distributed import load_for_rank
    from dali_compile.distributed.worker import Worker

    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "ckpt")
    read = load_for_rank(tmp_path / "ckpt", groups=2, predictor="residual", rank=3, world_size=5)
    real = {name for name, p in read.named_parameters() if p.device.type != "meta"}
    modules = experts_modules(read)
    assert real == {f"{modules[layer][0]}.{p}" for layer in (0, 2) for p in ("gate_up_proj", "down_proj")}
    worker = Worker(read, Topology(5, 2, False), rank=3, device="emulated", memory=None, timeout_s=5,
                    idle_timeout_s=5)
    originals = [spec_of_module(module) for _, module in experts_modules(model)]
    held = [t for layer in worker.runtime.layers for t in layer.spec.tensors()]
    expected = [t for layer in (0, 2) for t in originals[layer].tensors()]
    for mine, full in zip(held, expected, strict=True):
        assert (mine is None) == (full is None)
        if mine is not None:
            assert torch.equal(mine, full[1::2])
    worker.runtime.close()
    main = load_for_rank(tmp_path / "ckpt", groups=2, predictor="residual", rank=0, world_size=5)
    assert all(p.device.type == "cpu" for p in main.parameters())  # the main rank reads the whole model


# -- the main rank's fallback logic in one process, over a loopback transport --------------------------------------

class Loopback:
    """messages.send / recv between a main rank and in-process workers: a request runs the worker at once and its
    answer waits for the main rank's receive. Ranks in `dead` raise PeerLost, as a closed connection does."""

    def __init__(self, workers):
        self.workers, self.answers, self.dead, self.sender = workers, {rank: [] for rank in workers}, set(), 0

    def send(self, message, dst, timeout_s):
        from dali_compile.distributed.messages import Kind, PeerLost

        if dst == 0:
            self.answers[self.sender].append(message)
            return
        if dst in self.dead:
            raise PeerLost(dst, "is gone")
        worker, self.sender = self.workers[dst], dst
        try:
            if message.kind == Kind.REQUEST:
                worker._request(message)
            elif message.kind == Kind.PREDICTION:
                worker._predicted(message)
            elif message.kind == Kind.STOP:
                self.send(Message(Kind.STATS, tensors=[torch.tensor(list(json.dumps(worker.stats()).encode()),
                                                                    dtype=torch.uint8)]), 0, timeout_s)
        finally:
            self.sender = 0

    def recv(self, src, timeout_s):
        from dali_compile.distributed.messages import PeerLost

        if src in self.dead or not self.answers[src]:
            raise PeerLost(src, f"sent nothing within {timeout_s:g} s")
        return self.answers[src].pop(0)


@pytest.fixture
def loopback_session(monkeypatch):
    """A main rank and three workers in two groups (2 + 1), tiny Qwen3-MoE of 4 layers, over `Loopback`."""
    from dali_compile.distributed import main_rank, messages
    from dali_compile.distributed.worker import Worker

    topology = Topology(4, 2, False)
    workers = {rank: Worker(tiny_model("qwen3_moe", num_hidden_layers=4), topology, rank, "emulated", None, 5, 5)
               for rank in topology.worker_ranks}
    transport = Loopback(workers)
    monkeypatch.setattr(messages, "send", transport.send)
    monkeypatch.setattr(messages, "recv", transport.recv)
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
    session = main_rank.MainSession(model, topology, "residual", timeout_s=5)
    session._attach()
    yield session, transport, model, prompt, want
    session.close()


def _generate(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, do_sample=False)


def test_in_process_distributed_generation_equals_the_model_alone(loopback_session):
    session, _, model, prompt, want = loopback_session
    assert torch.equal(_generate(model, prompt), want)
    assert session.counters["remote_pairs"] > 0 and session.counters["local_pairs"] == 0


@pytest.mark.parametrize("fault", ["dead-before", "dead-midway", "error-answer"])
def test_a_lost_workers_experts_run_on_the_main_rank(loopback_session, fault, monkeypatch):
    """Rank 1 (group 0, shared with rank 3) is gone from the start, goes midway, or answers an ERROR: its
    experts run on the main rank from then on and the tokens stay equal."""
    from dali_compile.distributed.messages import Kind

    session, transport, model, prompt, want = loopback_session
    worker = transport.workers[1]
    if fault == "dead-before":
        transport.dead.add(1)
    elif fault == "dead-midway":
        original = worker._request

        def request_then_die(message):
            original(message)
            if message.step >= 3:
                transport.dead.add(1)
        monkeypatch.setattr(worker, "_request", request_then_die)
    else:
        monkeypatch.setattr(worker, "_request", lambda message: transport.send(
            Message(Kind.ERROR, tensors=[torch.tensor(list(b"worker rank 1 failed"), dtype=torch.uint8)]), 0, 5))
    assert torch.equal(_generate(model, prompt), want)
    assert 1 not in session.alive and session.counters["local_pairs"] > 0
    assert "1" not in session.lost and 1 in session.lost


def test_a_stale_answer_is_skipped(loopback_session):
    """An answer to a request whose step was interrupted arrives before the next one's: skipped, not fatal."""
    from dali_compile.distributed.messages import Kind

    session, transport, model, prompt, want = loopback_session
    transport.answers[2].append(Message(Kind.REPLY, step=-5, layer=1, tensors=[torch.zeros(1, 32)]))
    assert torch.equal(_generate(model, prompt), want)
    assert session.counters["stale_replies"] == 1 and session.alive == {1, 2, 3}
