/* Outbound capture, attached to an enrolled pod's cgroup (v2): the eBPF form of the iptables rule
 * "nat OUTPUT: TCP not to 127.0.0.1 and not marked 0x539 -> REDIRECT to 15001", and of the DNS rules
 * "UDP and TCP to port 53 -> REDIRECT to 15053" (when pod_config.dns_capture is set).
 *
 * DNS: connect4 sends a UDP or TCP connect() to port 53 (any address, loopback included: a pod's
 * nameserver may be 127.0.0.1) to the agent's DNS proxy at 127.0.0.1:DNS_PORT_PROXY, and sendmsg4 does
 * the same for a datagram sent to port 53 by an unconnected UDP socket.  For UDP both record the
 * original server by socket cookie, and recvmsg4 shows the proxy's answers as coming from it (a
 * resolver drops an answer that does not come from the server it asked).
 *
 * connect4 / connect6 rewrite the destination of a TCP connect() made by a process of the pod to the
 * agent's outbound listener (pod IP:15001, or 127.0.0.1:15001 when the loader was given no pod IP),
 * and record where it was going, keyed by the socket's cookie.  sockops, when that connection is
 * established, re-keys the record by the connection's addresses as the agent's accepted socket sees
 * them, so the agent finds it from getpeername()/getsockname() on accept: the eBPF counterpart of
 * SO_ORIGINAL_DST.  The agent's own sockets live outside the pod's cgroup and never meet these
 * programs; a pod socket carrying the agent's mark is left alone as well.
 *
 * Why the pod IP rather than 127.0.0.1: connect4 runs before the kernel picks the source address, so
 * the rewritten destination decides it.  With pod IP:15001 the app's socket gets the pod IP, and the
 * agent's accepted socket shows the app as pod IP:port, exactly what it sees with iptables (whose
 * REDIRECT keeps the source routing chose for the original destination); the Forwarded header and
 * the access log need nothing special.  With 127.0.0.1 the peer would be 127.0.0.1.
 *
 * Left alone, as by the iptables rules: loopback and 0.0.0.0 (this host), the pod's own address (the
 * iptables rules accept what leaves through lo), non-TCP sockets, native IPv6 (the mesh is IPv4; an
 * IPv4-mapped address on a dual-stack socket is captured like IPv4).
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "redirect.h"

BPF_TABLE("lru_hash", __u64, struct orig_dst, orig_by_cookie, ORIG_DST_MAX_ENTRIES);
BPF_TABLE("lru_hash", struct conn_key, struct orig_dst, orig_by_conn, ORIG_DST_MAX_ENTRIES);
BPF_TABLE("array", __u32, struct pod_config, pod_config, 1);

/* bcc declares bpf_get_socket_cookie as returning 32 bits; the helper returns the whole 64-bit cookie. */
static __u64 (*socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline int this_host(__u32 ip4)
{
	return ip4 == 0 || (ip4 & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

/* The address to send a captured connection to (network byte order), or 0 to leave it alone. */
static __always_inline __u32 redirect_target(__u32 dst_ip4)
{
	__u32 zero = 0;
	struct pod_config *cfg = pod_config.lookup(&zero);
	__u32 pod_ip4 = cfg ? cfg->pod_ip4 : 0;

	if (this_host(dst_ip4) || (pod_ip4 && dst_ip4 == pod_ip4))
		return 0;
	return pod_ip4 ? pod_ip4 : bpf_htonl(0x7f000001);
}

static __always_inline int agent_socket(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	return sk && sk->mark == AGENT_MARK;
}

/* Records the original destination; 0 when the record could not be written. */
static __always_inline int remember(struct bpf_sock_addr *ctx, __u32 dst_ip4)
{
	__u64 cookie = socket_cookie(ctx);
	struct orig_dst orig = {};

	orig.ip4 = dst_ip4;
	orig.port = (__u16)ctx->user_port;
	return orig_by_cookie.update(&cookie, &orig) == 0;
}

static __always_inline int dns_capture(void)
{
	__u32 zero = 0;
	struct pod_config *cfg = pod_config.lookup(&zero);
	return cfg && cfg->dns_capture;
}

/* 1: sent to the DNS proxy, 0: not DNS (or not captured), -1: the record could not be written. */
static __always_inline int redirect_dns(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PORT_QUERY) || !dns_capture())
		return 0;
	if (ctx->protocol == IPPROTO_UDP && !remember(ctx, ctx->user_ip4))
		return -1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(DNS_PORT_PROXY);
	return 1;
}

int connect4(struct bpf_sock_addr *ctx)
{
	if (agent_socket(ctx))
		return 1;
	if (ctx->protocol == IPPROTO_UDP || ctx->protocol == IPPROTO_TCP) {
		int dns = redirect_dns(ctx);
		if (dns)
			return dns > 0; /* fail closed when the record could not be written */
	}
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 dst = ctx->user_ip4;
	__u32 target = redirect_target(dst);
	if (!target)
		return 1;
	if (!remember(ctx, dst))
		return 0; /* fail closed: the connect fails with EPERM rather than bypass the agent */
	ctx->user_ip4 = target;
	ctx->user_port = bpf_htons(OUTBOUND_PORT);
	return 1;
}

int connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || agent_socket(ctx))
		return 1;
	/* Only ::ffff:a.b.c.d (IPv4 on a dual-stack socket). */
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	__u32 dst = ctx->user_ip6[3];
	__u32 target = redirect_target(dst);
	if (!target)
		return 1;
	if (!remember(ctx, dst))
		return 0;
	ctx->user_ip6[3] = target;
	ctx->user_port = bpf_htons(OUTBOUND_PORT);
	return 1;
}

int sendmsg4(struct bpf_sock_addr *ctx)
{
	if (agent_socket(ctx))
		return 1;
	return redirect_dns(ctx) >= 0;
}

int recvmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PORT_PROXY) || ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	__u64 cookie = socket_cookie(ctx);
	struct orig_dst *orig = orig_by_cookie.lookup(&cookie);
	if (orig) {
		ctx->user_ip4 = orig->ip4;
		ctx->user_port = orig->port;
	}
	return 1; /* a recvmsg program must let the datagram through */
}

int sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	__u64 cookie = socket_cookie(skops);
	struct orig_dst *found = orig_by_cookie.lookup(&cookie);
	if (!found)
		return 1;
	struct orig_dst orig = *found;
	struct conn_key key = {};

	/* Read all four (volatile: the verifier refuses a context read at a computed offset, which is
	 * what the compiler makes of reads chosen by a branch); connect6 records only IPv4-mapped destinations,
	 * whose last word is the IPv4 address. */
	__u32 local4 = *(volatile __u32 *)&skops->local_ip4;
	__u32 remote4 = *(volatile __u32 *)&skops->remote_ip4;
	__u32 local6 = *(volatile __u32 *)&skops->local_ip6[3];
	__u32 remote6 = *(volatile __u32 *)&skops->remote_ip6[3];
	int v4 = skops->family == AF_INET;

	key.app_ip4 = v4 ? local4 : local6;
	key.proxy_ip4 = v4 ? remote4 : remote6;
	key.app_port = bpf_htons((__u16)skops->local_port);     /* host byte order in bpf_sock_ops */
	key.proxy_port = (__u16)(skops->remote_port >> 16);     /* network order, in the upper half */
	orig_by_conn.update(&key, &orig);
	orig_by_cookie.delete(&cookie);
	return 1;
}
