"""bench_decode end to end at its smallest: the tiny model, one decode point and one prefill, eager and dali
(dali without inductor and no inductor paths: their compiles take ~30 s each on 2 cores)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from dali_compile.runtime import cpu_extension

pytestmark = pytest.mark.skipif(not cpu_extension.cpu_extension_available(), reason="no C++ CPU runtime")

DECODE_COLUMNS = ("ms", "vs_best_torch", "floor_ms", "floor_fraction", "floor_mb", "load")
BREAKDOWN_COLUMNS = ("experts_ms", "dense_ms", "attention_ms", "other_ms", "overhead_ms", "profiled_ms")
PREFILL_COLUMNS = ("ms", "vs_best_torch", "gflop_s", "gemm_gflop_s", "gemm_fraction")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decode

    yield bench_decode
    sys.modules.pop("bench_decode", None)


def test_the_benchmark_writes_decode_and_prefill_rows(bench, tmp_path, capsys):
    out = tmp_path / "decode.csv"
    bench.main(["--models", "tiny", "--dtypes", "fp32", "--batch", "2", "--kv", "8", "--prefill", "8",
                "--paths", "eager", "dali", "--dali-no-inductor", "--repeats", "1", "--warmup", "1",
                "--profile-steps", "2", "--csv", str(out), "--no-plot"])
    rows = list(csv.DictReader(out.open()))
    assert [(r["phase"], r["path"]) for r in rows] == [
        ("decode", "eager"), ("decode", "dali"), ("decode", "dali-pool"),
        ("prefill", "eager"), ("prefill", "dali"), ("prefill", "dali-pool")]
    decode, prefill = {r["path"]: r for r in rows[:3]}, {r["path"]: r for r in rows[3:]}
    for r in decode.values():
        assert (r["model"], r["dtype"], r["batch"], r["kv"]) == ("tiny", "fp32", "2", "8")
        assert all(float(r[c]) > 0 for c in DECODE_COLUMNS)
        assert float(r["vs_best_torch"]) == pytest.approx(float(decode["eager"]["ms"]) / float(r["ms"]))
        assert float(r["floor_fraction"]) == pytest.approx(float(r["floor_ms"]) / float(r["ms"]))
        assert float(r["max_rel_err"]) < 1e-4  # fp32: the same math in another order
    assert decode["eager"]["experts_impl"] == "eager" and decode["dali"]["experts_impl"] == "grouped_mm"
    assert decode["dali-pool"]["experts_impl"] == "grouped_mm (pool)"
    for path in ("eager", "dali-pool"):  # the breakdown is dali's only
        assert all(math.isnan(float(decode[path][c])) for c in BREAKDOWN_COLUMNS)
    # The fixed cost (dali's step of the same structure at tiny widths, timed in the same rounds) over dali's step.
    fixed_ms = float(decode["dali"]["fixed_ms"])
    share = float(decode["dali"]["overhead_share"])
    assert fixed_ms > 0 and share == pytest.approx(fixed_ms / float(decode["dali"]["ms"]))
    # ... and that step right after a read of EVICT_BYTES (the caches a real step's weights leave), same rounds.
    fixed_cold_ms = float(decode["dali"]["fixed_cold_ms"])
    assert fixed_cold_ms > 0
    assert float(decode["dali"]["fixed_cold_share"]) == pytest.approx(fixed_cold_ms / float(decode["dali"]["ms"]))
    parts = [float(decode["dali"][c]) for c in BREAKDOWN_COLUMNS]
    assert parts[0] > 0 and parts[1] > 0 and sum(parts[:5]) == pytest.approx(parts[5])
    for r in prefill.values():
        assert (r["batch"], r["prompt"]) == ("1", "8") and all(float(r[c]) > 0 for c in PREFILL_COLUMNS)
        assert float(r["max_rel_err"]) < 1e-4
    out_text = capsys.readouterr().out
    assert "2 MoE layer(s) rewritten" in out_text  # both layers of the tiny model
    assert "wrote" in out_text


def test_the_floor_reads_dense_weights_embedding_rows_and_the_routed_experts(bench):
    model = bench.build_base(bench.SHAPES["tiny"], bench.DTYPES["fp32"])
    (first, second) = bench.experts_modules(model)
    ids = torch.tensor([[3], [3], [5]])
    tensors = bench.floor_tensors(model, ids, {first: {0, 2}, second: {7}})
    shape = bench.SHAPES["tiny"]
    expert = 3 * shape.hidden * shape.intermediate
    dense = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in (*first.parameters(),
                *second.parameters(), model.get_input_embeddings().weight))
    assert sum(t.numel() for t in tensors) == dense + 2 * shape.hidden + 3 * expert
    assert all(t.is_contiguous() for t in tensors)


def test_a_quantized_path_reads_its_own_codes_and_scales(bench):
    """dali-int4's floor counts the routed experts as stored on its copy: int4 codes and float16 scales."""
    base = bench.build_base(bench.SHAPES["tiny"], bench.DTYPES["bf16"])
    quantized = bench.build_paths(base, ["dali-int4"], dali_inductor=False)["dali-int4"][0]._orig_mod
    first, second = bench.experts_modules(base)
    tensors = bench.floor_tensors(quantized, torch.tensor([[3]]), {first: {0, 2}, second: {7}})
    shape = bench.SHAPES["tiny"]
    per_expert = 3 * shape.hidden * shape.intermediate  # weights of one expert
    experts = tensors[-12:]  # 3 routed experts x (up codes, down codes, up scales, down scales)
    assert sum(t.nbytes for t in experts) == 3 * (per_expert // 2 + per_expert // 32 * 2)
    assert {t.dtype for t in experts} == {torch.uint8, torch.float16}
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())  # the base keeps its own weights


def test_static_cache_decode_rows(bench, tmp_path):
    """--cache static: the decode point over a StaticCache (masked unfilled positions), dali equal to eager."""
    out = tmp_path / "static.csv"
    bench.main(["--models", "tiny", "--dtypes", "fp32", "--batch", "2", "--kv", "8", "--prefill", "--cache", "static",
                "--paths", "eager", "dali", "--dali-no-inductor", "--repeats", "1", "--warmup", "1",
                "--profile-steps", "0", "--csv", str(out), "--no-plot"])
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"eager", "dali", "dali-pool"}
    for r in rows.values():
        assert r["phase"] == "decode" and float(r["ms"]) > 0 and float(r["max_rel_err"]) < 1e-4
