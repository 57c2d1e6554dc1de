"""The prefill's GEMM on quantised codes (qgemm.py) against QuantWeight.dequantize, and its use.

On the CPU in Triton's interpreter, tiny shapes: both tile layouts (weights left: a dot per
lane, lanes reordered, each weight's word gathered; weights right: x in lane order, one dot a
group; its GPU-only PTX dequantisation runs in the GPU session), K split over programs, group
sizes 32-128, M and N not multiples of the blocks, a K not a multiple of BLOCK_K. float32
activations give float32 products: the result must be the float32 GEMM on the dequantised
matrix to rounding; a weight read from a wrong lane, group or row moves it by the size of the
weights themselves. The prefill takes it for int4 and leaves the dense buffer unmade; int8
keeps the buffer; start-up warming runs it where the prefill will.
"""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402

from decode_monitor.engine.fused import FusedBackend  # noqa: E402
from decode_monitor.engine.fused import qgemm as Q  # noqa: E402
from decode_monitor.engine.fused.quant import quantize  # noqa: E402

DEV = 'cuda' if torch.cuda.is_available() else 'cpu'
C = Q.QGemmConfig
# (M, N, K, group, config): None is the table's for M
CASES = [
    (1, 70, 256, 128, None),  # one token, N past the last block
    (37, 96, 384, 128, C(64, 16, 128, 4, 1, 1, 1)),  # a dot per lane, three M blocks
    (19, 64, 384, 128, C(64, 16, 128, 4, 1, 3, 2)),  # lanes reordered, K split in three
    (21, 80, 320, 64, C(64, 16, 128, 4, 1, 1, 0)),  # gathered; K = 2.5 blocks: a tail
    (5, 64, 96, 32, C(64, 16, 32, 4, 1, 3, 0)),  # groups of 32, split
    # weights on the right (int4; int8 takes the left kernel with these blocks)
    (70, 200, 384, 128, C(128, 64, 128, 4, 1, 1, weights_right=True)),  # M and N tails
    (5, 96, 256, 64, C(64, 64, 64, 4, 1, 2, weights_right=True)),  # groups of 64, K split
    (9, 64, 128, 32, C(64, 64, 32, 4, 1, 1, weights_right=True)),  # groups of 32
]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize('fmt', ['int4', 'int8'])
@pytest.mark.parametrize('m, n, k, group, config', CASES)
def test_qgemm_is_the_gemm_on_the_dequantised_matrix(fmt, m, n, k, group, config):
    w = quantize(randn(n, k, seed=k).to(torch.bfloat16), fmt, group)
    x, bias = randn(m, k, seed=m), randn(n, seed=n)
    want = (x.double() @ w.dequantize(torch.float32).double().T + bias.double()).float()
    got = Q.qgemm(x, w, bias, config)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # bf16 activations: the dequantised bf16 matrix (dequantize's rounding) in float32 products,
    # one rounding at the end (the interpreter truncates: up to one bf16 step)
    xb = x.to(torch.bfloat16)
    want = xb.float() @ w.dequantize(torch.bfloat16).float().T
    got = Q.qgemm(xb, w, None, config)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7,
                               atol=2 ** -7 * want.abs().max().item())


def test_a_strided_x_and_bad_shapes():
    w = quantize(randn(64, 256, seed=1).to(torch.bfloat16), 'int4')
    wide = randn(7, 512, seed=2)
    x = wide[:, :256]  # rows of a wider tensor: a row stride of 512
    torch.testing.assert_close(Q.qgemm(x, w), Q.qgemm(x.contiguous(), w), rtol=0, atol=0)
    with pytest.raises(ValueError, match='K = 512'):
        Q.qgemm(wide, w)


def test_the_table_covers_every_length_up_to_max_m():
    bounds = [bound for bound, _ in Q.CONFIGS]
    assert bounds == sorted(bounds) and Q.MAX_M in bounds
    assert Q.config_for(1) == Q.CONFIGS[0][1] and Q.config_for(10 ** 6) == Q.CONFIGS[-1][1]
    assert Q.config_for(3, torch.float32) == Q.FLOAT32


@pytest.mark.parametrize('fmt', ['int4', 'int8'])
def test_the_prefill_reads_int4_mlp_codes_and_the_rest_through_the_buffer(tiny, fmt):
    """On the Triton path int4 gate/up and down of up to MAX_M tokens read their codes, every
    other quantised matrix is dequantised into the buffer; logits as the torch path's (dense
    matrices kept) to rounding either way."""
    from decode_monitor.engine.fused.prefill import reads_codes
    model = copy.deepcopy(tiny.model).to(DEV)
    ids = torch.randint(0, 512, (1, Q.MAX_M + 1), generator=torch.Generator().manual_seed(4))
    kernels = FusedBackend(model, Q.MAX_M + 8, use_triton=True, weights=fmt)
    reference = FusedBackend(model, Q.MAX_M + 8, use_triton=False, weights=fmt)
    layer = kernels.layers[0]
    int4 = fmt == 'int4'
    assert [reads_codes(kernels, layer.wgu, m, True) for m in (1, Q.MAX_M, Q.MAX_M + 1)] == [
        int4, int4, False]
    assert reads_codes(kernels, layer.wd, 11, True) == int4
    assert not reads_codes(kernels, layer.wqkv, 11, False)
    assert not reads_codes(reference, reference.layers[0].wgu, 11, True)

    def same(prompt):
        got, want = kernels.prefill(prompt.to(DEV)), reference.prefill(prompt.to(DEV))
        return ((got - want).norm() / want.norm()).item() < 1e-4
    assert same(ids[:, :11])
    assert kernels._unpack_buffer is not None  # q/k/v and o_proj
    assert same(ids)  # past MAX_M tokens: the buffer path, int4 too


def test_start_up_warming_runs_the_gemm_on_codes_where_the_prefill_does(tiny, monkeypatch):
    """An eager prefill of up to MAX_M tokens multiplies int4 gate/up and down on their codes:
    warming must run that kernel (compiled per config: on the GPU, a prompt length the warm-up
    skipped would compile at the first request), at every padded row count it serves, and the
    buffer path everywhere else."""
    model = copy.deepcopy(tiny.model).to(DEV)
    backend = FusedBackend(model, 300, use_triton=True, weights='int4')
    backend.pad_rows = True
    seen, real = [], Q.qgemm

    def recording(x, w, bias=None, config=None):
        seen.append((x.shape[0], w.shape))
        return real(x, w, bias, config)
    monkeypatch.setattr(Q, 'qgemm', recording)
    assert backend.warm_prefill_shapes() == list(range(16, 289, 16))
    layer = backend.layers[0]
    assert seen == [(m, w.shape) for m in range(16, Q.MAX_M + 1, 16)
                    for w in (layer.wgu, layer.wd)]
