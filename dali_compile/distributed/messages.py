"""Messages between ranks, on torch.distributed point-to-point calls (gloo; no sockets of our own).

A message is a preamble of PREAMBLE int64s, [kind, step, layer, number of tensors, payload bytes, arg], then,
when it carries tensors, one uint8 payload: the tensors' descriptions (dtype code, ndim, 4 dims each, as
int64) followed by their bytes. Two point-to-point calls per message whatever it carries.

Every wait has a timeout. gloo closes the connection to a peer whose receive timed out, and a peer that
died closes it from its side: either way `PeerLost` is raised and the caller stops talking to that rank.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PREAMBLE = 6
_MAX_DIMS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


class Kind(enum.IntEnum):
    HELLO = 1  # main -> worker/shadow: the expected fingerprint; the answer is READY or ERROR
    READY = 2
    ERROR = 3  # a text in its uint8 tensor
    REQUEST = 4  # main -> worker: hidden, topk_ids, topk_weights of one layer step
    REPLY = 5  # worker -> main: the owned (token, k) contributions, fp32
    PREDICTION = 6  # main or shadow -> worker: predicted expert ids of a coming layer step
    TOKENS = 7  # main -> shadow: the step's input ids (and the previous step's keys and values)
    STOP = 8  # main -> all: finish; a worker answers with STATS
    STATS = 9


class PeerLost(RuntimeError):
    """A rank died, closed its connection, or did not answer within the timeout."""

    def __init__(self, rank: int, what: str, cause: BaseException | None = None):
        self.rank = rank
        super().__init__(f"dali distributed: rank {rank} {what}" + (f": {cause}" if cause else ""))


@dataclass
class Message:
    kind: Kind
    step: int = 0
    layer: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)
    arg: int = 0
    source: int = -1

    def text(self) -> str:
        return bytes(self.tensors[0].tolist()).decode() if self.tensors else ""


def text_message(kind: Kind, text: str) -> Message:
    return Message(kind, tensors=[torch.tensor(list(text.encode()), dtype=torch.uint8)])


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    meta = []
    for t in tensors:
        if t.dtype not in _DTYPES or t.dim() > _MAX_DIMS:
            raise TypeError(f"dali distributed: cannot send a {t.dtype} tensor of {t.dim()} dims")
        meta += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (_MAX_DIMS - t.dim())]
    parts = [torch.tensor(meta, dtype=torch.int64).view(torch.uint8)]
    parts += [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
    return torch.cat(parts)


def _unpack(payload: torch.Tensor, count: int) -> list[torch.Tensor]:
    width = 2 + _MAX_DIMS
    meta = payload[: count * width * 8].view(torch.int64).tolist()
    offset, tensors = count * width * 8, []
    for i in range(count):
        code, ndim, *dims = meta[i * width:(i + 1) * width]
        dtype, shape = _DTYPES[code], dims[:ndim]
        size = torch.Size(shape).numel() * dtype.itemsize
        tensors.append(payload[offset:offset + size].clone().view(dtype).reshape(shape))  # clone: aligned
        offset += size
    return tensors


def _wait(work, timeout_s: float, rank: int, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:  # gloo: "Timed out waiting ...", "Connection closed by peer ..."
        raise PeerLost(rank, what, error) from None


def send(message: Message, dst: int, timeout_s: float) -> None:
    payload = _pack(message.tensors) if message.tensors else None
    preamble = torch.tensor([int(message.kind), message.step, message.layer, len(message.tensors),
                             0 if payload is None else payload.numel(), message.arg], dtype=torch.int64)
    try:
        works = [dist.isend(preamble, dst)] + ([] if payload is None else [dist.isend(payload, dst)])
    except RuntimeError as error:
        raise PeerLost(dst, f"cannot be sent a {message.kind.name}", error) from None
    for work in works:
        _wait(work, timeout_s, dst, f"did not take a {message.kind.name} within {timeout_s:g} s")


def _receive_into(buffer: torch.Tensor, src: int, timeout_s: float, what: str) -> None:
    try:
        work = dist.irecv(buffer, src)
    except RuntimeError as error:
        raise PeerLost(src, "cannot be received from", error) from None
    _wait(work, timeout_s, src, what)


def recv(src: int, timeout_s: float) -> Message:
    preamble = torch.empty(PREAMBLE, dtype=torch.int64)
    _receive_into(preamble, src, timeout_s, f"sent nothing within {timeout_s:g} s")
    kind, step, layer, count, size, arg = preamble.tolist()
    tensors = []
    if size:
        payload = torch.empty(size, dtype=torch.uint8)
        _receive_into(payload, src, timeout_s, f"did not finish a message within {timeout_s:g} s")
        tensors = _unpack(payload, count)
    return Message(Kind(kind), step, layer, tensors, arg, source=src)
