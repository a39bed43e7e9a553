"""Tiny random-weight MoE models of real families, built from transformers configs (no downloads).

Used by the demo and the tests. Each keeps the family's structure (router form,
shared experts, dense first layers, expert layout) at toy sizes.
"""

from __future__ import annotations

import torch

# Family name -> (config class name, config overrides). Sizes are chosen so every shape is
# distinct (H != I != 2I != E), which lets the layout probe tell transposed from not.
_COMMON = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False,
)
FAMILIES: dict[str, tuple[str, dict]] = {
    # softmax -> top-k -> renormalise; concatenated gate/up; 8 experts top-2 like the real model.
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    # softmax -> top-k without renormalising, plus a gated shared expert outside the experts module.
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    # softmax -> top-k -> renormalise, 16 experts top-4.
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, head_dim=8)),
    # OLMoE: no renormalisation, q/k norms.
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=16, num_experts_per_tok=4)),
    # sigmoid + correction bias + group-limited top-k + scaling; first layer dense; a shared expert.
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8, head_dim=8, num_key_value_heads=4, rope_interleave=True)),
    # top-k -> softmax; transposed, interleaved gate/up with biases and a clamped SwiGLU. The limit is
    # set low so the clamps actually bite at toy scale.
    "gpt_oss": ("GptOssConfig", dict(
        intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8, swiglu_limit=0.05,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # beyond the minimum six: DeepSeek-V4's clamped SiLU gate (silu(clamp(gate)) * clamp(up)), limit low to bite.
    "deepseek_v4": ("DeepseekV4Config", dict(
        intermediate_size=48, moe_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        swiglu_limit=0.3)),
}

# The families every test must cover; the others join where the installed transformers has them.
MINIMUM_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def available_families() -> list[str]:
    """The minimum families plus every other family whose config class this transformers has."""
    import transformers

    return [f for f, (config, _) in FAMILIES.items() if f in MINIMUM_FAMILIES or hasattr(transformers, config)]


# transformers' default init (std 0.02) gives near-constant outputs at toy size; a larger std makes
# logits and greedy tokens depend on every layer, so equality tests are sensitive.
INIT_STD = 0.2


def tiny_config(family: str, experts_implementation: str = "grouped_mm", **overrides):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config_name, family_overrides = FAMILIES[family]
    kwargs = {**_COMMON, **family_overrides, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    config.initializer_range = INIT_STD
    if family == "gpt_oss":
        config._attn_implementation = "eager"  # GPT-OSS needs eager attention in these versions
    config._experts_implementation = experts_implementation
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float32, experts_implementation: str = "grouped_mm",
               seed: int = 0, **overrides):
    """A tiny random-weight causal LM of `family` in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, experts_implementation, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_router_biases(model)
    return model.to(dtype).eval()


@torch.no_grad()
def _perturb_router_biases(model) -> None:
    """Random-init zeros DeepSeek's correction bias and GPT-OSS's biases; give them values so they matter."""
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias") or (name.endswith("_bias") and "experts" in name) \
                or name.endswith("router.bias"):
            param.copy_(torch.randn_like(param) * 0.1)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.1)


def character_vocabulary(size: int) -> list[str]:
    """`size` characters for a character-level vocabulary: the unknown character (id 0), printable ASCII, then
    Latin letters beyond ASCII (a toy model's vocabulary is often larger than ASCII's)."""
    chars = ["\x00", "\n"] + [chr(c) for c in range(32, 127)]
    chars += [chr(0x100 + i) for i in range(max(0, size - len(chars)))]
    return chars[:size]


def write_tiny_checkpoint(directory, family: str = "mixtral", dtype: torch.dtype = torch.float32,
                          max_shard_size: str | int | None = None, fused: bool = False, seed: int = 0,
                          **overrides):
    """Writes a tiny random-weight model of `family` as a local Hugging Face checkpoint and returns the model.

    The directory gets config.json, generation_config.json, safetensors shards (one, or shards of at most
    `max_shard_size`, e.g. "200KB", with their index) and a character vocabulary (`vocab.json`, read by
    `python -m dali_compile run`). `fused=False` writes what `save_pretrained` writes (the families'
    checkpoint conventions: per-expert tensors where the family's checkpoints have them); `fused=True`
    writes the model's own parameter names (stacked 3-D expert tensors), as a converted checkpoint would.
    """
    model = tiny_model(family, dtype, seed=seed, **overrides)
    save_checkpoint(model, directory, max_shard_size, fused)
    return model


def save_checkpoint(model, directory, max_shard_size: str | int | None = None, fused: bool = False) -> None:
    """`model` as a checkpoint in `directory`, with a character vocabulary (see write_tiny_checkpoint)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    if fused:
        _rewrite_fused(model, directory, max_shard_size)
    vocabulary = {"type": "char", "chars": character_vocabulary(model.config.vocab_size)}
    (directory / "vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False))


def _rewrite_fused(model, directory, max_shard_size) -> None:
    """Replaces the shards save_pretrained wrote by shards of the model's own state dict."""
    import json

    from safetensors.torch import save_file

    for old in list(directory.glob("*.safetensors")) + list(directory.glob("*.safetensors.index.json")):
        old.unlink()
    from dali_compile.runtime.accelerator import parse_bytes

    limit = None if max_shard_size is None else parse_bytes(max_shard_size)
    shards, current, size = [], {}, 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and limit is not None and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
