"""The mesh's CNI plugin: chained after the plugins that give a pod its network, it hands the pod to the
node agent, as Istio's istio-cni does for ztunnel.

    CNI_COMMAND=ADD ... python -m nodeagent.cni.plugin < network-config.json     (the `ambient-cni` wrapper)

ADD opens the pod's network namespace and passes it (SCM_RIGHTS), with who the pod is, its addresses
from `prevResult`, its cgroup and the annotations the agent acts on (given by the runtime as `runtimeConfig`
of the capability the plugin's entry declares), to the agent's Unix socket, then waits for the answer: `enrolled` (its
listeners and capture are in place) or `not-in-mesh`, and prints `prevResult` unchanged.  The agent decides
whether the pod is in the mesh, from discovery.  When the agent cannot be reached or does not answer in
time, ADD fails (CNI error 11, try again later) so that no pod runs uncaptured, unless the config says
`failOpen`.  DEL tells the agent the pod is gone and never fails for want of an agent; CHECK asks whether
the pod is enrolled; VERSION prints the versions this plugin speaks.  Pods of `excludeNamespaces` and
sandboxes that are not Kubernetes pods are passed through untouched.

Standard library only: the plugin runs with the node's own Python (see `nodeagent.cni`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from nodeagent.cni import podcgroup, protocol
from nodeagent.cni.spec import (
    INCOMPATIBLE_VERSION,
    IO_FAILURE,
    NOT_ENROLLED,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
    Invocation,
    PluginConfig,
    as_output,
    read_config,
    read_env,
    result_ips,
    version_of,
    version_result,
)

DEL_TIMEOUT = 10.0  # seconds a DEL waits for the agent before it succeeds anyway
ANSWER_GRACE = 1.0  # the agent answers within the timeout it is given; the plugin waits this much longer


def main(env: Mapping[str, str] | None = None, stdin: IO[bytes] | None = None, stdout: IO[str] | None = None) -> int:
    env = os.environ if env is None else env
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    data = b""
    try:
        inv = read_env(env)
        data = stdin.read()
        if inv.command == "VERSION":
            out: dict[str, Any] | None = version_result(version_of(data))
        else:
            out = run(inv, read_config(data, inv.command))
    except CniError as exc:
        _log(f"{exc.msg}" + (f" ({exc.details})" if exc.details else ""))
        stdout.write(json.dumps(exc.result(version_of(data))) + "\n")
        return 1
    if out is not None:
        stdout.write(json.dumps(out) + "\n")
    return 0


def run(inv: Invocation, conf: PluginConfig) -> dict[str, Any] | None:
    """What the command prints (ADD: the result), or None."""
    passed_through = not inv.is_pod or inv.pod_namespace in conf.exclude_namespaces
    if inv.command == "ADD":
        assert conf.prev_result is not None  # read_config refuses an ADD without it
        if not passed_through:
            add(inv, conf)
        return as_output(conf.prev_result, conf.cni_version)
    if passed_through:
        return None
    if inv.command == "DEL":
        delete(inv, conf)
    else:
        check(inv, conf)
    return None


def add(inv: Invocation, conf: PluginConfig) -> None:
    assert conf.prev_result is not None
    pod = pod_info(inv, conf, result_ips(conf.prev_result))
    try:
        netns = os.open(inv.netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CniError(UNKNOWN_CONTAINER, f"cannot open the network namespace {inv.netns} of pod {pod.key}: "
                       f"{exc.strerror}") from exc
    try:
        answer = ask(conf, protocol.Request(protocol.ADD, pod, conf.agent_timeout), (netns,),
                     conf.agent_timeout + ANSWER_GRACE)
    except CniError:
        if not conf.fail_open:
            raise
        _log(f"pod {pod.key} starts without the mesh: no node agent answered (failOpen)")
        return
    finally:
        os.close(netns)
    if answer.result not in (protocol.ENROLLED, protocol.NOT_IN_MESH):
        raise CniError(TRY_AGAIN_LATER, f"the node agent did not enroll pod {pod.key}: {answer.msg or answer.result}",
                       "the pod is in the mesh and must not start uncaptured; the runtime will try again")
    _log(f"pod {pod.key}: {answer.result}")


def delete(inv: Invocation, conf: PluginConfig) -> None:
    pod = pod_info(inv, conf, ())
    try:
        ask(conf, protocol.Request(protocol.DEL, pod, DEL_TIMEOUT), (), DEL_TIMEOUT + ANSWER_GRACE)
    except CniError as exc:  # DEL never fails: the agent lets go of pods it no longer finds
        _log(f"pod {pod.key} deleted without telling the node agent: {exc.msg}")


def check(inv: Invocation, conf: PluginConfig) -> None:
    if conf.cni_version in ("0.3.0", "0.3.1"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or newer, not {conf.cni_version}")
    pod = pod_info(inv, conf, result_ips(conf.prev_result or {}))
    answer = ask(conf, protocol.Request(protocol.CHECK, pod, conf.agent_timeout), (),
                 conf.agent_timeout + ANSWER_GRACE)
    if answer.result not in (protocol.ENROLLED, protocol.NOT_IN_MESH):
        raise CniError(NOT_ENROLLED, f"pod {pod.key} is not enrolled in the mesh: {answer.msg or answer.result}")


def pod_info(inv: Invocation, conf: PluginConfig, ips: tuple[str, ...]) -> protocol.PodInfo:
    cgroup = ""
    if inv.command == "ADD":
        cgroup = podcgroup.find(inv.pod_uid, fmt=conf.cgroup_format, namespace=inv.pod_namespace, name=inv.pod_name)
    return protocol.PodInfo(namespace=inv.pod_namespace, name=inv.pod_name, uid=inv.pod_uid,
                            container_id=inv.container_id, ips=ips, netns=inv.netns, cgroup=cgroup,
                            annotations=protocol.forwarded(conf.annotations))


def ask(conf: PluginConfig, request: protocol.Request, fds: tuple[int, ...], timeout: float) -> protocol.Answer:
    where = conf.agent_socket
    try:
        return protocol.call(where, request, fds, timeout=timeout)
    except TimeoutError as exc:  # socket.timeout
        raise CniError(TRY_AGAIN_LATER, f"the node agent at {where} did not answer within {timeout:.0f}s",
                       "is the node agent on this node overloaded or still starting?") from exc
    except OSError as exc:
        raise CniError(TRY_AGAIN_LATER, f"the node agent is not reachable at {where}: {exc.strerror or exc}",
                       "is the node agent running on this node? Pods of excludeNamespaces start without it") from exc
    except protocol.ProtocolError as exc:
        raise CniError(IO_FAILURE, f"the node agent at {where} answered something this plugin cannot read: {exc}") from exc


def _log(message: str) -> None:
    print(f"{protocol.PLUGIN_TYPE}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
