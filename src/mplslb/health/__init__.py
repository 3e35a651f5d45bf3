"""Active health checks, in two layers, each usable alone:

* :mod:`mplslb.health.checker`: the sans-I/O :class:`HealthChecker` (HAProxy's rise/fall counter, probe
  scheduling, time passed in) and its validated :class:`HealthCheckConfig`.
* :mod:`mplslb.health.probe`: :class:`HealthProbeDriver`, which runs the probes over non-blocking sockets.

What a verdict does to a server (mark it down, bring it back, feed a probe's RTT) is server state policy and lives
with the servers, in :mod:`mplslb.balancing.health_policy`.
"""

from mplslb.health.checker import HealthCheckConfig, HealthChecker, HealthState, Transition
from mplslb.health.probe import HealthProbeDriver, ProbeResult

__all__ = ["HealthCheckConfig", "HealthChecker", "HealthProbeDriver", "HealthState", "ProbeResult", "Transition"]
