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
def bind(
    reference: Callable[..., int],
    event_type: type[tuple[Any, ...]],
    numbers: dict[str, int],
    reasons: dict[str, str],
    /,
) -> None: ...
