"""A new session's first frames through ``Balancer.receive``, one phase at a time: what each frame costs.

The phases, in order, for ``--sessions`` fresh TCP flows on a balancer with 1,000 live sessions: the client's SYN
(unlabelled: analysis, admission, a server, a label pair, both labels installed), the server's SYN-ACK (labelled,
switched, reported: the first response time), the client's ACK with its request (labelled, reported: the handshake
completes and the request is seen) and the server's first response byte (labelled, reported: the request's
response time). Per phase and per frame:

* Python calls: the Python functions entered (``sys.setprofile`` ``call`` events, the benchmark's feed loop left
  out) and the calls to C functions; the same on every run, whatever the machine's load: the "visits" a frame
  costs;
* CPU time (``time.process_time``): the median over ``--rounds`` rounds, each on a fresh balancer.

Run ``PYTHONPATH=<checkout>/src python bench/phases.py [--sessions N] [--rounds R] [--json]``; any checkout's
``src`` can be measured with this script (it uses ``Balancer`` and the frame builders of ``bench/`` only).
``--upto PHASE`` feeds the phases up to PHASE once and exits: under ``valgrind --tool=callgrind`` the difference
between two such runs, divided by the sessions, is a phase's instructions per frame.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import Frames, feed, open_sessions, server_frames, syn_acks
from frames import ACK, PSH, SYN, build, make_config
from mplslb.balancer import Balancer

PHASES = ("SYN", "SYN-ACK", "ACK + request", "first response byte")
LIVE = 1_000
NOW = 2.0
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def responses(balancer: Balancer, flows: range) -> Frames:
    """Each flow's server sending its first response bytes under the session's S2C label."""
    return server_frames(balancer, flows, seq=5001, ack=1025, flags=ACK | PSH, payload=RESPONSE)


def phase_frames(sessions: int) -> list[Frames]:
    """The four phases' frames, built on a balancer of their own (a fresh one allocates the same labels and picks
    the same servers, so they fit every fresh balancer)."""
    b = fresh()
    flows = range(LIVE, LIVE + sessions)
    syns = build(flows, flags=SYN)
    feed(b, syns, NOW)
    acks = syn_acks(b, flows)
    feed(b, acks, NOW)
    requests = build(flows, labelled=True)  # the client's ACK carrying its request
    feed(b, requests, NOW)
    return [syns, acks, requests, responses(b, flows)]


def fresh() -> Balancer:
    b = Balancer(make_config())
    open_sessions(b, range(0, LIVE))
    return b


def count_calls(b: Balancer, frames: Frames) -> tuple[int, int]:
    """(Python calls, C calls) made while ``receive`` takes ``frames`` one by one."""
    counts = {"call": 0, "c_call": 0}

    def profile(_frame: FrameType, event: str, _arg: object) -> None:
        if event in counts:
            counts[event] += 1

    receive = b.receive
    sys.setprofile(profile)
    try:
        for port, frame in frames:
            receive(port, frame, NOW)
    finally:
        sys.setprofile(None)
    # Each receive() is itself a Python call from the loop: counted, as a driver's call is.
    return counts["call"], counts["c_call"]


def measure(sessions: int, rounds: int) -> dict[str, Any]:
    frames = phase_frames(sessions)
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for _ in range(rounds):
        b = fresh()
        for name, part in zip(PHASES, frames, strict=True):
            t0 = time.process_time()
            feed(b, part, NOW)
            times[name].append((time.process_time() - t0) / len(part))
    b = fresh()
    calls: dict[str, tuple[int, int]] = {}
    for name, part in zip(PHASES, frames, strict=True):
        calls[name] = count_calls(b, part)
    state = b.stats().sessions_by_state
    return {
        "sessions": sessions,
        "rounds": rounds,
        "states_after": state,
        "phases": {
            name: {
                "python_calls_per_frame": calls[name][0] / sessions,
                "c_calls_per_frame": calls[name][1] / sessions,
                "cpu_us_per_frame": statistics.median(times[name]) * 1e6,
                "cpu_us_runs": [t * 1e6 for t in times[name]],
            }
            for name in PHASES
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--upto",
        choices=("none", *PHASES),
        help="only feed the phases up to this one (none: only build the frames and the balancer), once, untimed: "
        "for instruction counts under valgrind, each phase's the difference between two such runs",
    )
    args = parser.parse_args(argv)
    if args.upto is not None:
        frames = phase_frames(args.sessions)
        b = fresh()
        for name, part in zip(PHASES, frames, strict=True):
            if args.upto == "none":
                break
            feed(b, part, NOW)
            if name == args.upto:
                break
        return 0
    result = measure(args.sessions, args.rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, row in result["phases"].items():
        print(
            f"{name}: {row['python_calls_per_frame']:.1f} Python calls, {row['c_calls_per_frame']:.1f} C calls, "
            f"{row['cpu_us_per_frame']:.2f} us CPU per frame"
        )
    print(f"sessions after: {result['states_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
