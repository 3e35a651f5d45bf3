"""Thin I/O drivers around the sans-I/O core: each has a ``fileno()``, reads a burst without blocking, and writes.

* :mod:`~mplslb.drivers.afpacket` — Ethernet ports over AF_PACKET (plain socket or a TPACKET_V3 RX ring);
* :mod:`~mplslb.drivers.socket_filter` — the classic BPF filter those ports attach (SO_ATTACH_FILTER);
* :mod:`~mplslb.drivers.txring` — a TPACKET_V2 transmit ring, for sending a block's frames with one system call;
* :mod:`~mplslb.drivers.mplsudp` — MPLS-in-UDP (RFC 7510) presented to the core as an Ethernet port;
* :mod:`~mplslb.drivers.tun` — a TUN device toward the host stack, for the endpoint agents;
* :mod:`~mplslb.drivers.pcapdrv` — a capture replayed through the balancer, outputs written to a capture;
* :mod:`~mplslb.drivers.loop` — the selector loop and the balancer/endpoint drivers that pump frames.
"""
