"""Backend `fused`: a lean batch-1 decoder over a transformers model's own weights.

At construction the Q/K/V and gate/up weights of each layer are concatenated once, and the
transformers modules are re-pointed at row slices of the packed copies, so the weights exist
once in memory and the `hf` backend keeps working on the same model.

Two paths compute the same function:
- Triton (CUDA default): six kernels a layer (QKV+norm+RoPE+cache write, split-K attention and
  its merge, o_proj+residual, gate/up+norm+SiLU, down+residual), no host sync, one graph per
  step, each kernel launched with PDL where the GPU has it (pdl.py).
- torch (CPU default, and prefill everywhere): the same packed weights through torch ops.

`weights='int8'` or `'int4'` quantises the four matrices of every layer (q/k/v, o, gate/up,
down) and lm_head at construction (see quant.py); the kernels read the codes and dequantise in
registers, the torch path multiplies by the dequantised matrices, and the floor counts the bytes
actually stored. A checkpoint that arrived quantised brings its own codes
(engine/checkpoints.py): those are served instead of quantising again. `release_dense` then frees
the model's dense copies, for a decoder that owns its model.
The input embedding stays dense: a step reads one row of it.
"""
import torch

from decode_monitor.engine.floor import FloorModel
from decode_monitor.engine.fused import prefill_shapes
from decode_monitor.engine.fused.prefill import torch_forward
from decode_monitor.engine.fused.quant import (
    FORMATS, QuantWeight, dense, quantize, weight_nbytes)


def _supported(model, max_context):
    config = model.config
    if getattr(config, 'hidden_act', 'silu') != 'silu':
        raise ValueError(f'fused backend supports SiLU MLPs, not {config.hidden_act!r}')
    # A window at least as long as the cache changes nothing; a shorter one would (Mistral
    # v0.1 slides every layer; Qwen2 with use_sliding_window, the layers its layer_types name).
    window = getattr(config, 'sliding_window', None)
    types = getattr(config, 'layer_types', None)
    if window is not None and window < max_context and (
            types is None or 'sliding_attention' in types):
        raise ValueError(f'fused backend has no sliding-window attention (window {window} < '
                         f'max_context {max_context})')
    layer = model.model.layers[0]
    if layer.self_attn.o_proj.bias is not None or layer.mlp.down_proj.bias is not None:
        raise ValueError('fused backend supports biases on q/k/v only')


def _pack(modules, attr):
    """Concatenate `attr` of modules along dim 0; re-point each module at its slice.

    The packed tensor is remembered on the first module, so a second backend on the same model
    (another max_context, say) shares it instead of packing again.
    """
    tensors = [getattr(m, attr) for m in modules]
    if tensors[0] is None:
        return None
    packed = getattr(modules[0], '_fused_packed', {}).get(attr)
    if packed is not None and _still_slices_of(packed, tensors):
        return packed
    packed = torch.cat([t.data for t in tensors], dim=0)
    offset = 0
    for t in tensors:
        rows = t.shape[0]
        t.data = packed[offset:offset + rows]  # a view: the original storage is freed
        offset += rows
    modules[0]._fused_packed = {**getattr(modules[0], '_fused_packed', {}), attr: packed}
    return packed


def _still_slices_of(packed, tensors):
    ptr = packed.data_ptr()
    for t in tensors:
        if t.data_ptr() != ptr or t.dtype != packed.dtype:
            return False
        ptr += t.numel() * t.element_size()
    return ptr == packed.data_ptr() + packed.numel() * packed.element_size()


MATRICES = ('wqkv', 'wo', 'wgu', 'wd')
MLP_MATRICES = ('wgu', 'wd')  # the prefill's `mlp` GEMMs (prefill.reads_codes)


class Layer:
    def __init__(self, block):
        attn, mlp = block.self_attn, block.mlp
        self.wqkv = _pack([attn.q_proj, attn.k_proj, attn.v_proj], 'weight')  # ((Hq+2Hkv)D, H)
        self.bqkv = _pack([attn.q_proj, attn.k_proj, attn.v_proj], 'bias')
        self.wo = attn.o_proj.weight  # (H, Hq D)
        self.wgu = _pack([mlp.gate_proj, mlp.up_proj], 'weight')  # (2I, H)
        self.wd = mlp.down_proj.weight  # (H, I)
        self.ln1 = block.input_layernorm.weight
        self.ln2 = block.post_attention_layernorm.weight

    def nbytes(self):
        tensors = [getattr(self, name) for name in MATRICES] + [self.ln1, self.ln2, self.bqkv]
        return sum(weight_nbytes(t) for t in tensors if t is not None)

    def dense(self):
        """A copy of this layer with every matrix dense (dequantised): the torch path's view."""
        copy = object.__new__(Layer)
        copy.__dict__.update(self.__dict__)
        for name in MATRICES:
            setattr(copy, name, dense(getattr(self, name), self.ln1.dtype))
        return copy


class FusedBackend:
    name = 'fused'
    formats = FORMATS  # weight formats it serves (Decoder(weights=...))
    tunable = True  # launch configs from a kernel-config table (Decoder(kernel_configs=...))

    def __init__(self, model, max_context, use_triton=None, attention_config=None,
                 weights='bf16', kernel_configs=None):
        _supported(model, max_context)
        if model.__dict__.get('_dense_released') and weights not in model.__dict__.get(
                '_fused_quantised', {}):
            raise ValueError(f'this model\'s dense weights were released (release_dense); it '
                             f'can only be served in the formats already quantised, not '
                             f'{weights!r}')
        if weights not in FORMATS:
            raise ValueError(f'weights must be one of {FORMATS}, not {weights!r}')
        self.weights = weights
        config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.max_context = max_context
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, 'head_dim', None) or (
            config.hidden_size // self.q_heads)
        self.eps = config.rms_norm_eps
        inner = model.model
        self.scale = getattr(inner.layers[0].self_attn, 'scaling', self.head_dim ** -0.5)
        with torch.no_grad():
            self.layers = [Layer(block) for block in inner.layers]
            self.embed = inner.embed_tokens.weight  # (V, H)
            self.norm = inner.norm.weight
            self.lm_head = model.lm_head.weight  # (V, H); the embedding itself when tied
            if weights != 'bf16':
                self._quantise(model, weights)
        self.use_triton = self.device.type == 'cuda' if use_triton is None else use_triton
        # The torch path multiplies dense matrices. As the CPU reference path it keeps them;
        # beside the kernels (prefill) it dequantises a layer at a time, keeping the memory cut.
        self._keep_dense = weights != 'bf16' and not self.use_triton
        if self._keep_dense:
            self._dense_layers = [layer.dense() for layer in self.layers]
            self._dense_head = dense(self.lm_head, self.dtype)
        self._unpack_buffer = None  # the Triton path's prefill: see _dense_matrix
        self._prefill_ops = None  # the Triton path's prefill kernels, set in _init_triton
        self.prefill_graphs = None  # captured short prefills (capture_prefill)
        # eager prefills pad their rows to a bounded set of shapes, warmed at start-up
        self.pad_rows = self.device.type == 'cuda'
        self.attention_buckets = frozenset()  # cuDNN attention planned (warm_prefill_shapes)
        self.cos, self.sin = self._rope_tables(inner.rotary_emb, max_context)
        shape = (len(self.layers), self.kv_heads, max_context, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # launch configs: a KernelConfigs, a table file, 'defaults', or None (look one up)
        from decode_monitor.engine.fused.tables import resolve
        self.kernel_configs = resolve(kernel_configs, self.device)
        self._attention_config = attention_config  # an explicit one wins over the table
        if self.use_triton:
            self._init_triton()

    def _quantise(self, model, weights):
        """Swap in quantised matrices, made once per model and format and shared by every
        backend built on it afterwards (another max_context, say)."""
        cache = model.__dict__.setdefault('_fused_quantised', {})
        if weights not in cache:
            layers = [{name: quantize(getattr(layer, name), weights) for name in MATRICES}
                      for layer in self.layers]
            cache[weights] = (layers, quantize(self.lm_head, weights))
        layers, self.lm_head = cache[weights]
        for layer, matrices in zip(self.layers, layers):
            layer.__dict__.update(matrices)

    @torch.no_grad()
    def release_dense(self, model):
        """Free the model's dense copies of the matrices this backend serves quantised.

        What a robot quantises for is memory as much as traffic, but the layer matrices and
        lm_head stay loaded in the model's modules (and the packed q/k/v and gate/up copies)
        unless released. Afterwards only this backend (and others built on the same quantised
        copies) can serve the model: building the `hf` backend or a bf16 one raises. The
        embedding stays; a tied lm_head is the embedding and is kept. Returns the bytes freed.
        """
        if self.weights == 'bf16':
            raise ValueError('release_dense: the backend serves the dense weights themselves')
        inner = model.model
        modules = [m for block in inner.layers
                   for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                             block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj,
                             block.mlp.up_proj, block.mlp.down_proj)]
        # lm_head is freed when served quantised (a checkpoint may keep it dense: then it is
        # what this backend reads) and not tied to the embedding
        if (model.lm_head.weight is not inner.embed_tokens.weight
                and isinstance(self.lm_head, QuantWeight)):
            modules.append(model.lm_head)
        storages = {}
        for m in modules:
            storages[m.weight.untyped_storage().data_ptr()] = m.weight.untyped_storage().nbytes()
            m.weight.data = m.weight.data.new_empty(0)
        for m in modules:  # the packed copies the slices pointed into
            m.__dict__.pop('_fused_packed', None)
        model.__dict__['_dense_released'] = True
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()  # give the memory back to the driver, where others see it
        return sum(storages.values())

    def _rope_tables(self, rotary, max_context):
        """cos, sin (max_context, D / 2) fp32 from the model's own rotary module (any scaling)."""
        positions = torch.arange(max_context, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            cos, sin = rotary(probe, positions)  # (1, T, D) with both halves equal
        half = self.head_dim // 2
        return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()

    def _init_triton(self):
        from decode_monitor.engine.fused import gemv  # imports Triton
        self._gemv = gemv
        from decode_monitor.engine.fused import prefill_ops
        self._prefill_ops = prefill_ops if prefill_ops.usable(self.head_dim) else None
        self.set_kernel_configs(self.kernel_configs)
        hidden = self.embed.shape[1]
        inter = self.layers[0].wd.shape[1]
        qd = self.q_heads * self.head_dim
        new = dict(dtype=self.dtype, device=self.device)
        self.h = torch.empty(1, hidden, **new)  # residual stream, updated in place
        self.q = torch.empty(qd, **new)
        self.att = torch.empty(qd, **new)
        self.act = torch.empty(inter, **new)
        self.logits = torch.empty(1, self.vocab_size, dtype=torch.float32,
                                  device=self.device)
        self._caches = [(self.k_cache[i], self.v_cache[i]) for i in range(len(self.layers))]

    def gemv_keys(self):
        """{matrix: GemvKey} of the step's GEMVs: kind, the format the matrix is stored in (a
        tied lm_head stays dense), N and K."""
        from decode_monitor.engine.fused.configs import GemvKey
        layer = self.layers[0]
        hidden = self.embed.shape[1]
        shapes = {'wqkv': ('qkv', layer.wqkv, layer.wqkv.shape[0], hidden),
                  'wo': ('gemv', layer.wo, hidden, layer.wo.shape[1]),
                  'wgu': ('gated', layer.wgu, layer.wgu.shape[0] // 2, hidden),
                  'wd': ('gemv', layer.wd, hidden, layer.wd.shape[1]),
                  'lm_head': ('head', self.lm_head, self.vocab_size, hidden)}
        return {name: GemvKey(kind, w.fmt if isinstance(w, QuantWeight) else 'bf16', n, k)
                for name, (kind, w, n, k) in shapes.items()}

    def attention_key(self):
        return self.kv_heads, self.q_heads // self.kv_heads, self.max_context

    def set_kernel_configs(self, kernel_configs):
        """Launch the kernels with these configs from the next step on (a captured graph keeps
        the ones it was captured with)."""
        from decode_monitor.engine.fused.attention import DecodeAttention
        self.kernel_configs = kernel_configs
        on_cpu = self.device.type == 'cpu'
        self.launch_configs = {
            name: kernel_configs.gemv(key.kind, key.n, key.k, key.weights, on_cpu)
            for name, key in self.gemv_keys().items()}
        self.attention = DecodeAttention(
            self.q_heads, self.kv_heads, self.head_dim, self.max_context, self.device,
            scale=self.scale,
            config=self._attention_config or kernel_configs.attention(*self.attention_key()))

    @property
    def vocab_size(self):
        return self.lm_head.shape[0]

    def floor_model(self):
        """The floor of this backend's step: the bytes of the weights as stored (quantised or not).

        Every layer matrix, norm and bias, the final norm, lm_head in full and one embedding row;
        a tied lm_head that stays dense is the embedding itself, counted once in full.
        """
        total = sum(layer.nbytes() for layer in self.layers)
        total += weight_nbytes(self.norm) + weight_nbytes(self.lm_head)
        if self.lm_head is not self.embed:
            total += self.embed.shape[1] * self.embed.element_size()
        kv = len(self.layers) * 2 * self.kv_heads * self.head_dim * self.k_cache.element_size()
        return FloorModel(total, kv)

    # -- the seam ---------------------------------------------------------------------------
    def seek(self, pos):
        """Nothing to do: every K/V write lands at the position read from the pos tensor."""

    @torch.no_grad()
    def randomize_cache(self):
        self.k_cache.normal_()
        self.v_cache.normal_()

    @torch.no_grad()
    def save_prefix(self, n):
        """A copy of the K/V at positions 0..n-1 (load_prefix puts it back)."""
        return self.k_cache[:, :, :n].clone(), self.v_cache[:, :, :n].clone()

    @torch.no_grad()
    def load_prefix(self, saved):
        keys, values = saved
        n = keys.shape[2]
        self.k_cache[:, :, :n].copy_(keys)
        self.v_cache[:, :, :n].copy_(values)

    @torch.no_grad()
    def prefill(self, ids, start_pos=0):
        """ids (1, T) written at positions start_pos.. -> logits (1, vocab) fp32 of the last
        (from a captured graph when one serves this length: a static buffer)."""
        if self.prefill_graphs is not None:
            logits = self.prefill_graphs(ids, start_pos)
            if logits is not None:
                return logits
        if not self.pad_rows:
            return self._torch_forward(ids, start_pos)
        n = ids.shape[1]  # a bounded set of shapes, each warmed at start-up (prefill_shapes)
        rows, last = prefill_shapes.rows(n, start_pos, self.max_context), None
        if rows > n:
            ids = torch.cat([ids, ids.new_zeros((1, rows - n))], dim=1)
            last = torch.full((1,), n - 1, dtype=torch.long, device=ids.device)
        attend = prefill_shapes.attention(start_pos, rows, self.max_context,
                                          self.attention_buckets)
        return self._torch_forward(ids, start_pos, last=last, attend=attend)

    def warm_prefill_shapes(self):
        """Run the layer GEMMs at every row count an eager prefill pads to, and plan cuDNN's
        attention at every bucket a long fresh prefill pads to (prefill_shapes); the row
        counts run."""
        if not self.pad_rows:
            return []
        self.attention_buckets = prefill_shapes.warm_attention(self)
        layer = self.layers[0]
        return prefill_shapes.warm_gemms(self, [getattr(layer, name) for name in MATRICES],
                                         [layer.bqkv, None, None, None],
                                         [name in MLP_MATRICES for name in MATRICES])

    @torch.no_grad()
    def capture_prefill(self):
        """Capture the short prefills as CUDA graphs (prefill_graphs.py)."""
        from decode_monitor.engine.fused.prefill_graphs import PrefillGraphs
        self.prefill_graphs = None
        graphs = PrefillGraphs(self)
        graphs.capture()
        self.prefill_graphs = graphs

    @torch.no_grad()
    def logits_at_every_position(self, ids):
        """ids (1, T) from position 0 -> logits (T, vocab) fp32: teacher-forced evaluation."""
        return self._torch_forward(ids, 0, last_only=False)

    @torch.no_grad()
    def forward_one(self, token, pos):
        """token (1, 1), pos (1,) device tensors -> logits (1, vocab) fp32.

        On the Triton path the result is a static buffer, overwritten by the next step.
        """
        if not self.use_triton:
            return self._torch_forward(token, int(pos))  # a host read: CPU/reference only
        gemv, h, eps, cfg = self._gemv, self.h, self.eps, self.launch_configs
        torch.index_select(self.embed, 0, token.view(1), out=h)
        h = h.view(-1)
        for layer, (k_cache, v_cache) in zip(self.layers, self._caches):
            gemv.qkv_rope(layer.wqkv, layer.bqkv, h, layer.ln1, self.cos, self.sin, pos,
                          self.q, k_cache, v_cache, self.q_heads, self.kv_heads, eps,
                          config=cfg['wqkv'])
            self.attention(self.q, k_cache, v_cache, pos, self.att)
            gemv.gemv(layer.wo, self.att, h, residual=h, config=cfg['wo'])
            gemv.gemv(layer.wgu, h, self.act, norm_weight=layer.ln2, gated=True, eps=eps,
                      config=cfg['wgu'])
            gemv.gemv(layer.wd, self.act, h, residual=h, config=cfg['wd'])
        gemv.gemv(self.lm_head, h, self.logits[0], norm_weight=self.norm, eps=eps, kind='head',
                  config=cfg['lm_head'])
        return self.logits

    # -- torch path (prefill.py) ------------------------------------------------------------
    def _torch_forward(self, ids, start, last_only=True, last=None, keys=None, attend=None):
        return torch_forward(self, ids, start, last_only, last, keys, attend)
