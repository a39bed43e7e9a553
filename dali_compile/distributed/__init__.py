"""Distributed mode: cacheless on-demand expert loading across processes and hosts, with a shadow predictor
running ahead (OD-MoE, arXiv 2512.03927), on torch.distributed.

Every rank runs the same script under torchrun and builds (or loads) the same model; `serve` gives each
rank its role (topology.py):

    model = build_or_load()                  # the same weights on every rank
    session = dali_compile.distributed.serve(model, groups=2, predictor="shadow")
    if session.is_main:                      # rank 0: use the model as usual, eager or compiled
        tokens = model.generate(input_ids, max_new_tokens=32)
        print(session.close())               # stops the other ranks; their statistics
    # every other rank returned from serve() when the main rank closed (or died)

    torchrun --nproc-per-node 4 my_script.py            # one host
    torchrun --nnodes 3 --nproc-per-node 2 --rdzv-endpoint HOST:PORT ... my_script.py

or the command `python -m dali_compile.distributed --help` (a built-in tiny model or a checkpoint).
`load_for_rank(path, groups=2, predictor="shadow")` reads a local checkpoint as each rank needs it: the main
and shadow ranks the whole model, a worker only its own layers' experts (the rest of its model stays on the
meta device), so no worker ever holds the whole model.

Faults: a worker that dies is noticed at the next message to or from it (its connection closes); one that
stops answering, after `timeout_s`. Either way its experts are computed on the main rank from then on (from
the main rank's own copy) and the tokens do not change. Every wait has a timeout: the other ranks stop when
the main rank closes, dies, or sends nothing for `idle_timeout_s`. torchrun itself ends the whole job when
any rank exits with an error; to keep going past a dead worker, start the ranks without torchrun's
supervision (the same environment variables: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .main_rank import MainSession
from .shadow import SHADOW_PRECISIONS, SPECULATIVE_CANDIDATES, Shadow, check_candidates, make_shadow
from .topology import Topology
from .worker import WORKER_DEVICES, Worker

PREDICTORS = ("shadow", "residual", "next_gate", "none", "wrong")
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")

__all__ = ["PREDICTORS", "SHADOW_PRECISIONS", "WORKER_DEVICES", "MainSession", "ServedSession", "Topology",
           "load_for_rank", "serve"]


class ServedSession:
    """What `serve` returns on a shadow or worker rank once the main rank has finished."""

    is_main = False

    def __init__(self, role: str, stats: dict):
        self.role, self._stats = role, stats

    def stats(self) -> dict:
        return self._stats

    def close(self) -> dict:
        return self._stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def serve(model: nn.Module, *, groups: int = 1, predictor: str = "shadow", workers: int | None = None,
          shadow_precision: str = "bf16", realign: bool = True, lookahead: int = 0,
          speculative_tokens: int = SPECULATIVE_CANDIDATES, worker_device: str = "emulated",
          worker_memory: int | str | None = None, timeout_s: float = 30.0, idle_timeout_s: float = 3600.0,
          rendezvous_timeout_s: float = 120.0, calibration_ids: torch.Tensor | None = None):
    """Join the distributed job (initializing torch.distributed from torchrun's environment if needed) and take
    this rank's role with `model` (a transformers MoE model on the CPU, the same weights on every rank).

    groups: G, worker groups taking MoE layers round-robin. predictor: 'shadow' (rank 1 runs the model at
    `shadow_precision`, re-aligned each step unless realign=False; with `lookahead` N > 0 it also runs the
    first N MoE layers of the next step before the main rank has it, once from each of its
    `speculative_tokens` most likely next tokens, and predicts the union of their experts), 'residual' /
    'next_gate' (the main rank predicts the next layer from this one's gate input, with or without calibrated
    residuals), 'none', or
    'wrong' (always wrong: a test double). workers: if given, checked against the world size. worker_device:
    'emulated' (CPU-only test double of a GPU), 'emulated-async', 'cuda', or 'cpu' (the C++ CPU runtime, no
    loading). worker_memory: each worker's expert budget (default: one slot plus two prefetch sets of its share
    of one token's experts; smaller budgets stream a layer's experts in waves). timeout_s: how long the main
    rank waits for a worker before computing its experts itself. idle_timeout_s: how long the other ranks wait
    for the main rank's next message. Main rank: returns a `MainSession` (close() stops the others and returns
    statistics). Other ranks: serve until the main rank closes, then return a `ServedSession`.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"dali distributed: predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    if worker_device not in WORKER_DEVICES:
        raise ValueError(f"dali distributed: worker_device must be one of {', '.join(WORKER_DEVICES)}, "
                         f"got {worker_device!r}")
    if shadow_precision not in SHADOW_PRECISIONS:
        raise ValueError(f"dali distributed: shadow_precision must be one of {', '.join(SHADOW_PRECISIONS)}, "
                         f"got {shadow_precision!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"dali distributed: lookahead must be an int >= 0 (layers), got {lookahead!r}")
    check_candidates(speculative_tokens)
    for name, value in (("timeout_s", timeout_s), ("idle_timeout_s", idle_timeout_s),
                        ("rendezvous_timeout_s", rendezvous_timeout_s)):
        if not value > 0:
            raise ValueError(f"dali distributed: {name} must be above 0, got {value!r}")
    world_size = dist.get_world_size() if dist.is_initialized() else _world_size_from_environment()
    topology = Topology(world_size, groups, shadow=predictor == "shadow")
    if workers is not None and workers != topology.num_workers:
        raise ValueError(f"dali distributed: workers={workers} but {world_size} processes give "
                         f"{topology.num_workers} (main{' + shadow' if topology.shadow else ''} + workers)")
    from .layers import moe_layers  # a model without MoE layers is refused on every rank, before any message

    num_layers = len(moe_layers(model))
    if groups > num_layers:
        raise ValueError(f"dali distributed: {groups} groups but the model has {num_layers} MoE layers")
    owns_group = not dist.is_initialized()
    rank = _join(rendezvous_timeout_s)
    role = topology.role(rank)
    if role == "main":
        session = MainSession(model, topology, predictor, timeout_s, calibration_ids)
        session.owns_group = owns_group
        return session.start(hello_timeout_s=rendezvous_timeout_s)
    try:
        if role == "shadow":
            stats = Shadow(make_shadow(model, shadow_precision), topology, realign, timeout_s, idle_timeout_s,
                           lookahead, speculative_tokens).serve()
        else:
            stats = Worker(model, topology, rank, worker_device, worker_memory, timeout_s, idle_timeout_s).serve()
    finally:
        if owns_group:
            leave()
    return ServedSession(role, stats)


def load_for_rank(path, *, groups: int = 1, predictor: str = "shadow", dtype=None, rank: int | None = None,
                  world_size: int | None = None) -> nn.Module:
    """This rank's model from the local checkpoint directory `path` (rank and world size default to torchrun's
    variables): the whole model on the main and shadow ranks, only the experts of the worker's layers on a
    worker. Pass the same `groups` and `predictor` to `serve`."""
    from dali_compile.loading import read_checkpoint

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = _world_size_from_environment() if world_size is None else world_size
    topology = Topology(world_size, groups, shadow=predictor == "shadow")
    if topology.role(rank) != "worker":
        return read_checkpoint(path, dtype)
    return read_checkpoint(path, dtype, experts_of_layers=lambda layers: topology.layers_of_worker(rank, layers))


def leave() -> None:
    """Destroy the process group `serve` created (a rank that leaves without it aborts in gloo's threads)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _world_size_from_environment() -> int:
    missing = [name for name in _RENDEZVOUS_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"dali distributed: no rendezvous: {', '.join(missing)} not set. Launch every rank with torchrun "
            "(torchrun --nproc-per-node N script.py, or --nnodes/--rdzv-endpoint across hosts), set "
            "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE yourself, or call torch.distributed.init_process_group "
            "first")
    return int(os.environ["WORLD_SIZE"])


def _join(timeout_s: float) -> int:
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # the store's timeout, a refused connection, ...
            raise RuntimeError(f"dali distributed: the rendezvous at {address} (rank {os.environ['RANK']} of "
                               f"{os.environ['WORLD_SIZE']}) did not complete within {timeout_s:g} s: is every "
                               f"rank started, with the same MASTER_ADDR and MASTER_PORT? ({error})") from None
    return dist.get_rank()
