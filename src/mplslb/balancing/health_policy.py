"""Server state policy for health: what an active check's verdict does to a server in the balancer.

Theory of operation
-------------------
The checker (:mod:`mplslb.health`) only says whether a server passes its probes; here that verdict meets the
server's live state and its :class:`~mplslb.balancing.servers.DownReason`:

* A ``"down"`` verdict marks an up server down (``HEALTH_CHECK``), which interrupts its sessions and withdraws
  their labels (:func:`apply_transition`).
* An ``"up"`` verdict brings back a server that is down for its health (``HEALTH_CHECK``, or passive health's
  ``NO_REPLY``/``REFUSED``); one an operator took down (``ADMIN``) stays down until the operator says so.
* Once per loop tick, :func:`reconcile` lines the checker up with what happened meanwhile: a passive down resets
  the verdict so ``rise`` passing probes bring the server back, and an operator's "up" does not outlast a failing
  check.

Probe round-trip times feed the server's response-time estimate only when sessions cannot
(:func:`feed_probe_rtt`): when the server has no estimate yet (just configured, or just back up, which forgets the
old one), or when it is *overloaded* (its estimate is above the pool's ``rt_limit``, so it takes no new session
and would otherwise never get a fresh sample and stay excluded for ever). Otherwise sessions, which measure the
real traffic, are the only source: a probe to a cheap health URL would drag the estimate toward a path users do
not take.

Like the rest of the unit this is sans-I/O: time is passed in. The balancer is reached through
:class:`ServerControl` only, so this module does not depend on :mod:`mplslb.balancer`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from mplslb.balancing.servers import DownReason, ServerPool, ServerStatus

if TYPE_CHECKING:
    from mplslb.health import HealthChecker, ProbeResult, Transition

__all__ = ["ServerControl", "apply_result", "apply_transition", "feed_probe_rtt", "reconcile"]


class ServerControl(Protocol):
    """What the policy needs of a balancer: its pool, and taking a server down (interrupting its sessions) or up."""

    @property
    def pool(self) -> ServerPool: ...

    def mark_down(self, name: str, now: float, reason: DownReason) -> None: ...

    def mark_up(self, name: str) -> None: ...


def apply_transition(balancer: ServerControl, name: str, transition: Transition, now: float) -> bool:
    """Act on a verdict flip (see the module docstring). Returns True if the balancer changed. A server no longer
    in the balancer is ignored."""
    if name not in balancer.pool:
        return False
    server = balancer.pool.get(name)
    if transition == "down":
        if server.status is ServerStatus.DOWN:
            return False
        balancer.mark_down(name, now, DownReason.HEALTH_CHECK)
        return True
    if server.status is ServerStatus.DOWN and server.down_reason is not None and server.down_reason.lifted_by_check:
        balancer.mark_up(name)
        return True
    return False


def feed_probe_rtt(balancer: ServerControl, name: str, rtt: float) -> bool:
    """Feed a passing probe's RTT into the server's response-time estimate when sessions cannot refresh it: no
    estimate yet, or overloaded (see the module docstring). True if fed."""
    if name not in balancer.pool or not (math.isfinite(rtt) and rtt >= 0):
        return False
    server = balancer.pool.get(name)
    if server.status is not ServerStatus.UP or not (server.rt_ewma is None or server.overloaded):
        return False
    balancer.pool.record_response_time(server, rtt)
    return True


def apply_result(balancer: ServerControl, result: ProbeResult) -> None:
    """The probe driver's ``on_result`` for a daemon: apply the transition, feed the RTT when it is wanted."""
    if result.transition is not None:
        apply_transition(balancer, result.name, result.transition, result.at)
    if result.ok and result.rtt is not None:
        feed_probe_rtt(balancer, result.name, result.rtt)


def reconcile(balancer: ServerControl, checker: HealthChecker, now: float) -> list[str]:
    """Line the checker up with what happened in the balancer meanwhile; call it once per loop tick.

    * A server the balancer's passive health took down (unanswered SYNs, RST to SYN) while its verdict is up:
      the verdict drops to down, so ``rise`` passing probes bring it back (HAProxy's ``observe layer4`` with
      ``on-error mark-down``).
    * A server an operator marked up while its verdict is down: it goes down again (``HEALTH_CHECK``); the
      operational state follows the checks, as in HAProxy.

    Returns the names it changed.
    """
    changed = []
    for name in checker.names:
        if name not in balancer.pool:
            continue
        server = balancer.pool.get(name)
        up = checker.is_up(name)
        if up and server.status is ServerStatus.DOWN and server.down_reason is not None and server.down_reason.passive:
            checker.set_down(name, now)
            changed.append(name)
        elif not up and server.status is not ServerStatus.DOWN:
            balancer.mark_down(name, now, DownReason.HEALTH_CHECK)
            changed.append(name)
    return changed
