"""Backends `fused` and `persistent`: lean batch-1 decoders over the loaded model's weights.

The decoder's backend table (engine/decoder.py) names both. Triton is imported only when a
backend on the Triton path is built, so the CPU path needs no Triton and a test can switch
Triton to its interpreter before the kernels are defined.
"""
from decode_monitor.engine.fused.model import FusedBackend
from decode_monitor.engine.fused.persistent_model import PersistentBackend

__all__ = ['FusedBackend', 'PersistentBackend']
