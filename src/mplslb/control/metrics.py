"""Prometheus ``/metrics`` from the daemon's latest snapshot (and, on the balancer's endpoint, the status page of
:mod:`.page`).

The HTTP server runs in a thread of its own; it never touches the balancer. The daemon loop builds a
snapshot (:func:`mplslb.control.tables.snapshot`) every second and publishes it by swapping one reference, which
``get_snapshot`` returns; a scrape reads that dict, so a published snapshot must never be mutated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mplslb.balancing.servers import ServerStatus
from mplslb.control.page import StatusSource, serve, status_app

__all__ = ["AgentCollector", "MetricsServer", "SnapshotCollector", "start_metrics_server"]

SnapshotSource = Callable[[], Mapping[str, Any] | None]
_SERVER_STATES = tuple(str(status) for status in ServerStatus)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_label(kind: str, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    family: GaugeMetricFamily | CounterMetricFamily
    if kind == "counter":
        family = CounterMetricFamily(name, doc, labels=[label])
    else:
        family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class SnapshotCollector:
    """A prometheus_client collector over the latest snapshot; exports nothing until there is one."""

    def __init__(self, get_snapshot: SnapshotSource) -> None:
        self.get_snapshot = get_snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.get_snapshot()
        if snap:
            yield from self.metrics(snap)

    def metrics(self, snap: Mapping[str, Any]) -> Iterator[Metric]:
        """The metrics of one snapshot (the balancer's here; a subclass reads another kind)."""
        sessions = snap["sessions"]
        frames = snap["frames"]
        labels = snap["labels"]
        yield _gauge("mplslb_sessions_active", "Sessions not yet closed or interrupted.", sessions["active"])
        yield _gauge("mplslb_sessions_peak", "Most sessions in the table at once.", sessions["peak"])
        yield _counter("mplslb_sessions_started_total", "Sessions started.", sessions["started"])
        yield _by_label(
            "counter", "mplslb_sessions_ended_total", "Sessions ended, by reason.", "reason", sessions["ended"]
        )
        yield _by_label(
            "counter",
            "mplslb_sessions_refused_total",
            "New sessions refused, by reason.",
            "reason",
            sessions["refused"],
        )
        yield _by_label(
            "counter",
            "mplslb_frames_total",
            "Frames handled: fast = switched on their label, slow = analysed.",
            "path",
            {"fast": frames["fast_path"], "slow": frames["slow_path"]},
        )
        yield _counter("mplslb_frames_received_total", "Frames received.", frames["in"])
        yield _counter("mplslb_frames_sent_total", "Frames sent.", frames["out"])
        yield _by_label("counter", "mplslb_drops_total", "Frames dropped, by reason.", "reason", snap["drops"])
        ports = snap.get("ports") or {}
        yield _by_label(
            "counter",
            "mplslb_port_kernel_drops_total",
            "Frames the kernel dropped before the daemon read them (socket buffer or ring full), by port.",
            "port",
            {name: counts["kernel_dropped"] for name, counts in ports.items()},
        )
        yield _by_label(
            "counter",
            "mplslb_port_kernel_labelled_drops_total",
            "Of those, labelled frames (read first, through a socket of their own), by port.",
            "port",
            {name: counts["labelled_dropped"] for name, counts in ports.items() if "labelled_dropped" in counts},
        )
        yield _gauge("mplslb_labels_in_use", "Session label pairs in use.", labels["in_use"])
        yield _gauge("mplslb_labels_free", "Session label pairs free.", labels["free"])
        yield _gauge("mplslb_labels_quarantined", "Withdrawn label pairs waiting before reuse.", labels["quarantined"])
        yield _gauge("mplslb_labels_capacity", "Session label pairs in the configured range.", labels["capacity"])
        yield _counter("mplslb_labels_allocated_total", "Label pairs allocated.", labels["allocated_total"])
        yield _counter(
            "mplslb_labels_exhausted_total",
            "Label pair allocations that failed for want of a pair.",
            labels["exhausted"],
        )
        yield _counter(
            "mplslb_labels_reused_early_total",
            "Label pairs reused before their quarantine was over, because no other pair was free.",
            labels["reused_early"],
        )

        vip_active = GaugeMetricFamily(
            "mplslb_vip_sessions_active", "Live sessions per virtual service.", labels=["vip", "proto", "port"]
        )
        for vip in snap["vips"]:
            for service in vip["services"]:
                if service.get("active") is not None:
                    vip_active.add_metric([vip["address"], service["proto"], str(service["port"])], service["active"])
        yield vip_active

        yield from self._servers(snap["servers"])
        bgp = snap.get("bgp")
        if bgp is not None:
            yield _gauge(
                "mplslb_bgp_announcing", "1 while the node announces its prefixes by BGP.", float(bgp["announcing"])
            )
            yield _by_label(
                "gauge",
                "mplslb_bgp_peer_established",
                "1 while the BGP session with a neighbour is established.",
                "neighbor",
                {peer["neighbor"]: float(peer["established"]) for peer in bgp.get("peers", [])},
            )
        if snap.get("cluster"):
            yield from self._cluster(snap["cluster"])
        if snap.get("offload"):
            yield from self._offload(snap["offload"])

    @staticmethod
    def _offload(offload: Mapping[str, Any]) -> Iterator[Metric]:
        """The kernel offload (see mplslb.offload.xdp): what it switched, the SYNs it shed, and with ``offload_syn``
        the tickets."""
        yield _gauge("mplslb_offload_entries", "Label entries in the kernel's switching map.", offload["entries"])
        yield _counter("mplslb_offload_frames_total", "Frames the kernel switched (as of the last poll).",
                       offload["kernel_packets"])  # fmt: skip
        yield _counter("mplslb_offload_bytes_total", "Bytes the kernel switched (as of the last poll).",
                       offload["kernel_bytes"])  # fmt: skip
        yield _counter("mplslb_offload_syn_shed_total", "Unlabelled TCP SYNs the kernel dropped over offload_syn_rate.",
                       offload["syn_shed"])  # fmt: skip
        yield _by_label("counter", "mplslb_offload_errors_total", "Kernel map operations that failed, by what.",
                        "what", offload["errors"])  # fmt: skip
        tickets = offload.get("tickets")
        if tickets is None:
            return
        yield _gauge("mplslb_offload_tickets_outstanding", "New sessions decided ahead, waiting for a SYN.",
                     tickets["outstanding"])  # fmt: skip
        yield _gauge("mplslb_offload_tickets_waiting", "Tickets taken on the flow of a session the kernel saw close, "
                     "made sessions once a poll hands that session over.", tickets.get("waiting", 0))  # fmt: skip
        yield _by_label(
            "counter",
            "mplslb_offload_tickets_total",
            "Tickets (offload_syn) by what became of them: issued, taken (a session), revoked, refused (a flow "
            "that was a session already).",
            "what",
            {k: tickets[k] for k in ("issued", "taken", "revoked", "refused")},
        )
        yield _by_label("counter", "mplslb_offload_tickets_held_total", "Ticket issues stopped, by the reason.",
                        "reason", tickets["held"])  # fmt: skip
        yield _by_label(
            "counter",
            "mplslb_offload_syn_total",
            "TCP SYNs the kernel looked at for a ticket, by what it did: taken, or passed up (no ticket, a live flow).",
            "what",
            {k: v for k, v in tickets.items() if k.startswith("syn_")},
        )

    @staticmethod
    def _cluster(cluster: Mapping[str, Any]) -> Iterator[Metric]:
        """A cluster node's sync (see mplslb.cluster)."""
        yield _gauge("mplslb_cluster_synced", "1 once this node has its peers' sessions (announce it then).",
                     1 if cluster["synced"] else 0)  # fmt: skip
        yield _gauge("mplslb_cluster_replicas", "Sessions held here on labels of other nodes.", cluster["replicas"])
        peers = {p["address"]: 1 if p["alive"] else 0 for p in cluster["peers"]}
        yield _by_label("gauge", "mplslb_cluster_peer_alive", "1 while a peer is heard.", "peer", peers)
        sent, received = cluster["sent"], cluster["received"]
        yield _counter("mplslb_cluster_sync_datagrams_sent_total", "Sync datagrams sent.", sent["datagrams"])
        yield _counter("mplslb_cluster_sync_records_sent_total", "Sync records sent.", sent["records"])
        yield _counter("mplslb_cluster_sync_datagrams_received_total", "Sync datagrams received.",
                       received["datagrams"])  # fmt: skip
        yield _by_label("counter", "mplslb_cluster_sync_applied_total", "Sync records applied, by what they did.",
                        "what", cluster["applied"])  # fmt: skip
        yield _by_label("counter", "mplslb_cluster_sync_drops_total", "Sync datagrams or records dropped, by reason.",
                        "reason", cluster["drops"])  # fmt: skip

    @staticmethod
    def _servers(rows: list[Mapping[str, Any]]) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["server"])

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["server"])

        up = gauge("mplslb_server_up", "1 if the server takes new sessions (status up), else 0.")
        state = GaugeMetricFamily(
            "mplslb_server_state",
            "1 for the server's status (up, draining, down, removing).",
            labels=["server", "state"],
        )
        weight = gauge("mplslb_server_weight", "Current weight.")
        active = gauge("mplslb_server_active", "Live sessions on the server.")
        total = counter("mplslb_server_sessions_total", "Sessions sent to the server.")
        refused = counter("mplslb_server_sessions_refused_total", "Sessions refused because the server was full.")
        pin = counter("mplslb_server_packets_in_total", "Packets switched toward the server.")
        pout = counter("mplslb_server_packets_out_total", "Packets switched from the server.")
        bin_ = counter("mplslb_server_bytes_in_total", "Bytes switched toward the server.")
        bout = counter("mplslb_server_bytes_out_total", "Bytes switched from the server.")
        rt = gauge("mplslb_server_response_time_seconds", "Smoothed response time (absent until measured).")
        health = gauge("mplslb_server_health", "Active health check verdict: 1 up, 0 down (absent if unchecked).")
        checks = counter("mplslb_server_health_checks_total", "Health probes finished.")
        failed = counter("mplslb_server_health_checks_failed_total", "Health probes failed.")
        resolved = gauge("mplslb_server_mac_known", "1 if the MAC the server's frames go to is known (configured or "
                         "resolved), else 0: no new sessions.")  # fmt: skip
        for row in rows:
            name = [row["name"]]
            up.add_metric(name, 1.0 if row["status"] == "up" else 0.0)
            for s in _SERVER_STATES:
                state.add_metric([row["name"], s], 1.0 if row["status"] == s else 0.0)
            weight.add_metric(name, row["weight"])
            resolved.add_metric(name, 1.0 if row.get("mac") else 0.0)
            active.add_metric(name, row["active"])
            total.add_metric(name, row["total"])
            refused.add_metric(name, row.get("refused", 0))
            pin.add_metric(name, row["packets_in"])
            pout.add_metric(name, row["packets_out"])
            bin_.add_metric(name, row["bytes_in"])
            bout.add_metric(name, row["bytes_out"])
            if row["rt_ms"] is not None:
                rt.add_metric(name, row["rt_ms"] / 1000.0)
            h = row.get("health")
            if h is not None:
                health.add_metric(name, 1.0 if h["up"] else 0.0)
                checks.add_metric(name, h["checks"])
                failed.add_metric(name, h["failed_checks"])
        yield from (
            up,
            state,
            weight,
            active,
            total,
            refused,
            pin,
            pout,
            bin_,
            bout,
            rt,
            health,
            checks,
            failed,
            resolved,
        )


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it and waits for its thread."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self.httpd = httpd
        self.thread = thread
        self.registry = registry
        self._closed = False

    @property
    def port(self) -> int:
        """The port it listens on (useful after asking for port 0)."""
        return int(self.httpd.server_port)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AgentCollector(SnapshotCollector):
    """An endpoint agent's figures (:func:`mplslb.agents.agent_snapshot`) as ``mplslb_agent_*`` metrics."""

    def metrics(self, snap: Mapping[str, Any]) -> Iterator[Metric]:
        agent = snap["agent"]
        yield _gauge("mplslb_agent_flows", "Flows whose label the agent remembers.", agent["flows"])
        yield _by_label(
            "counter",
            "mplslb_agent_frames_total",
            "Frames the agent's datapath handled, by what it did.",
            "what",
            agent["traffic"],
        )
        yield _by_label(
            "counter", "mplslb_agent_drops_total", "Frames the agent dropped, by reason.", "reason", agent["drops"]
        )


def start_metrics_server(
    port: int,
    addr: str,
    get_snapshot: SnapshotSource,
    *,
    collector: type[SnapshotCollector] = SnapshotCollector,
    page: StatusSource | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` (port 0: any free port) from ``get_snapshot()`` through ``collector``
    (the balancer's by default), with a registry of its own (no process/GC collectors of the default registry).
    With ``page``, the same endpoint serves the status page (``/``) and ``/status.json`` from ``page()``."""
    registry = CollectorRegistry()
    registry.register(collector(get_snapshot))
    if page is None:
        httpd, thread = start_http_server(port, addr=addr, registry=registry)
    else:
        httpd, thread = serve(addr, port, status_app(page, make_wsgi_app(registry)))
    return MetricsServer(httpd, thread, registry)
