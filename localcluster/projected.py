"""The kubelet's projected volumes, for the local cluster: tokens kept fresh, and the mesh's trust bundle
copied where a sandboxed pod can read it.

On Kubernetes the kubelet asks the API server for a pod's projected service-account token (TokenRequest,
with the volume's audience and `expirationSeconds`), writes it into the pod's volume, and asks again once
80% of the token's life has passed, so the file always holds a valid token; whoever holds it reads the file
again each time it uses it (the node agent and the waypoint do, per CA call and per discovery stream).  The
local cluster's controller does the same for the tokens the cluster hands out (`TokenFile`: each node
agent's, each waypoint's), asking the control plane's `/token`.  It also asks again at once when a token's
key is no longer the control plane's current one (`meshctl ca rotate-token-key`), so holders move to the new
key long before the old one's overlap ends.  `copy_bundle` is the ConfigMap `istio-ca-root-cert`: the mesh's
trust bundle copied, when it changes, into a directory a waypoint may see.

`due` decides (pure); `TokenRefresher.refresh` and `copy_bundle` do the I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt

from mesh.api.client import ApiClient
from mesh.errors import MeshError
from mesh.files import write_atomic
from mesh.identity import IdentityError, SpiffeId

log = logging.getLogger(__name__)

REFRESH_FRACTION = 0.8  # of a token's life, as the kubelet


@dataclass(frozen=True)
class TokenFile:
    """A token file the cluster keeps fresh: a node agent's (`node`) or a workload's (`identity`)."""

    path: Path
    node: str = ""
    identity: str = ""  # a SPIFFE ID
    owner: tuple[int, int] | None = None  # uid and gid of its reader (a sandboxed waypoint), else root's
    expiration_seconds: int | None = None  # what to ask for; None: the control plane's token lifetime


def due(token: str | None, now: float, current_kid: str | None, fraction: float = REFRESH_FRACTION) -> bool:
    """Whether a token file's content must be replaced at `now` (Unix seconds): missing or unreadable,
    past `fraction` of its life, or signed by a key other than `current_kid` (when that is known)."""
    if not token:
        return True
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return True
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        return True
    if current_kid is not None and header.get("kid") != current_kid:
        return True
    return now >= iat + fraction * (exp - iat)


class TokenRefresher:
    """Keeps `files` fresh from the control plane's apply API (`refresh()`, called every few tenths of a
    second by the controller)."""

    def __init__(self, api: ApiClient, files: Iterable[TokenFile] = (), clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.files: dict[Path, TokenFile] = {f.path: f for f in files}
        self._clock = clock

    def add(self, file: TokenFile) -> None:
        self.files[file.path] = file

    def remove(self, path: Path) -> None:
        self.files.pop(path, None)

    def refresh(self) -> list[Path]:
        """Mint and write the token of every file that is due; the paths written.  A file that cannot be
        refreshed now is logged and tried again on the next call."""
        if not self.files:
            return []
        try:
            current: str | None = str(self.api.token_key_status()["current"])
        except (MeshError, KeyError) as exc:  # the control plane is away: go by the clock alone
            log.debug("cannot read the token key's status: %s", exc)
            current = None
        written = []
        now = self._clock()
        for file in list(self.files.values()):
            try:
                held = file.path.read_text().strip()
            except OSError:
                held = None
            if not due(held, now, current):
                continue
            try:
                self.write(file)
            except (MeshError, OSError) as exc:
                log.warning("could not refresh the token %s: %s (trying again)", file.path, exc)
                continue
            written.append(file.path)
        return written

    def write(self, file: TokenFile) -> None:
        """Mint `file`'s token now and write it (mode 0600, its owner's)."""
        if file.node:
            token = self.api.node_token(file.node, file.expiration_seconds)
        else:
            try:
                identity = SpiffeId.parse(file.identity)
            except IdentityError as exc:
                raise MeshError(f"{file.path}: {exc}") from exc
            token = self.api.workload_token(identity, file.expiration_seconds)
        file.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file.path, token.encode(), mode=0o600, owner=file.owner)
        log.info('{"event": "token refreshed", "file": "%s"}', file.path)


def copy_bundle(source: Path, target: Path, owner: tuple[int, int] | None = None) -> bool:
    """Copy the trust bundle `source` to `target` (world-readable: certificates only) when it differs;
    True if it was written."""
    data = source.read_bytes()
    try:
        if target.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(target, data, mode=0o644, owner=owner)
    return True
