"""The agents' restart bench (bench/agent_restart.py) reads wrk's reports, and one round of it runs a lab with the
agents keeping their kernel datapath, restarts them under wrk and leaves nothing behind; nothing timed."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import agent_restart

REPORT = """Running 12s test @ http://10.100.0.1/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   750.73us    7.36ms 206.28ms   99.71%
    Req/Sec    18.29k     2.64k   24.30k    81.17%
  Latency Distribution
     50%  294.00us
     75%  386.00us
     90%  551.00us
     99%    4.27ms
  436632 requests in 12.00s, 102.03MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:  36371.33
Transfer/sec:      8.50MB
"""


def test_a_wrk_report_is_read_in_seconds() -> None:
    figures = agent_restart.parse_wrk(REPORT)
    assert figures == {
        "latency_mean_s": pytest.approx(750.73e-6),
        "latency_max_s": pytest.approx(0.20628),
        "p99_s": pytest.approx(4.27e-3),
        "requests_per_s": 36371.33,
        "socket_errors": [0, 1, 0, 2],
    }
    assert agent_restart.parse_wrk(REPORT.replace("  Socket errors: connect 0, read 1, write 0, timeout 2\n", ""))[
        "socket_errors"
    ] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="wrk"):
        agent_restart.parse_wrk("Running 12s test\n")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a lab of namespaces")
@pytest.mark.skipif(
    any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "wrk", "clang")),
    reason="nginx, wrk and clang are needed (make test installs them)",
)
def test_one_round_with_kept_datapaths_restarts_every_agent_and_cleans_up() -> None:
    result = agent_restart.one(True, seconds=5, after=1.0)
    assert result["keep"] is True and result["restarts_s"] > 0 and result["requests_per_s"] > 0
    assert result["socket_errors"][:3] == [0, 0, 0]
    assert not list(agent_restart.ROOT.glob(f"ark{os.getpid() % 10000}*"))
    assert not list(Path("/sys/fs/bpf/mplslb").glob(f"agent-*-ark{os.getpid() % 10000}*"))
