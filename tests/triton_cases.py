"""The cases the Triton expert kernels are checked on, shared by the interpreter run and the CUDA tests.

# T tokens, K top-k, E experts, S pool slots, H hidden, I intermediate, X = 2I (gated) or I

Pure Python and torch (no triton import), so the parent test process can parametrize over the cases
while the kernels themselves run in a `TRITON_INTERPRET=1` subprocess (`triton_interpreter_run.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative max error against the fp32 reference (max |got - ref| / max |ref|), stated once.
# fp32: same fp32 math in another summation order. fp16/bf16: products are exact in fp32 and sums are fp32,
# but the [rows, I] intermediate is stored in the weight dtype (as eager does), one rounding of 2^-11 (fp16)
# or 2^-8 (bf16) relative, which the down projection averages; measured 3e-4 fp16. Under the interpreter bf16
# runs upcast to fp32 (its bf16 arithmetic is wrong), so its errors there are fp32-sized.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Quantized pools compute in fp32 whatever hidden's dtype (dequantized weights, fp32 intermediate): int8 as
# fp32. int4 also rounds the intermediate to int8 per row and group; the kernel's intermediate differs from
# the reference's by summation order, which can move a value across a rounding boundary: one step of the
# group's int8 grid on one element, a relative error of about 1e-3 at most in these shapes.
QUANT_TOLERANCE = {8: 1e-5, 4: 2e-3}
QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Case:
    name: str
    why: str
    dtype: str = "fp32"
    gated: bool = True
    interleaved: bool = False
    transposed: bool = False
    bias: bool = False
    activation: str = "silu"
    T: int = 5
    K: int = 2
    E: int = 6
    S: int = 4
    H: int = 32
    I: int = 24
    routing: str = "random"  # random | one_expert | skip_expert_1 | all_experts
    slots: str = "permuted"  # permuted: experts 0..S-1 in shuffled slots, the rest -1 | none: all -1
    ids_dtype: str = "int64"
    weights_dtype: str = "fp32"  # topk_weights: fp32 in some families, the model dtype in others
    config: str | None = None  # a TileConfig name prefix to force; None lets the launcher choose
    quant: str | None = None  # int8 | int4: pools of codes and scales (row form), groups of `group` columns
    group: int | None = 8  # None: one scale per row

    @property
    def id(self) -> str:
        return f"{self.name}-{self.dtype}"


def _variants(name, why, dtypes=("fp32", "fp16", "bf16"), **kw):
    return [Case(name, why, dtype=d, **kw) for d in dtypes]


GPT_OSS = dict(interleaved=True, transposed=True, bias=True, activation="clamped_swiglu")

CASES: list[Case] = [
    *_variants("mixtral", "gated concatenated silu: the common layout; H, I below one tile exercise the masks"),
    *_variants("gpt-oss", "interleaved gate/up read as one [BK, 2BN] tile, transposed pools, biases", **GPT_OSS),
    *_variants("no-gate", "Nemotron-H: one projection, relu2", dtypes=("fp32", "fp16"), gated=False,
               activation="relu2"),
    Case("gelu", "exact gelu via erf, with the interleaved untransposed layout", interleaved=True, activation="gelu"),
    Case("gelu-tanh", "tanh through sigmoid, transposed concatenated", transposed=True, activation="gelu_tanh"),
    Case("clamped-silu", "DeepSeek-V4: silu gate with gate and up clamped at limit", dtype="fp16",
         activation="clamped_silu"),
    Case("relu-bias", "biases on the concatenated layout (gate and up halves of the bias)", bias=True,
         activation="relu"),
    Case("quick-gelu", "no gate, transposed, with biases", gated=False, transposed=True, bias=True,
         activation="quick_gelu"),
    Case("decode-T1", "one token, T*K far below the 16-row tile", dtype="fp16", T=1, K=4),
    Case("zero-token-expert", "expert 1 has a slot but no tokens: no block may be planned for it",
         routing="skip_expert_1", E=4, S=4),
    Case("one-expert", "all 40 tokens on one expert: several row blocks of one group", dtype="fp16", T=40, K=1,
         routing="one_expert"),
    Case("k-equals-e", "every token routed to every expert", E=4, S=4, K=4, routing="all_experts"),
    Case("pool-smaller", "12 experts, 3 slots: most rows are computed elsewhere and must stay exactly 0", E=12,
         S=3, T=9, K=3),
    Case("no-slots", "every expert elsewhere: the output is all zeros", slots="none"),
    Case("empty", "T = 0 (a rank with no tokens)", T=0),
    Case("k-loop", "H and I over one 64-wide K tile and I over one N tile: the loops and tails", dtype="fp16",
         H=96, I=80, T=12),
    Case("large-M", "1040 rows: past the routing kernel's limit, so the torch routing runs", dtype="fp16",
         T=260, K=4, E=8, S=8, H=16, I=16),
    Case("int32-model-weights", "int32 ids and bf16 topk_weights, as some routers emit", dtype="bf16",
         ids_dtype="int32", weights_dtype="bf16"),
    *_variants("int8", "int8 codes dequantized in the kernel, a scale per 8 columns", dtypes=("fp32", "bf16"),
               quant="int8"),
    *_variants("int4", "int4 nibbles (low half, high half of a group) and int8-rounded activations",
               dtypes=("fp32", "bf16"), quant="int4"),
    Case("int4-gpt-oss", "int4 on the interleaved layout with biases and the clamped SwiGLU (row form)",
         interleaved=True, bias=True, activation="clamped_swiglu", quant="int4"),
    Case("int4-k-loop", "int4 groups of 16 over several K tiles, H and I over one tile", dtype="fp16", H=96, I=80,
         T=12, quant="int4", group=16),
    Case("int8-decode-T1", "one token of int8, per-row scales (one group per row)", dtype="bf16", T=1, K=4,
         quant="int8", group=None),
    *[
        Case(f"int4-config-{cfg}", f"int4 with the {cfg} tiles forced on 70 rows", T=35, H=48, I=40, config=cfg,
             quant="int4")
        for cfg in ("decode", "prefill")
    ],
    *[
        Case(f"config-{cfg}", f"force the {cfg} tiles on 70 rows: several blocks per group in every config",
             dtype=dtype, T=35, H=48, I=40, config=cfg)
        for cfg in ("decode", "medium", "prefill")
        for dtype in ("fp16", "fp32")
    ],
]


def _routing(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, K, E = case.T, case.K, case.E
    if case.routing == "one_expert":
        return torch.full((T, K), 2, dtype=torch.long)
    if case.routing == "all_experts":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).reshape(T, K)
    choices = [e for e in range(E) if not (case.routing == "skip_expert_1" and e == 1)]
    picks = [torch.tensor(choices)[torch.randperm(len(choices), generator=gen)[:K]] for _ in range(T)]
    return torch.stack(picks).reshape(T, K) if T else torch.zeros(0, K, dtype=torch.long)


def _slot_table(case: Case, gen: torch.Generator) -> torch.Tensor:
    slot = torch.full((case.E,), -1, dtype=torch.int32)
    if case.slots == "permuted":
        covered = min(case.E, case.S)
        # Expert e in slot perm[e]: slot order differs from expert order. With S == E the last expert
        # still gets -1, unless routing needs every expert, so each case mixes GPU and elsewhere rows.
        if case.routing not in ("all_experts", "skip_expert_1", "one_expert") and covered == case.E:
            covered -= 1
        slot[:covered] = torch.randperm(case.S, generator=gen)[:covered].to(torch.int32)
    return slot


def build_args(case: Case, device: str | torch.device = "cpu", seed: int = 0) -> tuple:
    """The op's 14 arguments for a case (16 with the scale pools of a quantized one), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    S, H, I = case.S, case.H, case.I
    X = 2 * I if case.gated else I

    def draw(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    up = draw(*((S, H, X) if case.transposed else (S, X, H)))
    down = draw(*((S, I, H) if case.transposed else (S, H, I)))
    up_bias, down_bias = (draw(S, X), draw(S, H)) if case.bias else (None, None)
    hidden = draw(case.T, H, scale=1.0)
    ids = _routing(case, gen).to(getattr(torch, case.ids_dtype)).to(device)
    weights = torch.softmax(torch.randn(case.T, case.K, generator=gen), dim=-1).to(DTYPES[case.weights_dtype])
    slot = _slot_table(case, gen).to(device)
    scales = ()
    if case.quant:
        from dali_compile.ops.quantized_linear import quantize_stacked

        bits = QUANT_BITS[case.quant]
        (up, up_scales), (down, down_scales) = (quantize_stacked(w.float().cpu(), bits, case.group) for w in (up, down))
        up, down, scales = up.to(device), down.to(device), (up_scales.to(device), down_scales.to(device))
    return (hidden, ids, weights.to(device), up, down, up_bias, down_bias, slot, case.gated, case.interleaved,
            case.transposed, case.activation, 1.702, 0.5, *scales)


def relative_max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def check_against_reference(got: torch.Tensor, want: torch.Tensor, args: tuple) -> str | None:
    """None when got matches the reference; else what is wrong."""
    hidden, ids, slot = args[0], args[1], args[7]
    if got.shape != want.shape or got.dtype != torch.float32:
        return f"got {got.dtype} {tuple(got.shape)}, want fp32 {tuple(want.shape)}"
    elsewhere = slot.long()[ids.long()] < 0
    if bool(got[elsewhere].ne(0).any()):
        return "rows of experts without a slot are not exactly 0"
    quantized = len(args) > 14 and args[14] is not None
    tol = QUANT_TOLERANCE[8 if args[3].dtype == torch.int8 else 4] if quantized else TOLERANCE[hidden.dtype]
    err = relative_max_error(got, want)
    if err > tol:
        return f"relative max error {err:.3e} > {tol:.1e}"
    return None


@dataclass(frozen=True)
class RoutingCase:
    """Routing metadata: `_group_rows_kernel` must equal its torch spec bit for bit."""

    name: str
    why: str
    T: int
    K: int
    E: int
    block_m: int
    elsewhere: float = 0.3  # fraction of experts with slot -1
    ids_dtype: str = "int64"

    @property
    def id(self) -> str:
        return f"routing-{self.name}"

    def build(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.E, (self.T, self.K), generator=gen).to(getattr(torch, self.ids_dtype))
        slot = torch.randperm(self.E, generator=gen).to(torch.int32)
        slot[torch.rand(self.E, generator=gen) < self.elsewhere] = -1
        return ids, slot


ROUTING_CASES = [
    RoutingCase("decode-qwen", "one token, top-8 of 128 experts: the decode step", T=1, K=8, E=128, block_m=16),
    RoutingCase("chunks", "300 x 4 rows over 8 experts: several chunks in passes 1 and 2", T=250, K=4, E=8,
                block_m=32),
    RoutingCase("blocks", "many blocks per group and more blocks than one pass-3 chunk", T=100, K=8, E=64,
                block_m=64),
    RoutingCase("all-elsewhere", "no expert has a slot: every block is padding with slot -1", T=6, K=2, E=4,
                block_m=16, elsewhere=1.0),
    RoutingCase("int32-ids", "int32 ids, E not a power of two", T=7, K=3, E=12, block_m=16, ids_dtype="int32"),
]
