"""The backend's options, parsed once into a frozen config.

    torch.compile(model, backend="dali", options={"inductor": False})

Unknown options and values of the wrong type are errors that name the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping


class DaliOptionError(ValueError):
    """An option passed to the dali backend is unknown or has a bad value."""


@dataclass(frozen=True)
class DaliConfig:
    # Hand the rewritten graph to inductor (True) or run it as a plain graph module (False, for debugging
    # and for fast tests).
    inductor: bool = True
    # Raise instead of leaving a refused MoE region in the graph.
    strict: bool = False
    # Replace MoE regions at all (False: the backend only reports what it would do, and runs the original).
    rewrite: bool = True
    # Threads of the C++ CPU expert runtime's pool (0: leave it as it is, by default the physical cores
    # or DALI_CPU_THREADS). The pool is per process, so the last compile that sets it wins.
    cpu_threads: int = 0
    # Send the graph's CPU linear layers (attention, routers, shared experts, dense MLPs, lm_head) to the
    # runtime's dali::cpu_linear, so one thread pool runs the whole step (pass replace_cpu_linears).
    cpu_linears: bool = True
    # Send the graph's CPU attention at decode (one query row, no mask) to the runtime's dali::cpu_attention,
    # which reads the KV cache once in place (pass replace_decode_attention).
    cpu_attention: bool = True
    # Inductor's C++ wrapper for graphs on the CPU: the compiled graph's own glue (one Python call per kernel,
    # about 2 ms of a 2-layer decode step) becomes C++. CUDA graphs keep inductor's defaults.
    cpp_wrapper: bool = True

    def __post_init__(self):
        if self.cpu_threads < 0:
            raise DaliOptionError(
                f"dali: option 'cpu_threads' must be >= 0 (0: physical cores), got {self.cpu_threads}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> DaliConfig:
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise DaliOptionError(f"dali: options must be a dict, got {type(options).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for name, value in options.items():
            if name not in known:
                raise DaliOptionError(
                    f"dali: unknown option {name!r}; known options: {', '.join(sorted(known))}"
                )
            expected = type(getattr(cls(), name))
            if type(value) is not expected:
                raise DaliOptionError(
                    f"dali: option {name!r} must be {expected.__name__}, got {value!r} ({type(value).__name__})"
                )
            values[name] = value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
