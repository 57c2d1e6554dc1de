"""Launch configurations of the fused kernels: typed configs, the defaults, and `KernelConfigs`.

A `KernelConfigs` is an immutable value handed to the backend: the defaults, the per-shape
rows of one table, and where that table came from (`source`). Nothing here is global or read
from the environment: `tables.py` finds and loads a table (explicit path, the user's cache, a
shipped one, or none), `bench tune` measures one. Shapes a table lacks get the defaults, which
are good everywhere and best nowhere.
"""
from dataclasses import dataclass, field, replace
import math
from typing import NamedTuple, Optional

UNTUNED = 'defaults (untuned: run bench tune)'
KINDS = ('qkv', 'gemv', 'gated', 'head')
FORMATS = ('bf16', 'int8', 'int4')


class GemvConfig(NamedTuple):
    """num_stages > 1 software-pipelines the weight loads through shared memory (more bytes in
    flight per SM), except the quantised formats' 2, which loads the next chunk into registers
    (dequant.quant_dot); a split_k of S runs S programs per row block, each over 1/S of K;
    max_registers caps a thread's registers (ptxas .maxnreg): more programs fit on an SM, at
    the price of spills (None: the compiler's choice); staged: int8/int4 through the kernel
    that stages x' in shared memory (staged.py; CUDA only; num_stages 1 or 2: chunks requested
    ahead; split_k for a GEMV without norm or gate), the Triton kernel at the same rows,
    chunk, warps and split elsewhere."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    max_registers: Optional[int] = None
    staged: bool = False


class AttentionConfig(NamedTuple):
    """n_splits None: about two programs per SM (attention.default_splits)."""
    block_t: int
    n_splits: Optional[int]
    num_warps: int
    num_stages: int


class GemvKey(NamedTuple):
    kind: str  # qkv (q/k/v + norm + RoPE), gemv (o/down + residual), gated (gate/up), head
    weights: str  # bf16 | int8 | int4
    n: int  # rows of W (qkv: all q, k and v rows; gated: N of each of gate and up)
    k: int


class AttentionKey(NamedTuple):
    kv_heads: int
    group: int  # query heads per KV head
    max_context: int


# Quantised rows are 2-4x fewer bytes, so a program takes more rows and longer K chunks to keep
# as many bytes in flight (measured deltas: benchmarks/NOTES.md).
GEMV_DEFAULTS = {
    **{(kind, 'bf16'): GemvConfig(4, 512, 4, 1) for kind in ('gemv', 'gated', 'qkv')},
    ('head', 'bf16'): GemvConfig(8, 512, 4, 1),
    **{(kind, 'int8'): GemvConfig(8, 1024, 4, 2) for kind in KINDS},
    **{(kind, 'int4'): GemvConfig(64, 256, 4, 1, 4) for kind in KINDS},
}
# The CPU interpreter pays per program, not per byte: few, large programs.
INTERPRETER_GEMV = GemvConfig(64, 256, 4, 1)
# Two stages of 64-row K and V tiles take 64 KB of shared memory: within every recent GPU.
ATTENTION_DEFAULT = AttentionConfig(64, None, 4, 2)


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def gemv_default(kind, weights='bf16', on_cpu=False):
    if kind not in KINDS or weights not in FORMATS:
        raise ValueError(f'no GEMV kind {kind!r} in weights {weights!r}')
    return INTERPRETER_GEMV if on_cpu else GEMV_DEFAULTS[(kind, weights)]


@dataclass(frozen=True)
class KernelConfigs:
    """Per-shape configs of one table over the defaults; `source` names the table."""
    gemv_rows: dict = field(default_factory=dict)  # GemvKey -> GemvConfig
    attention_rows: dict = field(default_factory=dict)  # AttentionKey -> AttentionConfig
    source: str = UNTUNED
    provenance: dict = field(default_factory=dict)

    def gemv(self, kind, n, k, weights='bf16', on_cpu=False):
        """The config of a GEMV kind, shape and weight format; BLOCK_K at most K's power of 2."""
        config = self.gemv_rows.get(GemvKey(kind, weights, n, k)) or gemv_default(
            kind, weights, on_cpu)
        return config._replace(block_k=min(config.block_k, _next_power_of_2(k)))

    def attention(self, kv_heads, group, max_context):
        """The config tuned for the nearest context length (by ratio) of this head layout."""
        tuned = [(key.max_context, cfg) for key, cfg in self.attention_rows.items()
                 if (key.kv_heads, key.group) == (kv_heads, group)]
        if not tuned:
            return ATTENTION_DEFAULT
        return min(tuned, key=lambda t: abs(math.log(t[0] / max_context)))[1]

    def with_gemv(self, key, config):
        return replace(self, gemv_rows={**self.gemv_rows, GemvKey(*key): GemvConfig(*config)})

    def with_attention(self, key, config):
        return replace(self, attention_rows={**self.attention_rows,
                                             AttentionKey(*key): AttentionConfig(*config)})

    @property
    def tuned(self):
        return bool(self.gemv_rows or self.attention_rows)


DEFAULTS = KernelConfigs()
