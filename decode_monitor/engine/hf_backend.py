"""Backend `hf`: transformers' own forward over a StaticCache (the study's runtime).

It attends over the whole static cache (masked) and repeats K/V heads for GQA; that cost is part of
what the study measured, so it is kept as it is here.

`batch=b` holds b sequences in the cache, all at the same position: a step decodes one token of
each (the bench's batch axis; serving stays batch 1).
"""
import torch
from transformers import StaticCache


class HFBackend:
    name = 'hf'
    batched = True  # Decoder(batch=b) with b > 1 builds it with batch=b

    def __init__(self, model, max_context, batch=1):
        if model.__dict__.get('_dense_released'):
            raise ValueError('the hf backend needs the dense weights, and this model\'s were '
                             'released after quantising (the fused backend serves it)')
        self.model = model
        self.max_context = max_context
        self.batch = batch
        config = model.config
        head_dim = getattr(config, 'head_dim', None) or (
            config.hidden_size // config.num_attention_heads)
        self.cache = StaticCache(config=config, max_cache_len=max_context)
        # Allocate now: graph capture needs the cache tensors to exist before the first step.
        self.cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype,
                                        model.device)

    def seek(self, pos):
        """Make the next K/V write land at `pos`.

        StaticCache layers write at their own device-side counter, not at cache_position, so the
        counters must follow the decoder's position whenever it jumps (a new prompt, a timing run).
        """
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(pos)

    @torch.no_grad()
    def save_prefix(self, n):
        """A copy of the K/V at positions 0..n-1 (load_prefix puts it back)."""
        return [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone())
                for layer in self.cache.layers]

    @torch.no_grad()
    def load_prefix(self, saved):
        for layer, (keys, values) in zip(self.cache.layers, saved):
            n = keys.shape[2]
            layer.keys[:, :, :n].copy_(keys)
            layer.values[:, :, :n].copy_(values)

    @torch.no_grad()
    def prefill(self, ids, start_pos=0):
        """ids: (1, T) prompt tokens written at positions start_pos.. -> logits (1, vocab)."""
        self.seek(start_pos)
        positions = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)
        out = self.model(input_ids=ids, position_ids=positions[None], cache_position=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def forward_one(self, token, pos):
        """token: (batch, 1), pos: (1,) device tensors -> logits (batch, vocab).
        Graph-capturable."""
        position_ids = pos.view(1, 1)
        if self.batch > 1:  # every sequence at the same position
            position_ids = position_ids.expand(self.batch, 1)
        out = self.model(input_ids=token, position_ids=position_ids, cache_position=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def randomize_cache(self):
        """Fill K/V with random values so timed steps never run on zeros."""
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
