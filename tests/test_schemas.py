"""Rows → schema tables: every row's columns survive, whatever the first row holds."""

from __future__ import annotations

import pytest

from schemas import PREPARED_SCHEMA, align


def test_align_keeps_columns_the_first_row_lacks():
    failed = {"id": "bad", "images": ["x.png"], "error": "ValueError: cannot decode"}
    prepared = {"id": "ok", "images": ["y.png"], "input_ids": [1, 2], "image_grid_thw": [1, 2, 2]}
    table = align([failed, prepared], PREPARED_SCHEMA)
    assert table.schema == PREPARED_SCHEMA
    assert table.to_pylist()[0]["error"] == "ValueError: cannot decode"
    assert table.to_pylist()[1]["input_ids"] == [1, 2] and table.to_pylist()[1]["error"] is None


def test_align_refuses_a_row_without_a_required_column():
    with pytest.raises(ValueError, match="id"):
        align([{"id": "a", "images": []}, {"images": []}], PREPARED_SCHEMA)


def test_align_refuses_values_that_overflow():
    with pytest.raises((OverflowError, ValueError)):
        align([{"id": "a", "images": [], "max_new_tokens": 2**40}], PREPARED_SCHEMA)
