"""Kernel offload of the label switching fast path (``offload = "kernel"`` in the balancer's configuration).

:class:`~mplslb.offload.xdp.XdpOffload` mirrors a :class:`~mplslb.switching.LabelSwitchingTable` into an XDP
program's map (the module's docstring tells how, and why XDP); :class:`~mplslb.offload.driver.OffloadedBalancer`
runs it inside the daemon's loop.
"""

from __future__ import annotations

from mplslb.config import OFFLOAD_KINDS
from mplslb.offload.xdp import MODES, PROG_NAME, OffloadError, XdpOffload

__all__ = ["MODES", "OFFLOAD_KINDS", "PROG_NAME", "OffloadError", "XdpOffload"]
