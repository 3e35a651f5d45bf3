"""``mplslb lab``: a real network on this machine, built from namespaces and veth pairs with pyroute2.

Theory of operation
-------------------
The lab is a small data centre in network namespaces named ``<name>-<role>``::

    clients c1..cN --+                          +-- lc1p0 -- bs0 -- s1, s3, ...
                     brc -- lc0p0 [balancer]  --+
    attackers a1.. --+                          |
    (udp: clients -- brc -- rt -- lc0p0)         +-- lc1p1 -- bs1 -- s2, s4, ...

The switches (Linux bridges) live in ``<name>-sw``. Line card 0 of the balancer faces the clients, line card 1 the
servers. Each server runs a stock nginx serving a page that names the server, and a server agent; each client runs
a client agent, through which stock curl and wrk reach the virtual IPs. Attackers (``attackers = N``) sit on the
clients' segment with an address and no agent: hosts that send whatever frames a test builds. With
``transport = "udp"`` an IPv4 router namespace sits between the clients and the balancer and labelled traffic
crosses it as MPLS-in-UDP (RFC 7510).
With ``server_transport = "udp"`` the servers sit behind a router namespace instead (``<name>-rs``), on a routed
subnet of their own, and the balancer reaches them as MPLS-in-UDP through one server-side ``mpls_udp`` port::

    [balancer] lc1p0 10.81.0.1 -- 10.81.0.2 rs 10.82.0.1 -- bs0 -- s1, s2, ... (10.82.0.11, ...)

With ``nodes = N`` (N > 1, both transports ``udp``) the balancer is N nodes ``n1..nN`` behind one router ``rt``
running BIRD 2, which learns by BGP (with BFD) the VIPs and the nodes' MPLS-in-UDP service addresses (10.80.0.1
toward the clients, 10.81.0.1 toward the servers, on every node's loopback: anycast) from each healthy node's
speaker (``[bgp]``, :mod:`mplslb.bgp`) and installs them as multipath routes, hashed on the UDP ports and protocol
only (``fib_multipath_hash_policy`` 3): the entropy source port of a session's frames, alike in both directions,
picks its node. Clients and servers both sit behind the router::

    clients -- brc -- 10.79.0.1 [rt] 10.82.0.1 -- bs0 -- servers
                          10.90.i.1 -- 10.90.i.2 [ni]   (one link per node, BGP AS 65000 <-> AS 65001)

With ``cluster`` the nodes sync their sessions (``[cluster]``, :mod:`mplslb.cluster`); ``slices`` cuts the label space
for more nodes than start (``[cluster] nodes``), so that :meth:`Lab.add_node` can add one under load: its namespace
and link, the router's neighbours (``birdc configure``) and the other nodes' peers (a reload) changed, its daemon
started; :meth:`Lab.remove_node` takes one away the same way. ``node_state`` gives each node a kept state file
(``[state]``), which a node restarted adopts.

With ``servers_by_ip`` the balancer's configuration names the servers by IP address only and the balancer resolves
their MACs (ARP); :meth:`Lab.move_server` gives a server a new MAC, as a replaced interface would.

``up`` records every namespace it creates and every process it starts in ``<root>/<name>/state.json`` before the
next step, so ``down`` (also after a failure, or from another command) stops processes by pid and deletes
namespaces by name, and nothing is cleaned up by pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns

from mplslb.drivers.netns import entered

LAB_ROOT = Path("/run/mplslb-lab")
#: A UDP service of the VIPs nothing on the servers listens on: each server's host answers port unreachable.
LAB_UDP_PORT = 53
VIP4 = "10.0.0.100"
VIP6 = "fd00::100"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
#: How long a process killed (SIGKILL) may take to go: only the kernel holds it then (closing its sockets and BPF
#: links waits for RCU grace periods and the RTNL lock, which a loaded machine or other namespaces' teardown stretch).
KILL_WAIT = 30.0
LAB_CONTROL_TIMEOUT = 10.0  # the lab's questions to its daemons, which may be busy under a flood
ROUTER_AS = 65000
NODE_AS = 65001
SYNC_PORT = 6640  # the nodes' session sync ([cluster])
#: BFD every 0.1 s, a session down after 5 missed: a node whose link dies leaves the router's ECMP set after about
#: 0.5 s (3 missed would be 0.3 s, but flaps on a loaded 2-core machine).
BFD_INTERVAL = 0.1
BFD_MULTIPLIER = 5


def _mac(kind: int, index: int) -> str:
    return f"02:{kind:02x}:00:00:00:{index:02x}"


@dataclass(frozen=True)
class LabSpec:
    name: str = "mlb"
    clients: int = 3
    servers: int = 3
    transport: str = "ethernet"  # "ethernet" or "udp"
    algorithm: str = "round_robin"
    weights: tuple[int, ...] = ()
    health_interval: float = 0.5
    health_timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    max_sessions: int = 0
    offload: str = "none"  # "kernel": established sessions' labels switched by the XDP offload
    datapath: str = "kernel"  # the agents' datapath: "kernel" (BPF on eth0), "tun" (through Python), "auto"
    attackers: int = 0  # hosts on the clients' segment with an address and no agent (a1, a2, ...)
    servers_by_ip: bool = False  # the balancer is given the servers' addresses only and resolves their MACs
    server_transport: str = "ethernet"  # "udp": servers behind a router, reached as MPLS-in-UDP
    offload_syn_rate: int = 0  # unlabelled SYNs a second the kernel offload passes up (0: all)
    #: The kernel offload switches super-packets too (``offload_gso``); the servers' agents send them whole.
    offload_gso: bool = False
    #: New TCP sessions' SYNs taken in the kernel offload under tickets the daemon decides ahead (``offload_syn``).
    offload_syn: bool = False
    #: The kernel offload's label map preallocated for the whole label range (``offload_prealloc``).
    offload_prealloc: bool = False
    #: The agents on the kernel datapath keep it across a restart (``--keep``): :meth:`Lab.restart_agent`.
    agent_keep: bool = False
    nodes: int = 1  # balancer nodes; more than one: behind a BGP/ECMP router, both transports udp
    #: Write each node's ``[cluster]`` table (node, nodes, peers): for a daemon that has session sync.
    cluster: bool = False
    #: The label slices of ``[cluster]`` (its ``nodes``): the most nodes the cluster may grow to with
    #: :meth:`Lab.add_node` (0: as many as ``nodes``).
    slices: int = 0
    #: Give each node a kept state file (``[state]``): a node restarted adopts its sessions.
    node_state: bool = False
    #: ``[labels] quarantine_min`` (None: the default): how soon a quarantined pair is reused when none is free.
    quarantine_min: float | None = None
    #: The label pairs the balancer has (``[labels] c2s_min`` and ``c2s_max`` from 17 on; 0: all of them).
    label_pairs: int = 0

    def __post_init__(self) -> None:
        if self.datapath not in ("kernel", "tun", "auto"):
            raise ValueError("datapath must be kernel, tun or auto")
        if self.offload not in ("none", "kernel"):
            raise ValueError("offload must be none or kernel")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", self.name):
            raise ValueError("lab name: 1-10 lowercase letters and digits, starting with a letter")
        if self.transport not in ("ethernet", "udp"):
            raise ValueError("transport must be ethernet or udp")
        if self.server_transport not in ("ethernet", "udp"):
            raise ValueError("server_transport must be ethernet or udp")
        if self.server_transport == "udp" and self.offload != "none":
            raise ValueError("the kernel offload switches between ethernet ports: not with server_transport udp")
        if self.offload_syn and self.offload != "kernel":
            raise ValueError("offload_syn takes SYNs in the kernel offload: needs offload kernel")
        if self.offload_syn_rate and self.offload != "kernel":
            raise ValueError("offload_syn_rate sheds SYNs in the kernel offload: needs offload kernel")
        if self.offload_prealloc and self.offload != "kernel":
            raise ValueError("offload_prealloc preallocates the kernel offload's label map: needs offload kernel")
        if self.offload_gso and (self.offload != "kernel" or self.datapath != "kernel"):
            raise ValueError("offload_gso switches super-packets in the kernel offload: needs offload kernel and the "
                             "kernel datapath (its servers send them)")  # fmt: skip
        if not 1 <= self.clients <= 50 or not 1 <= self.servers <= 50:
            raise ValueError("clients and servers must be within 1..50")
        if not 0 <= self.attackers <= 9 or (self.attackers and self.transport != "ethernet"):
            raise ValueError("attackers must be within 0..9, on the ethernet transport")
        if self.weights and len(self.weights) != self.servers:
            raise ValueError("give one weight per server")
        if not 1 <= self.nodes <= 8:
            raise ValueError("nodes must be within 1..8")
        if self.nodes > 1 and (self.transport, self.server_transport, self.offload) != ("udp", "udp", "none"):
            raise ValueError("several nodes sit behind a router: transport and server_transport udp, no offload")
        if self.slices and not (self.cluster and self.nodes <= self.slices <= 8):
            raise ValueError("slices: for a cluster (cluster = true), within nodes..8")
        if self.node_state and self.nodes < 2:
            raise ValueError("node_state: for several nodes")

    @property
    def label_slices(self) -> int:
        return self.slices or self.nodes


@dataclass
class LabState:
    namespaces: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)


class LabError(RuntimeError):
    pass


class Lab:
    """One lab: build it with :meth:`up`, use it, and always :meth:`down` it."""

    def __init__(self, spec: LabSpec, root: Path = LAB_ROOT) -> None:
        self.spec = spec
        self.dir = root / spec.name
        self.state = LabState()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: The nodes in the lab (indices; :meth:`add_node` and :meth:`remove_node` change it).
        self.members = list(range(spec.nodes)) if spec.nodes > 1 else []

    # -- names and addresses ---------------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        return f"{self.spec.name}-{role}"

    @property
    def lb(self) -> str:
        return self.ns("lb")

    def client_ns(self, i: int) -> str:
        return self.ns(f"c{i + 1}")

    def server_ns(self, j: int) -> str:
        return self.ns(f"s{j + 1}")

    def attacker_ns(self, k: int) -> str:
        return self.ns(f"a{k + 1}")

    def attacker_addr(self, k: int) -> str:
        return f"10.77.0.{201 + k}"

    def attacker_mac(self, k: int) -> str:
        return _mac(0xA7, k + 1)

    def server_name(self, j: int) -> str:
        return f"s{j + 1}"

    def client_addr(self, i: int, v6: bool = False) -> str:
        if self.spec.transport == "udp":
            return f"fd79::{11 + i:x}" if v6 else f"10.79.0.{11 + i}"
        return f"fd77::{11 + i:x}" if v6 else f"10.77.0.{11 + i}"

    def server_addr(self, j: int) -> str:
        if self.spec.server_transport == "udp":
            return f"10.82.0.{11 + j}"
        return f"10.78.{j % 2}.{11 + j}"

    def server_mac(self, j: int) -> str:
        """The MAC server ``j``'s interface was created with."""
        return _mac(0x5E, j + 1)

    @property
    def server_port_count(self) -> int:
        """The balancer's server-side ports: two Ethernet ports, or one MPLS-in-UDP port toward the router."""
        return 1 if self.spec.server_transport == "udp" else 2

    @property
    def control_socket(self) -> str:
        return str(self.dir / "lb.sock") if self.spec.nodes == 1 else self.node_socket(0)

    # -- several nodes behind the router -----------------------------------------------------------------------
    def node_ns(self, i: int) -> str:
        return self.ns(f"n{i + 1}")

    def node_key(self, i: int) -> str:
        return f"balancer-n{i + 1}"

    def node_socket(self, i: int) -> str:
        return str(self.dir / f"n{i + 1}.sock")

    def node_addr(self, i: int) -> str:
        """Node ``i``'s address on its link to the router (the router is ``10.90.<i+1>.1``)."""
        return f"10.90.{i + 1}.2"

    @property
    def router_socket(self) -> str:
        return str(self.dir / "rt.ctl")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def up(self) -> None:
        if (self.dir / "state.json").exists():
            raise LabError(f"lab {self.spec.name!r} is already up ({self.dir}); run 'mplslb lab down' first")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        try:
            if self.spec.nodes > 1:
                self._build_routed_nodes()
                self._start_servers()
                self._start_router()
                for i in self.members:
                    self.start_node(i)
                self.wait_next_hops(VIP4, len(self.members), READY_TIMEOUT)
            else:
                self._build_network()
                self._start_servers()
                self._start_balancer()
            self._start_clients()
        except BaseException:
            self.down()
            raise

    def down(self) -> list[str]:
        """Stop every process and delete every namespace this lab recorded; returns what went wrong."""
        state = self._load_state() or self.state
        problems: list[str] = []
        for key, pid in reversed(list(state.pids.items())):
            problem = _stop_pid(pid, self.procs.get(key))
            if problem:
                problems.append(f"{key}: {problem}")
        if self.spec.agent_keep:
            self._let_kept_go(state.namespaces)
        for name in reversed(state.namespaces):
            try:
                if name in netns.listnetns():
                    netns.remove(name)
            except OSError as exc:
                problems.append(f"namespace {name}: {exc}")
        self.state = LabState()
        self.procs.clear()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir)
        return problems

    @staticmethod
    def _let_kept_go(namespaces: list[str]) -> None:
        """What kept agents left outside their namespaces: their pins (bpffs) and host files."""
        from mplslb.agents import AgentConfig
        from mplslb.offload.bpf import unpin

        for ns_name in namespaces:
            for role in ("server", "client"):
                kept = AgentConfig(role=role, interface="eth0", vips=(VIP4,), gateway_mac=bytes(6),
                                   kept=f"agent-{role}-{ns_name}-eth0")  # fmt: skip
                unpin(kept.pins())
                kept.host_file().unlink(missing_ok=True)

    def _save_state(self) -> None:
        (self.dir / "state.json").write_text(json.dumps(asdict(self.state)))

    def _load_state(self) -> LabState | None:
        try:
            data = json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return LabState(list(data.get("namespaces", [])), dict(data.get("pids", {})))

    # -- network -----------------------------------------------------------------------------------------------
    def _create_ns(self, name: str) -> None:
        if name in netns.listnetns():
            raise LabError(f"namespace {name} already exists: another lab named {self.spec.name!r}?")
        netns.create(name)
        self.state.namespaces.append(name)
        self._save_state()
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def _veth(self, sw: str, here: str, there_ns: str, there: str, mac: str) -> None:
        """A veth pair: ``here`` stays in namespace ``sw``, ``there`` goes to ``there_ns`` with ``mac``."""
        with NetNS(sw) as ns:
            ns.link("add", ifname=here, kind="veth", peer={"ifname": there, "net_ns_fd": there_ns})
            ns.link("set", index=ns.link_lookup(ifname=here)[0], state="up")
        with NetNS(there_ns) as ns:
            ns.link("set", index=ns.link_lookup(ifname=there)[0], address=mac, state="up")

    def _addr(self, ns_name: str, ifname: str, *addresses: str) -> None:
        with NetNS(ns_name) as ns:
            index = ns.link_lookup(ifname=ifname)[0]
            for address in addresses:
                ip, plen = address.split("/")
                flags = 0x02 if ":" in ip else 0  # IFA_F_NODAD: usable at once
                ns.addr("add", index=index, address=ip, prefixlen=int(plen), flags=flags)

    def _bridge(self, sw: str, bridge: str, ports: list[str]) -> None:
        with NetNS(sw) as ns:
            ns.link("add", ifname=bridge, kind="bridge")
            index = ns.link_lookup(ifname=bridge)[0]
            for port in ports:
                ns.link("set", index=ns.link_lookup(ifname=port)[0], master=index)
            ns.link("set", index=index, state="up")

    def _sysctl(self, ns_name: str, path: str, value: str) -> None:
        with entered(ns_name):
            Path("/proc/sys/net", path).write_text(value)

    def _build_network(self) -> None:
        spec = self.spec
        sw = self.ns("sw")
        for name in (sw, self.lb, *(self.client_ns(i) for i in range(spec.clients))):
            self._create_ns(name)
        for j in range(spec.servers):
            self._create_ns(self.server_ns(j))
        client_ports: list[str] = []
        if spec.transport == "udp":
            rt = self.ns("rt")
            self._create_ns(rt)
            self._veth(sw, "rt0", rt, "eth0", _mac(0x72, 0))
            self._addr(rt, "eth0", "10.79.0.1/24")
            with NetNS(rt) as ns:
                ns.link("add", ifname="eth1", kind="veth", peer={"ifname": "lc0p0", "net_ns_fd": self.lb})
                ns.link("set", index=ns.link_lookup(ifname="eth1")[0], address=_mac(0x72, 1), state="up")
            with NetNS(self.lb) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lc0p0")[0], address=_mac(0x4C, 0), state="up")
            self._addr(rt, "eth1", "10.80.0.2/24")
            self._addr(self.lb, "lc0p0", "10.80.0.1/24")
            self._sysctl(rt, "ipv4/ip_forward", "1")
            with NetNS(self.lb) as ns:
                ns.route("add", dst="10.79.0.0/24", gateway="10.80.0.2")
            client_ports.append("rt0")
        else:
            self._veth(sw, "lbc0", self.lb, "lc0p0", _mac(0x4C, 0))
            self._addr(self.lb, "lc0p0", "10.77.0.1/24", "fd77::1/64")
            client_ports.append("lbc0")
        for i in range(spec.clients):
            self._veth(sw, f"c{i + 1}", self.client_ns(i), "eth0", _mac(0xC1, i + 1))
            self._addr(self.client_ns(i), "eth0", f"{self.client_addr(i)}/24", f"{self.client_addr(i, True)}/64")
            if spec.transport == "udp":
                with NetNS(self.client_ns(i)) as ns:
                    ns.route("add", dst="10.80.0.0/24", gateway="10.79.0.1")
            client_ports.append(f"c{i + 1}")
        for k in range(spec.attackers):
            self._create_ns(self.attacker_ns(k))
            self._veth(sw, f"a{k + 1}", self.attacker_ns(k), "eth0", self.attacker_mac(k))
            self._addr(self.attacker_ns(k), "eth0", f"{self.attacker_addr(k)}/24")
            client_ports.append(f"a{k + 1}")
        self._bridge(sw, "brc", client_ports)
        if spec.server_transport == "udp":
            self._build_routed_servers(sw)
            return
        server_ports: dict[int, list[str]] = {0: [], 1: []}
        for card_port in (0, 1):
            self._veth(sw, f"lbs{card_port}", self.lb, f"lc1p{card_port}", _mac(0x4C, 0x10 + card_port))
            self._addr(self.lb, f"lc1p{card_port}", f"10.78.{card_port}.1/24")
            server_ports[card_port].append(f"lbs{card_port}")
        for j in range(spec.servers):
            self._veth(sw, f"s{j + 1}", self.server_ns(j), "eth0", self.server_mac(j))
            self._addr(self.server_ns(j), "eth0", f"{self.server_addr(j)}/24")
            server_ports[j % 2].append(f"s{j + 1}")
        for card_port, ports in server_ports.items():
            self._bridge(sw, f"bs{card_port}", ports)

    def _build_routed_servers(self, sw: str) -> None:
        """The servers on 10.82.0.0/24 behind router ``rs``, which the balancer reaches on 10.81.0.0/24."""
        rs = self.ns("rs")
        self._create_ns(rs)
        with NetNS(rs) as ns:
            ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "lc1p0", "net_ns_fd": self.lb})
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], address=_mac(0x73, 0), state="up")
        with NetNS(self.lb) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lc1p0")[0], address=_mac(0x4C, 0x10), state="up")
        self._addr(rs, "eth0", "10.81.0.2/24")
        self._addr(self.lb, "lc1p0", "10.81.0.1/24")
        self._veth(sw, "rs1", rs, "eth1", _mac(0x73, 1))
        self._addr(rs, "eth1", "10.82.0.1/24")
        self._sysctl(rs, "ipv4/ip_forward", "1")
        with NetNS(self.lb) as ns:
            ns.route("add", dst="10.82.0.0/24", gateway="10.81.0.2")
        ports = ["rs1"]
        for j in range(self.spec.servers):
            self._veth(sw, f"s{j + 1}", self.server_ns(j), "eth0", self.server_mac(j))
            self._addr(self.server_ns(j), "eth0", f"{self.server_addr(j)}/24")
            with NetNS(self.server_ns(j)) as ns:
                ns.route("add", dst="10.81.0.0/24", gateway="10.82.0.1")
            ports.append(f"s{j + 1}")
        self._bridge(sw, "bs0", ports)

    def _build_routed_nodes(self) -> None:
        """Clients, servers and the nodes around router ``rt`` (see the module's drawing)."""
        spec = self.spec
        sw, rt = self.ns("sw"), self.ns("rt")
        clients = [self.client_ns(i) for i in range(spec.clients)]
        servers = [self.server_ns(j) for j in range(spec.servers)]
        for name in (sw, rt, *clients, *servers):
            self._create_ns(name)
        self._veth(sw, "rt0", rt, "eth0", _mac(0x72, 0))
        self._addr(rt, "eth0", "10.79.0.1/24")
        self._veth(sw, "rt1", rt, "eth1", _mac(0x72, 1))
        self._addr(rt, "eth1", "10.82.0.1/24")
        self._sysctl(rt, "ipv4/ip_forward", "1")
        self._sysctl(rt, "ipv4/fib_multipath_hash_policy", "3")  # custom: the fields below only
        self._sysctl(rt, "ipv4/fib_multipath_hash_fields", "0x0034")  # IP protocol, source and destination ports
        for i in range(spec.nodes):
            self._node_link(i)
        ports = ["rt0"]
        for i, client in enumerate(clients):
            self._veth(sw, f"c{i + 1}", client, "eth0", _mac(0xC1, i + 1))
            self._addr(client, "eth0", f"{self.client_addr(i)}/24", f"{self.client_addr(i, True)}/64")
            with NetNS(client) as ns:
                ns.route("add", dst="10.80.0.0/24", gateway="10.79.0.1")
            ports.append(f"c{i + 1}")
        self._bridge(sw, "brc", ports)
        ports = ["rt1"]
        for j, server in enumerate(servers):
            self._veth(sw, f"s{j + 1}", server, "eth0", self.server_mac(j))
            self._addr(server, "eth0", f"{self.server_addr(j)}/24")
            with NetNS(server) as ns:  # the service address and the nodes' health checks
                ns.route("add", dst="0.0.0.0/0", gateway="10.82.0.1")
            ports.append(f"s{j + 1}")
        self._bridge(sw, "bs0", ports)

    def _node_link(self, i: int) -> None:
        """Node ``i``'s namespace and its link to the router (``10.90.<i+1>.0/24``)."""
        rt, node = self.ns("rt"), self.node_ns(i)
        self._create_ns(node)
        with NetNS(rt) as ns:
            ns.link("add", ifname=f"n{i + 1}", kind="veth", peer={"ifname": "lc0p0", "net_ns_fd": node})
            ns.link("set", index=ns.link_lookup(ifname=f"n{i + 1}")[0], address=_mac(0x72, 0x10 + i), state="up")
        with NetNS(node) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lc0p0")[0], address=_mac(0x4C, 0x20 + i), state="up")
        self._addr(rt, f"n{i + 1}", f"10.90.{i + 1}.1/24")
        self._addr(node, "lc0p0", f"{self.node_addr(i)}/24")
        self._addr(node, "lo", "10.80.0.1/32", "10.81.0.1/32")  # the service addresses: every node's
        with NetNS(node) as ns:
            ns.route("add", dst="0.0.0.0/0", gateway=f"10.90.{i + 1}.1")

    def _start_router(self) -> None:
        conf = self._write_router_config()
        bird = shutil.which("bird") or "/usr/sbin/bird"
        self._spawn("bird-rt", [bird, "-f", "-c", str(conf), "-s", self.router_socket], ns=self.ns("rt"))

    def _write_router_config(self) -> Path:
        from mplslb.bgp import router_bird_config

        # One protocol per node index (node<i+1>): a node added or removed leaves the others' sessions alone.
        neighbors = [(self.node_addr(i), NODE_AS) for i in self.members]
        names = [f"node{i + 1}" for i in self.members]
        conf = self.dir / "rt.bird.conf"
        text = router_bird_config(
            "10.79.0.1", ROUTER_AS, neighbors, bfd_interval=BFD_INTERVAL, bfd_multiplier=BFD_MULTIPLIER, names=names
        )
        conf.write_text(text)
        return conf

    def _configure_router(self) -> None:
        """Give the running router's BIRD the current nodes (``birdc configure``)."""
        self._write_router_config()
        birdc = shutil.which("birdc") or "/usr/sbin/birdc"
        done = subprocess.run(
            [birdc, "-s", self.router_socket, "configure"], capture_output=True, text=True, timeout=30
        )
        # "Reconfiguration in progress" when a protocol removed is still shutting down
        if done.returncode != 0 or not re.search(r"Reconfigured|Reconfiguration in progress", done.stdout):
            raise LabError(f"router: birdc configure: {done.stdout.strip()} {done.stderr.strip()}")

    def _reload_peers(self) -> None:
        """Rewrite every running node's configuration for the current nodes and reload it (its ``[cluster] peers``)."""
        from mplslb.control.client import request

        for i in self.members:
            key = self.node_key(i)
            if key not in self.procs or self.procs[key].poll() is not None:
                continue
            (self.dir / f"n{i + 1}.toml").write_text(self.balancer_toml(node=i))
            reply = request(self.node_socket(i), {"cmd": "reload"}, timeout=LAB_CONTROL_TIMEOUT)
            if not reply.get("ok"):
                raise LabError(f"node n{i + 1}: reload: {reply}")

    def add_node(self) -> int:
        """A new node (the first index free): its namespace and link, the other nodes' peers and the router's
        neighbours reloaded to include it, its daemon started; returns its index. It announces itself once synced
        (wait with :meth:`wait_next_hops`)."""
        free = [i for i in range(self.spec.label_slices if self.spec.cluster else 8) if i not in self.members]
        if not self.members or not free:
            raise LabError("add_node: not a lab of several nodes, or every label slice is taken ([cluster] nodes)")
        i = free[0]
        self._node_link(i)
        self.members.append(i)
        self._reload_peers()
        self._configure_router()
        self.start_node(i)
        return i

    def remove_node(self, i: int) -> None:
        """Stop node ``i`` (SIGTERM: it withdraws its routes), take it out of the router's neighbours and the other
        nodes' peers, and delete its namespace."""
        key = self.node_key(i)
        if key in self.procs:
            _stop_pid(self.state.pids[key], self.procs[key])
            del self.procs[key], self.state.pids[key]
        self.members.remove(i)
        self._configure_router()
        self._reload_peers()
        name = self.node_ns(i)
        if name in netns.listnetns():
            netns.remove(name)
        self.state.namespaces.remove(name)
        self._save_state()

    def start_node(self, i: int) -> None:
        """Start (or restart) node ``i``'s balancer daemon, which starts its BGP speaker."""
        key = self.node_key(i)
        config = self.dir / f"n{i + 1}.toml"
        config.write_text(self.balancer_toml(node=i))
        (self.dir / f"{key}.ready").unlink(missing_ok=True)
        self._mplslb(key, self.node_ns(i), "balancer", "--config", str(config))
        self._wait_ready([key])

    def stop_node(self, i: int, sig: int = signal.SIGTERM, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Send ``sig`` to node ``i``'s daemon and (with ``wait``) wait for it to exit; its BIRD follows it."""
        proc = self.procs[self.node_key(i)]
        proc.send_signal(sig)
        if wait:
            proc.wait(STOP_TIMEOUT)
        return proc

    def mend_node_link(self, i: int) -> None:
        """Undo :meth:`cut_node_link`."""
        nft = shutil.which("nft") or "/usr/sbin/nft"
        self.run_in(self.node_ns(i), [nft, "delete", "table", "inet", "cut"], check=True)

    def cut_node_link(self, i: int) -> None:
        """Drop everything in and out of node ``i`` (nftables in its namespace): its link is dead, its carrier
        still up, so only BFD or the BGP hold time can tell the router."""
        rules = (
            "table inet cut {\n chain in { type filter hook input priority -300; policy drop; }\n"
            " chain out { type filter hook output priority -300; policy drop; }\n}\n"
        )
        nft = shutil.which("nft") or "/usr/sbin/nft"
        self.run_in(self.node_ns(i), [nft, "-f", "-"], check=True, input=rules)

    def next_hops(self, prefix: str) -> list[str]:
        """The router's next hops for ``prefix`` (its kernel's route), sorted."""
        done = self.run_in(self.ns("rt"), ["ip", "-j", "route", "show", "exact", prefix], timeout=10.0)
        hops: list[str] = []
        for route in json.loads(done.stdout or "[]"):
            hops += [route["gateway"]] if "gateway" in route else [h["gateway"] for h in route.get("nexthops", [])]
        return sorted(hops)

    def wait_next_hops(self, prefix: str, count: int, timeout: float) -> float:
        """Wait until the router has ``count`` next hops for ``prefix``; returns how long that took (seconds)."""
        start = time.monotonic()
        while len(self.next_hops(prefix)) != count:
            if time.monotonic() - start > timeout:
                raise LabError(f"router: {self.next_hops(prefix)} for {prefix} after {timeout} s, wanted {count}")
            time.sleep(0.02)
        return time.monotonic() - start

    # -- processes ---------------------------------------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str], *, ns: str | None = None) -> subprocess.Popen[bytes]:
        if ns is not None:
            argv = ["nsenter", f"--net=/var/run/netns/{ns}", "--", *argv]
        log = open(self.dir / f"{key}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[key] = proc
        self.state.pids[key] = proc.pid
        self._save_state()
        return proc

    def _mplslb(self, key: str, ns: str, *args: str) -> subprocess.Popen[bytes]:
        ready = self.dir / f"{key}.ready"
        if args[0] == "agent":
            args = (*args, "--control", self.agent_socket(key[len("agent-") :]))
        return self._spawn(
            key, [sys.executable, "-m", "mplslb", *args[:1], *args[1:], "--netns", ns, "--ready-file", str(ready)]
        )

    def agent_socket(self, name: str) -> str:
        """The control socket of agent ``name`` (a server's name, or ``c1``, ``c2``... for the clients)."""
        return str(self.dir / f"agent-{name}.sock")

    def agent_status(self) -> dict[str, dict[str, Any]]:
        """Each running agent's snapshot (its datapath, flows, traffic and drops), by agent name."""
        from mplslb.control.client import ControlError, request

        out = {}
        for name in sorted(self.datapaths()):
            try:
                reply = request(self.agent_socket(name), {"cmd": "status"})
            except ControlError:
                continue
            if "status" in reply:
                out[name] = reply["status"]["agent"]
        return out

    def _wait_ready(self, keys: list[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for key in keys:
            ready = self.dir / f"{key}.ready"
            while not ready.exists():
                proc = self.procs[key]
                if proc.poll() is not None:
                    raise LabError(f"{key} exited with {proc.returncode}: {self.log(key)[-2000:]}")
                if time.monotonic() > deadline:
                    raise LabError(f"{key} not ready after {READY_TIMEOUT} s: {self.log(key)[-2000:]}")
                time.sleep(0.05)

    def _datapath(self, udp: bool | None = None) -> str:
        # MPLS-in-UDP is not in the kernel datapath: the agents would refuse it and fall back to tun anyway
        udp = self.spec.transport == "udp" if udp is None else udp
        return "tun" if udp and self.spec.datapath == "kernel" else self.spec.datapath

    def datapaths(self) -> dict[str, str]:
        """The datapath each agent runs, as its ready file says."""
        out = {}
        for key in self.state.pids or (self._load_state() or LabState()).pids:
            if not key.startswith("agent-"):
                continue
            try:
                text = (self.dir / f"{key}.ready").read_text()
            except FileNotFoundError:
                continue
            found = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("datapath=")]
            out[key[len("agent-") :]] = found[0] if found else "?"
        return out

    def log(self, key: str) -> str:
        try:
            return (self.dir / f"{key}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_nginx(self, j: int) -> None:
        """Start (or restart) server ``j``'s nginx."""
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        name = self.server_name(j)
        home = self.dir / name
        if not (home / "nginx.conf").exists():
            (home / "www").mkdir(parents=True)
            (home / "www" / "index.html").write_text(f"server {name}\n")
            (home / "nginx.conf").write_text(_nginx_conf(home))
        self._spawn(f"nginx-{name}", [nginx, "-p", str(home), "-c", str(home / "nginx.conf")], ns=self.server_ns(j))

    def _start_servers(self) -> None:
        keys = []
        for j in range(self.spec.servers):
            self.start_nginx(j)
            keys.append(self._start_server_agent(j))
        self._wait_ready(keys)

    def _start_server_agent(self, j: int) -> str:
        key = f"agent-{self.server_name(j)}"
        udp = self.spec.server_transport == "udp"
        # A udp lab runs every agent on tun (the servers too, when only the clients' side is routed).
        datapath = self._datapath(True if udp else None)
        args = ["agent", "server", "--interface", "eth0", "--vip", VIP4, "--vip", VIP6, "--datapath", datapath]
        if self.spec.offload_gso:
            args.append("--super-packets")
        if self.spec.agent_keep and datapath == "kernel":
            args.append("--keep")
        if udp:
            args += ["--balancer", "10.81.0.1", "--udp-local", self.server_addr(j)]
        (self.dir / f"{key}.ready").unlink(missing_ok=True)
        self._mplslb(key, self.server_ns(j), *args)
        return key

    def move_server(self, j: int, mac: str, *, announce: bool = True) -> None:
        """Give server ``j``'s interface the MAC ``mac``, as a replaced interface would have, and restart its agent
        (an agent learns its MAC when it starts). With ``announce`` the kernel sends a gratuitous ARP as the MAC
        changes (``arp_notify``); without, the balancer only finds the server again by resolving it."""
        key = f"agent-{self.server_name(j)}"
        _stop_pid(self.state.pids[key], self.procs.get(key))
        ns_name = self.server_ns(j)
        self._sysctl(ns_name, "ipv4/conf/eth0/arp_notify", "1" if announce else "0")
        with NetNS(ns_name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], address=mac)
        self._wait_ready([self._start_server_agent(j)])

    def restart_agent(self, key: str, sig: int = signal.SIGTERM) -> None:
        """Stop agent ``key`` (``agent-s1``, ``agent-c1``...) with ``sig`` and start it again as it was started;
        returns once it is ready."""
        proc = self.procs[key]
        argv = list(proc.args)  # type: ignore[arg-type]
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        (self.dir / f"{key}.ready").unlink(missing_ok=True)
        shutil.copy(self.dir / f"{key}.log", self.dir / f"{key}-{proc.pid}.log")
        self._spawn(key, [str(a) for a in argv])
        self._wait_ready([key])

    def restart_balancer(self) -> None:
        """Stop the balancer daemon and start it again with the same configuration."""
        _stop_pid(self.state.pids["balancer"], self.procs.get("balancer"))
        (self.dir / "balancer.ready").unlink(missing_ok=True)
        self._mplslb("balancer", self.lb, "balancer", "--config", str(self.dir / "lb.toml"))
        self._wait_ready(["balancer"])

    def _start_balancer(self) -> None:
        (self.dir / "lb.toml").write_text(self.balancer_toml())
        self._mplslb("balancer", self.lb, "balancer", "--config", str(self.dir / "lb.toml"))
        self._wait_ready(["balancer"])

    def _start_clients(self) -> None:
        keys = []
        for i in range(self.spec.clients):
            key = f"agent-c{i + 1}"
            args = ["agent", "client", "--interface", "eth0", "--vip", VIP4, "--datapath", self._datapath()]
            if self.spec.agent_keep and self._datapath() == "kernel":
                args.append("--keep")
            if self.spec.transport == "udp":
                args += ["--balancer", "10.80.0.1", "--udp-local", self.client_addr(i)]
            else:
                args += ["--vip", VIP6, "--gateway-mac", _mac(0x4C, 0)]
            self._mplslb(key, self.client_ns(i), *args)
            keys.append(key)
        self._wait_ready(keys)

    def balancer_toml(self, node: int = 0) -> str:
        """The balancer's configuration; with several nodes, node ``node``'s (its control socket, ``[bgp]``)."""
        spec = self.spec
        udp = spec.transport == "udp"
        lines = [f'algorithm = "{spec.algorithm}"', f'offload = "{spec.offload}"']
        if spec.offload_syn_rate:
            lines.append(f"offload_syn_rate = {spec.offload_syn_rate}")
        if spec.offload_gso:
            lines.append("offload_gso = true")
        if spec.offload_syn:
            lines.append("offload_syn = true")
        if spec.offload_prealloc:
            lines.append("offload_prealloc = true")
        lines.append("")
        lines += [
            "[[ports]]",
            "id = 0",
            'name = "lc0p0"',
            'interface = "lc0p0"',
            "line_card = 0",
            "number = 0",
            'role = "client"',
            f'mac = "{_mac(0x4C, 0)}"',
        ]
        if udp:
            lines += ['kind = "mpls_udp"', 'address = "10.80.0.1"']
        for card_port in range(self.server_port_count):
            lines += [
                "",
                "[[ports]]",
                f"id = {1 + card_port}",
                f'name = "lc1p{card_port}"',
                f'interface = "lc1p{card_port}"',
                "line_card = 1",
                f"number = {card_port}",
                'role = "server"',
                f'mac = "{_mac(0x4C, 0x10 + card_port)}"',
            ]
            if spec.server_transport == "udp":
                lines += ['kind = "mpls_udp"', 'address = "10.81.0.1"']
        for vip in (VIP4, VIP6):
            lines += ["", "[[vip]]", f'address = "{vip}"', "tcp = [80]", f"udp = [{LAB_UDP_PORT}]"]
        for j in range(spec.servers):
            weight = spec.weights[j] if spec.weights else 1
            lines += [
                "",
                "[[servers]]",
                f'name = "{self.server_name(j)}"',
                f'address = "{self.server_addr(j)}"',
                *([] if spec.servers_by_ip or spec.server_transport == "udp" else [f'mac = "{self.server_mac(j)}"']),
                f"port = {1 + j % self.server_port_count}",
                f"weight = {weight}",
            ]
        lines += [
            "",
            "[limits]",
            f"max_sessions = {spec.max_sessions}",
            "",
            "[timeouts]",
            "tcp_start = 2.0",
            "closed_linger = 1.0",
            "",
            "[labels]",
            "quarantine = 60.0",
            *([] if spec.quarantine_min is None else [f"quarantine_min = {spec.quarantine_min!r}"]),
            *(["c2s_min = 17", f"c2s_max = {17 + 2 * (spec.label_pairs - 1)}"] if spec.label_pairs else []),
            "",
            "[neighbors]",  # resolving servers named by address: quick, for a lab's tests
            "retrans = 0.5",
            "reachable = 10.0",
            "retry_max = 4.0",
            "",
            "[health_check]",
            'kind = "http"',
            "port = 80",
            'path = "/"',
            f"interval = {spec.health_interval}",
            f"timeout = {spec.health_timeout}",
            f"rise = {spec.rise}",
            f"fall = {spec.fall}",
            "",
            "[control]",
            f'socket = "{self.control_socket if spec.nodes == 1 else self.node_socket(node)}"',
            'metrics = "127.0.0.1:9108"',
        ]
        if spec.nodes > 1:
            lines += [
                "",
                "[bgp]",
                f"local_as = {NODE_AS}",
                f'router_id = "{self.node_addr(node)}"',
                f'neighbors = ["10.90.{node + 1}.1"]',
                f"neighbor_as = {ROUTER_AS}",
                "bfd = true",
                f"bfd_interval = {BFD_INTERVAL}",
                f"bfd_multiplier = {BFD_MULTIPLIER}",
                f'state_dir = "{self.dir / f"n{node + 1}.bgp"}"',
            ]
        if spec.nodes > 1 and spec.cluster:
            peers = ", ".join(f'"{self.node_addr(k)}:{SYNC_PORT}"' for k in self.members if k != node)
            lines += ["", "[cluster]", f"node = {node + 1}", f"nodes = {spec.label_slices}", f"peers = [{peers}]"]
            lines += [f'sync_address = "{self.node_addr(node)}"', f"sync_port = {SYNC_PORT}"]
        if spec.node_state:
            lines += ["", "[state]", "persist = true", f'dir = "{self.dir / f"n{node + 1}.state"}"']
        return "\n".join(lines) + "\n"

    # -- using the lab -----------------------------------------------------------------------------------------
    def run_in(
        self, ns: str, argv: list[str], *, timeout: float = 60.0, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside namespace ``ns`` (bounded in time)."""
        return subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{ns}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def snmp(self, ns: str, group: str) -> dict[str, int]:
        """Namespace ``ns``'s counters of ``group`` ("Ip", "Tcp", "Udp", ...) in ``/proc/net/snmp``."""
        lines = [line.split() for line in self.run_in(ns, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()]
        names, values = (line[1:] for line in lines if line[0] == f"{group}:")
        return dict(zip(names, map(int, values), strict=True))

    def curl(
        self, client: int, count: int, *, v6: bool = False, timeout: float = 120.0, max_time: float = 5.0
    ) -> list[str]:
        """``count`` sequential HTTP requests from client ``client``, each on its own connection (one session
        each) and given ``max_time`` seconds; returns each response body's first line, or "" for a failed
        request."""
        url = f"http://[{VIP6}]/" if v6 else f"http://{VIP4}/"
        argv = ["curl", "-s", "-g", "--max-time", f"{max_time:g}", "-H", "Connection: close", "-w", "##%{http_code}\\n"]
        argv += [url] * count
        done = self.run_in(self.client_ns(client), argv, timeout=timeout)
        bodies = [
            body.strip().splitlines()[0] if code == "200" and body.strip() else ""
            for body, code in re.findall(r"(.*?)##(\d{3})\n", done.stdout, re.DOTALL)
        ]
        bodies += [""] * (count - len(bodies))
        return bodies[:count]

    def wrk(
        self,
        client: int,
        *,
        seconds: int = 3,
        connections: int = 8,
        headers: tuple[str, ...] = (),
        timeout: float | None = None,
    ) -> dict[str, float]:
        """wrk from client ``client``: its figures (``socket_errors`` the sum of the ``connect_errors``,
        ``read_errors``, ``write_errors`` and ``timeouts``: requests unanswered after ``timeout`` s, wrk's 2 s by
        default)."""
        extra = [arg for header in headers for arg in ("-H", header)]
        if timeout is not None:
            extra += ["--timeout", f"{timeout:g}s"]
        out = self.run_in(
            self.client_ns(client),
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, f"http://{VIP4}/"],
            timeout=seconds + 30,
        ).stdout
        figures: dict[str, float] = {}
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if match:
            figures["requests_per_s"] = float(match.group(1))
        match = re.search(r"(\d+) requests in", out)
        if match:
            figures["requests"] = float(match.group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        figures["non_2xx"] = float(errors.group(1)) if errors else 0.0
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        counts = [int(g) for g in sock.groups()] if sock else [0, 0, 0, 0]
        for name, count in zip(("connect_errors", "read_errors", "write_errors", "timeouts"), counts, strict=True):
            figures[name] = float(count)
        figures["socket_errors"] = float(sum(counts))
        for pct in ("50", "99"):
            match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.MULTILINE)
            if match:
                scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
                figures[f"p{pct}_ms"] = float(match.group(1)) * scale
        return figures

    def status(self) -> dict[str, Any]:
        return self.command(cmd="status")

    def command(self, **req: Any) -> dict[str, Any]:
        """Ask the balancer's daemon; a daemon busy under a flood on a small machine gets more than the CLI's 2 s."""
        from mplslb.control.client import request

        return request(self.control_socket, req, timeout=LAB_CONTROL_TIMEOUT)

    def kill_nginx(self, j: int) -> None:
        key = f"nginx-{self.server_name(j)}"
        _stop_pid(self.state.pids[key], self.procs.get(key))


def _stop_pid(pid: int, proc: subprocess.Popen[bytes] | None) -> str:
    """SIGTERM, wait, SIGKILL: the process we started with this pid, and nothing else."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(KILL_WAIT)
                except subprocess.TimeoutExpired:
                    return f"pid {proc.pid} still there {KILL_WAIT:g} s after SIGKILL"
        return ""
    try:  # a lab brought up by another command: we only have its pid
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return ""
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _exited(pid):
            return ""
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return "did not stop on SIGTERM; killed"


def _exited(pid: int) -> bool:
    """Has ``pid`` exited? A process whose parent is gone is reaped by init, which may take its time: an exited
    one waiting to be reaped (a zombie) has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def _nginx_conf(home: Path) -> str:
    return f"""daemon off;
master_process on;
worker_processes 1;
user root;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {home}/tmp_body;
    proxy_temp_path {home}/tmp_proxy;
    fastcgi_temp_path {home}/tmp_fastcgi;
    uwsgi_temp_path {home}/tmp_uwsgi;
    scgi_temp_path {home}/tmp_scgi;
    keepalive_requests 100000;
    server {{
        listen 80 default_server;
        listen [::]:80 default_server;
        root {home}/www;
        location / {{ default_type text/plain; }}
    }}
}}
"""


def split(bodies: list[str]) -> Counter[str]:
    """Responses per server name ("" for failures)."""
    return Counter(b.removeprefix("server ") for b in bodies)


__all__ = ["VIP4", "VIP6", "Lab", "LabError", "LabSpec", "split"]
