"""Status and control of a running balancer: the snapshot and its tables (:mod:`.tables`), the control socket
(:mod:`.server`, :mod:`.client`) and Prometheus metrics (:mod:`.metrics`, imported on its own so the CLI does not
need prometheus_client)."""

from __future__ import annotations

from mplslb.control.client import DEFAULT_SOCKET, ControlError, request
from mplslb.control.server import ControlServer, balancer_commands
from mplslb.control.tables import RateTracker, snapshot, status_tables

__all__ = [
    "DEFAULT_SOCKET",
    "ControlError",
    "ControlServer",
    "RateTracker",
    "balancer_commands",
    "request",
    "snapshot",
    "status_tables",
]
