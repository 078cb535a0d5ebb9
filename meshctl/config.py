"""`meshctl apply`, `delete`, `get` and `label`: configuration, as with kubectl, against the control plane.

Documents are validated here first (so mistakes show before anything is sent) and again by the control
plane, which also checks them against what it already holds.  An apply with any error changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import yaml

from localcluster import workloads
from localcluster.state import api_socket, find_cluster
from mesh.api.client import ApiClient
from mesh.api.errors import ApiError, ValidationError
from mesh.api.kinds import DEFAULT_NAMESPACE, KINDS, resolve_kind
from mesh.api.loader import load_paths
from mesh.api.validate import check_reference, validate_documents
from mesh.errors import UsageError
from meshctl import access, selector

KIND_NAMES = ", ".join(sorted(k.lower() for k in KINDS))
WORKLOAD_KINDS = ("DaemonSet", "Deployment")  # the local cluster's own (daemonset/), read from its record


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control plane")
    group.add_argument("--cluster", metavar="NAME",
                       help="the local cluster to talk to (default: the current one, see `meshctl cluster use`)")
    group.add_argument("--socket", metavar="PATH", help="the control plane's API socket (overrides --cluster)")


def client_from(args: argparse.Namespace) -> ApiClient:
    """The control plane's apply API: at --socket, else the cluster's (root's: `meshctl.access`)."""
    if args.socket:
        return ApiClient(args.socket)
    access.require_root(str(getattr(args, "verb", None) or "this command"))
    return ApiClient(api_socket(args.cluster))


def report(exc: ValidationError, action: str) -> ApiError:
    """Print every error on its own line; return the one-line summary to raise."""
    if len(exc.errors) <= 1:
        return exc
    for line in exc.lines():
        print(f"error: {line}", file=sys.stderr)
    return ApiError(f"{len(exc.errors)} errors: nothing was {action}")


def print_warnings(result: dict[str, Any]) -> None:
    """The control plane's warnings about what was written (`controlplane.analysis`), as kubectl prints
    admission warnings: accepted, but not doing what it says."""
    for line in result.get("warnings") or []:
        print(f"Warning: {line}", file=sys.stderr)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "apply", help="create or update configuration from YAML files",
        description="Create or update resources from YAML (Istio, Gateway API and core kinds). Every document is "
                    "validated; if any is wrong nothing is applied and each mistake is shown as "
                    "FILE:document N:FIELD: what is wrong.",
        epilog="examples:\n  meshctl apply -f examples/bookinfo/samples/networking/destination-rule-all.yaml\n"
               "  meshctl apply -f examples/bookinfo/samples/networking/virtual-service-reviews-v1-v3.yaml\n"
               "  meshctl apply --dry-run -f examples/bookinfo/samples/security/   (every .yaml, .yml and .json file "
               "in the directory)\n"
               "  cat policy.yaml | meshctl apply -f -\n"
               "samples of every kind (routes, faults, timeouts, mTLS, authorization, JWT, waypoint, HTTPRoute) "
               "for the\nbookinfo cluster, and what each does: examples/bookinfo/samples/README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
                   help="a file, a directory or - for standard input (repeatable)")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace for documents that name none (default: default)")
    p.add_argument("--dry-run", action="store_true", help="only validate the documents locally; send nothing")
    add_connection_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "delete", help="delete configuration by file or by kind and name",
        description="Delete the resources named in YAML files (only kind and metadata are read), or KIND NAME... . "
                    "Deleting a DestinationRule subset that a VirtualService still routes to is refused.",
        epilog="examples:\n  meshctl delete -f examples/bookinfo/samples/networking/virtual-service-reviews-v1-v3.yaml\n"
               "  meshctl delete virtualservice reviews -n bookinfo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", metavar="KIND", help=f"kind of the resources ({KIND_NAMES})")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-f", "--filename", action="append", metavar="FILE|DIR|-", help="a file, a directory or -")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace (default: default)")
    p.add_argument("--ignore-not-found", action="store_true", help="do not fail for resources that do not exist")
    add_connection_args(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser(
        "get", help="show configuration held by the control plane, and the mesh's own workloads",
        description=f"List resources of a kind, or show one. Kinds: {KIND_NAMES} (plural and short names "
                    "such as vs, dr, ap, svc, ns work too), held by the control plane; and daemonset (ds) and "
                    "deployment (deploy): the node agents and the control plane the local cluster runs from "
                    "daemonset/, with their desired and ready counts (read from the cluster's record, the "
                    "processes and their readiness probes; needs root). Several kinds: KIND,KIND.",
        epilog="examples:\n  meshctl get pods -n bookinfo\n  meshctl get vs reviews -n bookinfo -o yaml\n"
               "  meshctl get authorizationpolicies -A\n  meshctl get daemonset,deployment -A -o json\n"
               "  meshctl get pods -n bookinfo -l app=reviews -o wide\n  meshctl get vs -n bookinfo -w",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", metavar="KIND[,KIND...]")
    p.add_argument("name", nargs="?", metavar="NAME")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", metavar="NS", help="namespace (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    p.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json", "name"), default="table",
                   help="output format (default: a table; wide adds labels, and a Service's selector)")
    p.add_argument("-l", "--selector", metavar="SELECTOR",
                   help="only resources whose labels match, e.g. app=reviews,version!=v1 or 'version in (v2,v3)'")
    p.add_argument("-w", "--watch", action="store_true",
                   help="after the table, print a row for each resource added, changed or deleted, until Ctrl-C")
    p.add_argument("--watch-interval", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)
    add_connection_args(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser(
        "label", help="set or remove labels on a namespace, pod or service",
        description="Set labels with KEY=VALUE, remove them with KEY- (as kubectl label). The mesh reads "
                    "istio.io/dataplane-mode=ambient|none (namespace or pod) and istio.io/use-waypoint=NAME "
                    "(namespace, service or pod).",
        epilog="examples:\n  meshctl label namespace bookinfo istio.io/dataplane-mode=ambient\n"
               "  meshctl label pod ratings-v1-0 -n bookinfo istio.io/dataplane-mode=none\n"
               "  meshctl label namespace bookinfo istio.io/use-waypoint-",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", metavar="KIND", help="namespace, pod or service (any kind works)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace of a pod or service (default: default)")
    add_connection_args(p)
    p.set_defaults(func=cmd_label)


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        docs = load_paths(args.filename)
        if not docs:
            raise UsageError("no documents found in " + ", ".join(args.filename))
        _, errors = validate_documents(docs, args.namespace or DEFAULT_NAMESPACE)
        if errors:
            raise ValidationError(errors)
        if args.dry_run:
            print(f"{len(docs)} document{'s' * (len(docs) != 1)} valid (dry run: nothing sent)")
            return 0
        result = client_from(args).apply(docs, args.namespace)
    except ValidationError as exc:
        raise report(exc, "applied") from exc
    for outcome in result["outcomes"]:
        print(outcome["text"])
    print_warnings(result)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = client_from(args)
    ns = args.namespace or DEFAULT_NAMESPACE
    try:
        if args.filename:
            if args.kind:
                raise UsageError("give either -f FILE or KIND NAME..., not both")
            docs = load_paths(args.filename)
            errors = [e for d in docs for e in d.locate(check_reference(d.body, ns)[1])]
            if errors:
                raise ValidationError(errors)
            result = client.delete(docs, args.namespace, args.ignore_not_found)
        else:
            if not args.kind or not args.names:
                raise UsageError("say what to delete: -f FILE, or KIND NAME...")
            info = _kind(args.kind)
            refs = [f"{info.kind}/{ns}/{n}" if info.namespaced else f"{info.kind}/{n}" for n in args.names]
            result = client.delete_refs(refs, args.ignore_not_found)
    except ValidationError as exc:
        raise report(exc, "deleted") from exc
    for outcome in result["outcomes"]:
        print(outcome["text"])
    return 0


Section = tuple[str, str, list[dict[str, Any]], str | None, bool]  # kind, display, items, namespace, namespaced


def cmd_get(args: argparse.Namespace) -> int:
    kinds = [k for k in args.kind.split(",") if k]
    if not kinds:
        raise UsageError("say which kind to get, e.g. `meshctl get pods`")
    if args.name and len(kinds) > 1:
        raise UsageError("a NAME needs one kind: `meshctl get KIND NAME`")
    if args.watch and args.output not in ("table", "wide"):
        raise UsageError("-w prints table rows as they change: use it with -o table or -o wide")
    reqs = selector.parse(args.selector) if args.selector else ()
    sections = _collect(args, kinds, reqs)
    everything = [body for _, _, items, _, _ in sections for body in items]
    if args.output == "json":
        out: Any = everything[0] if args.name and everything else {"apiVersion": "v1", "kind": "List",
                                                                    "items": everything}
        print(json.dumps(out, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump_all(everything, sort_keys=False, default_flow_style=False), end="")
    elif args.output == "name":
        for _, display, items, _, _ in sections:
            for body in items:
                print(f"{display}/{body['metadata']['name']}")
    else:
        printed = False
        for kind, _, items, namespace, namespaced in sections:
            if items and printed:
                print()
            _print_table(kind, items, show_namespace=namespace is None and namespaced, wide=args.output == "wide")
            printed = printed or bool(items)
        for kind, _, items, namespace, _ in sections:
            if not items:
                where = f" in namespace {namespace}" if namespace else ""
                print(f"No {kind} resources found{where}.", file=sys.stderr)
    if args.watch:
        _watch(args, kinds, reqs, sections)
    return 0


def _collect(args: argparse.Namespace, kinds: list[str], reqs: tuple[selector.Requirement, ...]) -> list[Section]:
    sections: list[Section] = []
    for text in kinds:
        kind = workloads.resolve_kind(text)
        if kind is not None:  # the local cluster's own workloads: from its record
            access.require_root("get")
            namespace = None if args.all_namespaces else (args.namespace or DEFAULT_NAMESPACE)
            items = workloads.get(find_cluster(args.cluster), kind, namespace, args.name)
            sections.append((kind, f"{kind.lower()}.apps", _selected(items, reqs), namespace, True))
            continue
        if resolve_kind(text) is None:
            raise UsageError(f"unknown kind {text!r}: use one of {KIND_NAMES}, daemonset, deployment")
        info = _kind(text)
        namespace = None if args.all_namespaces or not info.namespaced else (args.namespace or DEFAULT_NAMESPACE)
        items = client_from(args).get(info.kind, namespace, args.name)
        sections.append((info.kind, info.display, _selected(items, reqs), namespace, info.namespaced))
    return sections


def _selected(items: list[dict[str, Any]], reqs: tuple[selector.Requirement, ...]) -> list[dict[str, Any]]:
    return [b for b in items if selector.matches(reqs, (b.get("metadata") or {}).get("labels"))]


def _watch(args: argparse.Namespace, kinds: list[str], reqs: tuple[selector.Requirement, ...],
           first: list[Section]) -> None:
    """As `kubectl get -w`: after the table, a row for each resource that is added or changed (and marked
    `(deleted)` when it goes), polled every --watch-interval, until interrupted."""
    def state(sections: list[Section]) -> dict[tuple[str, str, str], tuple[str, dict[str, Any], bool]]:
        return {(kind, b["metadata"].get("namespace", ""), b["metadata"]["name"]):
                (json.dumps(b, sort_keys=True), b, namespace is None and namespaced)
                for kind, _, items, namespace, namespaced in sections for b in items}

    seen = state(first)
    wide = args.output == "wide"
    header = bool(seen)  # the table printed one

    def show(kind: str, body: dict[str, Any], show_ns: bool, suffix: str = "") -> None:
        nonlocal header
        if not header:
            print("   ".join(_row(kind, body, show_ns, wide)), flush=True)
            header = True
        print(_line(kind, body, show_ns, wide) + suffix, flush=True)

    try:
        while True:
            time.sleep(args.watch_interval)
            now = state(_collect(args, kinds, reqs))
            for key, (text, body, show_ns) in now.items():
                if key not in seen or seen[key][0] != text:
                    show(key[0], body, show_ns)
            for key, (_, body, show_ns) in seen.items():
                if key not in now:
                    show(key[0], body, show_ns, "   (deleted)")
            seen = now
    except KeyboardInterrupt:
        return


def cmd_label(args: argparse.Namespace) -> int:
    info = _kind(args.kind)
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for change in args.changes:
        if change.endswith("-") and "=" not in change:
            remove.append(change[:-1])
        elif "=" in change:
            key, _, value = change.partition("=")
            set_labels[key] = value
        else:
            raise UsageError(f"{change!r}: write KEY=VALUE to set a label or KEY- to remove it")
    ref = f"{info.kind}/{args.namespace or DEFAULT_NAMESPACE}/{args.name}" if info.namespaced else f"{info.kind}/{args.name}"
    try:
        result = client_from(args).label(ref, set_labels, remove)
    except ValidationError as exc:
        raise report(exc, "labeled") from exc
    for outcome in result["outcomes"]:
        print(outcome["text"])
    print_warnings(result)
    return 0


def _kind(text: str) -> Any:
    info = resolve_kind(text)
    if info is None:
        raise UsageError(f"unknown kind {text!r}: use one of {KIND_NAMES}")
    return info


def _columns(kind: str, body: dict[str, Any]) -> dict[str, str]:
    spec, status, meta = body.get("spec") or {}, body.get("status") or {}, body.get("metadata") or {}
    labels = meta.get("labels") or {}
    if kind == "Pod":
        return {"IP": status.get("podIP", "<none>"), "NODE": spec.get("nodeName", "<none>"),
                "SERVICE ACCOUNT": spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"}
    if kind == "Service":
        ports = ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
        return {"CLUSTER-IP": spec.get("clusterIP") or "<none>", "PORTS": ports or "<none>"}
    if kind == "Namespace":
        return {"DATAPLANE": labels.get("istio.io/dataplane-mode", ""), "WAYPOINT": labels.get("istio.io/use-waypoint", "")}
    if kind == "VirtualService":
        return {"HOSTS": ",".join(spec.get("hosts") or [])}
    if kind == "DestinationRule":
        return {"HOST": spec.get("host", ""), "SUBSETS": ",".join(s["name"] for s in spec.get("subsets") or [])}
    if kind == "AuthorizationPolicy":
        return {"ACTION": spec.get("action", "ALLOW")}
    if kind == "PeerAuthentication":
        return {"MODE": (spec.get("mtls") or {}).get("mode", "UNSET")}
    if kind == "Gateway":  # kubectl's columns, and where an ingress Gateway's listeners are published
        programmed = next((c.get("status", "") for c in status.get("conditions") or [] if c.get("type") == "Programmed"), "")
        return {"CLASS": spec.get("gatewayClassName", ""),
                "ADDRESS": ",".join(a.get("value", "") for a in status.get("addresses") or []) or "<none>",
                "PROGRAMMED": programmed or "Unknown",
                "LISTENERS": ",".join(f"{li['name']}={li['publishedAddress']}" for li in status.get("listeners") or []
                                      if li.get("publishedAddress")) or "<none>"}
    if kind in ("HTTPRoute", "GRPCRoute"):
        return {"HOSTNAMES": ",".join(spec.get("hostnames") or []) or "<none>",
                "PARENTS": ",".join(p.get("name", "") for p in spec.get("parentRefs") or [])}
    if kind == "DaemonSet":
        return {"DESIRED": str(status.get("desiredNumberScheduled", 0)),
                "CURRENT": str(status.get("currentNumberScheduled", 0)), "READY": str(status.get("numberReady", 0)),
                "UP-TO-DATE": str(status.get("updatedNumberScheduled", 0)),
                "AVAILABLE": str(status.get("numberAvailable", 0))}
    if kind == "Deployment":
        return {"READY": f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
                "UP-TO-DATE": str(status.get("updatedReplicas", 0)),
                "AVAILABLE": str(status.get("availableReplicas", 0))}
    return {}


def _row(kind: str, body: dict[str, Any], show_namespace: bool, wide: bool) -> dict[str, str]:
    meta = body["metadata"]
    row = ({"NAMESPACE": meta.get("namespace", "")} if show_namespace else {}) | {"NAME": meta["name"]}
    row |= _columns(kind, body)
    if kind not in WORKLOAD_KINDS:  # the local cluster's workloads have no store version
        row["VERSION"] = str(meta.get("resourceVersion", ""))
    if wide:
        spec = body.get("spec") or {}
        if kind == "Service":
            row["SELECTOR"] = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
        row["LABELS"] = ",".join(f"{k}={v}" for k, v in sorted((meta.get("labels") or {}).items())) or "<none>"
    return row


def _line(kind: str, body: dict[str, Any], show_namespace: bool, wide: bool) -> str:
    """One resource's row on its own (a watch prints rows as they change)."""
    return "   ".join(_row(kind, body, show_namespace, wide).values())


def _print_table(kind: str, items: list[dict[str, Any]], show_namespace: bool, wide: bool = False) -> None:
    if not items:
        return
    rows = [_row(kind, body, show_namespace, wide) for body in items]
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r.get(h, "")) for r in rows)) for h in headers}
    print("   ".join(h.ljust(widths[h]) for h in headers).rstrip())
    for r in rows:
        print("   ".join(r.get(h, "").ljust(widths[h]) for h in headers).rstrip())
