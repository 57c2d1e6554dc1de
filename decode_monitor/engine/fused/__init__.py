"""Backend `fused`: our own lean batch-1 decoder over the loaded model's weights.

Importing this package registers it with the decoder (`Decoder(..., backend='fused')`).
Triton is imported only when a backend on the Triton path is built, so the CPU path needs no
Triton and a test can switch Triton to its interpreter before the kernels are defined.
"""
from decode_monitor.engine.decoder import register_backend
from decode_monitor.engine.fused.model import FusedBackend

register_backend('fused', FusedBackend)

__all__ = ['FusedBackend']
