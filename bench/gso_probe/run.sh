#!/bin/bash
# GSO probe: can a labelled super-packet cross veth, a balancer's label switch and the pop whole?
#
# Three namespaces (named with this shell's pid, removed on exit): server S --veth-- balancer B --veth-- client C.
# S labels every IPv4 frame it sends (tc egress), B switches the label (XDP and/or tc ingress) towards C, C pops
# it (XDP or tc ingress); C's packets to S are plain IP, forwarded by B. C downloads MB megabytes from S (cut at
# SECONDS) and both sides print a CRC32 of the stream; then the TCP counters (nstat) and every port's packets and
# drops. Usage: run.sh VARIANT [MB] [SECONDS]   (RPS=3 steers B's server-port receive queue by flow hash)
#
#   plain        nothing attached: IP forwarding (the testbed's limit)
#   room-segs1   push with bpf_skb_adjust_room, S's port at one segment per skb, no TX checksumming
#   room-sw      push with bpf_skb_adjust_room, no TX checksumming (the stack segments after the push)
#   head-sw      push with bpf_skb_change_head, no TX checksumming (the stack segments after the push)
#   head-xdp     push with bpf_skb_change_head, TX checksumming on (super-packets leave whole); B: XDP only
#   head-tc      as head-xdp, B's XDP passes frames over one segment to tc ingress, which bpf_redirects them
#   head-peer    as head-tc, tc ingress bpf_redirect_peer instead (into C's namespace, no veth transmit)
#   head-poproom as head-tc, B all in tc, C pops at tc ingress with bpf_skb_adjust_room (traced to trace_pipe)
set -u
V=${1:?variant}; MB=${2:-512}; SECS=${3:-20}
P=$$; S=gsoS$P; B=gsoB$P; C=gsoC$P
D=$(dirname "$(readlink -f "$0")"); W=$(mktemp -d /tmp/gsoprobe.XXXXXX)
PY=${PYTHON:-python3}
cleanup() {
	for n in $S $B $C; do ip netns pids $n 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del $n 2>/dev/null; done
	rm -rf "$W"
}
trap cleanup EXIT
for n in $S $B $C; do ip netns add $n; ip -n $n link set lo up; done
ip link add s0 netns $S type veth peer name b0 netns $B
ip link add c0 netns $C type veth peer name b1 netns $B
ip -n $S addr add 10.1.0.2/24 dev s0; ip -n $B addr add 10.1.0.1/24 dev b0
ip -n $C addr add 10.2.0.2/24 dev c0; ip -n $B addr add 10.2.0.1/24 dev b1
for l in "$S s0" "$B b0" "$B b1" "$C c0"; do set -- $l; ip -n $1 link set $2 up; done
# route MTU 1496 on S: a labelled segment keeps within the wire's 1500
ip -n $S route add default via 10.1.0.1 mtu 1496; ip -n $S route replace 10.1.0.0/24 dev s0 mtu 1496
ip -n $C route add default via 10.2.0.1
ip netns exec $B sysctl -qw net.ipv4.ip_forward=1
mac() { ip -n $1 -br link show $2 | awk '{print $3}' | sed 's/^/0x/; s/:/,0x/g'; }
OUT_IF=$(ip -n $B -o link show b1 | cut -d: -f1)
clang -O2 -target bpf -I/usr/include/$(gcc -dumpmachine) -DOUT_IF=$OUT_IF "-DOUT_MACS=$(mac $C c0),$(mac $B b1)" \
	-c "$D/probe.c" -o "$W/probe.o" || exit 1
tc_attach() { ip netns exec $1 tc qdisc add dev $2 clsact && ip netns exec $1 tc filter add dev $2 $3 bpf da obj "$W/probe.o" sec $4; }
xdp_attach() { ip -n $1 link set dev $2 xdpgeneric obj "$W/probe.o" sec $3; }
tx_checksum_off() { ip netns exec $S python3 "$D/flow.py" txcsum-off s0; }
case $V in
plain) ;;
room-segs1) tc_attach $S s0 egress tc_push_room; ip -n $S link set s0 gso_max_segs 1; tx_checksum_off
	xdp_attach $B b0 xdp_fwd; xdp_attach $C c0 xdp_pop ;;
room-sw) tc_attach $S s0 egress tc_push_room; tx_checksum_off; xdp_attach $B b0 xdp_fwd; xdp_attach $C c0 xdp_pop ;;
head-sw) tc_attach $S s0 egress tc_push_head; tx_checksum_off; xdp_attach $B b0 xdp_fwd; xdp_attach $C c0 xdp_pop ;;
head-xdp) tc_attach $S s0 egress tc_push_head; xdp_attach $B b0 xdp_fwd; xdp_attach $C c0 xdp_pop ;;
head-tc) tc_attach $S s0 egress tc_push_head; xdp_attach $B b0 xdp_fwd_small; tc_attach $B b0 ingress tc_fwd
	xdp_attach $C c0 xdp_pop ;;
head-peer) tc_attach $S s0 egress tc_push_head; xdp_attach $B b0 xdp_fwd_small; tc_attach $B b0 ingress tc_fwd_peer
	xdp_attach $C c0 xdp_pop ;;
head-poproom) tc_attach $S s0 egress tc_push_head; tc_attach $B b0 ingress tc_fwd; tc_attach $C c0 ingress tc_pop_room ;;
*) echo "unknown variant $V" >&2; exit 2 ;;
esac
[[ -n ${RPS:-} ]] && ip netns exec $B sh -c "echo $RPS > /sys/class/net/b0/queues/rx-0/rps_cpus"
ip netns exec $S timeout $((SECS + 40)) "$PY" "$D/flow.py" serve 5001 $((MB << 20)) > "$W/serve.out" 2>&1 &
sleep 0.5
ip netns exec $C nstat -n >/dev/null; ip netns exec $S nstat -n >/dev/null
echo "$V client: $(ip netns exec $C timeout $((SECS + 30)) "$PY" "$D/flow.py" fetch 10.1.0.2 5001 $SECS 2>&1 | tail -1)"
wait
echo "$V server: $(tail -1 "$W/serve.out")"
echo "server TCP: $(ip netns exec $S nstat | awk '/Retrans|Reord|DSACK/ {printf "%s %s; ", $1, $2}')"
echo "client TCP: $(ip netns exec $C nstat | awk '/OFO|Reord|DSACK|InErrs|CsumErr/ {printf "%s %s; ", $1, $2}')"
for l in "$S s0" "$B b0" "$B b1" "$C c0"; do
	set -- $l; echo -n "$2:"
	for k in rx_packets rx_bytes rx_dropped tx_packets tx_bytes tx_dropped; do
		echo -n " $k $(ip netns exec $1 cat /sys/class/net/$2/statistics/$k)"
	done; echo
done
