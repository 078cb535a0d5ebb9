"""`mesh.bounded.BoundedMemo`: at most `size` entries, emptied when a new key would pass that; a key
already there is replaced without emptying."""

from __future__ import annotations

from mesh.bounded import BoundedMemo


def test_a_full_memo_is_emptied_for_a_new_key_only() -> None:
    memo: BoundedMemo[int, str] = BoundedMemo(3)
    assert [memo.keep(k, str(k)) for k in (1, 2, 3)] == ["1", "2", "3"]
    assert memo.keep(2, "two") == "two" and memo == {1: "1", 2: "two", 3: "3"}  # full, but a known key
    memo.keep(4, "4")
    assert memo == {4: "4"} and memo.get(1) is None
    for k in range(10):
        memo.keep(k, "x")
        assert len(memo) <= 3
