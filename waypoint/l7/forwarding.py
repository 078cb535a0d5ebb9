"""The forwarding headers a request leaves the waypoint with, from what the waypoint verified (pure).

Envoy as Istio configures it, for a proxy that is the first to see the client's verified identity:

- `x-forwarded-client-cert`: whatever the client wrote is dropped and the header is set to the verified
  peer (`forward_client_cert_details: SANITIZE_SET`, details By, Hash and URI):
  `By=<this waypoint's SPIFFE ID>;Hash=<SHA-256 of the client's leaf certificate, DER, hex>;URI=<the
  peer's>`; no peer identity, no header.
- `x-forwarded-for`: the verified source address is appended (`use_remote_address: true`).
- `x-forwarded-proto`: set by the waypoint to the scheme of the connection it received the request on
  (`http`: the request travels in clear inside the mutual-TLS tunnel, which the tunnel's identity, not
  this header, vouches for); what the client wrote is not believed.
- `forwarded` (RFC 7239), which nothing here vouches for, is removed.
- `x-envoy-*`: Envoy's internal headers (`x-envoy-original-path`, `x-envoy-expected-rq-timeout-ms`,
  `x-envoy-retry-on`, `x-envoy-upstream-rq-timeout-ms`, `x-envoy-max-retries`, ...) are removed from
  every request the waypoint receives: they steer retries and timeouts in Envoy, and the waypoint takes
  those from its configuration alone.  Envoy strips them only from "external" clients (addresses outside
  its `internal_address_config`); the waypoint's clients are applications, none of them a proxy it
  trusts, so it strips them from all (a choice stricter than Envoy with private addresses internal).

The address `remoteIpBlocks` and `remote.ip` see is Envoy's "trusted client address": the appended
`x-forwarded-for` read from the right, skipping `trusted_hops` proxies (`xff_num_trusted_hops`, 0 by
default, so it is the verified source itself).
"""

from __future__ import annotations

import ipaddress

from waypoint.l7.model import Headers, header_values

XFCC = "x-forwarded-client-cert"
XFF = "x-forwarded-for"
XFP = "x-forwarded-proto"
FORWARDED = "forwarded"
ENVOY_INTERNAL_PREFIX = "x-envoy-"
_SET_HERE = frozenset({XFCC, FORWARDED, XFF, XFP})  # what the client wrote of these is dropped


def forwarding_headers(headers: Headers, *, source_ip: str, peer_identity: str, local_identity: str = "",
                       peer_certificate_hash: str = "", scheme: str = "http") -> Headers:
    """`headers` with the forwarding headers sanitized and set (one pass: this runs for every request)."""
    out: list[tuple[str, str]] = []
    chain: list[str] = []
    for n, v in headers:
        if n in _SET_HERE:
            if n == XFF:
                chain.extend(a for a in (a.strip() for a in v.split(",")) if a)
        elif not n.lower().startswith(ENVOY_INTERNAL_PREFIX):
            out.append((n, v))
    if source_ip:
        chain.append(source_ip)
    if chain:
        out.append((XFF, ",".join(chain)))
    out.append((XFP, scheme))
    if peer_identity:
        parts = ([f"By={local_identity}"] if local_identity else []) + \
                ([f"Hash={peer_certificate_hash}"] if peer_certificate_hash else []) + [f"URI={peer_identity}"]
        out.append((XFCC, ";".join(parts)))
    return tuple(out)


def remote_ip(headers: Headers, source_ip: str, trusted_hops: int = 0) -> str:
    """The trusted client address: `x-forwarded-for` (already appended with `source_ip`) counted
    `trusted_hops` from the right; `source_ip` when the chain is too short or not an address there."""
    if trusted_hops <= 0:
        return source_ip
    chain = [a.strip() for v in header_values(headers, XFF) for a in v.split(",") if a.strip()]
    if len(chain) <= trusted_hops:
        return source_ip
    candidate = chain[-1 - trusted_hops]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return source_ip
    return candidate
