"""The decode KV-cache budget holds at its true peak: while chunks merge, while the next chunk
prefills, and while finished rows leave the batch."""

from __future__ import annotations

import weakref

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.glimpse.cache import PrunableKVCache
from tests.conftest import fixture_requests


class CacheBytes(TorchDispatchMode):
    """After every tensor op, the bytes held by all live KV caches (chunks' and merged); keeps the peak."""

    def __init__(self, caches: weakref.WeakSet) -> None:
        super().__init__()
        self.caches, self.peak = caches, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for cache in list(self.caches)
            for t in [*cache.keys, *cache.values]
            if t is not None
        }
        self.peak = max(self.peak, sum(storages.values()))
        return out


@pytest.fixture
def live_caches(monkeypatch) -> weakref.WeakSet:
    caches = weakref.WeakSet()
    init = PrunableKVCache.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.add(self)

    monkeypatch.setattr(PrunableKVCache, "__init__", tracked)
    return caches


def cache_peak(engine, requests, caches, **batching) -> tuple[int, list]:
    prompts = [engine.prepare(r) for r in requests]
    with CacheBytes(caches) as counted:
        results = engine.generate_prepared(requests, prompts, prune=False, prefill_rows=1, **batching)
    return counted.peak, results


def test_the_kv_cache_stays_within_its_budget_at_its_peak(fixture_engine, live_caches):
    requests = fixture_requests(max_new_tokens=6)
    alone = max(cache_peak(fixture_engine, [r], live_caches)[0] for r in requests)
    together, _ = cache_peak(fixture_engine, requests, live_caches)
    budget = int(1.5 * alone)  # room for the largest request alone, not for all of them at once
    assert budget < together

    peak, results = cache_peak(fixture_engine, requests, live_caches, cache_budget_bytes=budget)

    assert peak <= budget, f"peak {peak} over the budget {budget}"
    decode_batches = {r.batch_prefill_s for r in results}
    assert 1 < len(decode_batches) < len(requests)  # batched as far as the budget allows
    unbounded = {r.id: r.new_tokens for r in fixture_engine.generate(requests, prune=False, batch_size=8)}
    assert {r.id: r.new_tokens for r in results} == unbounded
