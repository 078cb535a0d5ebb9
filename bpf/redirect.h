/* The one header of the redirect programs: ports, limits and map layouts.
 *
 * bpf/layout.py mirrors every #define and struct here (tests/unit/bpf/test_layout.py parses this file
 * and fails when the two differ), so edit both together.  Keep it plain: #define NAME <integer> and
 * structs of __u16/__u32/__u64 fields, nothing else, so the test's small parser can read it.
 *
 * Byte order: addresses and ports in the map layouts are in network byte order, as the kernel hands
 * them to the programs and as they sit in a sockaddr.
 */
#ifndef AMBIENT_REDIRECT_H
#define AMBIENT_REDIRECT_H

/* The node agent's ports inside an enrolled pod's network namespace (DESIGN.md, Ports and marks). */
#define OUTBOUND_PORT 15001
#define INBOUND_PLAIN_PORT 15006
#define HBONE_PORT 15008
#define ADMIN_PORT 15000
#define METRICS_PORT 15020
#define READINESS_PORT 15021

/* DNS: what the application sends to port 53 (UDP and TCP) goes to the agent's DNS proxy, listening on
 * 127.0.0.1:DNS_PORT_PROXY in the pod, when the pod's settings ask for it (pod_config.dns_capture). */
#define DNS_PORT_QUERY 53
#define DNS_PORT_PROXY 15053

/* SO_MARK of every socket the agent makes inside a pod: connect4/6 leave such sockets alone, as the
 * iptables rules do. */
#define AGENT_MARK 0x539

/* The source ports of the agent's transparent sockets: the connections it makes to the app from the
 * client's address (mesh/defaults.py TRANSPARENT_PORTS).  sk_lookup lets them reach the app; the pod's
 * ip rules route TCP to these ports back into the pod, so nobody outside can use them. */
#define TRANSPARENT_PORT_MIN 20000
#define TRANSPARENT_PORT_MAX 29999

/* Map sizes, per pod.  A record lives from the app's connect() until the agent accepts (or the LRU
 * evicts a record whose connection never got established). */
#define ORIG_DST_MAX_ENTRIES 16384
#define INBOUND_SKIP_MAX_ENTRIES 64

/* Where a redirected connection was going: the value of orig_by_cookie and orig_by_conn. */
struct orig_dst {
	__u32 ip4;
	__u16 port;
	__u16 pad;
};

/* A redirected connection as the agent's accepted socket sees it: the peer is the app's socket
 * (app_ip4:app_port), the local end is the agent's 15001 listener (proxy_ip4:proxy_port). */
struct conn_key {
	__u32 app_ip4;
	__u32 proxy_ip4;
	__u16 app_port;
	__u16 proxy_port;
};

/* The settings of one pod (array map pod_config, key 0), written by the loader. */
struct pod_config {
	__u32 pod_ip4; /* 0: not given; then connect4/6 redirect to 127.0.0.1 */
	__u32 dns_capture; /* 1: DNS to port 53 goes to the agent's DNS proxy */
};

#endif
