"""`telemetry.istio.io` kinds: Telemetry, for tracing and the waypoints' access logs.

    apiVersion: telemetry.istio.io/v1
    kind: Telemetry
    metadata: {name: mesh-default, namespace: istio-system}     # mesh-wide; or a namespace's own
    spec:
      tracing:
      - randomSamplingPercentage: 10.0
        disableSpanReporting: false
        customTags: {team: {literal: {value: checkout}}, user: {header: {name: end-user, defaultValue: "-"}}}
      accessLogging:
      - disabled: true                                          # no access log line per request

What the mesh does with it (`mesh.tracing.sampler.resolve`): the root namespace's Telemetry without a
selector applies mesh-wide, a namespace's own overrides it, one whose `targetRefs` name a waypoint
Gateway overrides both for that waypoint.  One entry of `tracing` (Istio allows one per mode; modes are
not supported).  `providers` names are accepted, and spans go to the proxies' configured OTLP collector
whatever the name.  `accessLogging` (one entry, resolved the same way, `waypoint.config`) turns a
waypoint's access log off (`disabled: true`) or on again; its lines go to the waypoint's standard output
whatever the provider's name (Istio's built-in `envoy` provider writes there too).  Its `filter` (a CEL
expression) and `match` (modes) are refused, and so is `metrics`: this mesh's metrics are not
configurable yet, and a resource that silently did nothing would be worse.  Node agents keep logging
their connections, as ztunnel does whatever the Telemetry says.
"""

from __future__ import annotations

from typing import Any

from mesh.api.errors import FieldError
from mesh.api.kinds_security import TARGET_REF, _targets
from mesh.api.names import label_selector
from mesh.api.schema import AnyValue, Bool, Errors, ListOf, MapOf, Obj, Str, child, percent_double

_VALUE = Obj({"value": Str()}, required=["value"])
_FROM = Obj({"name": Str(nonempty=True), "defaultValue": Str()}, required=["name"])

CUSTOM_TAG = Obj({"literal": _VALUE, "environment": _FROM, "header": _FROM},
                 one_of=[("literal", "environment", "header")], exactly_one=True)

TRACING = Obj(
    {
        "providers": ListOf(Obj({"name": Str(nonempty=True)}, required=["name"])),
        "randomSamplingPercentage": percent_double(),
        "disableSpanReporting": Bool(),
        "customTags": MapOf(CUSTOM_TAG),
    }
)


ACCESS_LOGGING = Obj(
    {
        "providers": ListOf(Obj({"name": Str(nonempty=True)}, required=["name"])),
        "disabled": Bool(),
        "filter": AnyValue(),
        "match": AnyValue(),
    }
)


def _check_telemetry(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("metrics") is not None:
        errors.append(FieldError(child(path, "metrics"), "is not supported by this mesh (Telemetry configures "
                                                         "tracing and access logging only); remove it"))
    logging = value.get("accessLogging") or []
    logging = logging if isinstance(logging, list) else []  # (the schema reported it)
    if len(logging) > 1:
        errors.append(FieldError(child(path, "accessLogging"), "give one entry: access log modes (match) and "
                                                               "filters are not supported, so a second entry "
                                                               "could never apply"))
    for i, entry in enumerate(logging):
        where = child(child(path, "accessLogging"), i)
        if isinstance(entry, dict) and entry.get("filter") is not None:
            errors.append(FieldError(child(where, "filter"), "CEL filter expressions are not supported by this "
                                                             "mesh: a waypoint logs every request or none; "
                                                             "remove it"))
        if isinstance(entry, dict) and entry.get("match") is not None:
            errors.append(FieldError(child(where, "match"), "access log modes are not supported by this mesh: a "
                                                            "waypoint logs the requests it serves; remove it"))
    refs = [(child(path, "targetRef"), value["targetRef"])] if value.get("targetRef") else []
    refs += [(child(child(path, "targetRefs"), i), r) for i, r in enumerate(value.get("targetRefs") or [])]
    for where, ref in refs:
        if ref.get("kind") != "Gateway":
            errors.append(FieldError(child(where, "kind"), f"{ref.get('kind')!r}: a Telemetry here targets a "
                                                           "waypoint (kind Gateway); for a namespace, leave "
                                                           "targetRefs out"))
    if len(value.get("tracing") or []) > 1:
        errors.append(FieldError(child(path, "tracing"), "give one entry: tracing modes (match) are not "
                                                         "supported, so a second entry could never apply"))


TELEMETRY_SPEC = Obj(
    {
        "selector": label_selector(),
        "targetRef": TARGET_REF,
        "targetRefs": ListOf(TARGET_REF, min_items=1),
        "tracing": ListOf(TRACING),
        "metrics": AnyValue(),
        "accessLogging": ListOf(ACCESS_LOGGING),
    },
    checks=[_targets, _check_telemetry],
)

TELEMETRY_KINDS = {"Telemetry": TELEMETRY_SPEC}
