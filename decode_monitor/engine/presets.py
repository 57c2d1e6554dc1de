"""Architecture presets: the study's models (and tiny test variants) with random weights.

Dense bf16 step time does not depend on weight values, so a preset times exactly like the real
checkpoint without downloading one. Values are the models' public configuration.
"""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

PRESETS = {
    'qwen2.5-7b': dict(model_type='qwen2', hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
    'llama-3-8b': dict(model_type='llama', hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, rope_theta=5e5, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    'mistral-7b': dict(model_type='mistral', hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, sliding_window=None),
    'smollm2-135m': dict(model_type='llama', hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, rope_theta=1e5, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    # Small enough for CPU tests; same shape family (GQA, untied lm_head) as the study's models.
    'tiny': dict(model_type='llama', hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False),
    'tiny-qwen2': dict(model_type='qwen2', hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}


def preset_config(name, max_position_embeddings=32768):
    """Build a transformers config for a preset name."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; known: {", ".join(sorted(PRESETS))}')
    values = dict(PRESETS[name])
    model_type = values.pop('model_type')
    rope_theta = values.pop('rope_theta')
    heads = values['num_attention_heads']
    config = AutoConfig.for_model(
        model_type, head_dim=values['hidden_size'] // heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **values)
    return config


def build_preset(name, device='cpu', dtype=torch.bfloat16, seed=0):
    """Instantiate a preset with random weights directly on `device` (seconds for a 7B on GPU)."""
    config = preset_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
