from collections.abc import Callable
from typing import Any

from mplslb.switching.table import FastEvent

def switch_frame(
    hot: tuple[Any, ...],
    port: int,
    frame: bytes | memoryview,
    now: float,
    out: list[tuple[int, bytes]],
    events: list[FastEvent],
    /,
) -> int: ...
def install_pair(
    rows: memoryview,
    c2s: int,
    client_port: int,
    server_port: int,
    client_mac: bytes,
    server_mac: bytes,
    client_port_mac: bytes,
    server_port_mac: bytes,
    key: tuple[int, bytes, int, bytes, int],
    c2s_watch: int,
    s2c_watch: int,
    c2s_seen: float,
    s2c_seen: float,
    /,
) -> int: ...
def send(
    hot: tuple[Any, ...],
    label: int,
    frame: bytes | memoryview,
    ip_offset: int,
    ip_end: int,
    now: float,
    out: list[tuple[int, bytes]],
    ttl: int,
    tc: int,
    ack: int,
    /,
) -> bool: ...
def bind(
    reference: Callable[..., int],
    event_type: type[tuple[Any, ...]],
    numbers: dict[str, int],
    reasons: dict[str, str],
    /,
) -> None: ...
def find_slot(columns: tuple[memoryview[Any], ...], packed: bytes, /) -> tuple[int, int]: ...
def open_row(
    columns: tuple[memoryview[Any], ...],
    pair: int,
    slot: int,
    packed: bytes,
    proto: int,
    ip_version: int,
    budget: int,
    client_port: int,
    server: int,
    mac: bytes,
    now: float,
    /,
) -> None: ...
def plain_ipv4(frame: bytes | memoryview, ip: int, l7: bool, /) -> Any: ...
def bind_analyzer(
    flow_key: type[tuple[Any, ...]],
    analysis: type[tuple[Any, ...]],
    http_reader: Callable[..., Any],
    numbers: dict[str, int],
    /,
) -> None: ...
