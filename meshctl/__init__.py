"""meshctl, the command line: verbs only (cluster, apply/get/delete, agent, waypoint, ca, bench);
the work is done by the packages it calls."""
