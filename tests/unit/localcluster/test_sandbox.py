"""`localcluster.sandbox` (what a pod runs as and sees) and `localcluster.projected` (token renewal)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ca.auth import NodeTokenIssuer
from localcluster.projected import due
from localcluster.sandbox import Sandbox, cover_point, hidden_roots


def test_the_command_runs_through_setpriv_without_privileges() -> None:
    argv = Sandbox(1234, 99, ()).argv(["sleep", "infinity"])
    assert argv[0] == "setpriv" and argv[-3:] == ["--", "sleep", "infinity"]
    for flag in ("--reuid=1234", "--regid=99", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
                 "--bounding-set=-all", "--no-new-privs"):
        assert flag in argv


def test_a_state_root_in_a_private_directory_is_covered_from_there() -> None:
    top = Path(tempfile.mkdtemp())  # not pytest's: that is private from /tmp/pytest-of-root down
    try:
        top.chmod(0o755)
        private = top / "private"
        root = private / "x" / "state"
        root.mkdir(parents=True)
        os.chmod(private, 0o700)
        assert cover_point(root) == private
        os.chmod(private, 0o755)
        assert cover_point(root) == root
        assert hidden_roots(root, root / "inner") == (root,)
        assert hidden_roots(root, top / "missing") == (root,)
    finally:
        shutil.rmtree(top)


def test_a_token_is_renewed_at_80_percent_or_when_its_key_is_not_current() -> None:
    issuer = NodeTokenIssuer.generate()
    now = time.time()
    token = issuer.mint_node_token("n1")  # an hour
    kid = issuer.ring.current_kid
    assert not due(token, now, kid)
    assert not due(token, now + 0.79 * 3600, kid)
    assert due(token, now + 0.81 * 3600, kid)
    assert due(token, now, "another-key")
    assert not due(token, now, None)  # the control plane is away: by the clock alone
    assert due(None, now, kid) and due("not a token", now, kid)
