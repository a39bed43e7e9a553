"""A few compiles through inductor (slow on 2 cores): the rewritten graph is a valid inductor input."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_eager, compile_dali, count_moe_calls, num_moe_layers

import dali_compile
from dali_compile.tiny_models import tiny_model

pytestmark = pytest.mark.inductor


@pytest.mark.parametrize(
    "family, dtype",
    [
        ("mixtral", torch.float32),  # the common layout, exact within fp32 tolerance
        ("gpt_oss", torch.bfloat16),  # transposed, interleaved, biases, clamped SwiGLU; bf16 through inductor
    ],
)
def test_inductor_equals_eager(family, dtype):
    model = tiny_model(family, dtype)
    truth_model = copy.deepcopy(model).float() if dtype != torch.float32 else None
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        truth = truth_model(ids).logits if truth_model is not None else None
        compiled = compile_dali(model, inductor=True)
        got = compiled(ids).logits
        calls = count_moe_calls(compiled, ids)
    report = dali_compile.last_report()
    assert report.inductor and report.num_rewritten == num_moe_layers(model), str(report)
    assert calls == num_moe_layers(model)
    assert_close_to_eager(got, eager, truth)
