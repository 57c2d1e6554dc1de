"""Resolve 'auto' settings and build a ready Decoder: what the node and the CLI tools share."""
from dataclasses import dataclass
import logging

import torch

from decode_monitor.engine.decoder import BACKENDS, Decoder
from decode_monitor.engine.sources import load_model

log = logging.getLogger(__name__)
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass(frozen=True)
class DecoderSettings:
    model: str = 'smollm2'
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    dtype: str = 'auto'  # auto | float32 | bfloat16 | float16
    mode: str = 'auto'  # auto (graph on CUDA, eager on a CPU) | graph | eager
    backend: str = 'auto'  # auto | hf | fused | persistent
    max_context: int = 2048
    weights: str = 'bf16'  # bf16 (as loaded) | int8 | int4 (weight-only, fused backend)
    # fused kernels' launch configs: a table file, 'defaults', or None (the user's cache for
    # this GPU, else the table shipped for it, else the defaults: engine/fused/tables.py)
    kernel_configs: str = None

    def resolved_device(self):
        if self.device == 'auto':
            return 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device.startswith('cuda') and not torch.cuda.is_available():
            raise ValueError(f'device {self.device!r} requested but CUDA is not available')
        return self.device

    def resolved_dtype(self, device):
        if self.dtype == 'auto':
            return torch.bfloat16 if device.startswith('cuda') else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype must be auto or one of {sorted(DTYPES)}, not {self.dtype!r}')
        return DTYPES[self.dtype]

    def resolved_mode(self, device):
        if self.mode == 'auto':
            return 'graph' if device.startswith('cuda') else 'eager'
        return self.mode

    def resolved_backend(self, device):
        """auto: fused (on a CPU its torch path decodes SmolLM2 faster than transformers'
        generate(): benchmarks/experiments/cpu_default_backend.py); a model fused cannot serve
        falls back to hf at build time (build_decoder)."""
        if self.backend == 'auto':
            return 'fused'  # also the only backend that serves quantised weights
        return self.backend


def build_decoder(settings):
    device = settings.resolved_device()
    dtype = settings.resolved_dtype(device)
    backend = settings.resolved_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f'backend must be auto or one of {sorted(BACKENDS)}, not {backend!r}')
    if settings.kernel_configs not in (None, 'defaults'):
        from decode_monitor.engine.fused.tables import load
        load(settings.kernel_configs)  # a bad table fails here, before minutes of loading
    loaded = load_model(settings.model, device=device, dtype=dtype)
    if loaded.stored_format and settings.weights != loaded.stored_format:
        log.warning('%s is stored as %s; weights=%s serves %s (weights=%s serves the stored '
                    'codes)', loaded.name, loaded.stored_format, settings.weights,
                    'its dequantised weights' if settings.weights == 'bf16'
                    else 'them quantised again', loaded.stored_format)
    options = dict(mode=settings.resolved_mode(device), max_context=settings.max_context,
                   weights=settings.weights, kernel_configs=settings.kernel_configs)
    try:
        decoder = Decoder(loaded, backend=backend, **options)
    except ValueError as exc:  # an architecture fused does not cover (sliding window, ...)
        if settings.backend != 'auto' or settings.weights != 'bf16' or backend != 'fused':
            raise
        log.warning('backend auto: %s; serving %s with backend hf', exc, loaded.name)
        decoder = Decoder(loaded, backend='hf', **options)
    if settings.weights != 'bf16':  # the model is this decoder's alone: keep only what it reads
        decoder.released_bytes = decoder.backend.release_dense(loaded.model)
    return decoder
