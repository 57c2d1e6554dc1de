import numpy as np
import pytest
import torch
from scipy import stats

from decode_monitor.engine.sampling import (SamplingParams, SamplingState, sample_greedy,
                                            sample_stochastic, uniform_noise)


def draw(logits, params, positions):
    state = SamplingState('cpu')
    state.load(params)
    return [int(sample_stochastic(logits, state, torch.tensor([p]))) for p in positions]


def test_noise_is_uniform_and_a_pure_function_of_its_inputs():
    u = uniform_noise(torch.tensor([3]), torch.tensor([7]), 100000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert stats.kstest(u.numpy(), 'uniform').pvalue > 1e-3
    assert torch.equal(u, uniform_noise(torch.tensor([3]), torch.tensor([7]), 100000))
    assert not torch.equal(u, uniform_noise(torch.tensor([4]), torch.tensor([7]), 100000))


def test_draws_follow_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    counts = np.bincount(draw(logits, SamplingParams(temperature=0.7, seed=1), range(20000)),
                         minlength=5)
    expected = torch.softmax(logits[0].double() / 0.7, -1).numpy() * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.9, 0.8]])
    assert set(draw(logits, SamplingParams(1.0, top_k=2, seed=5), range(500))) == {0, 1}
    # p(0) + p(1) is about 0.79 at T=1, so top_p 0.7 keeps exactly those two
    assert set(draw(logits, SamplingParams(1.0, top_p=0.7, seed=5), range(500))) == {0, 1}
    assert set(draw(logits, SamplingParams(1.0, top_k=1, seed=5), range(50))) == {0}
    assert set(draw(logits, SamplingParams(1.0, top_p=1e-6, seed=5), range(50))) == {0}


def test_tied_logits_give_the_same_draw_every_time():
    logits = torch.zeros(1, 1000)
    first = draw(logits, SamplingParams(1.0, seed=9), range(20))
    assert draw(logits, SamplingParams(1.0, seed=9), range(20)) == first
    assert len(set(first)) > 10


@pytest.mark.parametrize('vocab,top', [(7, 0), (7, 6), (49152, 31337), (49152, 49151)])
def test_greedy_picks_the_largest_logit(vocab, top):
    gen = torch.Generator().manual_seed(vocab + top)
    logits = torch.rand(1, vocab, generator=gen) * 10 - 5  # in [-5, 5)
    logits[0, top] = 5.5  # above every other by construction
    assert sample_greedy(logits).tolist() == [[top]]
    # a tie goes to the lowest id, so a greedy run is the same on every device
    logits[0, vocab // 2] = 7.0
    logits[0, vocab - 1 if top == 0 else 0] = 7.0
    assert sample_greedy(logits).tolist() == [[min(vocab // 2, vocab - 1 if top == 0 else 0)]]
