"""Checkpoints that arrive quantised: the compressed-tensors `pack-quantized` format.

It is what llm-compressor writes for GPTQ and AWQ models, and what compressed-tensors'
converter makes of AutoAWQ checkpoints. Each quantised Linear stores `weight_packed` (int32,
codes packed along K, 32 / bits to a word, the first in the lowest bits, offset binary: a code
q is stored as q + 2^(bits - 1)), `weight_scale` (N, K / G) and `weight_shape`, and with
asymmetric weights `weight_zero_point` (packed the same way along N); the weight is
(q - zero_point) * scale.

The model gets dense copies of the dequantised weights (the `hf` backend, bf16 and prefill run on
them) and the fused backend's `int4` / `int8` format is the checkpoint's own codes and scales,
not quantised again: `model.__dict__['_fused_quantised']` is where `FusedBackend._quantise` looks
first. Read: integer weights only (no activation quantisation), group strategy with a group of
32, 64 or 128 dividing K, no activation order; 4 bits (symmetric or not) or 8 bits (symmetric).
"""
from dataclasses import dataclass
import os
import sys

import torch

from decode_monitor.engine.fused.quant import GROUP_SIZES, QuantWeight, cat_rows, pack_int4

PACKED_FORMAT = 'pack-quantized'
_PARTS = ('weight_packed', 'weight_scale', 'weight_shape', 'weight_zero_point')
# The matrices a fused layer serves, each the rows of these modules (model.py's MATRICES).
_LAYER_MATRICES = {'wqkv': ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
                   'wo': ('self_attn.o_proj',), 'wgu': ('mlp.gate_proj', 'mlp.up_proj'),
                   'wd': ('mlp.down_proj',)}


@dataclass(frozen=True)
class PackedScheme:
    bits: int
    group: int
    symmetric: bool

    @property
    def fmt(self):
        return f'int{self.bits}'


def packed_scheme(config):
    """The PackedScheme of a model config's `quantization_config`, or None when it has none.

    Raises ValueError naming what this reader does not support.
    """
    qc = getattr(config, 'quantization_config', None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method, fmt = qc.get('quant_method'), qc.get('format')
    if method != 'compressed-tensors' or fmt != PACKED_FORMAT:
        raise ValueError(
            f'quantised checkpoint (quant_method {method!r}, format {fmt!r}): only the '
            f'compressed-tensors {PACKED_FORMAT!r} format is read; compressed-tensors converts '
            'AutoAWQ checkpoints to it, and llm-compressor writes GPTQ and AWQ models in it. '
            'Or load the dense model and use weights:=int8 / int4.')
    groups = list((qc.get('config_groups') or {}).values())
    if len(groups) != 1:
        raise ValueError(f'quantised checkpoint: {len(groups)} config groups; one is read')
    scheme = groups[0]
    weights = scheme.get('weights') or {}
    bits, kind = weights.get('num_bits'), weights.get('type')
    strategy, group = weights.get('strategy'), weights.get('group_size')
    symmetric = weights.get('symmetric', True)
    problems = []
    if scheme.get('input_activations') or scheme.get('output_activations'):
        problems.append('activations are quantised too (only weight-only schemes are read)')
    if kind != 'int' or bits not in (4, 8):
        problems.append(f'weights are {kind} {bits}-bit (int 4-bit or 8-bit are read)')
    elif bits == 8 and not symmetric:
        problems.append('8-bit weights have zero points (only symmetric 8-bit is read)')
    if strategy != 'group' or group not in GROUP_SIZES:
        problems.append(f'strategy {strategy!r}, group size {group} (group strategy with '
                        f'groups of {", ".join(map(str, GROUP_SIZES))} are read)')
    if weights.get('actorder') not in (None, False):
        problems.append(f'activation order {weights["actorder"]!r} (none is read)')
    if problems:
        raise ValueError('quantised checkpoint: ' + '; '.join(problems))
    return PackedScheme(bits, group, bool(symmetric))


def _unpack(packed, bits, cols):
    """(R, W) int32 words -> (R, cols) stored codes 0 .. 2^bits - 1 (uint8), first in the low
    bits. 4 and 8 bits never straddle a byte, so a word is read as its bytes."""
    if sys.byteorder != 'little':
        raise ValueError('packed checkpoints are read on little-endian machines only')
    data = packed.contiguous().view(torch.uint8)  # (R, 4 W), byte 0 first
    if bits == 4:
        data = torch.stack((data & 15, data >> 4), dim=-1).flatten(-2)
    return data[:, :cols]


def quant_weight(parts, scheme):
    """A QuantWeight of one module's stored tensors (`weight_packed`, `weight_scale`, ... by
    name), in our format: int4 codes 0-15 with w = q s + m, or int8 codes with w = q s."""
    n, k = (int(v) for v in parts['weight_shape'])
    if k % scheme.group:
        raise ValueError(f'quantised checkpoint: K = {k} is not a multiple of the group '
                         f'size {scheme.group}')
    scale = parts['weight_scale'].contiguous()
    if scale.shape != (n, k // scheme.group):
        raise ValueError(f'quantised checkpoint: scales of shape {tuple(scale.shape)} for a '
                         f'({n}, {k}) weight in groups of {scheme.group}')
    stored = _unpack(parts['weight_packed'], scheme.bits, k)  # code + 2^(bits - 1)
    if scheme.bits == 8:
        q = (stored.to(torch.int16) - 128).to(torch.int8)
        return QuantWeight('int8', q.contiguous(), scale, None, scheme.group)
    if scheme.symmetric:
        offset = -8 * scale  # exact in any float dtype
    else:  # w = (stored - 8 - z) s: the offset in fp32, where (8 + z) s is exact
        z = _unpack(parts['weight_zero_point'].t(), 4, n).t().float() - 8  # (N, K / G)
        offset = (-(8 + z) * scale.float()).contiguous()
    return QuantWeight('int4', pack_int4(stored, scheme.group), scale, offset, scheme.group)


def read_tensors(directory):
    """The packed modules' tensors of a checkpoint's safetensors files, by name (CPU)."""
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
    if not files:
        raise ValueError(f'quantised checkpoint {directory}: no .safetensors files')
    tensors = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework='pt') as f:
            for key in f.keys():
                if key.rsplit('.', 1)[-1] in _PARTS:
                    tensors[key] = f.get_tensor(key)
    return tensors


def quantised_modules(tensors, scheme):
    """{module name: QuantWeight} of every module stored packed."""
    modules = {}
    for key in tensors:
        if key.endswith('.weight_packed'):
            name = key[:-len('.weight_packed')]
            parts = {p: tensors[f'{name}.{p}'] for p in _PARTS if f'{name}.{p}' in tensors}
            modules[name] = quant_weight(parts, scheme)
    return modules


def attach(model, modules, scheme, device):
    """Give `model` the dense dequantised weights of `modules` and keep their codes for the
    fused backend, which serves them as the format `scheme.fmt`."""
    dtype = model.dtype
    for name, weight in modules.items():
        model.get_submodule(name).weight.data = weight.dequantize(dtype).to(device)
    moved = {name: QuantWeight(w.fmt, w.q.to(device), w.scale.to(device),
                               None if w.offset is None else w.offset.to(device), w.group)
             for name, w in modules.items()}
    prefix = 'model.layers'
    layers = []
    for i in range(len(model.model.layers)):
        layer = {}
        for matrix, parts in _LAYER_MATRICES.items():
            names = [f'{prefix}.{i}.{part}' for part in parts]
            missing = [n for n in names if n not in moved]
            if missing:
                raise ValueError(f'quantised checkpoint: {", ".join(missing)} not quantised '
                                 '(the fused backend needs every layer matrix quantised)')
            layer[matrix] = cat_rows([moved[n] for n in names])
        layers.append(layer)
    # lm_head as stored: quantised, or dense (often kept so, and tied to the embedding)
    head = moved.get('lm_head', model.lm_head.weight)
    model.__dict__.setdefault('_fused_quantised', {})[scheme.fmt] = (layers, head)
    model.__dict__['_checkpoint_format'] = scheme.fmt
