"""Run by test_loading.py in a fresh process: load a checkpoint and report the host memory loading took.

    python tests/load_memory_child.py CHECKPOINT WARM_UP_CHECKPOINT QUANTIZE_EXPERTS  ->  one JSON line on stdout

Anonymous resident memory (RssAnon) is sampled every millisecond on a thread while `dali_compile.load`
runs; file-backed pages of the memory-mapped shards are page cache the kernel drops under pressure, so
they are not what loading costs the host.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

import dali_compile
from dali_compile.memory_budget import anonymous_memory


def main() -> None:
    checkpoint, warm_up, experts = sys.argv[1:4]
    torch.set_num_threads(1)
    quantize = None if experts == "none" else {"experts": experts}
    # A first load of a tiny checkpoint of the same family imports and initialises what any load needs
    # (transformers' model code, the C++ runtime), so the baseline leaves only this checkpoint's cost.
    del_model = dali_compile.load(warm_up, device="cpu", quantize=quantize, progress=False)
    del del_model

    baseline = anonymous_memory()
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_memory())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = dali_compile.load(checkpoint, device="cpu", quantize=quantize, progress=False)
    done.set()
    sampler.join()
    summary = dali_compile.load_summary(model)
    print(json.dumps({"baseline": baseline, "peak": peak[0], "after": anonymous_memory(),
                      "host_bytes": summary.host_bytes}))


if __name__ == "__main__":
    main()
