"""Bad documents are refused with the exact field path and a message that says what is wrong."""

from __future__ import annotations

import pytest
import yaml

from controlplane.config.store import Store
from mesh.api.errors import ValidationError
from mesh.api.loader import parse_text
from mesh.api.validate import validate_documents

VS = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n"
DR = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n"
AP = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n"
PA = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n"
RA = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: p}\nspec:\n"
ROUTE = "  http:\n  - route:\n    - destination: {host: reviews}\n"


def http(extra: str) -> str:
    return VS + ROUTE + "".join(f"    {line}\n" for line in extra.splitlines())


BAD = [
    # (id, document, field path, fragment of the message)
    ("weights-sum", VS + "  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 20\n"
     "    - destination: {host: reviews}\n      weight: 70\n", "spec.http[0].route[1].weight", "sum to 90; they must sum to 100"),
    ("weight-range", VS + "  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 120\n",
     "spec.http[0].route[0].weight", "between 0 and 100"),
    ("weight-type", VS + "  http:\n  - route:\n    - destination: {host: reviews}\n      weight: ten\n",
     "spec.http[0].route[0].weight", "must be an integer"),
    ("unknown-field-suggest", http("timout: 2s"), "spec.http[0].timout", "unknown field 'timout' (did you mean timeout?)"),
    ("unknown-field-plain", http("colour: blue"), "spec.http[0].colour", "unknown field 'colour'"),
    ("bad-duration", http("timeout: 2 seconds"), "spec.http[0].timeout", "not a duration"),
    ("bad-duration-unit", http("retries: {attempts: 3, perTryTimeout: 5x}"), "spec.http[0].retries.perTryTimeout", "not a duration"),
    ("bad-regex", VS + "  http:\n  - match:\n    - uri: {regex: 'a(b'}\n    route:\n    - destination: {host: reviews}\n",
     "spec.http[0].match[0].uri.regex", "not a valid regular expression"),
    ("two-string-matches", VS + "  http:\n  - match:\n    - headers:\n        end-user: {exact: jason, prefix: j}\n"
     "    route:\n    - destination: {host: reviews}\n", "spec.http[0].match[0].headers.end-user", "set only one of exact, prefix, regex"),
    ("empty-string-match", VS + "  http:\n  - match:\n    - uri: {}\n    route:\n    - destination: {host: reviews}\n",
     "spec.http[0].match[0].uri", "must set one of exact, prefix, regex"),
    ("percentage-range", http("fault: {delay: {percentage: {value: 150}, fixedDelay: 2s}}"),
     "spec.http[0].fault.delay.percentage.value", "between 0 and 100"),
    ("percent-int-range", http("fault: {delay: {percent: -1, fixedDelay: 2s}}"), "spec.http[0].fault.delay.percent", "between 0 and 100"),
    ("delay-without-time", http("fault: {delay: {percentage: {value: 10}}}"), "spec.http[0].fault.delay",
     "must set one of fixedDelay, exponentialDelay"),
    ("abort-status", http("fault: {abort: {httpStatus: 700, percentage: {value: 1}}}"), "spec.http[0].fault.abort.httpStatus",
     "between 200 and 599"),
    ("mirror-percentage", http("mirror: {host: reviews}\nmirrorPercentage: {value: 101}"), "spec.http[0].mirrorPercentage.value",
     "between 0 and 100"),
    ("mirror-percent-without-mirror", http("mirrorPercentage: {value: 50}"), "spec.http[0].mirrorPercentage", "needs mirror"),
    ("route-and-redirect", http("redirect: {uri: /x}"), "spec.http[0]", "set only one of route, redirect"),
    ("missing-destination-host", VS + "  http:\n  - route:\n    - destination: {subset: v1}\n",
     "spec.http[0].route[0].destination.host", "is required"),
    ("missing-hosts", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {http: []}\n",
     "spec.hosts", "is required"),
    ("bad-host", VS.replace("[reviews]", "['rev iews']"), "spec.hosts[0]", "not a valid host"),
    ("port-range", VS + "  http:\n  - route:\n    - destination: {host: reviews, port: {number: 70000}}\n",
     "spec.http[0].route[0].destination.port.number", "between 1 and 65535"),
    ("dr-lb", DR + "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBBIN}}\n", "spec.trafficPolicy.loadBalancer.simple",
     "(did you mean ROUND_ROBIN?)"),
    ("dr-outlier-duration", DR + "  trafficPolicy: {outlierDetection: {interval: soon}}\n",
     "spec.trafficPolicy.outlierDetection.interval", "not a duration"),
    ("dr-ejection-percent", DR + "  trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}\n",
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "between 0 and 100"),
    ("dr-pool-type", DR + "  trafficPolicy: {connectionPool: {tcp: {maxConnections: many}}}\n",
     "spec.trafficPolicy.connectionPool.tcp.maxConnections", "must be an integer"),
    ("dr-subset-twice", DR + "  subsets: [{name: v1}, {name: v1}]\n", "spec.subsets[1].name", "defined twice"),
    ("dr-subset-label-value", DR + "  subsets: [{name: v1, labels: {version: 1}}]\n", "spec.subsets[0].labels.version",
     "must be a string"),
    ("ap-action", AP + "  action: PERMIT\n", "spec.action", "not one of ALLOW, DENY, AUDIT, CUSTOM"),
    ("ap-cidr", AP + "  rules:\n  - from:\n    - source: {ipBlocks: ['10.0.0.0/33']}\n", "spec.rules[0].from[0].source.ipBlocks[0]",
     "not an IP address or CIDR"),
    ("ap-port", AP + "  rules:\n  - to:\n    - operation: {ports: ['http']}\n", "spec.rules[0].to[0].operation.ports[0]",
     "not a port number"),
    ("ap-unknown-source-field", AP + "  rules:\n  - from:\n    - source: {principal: [a]}\n",
     "spec.rules[0].from[0].source.principal", "(did you mean principals?)"),
    ("ap-when-key", AP + "  rules:\n  - when:\n    - {key: request.colour, values: [red]}\n", "spec.rules[0].when[0].key",
     "not a supported condition key"),
    ("ap-when-values", AP + "  rules:\n  - when:\n    - {key: source.ip}\n", "spec.rules[0].when[0]", "set values or notValues"),
    ("ap-selector-and-targets", AP + "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, name: a}]\n",
     "spec", "set only one of selector, targetRef, targetRefs"),
    ("ap-custom-without-provider", AP + "  action: CUSTOM\n", "spec.provider", "is required when action is CUSTOM"),
    ("pa-mode", PA + "  mtls: {mode: STRICTER}\n", "spec.mtls.mode", "(did you mean STRICT?)"),
    ("pa-port-level-needs-selector", PA + "  portLevelMtls: {8080: {mode: DISABLE}}\n", "spec.portLevelMtls", "needs a selector"),
    ("ra-missing-issuer", RA + "  jwtRules: [{jwksUri: 'https://example.com/jwks'}]\n", "spec.jwtRules[0].issuer", "is required"),
    ("ra-bad-uri", RA + "  jwtRules: [{issuer: me, jwksUri: 'ftp://x'}]\n", "spec.jwtRules[0].jwksUri", "not an http(s) URL"),
    ("unknown-kind", "apiVersion: networking.istio.io/v1\nkind: VirtualServise\nmetadata: {name: a}\n", "kind",
     "(did you mean VirtualService?)"),
    ("unknown-api-version", "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a]}\n",
     "apiVersion", "not an API version of VirtualService"),
    ("missing-name", "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n", "metadata.name", "is required"),
    ("missing-metadata", "apiVersion: v1\nkind: Namespace\n", "metadata.name", "is required"),
    ("name-not-dns1123", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: My_Account}\n", "metadata.name", "not a DNS-1123 name"),
    ("namespace-on-namespace", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n", "metadata.namespace", "must not be set"),
    ("bad-label-key", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {'-bad': x}}\n", 'metadata.labels["-bad"]',
     "label key '-bad' is not valid"),
    ("bad-label-value", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {app: 'no spaces'}}\n",
     "metadata.labels.app", "label value 'no spaces' is not valid"),
    ("dataplane-mode-value", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: sidecar}}\n",
     'metadata.labels["istio.io/dataplane-mode"]', "must be one of ambient, none"),
    ("service-port-name", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80}, {port: 81, name: b}]\n",
     "spec.ports[0].name", "required when a service has more than one port"),
    ("service-cluster-ip", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.0.0.300}\n",
     "spec.clusterIP", "not an IP address"),
    ("pod-ip", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: nowhere}\n",
     "status.podIP", "not an IP address"),
    ("pod-container-port", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n",
     "spec.containers[0].ports[0].containerPort", "between 1 and 65535"),
    ("gateway-waypoint-listener", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\n"
     "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15009, protocol: HBONE}]}\n",
     "spec.listeners", "needs a listener with protocol HBONE on port 15008"),
    ("se-address", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\n"
     "spec: {hosts: [a.example.com], addresses: [300.1.1.1]}\n", "spec.addresses[0]", "not an IP address or CIDR"),
    ("top-level-unknown", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nspecs: {}\n", "specs", "(did you mean spec?)"),
    ("not-a-mapping", "- just\n- a list\n", "", "must be a mapping"),
]


@pytest.mark.parametrize(("text", "path", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_document_is_refused_with_its_path(text: str, path: str, fragment: str) -> None:
    docs = parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\n" + text, "bad.yaml")
    _, errors = validate_documents(docs)
    lines = [str(e) for e in errors]
    prefix = f"bad.yaml:document 2:{path}: " if path else "bad.yaml:document 2:"
    assert any(line.startswith(prefix) and fragment in line for line in lines), lines


def test_there_are_at_least_thirty_bad_documents() -> None:
    assert len(BAD) >= 30
    assert all(yaml.safe_load(b[1]) is not None for b in BAD)


def test_every_error_of_a_document_is_reported() -> None:
    docs = parse_text(http("timeout: 2x\nretries: {attempts: -1}"), "f.yaml")
    _, errors = validate_documents(docs)
    assert {e.path for e in errors} == {"spec.http[0].timeout", "spec.http[0].retries.attempts"}


def test_unknown_subset_is_refused_and_nothing_is_applied() -> None:
    store = Store()
    text = (DR + "  subsets: [{name: v1, labels: {version: v1}}]\n---\n" + VS
            + "  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n"
              "    - destination: {host: reviews, subset: v9}\n      weight: 50\n")
    with pytest.raises(ValidationError) as info:
        store.apply(parse_text(text, "f.yaml"))
    assert info.value.lines() == [
        "f.yaml:document 2:spec.http[0].route[1].destination.subset: subset 'v9' of host "
        "reviews.default.svc.cluster.local is not defined by any DestinationRule (defined: v1)"]
    assert store.version == 0 and len(store.snapshot()) == 0


def test_yaml_syntax_error_names_file_document_and_line() -> None:
    with pytest.raises(ValidationError) as info:
        parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n", "broken.yaml")
    assert str(info.value).startswith("broken.yaml:document 2: not valid YAML at line 6")


def test_duplicate_resource_in_one_batch() -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"
    _, errors = validate_documents(parse_text(text, "d.yaml"))
    assert [str(e) for e in errors] == ["d.yaml:document 2:metadata.name: Namespace/a is also defined in d.yaml:document 1"]
