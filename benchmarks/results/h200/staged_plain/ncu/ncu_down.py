"""int8 down_proj (3584 x 18944) GEMV at three configs, each launched 3 times, for ncu."""
import sys
import torch
sys.path.insert(0, '.')
from decode_monitor.engine.fused import gemv as G  # noqa: E402
from decode_monitor.engine.fused.configs import GemvConfig  # noqa: E402
from decode_monitor.engine.fused.quant import quantize  # noqa: E402
w = quantize(torch.randn(3584, 18944, device='cuda', dtype=torch.bfloat16) * 0.01, 'int8')
x = torch.randn(18944, device='cuda', dtype=torch.bfloat16)
y = torch.zeros(3584, device='cuda', dtype=torch.bfloat16)
for c in [GemvConfig(4, 1024, 4, 3), GemvConfig(32, 512, 8, 1, 5, None, True),
          GemvConfig(64, 512, 8, 1, 4, None, True)]:
    for _ in range(3):
        G.gemv(w, x, y, residual=y, config=c)
    torch.cuda.synchronize()
print('done')
