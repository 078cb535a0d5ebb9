"""Request normalization before routing and authorization (pure), as Envoy does it for Istio.

The path a policy or a route is matched against is the path the service will be sent, so two spellings
of one resource can never be told apart by the waypoint and then served alike by the application.  The
path (not the query) is normalized like Envoy's `normalize_path` (RFC 3986 with Chromium's URL
canonicalization) followed by `merge_slashes`, which is Istio's `MERGE_SLASHES` normalization:

1. the fragment (`#...`) is dropped; an absolute-form target (`http://host/path`) becomes its path, and its
   host the request's authority;
2. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes kept with
   upper-case hex digits (`%7b` -> `%7B`), bytes outside printable ASCII are percent-encoded;
3. a backslash is a slash (`/a\\b` -> `/a/b`);
4. dot segments are removed (`/a/./b/../c` -> `/a/c`, never above the root);
5. runs of slashes are merged (`//a///b` -> `/a/b`).

Refused with 400 (`NormalizationError`): a path that does not start with `/` (other than `*` for
OPTIONS), a `%` not followed by two hex digits, `%00`, control characters, and an encoded slash or
backslash (`%2F`, `%5C`).  Envoy keeps those two by default (`path_with_escaped_slashes_action`), which
leaves `/admin%2Fsecret` past a DENY on `/admin/*` for any application that decodes them; this waypoint
takes Envoy's `REJECT_REQUEST` instead.  A method not written in upper case is refused too, as Istio
does, so that `methods: ["DELETE"]` cannot be bypassed with `delete`.
"""

from __future__ import annotations

import re
import string

from waypoint.l7.model import RequestHead

UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
_ENCODED_SLASHES = ("%2F", "%5C")
# A path already in normal form when it has only these characters and no "//" or "/." (the common case).
_PLAIN = re.compile(r"/[A-Za-z0-9\-_~!$&'()*+,;=:@/.]*")


class NormalizationError(ValueError):
    """The request cannot be normalized: answer 400 with this message."""


def normalize_request(head: RequestHead) -> RequestHead:
    """`head` with its method checked and its path normalized (query kept as written)."""
    if head.method != head.method.upper():
        raise NormalizationError(f"method {head.method!r} is not in upper case")
    target, authority = head.path, head.authority
    if target == "*" and head.method == "OPTIONS":
        return head
    scheme, sep, _ = target.partition("://")
    if sep and scheme.isalpha():
        target, authority = _origin_form(scheme, target[len(scheme) + 3:])
    target = target.split("#", 1)[0]
    path, sep, query = target.partition("?")
    normalized = normalize_path(path) + sep + query
    if normalized == head.path and authority == head.authority:
        return head
    return head.replace(path=normalized, authority=authority)


def _origin_form(scheme: str, rest: str) -> tuple[str, str]:
    """(origin-form target, authority) of an absolute-form target `scheme://rest`."""
    if scheme.lower() not in ("http", "https"):
        raise NormalizationError(f"request target scheme {scheme[:16]!r} is not http or https")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host, target = rest[:end], rest[end:]
    if not host or "@" in host:
        raise NormalizationError("an absolute request target needs a host (and no user information)")
    return target if target.startswith("/") else "/" + target, host


def normalize_path(path: str) -> str:
    """The normalized form of an origin-form path (no query); raises `NormalizationError`."""
    if _PLAIN.fullmatch(path) and "//" not in path and "/." not in path:
        return path
    if not path.startswith(("/", "\\")):
        raise NormalizationError(f"path {path[:64]!r} does not start with '/'")
    return _merge_slashes(_remove_dot_segments(_decode(path)))


def _decode(path: str) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            hex2 = path[i + 1:i + 3]
            if len(hex2) != 2 or not set(hex2) <= _HEX:
                raise NormalizationError(f"invalid percent-encoding at {path[i:i + 3]!r}")
            escape = "%" + hex2.upper()
            if escape == "%00":
                raise NormalizationError("%00 in the path")
            if escape in _ENCODED_SLASHES:
                raise NormalizationError(f"encoded slash or backslash {path[i:i + 3]!r} in the path is refused")
            char = chr(int(hex2, 16))
            out.append(char if char in UNRESERVED else escape)
            i += 3
            continue
        code = ord(c)
        if code < 0x20 or code == 0x7F:
            raise NormalizationError("control character in the path")
        if c == "\\":
            out.append("/")
        elif code == 0x20 or code > 0x7E:
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8" if code > 0xFF else "latin-1")))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, on a path that starts with '/'."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path
