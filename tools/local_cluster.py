"""A real multi-node Ray cluster on one machine, for tests and for trying multi-node
deployments without several hosts.

Every node is its own ``ray start --block`` process (its own raylet, object store, worker
processes and temp dir) with its own IP on the loopback range (127.0.0.2, 127.0.0.3, ...:
Linux routes all of 127.0.0.0/8 to ``lo``), its own ``--num-cpus`` and, for worker nodes,
the node label ``raymoe.io/node=<n>`` that node pinning selects on (``cluster/multinode.py``).

Token authentication (on by default for ``ray start --head`` in Ray 2.60) uses a fresh
token that is passed to every node and driver in the environment (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN``); nothing is written to ``~/.ray``.

``stop()`` ends only the processes this object started: SIGTERM to each ``ray start
--block`` (it tears its node down), then SIGKILL to each node's process group, then to any
process whose command line still names this cluster's private temp dir. It never runs
``ray stop``, which would stop every Ray on the machine.

    python -m tools.local_cluster --workers 2 --cpus 2      # prints the address and env; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_LABEL = "raymoe.io/node"


class LocalClusterError(RuntimeError):
    """A node did not start; carries the node's name and the tail of its log."""

    def __init__(self, node: str, reason: str, log_tail: str):
        self.node, self.reason, self.log_tail = node, reason, log_tail
        super().__init__(f"local Ray node '{node}' {reason}; last lines of its log:\n{log_tail}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen, so
    the kernel cannot hand out one port twice (it did: two Ray components on one port)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class LocalNode:
    name: str
    ip: str
    cpus: float
    labels: dict[str, str]
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


@dataclass
class LocalCluster:
    """A head (``head_cpus``, no label) and ``workers`` worker nodes labelled
    ``raymoe.io/node=0..workers-1``. Use as a context manager, or call ``stop()``."""

    workers: int = 2
    cpus: int = 2
    head_cpus: int = 0
    dashboard: bool = False
    ray_bin: str = field(default_factory=lambda: str(Path(sys.executable).with_name("ray")))
    start_timeout_s: float = 90.0
    nodes: list[LocalNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.temp_root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Ray's socket paths
        self.token = secrets.token_hex(32)
        self.port = free_port()
        self.dashboard_port = free_port() if self.dashboard else None
        self.address = f"127.0.0.1:{self.port}"

    # -- environment for anything that talks to this cluster ---------------------------
    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) plus the cluster's auth token and
        address; ``RAY_ADDRESS`` makes ``ray.init()``, ``raymoe`` and ``ray job`` use it."""
        env = dict(os.environ if base is None else base)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_ADDRESS=self.address,
                   RAY_USAGE_STATS_ENABLED="0")
        if self.dashboard_port:
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        bindir = str(Path(self.ray_bin).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def _node_env(self) -> dict:
        env = self.env()
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(name, None)
        return env

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- start and stop -------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        try:
            self._start_node("head", "127.0.0.1", self.head_cpus, {}, head=True)
            for n in range(self.workers):  # one at a time: raylets starting together on 2 busy cores can miss
                self._start_worker(n)      # Ray's fixed 30 s registration deadline
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker(self, n: int, attempts: int = 2) -> None:
        """Start worker node ``n`` and wait until it has joined; a ``ray start`` that exits
        before joining (its raylet missed the registration deadline) is tried once more."""
        for attempt in range(attempts):
            self._start_node(f"node{n}", f"127.0.0.{n + 2}", self.cpus, {NODE_LABEL: str(n)}, head=False,
                             suffix=f"-{attempt}" if attempt else "")
            try:
                self._wait_until_joined()
                return
            except LocalClusterError as exc:
                node = self.nodes[-1]
                if attempt + 1 == attempts or node.process.poll() is None or exc.node != node.name:
                    raise
                try:
                    os.killpg(node.process.pid, signal.SIGKILL)  # a raylet it may have left behind
                except ProcessLookupError:
                    pass
                self.nodes.pop()

    def _start_node(self, name: str, ip: str, cpus: float, labels: dict, head: bool, suffix: str = "") -> None:
        temp_dir = self.temp_root / (name + suffix)
        temp_dir.mkdir()
        manager, objects, metrics, agent, agent_grpc, runtime_env = free_ports(6, ip)
        args = [self.ray_bin, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                f"--temp-dir={temp_dir}", f"--node-manager-port={manager}",
                f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}", "--object-store-memory=100000000",
                "--disable-usage-stats", "--log-style=record"]
        if labels:
            args.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        if head:
            args += ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}"]
            if self.dashboard:
                args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}"]
            else:
                args += ["--include-dashboard=false"]
        else:
            args += [f"--address={self.address}"]
        log = self.temp_root / f"{name}{suffix}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self._node_env(), start_new_session=True)
        node = LocalNode(name, ip, cpus, labels, process, log)
        self.nodes.append(node)
        if head:
            self._wait_for_port("127.0.0.1", self.port, node)

    def _wait_for_port(self, host: str, port: int, node: LocalNode) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise LocalClusterError(node.name, f"exited with status {node.process.returncode}", node.log_tail())
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.3)
        raise LocalClusterError(node.name, f"did not listen on {host}:{port} in {self.start_timeout_s:.0f}s",
                                node.log_tail())

    def _wait_until_joined(self) -> None:
        """Until the cluster reports every node alive (asked by a short-lived driver-less
        query over the GCS, in a subprocess: this process may be connected to another Ray)."""
        query = ("import ray,json; ray.init(log_to_driver=False); "
                 "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise LocalClusterError(node.name, f"exited with status {node.process.returncode}",
                                            node.log_tail())
            done = subprocess.run([sys.executable, "-c", query], env=self.env(), capture_output=True, text=True,
                                  timeout=self.start_timeout_s)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(len(self.nodes))]:
                return
            time.sleep(1.0)
        raise LocalClusterError("head", f"the cluster did not reach {len(self.nodes)} alive nodes in "
                                f"{self.start_timeout_s:.0f}s", self.nodes[0].log_tail())

    def stop(self, grace_s: float = 20.0) -> None:
        """End this cluster's processes (and only those); remove its temp dir."""
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.process.pid, signal.SIGKILL)  # its raylet, workers, agents: same group
            except ProcessLookupError:
                pass
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes = []
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes whose command line names this cluster's temp dir (ours alone)."""
        marker = str(self.temp_root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes, labelled raymoe.io/node=0..N-1")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each worker node")
    parser.add_argument("--head-cpus", type=int, default=0)
    parser.add_argument("--dashboard", action="store_true", help="start the dashboard (needed by `ray job submit`)")
    args = parser.parse_args(argv)
    with LocalCluster(args.workers, args.cpus, args.head_cpus, args.dashboard) as cluster:
        print(f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token} RAY_ADDRESS={cluster.address}"
              + (f" RAY_API_SERVER_ADDRESS={cluster.dashboard_url}" if args.dashboard else ""), flush=True)
        for node in cluster.nodes:
            print(f"# {node.name}: {node.ip}, {node.cpus} CPUs, labels {node.labels}, log {node.log}", flush=True)
        stop = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
        while not stop:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
