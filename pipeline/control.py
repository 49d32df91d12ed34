"""Which rows are control rows: also run unpruned, to measure what pruning saved and changed.

A sample by a hash of the id, so the same rows are controls in every run, on every actor, and
in a resumed run; `--control-fraction` takes a share of them, `--control-rows` a fixed number.
"""

from __future__ import annotations

import hashlib


def in_control_sample(row_id: str, fraction: float) -> bool:
    """A deterministic sample by id: the same rows are controls in every run and on every actor."""
    return fraction > 0 and _id_hash(row_id) < fraction * 2**64


def control_sample(ids, rows: int) -> frozenset[str]:
    """`rows` ids, the same in every run: those whose hash is smallest (the first ones that any
    fraction of in_control_sample would take)."""
    return frozenset(sorted(ids, key=_id_hash)[:rows])


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")
