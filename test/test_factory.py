"""build_decoder's choices for `auto` settings."""
import pytest


def test_auto_backend_falls_back_to_hf_for_a_model_fused_cannot_serve(tmp_path, smollm2):
    """A sliding window shorter than the cache: fused refuses it, auto serves it with hf."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from decode_monitor.engine.factory import build_decoder, DecoderSettings
    from decode_monitor.engine.presets import preset_config
    config = preset_config('tiny')
    config.sliding_window = 8
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).sliding_window == 8
    settings = DecoderSettings(model=str(tmp_path), device='cpu', max_context=64)
    assert build_decoder(settings).backend.name == 'hf'
    with pytest.raises(ValueError, match='sliding-window'):
        build_decoder(DecoderSettings(model=str(tmp_path), device='cpu', max_context=64,
                                      backend='fused'))
    assert build_decoder(DecoderSettings(model='tiny', device='cpu')).backend.name == 'fused'
