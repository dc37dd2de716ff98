"""A private RabbitMQ cluster on loopback, for tests that kill brokers (never the shared one).

`RabbitCluster(workdir, size=3).start()` runs `size` nodes of Debian's rabbitmq-server beside
the machine's broker on 5672, which it never touches: every node has its own node name, AMQP
port, distribution port, data and log directories under `workdir`, and the cluster has its own
epmd (on a private port, started here, so that it is stopped here too) and its own Erlang
cookie (a private HOME), so `rabbitmqctl` reaches these nodes and no others. Nodes 2..n join
node 1 with `rabbitmqctl join_cluster`. The nodes are started through the server script with
RABBITMQ_ALLOW_INPUT set, which makes it exec `erl`: the PID we hold is the Erlang VM itself,
so `kill` is a real `kill -9` of the broker, and `stop` leaves nothing behind.

What a test does with it: `urls()` (the CALLERID_AMQP_URL of the cluster), `leader(queue)`
(the node leading a quorum queue), `kill(node)`, `restart(node)` (the same node, its data
kept: it rejoins the cluster and catches up), `stop()`. A 1-node "cluster" on a chosen port is
a private broker that a test may start late (start-up without a broker).

`missing_reason()` says why this machine cannot run one (no rabbitmq-server), for the test's
fail-under-CI / skip-elsewhere decision.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.stack import free_port, port_answers

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts, without the su-to-rabbitmq wrapper
START_TIMEOUT = 90.0  # one node listening; ~20 s measured on a quiet 2-core box
CTL_TIMEOUT = 60.0


def missing_reason() -> str | None:
    """Why no private cluster can run here (None: it can)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        return (
            "rabbitmq-server (Debian package) is not installed: "
            "`apt-get install rabbitmq-server` (tools/ensure_services.sh installs it)"
        )
    return None


@dataclass
class RabbitNode:
    cluster: RabbitCluster
    index: int
    name: str  # Erlang node name, e.g. callerid-ab12cd-1@localhost
    amqp_port: int
    dist_port: int
    base: Path  # this node's data, logs and config
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def env(self) -> dict[str, str]:
        env = self.cluster.env()
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "node.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            # `exec erl` instead of a shell that waits for it: our PID is the VM.
            RABBITMQ_ALLOW_INPUT="true",
        )
        return env

    def start(self) -> None:
        """Start the VM (not waiting): its data directory is kept between starts."""
        (self.base / "log").mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            # Nothing else on this box should slow a test's node down to a halt.
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        log = (self.base / "log" / "console.log").open("ab")
        self.popen = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server"), "-noinput"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base,
        )
        log.close()

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"RabbitMQ node {self.name} exited early:\n{self.tail()}")
            if port_answers(self.amqp_port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"RabbitMQ node {self.name} not listening in {timeout:g} s")

    def kill(self) -> None:
        """kill -9 the VM and reap it: a crash, nothing flushed, no goodbye to the cluster."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (RabbitMQ stops cleanly), then SIGKILL if it has not within `timeout`."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """`rabbitmqctl -n <this node> args...`; its stdout, or RuntimeError with its output."""
        return self.cluster.ctl_tool("rabbitmqctl", self, *args, timeout=timeout)

    def tail(self, lines: int = 40) -> str:
        path = self.base / "log" / "console.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class RabbitCluster:
    workdir: Path
    size: int = 3
    amqp_ports: list[int] | None = None  # default: free ports
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    nodes: list[RabbitNode] = field(default_factory=list)
    epmd_port: int = field(default_factory=free_port)
    epmd: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        ports = self.amqp_ports or [free_port() for _ in range(self.size)]
        self.nodes = [
            RabbitNode(
                self,
                index + 1,
                f"callerid-{self.token}-{index + 1}@localhost",
                ports[index],
                free_port(),
                self.workdir / f"node{index + 1}",
            )
            for index in range(self.size)
        ]

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    def env(self) -> dict[str, str]:
        """What every process of this cluster (VMs and CLI tools) runs with: our HOME (cookie),
        our epmd, and no system-wide RabbitMQ env file (it names the shared broker's node)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            LANG="C.UTF-8",
            LC_ALL="C.UTF-8",
        )
        return env

    def urls(self) -> str:
        """The cluster as CALLERID_AMQP_URL: every node's URL, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def node_named(self, name: str) -> RabbitNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def start(self, *, wait: bool = True) -> RabbitCluster:
        """epmd, then every node at once, then nodes 2..n join node 1. On failure, stops
        everything it started. `wait=False` starts the VMs and returns (a broker that comes
        late: call `wait_ready` later)."""
        try:
            self._start(wait)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, wait: bool) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.workdir / "rabbitmq-env.conf").write_text("# private cluster: no system defaults\n")
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_answers(self.epmd_port):
            if self.epmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)
        for node in self.nodes:
            node.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Every node listening, and clustered with node 1 (the first start only)."""
        for node in self.nodes:
            node.wait_listening()
            node.ctl("await_startup")  # listening comes a moment before the app is up
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.name in node.ctl("cluster_status", "--formatter", "json"):
                continue  # a restart: already a member
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
            node.wait_listening()

    def kill(self, node: RabbitNode) -> None:
        node.kill()

    def restart(self, node: RabbitNode) -> None:
        """Start a killed or stopped node again, with its data: it rejoins by itself."""
        node.kill()
        node.start()
        node.wait_listening()
        node.ctl("await_startup")

    def leader(self, queue: str, vhost: str = "/") -> RabbitNode:
        """The node leading quorum queue `queue`, as a live node reports it."""
        for asker in self.nodes:
            if not asker.alive:
                continue
            out = asker.ctl(
                "list_queues", "-p", vhost, "name", "leader", "--quiet", "--no-table-headers"
            )
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue:
                    return self.node_named(parts[1])
            raise KeyError(f"queue {queue!r} not found on {asker.name}:\n{out}")
        raise RuntimeError("no node of the cluster is alive")

    def ctl_tool(self, tool: str, node: RabbitNode, *args: str, timeout: float) -> str:
        result = subprocess.run(
            [str(RABBIT_BIN / tool), "-n", node.name, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        out = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} -n {node.name} {' '.join(args)} failed ({result.returncode}):\n"
                f"{out}{result.stderr.decode(errors='replace')}"
            )
        return out

    def stop(self) -> None:
        """Every node (by PID: SIGTERM, then SIGKILL), then our epmd. Idempotent."""
        for node in self.nodes:
            node.stop()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(5)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait()

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
