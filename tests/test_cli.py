"""The command line end to end: `python -m dali_compile run|bench` in subprocesses, on tiny checkpoints each test
module writes itself (`write_tiny_checkpoint`), against transformers' own greedy `generate` on the written model.

Mostly `--no-compile` (compiling through inductor costs ~10-20 s on 2 cores): one run compiles. Flag parsing,
`--help` and the errors found before any model is read run in-process through `main(argv)`.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dali_compile.cli import main
from dali_compile.cli.bench import COLUMNS
from dali_compile.cli.options import quantize_spec
from dali_compile.cli.streaming import Sampler, generate
from dali_compile.tiny_models import write_tiny_checkpoint

TIMEOUT = 240  # seconds for one command: far above a compiled tiny run, far below "hung"
NEW_TOKENS = 12


def cli(*args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "dali_compile", *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=TIMEOUT, env=env, cwd=cwd)


def greedy(model, ids: list[int], new_tokens: int, eos: int | list[int] | None) -> list[int]:
    """transformers' greedy `generate` on the model the checkpoint was written from: the oracle. `eos`: the
    end-of-sequence ids it stops at (None: none, as for a character vocabulary)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids):].tolist()


def summary_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("prefill ")]


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny fp32 Mixtral with its character vocabulary; (directory, the written model)."""
    directory = tmp_path_factory.mktemp("checkpoints") / "mixtral"
    return directory, write_tiny_checkpoint(directory, family="mixtral")


@pytest.fixture(scope="module")
def chars(mixtral):
    return json.loads((mixtral[0] / "vocab.json").read_text())["chars"]


# ---------------------------------------------------------------------------------------------------------- run


@pytest.mark.inductor
def test_run_compiled_on_cpu_prints_the_prompt_and_generates_texts_greedy_continuation(mixtral, chars):
    """The README's quick start: text in, text out through the checkpoint's vocab.json, compiled with dali (the
    one compiled run of this file). A character vocabulary has no end-of-sequence token: all tokens come."""
    directory, model = mixtral
    prompt = "To be"
    result = cli("run", "--model", directory, "--prompt", prompt, "--device", "cpu", "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr
    expected = greedy(model, [chars.index(c) for c in prompt], NEW_TOKENS, eos=None)
    assert result.stdout == prompt + "".join(chars[i] for i in expected) + "\n"
    (summary,) = summary_lines(result.stderr)
    assert "decode " in summary and f"({NEW_TOKENS - 1} tokens)" in summary
    assert "expert hit rate n/a" in summary and "CPU 100.0% / GPU 0.0%" in summary and "host RSS" in summary


def test_run_emulated_prompt_ids_equal_generate_and_count_the_offloaded_experts(tmp_path):
    """Raw ids in and out, offloaded to the emulated device with room for a few of the 32 experts, under 'lru'
    (which copies active experts in and runs them there, so the split shows device work); greedy stops where
    `generate` stops (Qwen3-MoE's config has no end-of-sequence id: never)."""
    directory = tmp_path / "qwen3"
    model = write_tiny_checkpoint(directory, family="qwen3_moe")
    prompt = [5, 17, 33, 40, 2, 71]
    result = cli("run", "--model", directory, "--prompt-ids", ",".join(map(str, prompt)), "--device", "emulated",
                 "--expert-memory", "120KiB", "--policy", "lru", "--no-compile", "--max-new-tokens", NEW_TOKENS,
                 "--threads", 1)
    assert result.returncode == 0, result.stderr
    eos = model.generation_config.eos_token_id
    assert [int(t) for t in result.stdout.split()] == greedy(model, prompt, NEW_TOKENS, eos=eos)
    (summary,) = summary_lines(result.stderr)
    assert "expert hit rate n/a" not in summary and "emulated expert slots" in summary
    assert "GPU 0.0%" not in summary, summary  # lru runs every expert on the device


def test_chat_follows_the_tokenizers_chat_template_turn_after_turn(tmp_path):
    """A Hugging Face tokenizer (character-level, with a chat template and an end-of-sequence token) replaces
    vocab.json; two turns from stdin, the second prompt holding the first reply; an empty line ends."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path / "olmoe"
    model = write_tiny_checkpoint(directory, family="olmoe")
    chars = json.loads((directory / "vocab.json").read_text())["chars"]
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=chars[0]))
    backend.decoder = decoders.Fuse()
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=chars[0], eos_token="|",
                                        chat_template=template)
    tokenizer.save_pretrained(directory)
    result = cli("run", "--model", directory, "--chat", "--device", "cpu", "--no-compile",
                 "--max-new-tokens", NEW_TOKENS, stdin="Hi\nAnd then?\n\nnot read\n")
    assert result.returncode == 0, result.stderr
    messages, expected = [], ""
    eos = [e for e in (model.generation_config.eos_token_id, tokenizer.eos_token_id) if e is not None]
    for turn in ("Hi", "And then?"):
        messages.append({"role": "user", "content": turn})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        reply = tokenizer.decode(greedy(model, tokenizer.encode(text), NEW_TOKENS, eos), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.stdout == expected
    assert len(summary_lines(result.stderr)) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_tokens_stream_before_the_end_and_ctrl_c_exits_130(mixtral):
    """The first characters arrive while thousands of tokens are still to come; Ctrl-C then ends the run cleanly."""
    directory, _ = mixtral
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    process = subprocess.Popen([sys.executable, "-m", "dali_compile", "run", "--model", str(directory), "--prompt",
                                "To be", "--device", "cpu", "--no-compile", "--max-new-tokens", "4000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = process.stdout.read(len("To be") + 3)
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    assert first.startswith(b"To be")
    assert len(first + rest) < 4000, "the run ended before it was interrupted"
    assert process.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and not summary_lines(stderr.decode())


def test_quantize_and_dtype_flags_reach_load(mixtral, capsys):
    """`--quantize experts=int4,dense=int8 --group-size 16 --dtype bf16` gives the tokens of `load` called with
    the same arguments (whose own tests compare it with quantize-after-load)."""
    from dali_compile.loading import load

    directory, _ = mixtral
    assert main(["run", "--model", str(directory), "--device", "cpu", "--no-compile", "--prompt-ids", "5,6,7,8",
                 "--quantize", "experts=int4,dense=int8", "--group-size", "16", "--dtype", "bf16",
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    model = load(directory, device="cpu", quantize={"experts": "int4", "dense": "int8"}, group_size=16,
                 dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16
    assert printed == greedy(model, [5, 6, 7, 8], NEW_TOKENS, eos=model.generation_config.eos_token_id)


# ------------------------------------------------------------------------------------------------------- errors


def test_a_missing_checkpoint_directory_is_one_error_line_and_exit_2(tmp_path):
    assert_one_error_line(cli("run", "--model", tmp_path / "nowhere", "--prompt", "x"), "no such directory")


@pytest.mark.parametrize("args, fragment", [
    # A typo in a quantization spec fails before anything is read.
    (["--prompt", "x", "--quantize", "experts=int3"], "unknown format 'int3'"),
    (["--prompt", "x", "--quantize", "attention=int8"], "unknown part 'attention'"),
    (["--prompt-file", "{tmp}/missing.txt"], "missing.txt"),
    (["--prompt", "x", "--expert-memory", "12 parsecs"], "expert memory"),
    (["--prompt-ids", "1,x"], "token ids"),
    # load's own refusal (LoadError): an expert budget on the CPU, where there is no device.
    (["--prompt", "x", "--device", "cpu", "--expert-memory", "1GiB", "--no-compile"], "on the CPU every expert"),
])
def test_bad_flag_values_are_one_error_line_and_exit_2(mixtral, tmp_path, capsys, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["run", "--model", str(mixtral[0]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def write_dense_checkpoint(directory) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def test_every_load_error_is_one_error_line_and_exit_2_end_to_end(mixtral, tmp_path):
    """In a subprocess, as a user meets them: a model with no MoE layer, a shard that does not match its config,
    too little host memory for the checkpoint."""
    write_dense_checkpoint(tmp_path / "dense")
    assert_one_error_line(cli("run", "--model", tmp_path / "dense", "--prompt-ids", "1,2", "--no-compile"),
                          "no MoE layer")
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for file in mixtral[0].iterdir():
        (mismatched / file.name).write_bytes(file.read_bytes())
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    assert_one_error_line(cli("run", "--model", mismatched, "--prompt", "x", "--no-compile", "--device", "cpu"),
                          "shape differs from config.json")
    env = {**os.environ, "DALI_HOST_MEMORY": "100KB"}
    result = subprocess.run([sys.executable, "-m", "dali_compile", "run", "--model", str(mixtral[0]), "--prompt", "x",
                             "--no-compile", "--device", "cpu"], capture_output=True, text=True, timeout=TIMEOUT,
                            env=env)
    assert_one_error_line(result, "not enough host memory")


def test_a_checkpoint_without_tokenizer_suggests_prompt_ids(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["run", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_quantize_spec_parses_to_loads_dict():
    assert quantize_spec("experts=int4,dense=int8") == {"experts": "int4", "dense": "int8"}
    assert quantize_spec("int4") == {"experts": "int4", "dense": None}
    assert quantize_spec("dense=int8") == {"experts": None, "dense": "int8"}
    assert quantize_spec("none") is None and quantize_spec("experts=none") is None


def test_help_lists_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help text at the terminal's width
    for command, defaults in (("run", ["(default: auto)", "(default: dali)", "(default: 64)", "(default: 4096)"]),
                              ("bench", ["(default: [16, 128])", "(default: [1, 4])", "(default: 3)"])):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "--no-compile" in out and "(default: True)" in out
        assert all(d in out for d in defaults), out


# -------------------------------------------------------------------------------------------------------- bench


def test_bench_compares_policies_side_by_side_and_writes_the_csv(mixtral, tmp_path):
    """Two policies, 2 batch sizes x 2 prompt lengths, in one run on the emulated device; the CSV lands in the
    current directory under its default name."""
    directory, _ = mixtral
    result = cli("bench", "--model", directory, "--device", "emulated", "--no-compile", "--policies", "dali",
                 "all_cpu", "--prompt-lengths", 3, 5, "--batch-sizes", 1, 2, "--max-new-tokens", 3, "--repeats", 1,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dali prefill tok/s" in result.stdout and "all_cpu decode tok/s" in result.stdout
    assert "plot: " in result.stdout
    with (tmp_path / "dali_bench_mixtral_emulated.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == COLUMNS
    cases = [(r["policy"], int(r["batch_size"]), int(r["prompt_length"])) for r in rows]
    assert cases == [(p, b, t) for p in ("dali", "all_cpu") for b in (1, 2) for t in (3, 5)]
    assert all(float(r["prefill_tok_s"]) > 0 and float(r["decode_tok_s"]) > 0 for r in rows)
    all_cpu = [r for r in rows if r["policy"] == "all_cpu"]
    assert all(float(r["expert_hit_rate"]) == 0 and float(r["expert_cpu_share"]) == 1 for r in all_cpu)


def test_bench_on_the_cpu_has_one_row_set_without_a_policy(mixtral, tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    assert main(["bench", "--model", str(mixtral[0]), "--device", "cpu", "--no-compile", "--prompt-lengths", "4",
                 "--batch-sizes", "1", "--max-new-tokens", "2", "--repeats", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["policy"], r["expert_cpu_share"]) for r in rows] == [("none", "1.0")]


# ------------------------------------------------------------------------------------------------- the loop


def test_the_loop_equals_generate_and_sampling_repeats_with_its_seed(mixtral):
    _, model = mixtral
    prompt = torch.tensor([[5, 6, 7, 8]])
    tokens, timing = generate(model, prompt, 6)
    assert tokens[0] == greedy(model, prompt[0].tolist(), 6, eos=None)
    assert timing.prompt_tokens == 4 and timing.decode_tokens == 5
    sampled = [generate(model, prompt, 6, Sampler(temperature=1.0, top_k=5, seed=3))[0] for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert generate(model, prompt, 6, Sampler(temperature=1.0, top_k=1, seed=3))[0] == tokens  # top-1 is greedy


def test_a_reader_that_goes_away_ends_the_run_quietly(mixtral):
    """`dali-compile run ... | head -c 8`: the closed pipe ends the run with status 0 and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "dali_compile", "run", "--model", str(mixtral[0]),
                                "--prompt", "To be", "--no-compile", "--device", "cpu", "--max-new-tokens", "100"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(process.stdout.read(8)) == 8
    process.stdout.close()
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
