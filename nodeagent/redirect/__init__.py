"""How a pod's traffic is captured: the `Redirector` seam and its mechanisms (iptables in the pod's netns,
or eBPF programs on the pod's cgroup and netns), chosen per node."""
