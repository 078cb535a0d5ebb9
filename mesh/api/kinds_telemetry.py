"""`telemetry.istio.io` kinds: Telemetry, for tracing.

    apiVersion: telemetry.istio.io/v1
    kind: Telemetry
    metadata: {name: mesh-default, namespace: istio-system}     # mesh-wide; or a namespace's own
    spec:
      tracing:
      - randomSamplingPercentage: 10.0
        disableSpanReporting: false
        customTags: {team: {literal: {value: checkout}}, user: {header: {name: end-user, defaultValue: "-"}}}

What the mesh does with it (`mesh.tracing.sampler.resolve`): the root namespace's Telemetry without a
selector applies mesh-wide, a namespace's own overrides it, one whose `targetRefs` name a waypoint
Gateway overrides both for that waypoint.  One entry of `tracing` (Istio allows one per mode; modes are
not supported).  `providers` names are accepted, and spans go to the proxies' configured OTLP collector
whatever the name.  `metrics` and `accessLogging` are refused: this mesh's metrics and access logs are
not configurable yet, and a resource that silently did nothing would be worse.
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


def _check_telemetry(value: dict[str, Any], path: str, errors: Errors) -> None:
    for name in ("metrics", "accessLogging"):
        if value.get(name) is not None:
            errors.append(FieldError(child(path, name), "is not supported by this mesh (Telemetry configures "
                                                        "tracing only); remove it"))
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
        "accessLogging": AnyValue(),
    },
    checks=[_targets, _check_telemetry],
)

TELEMETRY_KINDS = {"Telemetry": TELEMETRY_SPEC}
