"""Memory pre-check: will a cell fit before anything is allocated?

need = weights (parameters x dtype size, counted on the meta device)
     + for int8/int4 cells, the quantised copy of the linear weights (see quantised_copy_bytes)
     + static KV cache for the cell (layers x 2 x kv_heads x head_dim x max_context x dtype size,
       per sequence of the batch)
     + the hf backend's transient attention buffers (K/V repeated to the query heads, one layer)
     + logits + a fixed margin (CUDA context, library workspaces, graph pools)
     + a built-in co-runner's buffers and context (a command's memory is not known).
free = NVML free memory on a GPU (the parent never opens a CUDA context), MemAvailable on a CPU,
capped by `memory_limit_gb` when the grid sets one.
"""
from dataclasses import dataclass
import os

GB = 1e9
DTYPE_BYTES = {'bfloat16': 2, 'float16': 2, 'float32': 4}
# Quantised copies (decode_monitor/engine/fused/quant.py): bytes of code per weight, and how
# many values of the model's dtype each group of weights stores (int8: a scale; int4: a scale
# and an offset). 128 is the group size of every study model; a K that 128 does not divide gets
# 64 or 32, a few more scale bytes than counted here.
CODE_BYTES = {'int8': 1.0, 'int4': 0.5}
GROUP_VALUES = {'int8': 1, 'int4': 2}
QUANT_GROUP = 128


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_params: int = 0  # weights of the linear layers and lm_head: what int8/int4 quantise


@dataclass(frozen=True)
class Fit:
    fits: bool
    need_bytes: float
    free_bytes: float
    reason: str = None


def shape_from_config(config, params, linear_params=0):
    heads = config.num_attention_heads
    head_dim = getattr(config, 'head_dim', None) or config.hidden_size // heads
    kv_heads = getattr(config, 'num_key_value_heads', None) or heads
    return ModelShape(int(params), config.num_hidden_layers, heads, kv_heads, head_dim,
                      config.vocab_size, int(linear_params))


def linear_params(model):
    """Weights of every nn.Linear, lm_head included: the matrices the fused backend quantises.

    A tied lm_head is the embedding, counted here anyway: quantising it makes a separate copy.
    """
    import torch
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def count_params(config):
    """(all parameters, linear weights) of the model `config` describes, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    # parameters() yields tied weights once
    return sum(p.numel() for p in model.parameters()), linear_params(model)


def model_config(source):
    """The transformers config of a preset, checkpoint directory or GGUF file (no weights read)."""
    from decode_monitor.engine.presets import PRESETS, preset_config
    if source in PRESETS:
        return preset_config(source)
    from transformers import AutoConfig
    if source in ('smollm2', 'default'):
        from decode_monitor.engine.sources import default_gguf_path
        path = default_gguf_path()
        return AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                          local_files_only=True)
    if os.path.isfile(source):
        return AutoConfig.from_pretrained(os.path.dirname(source) or '.',
                                          gguf_file=os.path.basename(source),
                                          local_files_only=True)
    if os.path.isfile(os.path.join(source, 'config.json')):
        return AutoConfig.from_pretrained(source, local_files_only=True)
    ggufs = sorted(f for f in os.listdir(source) if f.endswith('.gguf'))
    if not ggufs:
        raise ValueError(f'{source}: no config.json and no .gguf file')
    return AutoConfig.from_pretrained(source, gguf_file=ggufs[0], local_files_only=True)


def model_shape(source):
    config = model_config(source)
    return shape_from_config(config, *count_params(config))


def quantised_copy_bytes(linear_weights, weights, dtype, dense_copy=False):
    """An estimate of the bytes an int8/int4 cell adds to the loaded dense model (0 for bf16).

    The dense weights stay loaded (the same model serves every cell of a session), so the
    quantised codes and their group scales come on top: about 1/2 (int8) or 1/4 (int4) of the
    linear weights' bf16 bytes. dense_copy: the fused backend's torch path (its default off
    CUDA) also keeps a dequantised dense copy of those weights to multiply by.
    """
    if weights == 'bf16':
        return 0.0
    elem = DTYPE_BYTES[dtype]
    per_weight = CODE_BYTES[weights] + GROUP_VALUES[weights] * elem / QUANT_GROUP
    return linear_weights * (per_weight + (elem if dense_copy else 0))


def co_runner_bytes(spec, device='cuda'):
    """Memory a built-in co-runner holds on `device` (decode_monitor.bench.corunner): its
    buffers, and on a GPU its CUDA context (about 0.5 GB). 0 for none or a command."""
    cuda = device == 'cuda'
    buffers = {'copy': 2 * (2**30 if cuda else 2**26), 'idle': 2 * (2**30 if cuda else 2**26),
               'matmul': 3 * (8192**2 * 2 if cuda else 512**2 * 4)}.get(spec)
    if buffers is None:
        return 0.0
    return buffers + (0.5 * GB if cuda else 0.0)


def cell_bytes(shape, max_context, dtype='bfloat16', margin_gb=0.0, weights='bf16',
               device='cuda', batch=1, co_runner='none'):
    """Bytes a cell needs: weights (+ a quantised copy) + KV cache of every sequence + transient
    attention/logits buffers + margin (+ a co-runner's). An estimate, meant to skip cells that
    cannot fit, not to predict a peak.
    """
    elem = DTYPE_BYTES[dtype]
    weight_bytes = shape.params * elem + quantised_copy_bytes(
        shape.linear_params, weights, dtype, dense_copy=device != 'cuda')
    kv = batch * shape.layers * 2 * shape.kv_heads * shape.head_dim * max_context * elem
    repeated_kv = batch * 2 * shape.heads * shape.head_dim * max_context * elem
    scores = batch * shape.heads * max_context * 4
    logits = batch * shape.vocab * 4 * 2
    return (weight_bytes + kv + repeated_kv + scores + logits + margin_gb * GB
            + co_runner_bytes(co_runner, device))


def check(need_bytes, free_bytes):
    if free_bytes is None:
        return Fit(True, need_bytes, None, None)
    if need_bytes <= free_bytes:
        return Fit(True, need_bytes, free_bytes, None)
    return Fit(False, need_bytes, free_bytes,
               f'does not fit in memory: needs {need_bytes / GB:.2f} GB, '
               f'{free_bytes / GB:.2f} GB free')


def available_ram_bytes():
    """MemAvailable from /proc/meminfo (free + reclaimable), else free physical pages."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError):
        return None


def gpu_free_bytes(index=0):
    """Free GPU memory from NVML, without creating a CUDA context; None if NVML is missing."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:
        return None


def free_bytes(device, limit_gb=None):
    free = gpu_free_bytes() if device == 'cuda' else available_ram_bytes()
    if limit_gb is not None:
        limit = limit_gb * GB
        free = limit if free is None else min(free, limit)
    return free
