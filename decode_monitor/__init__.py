"""decode_monitor: a batch-1 LLM decoder for robots, with truthful per-step diagnostics."""

__version__ = '0.1.0'
