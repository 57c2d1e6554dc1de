"""Compile kernels for sm_90 on a machine without a GPU and print their resources.

Triton's NVIDIA backend and the ptxas it bundles compile a kernel for a target named by hand;
nothing is loaded or run. The product's own launch code is called with CPU tensors and a
recorder in place of the launch, so each kernel gets the arguments and constants it would get
on the GPU (pointers and integers divisible by 16 marked as Triton marks them at run time),
then the GPU's settings (no interpreter loops, PDL on). Printed per kernel: registers, spills
(local memory), shared memory, from cuobjdump. A check that a change compiles for Hopper, and
what it costs in registers (residency), before device time is spent on it.

    python benchmarks/experiments/compile_sm90.py [qwen2.5-7b]

Runs the fused GEMVs and the persistent layer kernel (bf16, int8, int4, the shipped H200
table's configs for the model) and the prefill GEMM's right layout (int4, PTX tile).
"""
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget('cuda', 90, 32)
TYPES = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32',
         torch.int32: 'i32', torch.int64: 'i64', torch.uint8: 'u8', torch.int8: 'i8'}


class Recorder:
    """Stands in for `kernel[grid]`: keeps (kernel, args, kwargs) instead of launching."""

    def __init__(self):
        self.calls = []
        self._saved = triton.runtime.JITFunction.__getitem__

    def __enter__(self):
        calls = self.calls

        def getitem(fn, grid):
            return lambda *args, **kwargs: calls.append((fn, args, kwargs))
        triton.runtime.JITFunction.__getitem__ = getitem
        return self

    def __exit__(self, *exc):
        triton.runtime.JITFunction.__getitem__ = self._saved


def compile_call(fn, args, kwargs, keep=False, **overrides):
    """The cubin's resources of fn compiled for TARGET with these launch arguments (and, with
    keep, the compiled kernel under 'compiled': its asm holds ttgir, ptx and the cubin)."""
    kwargs = {**kwargs, **overrides}
    options = {k: kwargs.pop(k) for k in ('num_warps', 'num_stages', 'maxnreg') if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, list(args) + [None] * len(kwargs))):
        if name in kwargs:
            value = kwargs[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = 'constexpr', value
        elif isinstance(value, torch.Tensor):
            signature[name] = '*' + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [['tt.divisibility', 16]]
        elif isinstance(value, bool):
            signature[name] = 'i1'
        elif isinstance(value, int):
            if value == 1 and i not in fn.do_not_specialize:
                signature[name], constexprs[(i,)] = 'constexpr', 1
                continue
            signature[name] = 'i32' if -2 ** 31 <= value < 2 ** 31 else 'i64'
            if value % 16 == 0 and i not in fn.do_not_specialize:
                attrs[(i,)] = [['tt.divisibility', 16]]
        elif isinstance(value, float):
            signature[name] = 'fp32'
        else:
            raise TypeError(f'{name}: {type(value).__name__}')
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                              options=options)
    out = _resources(compiled)
    if keep:
        out['compiled'] = compiled
    return out


def _resources(compiled):
    """Registers, local memory (spills) and shared memory of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                            'cuobjdump')
        usage = subprocess.run([tool, '-res-usage', f.name], capture_output=True, text=True,
                               check=True).stdout
    line = next(ln for ln in usage.splitlines() if 'REG:' in ln)
    fields = dict(part.split(':') for part in line.split() if ':' in part)
    return {'regs': int(fields['REG']), 'local': int(fields['LOCAL']),
            'shared': compiled.metadata.shared}


def compile_staged(config, weights, k, group, gated=True):
    """Resources of staged.py's kernel at a table row (Gluon, so its own source type): gate/up
    with RMSNorm, or a plain GEMV with its residual (down_proj, o_proj)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from decode_monitor.engine.fused.staged import ahead, staged_kernel as fn
    types = {'W': '*i32', 'S': '*bf16', 'Z': '*bf16', 'X': '*bf16', 'NW': '*bf16', 'R': '*bf16',
             'Y': '*bf16', 'ACC': '*fp32', 'CNT': '*i32', 'N': 'i32', 'stride_w': 'i32',
             'stride_s': 'i32', 'eps': 'fp32'}
    per = -(-(k // config.block_k) // config.split_k)
    consts = dict(K=k, GATED=gated, NORM=gated, RESIDUAL=not gated, INT4=weights == 'int4',
                  GROUP=group, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  CH2=triton.next_power_of_2(per), SPLIT=config.split_k,
                  AHEAD=ahead(config), WARPS=config.num_warps, PDL=True)
    names = fn.arg_names
    src = GluonASTSource(fn, {n: types.get(n, 'constexpr') for n in names},
                         {(names.index(c),): v for c, v in consts.items()},
                         {(names.index(a),): [['tt.divisibility', 16]]
                          for a in ('W', 'S', 'Z', 'X', 'NW', 'R', 'Y', 'ACC', 'CNT',
                                    'stride_w')})
    compiled = triton.compile(src, target=TARGET, options={'num_warps': config.num_warps})
    return _resources(compiled)


def gpu_settings(kwargs):
    """The constants a kernel gets on an sm_90 GPU where the CPU path set others."""
    out = {'PDL': True} if 'PDL' in kwargs else {}
    if 'WHILE_LOOP' in kwargs:
        out['WHILE_LOOP'] = False
    if 'PTX' in kwargs:
        out['PTX'] = True
    return out


def one_layer(preset):
    """The preset's model with one decoder layer and a 1024-token vocabulary: its layer
    matrices have the preset's shapes (the kernels' constants), in a few GB of host memory."""
    from transformers import AutoModelForCausalLM
    from decode_monitor.engine.presets import preset_config
    config = preset_config(preset)
    config.num_hidden_layers, config.vocab_size = 1, 1024
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def main(argv):
    from decode_monitor.engine.fused import gemv, qgemm, tables
    from decode_monitor.engine.fused.staged import fits
    from decode_monitor.engine.fused.persistent import layer_kernel
    from decode_monitor.engine.fused.persistent_launch import PersistentConfig, PersistentLayers
    from decode_monitor.engine.fused.persistent_model import PersistentBackend
    model = one_layer(argv[0] if argv else 'qwen2.5-7b')
    table = tables.load(tables.shipped_table_path('NVIDIA H200'))
    rows = []
    for weights in ('bf16', 'int8', 'int4'):
        backend = PersistentBackend(model, 2048, use_triton=True, weights=weights,
                                    kernel_configs=table)
        layer = backend.layers[0]
        x = torch.zeros(backend.embed.shape[1], dtype=torch.bfloat16)
        inter = layer.wd.shape[1]
        act = torch.zeros(inter, dtype=torch.bfloat16)
        with Recorder() as rec:
            cfg = table.gemv('gated', inter, x.shape[0], weights)
            gemv.gemv(layer.wgu, x, act, norm_weight=backend.layers[0].ln2, gated=True,
                      eps=1e-6, config=cfg, kind='gated')
            cfg_d = table.gemv('gemv', x.shape[0], inter, weights)
            gemv.gemv(layer.wd, act, x.clone(), residual=x, eps=1e-6, config=cfg_d)
        for (fn, args, kwargs), what in zip(rec.calls, ('gate/up', 'down')):
            row = cfg if what == 'gate/up' else cfg_d
            n = inter if what == 'gate/up' else x.shape[0]
            if row.staged and fits(row, weights, n, kwargs['K'], kwargs['GROUP'],
                                   plain=what == 'down'):  # on a GPU: staged.py's kernel
                res = compile_staged(row, weights, kwargs['K'], kwargs['GROUP'],
                                     what == 'gate/up')
                what += ' (staged)'
            else:
                res = compile_call(fn, args, kwargs, **gpu_settings(kwargs))
            rows.append((f'fused GEMV {weights} {what}', res))
            print(rows[-1], flush=True)
        layers = PersistentLayers(backend, PersistentConfig())
        pos = torch.zeros(1, dtype=torch.long)
        for part, what in zip(layers.parts, ('q/k/v', 'o_proj..down')):
            constants = dict(part.constants)
            constants.update(gpu_settings(constants), num_stages=PersistentConfig().att_stages)
            res = compile_call(layer_kernel, layers._args(0, pos), constants)
            rows.append((f'persistent {weights} {what}', res))
            print(rows[-1], flush=True)
        if weights == 'int4':
            for m in (64, 128):
                xm = torch.zeros(m, x.shape[0], dtype=torch.bfloat16)
                with Recorder() as rec:
                    qgemm.qgemm(xm, layer.wgu)
                fn, args, kwargs = rec.calls[0]
                res = compile_call(fn, args, kwargs, PTX=True, F32_DOT=False)
                rows.append((f'qgemm right int4 gate/up M={m}', res))
                print(rows[-1], flush=True)
    print('\nkernel                               regs  local  shared')
    for name, res in rows:
        print(f"{name:36s} {res['regs']:4d} {res['local']:6d} {res['shared']:7d}")


if __name__ == '__main__':
    main(sys.argv[1:])
