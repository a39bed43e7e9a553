"""`dali_compile.load`: checkpoints the tests write themselves, loaded as the user would.

Every loaded model is compared with what the user would otherwise write by hand: `from_pretrained` (+
`offload` on the emulated accelerator, + `quantize`), and with eager transformers on the written model.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FP32_RTOL, assert_close_to_eager, relative_max_error

import dali_compile
from dali_compile.experts_interface import experts_implementations, experts_modules, spec_of_module
from dali_compile.memory_budget import ProbeMeasurement, auto_expert_budget
from dali_compile.offload import runtime_of
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.planner import CostModel
from dali_compile.tiny_models import MINIMUM_FAMILIES, tiny_model, write_tiny_checkpoint

COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
PROMPT = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHARDS = {"one": None, "several": "20KB"}  # the tiny models are 200-450 KB


@functools.cache
def checkpoint(root: str, family: str, dtype: str, shards: str, form: str) -> Path:
    """A checkpoint written once per session (module-level cache: the directory outlives the test)."""
    directory = Path(root) / f"{family}-{dtype}-{shards}-{form}"
    write_tiny_checkpoint(directory, family, DTYPES[dtype], max_shard_size=SHARDS[shards], fused=form == "fused")
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("checkpoints"))


def reference(family: str, dtype: str) -> torch.nn.Module:
    """The written model itself (write_tiny_checkpoint's seed), in eager transformers."""
    return tiny_model(family, DTYPES[dtype])


def from_pretrained(directory: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype]).eval()


def half_the_experts(model) -> int:
    modules = experts_modules(model)
    slot = expert_bytes(spec_of_module(modules[0][1]))
    return slot * (sum(m.num_experts for _, m in modules) // 2 + model.config.num_experts_per_tok)


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    device = runtime_of(model).accelerator.device if getattr(model, "_dali_runtime", None) else torch.device("cpu")
    return model(PROMPT.to(device)).logits.cpu()


# ------------------------------------------------------------------------------------------- equal to by hand


@pytest.mark.parametrize("form", ["legacy", "fused"])
@pytest.mark.parametrize("shards", sorted(SHARDS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("family", MINIMUM_FAMILIES)
def test_load_equals_from_pretrained_and_offload(root, family, dtype, shards, form):
    directory = checkpoint(root, family, dtype, shards, form)
    by_hand = from_pretrained(directory, dtype)
    budget = half_the_experts(by_hand)
    dali_compile.offload(by_hand, device="emulated", expert_memory=budget, cost_model=COST)
    loaded = dali_compile.load(directory, device="emulated", expert_memory=budget, cost_model=COST, progress=False)
    try:
        got, want = logits_of(loaded), logits_of(by_hand)
        assert torch.equal(got, want), relative_max_error(got, want)  # the same weights through the same runtime
        summary = dali_compile.load_summary(loaded)
        assert summary.expert_memory == budget and summary.dtype == DTYPES[dtype]
        assert runtime_of(loaded).accelerator.pool.budget_bytes == budget
    finally:
        dali_compile.release(loaded)
        dali_compile.release(by_hand)
    with torch.no_grad():  # transformers on its own: the same checkpoint, eager, and its weights run in fp32
        eager = from_pretrained(directory, dtype)(PROMPT).logits
        truth = from_pretrained(directory, "fp32")(PROMPT).logits if dtype == "bf16" else None
    assert_close_to_eager(got.to(DTYPES[dtype]), eager, truth)


@pytest.mark.parametrize("family", MINIMUM_FAMILIES)
def test_load_on_the_cpu_runs_every_expert_in_the_cpu_runtime(root, family):
    loaded = dali_compile.load(checkpoint(root, family, "fp32", "several", "legacy"), device="cpu", progress=False)
    assert {implementation for _, implementation in experts_implementations(loaded)} == {"dali"}
    eager = reference(family, "fp32")
    assert relative_max_error(logits_of(loaded), eager(PROMPT).logits.detach()) <= FP32_RTOL
    summary = dali_compile.load_summary(loaded)
    assert summary.expert_memory is None and summary.device_bytes == 0
    tensors = {id(t): t for t in list(loaded.parameters()) + list(loaded.buffers())}.values()
    assert summary.host_bytes == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_generate_after_load_gives_eager_tokens(root, device):
    loaded = dali_compile.load(checkpoint(root, "qwen3_moe", "fp32", "several", "legacy"), device=device,
                               expert_memory="auto" if device == "cpu" else "64KiB", cost_model=COST, progress=False)
    eager = reference("qwen3_moe", "fp32")
    with torch.no_grad():
        want = eager.generate(PROMPT, max_new_tokens=5, do_sample=False)
        got = loaded.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert torch.equal(got.cpu(), want)
    if device == "emulated":
        dali_compile.release(loaded)


QUANTIZE = {
    "experts int4, dense int8": dict(experts="int4", dense="int8"),
    "experts int8": dict(experts="int8"),
    "dense int4": dict(dense="int4"),
}


@pytest.mark.parametrize("form", ["legacy", "fused"])
@pytest.mark.parametrize("how", sorted(QUANTIZE))
@pytest.mark.parametrize("family", MINIMUM_FAMILIES)
def test_quantize_on_load_equals_quantize_after_load(root, family, how, form):
    directory = checkpoint(root, family, "bf16", "several", form)
    options = QUANTIZE[how]
    loaded = dali_compile.load(directory, device="cpu", quantize=options, group_size=8, progress=False)
    after = dali_compile.quantize(from_pretrained(directory, "bf16"), **options, group_size=8)
    after.set_experts_implementation("dali")  # as load(device="cpu") runs every model's experts
    got, want = loaded.state_dict(), after.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert torch.equal(logits_of(loaded), logits_of(after))
    if options.get("experts"):
        assert all(m.is_transposed is False for _, m in experts_modules(loaded))
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain model, as after quantize()


# ------------------------------------------------------------------------------------------------- the budget


def test_auto_budget_is_the_stated_arithmetic_rounded_to_slots():
    GiB, MiB = 2**30, 2**20
    probe = ProbeMeasurement(tokens=16, kv_bytes_per_token=96 * 1024, activation_bytes=16 * 64 * 1024)
    budget = auto_expert_budget(free=20 * GiB, total=24 * GiB, probe=probe, context_length=4096,
                                slot_bytes=18 * MiB, total_experts=6144, where="test")
    room = 20 * GiB - 4096 * 96 * 1024 - 4096 * 64 * 1024 - int(0.05 * 24 * GiB)  # KV, activations, 5% margin
    assert budget.slots == room // (18 * MiB) and budget.budget == budget.slots * 18 * MiB
    assert "KV cache" in budget.describe() and "4096 tokens" in budget.describe()
    assert auto_expert_budget(10**12, 10**12, probe, 4096, 18 * MiB, 64, "test").slots == 64  # at most every expert
    small = auto_expert_budget(GiB, GiB, ProbeMeasurement(16, 0, 0), 1, MiB, 10**6, "test")
    assert small.margin == GiB // 10  # a small device keeps a tenth (at most 256 MiB)


def test_auto_budget_on_the_emulated_device_measures_the_kv_cache(root, monkeypatch):
    from dali_compile.loading import measure_auto_budget

    directory = checkpoint(root, "qwen3_moe", "fp32", "one", "fused")
    config = json.loads((directory / "config.json").read_text())
    kv_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 4
    model = from_pretrained(directory, "fp32")
    modules = experts_modules(model)
    slot = expert_bytes(spec_of_module(modules[0][1]))
    expert_total = sum(p.numel() * p.element_size() for _, m in modules for p in m.parameters())
    tensors = list(model.parameters()) + list(model.buffers())
    non_experts = sum(t.numel() * t.element_size() for t in tensors) - expert_total
    memory = int((non_experts + kv_per_token * 64 + 20.5 * slot) / 0.9)  # the margin is 10% of a small device
    monkeypatch.setenv("DALI_EMULATED_MEMORY", str(memory))
    budget = measure_auto_budget(model, "emulated", context_length=64)
    assert budget.free == memory - non_experts  # the emulated device holds the non-expert weights too
    assert budget.kv_cache == kv_per_token * 64 and budget.activations == 0
    assert budget.margin == memory // 10
    assert budget.slots == (budget.free - budget.kv_cache - budget.margin) // slot == 20
    assert getattr(model, "_dali_runtime", None) is None  # the probe's offload was released
    monkeypatch.setenv("DALI_EMULATED_MEMORY", "16KiB")
    with pytest.raises(dali_compile.LoadError, match="no room for one expert"):
        dali_compile.load(directory, device="emulated", progress=False)


# ------------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_are_clear_errors(root, tmp_path, monkeypatch):
    good = checkpoint(root, "mixtral", "fp32", "one", "fused")
    with pytest.raises(dali_compile.LoadError, match="not a directory"):
        dali_compile.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dali_compile.LoadError, match="no config.json"):
        dali_compile.load(tmp_path / "empty")
    with pytest.raises(dali_compile.LoadError, match="'int8', 'int4' or None"):
        dali_compile.load(good, quantize={"experts": "int3"})
    with pytest.raises(dali_compile.LoadError, match="keys 'experts' and/or 'dense'"):
        dali_compile.load(good, quantize={"expert": "int4"})
    with pytest.raises(dali_compile.LoadError, match="group size 32 must divide"):
        dali_compile.load(good, quantize={"experts": "int4"})  # hidden 32, intermediate 48
    with pytest.raises(dali_compile.LoadError, match="for device 'emulated' or 'cuda'"):
        dali_compile.load(good, device="cpu", expert_memory="1GiB")
    with pytest.raises(dali_compile.LoadError, match="device must be"):
        dali_compile.load(good, device="tpu")
    with pytest.raises(dali_compile.LoadError, match="dtype"):
        dali_compile.load(good, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(dali_compile.LoadError, match="CUDA is not available"):
            dali_compile.load(good, device="cuda")
    monkeypatch.setenv("DALI_HOST_MEMORY", "100KB")
    with pytest.raises(dali_compile.LoadError, match="not enough host memory"):
        dali_compile.load(good, progress=False)
    monkeypatch.delenv("DALI_HOST_MEMORY")
    assert dali_compile.load(good, progress=False) is not None  # the checks above changed nothing


def test_a_model_without_moe_layers_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(dali_compile.LoadError, match="no MoE layer"):
        dali_compile.load(tmp_path, progress=False)


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_a_checkpoint_that_does_not_match_its_config_is_refused(root, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = copy_checkpoint(checkpoint(root, "qwen3_moe", "fp32", "one", "fused"), tmp_path / "ckpt")
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    with pytest.raises(dali_compile.LoadError, match="shape differs from config.json"):
        dali_compile.load(directory, progress=False)
    config_file.write_text(json.dumps(config))

    shard = directory / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(dali_compile.LoadError, match="missing from the checkpoint: model.layers.1.self_attn.q_proj"):
        dali_compile.load(directory, progress=False)
    with pytest.raises(dali_compile.LoadError, match="missing from the checkpoint"):
        dali_compile.load(directory, progress=False, quantize={"dense": "int8"})  # before any module swap

    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(dali_compile.LoadError, match="model.safetensors is not a readable safetensors file"):
        dali_compile.load(directory, progress=False)


# -------------------------------------------------------------------------------------------------- host memory


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """About 100 MB of fp32 weights in 3 shards of up to 40 MB (several layers each, as real checkpoints have),
    per-expert tensors; and a tiny checkpoint of the same family for the child's warm-up."""
    root = tmp_path_factory.mktemp("large")
    sizes = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_experts=16,
                 num_hidden_layers=8)
    write_tiny_checkpoint(root / "large", "qwen3_moe", torch.float32, max_shard_size="40MB", **sizes)
    write_tiny_checkpoint(root / "warm", "qwen3_moe", torch.float32, hidden_size=64, moe_intermediate_size=64,
                          intermediate_size=64, num_experts=16, num_hidden_layers=1)
    return root / "large", root / "warm"


@pytest.mark.parametrize("experts", ["none", "int4", "int8"])
def test_loading_holds_at_most_the_loaded_model_and_one_shard(large_checkpoint, experts):
    large, warm = large_checkpoint
    child = Path(__file__).with_name("load_memory_child.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(child), str(large), str(warm), experts], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    shards = sorted(large.glob("*.safetensors"))
    checkpoint_bytes = sum(f.stat().st_size for f in shards)
    bound = measured["host_bytes"] + max(f.stat().st_size for f in shards)
    taken = measured["peak"] - measured["baseline"]
    assert taken <= bound, f"loading took {taken / 1e6:.1f} MB, above the model {measured['host_bytes'] / 1e6:.1f} " \
                           f"MB plus one shard"
    if experts != "none":  # the bound is below the full-precision model: a loader that built it would fail here
        assert bound < checkpoint_bytes


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_non_expert_weights_go_straight_to_the_device_and_experts_stay_on_the_host(root, family):
    """What `load(device="cuda")` does, with the meta device standing in for CUDA (none here): every parameter
    outside the experts modules is placed as it is read, the experts stay plain host tensors."""
    from dali_compile.loading import _read_checkpoint

    directory = checkpoint(root, family, "fp32", "several", "legacy")
    model = _read_checkpoint(directory, torch.float32, None, 32, torch.device("meta"), progress_of=None)
    expert_names = {f"{name}.{p}" for name, m in experts_modules(model) for p, _ in m.named_parameters()}
    devices = {name: p.device.type for name, p in model.named_parameters()}
    assert expert_names and all(devices[name] == "cpu" for name in expert_names)
    assert {devices[name] for name in devices if name not in expert_names} == {"meta"}
    assert getattr(model.config, "quantization_config", None) is None
    written = from_pretrained(directory, "fp32")
    for name, _ in experts_modules(model):
        assert torch.equal(model.get_submodule(name).down_proj, written.get_submodule(name).down_proj)


def test_a_mismatched_weight_is_refused_when_quantized_or_placed_on_load(root, tmp_path):
    from dali_compile.loading import _read_checkpoint

    directory = copy_checkpoint(checkpoint(root, "mixtral", "fp32", "several", "legacy"), tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    for quantize in ({"experts": "int8", "dense": None}, {"experts": None, "dense": "int8"}):
        with pytest.raises(dali_compile.LoadError, match="reading .* failed"):
            dali_compile.load(directory, quantize=quantize, progress=False)
    (directory / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8, "head_dim": 8}))
    with pytest.raises(dali_compile.LoadError, match="reading .* failed"):
        _read_checkpoint(directory, torch.float32, None, 32, torch.device("meta"), progress_of=None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", [None, {"experts": "int8"}])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_cuda_load_with_the_auto_budget_equals_eager(root, family, quantize):
    """On a real GPU: non-expert weights read straight onto it, experts pinned in host memory, the auto budget
    measured (KV cache and activations) and within the device's free memory; tokens as eager on the CPU."""
    directory = checkpoint(root, family, "fp32", "several", "legacy")
    free_before, _ = torch.cuda.mem_get_info()
    loaded = dali_compile.load(directory, device="cuda", expert_memory="auto", context_length=256,
                               quantize=quantize, group_size=8, cost_model=COST, progress=False)
    try:
        summary = dali_compile.load_summary(loaded)
        assert 0 < summary.expert_memory < free_before and "KV cache" in summary.budget_note
        assert all(p.device.type == "cuda" for n, p in loaded.named_parameters() if ".experts." not in n)
        reference = from_pretrained(directory, "fp32")
        if quantize is not None:
            dali_compile.quantize(reference, **quantize, group_size=8)
        with torch.no_grad():
            want = reference.generate(PROMPT, max_new_tokens=5, do_sample=False)
            got = loaded.generate(PROMPT.cuda(), max_new_tokens=5, do_sample=False)
        assert torch.equal(got.cpu(), want)
    finally:
        dali_compile.release(loaded)


def test_a_tied_lm_head_is_quantized_from_the_embeddings_it_shares(tmp_path):
    """A checkpoint with tie_word_embeddings has no lm_head tensor: transformers ties it after reading, and the
    loader quantizes it from the embeddings, as quantize() does after loading."""
    write_tiny_checkpoint(tmp_path, "qwen3_moe", torch.float32, tie_word_embeddings=True)
    loaded = dali_compile.load(tmp_path, quantize={"dense": "int8"}, progress=False)
    after = dali_compile.quantize(from_pretrained(tmp_path, "fp32"), dense="int8")
    after.set_experts_implementation("dali")
    assert type(loaded.lm_head).__name__ == "QuantizedLinear"
    got, want = loaded.state_dict(), after.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits_of(loaded), logits_of(after))


def test_a_checkpoint_stored_quantized_by_another_tool_is_refused(root, tmp_path):
    directory = copy_checkpoint(checkpoint(root, "gpt_oss", "fp32", "one", "fused"), tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(dali_compile.LoadError, match=r"stored quantized \(mxfp4\).*unquantized release"):
        dali_compile.load(directory, progress=False)


def test_the_auto_budget_reserves_at_most_the_models_positions(root, monkeypatch):
    """context_length beyond max_position_embeddings (128 in the tiny configs) reserves only 128 positions."""
    monkeypatch.setenv("DALI_EMULATED_MEMORY", "64MiB")
    loaded = dali_compile.load(checkpoint(root, "mixtral", "fp32", "one", "fused"), device="emulated",
                               context_length=100_000, cost_model=COST, progress=False)
    try:
        assert "(128 tokens)" in dali_compile.load_summary(loaded).budget_note
    finally:
        dali_compile.release(loaded)


def test_a_hub_id_or_a_missing_shard_is_a_clear_error(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dali_compile.LoadError, match="looks like a Hugging Face Hub id.*huggingface-cli download"):
        dali_compile.load("Qwen/Qwen3-30B-A3B")
    directory = copy_checkpoint(checkpoint(root, "qwen3_moe", "fp32", "several", "legacy"), tmp_path / "ckpt")
    shards = sorted(directory.glob("*.safetensors"))
    shards[1].unlink()  # the index still names it
    with pytest.raises(dali_compile.LoadError, match="reading .* failed"):
        dali_compile.load(directory, progress=False)


@pytest.mark.parametrize("quantize", [None, {"experts": "int8", "dense": "int8"}])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_a_progress_line_per_shard_and_the_same_model_as_without(root, family, quantize, capsys):
    """With progress (the default) every parameter passes the loader's hook so each shard's progress sees its
    tensors; the model is the one a load without progress gives. Not a terminal here: one line per shard."""
    directory = checkpoint(root, family, "fp32", "several", "legacy")
    quiet = dali_compile.load(directory, quantize=quantize, group_size=8, progress=False)
    capsys.readouterr()
    shown = dali_compile.load(directory, quantize=quantize, group_size=8, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shard ")]
    shards = sorted(directory.glob("*.safetensors"))
    assert sorted(line.split(": read")[0] for line in lines) == sorted(f"shard {i + 1}/{len(shards)} {s.name}"
                                                                        for i, s in enumerate(shards))
    got, want = shown.state_dict(), quiet.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits_of(shown), logits_of(quiet))


def test_a_tied_lm_head_stays_the_embeddings_parameter(tmp_path):
    """With progress every parameter passes the hook; a tied lm_head, never read, keeps sharing the embeddings'
    Parameter, as from_pretrained leaves it."""
    write_tiny_checkpoint(tmp_path, "qwen3_moe", torch.float32, tie_word_embeddings=True)
    loaded = dali_compile.load(tmp_path, progress=True)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
