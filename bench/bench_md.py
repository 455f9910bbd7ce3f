"""Metadata-exchange benchmark: how fast an agent gets a peer's metadata, and drops a dead one.

    python bench/bench_md.py [--iters 50] [--ttl 2] [--kills 3] [--agents 1000] [--out FILE]

Cases (p50 and p90 over ``--iters`` runs; UCX on both sides, the target has 16 registrations):

(a) fetch of a peer's full metadata over the side channel on loopback: the target listens,
    the initiator fetches by address and waits until it is loaded; removed between runs;
(b) the same by name from etcd, the key present;
(c) by name from etcd, just published: the fetch is started (and waits), then the target
    publishes; timed from the publish call until the metadata is loaded; between runs the
    target withdraws its keys and the initiator forgets it;
(d) like (b) with ``--agents`` agents' metadata in etcd (fillers: real sealed metadata blobs
    under their own names, published with one EtcdStore per thread);
(e) SIGKILL of a peer process published in etcd (lease TTL ``--ttl``): time until the survivor,
    polling ``check_remote`` every 10 ms, has dropped it; target TTL + 1 s.

The real NIXL (``pip install --no-deps nixl-cu13==1.5.1 nixl==1.5.1``) runs the same cases in
a subprocess (the two UCX builds are not loaded into one process): its side channel
(``nixl_agent_config(True, True, 0)`` on both sides, ``fetch_remote_metadata(name, ip, port)``
then polling ``check_remote_metadata``) and, when its wheel has etcd, its etcd path
(``NIXL_ETCD_ENDPOINTS``, its own namespace). etcd is one
:class:`nixl_core.testing.etcd.EtcdServer` on loopback, shared by both.

The table goes to stdout (and ``--out``); ``bench/results/md_cpu.txt`` is
``python bench/bench_md.py --out bench/results/md_cpu.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

NREGS, REG = 16, 64 << 10
#: Poll interval of check_remote loops (the fast cases), seconds.
SPIN = 0.0001
#: Poll interval when waiting for a dead peer to be dropped (as the discovery test does).
DROP_POLL = 0.01
#: How long the just-published case lets the fetch settle into its wait before publishing.
SETTLE = 0.05
OURS_NS = "/nixl-bench-md/"
NIXL_NS = "/nixl-bench-md-nixl/"
TARGETS = {"a": (1.0, "ms"), "b": (5.0, "ms"), "d": (5.0, "ms")}


def _pct(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "p50": s[len(s) // 2],
        "p90": s[int(0.9 * (len(s) - 1))],
        "max": s[-1],
        "n": float(len(s)),
    }


def _spin(cond: Callable[[], bool], timeout: float, interval: float = SPIN) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _gone(agent: Any, name: str) -> bool:
    return not agent.check_remote(name)


def _nixl_loaded(agent: Any, name: str) -> bool:
    return bool(agent.check_remote_metadata(name))


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    buf = np.zeros(NREGS * REG, np.uint8)
    rows = np.empty((NREGS, 3), np.uint64)
    rows[:, 0] = np.uint64(buf.ctypes.data) + np.arange(NREGS, dtype=np.uint64) * np.uint64(REG)
    rows[:, 1] = REG
    rows[:, 2] = 0
    return buf, rows


# ====================================================================== peers (subprocesses)
def peer_main(kind: str, name: str, endpoint: str, ttl: float, namespace: str) -> None:
    """A peer that publishes itself in etcd, says ``ready`` and waits to be killed."""
    _buf, rows = _buffers()  # _buf stays alive: this function never returns
    if kind == "ours":
        from nixl_core import Agent, AgentConfig

        cfg = AgentConfig(
            backends=("UCX",), md_store=f"etcd://{endpoint}", md_namespace=namespace, md_ttl=ttl
        )
        agent = Agent(name, cfg)
        agent.register(rows, "DRAM")
        agent.publish_metadata().wait(20)
    else:
        os.environ["NIXL_ETCD_ENDPOINTS"] = f"http://{endpoint}"
        os.environ["NIXL_ETCD_NAMESPACE"] = namespace
        from nixl._api import nixl_agent, nixl_agent_config

        nagent = nixl_agent(name, nixl_agent_config(True, False, 0))
        nagent.register_memory(rows, "DRAM")
        nagent.send_local_metadata()
    print("ready", flush=True)
    while True:
        time.sleep(60)


def _spawn_peer(kind: str, name: str, endpoint: str, ttl: float, ns: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--peer", kind, name, endpoint, str(ttl), ns]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    for _ in range(1000):  # NIXL's Python logger may print to stdout first
        line = proc.stdout.readline()
        if not line or line.strip() == "ready":
            break
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise SystemExit(f"{kind} peer {name} did not start (exit {proc.poll()})")
    return proc


def _kill(proc: subprocess.Popen[str]) -> float:
    os.kill(proc.pid, signal.SIGKILL)
    t = time.monotonic()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return t


# ====================================================================== nixl-py
def _fillers(endpoint: str, namespace: str, template: bytes, count: int, ttl: float) -> list[Any]:
    """Publish ``count`` agents' metadata, each a real sealed blob under its own name.

    Returns the stores holding their leases (close them to withdraw the fillers).
    """
    import attrs

    from nixl_core.discovery.etcd import EtcdStore
    from nixl_core.discovery.sealed import Kind, named_payload, seal
    from nixl_core.discovery.store import label_key
    from nixl_core.metadata import AgentMetadata, new_incarnation

    md = AgentMetadata.decode(template)
    nthreads = 4
    stores = [EtcdStore(endpoint, namespace=namespace, ttl=ttl) for _ in range(nthreads)]

    def fill(k: int) -> None:
        store = stores[k]
        for i in range(k, count, nthreads):
            name = f"filler-{i:05d}"
            inc = new_incarnation()
            blob = attrs.evolve(md, name=name, incarnation=inc).encode()
            ann = label_key(namespace, name, "").encode()
            val = label_key(namespace, name, "metadata").encode()
            store.publish(name, "", seal(Kind.ANNOUNCE, named_payload(inc, name), None, ann))
            store.publish(name, "metadata", seal(Kind.VALUE, blob, None, val))

    threads = [threading.Thread(target=fill, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stores


def bench_ours(
    endpoint: str, args: argparse.Namespace, backend: str = "UCX", only_ab: bool = False
) -> dict[str, Any]:
    """Cases (a)-(e) with nixl-py agents in this process (and peer processes for (e)).

    With ``only_ab`` just (a) and (b): the LOOPBACK reference run, which loads a peer without
    making a UCX endpoint (what the metadata path costs by itself).
    """
    from nixl_core import Agent, AgentConfig

    res: dict[str, Any] = {}
    url = f"etcd://{endpoint}"
    common = {"backends": (backend,), "md_store": url, "md_namespace": OURS_NS, "md_ttl": args.ttl}
    _buf, rows = _buffers()  # registered: kept alive until the agents close
    tgt = Agent("md-target", AgentConfig(listen=True, **common))
    ini = Agent("md-initiator", AgentConfig(**common))
    try:
        tgt.register(rows, "DRAM")
        port = tgt.listen_port
        assert port is not None

        # (a) side channel
        xs = []
        for i in range(args.iters + 2):
            t0 = time.perf_counter()
            ini.fetch_metadata("md-target", addr=("127.0.0.1", port), wait=True)
            dt = time.perf_counter() - t0
            ini.remove_remote("md-target")
            if i >= 2:
                xs.append(dt * 1e3)
        res["a"] = _pct(xs)

        # (b) etcd, key present
        tgt.publish_metadata().wait(10)

        def fetch_present() -> list[float]:
            out = []
            for i in range(args.iters + 2):
                t0 = time.perf_counter()
                ini.fetch_metadata("md-target", wait=True)
                dt = time.perf_counter() - t0
                ini.remove_remote("md-target")
                if i >= 2:
                    out.append(dt * 1e3)
            return out

        res["b"] = _pct(fetch_present())
        if only_ab:
            return res

        # (c) etcd, just published
        xs = []
        for i in range(args.iters + 2):
            tgt.invalidate_metadata().wait(10)
            op = ini.fetch_metadata("md-target", timeout=10)
            time.sleep(SETTLE)
            if op.done():
                raise SystemExit(f"(c): the fetch ended before the publish: {op.error}")
            t0 = time.perf_counter()
            tgt.publish_metadata()
            if not _spin(lambda: ini.check_remote("md-target"), 10):
                raise SystemExit("(c): the metadata never loaded")
            dt = time.perf_counter() - t0
            ini.remove_remote("md-target")
            if i >= 2:
                xs.append(dt * 1e3)
        res["c"] = _pct(xs)

        # (d) among many agents
        t0 = time.perf_counter()
        stores = _fillers(endpoint, OURS_NS, tgt.metadata(), args.agents - 1, max(args.ttl, 30))
        res["d_fill_s"] = time.perf_counter() - t0
        try:
            res["d"] = _pct(fetch_present())
        finally:
            for s in stores:
                s.close()

        # (e) SIGKILL -> dropped
        xs = []
        for k in range(args.kills):
            name = f"md-victim-{k}"
            peer = _spawn_peer("ours", name, endpoint, args.ttl, OURS_NS)
            try:
                ini.fetch_metadata(name, wait=True, timeout=10)
            except BaseException:
                _kill(peer)
                raise
            killed = _kill(peer)
            if not _spin(functools.partial(_gone, ini, name), args.ttl + 10, DROP_POLL):
                raise SystemExit(f"(e): {name} never dropped")
            xs.append((time.monotonic() - killed) * 1e3)
        res["e"] = _pct(xs)
    finally:
        ini.close()
        tgt.close()
    return res


# ====================================================================== NIXL (subprocess)
def _nixl_listen_port(agent_fn: Callable[[], Any]) -> tuple[Any, int]:
    """Create a NIXL agent with a listener on port 0; read its port from NIXL's log line.

    NIXL logs from C++ straight to fd 2, so fd 2 goes to a file while the agent starts.
    """
    import tempfile

    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            agent = agent_fn()
            deadline = time.monotonic() + 5
            while True:
                log.seek(0)
                text = log.read().decode(errors="replace")
                m = re.search(r"MD listener is listening on port (\d+)", text)
                if m is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if m is None:
        raise RuntimeError(f"no 'MD listener is listening on port' line in NIXL's log:\n{text}")
    return agent, int(m.group(1))


def nixl_main(endpoint: str, iters: int, agents: int, ttl: float) -> dict[str, Any]:
    """The same cases through NIXL's Python API (run in its own process)."""
    os.environ["NIXL_ETCD_ENDPOINTS"] = f"http://{endpoint}"
    os.environ["NIXL_ETCD_NAMESPACE"] = NIXL_NS
    os.environ["NIXL_LOG_LEVEL"] = "INFO"  # for the listener's port line
    import nixl
    from nixl._api import nixl_agent, nixl_agent_config

    res: dict[str, Any] = {"version": getattr(nixl, "__version__", None) or _dist("nixl-cu13")}
    _buf, rows = _buffers()  # registered: kept alive until the agents close
    tgt, port = _nixl_listen_port(lambda: nixl_agent("nx-target", nixl_agent_config(True, True, 0)))
    ini = nixl_agent("nx-initiator", nixl_agent_config(True, True, 0))
    tgt.register_memory(rows, "DRAM")

    def present() -> bool:
        return bool(ini.check_remote_metadata("nx-target"))

    def forget() -> None:
        ini.remove_remote_agent("nx-target")
        _spin(lambda: not present(), 5)

    def timed(start: Callable[[], None], what: str) -> list[float]:
        out = []
        for i in range(iters + 2):
            t0 = time.perf_counter()
            start()
            if not _spin(present, 10):
                raise RuntimeError(f"NIXL {what}: metadata never loaded")
            dt = time.perf_counter() - t0
            forget()
            if i >= 2:
                out.append(dt * 1e3)
        return out

    # (a) side channel
    res["a"] = _pct(
        timed(lambda: ini.fetch_remote_metadata("nx-target", "127.0.0.1", port), "side channel")
    )
    # (b) etcd, key present
    try:
        tgt.send_local_metadata()
    except Exception as exc:
        res["etcd"] = f"{type(exc).__name__}: {exc}"
        return res
    if not _spin(lambda: _etcd_has(endpoint, NIXL_NS, "nx-target"), 10, 0.01):
        res["etcd"] = "send_local_metadata() stored nothing in etcd"
        return res
    res["etcd"] = "ok"
    res["b"] = _pct(timed(lambda: ini.fetch_remote_metadata("nx-target"), "etcd"))

    # (c) just published. First as nixl-py runs it (the same target withdrawn and published
    # again); NIXL keeps the watcher its earlier fetches registered for that name and the new
    # fetch then never loads, so the timed runs use a fresh publisher name each.
    tgt.invalidate_local_metadata()
    _spin(lambda: not _etcd_has(endpoint, NIXL_NS, "nx-target"), 5, 0.001)
    forget()
    ini.fetch_remote_metadata("nx-target")
    time.sleep(SETTLE)
    tgt.send_local_metadata()
    if not _spin(present, 5):
        res["c_same_name"] = "never loaded in 5 s"
    xs = []
    for i in range(iters + 2):
        name = f"nx-late-{i}"
        pub = nixl_agent(name, nixl_agent_config(True, False, 0))
        pub.register_memory(rows, "DRAM")
        ini.fetch_remote_metadata(name)
        time.sleep(SETTLE)
        if ini.check_remote_metadata(name):
            raise RuntimeError("NIXL (c): loaded before the publish")
        t0 = time.perf_counter()
        pub.send_local_metadata()
        if not _spin(functools.partial(_nixl_loaded, ini, name), 10):
            res["c_error"] = "a fetch started before the publish never loaded it"
            break
        dt = time.perf_counter() - t0
        ini.remove_remote_agent(name)
        pub.invalidate_local_metadata()
        del pub
        if i >= 2:
            xs.append(dt * 1e3)
    if xs:
        res["c"] = _pct(xs)
    tgt.send_local_metadata()

    # (d) among many agents: fillers are copies of one real NIXL agent's metadata
    t0 = time.perf_counter()
    _nixl_fillers(endpoint, NIXL_NS, bytes(tgt.get_agent_metadata()), agents - 1)
    res["d_fill_s"] = time.perf_counter() - t0
    res["d"] = _pct(timed(lambda: ini.fetch_remote_metadata("nx-target"), "etcd among many"))

    # (e) SIGKILL -> dropped? NIXL's keys have no lease
    name = "nx-victim"
    peer = _spawn_peer("nixl", name, endpoint, ttl, NIXL_NS)
    ini.fetch_remote_metadata(name)
    if not _spin(lambda: bool(ini.check_remote_metadata(name)), 10):
        _kill(peer)
        raise RuntimeError("NIXL (e): the victim's metadata never loaded")
    killed = _kill(peer)
    wait = ttl + 3
    dropped = _spin(lambda: not ini.check_remote_metadata(name), wait, DROP_POLL)
    res["e"] = {"dropped_s": time.monotonic() - killed if dropped else None, "waited_s": wait}
    res["e_keys_left"] = _etcd_has(endpoint, NIXL_NS, name)
    return res


def _etcd_client(endpoint: str) -> Any:
    import etcd3gw

    host, _, port = endpoint.rpartition(":")
    return etcd3gw.Etcd3Client(host=host, port=int(port), api_path="/v3/")


def _etcd_has(endpoint: str, namespace: str, agent: str) -> bool:
    key = f"{namespace}/{agent}/metadata"
    return bool(_etcd_client(endpoint).get(key))


def _nixl_fillers(endpoint: str, namespace: str, blob: bytes, count: int) -> None:
    client = _etcd_client(endpoint)
    for i in range(count):
        name = f"nx-filler-{i:05d}"
        client.put(f"{namespace}/{name}/metadata", blob)


def _dist(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def run_nixl(endpoint: str, args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """NIXL's cases in a subprocess; (results, why not) when it cannot run."""
    try:
        import importlib.util

        if importlib.util.find_spec("nixl") is None:
            return None, "NIXL not installed (pip install --no-deps nixl-cu13==1.5.1 nixl==1.5.1)"
    except (ImportError, ValueError) as exc:
        return None, f"NIXL not importable: {exc}"
    cmd = [sys.executable, __file__, "--nixl-worker", endpoint]
    cmd += ["--iters", str(args.iters), "--agents", str(args.agents), "--ttl", str(args.ttl)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"NIXL run failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out, ""


# ====================================================================== report
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far (0, 0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])


def _fmt(t: dict[str, float] | None, unit: str = "ms", hi: str = "p90") -> str:
    if t is None:
        return "n/a"
    scale = 1e-3 if unit == "s" else 1.0
    return f"{t['p50'] * scale:.3g} / {t[hi] * scale:.3g} {unit}"


@contextlib.contextmanager
def _tee(path: str | None) -> Iterator[Callable[[str], None]]:
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    yield out
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def report(
    ours: dict[str, Any],
    ref: dict[str, Any],
    theirs: dict[str, Any] | None,
    why: str,
    args: argparse.Namespace,
    steal: float | None,
) -> None:
    """Print the table (and save it with ``--out``)."""
    with _tee(args.out) as out:
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        out(f"# date: {now}")
        out(
            f"# machine: {os.cpu_count()} cpus ({_cpu_model()}), kernel {platform.release()}, "
            f"Python {platform.python_version()}"
        )
        cmd = " ".join(["python", *[os.path.relpath(sys.argv[0]), *sys.argv[1:]]])
        out(f"# command: {cmd}")
        if steal is not None:
            out(f"# CPU steal during the run: {steal:.0%} of all CPU time (a shared VM: noisy)")
        from nixl_core import __version__

        out(
            f"nixl-py core {__version__} (UCX backend) vs NIXL {theirs['version'] if theirs else why}"
        )
        out(
            f"p50 / p90 over {args.iters} runs; target side has {NREGS} registrations; "
            f"{args.agents} agents in etcd for (d); TTL {args.ttl:g} s, {args.kills} kills for (e) "
            "(p50 / max)"
        )
        out("ratio = NIXL p50 / nixl-py p50 (> 1: nixl-py is faster)")
        out("")
        cases = [
            ("a", "(a) side channel fetch (loopback)"),
            ("b", "(b) etcd fetch, key present"),
            ("c", "(c) etcd fetch, just published"),
            ("d", f"(d) etcd fetch among {args.agents} agents"),
        ]
        head = f"{'case':40s} {'nixl-py':>20s} {'NIXL':>22s} {'ratio':>8s}  target"
        out(head)
        out("-" * len(head))
        notes: list[str] = []
        for key, label in cases:
            mine = ours.get(key)
            other = theirs.get(key) if theirs else None
            cell = _fmt(other)
            if theirs and other is None:
                if key != "a" and theirs.get("etcd") != "ok":
                    cell = "NOT_SUPPORTED" if "SUPPORT" in str(theirs.get("etcd")) else "failed"
                    notes.append(f"NIXL etcd: {theirs.get('etcd')}")
                elif key == "c" and "c_error" in theirs:
                    cell = "never loaded"
                    notes.append(f"NIXL (c): {theirs['c_error']}")
            if key == "c" and theirs and "c_same_name" in theirs:
                notes.append(
                    f"NIXL (c): with the same target name as nixl-py's runs (withdrawn, then "
                    f"published again) the fetch {theirs['c_same_name']} (the watcher of its "
                    "earlier fetches stays registered); its figure is with a fresh name per run"
                )
            ratio = f"{other['p50'] / mine['p50']:.1f}x" if mine and other else "n/a"
            tgt = ""
            if key in TARGETS and mine:
                limit, unit = TARGETS[key]
                ok = "ok" if mine["p50"] <= limit else "MISSED"
                tgt = f"p50 <= {limit:g} {unit}: {ok}"
            out(f"{label:40s} {_fmt(mine):>20s} {cell:>22s} {ratio:>8s}  {tgt}")
        e = ours.get("e")
        limit = args.ttl + 1.0
        e_nixl = "n/a"
        if theirs and isinstance(theirs.get("e"), dict):
            d = theirs["e"]
            if d["dropped_s"] is None:
                e_nixl = f"not dropped in {d['waited_s']:g} s"
                left = "its keys still in etcd" if theirs.get("e_keys_left") else "keys gone"
                notes.append(
                    f"NIXL (e): a SIGKILLed NIXL agent is never dropped through etcd ({left}: "
                    "NIXL puts its keys without a lease); only a failed transfer drops it"
                )
            else:
                e_nixl = f"{d['dropped_s']:.3g} s"
        ok = "ok" if e and e["max"] / 1e3 <= limit else "MISSED"
        out(
            f"{'(e) SIGKILL -> survivor drops peer':40s} {_fmt(e, 's', 'max'):>20s} {e_nixl:>22s} "
            f"{'n/a':>8s}  <= TTL + 1 = {limit:g} s: {ok}"
        )
        for key, label in cases[:2]:
            name = label.replace(f"({key}) ", f"({key}') ") + ", LOOPBACK"
            out(f"{name:40s} {_fmt(ref.get(key)):>20s}")
        out("")
        out(
            "(a') and (b'): nixl-py with the LOOPBACK backend, whose load makes no UCX endpoint: "
            "the metadata path alone"
        )
        out(f"(d) fillers published in {ours.get('d_fill_s', 0):.1f} s (nixl-py)")
        if theirs and "d_fill_s" in theirs:
            out(f"    and {theirs['d_fill_s']:.1f} s (NIXL: plain puts of one agent's blob)")
        for n in notes:
            out(n)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its helper roles)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--ttl", type=float, default=2.0, help="lease TTL for case (e), s")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--against", choices=["nixl", "none"], default="nixl")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--peer", nargs=5, metavar=("KIND", "NAME", "ENDPOINT", "TTL", "NS"))
    ap.add_argument("--nixl-worker", metavar="ENDPOINT")
    args = ap.parse_args(argv)
    if args.peer:
        kind, name, endpoint, ttl, ns = args.peer
        peer_main(kind, name, endpoint, float(ttl), ns)
        return 0
    if args.nixl_worker:
        res = nixl_main(args.nixl_worker, args.iters, args.agents, args.ttl)
        print(json.dumps(res), flush=True)
        return 0
    from nixl_core.testing.etcd import EtcdServer

    s0, t0 = _cpu_ticks()
    with EtcdServer() as etcd:
        ours = bench_ours(etcd.endpoint, args)
        ref = bench_ours(etcd.endpoint, args, "LOOPBACK", only_ab=True)
        theirs, why = run_nixl(etcd.endpoint, args) if args.against == "nixl" else (None, "off")
    s1, t1 = _cpu_ticks()
    steal = (s1 - s0) / (t1 - t0) if t1 > t0 else None
    report(ours, ref, theirs, why, args, steal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
