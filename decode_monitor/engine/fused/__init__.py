"""Backends `fused` and `persistent`: lean batch-1 decoders over the loaded model's weights.

Importing this package registers both with the decoder (`Decoder(..., backend='fused')`); the
engine's factory and bench import it where they list backends.
Triton is imported only when a backend on the Triton path is built, so the CPU path needs no
Triton and a test can switch Triton to its interpreter before the kernels are defined.
"""
from decode_monitor.engine.decoder import register_backend
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.fused.persistent_model import PersistentBackend

register_backend('fused', FusedBackend)
register_backend('persistent', PersistentBackend)

__all__ = ['FusedBackend', 'PersistentBackend']
