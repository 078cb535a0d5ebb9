"""`meshctl dashboard`: the mesh seen from a web page served from the host (port 20001, as Kiali's).

    prom.py       Prometheus' HTTP API (query, query_range) and PromQL helpers: values, quantiles (pure parts)
    graph.py      the service graph of a namespace from Istio's metrics (pure: queries in, nodes and edges out)
    traces.py     traces from the spans received (or a Jaeger query API): summaries and waterfalls (pure)
    workload.py   one workload: pods, identity, the policies that select it, the routes that reach it (pure)
    health.py     the mesh's own health: control plane, agents, waypoints, config versions, certificates (pure)
    sources.py    where the data comes from (the I/O): cluster record, control plane, agents, Prometheus
    api.py        the JSON API and the page, a `mesh.serve` Router; a source that fails is a banner, not an error
    app.py        the assembly: the web server on the host, the OTLP/HTTP receiver in the underlay namespace
    cli.py        the verb: foreground, --detach (a process of the cluster), --open
    static/       the page: one HTML file, one script, one style sheet (no library, no CDN)
"""
