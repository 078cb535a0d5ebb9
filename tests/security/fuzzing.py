"""What the fuzzing tests share: JSON-ish mutations of Istio's sample documents (tests/fixtures/istio)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from mesh.api.loader import parse_text

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio"


@functools.cache
def samples(kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        out.extend(d.body for d in parse_text(path.read_text(), path.name)
                   if isinstance(d.body, dict) and (not kinds or d.body.get("kind") in kinds))
    return out


SAMPLES = samples()

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["", "*", "ALLOW", "DENY", "CUSTOM", "1s", "10.0.0.0/8", "GET",
                                                            "reviews", "v1", "8080", "{}", '{"keys":[]}',
                                                            "https://example.com/jwks.json", "PASSTHROUGH",
                                                            "ROUND_ROBIN", "Gateway", "Service", "waypoint"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


# Values that mean something where they are added: what a waypoint might refuse.
KEY_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "jwks": st.sampled_from(['{"keys": []}', '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', '{"keys": [{}]}',
                             '{"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",'
                             ' "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}', "not json"]),
    "maxEjectionPercent": st.one_of(st.none(), st.integers(-5, 150)),
    "loadBalancer": st.sampled_from([{"simple": "PASSTHROUGH"}, {"consistentHash": {"useSourceIp": True}},
                                     {"simple": "LEAST_CONN"}, {"simple": None}]),
    "delegate": st.just({"name": "reviews-delegate"}),
    "fault": st.sampled_from([{"delay": {"exponentialDelay": "1s"}}, {"abort": {"grpcStatus": "UNAVAILABLE"}},
                              {"abort": {"http2Error": "x"}}, {"abort": {"httpStatus": 503, "percentage": None}}]),
    "jwtRules": st.sampled_from([[{"issuer": "me"}], [{"issuer": "me", "jwks": '{"keys": []}'}],
                                 [{"issuer": "me", "jwksUri": "https://example.com/jwks.json", "timeout": "0s"}]]),
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def mutated(draw: st.DrawFn, kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    """One sample document (of `kinds`, default any) with one to three parts of its spec replaced,
    deleted, set to null or added to."""
    kind = draw(st.sampled_from(sorted({d["kind"] for d in (samples(kinds) if kinds else SAMPLES)})))
    doc = copy.deepcopy(draw(st.sampled_from(samples((kind,)))))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc.get("spec"))
        path = ("spec", *draw(st.sampled_from(paths)))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "null", "add"]))
        last = path[-1]
        if (isinstance(parent, dict) and last not in parent) or action == "replace":
            parent[last] = draw(values)
        elif action == "null":
            parent[last] = None
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "delete" and isinstance(parent, list):
            parent.pop(last)
        elif isinstance(parent[last], dict):
            key = draw(st.sampled_from(["action", "rules", "host", "hosts", "http", "subsets", "trafficPolicy",
                                        "jwtRules", "jwks", "jwksUri", "mtls", "selector", "targetRefs", "fault",
                                        "delegate", "loadBalancer", "consistentHash", "outlierDetection",
                                        "maxEjectionPercent", "retries", "timeout", "x"]))
            parent[last][key] = copy.deepcopy(draw(KEY_VALUES.get(key, values)))
        elif isinstance(parent[last], list):
            parent[last].append(draw(values))
    return doc
