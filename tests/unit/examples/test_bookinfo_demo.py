"""`make demo` (examples/bookinfo/demo.py): it warns before it replaces a bookinfo cluster that is up, and
asks first on a terminal; it reads the reviews split from the answers the sleep pod got."""

from __future__ import annotations

import io
import subprocess
from collections import Counter

import pytest

from examples.bookinfo import demo


def listing(stdout: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["meshctl"], 0, stdout, "")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_to_replace(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "meshctl", lambda *a, **k: listing("CURRENT  NAME   STATUS\n*        t-x    up\n"))
    assert demo.may_replace() is True and capsys.readouterr().out == ""


@pytest.mark.parametrize(("answer", "replaced"), [("y\n", True), ("\n", False), ("no\n", False)])
def test_asks_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answer: str,
                            replaced: bool) -> None:
    monkeypatch.setattr(demo, "meshctl", lambda *a, **k: listing("CURRENT  NAME      STATUS\n*        bookinfo  up\n"))
    monkeypatch.setattr("sys.stdin", Tty(answer))
    assert demo.may_replace() is replaced
    out = capsys.readouterr().out
    assert out.startswith("warning: a cluster named bookinfo is up; the demo removes it")
    assert ("left as it is" in out) is not replaced


def test_warns_and_replaces_without_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "meshctl", lambda *a, **k: listing("CURRENT  NAME      STATUS\n         bookinfo  up\n"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert demo.may_replace() is True
    assert "warning: a cluster named bookinfo is up" in capsys.readouterr().out


def test_reviews_split_counts_answers_and_missing_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = ('{"reviews": {"version": "v1"}}\n\n{"reviews": {"version": "v3"}}\n\n'
               'curl: (28) Operation timed out\n{"reviews": {"version": "v1"}}\n\n')
    monkeypatch.setattr(demo, "meshctl", lambda *a, **k: listing(answers))
    assert demo.reviews_split(4, "t-x") == (Counter({"v1": 2, "v3": 1}), 1)
