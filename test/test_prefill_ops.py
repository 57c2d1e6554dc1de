"""The Triton prefill's element-wise kernels (prefill_ops.py) against the torch path's
functions (prefill.py), under the interpreter on the CPU. The interpreter rounds float32 to
bf16 by truncation where the GPU rounds to nearest even, so bf16 values agree within one unit
in the last place here (the GPU tests compare the two paths' tokens)."""
import pytest
import torch

from decode_monitor.engine.fused import prefill, prefill_ops


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_residual_sum_and_norm_in_one_pass(dtype):
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 5, 96, generator=gen) * 3).to(dtype)  # H not a power of two
    w = (1 + torch.randn(96, generator=gen)).to(dtype)
    total, normed = prefill_ops.add_rms_norm(x, y, w, 1e-6)
    ref_total, ref_normed = prefill.add_rms_norm(x, y, w, 1e-6)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(total, ref_total, rtol=ulp, atol=0)
    torch.testing.assert_close(normed, ref_normed, rtol=4 * ulp, atol=1e-6)  # three roundings
    # the norm is the rounded sum's, as the separate kernels compute it
    assert torch.equal(normed, prefill_ops.rms_norm(total, w, 1e-6))
