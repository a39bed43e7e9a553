"""One progress bar per checkpoint shard while `dali_compile.load` reads it.

Each shard's bar counts the elements of its tensors (from the safetensors headers, read before loading); the
loader's hook (load_quantizer.py) reports every parameter it takes with its element count. transformers reads
tensors in key order across all shards, not shard after shard, so several bars can move at once; the tensors a
hook never sees (buffers) and a layer's per-expert tensors spread over two shards (counted with the shard of
the layer's other tensors) are settled when loading ends, when every bar is closed at its total.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

_INDEX = re.compile(r"(\.\d+\.)")  # "model.layers.12." -> the layer part of a name


class ShardProgress:
    def __init__(self, shards: list[Path], file=None):
        from safetensors import safe_open
        from tqdm import tqdm

        self.shard_of: dict[str, int] = {}  # checkpoint tensor name -> shard index
        totals = []
        for index, shard in enumerate(shards):
            total = 0
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    self.shard_of[name] = index
                    shape = handle.get_slice(name).get_shape()
                    total += math.prod(shape)
            totals.append(total)
        self._layer_shard = self._shards_by_layer()
        self.file = file or sys.stderr
        self.names = [f"shard {i + 1}/{len(shards)} {shard.name}" for i, shard in enumerate(shards)]
        self.totals, self.done = totals, [0] * len(shards)
        # A terminal gets a live bar per shard; a log (not a terminal) one line per shard as it completes.
        self.bars = None
        if getattr(self.file, "isatty", lambda: False)():
            self.bars = [tqdm(total=total, desc=name, unit=" weights", unit_scale=True, position=i, leave=True,
                              file=self.file, dynamic_ncols=True)
                         for i, (name, total) in enumerate(zip(self.names, totals, strict=True))]
        self.last = 0

    def __deepcopy__(self, memo):  # transformers copies its quantization config; the bars stay shared
        return self

    def _shards_by_layer(self) -> dict[str, int]:
        """The most common shard of each layer prefix ("model.layers.12."), for names a checkpoint spells
        differently from the model (per-expert tensors, renamed modules)."""
        counts: dict[str, Counter] = {}
        for name, shard in self.shard_of.items():
            match = _INDEX.search(name)
            if match:
                counts.setdefault(name[: match.end()], Counter())[shard] += 1
        return {prefix: counter.most_common(1)[0][0] for prefix, counter in counts.items()}

    def shard_for(self, name: str) -> int:
        if name in self.shard_of:
            return self.shard_of[name]
        match = _INDEX.search(name)
        if match and name[: match.end()] in self._layer_shard:
            return self._layer_shard[name[: match.end()]]
        return self.last  # no better guess: the shard read last

    def advance(self, name: str, elements: int) -> None:
        self.last = index = self.shard_for(name)
        step = min(elements, self.totals[index] - self.done[index])
        self._add(index, step)

    def close(self) -> None:
        for index, total in enumerate(self.totals):
            self._add(index, total - self.done[index])
            if self.bars is not None:
                self.bars[index].close()

    def _add(self, index: int, step: int) -> None:
        if step <= 0:
            return
        self.done[index] += step
        if self.bars is not None:
            self.bars[index].update(step)
        elif self.done[index] == self.totals[index]:
            print(f"{self.names[index]}: read ({self.totals[index]:,} weights)", file=self.file, flush=True)

