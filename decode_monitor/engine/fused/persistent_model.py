"""Backend `persistent`: the fused backend's step with each decoder layer one launch.

The weights, the torch path (CPU, prefill), the embedding row, the final norm and lm_head are
the fused backend's; on the Triton path each layer's q/k/v, attention, o_proj, gate/up and down
run as the tasks of persistent launches (persistent.py; persistent_launch.py's layouts: the
whole layer one launch, two, or by default q/k/v and o_proj..down each one launch with the
fused attention kernels between them), so a step is 31 to 115 launches instead of about 170.
bf16, int8 or int4 weights (the fused backend's formats). On the CPU (no CUDA) it decodes
on the torch path, which computes the same stages in the same order with torch ops; the tests
also run the kernel itself under Triton's interpreter, whose programs run one after another and
take the tickets in order, so every wait there is met at its first poll.

Where the persistent kernel cannot run (it does not compile for this GPU, or no program of it
fits on an SM) the backend serves the fused step instead, says so in a WARN, and counts it in
`fallbacks`; `fallback_reason` keeps the cause. A wait that gives up (it should never: see
persistent.py) raises an error flag that `timeouts()` reads.
"""
import logging

import torch

from decode_monitor.engine.fused.model import FusedBackend

log = logging.getLogger(__name__)


class PersistentBackend(FusedBackend):
    name = 'persistent'
    formats = ('bf16', 'int8', 'int4')
    tunable = True  # lm_head (and the fallback) launch with the fused kernels' configs

    def __init__(self, model, max_context, use_triton=None, attention_config=None,
                 weights='bf16', kernel_configs=None, persistent_config=None):
        if weights not in self.formats:
            raise ValueError(f'backend persistent serves {self.formats}, not {weights!r}')
        self._persistent_config = persistent_config
        self.fallbacks = 0
        self.fallback_reason = None
        self.layers_kernel = None
        super().__init__(model, max_context, use_triton=use_triton,
                         attention_config=attention_config, weights=weights,
                         kernel_configs=kernel_configs)

    def _init_triton(self):
        super()._init_triton()
        from decode_monitor.engine.fused.persistent_launch import PersistentLayers
        try:
            kernel = PersistentLayers(self, self._persistent_config)
        except Exception as exc:  # noqa: BLE001  any compile or launch-resource failure
            return self._fall_back(f'the persistent kernel does not build here: {exc}')
        if kernel.per_sm is not None and kernel.per_sm < 1:
            return self._fall_back('no program of the persistent kernel fits on an SM '
                                   f'({kernel.n_regs} registers, {kernel.shared} B shared)')
        self.layers_kernel = kernel

    def _fall_back(self, reason):
        self.fallbacks += 1
        self.fallback_reason = reason
        log.warning('backend persistent: %s; serving the fused step', reason)

    def timeouts(self):
        return 0 if self.layers_kernel is None else self.layers_kernel.timeouts()

    @torch.no_grad()
    def forward_one(self, token, pos):
        """As FusedBackend.forward_one; each layer the persistent kernel's launches."""
        kernel = self.layers_kernel
        if not self.use_triton or kernel is None:
            return super().forward_one(token, pos)
        # every layer's ticket and done-counts zeroed first: with PDL a layer's programs take
        # their first ticket before waiting for the kernel before them (persistent.py)
        kernel.cnt.zero_()
        torch.index_select(self.embed, 0, token.view(1), out=self.h)
        for i in range(len(self.layers)):
            kernel(i, pos)
        self._gemv.gemv(self.lm_head, self.h.view(-1), self.logits[0], norm_weight=self.norm,
                        eps=self.eps, kind='head', config=self.launch_configs['lm_head'])
        return self.logits
