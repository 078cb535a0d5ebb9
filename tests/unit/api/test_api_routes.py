"""HTTPRoute and GRPCRoute: good routes pass; bad ones are refused with the exact field path and what is wrong,
and nothing of the batch is applied."""

from __future__ import annotations

import pytest

from controlplane.config.store import Store
from mesh.api.errors import ValidationError
from mesh.api.kinds import resolve_kind
from mesh.api.loader import parse_text
from mesh.api.validate import validate_documents

HEAD = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n"
GRPC = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: reviews}\nspec:\n"
PARENT = "  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n"
BACKEND = "    backendRefs: [{name: reviews-v1, port: 9080}]\n"


def rule(text: str, backend: bool = True) -> str:
    """An HTTPRoute with one rule: `text` lines (at the rule's indentation) and, unless told, one backend."""
    lines = text.splitlines()
    body = "".join(("  - " if i == 0 else "    ") + line + "\n" for i, line in enumerate(lines))
    return HEAD + PARENT + "  rules:\n" + body + (BACKEND if backend else "")


GOOD = HEAD + PARENT + """  hostnames: [reviews.default.svc.cluster.local]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: end-user, value: jason}, {type: RegularExpression, name: x-id, value: '[0-9]+'}]
      queryParams: [{name: v, value: '2'}]
      method: GET
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v3, port: 9080}, fraction: {numerator: 1, denominator: 10}}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - name: reviews-v2
      port: 9080
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-v, value: v2}]}}]
    timeouts: {request: 1m30s, backendRequest: 10s}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.com, port: 8443, statusCode: 301,
                        path: {type: ReplaceFullPath, replaceFullPath: /new}}
"""

GOOD_GRPC = GRPC + PARENT + """  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
      headers: [{name: x-canary, value: '1'}]
    - method: {type: RegularExpression, method: 'Say.*'}
    backendRefs: [{name: greeter-v1, port: 50051, weight: 1}, {name: greeter-v2, port: 50051, weight: 3}]
"""

BAD = [
    # (id, document, field path, fragment of the message)
    ("path-type", rule("matches: [{path: {type: Prefix, value: /api}}]"),
     "spec.rules[0].matches[0].path.type", "'Prefix' is not one of Exact, PathPrefix, RegularExpression (did you mean PathPrefix?)"),
    ("path-relative", rule("matches: [{path: {value: api}}]"), "spec.rules[0].matches[0].path.value", "must start with /"),
    ("path-dots", rule("matches: [{path: {type: Exact, value: /a/../b}}]"), "spec.rules[0].matches[0].path.value",
     "must not contain"),
    ("path-regex", rule("matches: [{path: {type: RegularExpression, value: '/a(b'}}]"),
     "spec.rules[0].matches[0].path.value", "not a valid regular expression"),
    ("header-type", rule("matches: [{headers: [{type: Prefix, name: a, value: b}]}]"),
     "spec.rules[0].matches[0].headers[0].type", "'Prefix' is not one of Exact, RegularExpression"),
    ("header-name", rule("matches: [{headers: [{name: 'bad name', value: b}]}]"),
     "spec.rules[0].matches[0].headers[0].name", "not an HTTP header name"),
    ("header-twice", rule("matches: [{headers: [{name: A, value: b}, {name: a, value: c}]}]"),
     "spec.rules[0].matches[0].headers[1].name", "listed twice"),
    ("header-value-missing", rule("matches: [{headers: [{name: a}]}]"),
     "spec.rules[0].matches[0].headers[0].value", "is required"),
    ("query-regex", rule("matches: [{queryParams: [{type: RegularExpression, name: q, value: '(('}]}]"),
     "spec.rules[0].matches[0].queryParams[0].value", "not a valid regular expression"),
    ("method", rule("matches: [{method: FETCH}]"), "spec.rules[0].matches[0].method", "'FETCH' is not one of GET"),
    ("weight-range", HEAD + PARENT + "  rules:\n  - backendRefs: [{name: a, port: 80, weight: 2000000}]\n",
     "spec.rules[0].backendRefs[0].weight", "between 0 and 1000000"),
    ("weight-type", HEAD + PARENT + "  rules:\n  - backendRefs: [{name: a, port: 80, weight: half}]\n",
     "spec.rules[0].backendRefs[0].weight", "must be an integer"),
    ("backend-port", HEAD + PARENT + "  rules:\n  - backendRefs: [{name: a}]\n",
     "spec.rules[0].backendRefs[0].port", "is required when the backend is a Service"),
    ("backend-name", HEAD + PARENT + "  rules:\n  - backendRefs: [{port: 80}]\n",
     "spec.rules[0].backendRefs[0].name", "is required"),
    ("unknown-field", rule("matches: [{path: {value: /a}}]\nretries: {attempts: 3}"),
     "spec.rules[0].retries", "unknown field 'retries'"),
    ("unknown-field-suggest", HEAD + PARENT + "  rule: []\n", "spec.rule", "(did you mean rules?)"),
    ("filter-type", rule("filters: [{type: RequestHeaderModifer}]"), "spec.rules[0].filters[0].type",
     "(did you mean RequestHeaderModifier?)"),
    ("filter-field-missing", rule("filters: [{type: RequestHeaderModifier}]"),
     "spec.rules[0].filters[0].requestHeaderModifier", "is required when type is RequestHeaderModifier"),
    ("filter-other-field", rule("filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [a]}, "
                                "responseHeaderModifier: {remove: [b]}}]"),
     "spec.rules[0].filters[0].responseHeaderModifier", "must not be set when type is RequestHeaderModifier"),
    ("filter-twice", rule("filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]"),
     "spec.rules[0].filters[1].type", "URLRewrite may appear only once"),
    ("redirect-and-rewrite", rule("filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, "
                                  "{type: RequestRedirect, requestRedirect: {hostname: b}}]", backend=False),
     "spec.rules[0].filters", "RequestRedirect and URLRewrite cannot be used together"),
    ("redirect-with-backends", rule("filters: [{type: RequestRedirect, requestRedirect: {hostname: b}}]"),
     "spec.rules[0].backendRefs", "must be empty when the rule has a RequestRedirect filter"),
    ("redirect-code", rule("filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]", backend=False),
     "spec.rules[0].filters[0].requestRedirect.statusCode", "between 301 and 302"),
    ("redirect-prefix", rule("filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, "
                             "replacePrefixMatch: /b}}}]", backend=False),
     "spec.rules[0].filters[0].requestRedirect.path.type", "is not supported by waypoints"),
    ("rewrite-prefix-without-prefix-match", rule("matches: [{path: {type: Exact, value: /a}}]\nfilters: [{type: URLRewrite, "
                                                 "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]"),
     "spec.rules[0].filters[0].urlRewrite", "needs every match of the rule to be a PathPrefix"),
    ("rewrite-path-field", rule("filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /b}}}]"),
     "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch", "must not be set when type is ReplaceFullPath"),
    ("header-modifier-clash", rule("filters: [{type: RequestHeaderModifier, requestHeaderModifier: "
                                   "{set: [{name: a, value: '1'}], remove: [A]}}]"),
     "spec.rules[0].filters[0].requestHeaderModifier.remove[0]", "is also in set[0]"),
    ("extension-ref", rule("filters: [{type: ExtensionRef, extensionRef: {group: x, kind: Y, name: z}}]"),
     "spec.rules[0].filters[0].type", "ExtensionRef is not supported by waypoints"),
    ("mirror-fraction", rule("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 80}, "
                             "fraction: {numerator: 5, denominator: 2}}}]"),
     "spec.rules[0].filters[0].requestMirror.fraction.numerator", "must not be larger than the denominator"),
    ("mirror-percent-and-fraction", rule("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 80}, "
                                         "percent: 5, fraction: {numerator: 1}}}]"),
     "spec.rules[0].filters[0].requestMirror", "set only one of percent, fraction"),
    ("backend-filter", HEAD + PARENT + "  rules:\n  - backendRefs: [{name: a, port: 80, filters: [{type: Bogus}]}]\n",
     "spec.rules[0].backendRefs[0].filters[0].type", "'Bogus' is not one of"),
    ("timeout", rule("timeouts: {request: 10 seconds}"), "spec.rules[0].timeouts.request", "not a Gateway API duration"),
    ("timeout-order", rule("timeouts: {request: 1s, backendRequest: 2s}"), "spec.rules[0].timeouts.backendRequest",
     "longer than timeouts.request"),
    ("hostname", HEAD + PARENT + "  hostnames: ['10.0.0.1:80']\n", "spec.hostnames[0]", "is not a hostname"),
    ("parent-name", HEAD + "  parentRefs: [{kind: Service}]\n", "spec.parentRefs[0].name", "is required"),
    ("parent-port", HEAD + "  parentRefs: [{kind: Service, name: a, port: 70000}]\n", "spec.parentRefs[0].port",
     "between 1 and 65535"),
    ("too-many-rules", HEAD + PARENT + "  rules:\n" + "  - {}\n" * 17, "spec.rules", "at most 16 allowed"),
    ("no-spec", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n", "spec", "is required"),
    ("api-version", "apiVersion: gateway.networking.k8s.io/v9\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n",
     "apiVersion", "is not an API version of HTTPRoute"),
    ("grpc-method-empty", GRPC + PARENT + "  rules:\n  - matches: [{method: {type: Exact}}]\n",
     "spec.rules[0].matches[0].method", "set service, method or both"),
    ("grpc-service-name", GRPC + PARENT + "  rules:\n  - matches: [{method: {service: 'hello world'}}]\n",
     "spec.rules[0].matches[0].method.service", "is not a gRPC service name"),
    ("grpc-method-name", GRPC + PARENT + "  rules:\n  - matches: [{method: {method: Say/Hello}}]\n",
     "spec.rules[0].matches[0].method.method", "is not a gRPC method name"),
    ("grpc-method-regex", GRPC + PARENT + "  rules:\n  - matches: [{method: {type: RegularExpression, method: '(('}}]\n",
     "spec.rules[0].matches[0].method.method", "not a valid regular expression"),
    ("grpc-no-rewrite", GRPC + PARENT + "  rules:\n  - filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]\n",
     "spec.rules[0].filters[0].type", "'URLRewrite' is not one of RequestHeaderModifier"),
    ("grpc-path-match", GRPC + PARENT + "  rules:\n  - matches: [{path: {value: /a}}]\n",
     "spec.rules[0].matches[0].path", "unknown field 'path'"),
]


def errors_of(text: str) -> list[str]:
    docs = parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\n" + text, "bad.yaml")
    _, errors = validate_documents(docs)
    return [str(e) for e in errors]


@pytest.mark.parametrize("text", [GOOD, GOOD_GRPC], ids=["httproute", "grpcroute"])
def test_good_routes_pass(text: str) -> None:
    assert errors_of(text) == []


@pytest.mark.parametrize(("text", "path", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_route_is_refused_with_its_path(text: str, path: str, fragment: str) -> None:
    lines = errors_of(text)
    prefix = f"bad.yaml:document 2:{path}: "
    assert any(line.startswith(prefix) and fragment in line for line in lines), lines


def test_a_bad_route_applies_nothing_of_its_batch() -> None:
    store = Store()
    text = GOOD + "---\n" + rule("matches: [{method: FETCH}]")
    with pytest.raises(ValidationError) as info:
        store.apply(parse_text(text.replace("name: reviews}", "name: other}", 1), "f.yaml"))
    assert [line.split(" (did you")[0] for line in info.value.lines()] == [
        "f.yaml:document 2:spec.rules[0].matches[0].method: 'FETCH' is not one of "
        "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"]
    assert store.select("HTTPRoute") == []


def test_kind_names_as_kubectl_has_them() -> None:
    for word in ("httproute", "httproutes", "HTTPRoute", "httproute.gateway.networking.k8s.io"):
        assert resolve_kind(word).kind == "HTTPRoute"  # type: ignore[union-attr]
    for word in ("grpcroute", "grpcroutes", "grpcroutes.gateway.networking.k8s.io"):
        assert resolve_kind(word).kind == "GRPCRoute"  # type: ignore[union-attr]
