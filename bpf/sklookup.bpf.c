/* Inbound capture, attached to an enrolled pod's network namespace (sk_lookup): the eBPF form of the
 * iptables rule "nat PREROUTING: TCP not to 15008 and not agent-made -> REDIRECT to 15006".
 *
 * For every TCP connection arriving at the pod, before the kernel looks for a listening socket, this
 * hands it to the agent's 15006 listener (the only entry of the sockmap inbound_sock) unless
 *   - it is for a loopback address;
 *   - it was made inside this network namespace, which shows as a source address equal to its
 *     destination (the kernel picks the destination itself as the source of a connection to a local
 *     address).  The app's own outbound connections were already sent to 15001 by connect4 (or go to
 *     the pod's own address on purpose, like iptables' "-o lo -j ACCEPT"), so what remains are the
 *     connections the agent makes to the app from inside the pod, after accepting them on 15006 or
 *     out of an HBONE tunnel on 15008: the sockets iptables recognises by the agent's mark, which
 *     sk_lookup cannot see.  This cannot be used from the network: the kernel drops packets that
 *     arrive from outside with a local source address (martians), and the replies to such an address
 *     would stay in the pod anyway.  (ingress_ifindex is no help here: for a connection to a local
 *     address it names the device of the route, not lo.);
 *   - it comes from a source port of the agent's transparent sockets (TRANSPARENT_PORT_MIN..MAX): the
 *     agent connecting to the app from the client's address, which it does to preserve it (as Istio
 *     does).  Such a connection's source is the client's address, so the test above cannot see it;
 *     the port can.  Someone outside choosing such a port reaches nothing: the pod's policy routing
 *     (nodeagent/redirect/rules.py, eBPF mode) sends TCP to these ports back into the pod, so the
 *     app's SYN-ACK never leaves it and no handshake completes;
 *   - its destination port is one of the agent's (15008 HBONE and the others), or one the loader was
 *     told to skip (map inbound_skip).
 * With no listener in the sockmap (the agent is gone) such a connection is refused: fail closed.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "redirect.h"

BPF_TABLE("sockmap", __u32, __u64, inbound_sock, 1); /* value: a socket fd in, its cookie out */
BPF_TABLE("hash", __u16, __u8, inbound_skip, INBOUND_SKIP_MAX_ENTRIES);

static __always_inline int agent_port(__u32 port)
{
	return port == HBONE_PORT || port == INBOUND_PLAIN_PORT || port == OUTBOUND_PORT ||
	       port == ADMIN_PORT || port == METRICS_PORT || port == READINESS_PORT;
}

int steer_inbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if ((ctx->local_ip4 & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000))
		return SK_PASS;
	if (ctx->remote_ip4 == ctx->local_ip4) /* made inside the pod's namespace: the agent */
		return SK_PASS;
	__u16 remote_port = bpf_ntohs((__u16)ctx->remote_port);
	if (remote_port >= TRANSPARENT_PORT_MIN && remote_port <= TRANSPARENT_PORT_MAX)
		return SK_PASS; /* the agent, from the client's address */
	__u32 port = ctx->local_port; /* host byte order */
	if (agent_port(port))
		return SK_PASS;
	__u16 port16 = port;
	if (inbound_skip.lookup(&port16))
		return SK_PASS;

	__u32 zero = 0;
	struct bpf_sock *sk = (struct bpf_sock *)inbound_sock.lookup(&zero);
	if (!sk)
		return SK_DROP;
	/* REPLACE: while a replacement is being attached, an older copy of this program runs first;
	 * the last program's choice is the one the kernel keeps. */
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}
