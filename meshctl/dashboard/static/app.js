// The dashboard's page: four views over the JSON API (/api/*), drawn with plain DOM and SVG.
// Routes: #/graph?namespace=NS  #/workloads?namespace=NS  #/workload/NS/NAME  #/traces?service=S
//         #/trace/ID  #/health.  Each answer's `warnings` become banners; "live" refreshes the view.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { config: null, namespace: "", timer: null, view: null };
const PALETTE = ["#2f6fde", "#e07b24", "#2e9a5b", "#8a56d1", "#d23f3f", "#1a9fb0", "#b5891a", "#c04f9b"];

// ---- DOM helpers -------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function table(headers, rows, cls) {
  return h("table", { class: cls || "" }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

const fmt = {
  rate: (v) => (v === null || v === undefined ? "-" : v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)),
  pct: (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 1) + "%"),
  ms: (v) => (v === null || v === undefined ? "-" : v >= 100 ? v.toFixed(0) + " ms" : v.toFixed(1) + " ms"),
  bytes: (v) => (v === null || v === undefined ? "-" : v >= 1e6 ? (v / 1e6).toFixed(1) + " MB" :
    v >= 1e3 ? (v / 1e3).toFixed(1) + " kB" : v.toFixed(0) + " B"),
  time: (ms) => new Date(ms).toLocaleTimeString([], { hour12: false }),
  left: (sec) => {
    if (sec === null || sec === undefined) return "-";
    const past = sec < 0; sec = Math.abs(sec);
    const d = Math.floor(sec / 86400), hh = Math.floor((sec % 86400) / 3600), m = Math.floor((sec % 3600) / 60);
    const t = d ? `${d}d ${hh}h` : hh ? `${hh}h ${m}m` : `${m}m ${Math.floor(sec % 60)}s`;
    return past ? `expired ${t} ago` : `in ${t}`;
  },
};

// ---- data --------------------------------------------------------------------------------------------

async function api(path) {
  let resp;
  try {
    resp = await fetch(path, { cache: "no-store" });
  } catch (e) {
    banners([{ source: "dashboard", message: "the dashboard does not answer: is `meshctl dashboard` still running?" }]);
    return null;
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    banners([{ source: "dashboard", message: (body && body.error) || `${path} answered ${resp.status}` }]);
    return null;
  }
  banners(body.warnings || []);
  document.getElementById("updated").textContent = "updated " + fmt.time(Date.now());
  return body;
}

function banners(warnings) {
  const box = document.getElementById("banners");
  box.replaceChildren(...warnings.map((w) =>
    h("div", { class: "banner", dataset: { source: w.source } }, h("b", {}, w.source), ": ", w.message)));
}

// ---- routing -----------------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(query || "") };
}

async function route() {
  const { parts, query } = parseHash();
  const tab = parts[0] || "graph";
  for (const a of document.querySelectorAll("header nav a"))
    a.classList.toggle("active", a.dataset.tab === (tab === "workload" ? "workloads" : tab === "trace" ? "traces" : tab));
  if (query.get("namespace")) state.namespace = query.get("namespace");
  const views = {
    graph: (first) => graphView(first),
    workloads: () => workloadsView(),
    workload: () => workloadView(parts[1], parts[2]),
    traces: () => tracesView(query.get("service") || ""),
    trace: (first) => traceView(parts[1], first),
    health: () => healthView(),
  };
  state.view = views[tab] || views.graph;
  await state.view(true);
}

function startLive() {
  clearInterval(state.timer);
  const every = Math.max(1, (state.config && state.config.refresh) || 5) * 1000;
  state.timer = setInterval(() => {
    if (document.getElementById("live").checked && state.view && !document.hidden) state.view(false);
  }, every);
}

async function namespaces() {
  const body = await api("/api/namespaces");
  const list = (body && body.namespaces) || [];
  if (!state.namespace) state.namespace = list.includes("bookinfo") ? "bookinfo" : list.find((n) => n !== "istio-system") || list[0] || "default";
  return list;
}

function namespaceSelect(list, onchange) {
  const sel = h("select", { id: "namespace", onchange: (e) => onchange(e.target.value) },
    list.map((n) => h("option", { value: n, selected: n === state.namespace }, n)));
  return h("label", {}, "namespace ", sel);
}

function view() { return document.getElementById("view"); }

// ---- graph -------------------------------------------------------------------------------------------

let graphWindow = "1m";

async function graphView(first) {
  if (first) {
    const list = await namespaces();
    const windows = ["1m", "5m", "15m", "1h"];
    view().replaceChildren(
      h("div", { class: "toolbar" },
        namespaceSelect(list, (ns) => { location.hash = `#/graph?namespace=${encodeURIComponent(ns)}`; }),
        h("label", {}, "rates over ", h("select", { id: "window", onchange: (e) => { graphWindow = e.target.value; graphView(false); } },
          windows.map((w) => h("option", { value: w, selected: w === graphWindow }, w)))),
        legend()),
      h("div", { class: "graph", id: "graph" }, h("p", { class: "muted" }, "Loading…")),
      h("h3", {}, "Edges"), h("div", { id: "edges" }));
  }
  const body = await api(`/api/graph?namespace=${encodeURIComponent(state.namespace)}&window=${graphWindow}`);
  if (!body || !document.getElementById("graph")) return;
  drawGraph(body);
  edgeTable(body);
}

function legend() {
  const icon = (shape) => s("svg", { width: 18, height: 18 }, shape);
  return h("span", { class: "legend" },
    h("span", {}, icon(s("circle", { cx: 9, cy: 9, r: 7, fill: "#dce7fb", stroke: "#2f6fde" })), " workload"),
    h("span", {}, icon(s("path", { d: triangle(9, 10, 8), fill: "#e9f6ee", stroke: "#2e9a5b" })), " service"),
    h("span", {}, icon(s("path", { d: hexagon(9, 9, 8), fill: "#f3e9fb", stroke: "#8a56d1" })), " waypoint"),
    h("span", {}, s("svg", { width: 16, height: 18 }, lock(8, 10, true)), " mutual TLS"),
    h("span", {}, s("svg", { width: 16, height: 18 }, lock(8, 10, false)), " plaintext"));
}

function triangle(x, y, r) { return `M${x},${y - r} L${x + r},${y + r * 0.8} L${x - r},${y + r * 0.8} Z`; }
function hexagon(x, y, r) {
  const p = [];
  for (let i = 0; i < 6; i++) p.push(`${x + r * Math.cos(Math.PI / 3 * i)},${y + r * Math.sin(Math.PI / 3 * i)}`);
  return "M" + p.join(" L") + " Z";
}
function lock(x, y, closed) {
  const arc = closed ? `M${x - 3.5},${y - 1} v-3 a3.5,3.5 0 0 1 7,0 v3` : `M${x - 3.5},${y - 1} v-3 a3.5,3.5 0 0 1 7,0 v-1`;
  return s("g", { class: closed ? "lock" : "unlock" }, s("path", { d: arc }),
    s("rect", { x: x - 5, y: y - 1, width: 10, height: 7, rx: 1.5 }),
    s("title", {}, closed ? "mutual TLS" : "plaintext"));
}

// A layered layout, left to right: a node's column is the longest path to it; within a column nodes are
// ordered by the mean row of what points at them.
function layout(nodes, links) {
  const preds = new Map(nodes.map((n) => [n.id, []]));
  const succs = new Map(nodes.map((n) => [n.id, []]));
  for (const l of links) {
    if (preds.has(l.target) && succs.has(l.source) && l.source !== l.target) {
      preds.get(l.target).push(l.source); succs.get(l.source).push(l.target);
    }
  }
  const rank = new Map(), visiting = new Set();
  const rankOf = (id) => {
    if (rank.has(id)) return rank.get(id);
    if (visiting.has(id)) return 0;
    visiting.add(id);
    const r = Math.max(-1, ...preds.get(id).map(rankOf)) + 1;
    visiting.delete(id); rank.set(id, r);
    return r;
  };
  nodes.forEach((n) => rankOf(n.id));
  // A client that only calls one part of the graph stands just before what it calls, not at the far left.
  for (const n of nodes) {
    if (!preds.get(n.id).length && succs.get(n.id).length) rank.set(n.id, Math.max(0, Math.min(...succs.get(n.id).map((x) => rank.get(x))) - 1));
  }
  const columns = [];
  for (const n of nodes) (columns[rank.get(n.id)] ||= []).push(n);
  const row = new Map();
  columns.forEach((col) => {
    col.sort((a, b) => {
      const key = (n) => { const p = preds.get(n.id).map((x) => row.get(x) ?? 0); return p.length ? p.reduce((x, y) => x + y) / p.length : 0; };
      return key(a) - key(b) || a.id.localeCompare(b.id);
    });
    col.forEach((n, i) => row.set(n.id, i));
  });
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const pos = new Map();
  columns.forEach((col, c) => col.forEach((n, i) =>
    pos.set(n.id, { x: 70 + c * 235, y: 50 + (i + (tallest - col.length) / 2) * 105 })));
  return { pos, width: 140 + Math.max(0, columns.length - 1) * 235, height: 40 + tallest * 105 };
}

function nodeShape(n, p) {
  const other = !n.in_namespace && n.kind !== "unknown";
  const styles = { workload: ["#dce7fb", "#2f6fde"], service: ["#e9f6ee", "#2e9a5b"], waypoint: ["#f3e9fb", "#8a56d1"],
    unknown: ["#eceef2", "#9aa3b5"] };
  const [fill, stroke] = other ? ["#f1f2f5", "#9aa3b5"] : styles[n.kind] || styles.unknown;
  const shape = n.kind === "service" ? s("path", { d: triangle(p.x, p.y, 20), fill, stroke, "stroke-width": 2 })
    : n.kind === "waypoint" ? s("path", { d: hexagon(p.x, p.y, 21), fill, stroke, "stroke-width": 2 })
    : n.kind === "unknown" ? s("rect", { x: p.x - 17, y: p.y - 17, width: 34, height: 34, rx: 4, fill, stroke, "stroke-width": 2 })
    : s("circle", { cx: p.x, cy: p.y, r: 18, fill, stroke, "stroke-width": 2 });
  const click = n.kind === "workload" || n.kind === "waypoint"
    ? () => { location.hash = `#/workload/${encodeURIComponent(n.namespace)}/${encodeURIComponent(n.name)}`; }
    : n.kind === "service" ? () => { location.hash = `#/traces?service=${encodeURIComponent(n.name)}`; } : null;
  return s("g", { class: `node ${n.kind}`, "data-id": n.id, "data-kind": n.kind, onclick: click }, shape,
    s("text", { class: "label", x: p.x, y: p.y + 36 }, n.name),
    s("text", { class: "sub", x: p.x, y: p.y + 49 }, n.kind === "waypoint" ? "waypoint" : other ? n.namespace : ""),
    s("title", {}, `${n.kind} ${n.namespace ? n.namespace + "/" : ""}${n.host || n.name}`));
}

function linkClass(l) {
  if (!l.rate && !l.connection_rate && !l.bytes_rate) return "idle";
  return l.error_rate > 0.05 ? "error" : l.error_rate > 0 ? "warn" : "ok";
}

// What is drawn: the edges' paths with the waypoints taken out of the layout.  A waypoint is drawn where
// traffic passes it: a hexagon on each segment it carries (service -> workload), with the lock of the hop
// into it before and the lock of the hop out of it after.
function segments(g) {
  const links = new Map(g.links.map((l) => [`${l.source}>${l.target}`, l]));
  const segs = new Map();
  for (const e of g.edges) {
    const p = e.path;
    for (let i = 0; i < p.length - 1; i++) {
      if (p[i + 1].startsWith("waypoint:")) continue; // drawn with the hop out of it
      let from = p[i], via = null;
      if (from.startsWith("waypoint:") && i > 0) { via = from; from = p[i - 1]; }
      const key = `${from}>${p[i + 1]}`;
      if (!segs.has(key)) {
        segs.set(key, { source: from, target: p[i + 1], via, into: via ? links.get(`${from}>${via}`) : null,
          out: links.get(`${via || from}>${p[i + 1]}`), edges: [] });
      }
      segs.get(key).edges.push(e.id);
    }
  }
  return [...segs.values()].filter((x) => x.out);
}

function drawGraph(g) {
  const box = document.getElementById("graph");
  if (!g.nodes.length) {
    box.replaceChildren(h("p", { class: "muted", style: "padding: 12px" },
      `No traffic in namespace ${g.namespace} over the last ${g.window} (as Prometheus has it).`));
    return;
  }
  const segs = segments(g);
  const nodes = g.nodes.filter((n) => n.kind !== "waypoint");
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const { pos, width, height } = layout(nodes, segs);
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, id: "graph-svg",
    style: `width:100%;max-width:${width}px;height:auto` },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 9, markerHeight: 9,
      markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#7d8aa5" }))));
  const maxRate = Math.max(1e-9, ...segs.map((x) => x.out.rate || x.out.connection_rate || 0));
  for (const seg of segs) {
    const l = seg.out, a = pos.get(seg.source), b = pos.get(seg.target);
    if (!a || !b) continue;
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const x1 = a.x + (dx / len) * 24, y1 = a.y + (dy / len) * 24, x2 = b.x - (dx / len) * 26, y2 = b.y - (dy / len) * 26;
    // A segment that skips columns bows (towards the side its target is on, else downwards) so that it
    // does not run through the nodes between.
    const bow = Math.abs(dx) > 300 ? Math.min(160, Math.abs(dx) * 0.15) * (dy < -5 ? -1 : 1) : 0;
    const cx = (x1 + x2) / 2, cy = (y1 + y2) / 2 + bow;
    const at = (f) => [(1 - f) ** 2 * x1 + 2 * (1 - f) * f * cx + f * f * x2, (1 - f) ** 2 * y1 + 2 * (1 - f) * f * cy + f * f * y2];
    const widthPx = 1.2 + 3.5 * Math.sqrt((l.rate || l.connection_rate || 0) / maxRate);
    const http = l.protocols.includes("http");
    const figures = http ? `${fmt.rate(l.rate)} rps · ${fmt.pct(l.error_rate)}${l.p99 !== null ? " · p99 " + fmt.ms(l.p99) : ""}`
      : `${fmt.bytes(l.bytes_rate)}/s`;
    const [fx, fy] = seg.via ? at(0.7) : at(0.5);
    const mtls = seg.via ? (seg.into && seg.into.mtls === false) || l.mtls === false ? false
      : seg.into && seg.into.mtls && l.mtls ? true : null : l.mtls;
    const group = s("g", { class: `link ${linkClass(l)}`, "data-source": seg.source, "data-target": seg.target,
      "data-via": seg.via || "", "data-mtls": String(mtls), "data-rate": l.rate, "data-requests": l.requests },
    s("path", { class: "line", d: `M${x1},${y1} Q${cx},${cy} ${x2},${y2}`, "stroke-width": widthPx, "marker-end": "url(#arrow)" }),
    s("text", { class: "figures", x: fx, y: fy - 9, "text-anchor": "middle" }, figures),
    l.mtls === null ? null : s("g", { class: "hop", "data-hop": "out" }, lock(fx, fy + 5, l.mtls)),
    s("title", {}, `${seg.source} → ${seg.target}${seg.via ? " through " + seg.via : ""}\n${seg.edges.join("\n")}`));
    if (seg.via) {
      const [wx, wy] = at(0.42), [ix, iy] = at(0.18), wp = byId.get(seg.via) || { name: seg.via, namespace: "" };
      if (seg.into && seg.into.mtls !== null) group.append(s("g", { class: "hop", "data-hop": "in" }, lock(ix, iy + 5, seg.into.mtls)));
      group.append(s("g", { class: "via waypoint", "data-id": seg.via, onclick: () => {
        location.hash = `#/workload/${encodeURIComponent(wp.namespace)}/${encodeURIComponent(wp.name)}`; } },
      s("path", { d: hexagon(wx, wy, 11), fill: "#f3e9fb", stroke: "#8a56d1", "stroke-width": 2 }),
      s("text", { class: "sub", x: wx, y: wy + 22, "text-anchor": "middle", fill: "#8a56d1" }, wp.name),
      s("title", {}, `waypoint ${wp.namespace}/${wp.name}`)));
    }
    svg.append(group);
  }
  for (const n of nodes) svg.append(nodeShape(n, pos.get(n.id)));
  box.replaceChildren(svg);
}

function edgeTable(g) {
  const rows = g.edges.map((e) => h("tr", {
    class: "edge", dataset: { source: e.source, sourceNamespace: e.source_namespace, destination: e.destination,
      destinationNamespace: e.destination_namespace, protocol: e.protocol, mtls: String(e.mtls),
      requests: e.requests ?? "", errors: e.errors ?? "", waypoint: e.waypoint || "" } },
  h("td", {}, e.source_namespace && e.source_namespace !== g.namespace ? `${e.source_namespace}/${e.source}` : e.source),
  h("td", {}, e.service ? e.service.split(".")[0] : "-"),
  h("td", {}, e.waypoint || "-"),
  h("td", {}, e.destination_namespace && e.destination_namespace !== g.namespace ? `${e.destination_namespace}/${e.destination}` : e.destination),
  h("td", {}, e.protocol),
  h("td", { class: "num" }, e.protocol === "http" ? e.requests : e.connections),
  h("td", { class: "num" }, e.protocol === "http" ? fmt.rate(e.rate) : fmt.rate(e.connection_rate)),
  h("td", { class: "num" }, e.protocol === "http" ? `${e.errors} (${fmt.pct(e.error_rate)})` : "-"),
  h("td", { class: "num" }, fmt.ms(e.p99)),
  h("td", { class: "num" }, e.protocol === "tcp" ? `${fmt.bytes(e.bytes_received_rate)}/s ↑ ${fmt.bytes(e.bytes_sent_rate)}/s ↓` : "-"),
  h("td", {}, e.mtls ? h("span", { class: "pill ok" }, "mTLS") : h("span", { class: "pill bad" }, "plaintext"))));
  document.getElementById("edges").replaceChildren(rows.length ? table(
    ["source", "service", "waypoint", "destination", "protocol", "requests / conns", "per s", "5xx", "p99", "bytes", "security"],
    rows, "edges") : h("p", { class: "muted" }, "none"));
}

// ---- workloads ---------------------------------------------------------------------------------------

async function workloadsView() {
  const list = await namespaces();
  const body = await api(`/api/workloads?namespace=${encodeURIComponent(state.namespace)}`);
  if (!body) return;
  view().replaceChildren(
    h("div", { class: "toolbar" }, namespaceSelect(list, (ns) => { location.hash = `#/workloads?namespace=${encodeURIComponent(ns)}`; })),
    table(["workload", "node", "address", "status"], body.workloads.map((w) => h("tr", {
      class: "clickable", onclick: () => { location.hash = `#/workload/${encodeURIComponent(w.namespace)}/${encodeURIComponent(w.name)}`; } },
    h("td", {}, w.name, w.waypoint ? " (waypoint)" : ""), h("td", {}, w.node || "-"), h("td", {}, w.ip || "-"),
    h("td", {}, w.running ? h("span", { class: "pill ok" }, "running") : h("span", { class: "pill bad" }, "not running"))))));
}

async function workloadView(ns, name) {
  const body = await api(`/api/workload?namespace=${encodeURIComponent(ns)}&name=${encodeURIComponent(name)}`);
  if (!body || !body.workload) return;
  const w = body.workload;
  const kv = (k, v) => h("tr", {}, h("th", {}, k), h("td", {}, v));
  view().replaceChildren(
    h("h2", {}, `${w.namespace}/${w.name}`),
    table([], [kv("identity", h("code", { id: "identity" }, w.identity)), kv("service account", w.service_account),
      kv("data plane", w.dataplane_mode), kv("waypoint", w.waypoint || "none"), kv("services", w.services.join(", ") || "none"),
      kv("labels", Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "none")], "facts"),
    h("h3", {}, "Pods"),
    table(["pod", "node", "address", "status"], w.pods.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, p.node || "-"),
      h("td", {}, p.ip || "-"), h("td", {}, p.running ? h("span", { class: "pill ok" }, "running") : h("span", { class: "pill bad" }, "not running"))))),
    h("h3", {}, "Policies that select it"),
    w.policies.length ? table(["kind", "policy", "applies", "effect"], w.policies.map((p) => h("tr", {},
      h("td", {}, p.kind), h("td", {}, `${p.namespace}/${p.name}`), h("td", {}, p.applies),
      h("td", {}, p.action ? `${p.action}, ${p.rules} rule(s)` : p.mode ? `mTLS ${p.mode}` : `JWT ${(p.issuers || []).join(", ")}`))), "policies")
      : h("p", { class: "muted" }, "none"),
    h("h3", {}, "Routes that reach it"),
    w.routes.length ? table(["VirtualService", "route", "match", "destination", "weight", "also"], w.routes.map((r) => h("tr", {},
      h("td", {}, r.virtualservice), h("td", {}, r.route), h("td", {}, r.match),
      h("td", {}, r.destination.split(".")[0] + (r.subset ? ` (subset ${r.subset})` : "")),
      h("td", { class: "num" }, r.weight ?? "-"), h("td", {}, r.extras.join(", ") || "-"))), "routes")
      : h("p", { class: "muted" }, "none (the service's default routing)"),
    h("h3", {}, "Traffic (last 15 minutes)"),
    h("div", { class: "charts" }, w.charts.map(lineChart)));
}

function lineChart(chart) {
  const W = 360, H = 150, L = 44, B = 22, T = 8;
  const all = chart.series.flatMap((x) => x.points);
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const vmax = Math.max(1e-9, ...all.map((p) => p[1]));
  const X = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 8);
  const Y = (v) => T + (1 - v / vmax) * (H - T - B);
  const svg = s("svg", { width: W, height: H },
    s("line", { x1: L, y1: H - B, x2: W - 8, y2: H - B, stroke: "#c9ced9" }),
    s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#c9ced9" }),
    s("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, all.length ? fmt.rate(vmax) : ""),
    s("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
  if (all.length) {
    svg.append(s("text", { x: L, y: H - 6 }, fmt.time(t0 * 1000)), s("text", { x: W - 8, y: H - 6, "text-anchor": "end" }, fmt.time(t1 * 1000)));
  } else {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data"));
  }
  chart.series.forEach((ser, i) => {
    if (ser.points.length) svg.append(s("polyline", { fill: "none", stroke: PALETTE[i % PALETTE.length], "stroke-width": 1.8,
      points: ser.points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") }));
  });
  return h("div", { class: "chart" }, h("div", { class: "title" }, `${chart.title} (${chart.unit})`), svg,
    h("div", { class: "legend" }, chart.series.map((ser, i) => h("span", {}, h("span", { style: `color:${PALETTE[i % PALETTE.length]}` }, "■ "), ser.name))));
}

// ---- traces ------------------------------------------------------------------------------------------

async function tracesView(service) {
  const body = await api(`/api/traces?service=${encodeURIComponent(service)}&limit=50`);
  if (!body) return;
  const input = h("input", { type: "text", id: "service", value: service, placeholder: "service, e.g. productpage" });
  const go = (e) => { e.preventDefault(); location.hash = `#/traces?service=${encodeURIComponent(input.value.trim())}`; };
  const focused = document.activeElement && document.activeElement.id === "service";
  view().replaceChildren(
    h("form", { class: "toolbar", onsubmit: go }, h("label", {}, "traces of ", input), h("button", { type: "submit" }, "show"),
      h("span", { class: "muted" }, `${body.traces.length} recent trace(s)`)),
    body.traces.length ? table(["started", "root", "duration", "spans", "proxies", "services", "errors"], body.traces.map((t) => h("tr", {
      class: "clickable trace", dataset: { traceId: t.trace_id }, onclick: () => { location.hash = `#/trace/${t.trace_id}`; } },
    h("td", {}, fmt.time(t.start)), h("td", {}, t.root), h("td", { class: "num" }, fmt.ms(t.duration)),
    h("td", { class: "num" }, t.span_count), h("td", {}, t.proxies.length), h("td", {}, t.services.join(", ")),
    h("td", { class: "num" }, t.errors ? h("span", { class: "pill bad" }, t.errors) : "0"))), "traces")
      : h("p", { class: "muted" }, "No traces yet."));
  if (focused) input.focus();
}

function proxyColors(spans) {
  const names = [...new Set(spans.map((x) => x.proxy))].sort();
  return new Map(names.map((n, i) => [n, PALETTE[i % PALETTE.length]]));
}

async function traceView(id, first) {
  if (!first) return; // a finished trace does not change
  const body = await api(`/api/trace?id=${encodeURIComponent(id)}`);
  if (!body || !body.trace) return;
  const t = body.trace, colors = proxyColors(t.spans), total = Math.max(0.001, t.duration);
  const rows = t.spans.map((sp) => {
    const left = (sp.offset / total) * 100, width = Math.max(0.2, (sp.duration / total) * 100);
    const row = h("div", { class: "row span", dataset: { proxy: sp.proxy, service: sp.service, spanId: sp.span_id, depth: sp.depth } },
      h("div", { class: "name", title: sp.name, style: `padding-left:${8 + sp.depth * 16}px` },
        h("span", { class: "proxy", style: `background:${colors.get(sp.proxy)}` }), h("b", {}, sp.proxy), " ", sp.name),
      h("div", { class: "track" },
        h("div", { class: `bar ${sp.status}`, style: `left:${left}%;width:${width}%;background:${colors.get(sp.proxy)}` }),
        h("span", { class: left + width > 80 ? "dur inside" : "dur", style: left + width > 80
          ? `right:${Math.max(0, 100 - left - width) + 0.5}%` : `left:${left + width + 0.5}%` }, fmt.ms(sp.duration))));
    row.addEventListener("click", () => {
      const next = row.nextSibling;
      if (next && next.classList.contains("attrs")) { next.remove(); return; }
      row.after(h("div", { class: "attrs" }, table([], Object.entries(sp.attributes).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, String(v)))))));
    });
    return row;
  });
  view().replaceChildren(
    h("h2", {}, "Trace ", h("code", {}, t.trace_id)),
    h("p", {}, `${t.root} · ${fmt.ms(t.duration)} · ${t.span_count} spans from ${t.proxies.length} proxies · started ${fmt.time(t.start)}`),
    h("div", { class: "proxies" }, [...colors].map(([p, c]) => h("span", {}, h("i", { style: `background:${c}` }), p))),
    h("div", { class: "waterfall", id: "waterfall" },
      h("div", { class: "row head" }, h("div", { class: "name" }, "proxy and span"), h("div", { class: "name" }, `0 – ${fmt.ms(total)}`)),
      rows));
}

// ---- health ------------------------------------------------------------------------------------------

async function healthView() {
  const body = await api("/api/health");
  if (!body) return;
  const hl = body.health || {};
  const cp = hl.control_plane;
  const pill = (ok, yes, no) => (ok === null || ok === undefined ? "-" : h("span", { class: `pill ${ok ? "ok" : "bad"}` }, ok ? yes : no));
  const cfg = (c) => (c.config ? h("span", { class: `pill ${c.config === "SYNCED" ? "ok" : c.config === "STALE" ? "warn" : "bad"}` }, c.config) : "-");
  view().replaceChildren(
    h("div", { class: "card" }, h("b", {}, "Control plane "), cp ? `version ${cp.version || "-"} · ${cp.clients} discovery client(s)` : "not answering",
      cp && cp.errors.length ? h("div", {}, h("b", {}, "not translated: "), cp.errors.join("; ")) : null),
    h("h3", {}, "Components"),
    table(["component", "node", "process", "scraped", "config", "acked version", "capture"], (hl.components || []).map((c) => h("tr", {
      class: "component", dataset: { kind: c.kind, name: c.name, config: c.config || "" } },
    h("td", {}, c.kind === "waypoint" ? `waypoint ${c.namespace}/${c.name}` : c.name), h("td", {}, c.node || "-"),
    h("td", {}, pill(c.running, "running", "not running")), h("td", {}, pill(c.scraped, "up", "down")), h("td", {}, cfg(c)),
    h("td", {}, c.acked_version || "-"), h("td", {}, c.redirect_mode || "-"))), "components"),
    h("h3", {}, "Workload certificates"),
    (hl.certificates || []).length ? table(["identity", "held by", "state", "expires", "serial"], hl.certificates.map((c) => h("tr", {
      class: "certificate", dataset: { identity: c.identity } },
    h("td", {}, h("code", {}, c.identity)), h("td", {}, c.holder), h("td", {}, c.state),
    h("td", {}, c.expiring ? h("span", { class: "pill warn" }, fmt.left(c.expires_in)) : fmt.left(c.expires_in)),
    h("td", {}, h("code", {}, (c.serial || "-").toString().slice(0, 16))))), "certificates") : h("p", { class: "muted" }, "none"));
}

// ---- start -------------------------------------------------------------------------------------------

async function main() {
  state.config = await api("/api/config");
  if (state.config) document.getElementById("cluster").textContent = `cluster ${state.config.cluster}`;
  window.addEventListener("hashchange", route);
  document.getElementById("live").addEventListener("change", startLive);
  startLive();
  await route();
  document.body.dataset.ready = "1";
}

main();
