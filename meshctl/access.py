"""Who may run what: the verbs that read a local cluster's sockets, logs and namespaces need root.

The local cluster's state (its control plane's sockets, the components' logs and tokens) belongs to root,
and reaching a node agent's admin endpoint means entering the node's network namespace.  Every such verb
checks first and says the same thing (`require_root`), rather than failing later on a socket, a file or
`setns`, each in its own words; a `PermissionError` that still escapes is said the same way by
`meshctl.main`.  Verbs given an explicit address (`--socket`, `--url`, `--admin-address`) do not check:
whoever can reach that address may use it.
"""

from __future__ import annotations

import os

from mesh.errors import MeshError

REASON = "the local cluster's sockets, logs and network namespaces belong to root"


class NeedsRoot(MeshError):
    pass


def needs_root_message(verb: str) -> str:
    return f"{verb} needs root ({REASON}): run it with sudo or as root"


def require_root(verb: str) -> None:
    """Raise NeedsRoot, with the one message every verb gives, unless this process is root."""
    if os.geteuid() != 0:
        raise NeedsRoot(needs_root_message(verb))
