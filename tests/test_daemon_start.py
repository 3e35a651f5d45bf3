"""The daemon's start: a port it cannot open is a clear error naming the port and its interface, and nothing is left
open."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import make_config
from mplslb.config import PortConfig
from mplslb.daemon import StartError, lock_interfaces, open_ports
from mplslb.drivers.afpacket import PacketPort
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="packet sockets need root")


@needs_root
def test_a_missing_interface_is_named_in_one_line() -> None:
    config = make_config()
    missing = PortConfig(9, 0, 9, bytes.fromhex("02b000000009"), "client", name="uplink", interface="mlbnosuch0")
    lo = PortConfig(8, 0, 8, bytes.fromhex("02b000000008"), "client", name="loop", interface="lo")
    config = type(config)(**{**config.__dict__, "ports": (lo, missing, *config.ports[1:])})
    with pytest.raises(StartError) as info:
        open_ports(config, ring=False)
    message = str(info.value)
    assert message == "port 9 (uplink): cannot open interface 'mlbnosuch0': No such device" or (
        message.startswith("port 9 (uplink): cannot open interface 'mlbnosuch0': ") and "\n" not in message
    )


@needs_root
def test_a_second_daemon_on_the_same_interface_is_refused_naming_the_holder(tmp_path: Path) -> None:
    lo = PortConfig(8, 0, 8, bytes.fromhex("02b000000008"), "client", name="loop", interface="lo")
    config = make_config()
    config = type(config)(**{**config.__dict__, "ports": (lo, *config.ports[1:])})
    first = lock_interfaces(config, tmp_path)
    try:
        with pytest.raises(
            StartError, match=rf"interface 'lo' is already used by another mplslb balancer \(pid {os.getpid()};"
        ):
            lock_interfaces(config, tmp_path)
    finally:
        for fd in first:
            os.close(fd)
    again = lock_interfaces(config, tmp_path)  # released with the first holder's descriptors
    for fd in again:
        os.close(fd)


def test_admission_refusals_are_logged_once_a_second_with_what_is_new_by_reason() -> None:
    from mplslb.daemon import refusal_line

    line, logged = refusal_line({}, {"max_sessions": 0})
    assert line == "" and logged == {}
    line, logged = refusal_line(logged, {"max_sessions": 3, "rate_limited": 1})
    assert line == "event=refusing max_sessions=3 rate_limited=1"
    line, logged = refusal_line(logged, {"max_sessions": 5, "rate_limited": 1})
    assert line == "event=refusing max_sessions=2"
    assert refusal_line(logged, {"max_sessions": 5, "rate_limited": 1})[0] == ""


@needs_root
def test_a_client_ports_filter_takes_ip_frames_to_the_virtual_ips_only() -> None:
    """The daemon's client ports take IP frames to its virtual IPs only (see tests/test_drivers_afpacket.py for the
    filter at work); an IP version without a virtual IP not at all; the server ports are not filtered so."""
    config = make_config()
    client, server = (replace(config.ports[i], interface="lo") for i in (0, 2))
    servers = tuple(s for s in config.servers if s.port_id == server.port_id)
    v4 = tuple(vip for vip in config.vips if len(vip.address) == 4)
    v6 = tuple(vip for vip in config.vips if len(vip.address) == 16)
    assert v4 and v6
    for vips in (config.vips, v4, v6):
        ports = open_ports(replace(config, ports=(client, server), servers=servers, vips=vips), ring=False)
        try:
            port = ports[client.port_id]
            assert isinstance(port, PacketPort)
            assert port.destinations == {vip.address for vip in vips}
            assert {ETH_P_IP, ETH_P_IPV6} & (port.accept or set()) == {
                ETH_P_IP if len(vip.address) == 4 else ETH_P_IPV6 for vip in vips
            }
            assert ports[server.port_id].destinations is None  # type: ignore[attr-defined]
        finally:
            for opened in ports.values():
                opened.close()  # type: ignore[attr-defined]
