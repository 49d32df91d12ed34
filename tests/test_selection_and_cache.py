"""Token selection rules and the prunable cache, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from pipeline.glimpse.cache import PrunableKVCache
from pipeline.glimpse.engine import _left_packed
from pipeline.glimpse.selection import SelectionOptions, select_tokens


def logits_for(probs):
    p = torch.tensor(probs)
    return torch.log(p / (1 - p))


def test_threshold_keeps_tokens_above_it():
    keep = select_tokens(logits_for([0.9, 0.2, 0.6, 0.4]), SelectionOptions(threshold=0.5, min_kept=0))
    assert keep.tolist() == [True, False, True, False]


def test_ratio_cap_keeps_top_k():
    keep = select_tokens(logits_for([0.9, 0.8, 0.7, 0.95, 0.1]), SelectionOptions(max_keep_ratio=0.4))
    assert keep.tolist() == [True, False, False, True, False]


def test_min_kept_tops_up():
    keep = select_tokens(logits_for([0.1, 0.3, 0.2]), SelectionOptions(min_kept=2))
    assert keep.tolist() == [False, True, True]


@pytest.mark.parametrize(
    "bad", [dict(threshold=1.5), dict(max_keep_ratio=0.0), dict(min_kept=-1), dict(keep_ratio=1.5)]
)
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        SelectionOptions(**bad)


def test_left_packing_keeps_order_and_pads_left():
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    index, valid = _left_packed(keep)
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert index[0].tolist() == [0, 2, 3] and index[1, -1].item() == 2


def test_cache_gathers_merges_chunks_right_aligned_and_drops_rows():
    first, second = PrunableKVCache(1), PrunableKVCache(1)
    k = torch.arange(2 * 4, dtype=torch.float).view(2, 1, 4, 1)
    first.update(k, -k, 0)
    first.gather_columns(torch.tensor([[0, 3], [1, 2]]), range(1))
    second.update(torch.full((1, 1, 3, 1), 7.0), torch.full((1, 1, 3, 1), -7.0), 0)
    cache = PrunableKVCache.merged([first, second], extra=2)
    assert cache.keys[0].shape[2] == 5 and cache.lengths == [3]
    keys, values = cache.update(torch.full((3, 1, 1, 1), 9.0), torch.full((3, 1, 1, 1), -9.0), 0)
    assert keys.data_ptr() == cache.keys[0].data_ptr()  # written in place, no new buffer
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 3, 9], [0, 5, 6, 9], [7, 7, 7, 9]]
    assert torch.equal(values, -keys)
    cache.select_rows(torch.tensor([1]))
    assert cache.layer(0)[0][:, 0, :, 0].tolist() == [[0, 5, 6, 9]]


def test_keep_ratio_keeps_exactly_that_share_whatever_the_threshold():
    probs = [0.9, 0.8, 0.7, 0.95, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert select_tokens(logits_for(probs), SelectionOptions(keep_ratio=0.2)).nonzero().flatten().tolist() == [0, 3]
    low = SelectionOptions(threshold=0.0, keep_ratio=0.3)  # a threshold that would keep everything
    assert int(select_tokens(logits_for(probs), low).sum()) == 3
    assert int(select_tokens(logits_for(probs[:3]), SelectionOptions(keep_ratio=0.074)).sum()) == 1


def test_overridden_changes_only_what_is_given():
    base = SelectionOptions(threshold=0.4, max_keep_ratio=0.5, min_kept=2)
    assert base.overridden(threshold=None, max_keep_ratio=0.1) == SelectionOptions(0.4, 0.1, 2)
