"""How the lab stops the processes it started when it only has their pids (`mplslb lab down` from another
command than the one that brought the lab up)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from mplslb.lab import _exited, _stop_pid


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_a_process_that_exited_but_is_not_yet_reaped_counts_as_stopped() -> None:
    running = subprocess.Popen(["sleep", "30"])
    finished = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while _state(finished.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(finished.pid) == "Z"  # exited, its parent (this process) has not reaped it
        assert _exited(finished.pid)
        assert not _exited(running.pid)
        # Stopping it by pid finds it gone: no SIGKILL, no problem reported.
        assert _stop_pid(finished.pid, None) == ""
        assert _stop_pid(running.pid, None) == ""
        assert _state(running.pid) == "Z"
    finally:
        for proc in (running, finished):
            proc.kill()
            proc.wait(10)
    assert _exited(running.pid)
