"""Shared helpers: tolerances, compile shortcuts, counting executed dali::moe_hybrid calls."""

from __future__ import annotations

import pytest
import torch

import dali_compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so graphs (and reports) never leak between tests."""
    torch._dynamo.reset()
    dali_compile.clear_reports()
    yield
    torch._dynamo.reset()
