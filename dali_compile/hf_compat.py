"""What differs between the transformers versions dali supports (5.17 on the GPU machine, 5.24 here)."""

from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in the transformers releases that
    renamed it (they warn that `past_key_values` goes away in 5.40), else `past_key_values`. `model`: a
    model, a model compiled by torch.compile, or a forward method."""
    target = getattr(model, "_orig_mod", model)  # torch.compile's module wrapper
    try:
        parameters = inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):  # a forward without a signature: the old name, which every release takes
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"
