"""Prometheus' HTTP API, as the dashboard reads it.

    prom = PromClient(Endpoint.tcp("172.30.0.1", 9090, netns="amb.demo.underlay"))
    prom.query('sum by (reporter) (istio_requests_total)')          # -> [Sample(labels, value)]
    prom.query_range('sum(rate(istio_requests_total[1m]))', start, end, step)   # -> [Series(labels, points)]

Pure parts, tested without a server: `parse_vector` and `parse_matrix` (the `data` of a success answer),
`histogram_quantile` (Prometheus' own interpolation over cumulative buckets, so that quantiles of any
grouping of edges come from one bucket query), `either` (a selector on one of two namespace labels).

Every failure is a `PrometheusUnavailable` naming the server and what went wrong: nothing listens, no
answer within the timeout, an answer that is not a success.  Blocking (the API's handlers run in worker
threads); each request has a short timeout so that a page is never held up by a server that hangs.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.serve import client
from mesh.serve.errors import ServeError
from meshctl.dashboard.errors import PrometheusUnavailable

TIMEOUT = 3.0

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: tuple[tuple[float, float], ...]  # (unix seconds, value)


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def parse_vector(data: Mapping[str, Any]) -> list[Sample]:
    """The samples of an instant query's `data` (a vector; a scalar is one sample without labels)."""
    kind = data.get("resultType")
    result = data.get("result") or []
    if kind == "scalar":
        return [Sample({}, _number(result[1]))]
    if kind != "vector":
        raise PrometheusUnavailable(f"Prometheus answered a {kind} where a vector was expected")
    return [Sample(dict(r.get("metric") or {}), _number((r.get("value") or [0, "NaN"])[1])) for r in result]


def parse_matrix(data: Mapping[str, Any]) -> list[Series]:
    """The series of a range query's `data`."""
    if data.get("resultType") != "matrix":
        raise PrometheusUnavailable(f"Prometheus answered a {data.get('resultType')} where a matrix was expected")
    return [Series(dict(r.get("metric") or {}), tuple((float(t), _number(v)) for t, v in r.get("values") or []))
            for r in data.get("result") or []]


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative buckets (upper bound -> count or rate), as PromQL's
    `histogram_quantile` computes it: linear interpolation inside the bucket where the rank falls, the
    first bucket starting at 0, the highest finite bound when the rank falls in +Inf.  None without
    observations (PromQL's NaN) or without a +Inf bucket."""
    if not buckets or math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    for i in range(1, len(counts)):  # rates of different series can be a hair out of order
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if not total > 0:
        return None
    rank = q * total
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if bounds[i] == math.inf:
        return bounds[-2] if len(bounds) > 1 else None
    lower, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], counts[i - 1])
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    in_bucket = counts[i] - below
    if in_bucket <= 0:
        return bounds[i]
    return lower + (bounds[i] - lower) * (rank - below) / in_bucket


def le(labels: Labels) -> float:
    """A bucket's upper bound (`le` label)."""
    return math.inf if labels.get("le") in ("+Inf", "Inf", "inf") else _number(labels.get("le"))


def quote(value: str) -> str:
    """A PromQL string literal."""
    return json.dumps(value)


def either(metric: str, labels: Iterable[str], value: str, extra: str = "") -> list[str]:
    """One selector per label: `metric{label="value",extra}`; the caller joins the queries with `or`
    (PromQL has no "this label or that one" matcher)."""
    return [f"{metric}{{{label}={quote(value)}{',' + extra if extra else ''}}}" for label in labels]


class PromClient:
    """A Prometheus server's HTTP API (`/api/v1/query`, `/api/v1/query_range`)."""

    def __init__(self, endpoint: client.Endpoint, timeout: float = TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout

    @property
    def where(self) -> str:
        return f"Prometheus at http://{self.endpoint}"

    def _get(self, path: str, params: Mapping[str, str]) -> Mapping[str, Any]:
        target = f"{path}?{urllib.parse.urlencode(params)}"
        try:
            reply = client.get(self.endpoint, target, timeout=self.timeout)
        except ServeError as exc:
            raise PrometheusUnavailable(f"{self.where} is unreachable ({exc}): is it running? "
                                        "(`meshctl cluster status` says where it listens)") from None
        try:
            answer = reply.json()
        except ValueError:
            raise PrometheusUnavailable(f"{self.where} answered {reply.status} with something that is not "
                                        "JSON: is that address a Prometheus server?") from None
        if reply.status != 200 or not isinstance(answer, dict) or answer.get("status") != "success":
            error = answer.get("error") if isinstance(answer, dict) else None
            raise PrometheusUnavailable(f"{self.where} refused a query ({reply.status}): {error or reply.text[:200]}")
        data: Mapping[str, Any] = answer.get("data") or {}
        return data

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        return parse_vector(self._get("/api/v1/query", params))

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return parse_matrix(self._get("/api/v1/query_range", params))

    def targets_up(self) -> list[Sample]:
        """`up` of every target: which components Prometheus scrapes, and whether the last scrape worked."""
        return self.query("up")
