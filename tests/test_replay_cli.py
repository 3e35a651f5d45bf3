"""``mplslb replay``: a capture through the balancer, no root and no interfaces, what it sends written out."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from helpers import PORT_MAC, VIP, client_addr, mac, tcp, udp
from mplslb.cli import main
from mplslb.wire.ethernet import ETH_P_IP, build_ethernet
from mplslb.wire.pcap import PcapWriter, read_pcap
from mplslb.wire.tcp import TCPFlag

LB_TOML = """
algorithm = "round_robin"
[[ports]]
id = 0
mac = "02:b0:00:00:00:00"
role = "client"
[[ports]]
id = 2
line_card = 1
mac = "02:b0:00:00:00:02"
role = "server"
[[vip]]
address = "10.0.0.100"
tcp = [80]
udp = [53]
[[servers]]
name = "s1"
address = "10.2.0.1"
mac = "02:5e:00:00:00:01"
port = 2
"""


def test_replay_writes_the_labelled_frames_the_balancer_sends(tmp_path: Path) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(LB_TOML)
    pcap_in, pcap_out = tmp_path / "in.pcap", tmp_path / "out.pcap"
    client = mac(0xC0, 1)
    with PcapWriter(pcap_in) as writer:
        writer.write(
            build_ethernet(PORT_MAC[0], client, ETH_P_IP) + tcp(client_addr(0), VIP, 1000, 80, int(TCPFlag.SYN)), 1.0
        )
        writer.write(build_ethernet(PORT_MAC[0], client, ETH_P_IP) + udp(client_addr(0), VIP, 2000, 53), 1.5)
        writer.write(b"\x00" * 20, 2.0)  # garbage: counted and dropped
    result = CliRunner().invoke(main, ["replay", "--config", str(config), str(pcap_in), str(pcap_out), "--drain", "1"])
    assert result.exit_code == 0, result.output
    assert "3 frames in, 2 out" in result.output and "sessions 2" in result.output
    out = list(read_pcap(pcap_out))
    assert [r.data[0:6] for r in out] == [mac(0x5E, 1)] * 2  # both to the server
    assert all(r.data[12:14] == b"\x88\x47" for r in out)
    labels = [int.from_bytes(r.data[14:17], "big") >> 4 for r in out]
    assert all(label % 2 == 1 for label in labels) and len(set(labels)) == 2


def test_replay_rejects_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(LB_TOML.replace('algorithm = "round_robin"', 'algorithm = "fastest"'))
    (tmp_path / "in.pcap").write_bytes(b"")
    result = CliRunner().invoke(
        main, ["replay", "--config", str(config), str(tmp_path / "in.pcap"), str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "algorithm" in result.output
