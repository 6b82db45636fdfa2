//go:build ignore

// Ferry's data path: outbound capture (cgroup connect4/6 + sockops), inbound capture
// (sk_lookup), and the local-socket fast path (sockops + sk_msg over a sockhash).
// Runtime settings are read-only globals set by the loader, never #ifdef variants.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define POD_NAME_LEN 64

char __license[] SEC("license") = "GPL";

// Load-time settings (bpf2go variables; the loader sets them before load).
volatile const __u32 agent_mark = 0;
volatile const __u16 outbound_port = 15001;
volatile const __u16 inbound_port = 15006;
volatile const __u16 tunnel_port = 15008;
volatile const __u8 fast_path = 0;
// The fast path's bound on a peer's ingress queue when the peer's receive buffer is
// smaller (bytes): past it, messages take the TCP path (see peer_has_room).
volatile const __u32 fast_path_queue_min = 1 << 20; // bpf.DefaultFastPathQueue

// An enrolled pod, readable from the pinned map alone (bpftool prints char[] as text).
struct pod_info {
	char name[POD_NAME_LEN]; // "namespace/name"
};

// An IP address and port. addr is 16 bytes: IPv4 is stored v4-mapped (::ffff:a.b.c.d).
struct addr_port {
	__u8 addr[16];
	__u16 port;   // host order
	__u16 family; // AF_INET or AF_INET6, the family of the original destination
	__u32 pad;
};

// Key of the original destinations the proxy reads on accept.
struct orig_key {
	__u64 netns_cookie;
	__u16 client_port; // host order
	__u16 pad[3];
};

// Key of a local socket in the fast-path sockhash, seen from that socket.
struct sock_key {
	__u64 netns_cookie;
	__u8 local_ip[16];  // v4-mapped for IPv4
	__u8 remote_ip[16]; // v4-mapped for IPv4
	__u16 local_port;   // host order
	__u16 remote_port;  // host order
	__u16 family;       // AF_INET when both addresses are IPv4 (even on an AF_INET6 socket)
	__u16 pad;
};

// Key of the inbound listeners: the pod IP, v4-mapped for IPv4.
struct ip_key {
	__u8 addr[16];
};

// Key of strict_ports: a pod IP (v4-mapped for IPv4) and a port; port 0 stands for
// every port of the pod that has no entry of its own.
struct strict_key {
	__u8 addr[16];
	__u16 port; // host order; 0 = every other port
	__u16 pad[3];
};

// Values of strict_ports. An explicit PERMISSIVE entry is a per-port override of a
// pod-wide STRICT one.
enum mtls_mode {
	MTLS_PERMISSIVE = 1,
	MTLS_STRICT = 2,
};

// A plaintext connection sk_lookup refused, sent to the agent through strict_events.
struct strict_event {
	__u8 src[16]; // v4-mapped for IPv4
	__u8 dst[16]; // v4-mapped for IPv4
	__u16 src_port; // host order
	__u16 dst_port; // host order
	__u16 family;   // AF_INET or AF_INET6
	__u16 pad;
};

// Puts struct strict_event in the object's BTF, so bpf2go generates its Go type.
const struct strict_event *unused_strict_event __attribute__((unused));

// Event counters, one slot each in the per-CPU counters map. Counted per connection
// (never per packet or per message); the agent sums the CPUs for its metrics.
enum ferry_counter {
	COUNTER_CONNECT_REDIRECTED = 0, // connect4/6 sent a connection to the outbound listener
	COUNTER_CONNECT_UNTRACKED,      // sock_orig_dst was full: the connection went out uncaptured
	COUNTER_ORIG_DST_RECORDED,      // sockops published an original destination for the proxy
	COUNTER_FAST_PATH_ADDED,        // sockops put a local socket in the fast-path sockhash
	COUNTER_FAST_PATH_FULL,         // the sockhash refused a socket: it takes the normal path
	COUNTER_INBOUND_STEERED,        // sk_lookup steered a connection to the inbound listener
	COUNTER_INBOUND_STEER_FAILED,   // sk_assign failed: the normal lookup ran
	COUNTER_STRICT_REFUSED,         // sk_lookup refused plaintext to a STRICT pod port
	COUNTER_STRICT_EVENT_LOST,      // the strict_events ring buffer was full: no flow for a refusal
	COUNTER_INBOUND_NO_LISTENER,    // sk_lookup refused: the enrolled pod had no inbound listener
	COUNTER_MAX,
};

// Netns cookie -> pod. Sized from MaxPods at load time.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct pod_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled_netns SEC(".maps");

// Destination ports that are never captured (host order) -> 1.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excluded_ports SEC(".maps");

// Socket cookie -> original destination, between connect and established.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct addr_port);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sock_orig_dst SEC(".maps");

// (netns cookie, client port) -> original destination, read (and deleted) by the proxy.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct orig_key);
	__type(value, struct addr_port);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_dst SEC(".maps");

// Established local TCP sockets for the sk_msg fast path.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} local_socks SEC(".maps");

// The kernel address of each socket in local_socks, same key: how sk_msg reads its
// peer's queue and read position (an sk_msg program may not look a socket up in a
// sockhash, as it cannot release the reference). Only ever read with
// bpf_probe_read_kernel, so a stale entry reads stale or zero values, never faults;
// a stale entry's redirect fails anyway, as its key has left local_socks. Same size
// as local_socks; LRU, so entries of closed sockets age out.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} local_sock_addrs SEC(".maps");

// Pod IP -> that pod's 15006 listener, for sk_lookup.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 256);
	__type(key, struct ip_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_listeners SEC(".maps");

// (pod IP, port) -> enum mtls_mode: the PeerAuthentication modes of this node's pods.
// Entries stay until the agent changes them, so STRICT holds while no agent runs.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct strict_key);
	__type(value, enum mtls_mode);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} strict_ports SEC(".maps");

// This node's own addresses (v4-mapped for IPv4), which the agent writes: plaintext
// from them is the node itself (kubelet's probes, host-network pods), which STRICT
// lets through as Istio and Linkerd let probes through.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct ip_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_addrs SEC(".maps");

// Refusals for the agent's flows. Bounded: when full, an event is dropped and counted
// (COUNTER_STRICT_EVENT_LOST); the refusal itself never depends on it.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} strict_events SEC(".maps");

// Counters by enum ferry_counter.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, enum ferry_counter);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

static __always_inline void count(enum ferry_counter c)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &c);
	if (v)
		*v += 1; // this CPU's slot: no other CPU writes it
}

static __always_inline int is_mesh_or_excluded(__u16 port)
{
	if (port == outbound_port || port == inbound_port || port == tunnel_port)
		return 1;
	return bpf_map_lookup_elem(&excluded_ports, &port) != NULL;
}

static __always_inline int is_v4_loopback(__u32 ip4 /* network order */)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

static __always_inline int is_v4_mapped(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

// 127/8 (also v4-mapped) or ::1.
static __always_inline int is_loopback6(const __u32 ip6[4])
{
	if (is_v4_mapped(ip6))
		return is_v4_loopback(ip6[3]);
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == bpf_htonl(1);
}

static __always_inline void map_v4(__u32 ip6[4], __u32 ip4)
{
	ip6[0] = 0;
	ip6[1] = 0;
	ip6[2] = bpf_htonl(0xffff);
	ip6[3] = ip4;
}

// Whether the socket doing connect() should be captured. ctx->sk is never NULL here.
static __always_inline int should_capture(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->mark == agent_mark)
		return 0;
	__u64 netns = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&enrolled_netns, &netns) != NULL;
}

SEC("cgroup/connect4")
int ferry_connect4(struct bpf_sock_addr *ctx)
{
	__u32 ip4 = ctx->user_ip4;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);

	if (is_v4_loopback(ip4) || is_mesh_or_excluded(port) || !should_capture(ctx))
		return 1;

	__u32 ip6[4];
	map_v4(ip6, ip4);
	struct addr_port dst = {.port = port, .family = AF_INET};
	__builtin_memcpy(dst.addr, ip6, sizeof(dst.addr));
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&sock_orig_dst, &cookie, &dst, BPF_ANY)) {
		count(COUNTER_CONNECT_UNTRACKED);
		return 1; // cannot remember where it was going: let it through unchanged
	}

	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(outbound_port);
	count(COUNTER_CONNECT_REDIRECTED);
	return 1;
}

SEC("cgroup/connect6")
int ferry_connect6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4];
	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);

	if (is_loopback6(ip6) || is_mesh_or_excluded(port) || !should_capture(ctx))
		return 1;

	int mapped = is_v4_mapped(ip6);
	struct addr_port dst = {.port = port, .family = mapped ? AF_INET : AF_INET6};
	__builtin_memcpy(dst.addr, ip6, sizeof(dst.addr));
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&sock_orig_dst, &cookie, &dst, BPF_ANY)) {
		count(COUNTER_CONNECT_UNTRACKED);
		return 1;
	}

	if (mapped) {
		// An IPv4 destination on a dual-stack socket: ::ffff:127.0.0.1.
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(outbound_port);
	count(COUNTER_CONNECT_REDIRECTED);
	return 1;
}

// Loads a context's local and remote addresses, widened to 16 bytes (IPv4 v4-mapped).
// Every field is read before any branch and pinned there with barrier_var: otherwise
// clang sinks the per-family loads into the branches and merges them into one load
// through a computed ctx pointer, which the verifier rejects ("dereference of modified
// ctx ptr"). Works for bpf_sock_ops,
// sk_msg_md and bpf_sk_lookup, which share these field names. Returns 0 for a family
// other than AF_INET and AF_INET6.
#define load_addrs(ctx, l6, r6)                                                    \
	({                                                                         \
		__u32 _fam = (ctx)->family;                                        \
		__u32 _l4 = (ctx)->local_ip4, _r4 = (ctx)->remote_ip4;             \
		__u32 _l0 = (ctx)->local_ip6[0], _l1 = (ctx)->local_ip6[1];        \
		__u32 _l2 = (ctx)->local_ip6[2], _l3 = (ctx)->local_ip6[3];        \
		__u32 _r0 = (ctx)->remote_ip6[0], _r1 = (ctx)->remote_ip6[1];      \
		__u32 _r2 = (ctx)->remote_ip6[2], _r3 = (ctx)->remote_ip6[3];      \
		barrier_var(_l4);                                                  \
		barrier_var(_r4);                                                  \
		barrier_var(_l0);                                                  \
		barrier_var(_l1);                                                  \
		barrier_var(_l2);                                                  \
		barrier_var(_l3);                                                  \
		barrier_var(_r0);                                                  \
		barrier_var(_r1);                                                  \
		barrier_var(_r2);                                                  \
		barrier_var(_r3);                                                  \
		int _ok = 1;                                                       \
		if (_fam == AF_INET) {                                             \
			map_v4(l6, _l4);                                           \
			map_v4(r6, _r4);                                           \
		} else if (_fam == AF_INET6) {                                     \
			l6[0] = _l0, l6[1] = _l1, l6[2] = _l2, l6[3] = _l3;        \
			r6[0] = _r0, r6[1] = _r1, r6[2] = _r2, r6[3] = _r3;        \
		} else {                                                           \
			_ok = 0;                                                   \
		}                                                                  \
		_ok;                                                               \
	})

// Builds a sock_key from addresses already widened to 16 bytes. An AF_INET6 socket
// talking IPv4 gets family AF_INET, so it pairs with its AF_INET peer.
static __always_inline void fill_sock_key(struct sock_key *key, __u64 netns, const __u32 l6[4],
					  const __u32 r6[4], __u16 lport, __u16 rport)
{
	key->netns_cookie = netns;
	__builtin_memcpy(key->local_ip, l6, 16);
	__builtin_memcpy(key->remote_ip, r6, 16);
	key->local_port = lport;
	key->remote_port = rport;
	key->family = is_v4_mapped(l6) && is_v4_mapped(r6) ? AF_INET : AF_INET6;
}

static __always_inline int is_local_pair(const __u32 l6[4], const __u32 r6[4])
{
	if (is_loopback6(l6) || is_loopback6(r6))
		return 1;
	return l6[0] == r6[0] && l6[1] == r6[1] && l6[2] == r6[2] && l6[3] == r6[3];
}

// The few kernel fields the fast path reads, relocated by CO-RE against the running
// kernel's BTF (the ___ferry suffix is dropped when matching): no vmlinux.h needed.
struct sock___ferry {
	void *sk_user_data; // the sk_psock, tagged in its low bits
	int sk_rcvbuf;
} __attribute__((preserve_access_index));

struct tcp_sock___ferry {
	__u32 write_seq;  // end of what the application has written
	__u32 copied_seq; // end of what the application has read
} __attribute__((preserve_access_index));

struct sk_psock___ferry {
	__u32 msg_tot_len; // bytes waiting on the ingress_msg queue
} __attribute__((preserve_access_index));

// sk_user_data's low bits are flags (SK_USER_DATA_NOCOPY, _BPF, _PSOCK).
#define SK_USER_DATA_PTRMASK (~7UL)

SEC("sockops")
int ferry_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;

	__u64 netns = bpf_get_netns_cookie(skops);
	__u16 lport = (__u16)skops->local_port;                // host order
	__u16 rport = (__u16)bpf_ntohl(skops->remote_port); // network order, in the high half

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct addr_port *dst = bpf_map_lookup_elem(&sock_orig_dst, &cookie);
		if (dst) {
			struct orig_key key = {.netns_cookie = netns, .client_port = lport};
			// BPF_ANY: a client port reused in the netns supersedes the old entry.
			if (!bpf_map_update_elem(&orig_dst, &key, dst, BPF_ANY))
				count(COUNTER_ORIG_DST_RECORDED);
			bpf_map_delete_elem(&sock_orig_dst, &cookie);
		}
	}

	if (!fast_path || !bpf_map_lookup_elem(&enrolled_netns, &netns))
		return 1;

	__u32 l6[4], r6[4];
	if (!load_addrs(skops, l6, r6))
		return 1;
	if (!is_local_pair(l6, r6))
		return 1;

	struct sock_key key = {};
	fill_sock_key(&key, netns, l6, r6, lport, rport);
	// The address first: a peer that finds the socket in local_socks finds it here.
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	struct tcp_sock___ferry *tp = (void *)bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 1;
	__u64 addr = (__u64)(unsigned long)tp;
	if (bpf_map_update_elem(&local_sock_addrs, &key, &addr, BPF_ANY))
		return 1; // cannot happen with an LRU map; without it, no fast path
	// BPF_ANY: a closed socket has already left the map, so an existing key can only be
	// a stale tuple being reused; the new socket replaces it. Full map: no fast path.
	if (bpf_sock_hash_update(skops, &local_socks, &key, BPF_ANY))
		count(COUNTER_FAST_PATH_FULL);
	else
		count(COUNTER_FAST_PATH_ADDED);
	return 1;
}

// Whether the peer can take this message on its ingress queue now, with the order of
// the stream kept. The kernel bounds that queue by nothing but the protocol's global
// memory (bpf_tcp_ingress charges the receiving socket, never checking its sk_rcvbuf):
// a sender faster than its reader fills it until writes fail with ENOMEM. So the
// verdict bounds it: past max(the peer's receive buffer, fast_path_queue_min) the
// message takes the normal TCP path instead, where the
// window and the sender's send buffer block a fast sender as TCP always does. A
// message may be redirected again only once everything sent the TCP way has been
// read (our write_seq is the peer's copied_seq: nothing of ours is in flight or in
// its receive queue), because the reader takes the ingress queue before the TCP
// queue; going from the ingress queue to TCP keeps the order for the same reason.
// The same check keeps the order when the peer entered local_socks after our first
// bytes had gone the TCP way.
static __always_inline int peer_has_room(struct sk_msg_md *msg, const struct sock_key *peer)
{
	struct bpf_sock *own = msg->sk;
	if (!own)
		return 0;
	struct tcp_sock___ferry *otp = (void *)bpf_skc_to_tcp_sock(own);
	if (!otp)
		return 0;
	__u64 *addr = bpf_map_lookup_elem(&local_sock_addrs, peer);
	if (!addr)
		return 0;
	struct tcp_sock___ferry *ptp = (void *)(unsigned long)*addr;
	struct sock___ferry *psk = (void *)ptp;

	__u32 copied = 0;
	if (bpf_core_read(&copied, sizeof(copied), &ptp->copied_seq) || copied != otp->write_seq)
		return 0;
	unsigned long ud = 0;
	int limit = 0;
	if (bpf_core_read(&ud, sizeof(ud), &psk->sk_user_data) ||
	    bpf_core_read(&limit, sizeof(limit), &psk->sk_rcvbuf))
		return 0;
	ud &= SK_USER_DATA_PTRMASK;
	if (!ud)
		return 0;
	__u32 queued = 0;
	if (bpf_core_read(&queued, sizeof(queued), &((struct sk_psock___ferry *)ud)->msg_tot_len))
		return 0;
	if (limit < (int)fast_path_queue_min)
		limit = fast_path_queue_min;
	return queued < (__u32)limit;
}

SEC("sk_msg")
int ferry_sk_msg(struct sk_msg_md *msg)
{
	__u32 l6[4], r6[4];
	if (!load_addrs(msg, l6, r6))
		return SK_PASS;
	__u16 lport = (__u16)msg->local_port;
	__u16 rport = (__u16)bpf_ntohl(msg->remote_port);

	// The peer's key is ours seen from the other end.
	struct sock_key peer = {};
	fill_sock_key(&peer, bpf_get_netns_cookie(msg), r6, l6, rport, lport);
	if (!peer_has_room(msg, &peer))
		return SK_PASS; // back-pressure, or order: TCP carries it (see peer_has_room)
	// On a miss (no peer, or it closed) the helper returns SK_DROP without setting a
	// redirect; returning SK_PASS then delivers the data the normal way.
	bpf_msg_redirect_hash(msg, &local_socks, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

// Whether a plaintext connection to (pod ip, port) must be refused: the port's own
// entry decides, else the pod's wildcard entry; no entry is PERMISSIVE.
static __always_inline int is_strict(const __u32 ip6[4], __u16 port)
{
	struct strict_key key = {.port = port};
	__builtin_memcpy(key.addr, ip6, sizeof(key.addr));
	enum mtls_mode *mode = bpf_map_lookup_elem(&strict_ports, &key);
	if (!mode) {
		key.port = 0;
		mode = bpf_map_lookup_elem(&strict_ports, &key);
	}
	return mode && *mode == MTLS_STRICT;
}

static __always_inline void report_strict(const __u32 src6[4], const __u32 dst6[4], __u16 sport, __u16 dport)
{
	struct strict_event *e = bpf_ringbuf_reserve(&strict_events, sizeof(*e), 0);
	if (!e) {
		count(COUNTER_STRICT_EVENT_LOST);
		return;
	}
	__builtin_memcpy(e->src, src6, sizeof(e->src));
	__builtin_memcpy(e->dst, dst6, sizeof(e->dst));
	e->src_port = sport;
	e->dst_port = dport;
	e->family = is_v4_mapped(dst6) ? AF_INET : AF_INET6;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

SEC("sk_lookup")
int ferry_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u16 port = (__u16)ctx->local_port; // host order
	if (is_mesh_or_excluded(port))
		return SK_PASS;

	struct ip_key key = {};
	__u32 src6[4], dst6[4];
	if (!load_addrs(ctx, dst6, src6))
		return SK_PASS;
	// Loopback sources include 127.0.0.6, the agent's own hop to the app.
	if (is_loopback6(src6))
		return SK_PASS;

	// Anything else reaching a pod port is plaintext (mTLS arrives on the tunnel
	// port, skipped above). STRICT: refuse it before any socket sees it; for TCP the
	// failed lookup makes the kernel answer the SYN with a reset. Plaintext from the
	// node itself (node_addrs: kubelet's probes) goes on to the inbound listener.
	__builtin_memcpy(key.addr, src6, sizeof(key.addr));
	if (is_strict(dst6, port) && !bpf_map_lookup_elem(&node_addrs, &key)) {
		count(COUNTER_STRICT_REFUSED);
		report_strict(src6, dst6, (__u16)bpf_ntohs(ctx->remote_port), port);
		return SK_DROP;
	}

	__builtin_memcpy(key.addr, dst6, sizeof(key.addr));
	struct bpf_sock *sk = bpf_map_lookup_elem(&inbound_listeners, &key);
	// This program is attached only to enrolled pods' namespaces: a pod IP with
	// no inbound listener is a pod whose agent is not serving it (restarting,
	// or not yet listening). Refuse rather than let plaintext reach the app past
	// the policies the agent enforces.
	if (!sk) {
		count(COUNTER_INBOUND_NO_LISTENER);
		return SK_DROP;
	}
	// On failure (e.g. a family mismatch) the normal lookup runs: fail open, never drop.
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	count(err ? COUNTER_INBOUND_STEER_FAILED : COUNTER_INBOUND_STEERED);
	return SK_PASS;
}
