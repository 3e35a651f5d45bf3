"""Restarting the balancer daemon with kept state (``[state] persist = true``) loses no session: in the lab, a
rate-limited 20 MB download and wrk's keep-alive connections run across a SIGTERM + start and across a SIGKILL +
start, without and with the kernel offload, and with the whole datapath in the kernel (super-packets switched by
the tc program, new sessions' SYNs taken under tickets; root; slow).

The download's bytes are checked (sha256), wrk must report no connect, read or write error (its timeouts are
printed: a request in flight during the restart may wait for TCP's retransmission), and a new connection works
right after the new daemon is ready (the number of tries and the time are printed, not asserted).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mplslb.lab import VIP4, Lab, LabSpec
from mplslb.offload.xdp import PIN_ROOT

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, packet sockets and bpf(2)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "wrk")),
        reason="nginx, curl and wrk are needed (make test installs them)",
    ),
]

ROOT = Path("/run/mplslb-test-labs")
SIZE = 20 * 1024 * 1024
RATE = "2M"  # bytes per second: the download lasts about 10 s, across the restart
WRK_AFTER = 3.0  # seconds wrk goes on after the new daemon is ready (then it is stopped with SIGINT and reports)
WRK_MAX = 60  # its duration if never stopped
#: wrk with one connection per thread: each thread reports when its connection last got a response (epoch seconds),
#: so a connection the restart broke (it would hang: no error, only timeouts) shows as one that stopped before.
WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body) last = os.time() end
function done(summary, latency, requests)
  for i, thread in ipairs(threads) do io.write(string.format("last_response %d %d\\n", i, thread:get("last") or 0)) end
end
"""
RESTART_AFTER = 2.0  # seconds into the transfers
NEW_CURL_TRIES = 20
STOP_TIMEOUT = 20.0


class PersistentLab(Lab):
    """The lab with the balancer's state kept in the lab's directory (and its pins under the lab's name)."""

    def balancer_toml(self) -> str:
        return super().balancer_toml() + (
            f'\n[state]\npersist = true\ndir = "{self.dir / "state"}"\ninstance = "{self.spec.name}"\n'
        )

    def restart_balancer(self, sig: signal.Signals) -> float:
        """Stop the daemon with ``sig``, start a new one; returns when it is ready (monotonic time)."""
        proc = self.procs["balancer"]
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the daemon did not stop on {sig.name}: {self.log('balancer')[-3000:]}") from None
        shutil.copy(self.dir / "balancer.log", self.dir / f"balancer-{proc.pid}.log")
        self.previous_log = self.log("balancer")
        (self.dir / "balancer.ready").unlink(missing_ok=True)
        self._start_balancer()
        return time.monotonic()


def unpin(name: str) -> None:
    pins = PIN_ROOT / name
    if pins.is_dir():
        for entry in pins.iterdir():
            entry.unlink()
        pins.rmdir()


def up_with_a_big_file(lab: Lab) -> None:
    """Start ``lab`` with the same random file of :data:`SIZE` on every server (its digest kept as ``lab.digest``)."""
    lab.up()
    blob = os.urandom(SIZE)
    for j in range(lab.spec.servers):
        (lab.dir / lab.server_name(j) / "www" / "big.bin").write_bytes(blob)
    lab.digest = hashlib.sha256(blob).hexdigest()  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=["none", "kernel", "kernel+gso+syn"])
def lab(request: pytest.FixtureRequest) -> Iterator[PersistentLab]:
    offload, *keys = request.param.split("+")
    if offload == "kernel" and shutil.which("clang") is None:
        pytest.skip("clang is needed to build the XDP program")
    name = f"r{'a' if keys else 'k' if offload == 'kernel' else 'n'}{os.getpid() % 100000}"
    spec = LabSpec(name=name, clients=2, servers=2, offload=offload, offload_gso="gso" in keys,
                   offload_syn="syn" in keys)  # fmt: skip
    the_lab = PersistentLab(spec, root=ROOT)
    try:
        up_with_a_big_file(the_lab)
        yield the_lab
    finally:
        problems = the_lab.down()
        unpin(name)
        assert problems == []


def in_ns(lab: Lab, ns: str, argv: list[str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as log:
        return subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", "--", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_sessions_survive_a_restart(lab: PersistentLab, sig: signal.Signals) -> None:
    target = lab.dir / "download.bin"
    target.unlink(missing_ok=True)
    script = lab.dir / "last.lua"
    script.write_text(WRK_SCRIPT)
    curl = in_ns(
        lab,
        lab.client_ns(0),
        ["curl", "-s", "-S", "--limit-rate", RATE, "--max-time", "60", "-o", str(target), "-w", "%{http_code}",
         f"http://{VIP4}/big.bin"],
        lab.dir / "curl.out",
    )  # fmt: skip
    wrk = in_ns(
        lab,
        lab.client_ns(1),
        ["wrk", "-t4", "-c4", f"-d{WRK_MAX}s", "--timeout", "5s", "-s", str(script), f"http://{VIP4}/"],
        lab.dir / "wrk.out",
    )
    try:
        time.sleep(RESTART_AFTER)
        assert curl.poll() is None and wrk.poll() is None, "the transfers ended before the restart"
        stopped = time.monotonic()
        ready = lab.restart_balancer(sig)
        ready_wall = int(time.time())
        tries, first_ok = 0, None
        while tries < NEW_CURL_TRIES and first_ok is None:
            tries += 1
            if lab.curl(0, 1, timeout=10)[0]:
                first_ok = time.monotonic()
        assert first_ok is not None, f"no new connection worked in {tries} tries: {lab.log('balancer')[-2000:]}"
        time.sleep(max(0.0, ready + WRK_AFTER - time.monotonic()))
        wrk.send_signal(signal.SIGINT)  # nsenter exec'd wrk: this is wrk, which stops and reports
        wrk.wait(30)
        curl.wait(70)
    finally:
        for proc in (curl, wrk):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = lab.log("balancer")
    stop = re.search(r"event=stopped seconds=([\d.]+)", lab.previous_log)  # SIGTERM: the old daemon's close
    adopted = re.search(r"event=state_adopted sessions=(\d+) live=(\d+)[^\n]*", log)
    wrk_out = (lab.dir / "wrk.out").read_text()
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk_out)
    requests = re.search(r"(\d+) requests in", wrk_out)
    print(
        f"\n{lab.spec.offload}{' offload_gso' * lab.spec.offload_gso}{' offload_syn' * lab.spec.offload_syn} "
        f"{sig.name}: "
        f"close took {stop.group(1) + ' s' if stop else '-'}, "
        f"stopped -> ready {ready - stopped:.2f} s; new connection after "
        f"{tries} tries, {first_ok - ready:.2f} s after ready; adopted {adopted.group(0) if adopted else None}; "
        f"wrk {requests.group(1) if requests else '?'} requests, "
        f"socket errors (connect, read, write, timeout) {socket_errors.groups() if socket_errors else 'none'}"
    )
    assert adopted is not None, log[-3000:]
    if lab.spec.offload == "kernel":  # the program, its map and links were taken over, not loaded afresh
        assert "event=offload_adopted" in log, log[-3000:]
    assert int(adopted.group(2)) >= 5, f"the download's and wrk's sessions were live at the restart: {log[-3000:]}"
    assert (lab.dir / "curl.out").read_text().strip() == "200", (lab.dir / "curl.out").read_text()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == lab.digest  # type: ignore[attr-defined]
    assert requests is not None and int(requests.group(1)) > 0, wrk_out
    last = [int(t) for t in re.findall(r"^last_response \d+ (\d+)$", wrk_out, re.MULTILINE)]
    assert len(last) == 4 and min(last) >= ready_wall, f"a connection stopped at the restart: {last}, {ready_wall}"
    if socket_errors is not None:
        connect, read, write, _timeouts = (int(g) for g in socket_errors.groups())
        assert (connect, read, write) == (0, 0, 0), wrk_out
    assert "Non-2xx" not in wrk_out, wrk_out


@pytest.fixture(scope="module")
def keep_lab() -> Iterator[Lab]:
    if shutil.which("clang") is None:
        pytest.skip("clang is needed to build the kernel datapath")
    name = f"rg{os.getpid() % 100000}"
    the_lab = Lab(LabSpec(name=name, clients=2, servers=2, offload="kernel", agent_keep=True), root=ROOT)
    try:
        up_with_a_big_file(the_lab)
        yield the_lab
    finally:
        namespaces = list(the_lab.state.namespaces)
        problems = the_lab.down()
        assert problems == []
        assert not any((PIN_ROOT.parent / f"agent-{role}-{ns}-eth0").exists() for ns in namespaces
                       for role in ("server", "client"))  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_agents_that_keep_their_kernel_datapath_restart_under_traffic(keep_lab: Lab, sig: signal.Signals) -> None:
    """Every agent (both servers', both clients') restarted one after the other with ``--keep`` while a download and
    wrk's keep-alive connections run: each new agent takes its kept datapath over (its flows, so the replies of the
    sessions already open go on being labelled while it restarts), the download comes whole and no connection
    breaks."""
    lab = keep_lab
    target = lab.dir / "download.bin"
    target.unlink(missing_ok=True)
    script = lab.dir / "last.lua"
    script.write_text(WRK_SCRIPT)
    curl = in_ns(lab, lab.client_ns(0), ["curl", "-s", "-S", "--limit-rate", RATE, "--max-time", "60", "-o",
                                         str(target), "-w", "%{http_code}", f"http://{VIP4}/big.bin"],
                 lab.dir / "curl.out")  # fmt: skip
    wrk = in_ns(lab, lab.client_ns(1), ["wrk", "-t4", "-c4", f"-d{WRK_MAX}s", "--timeout", "5s", "-s", str(script),
                                        f"http://{VIP4}/"], lab.dir / "wrk.out")  # fmt: skip
    keys = [f"agent-{lab.server_name(j)}" for j in range(lab.spec.servers)] + ["agent-c1", "agent-c2"]
    try:
        time.sleep(RESTART_AFTER)
        assert curl.poll() is None and wrk.poll() is None, "the transfers ended before the restarts"
        for key in keys:
            lab.restart_agent(key, sig)
        restarted = int(time.time())
        kept = {name: status.get("kept") for name, status in lab.agent_status().items()}
        assert kept == dict.fromkeys(("c1", "c2", lab.server_name(0), lab.server_name(1)), "taken over"), kept
        assert lab.curl(0, 1, timeout=10)[0], "a new connection after the restarts"
        time.sleep(WRK_AFTER)
        wrk.send_signal(signal.SIGINT)
        wrk.wait(30)
        curl.wait(70)
    finally:
        for proc in (curl, wrk):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for key in keys:
        log = (lab.dir / f"{key}.log").read_text()
        assert "kept=taken_over" in log and "event=datapath_adopted" in log, log[-2000:]
    wrk_out = (lab.dir / "wrk.out").read_text()
    print(f"\nagents {sig.name}: wrk {wrk_out.strip().splitlines()[-8:]}")
    assert (lab.dir / "curl.out").read_text().strip() == "200", (lab.dir / "curl.out").read_text()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == lab.digest  # type: ignore[attr-defined]
    last = [int(t) for t in re.findall(r"^last_response \d+ (\d+)$", wrk_out, re.MULTILINE)]
    assert len(last) == 4 and min(last) >= restarted, f"a connection stopped at the restarts: {last}, {restarted}"
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk_out)
    if socket_errors is not None:
        connect, read, write, _timeouts = (int(g) for g in socket_errors.groups())
        assert (connect, read, write) == (0, 0, 0), wrk_out
    assert "Non-2xx" not in wrk_out, wrk_out
