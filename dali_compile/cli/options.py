"""The flags `run` and `bench` share, how they become `dali_compile.load`'s arguments, and the CLI's errors.

A mistake the user can fix (a bad flag value, a missing file, a checkpoint `load` refuses) is a `CliError`:
`main` prints it as one line, `error: ...`, and exits 2, as argparse does for a bad flag.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from ..loading import load, load_summary
from ..quantization import DEFAULT_GROUP_SIZE, FORMATS
from ..runtime.accelerator import ExpertMemoryError, parse_bytes
from ..runtime.policies import POLICIES

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


class CliError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage mistake raises CliError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise CliError(f"{self.prog}: {message}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every flag's default, except where there is none (required flags, off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a local Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("--device", default=default_device(),
                        help="cpu (every expert on the CPU), cuda / cuda:N (experts offloaded to the GPU's budget), "
                             "or emulated (a CPU test double of a GPU: its counters mean something, its times not)")
    parser.add_argument("--expert-memory", default="auto", type=expert_memory, metavar="SIZE",
                        help="expert slots on the device: 'auto' (what the device has left after the weights, "
                             "the KV cache of --context-length tokens and the activations) or a size like 12GiB")
    parser.add_argument("--policy", default="dali", choices=list(POLICIES),
                        help="which experts run where, step by step (offloaded devices only)")
    parser.add_argument("--quantize", default=None, type=quantize_spec, metavar="SPEC",
                        help="e.g. experts=int4,dense=int8, or int4 (experts only); none or unset: no quantization")
    parser.add_argument("--group-size", default=DEFAULT_GROUP_SIZE, type=positive, metavar="G",
                        help="int4 quantization: columns sharing one scale (must divide the layers' widths)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights' dtype; auto: the checkpoint's")
    parser.add_argument("--compile", default=True, action=argparse.BooleanOptionalAction,
                        help="torch.compile the model's forward with the dali backend (the first calls compile)")
    parser.add_argument("--threads", default=0, type=positive_or_zero, metavar="N",
                        help="CPU threads for PyTorch and the dali CPU runtime; 0: leave them as they are")
    parser.add_argument("--max-new-tokens", default=64, type=positive, metavar="N", help="tokens to generate")
    parser.add_argument("--context-length", default=4096, type=positive, metavar="N",
                        help="tokens the KV cache must hold (sizes the automatic expert budget)")
    parser.add_argument("--seed", default=0, type=int, help="seed of sampling and of random prompts")


def positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_or_zero(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def expert_memory(text: str) -> str:
    """'auto' or a size parse_bytes understands; checked here so a typo fails before the model is read."""
    if text == "auto":
        return text
    try:
        parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def quantize_spec(text: str) -> dict | None:
    """'experts=int4,dense=int8' -> {'experts': 'int4', 'dense': 'int8'}; 'int4' -> experts only; 'none' -> None."""
    formats = ", ".join([*FORMATS, "none"])
    if text.strip().lower() == "none":
        return None
    spec: dict = {"experts": None, "dense": None}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("experts", key.strip())
        if key not in spec:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown part {key!r}; the parts are experts and dense")
        if value not in (*FORMATS, "none"):
            raise argparse.ArgumentTypeError(f"{text!r}: unknown format {value!r} for {key}; choose {formats}")
        spec[key] = None if value == "none" else value
    return spec if any(spec.values()) else None


def set_threads(count: int) -> None:
    """PyTorch's intra-op threads and the dali CPU runtime's pool, when asked (0 leaves both alone)."""
    if count == 0:
        return
    from ..runtime import cpu_extension

    torch.set_num_threads(count)
    if cpu_extension.cpu_extension_available():
        try:
            cpu_extension.set_num_threads(count)
        except ValueError as error:
            raise CliError(f"--threads {count}: {error}") from None


def load_model(args: argparse.Namespace):
    """The checkpoint `args.model` loaded as the flags say (compiled if asked), and its LoadSummary. Load's
    messages and progress bars go to stderr: stdout carries only what the command produces."""
    set_threads(args.threads)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = load(args.model, device=args.device, expert_memory=args.expert_memory, quantize=args.quantize,
                         policy=args.policy, dtype=None if args.dtype == "auto" else args.dtype,
                         context_length=args.context_length, group_size=args.group_size)
    except (ValueError, ExpertMemoryError) as error:  # LoadError, or a value offload refuses (a budget too small)
        raise CliError(str(error)) from None
    if args.compile:
        compile_forward(model)
    return model, load_summary(model)


def compile_forward(model) -> None:
    """The model's own forward, compiled with the dali backend; again after a re-offload (new layer handles)."""
    forward = model.__dict__.get("_dali_cli_eager_forward") or model.forward
    model._dali_cli_eager_forward = forward
    model.forward = torch.compile(forward, backend="dali")


def model_device(model) -> torch.device:
    """Where the inputs go: the embedding's device (offloaded experts stay on the host, the rest moves)."""
    return model.get_input_embeddings().weight.device
