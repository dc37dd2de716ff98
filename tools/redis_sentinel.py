"""A private Redis Sentinel deployment on loopback, for tests that kill its primary.

`SentinelCluster` starts a primary, two replicas and three sentinels (quorum 2) on free
ports in a work directory of its own, with failure detection shortened
(`down-after-milliseconds` DOWN_AFTER_MS, `failover-timeout` FAILOVER_TIMEOUT_MS) so a failover
takes seconds, not the default 30 s. It never touches the shared Redis on 6379. Helpers find
the current primary (as the sentinels name it), kill it with SIGKILL, fail over on request
(`SENTINEL FAILOVER`: the old primary lives on as a replica), and stop every process by PID.

Optionally every server speaks TLS only (`Tls`) and wants a password (`password`), so that
the URL's TLS and password forms are tested against the real thing. `url` is the
`CALLERID_REDIS_URL` that names the deployment.

Not for production: no persistence, one host, loopback only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import redis

from tools.stack import Proc, free_port, redis_server

SERVICE = "callerid"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Tls:
    """Every server speaks TLS only, with this certificate (also the CA clients trust); no
    client certificates are asked for."""

    cert: Path
    key: Path

    def server_args(self) -> list[str]:
        return [
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.cert),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",  # replicas to their primary, sentinels to the servers
        ]  # fmt: skip

    def client_args(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.cert)}


@dataclass
class SentinelCluster:
    workdir: Path
    service: str = SERVICE
    replicas: int = 2
    sentinel_count: int = 3
    tls: Tls | None = None
    # Data nodes and sentinels all want this password (`requirepass`), and use it with each
    # other (`masterauth`, `sentinel auth-pass`, `sentinel sentinel-pass`).
    password: str | None = None
    data: dict[int, Proc] = field(default_factory=dict)  # port -> redis-server
    sentinels: dict[int, Proc] = field(default_factory=dict)  # port -> redis-sentinel

    @property
    def url(self) -> str:
        """CALLERID_REDIS_URL for this deployment (db 0)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        options = {"sentinel_password": self.password} if self.password else {}
        if self.tls is not None:
            options["ssl_ca_certs"] = str(self.tls.cert)
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        query = f"?{urlencode(options)}" if options else ""
        return f"{scheme}://{auth}{hosts}/{self.service}{query}"

    def start(self) -> SentinelCluster:
        """Start everything and wait until the sentinels see the primary, both replicas and
        each other (a failover needs all three); on failure, stop what was started."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            primary = self._start_server()
            assert primary.tcp_port is not None
            for _ in range(self.replicas):
                self._start_server("--replicaof", "127.0.0.1", str(primary.tcp_port))
            for _ in range(self.sentinel_count):
                self._start_sentinel(primary.tcp_port)
            self.wait_healthy(primary.tcp_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self, *args: str) -> Proc:
        port = free_port()
        tls = [] if self.tls is None else ["--port", "0", "--tls-port", str(port)]
        tls += [] if self.tls is None else self.tls.server_args()
        auth = [] if self.password is None else ["--requirepass", self.password]
        auth += [] if self.password is None else ["--masterauth", self.password]
        proc = redis_server(self.workdir, port, extra_args=(*tls, *auth, *args))
        self.data[port] = proc
        return proc

    def _start_sentinel(self, primary_port: int) -> None:
        port = free_port()
        config = self.workdir / f"sentinel-{port}.conf"
        listen = f"port {port}\n"
        if self.tls is not None:
            args = self.tls.server_args()
            listen = f"port 0\ntls-port {port}\n" + "".join(
                f"{name[2:]} {value}\n" for name, value in zip(args[::2], args[1::2], strict=True)
            )
        # Sentinel rewrites its config file as it learns: it must be its own, and writable.
        config.write_text(
            listen
            + "bind 127.0.0.1\ndaemonize no\n"
            + f'dir "{self.workdir}"\n'
            + f"sentinel monitor {self.service} 127.0.0.1 {primary_port} {QUORUM}\n"
            + f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}\n"
            + f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}\n"
            + f"sentinel parallel-syncs {self.service} 1\n"
            + (
                f"requirepass {self.password}\n"
                f"sentinel auth-pass {self.service} {self.password}\n"
                f"sentinel sentinel-pass {self.password}\n"
                if self.password
                else ""
            )
        )
        proc = Proc(
            f"sentinel-{port}",
            ["redis-sentinel", str(config)],
            dict(os.environ),
            self.workdir / f"sentinel-{port}.log",
        )
        proc.start()
        self.sentinels[port] = proc
        proc.wait_listening(port)
        proc.tcp_port = port

    # redis-py's sentinel commands carry no annotations: asked through `Any`.
    def _ask(self, port: int, question: Callable[[Any], Any]) -> Any:
        """`question` (a redis-py call, its reply parsed) of the server on `port`; None when
        it does not answer."""
        tls = {} if self.tls is None else self.tls.client_args()
        client = redis.Redis(
            port=port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
            **tls,
        )
        try:
            return question(client)
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for port, proc in self.sentinels.items():
            if not proc.alive:
                continue
            address = self._ask(
                port,
                # The command itself: redis-py's method adds an option meant for its Sentinel
                # manager, which a plain client's reply parser refuses.
                lambda c: c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service),
            )
            if address:
                return int(address[1])
        return None

    def primary(self) -> Proc:
        port = self.primary_port()
        if port is None or port not in self.data:
            raise RuntimeError(f"no sentinel names a primary of {self.service!r}")
        return self.data[port]

    def role(self, port: int) -> str | None:
        """What the server on `port` says it is: master, slave, or None (not answering)."""
        reply = self._ask(port, lambda c: c.role())
        return str(reply[0]) if isinstance(reply, list) and reply else None

    def healthy(self, primary_port: int) -> bool:
        """The sentinels agree on `primary_port`, which says it is the primary; every other
        live data node replicates from it with its link up; every sentinel sees them all and
        the other sentinels."""
        if self.role(primary_port) != "master":
            return False
        replicas = [p for p, proc in self.data.items() if proc.alive and p != primary_port]
        for port in replicas:
            info = self._ask(port, lambda c: c.info("replication"))
            if not isinstance(info, dict):
                return False
            if info.get("master_port") != primary_port or info.get("master_link_status") != "up":
                return False
        for port, proc in self.sentinels.items():
            if not proc.alive:
                continue
            state = (self._ask(port, lambda c: c.sentinel_masters()) or {}).get(self.service)
            if state is None or int(state["port"]) != primary_port or state["is_sdown"]:
                return False
            if int(state["num-slaves"]) < len(replicas):
                return False
            if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    def wait_healthy(self, primary_port: int, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(primary_port):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"sentinel deployment not healthy on primary {primary_port} within "
                    f"{timeout:g} s"
                )
            time.sleep(0.1)  # polling other processes' state

    def kill_primary(self) -> int:
        """SIGKILL the current primary (a crash: no chance to hand over); its port."""
        proc = self.primary()
        proc.kill()
        assert proc.tcp_port is not None
        return proc.tcp_port

    def failover(self) -> int:
        """`SENTINEL FAILOVER`: a replica is promoted without agreement from the others and the
        old primary, alive, becomes a replica; the old primary's port."""
        old = self.primary_port()
        assert old is not None
        port = next(p for p, proc in self.sentinels.items() if proc.alive)
        if self._ask(port, lambda c: c.sentinel_failover(self.service)) is None:
            raise RuntimeError("SENTINEL FAILOVER was refused")
        return old

    def wait_promoted(self, old_port: int, timeout: float = READY_TIMEOUT) -> int:
        """Until the sentinels name a primary other than `old_port` and it says it is one;
        its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port is not None and port != old_port and self.role(port) == "master":
                return port
            time.sleep(0.05)  # polling other processes' state
        raise RuntimeError(f"no replica promoted within {timeout:g} s (primary was {old_port})")

    def stop(self) -> None:
        """Every process by PID, sentinels first (so none fails over what is going away)."""
        for proc in [*self.sentinels.values(), *self.data.values()]:
            proc.stop()

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
