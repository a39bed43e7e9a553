"""The README's main command, `python -m dali_compile.demo`, end to end in a subprocess (without inductor, to
keep it short): all three parts run and report identical tokens."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_runs_all_three_parts_and_its_tokens_agree(tmp_path):
    checkpoint = tmp_path / "demo-moe"
    out = subprocess.run([sys.executable, "-m", "dali_compile.demo", "--tokens", "4", "--no-inductor",
                          "--checkpoint", str(checkpoint)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tokens identical: True" in out.stdout  # part 1: compiled vs eager
    assert "tokens identical to quantize-after-load: True" in out.stdout  # part 3: load
    assert "tokens identical to eager: True" in out.stdout  # part 2: offload
    assert (checkpoint / "config.json").is_file() and len(list(checkpoint.glob("*.safetensors"))) > 1
    assert f"python -m dali_compile run --model {checkpoint}" in out.stdout
