"""Batched sampling: each request's seeded stream is its own (alone or in any batch), the draws
follow softmax(logits / T) cut to top-p, and one step costs the same ops at any batch size."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.glimpse.engine import Request
from pipeline.glimpse.sampling import BatchSampler, SamplingParams, _uniforms
from tests.conftest import fixture_cases, fixture_requests

# 0.999 quantiles of the chi-square distribution by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def expected_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the smallest most-likely set whose mass reaches top_p."""
    probs = (logits.double() / temperature).softmax(-1)
    ordered, order = probs.sort(descending=True)
    kept = ordered.cumsum(0) - ordered <= top_p
    out = torch.zeros_like(probs)
    out[order[kept]] = ordered[kept]
    return out / out.sum()


def assert_matches(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    n = len(tokens)
    counts = torch.bincount(tokens, minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0, "drew a token outside top-p"
    assert (counts / n - expected).abs().max() < 0.01
    kept = expected > 0
    chi2 = float(((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum())
    assert chi2 < CHI2_999[int(kept.sum()) - 1], chi2


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 0.8), (1.0, 1.0), (1.5, 0.95)])
def test_draws_over_seeds_follow_the_top_p_distribution(temperature, top_p):
    n = 40_000
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=s, max_new_tokens=6) for s in range(n)]
    tokens = BatchSampler(params, "cpu")(LOGITS.expand(n, -1), 5)
    assert_matches(tokens, expected_probs(LOGITS, temperature, top_p))


def test_draws_over_one_seeds_steps_follow_the_top_p_distribution():
    n = 40_000
    sampler = BatchSampler([SamplingParams(temperature=0.7, top_p=0.8, seed=123, max_new_tokens=n)], "cpu")
    tokens = torch.cat([sampler(LOGITS[None], step) for step in range(n)])
    assert_matches(tokens, expected_probs(LOGITS, 0.7, 0.8))


def test_uniforms_are_uniform_and_uncorrelated_across_seeds_and_steps():
    u = _uniforms(list(range(2_000)), 50, "cpu")  # [seeds, steps]
    assert u.min() >= 0 and u.max() < 1
    histogram = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (histogram - 0.1).abs().max() < 0.005
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:])):  # neighbouring seeds, neighbouring steps
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.02
    assert u[:, 0].unique().numel() == 2_000  # no two seeds start alike
    # Seeds are taken modulo 2^64, like torch.manual_seed.
    assert torch.equal(_uniforms([-1], 3, "cpu"), _uniforms([2**64 - 1], 3, "cpu"))


def test_a_row_draws_the_same_alone_and_in_any_batch():
    """Its stream, and its top-p cut, do not depend on the other rows (their settings included)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    params = [
        SamplingParams(temperature=1.0, seed=7, max_new_tokens=20),  # no top-p, next to rows with it
        SamplingParams(temperature=0.5, top_p=0.7, seed=8, max_new_tokens=20),
        SamplingParams(max_new_tokens=20),  # greedy
        SamplingParams(temperature=2.0, top_p=0.9, seed=7, max_new_tokens=3),
        SamplingParams(temperature=1.3, seed=1, max_new_tokens=20),
    ]
    batch = BatchSampler(params, "cpu")
    reversed_batch = BatchSampler(params[::-1], "cpu")
    for step in range(3):
        together = batch(logits, step)
        assert torch.equal(reversed_batch(logits.flip(0), step), together.flip(0))
        for row, p in enumerate(params):
            assert int(BatchSampler([p], "cpu")(logits[row : row + 1], step)) == int(together[row])
    assert int(together[2]) == int(logits[2].argmax())


def test_greedy_rows_are_the_argmax():
    logits = torch.randn(4, 30)
    sampled = SamplingParams(temperature=1.0, seed=3)
    tokens = BatchSampler([SamplingParams(), sampled, SamplingParams(), sampled], "cpu")(logits, 0)
    assert torch.equal(tokens[[0, 2]], logits[[0, 2]].argmax(-1))


def test_different_seeds_draw_different_streams():
    logits = torch.zeros(1, 100)  # uniform: any two independent streams differ almost surely

    def stream(seed: int) -> list[int]:
        sampler = BatchSampler([SamplingParams(temperature=1.0, seed=seed, max_new_tokens=32)], "cpu")
        return [int(sampler(logits, step)) for step in range(32)]

    streams = [stream(seed) for seed in range(8)]
    assert stream(3) == streams[3]
    assert len({tuple(s) for s in streams}) == 8
    assert all(len(set(s)) > 16 for s in streams)  # and a stream moves from step to step


class OpCount(TorchDispatchMode):
    """Counts the aten ops run inside it: a Python loop over rows would grow with the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def mixed_params(batch: int) -> list[SamplingParams]:
    kinds = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, seed=2),
        SamplingParams(),
    ]
    return [kinds[i % len(kinds)] for i in range(batch)]


@pytest.mark.parametrize("kinds", ["mixed", "greedy"])
def test_a_step_runs_the_same_ops_at_batch_1_and_64(kinds):
    counts = {}
    for batch in (1, 64):
        params = mixed_params(batch) if kinds == "mixed" else [SamplingParams()] * batch
        if kinds == "mixed" and batch == 1:
            params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1)]  # the same passes as the mix
        logits = torch.randn(batch, 1000)
        with OpCount() as built:
            sampler = BatchSampler(params, "cpu")
        with OpCount() as step:
            sampler(logits, 3)
        counts[batch] = (built.count, step.count)
    assert counts[1] == counts[64], counts
    if kinds == "greedy":
        assert counts[1] == (0, 1)  # the argmax alone


# ---- through the engine ------------------------------------------------------------------------


def sampled_requests() -> list[Request]:
    """The five fixture cases with mixed settings; two rows finish early, so the batch shrinks."""
    settings = [
        SamplingParams(max_new_tokens=8),  # greedy
        SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11),
        SamplingParams(max_new_tokens=2, temperature=0.7, seed=5),
        SamplingParams(max_new_tokens=8, temperature=1.3, seed=11),  # the same seed as row 1
        SamplingParams(max_new_tokens=3),  # greedy
    ]
    requests = fixture_requests()
    for request, sampling in zip(requests, settings):
        request.sampling = sampling
    return requests


def test_a_seeded_request_gets_the_same_tokens_alone_and_in_mixed_batches(fixture_engine):
    requests = sampled_requests()
    alone = [fixture_engine.generate([r])[0].new_tokens for r in requests]
    together = [r.new_tokens for r in fixture_engine.generate(requests, batch_size=5)]
    reordered = fixture_engine.generate(requests[::-1], batch_size=5)[::-1]
    pairs = fixture_engine.generate(requests, batch_size=2)
    assert together == alone
    assert [r.new_tokens for r in reordered] == alone
    assert [r.new_tokens for r in pairs] == alone
    # Greedy rows keep the fixture's tokens; sampled rows really sample.
    greedy = [case["glimpse"]["new_tokens"] for case in fixture_cases()]
    assert alone[0] == greedy[0] and alone[4] == greedy[4][:3]
    assert alone[1] != greedy[1][: len(alone[1])] and alone[3] != greedy[3][: len(alone[3])]


def test_different_seeds_give_different_answers(fixture_engine):
    request = fixture_requests()[0]
    answers = set()
    for seed in range(4):
        request.sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed, ignore_eos=True)
        answers.add(tuple(fixture_engine.generate([request])[0].new_tokens))
    assert len(answers) == 4
