"""`make stack-up` / `make stack-down`: docker-compose.yml on whichever engine answers here.

    python -m tools.container.stack up [--scale resolver=3] [--timeout 300]
    python -m tools.container.stack down

Images come from the environment, else from what `make image` recorded
(~/.cache/callerid/images/images.env: the upstream images, or their offline stand-ins). Grafana
is started only when its image is known (CALLERID_GRAFANA_IMAGE): no registry, no Grafana.

Docker: `docker compose up --wait` honours `depends_on: condition: service_healthy` and waits.
Podman 4.3 does neither (podman-compose turns depends_on into `--requires`, which orders
starts, not health, and without systemd no timer runs a healthcheck), so here the containers
are created first (`podman-compose up --no-start`) and started one dependency level at a time,
each level's healthchecks run (`podman healthcheck run`) until they pass, within one deadline.
A container that exits or stays unhealthy past the deadline stops `up` with one line naming
it, its last check's output and its last log lines.

Podman's project network is created here first, so that its subnet can be added to
CALLERID_AGI_ALLOWED_PEERS: a connection published on 127.0.0.1 reaches the gateway from the
network's gateway address, not from Docker's 172.16.0.0/12.

`down` removes the project's containers, pod, networks and volumes (the images stay cached)
and fails if any is left.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = "callerid"
IMAGE_VARIABLES = (
    "CALLERID_CONTAINER_ENGINE",
    "CALLERID_PYTHON_BASE",
    "CALLERID_RABBITMQ_IMAGE",
    "CALLERID_REDIS_IMAGE",
    "CALLERID_PROMETHEUS_IMAGE",
    "CALLERID_GRAFANA_IMAGE",
)
DEFAULT_ALLOWED_PEERS = "127.0.0.1/32,172.16.0.0/12"
# Healthy is not ready: /healthz says the process lives, /readyz that it reached RabbitMQ
# (the services start without it and connect when it answers). `up` returns once these
# answer /readyz, so a call placed right after it is served, not failed over.
READY_PORTS = {"gateway": 9100, "resolver": 9101}
HEALTH_POLL = 1.0  # seconds between two healthcheck runs of a container that is not healthy yet


class StackError(Exception):
    """What went wrong, in one line for the operator."""


def image_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("CALLERID_IMAGE_CACHE") or Path(cache) / "callerid" / "images")


def recorded_images() -> dict[str, str]:
    """images.env as `make image` wrote it; {} before the first `make image`."""
    path = image_cache() / "images.env"
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name in IMAGE_VARIABLES:
            values[name] = value
    return values


def compose_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment compose runs with: `base`, plus recorded images it does not set."""
    env = dict(base)
    for name, value in recorded_images().items():
        env.setdefault(name, value)
    return env


def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), env=dict(env) if env is not None else None, text=True, capture_output=True
    )
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        raise StackError(f"`{' '.join(argv[:4])} ...` failed: {' | '.join(output[-3:])}")
    return result


def engine_answers(engine: str) -> bool:
    if shutil.which(engine) is None:
        return False
    return subprocess.run([engine, "info"], capture_output=True).returncode == 0


def find_engine(env: Mapping[str, str]) -> str:
    wanted = env.get("CALLERID_CONTAINER_ENGINE")
    for engine in [wanted] if wanted else ["podman", "docker"]:
        if engine_answers(engine):
            return engine
    raise StackError(
        f"no container engine answers ({wanted or 'podman, docker'}): run "
        "tools/container/ensure_podman.sh as root, then `make image`"
    )


def podman_compose() -> str:
    for candidate in (
        Path(sys.executable).parent / "podman-compose",
        shutil.which("podman-compose"),
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise StackError("podman-compose is not installed: pip install -e '.[dev]'")


@dataclass
class Stack:
    """One compose project on one engine."""

    engine: str
    env: dict[str, str]
    project: str = PROJECT
    files: Sequence[Path] = (COMPOSE_FILE,)
    log: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        self.log.append(message)
        print(f"stack: {message}", file=sys.stderr, flush=True)

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        if self.engine == "docker":
            argv = ["docker", "compose", "-p", self.project, *files, *args]
        else:
            argv = [podman_compose(), "-p", self.project, *files, *args]
        return run(argv, env=self.env, check=check)

    # -- what the compose file holds ----------------------------------------------------

    def services(self) -> dict[str, Any]:
        """The services as compose renders them (variables substituted)."""
        if self.engine == "docker":
            rendered = json.loads(self.compose("config", "--format", "json").stdout)
        else:
            rendered = yaml.safe_load(self.compose("config").stdout)
        return dict(rendered["services"])

    def runnable(self, services: Mapping[str, Any]) -> list[str]:
        """Every service, less Grafana when its image cannot be had here."""
        names = list(services)
        if not self.env.get("CALLERID_GRAFANA_IMAGE") and "grafana" in names:
            names.remove("grafana")
            self.say("grafana left out: no CALLERID_GRAFANA_IMAGE (no registry to pull it from)")
        return names

    @staticmethod
    def levels(services: Mapping[str, Any], names: Sequence[str]) -> list[list[str]]:
        """`names` in start order: each level depends only on the levels before it."""
        remaining = {
            name: set(services[name].get("depends_on") or {}) & set(names) for name in names
        }
        levels: list[list[str]] = []
        done: set[str] = set()
        while remaining:
            level = sorted(name for name, deps in remaining.items() if deps <= done)
            if not level:
                raise StackError(f"depends_on has a cycle among {sorted(remaining)}")
            levels.append(level)
            done.update(level)
            for name in level:
                del remaining[name]
        return levels

    # -- podman -------------------------------------------------------------------------

    def containers(self, service: str | None = None) -> list[str]:
        """The project's containers (of one service), by name."""
        argv = [self.engine, "ps", "-a", "--format", "{{.Names}}"]
        argv += ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(line for line in run(argv).stdout.split() if line)

    def network_name(self) -> str:
        return f"{self.project}_default"

    def ensure_podman_network(self) -> str:
        """Create the project network (as podman-compose would) and return its subnet."""
        name = self.network_name()
        if run([self.engine, "network", "exists", name], check=False).returncode != 0:
            labels = [f"io.podman.compose.project={self.project}"]
            labels.append(f"com.docker.compose.project={self.project}")
            run([self.engine, "network", "create", *(f"--label={x}" for x in labels), name])
        inspect = json.loads(run([self.engine, "network", "inspect", name]).stdout)
        subnets = [s["subnet"] for s in inspect[0].get("subnets") or []]
        if not subnets:
            raise StackError(f"podman network {name} has no subnet: remove it and retry")
        return ",".join(subnets)

    def wait_healthy(self, container: str, deadline: float) -> None:
        """Run the container's healthcheck until it passes, or fail naming what is wrong."""
        last = ""
        while True:
            state = run(
                [self.engine, "inspect", "--format", "{{.State.Status}}", container], check=False
            ).stdout.strip()
            if state in ("exited", "dead", "stopped"):
                raise StackError(f"{container} {state} while starting{self.logs_tail(container)}")
            check = run([self.engine, "healthcheck", "run", container], check=False)
            if check.returncode == 0:
                return
            last = ((check.stdout + check.stderr).strip().splitlines() or ["unhealthy"])[-1]
            if time.monotonic() > deadline:
                raise StackError(
                    f"{container} is not healthy by the deadline (last check: {last})"
                    f"{self.logs_tail(container)}"
                )
            time.sleep(HEALTH_POLL)

    def logs_tail(self, container: str, lines: int = 5) -> str:
        result = run([self.engine, "logs", "--tail", str(lines), container], check=False)
        text = " | ".join((result.stdout + result.stderr).strip().splitlines()[-lines:])
        return f"; its last log lines: {text}" if text else ""

    def has_healthcheck(self, container: str) -> bool:
        result = run(
            [self.engine, "inspect", "--format", "{{json .Config.Healthcheck}}", container],
            check=False,
        )
        return result.stdout.strip() not in ("", "null", "<nil>", "{}")

    def up_podman(self, names: Sequence[str], scale: Mapping[str, int], deadline: float) -> None:
        services = self.services()
        subnet = self.ensure_podman_network()
        if "CALLERID_AGI_ALLOWED_PEERS" not in self.env:
            self.env["CALLERID_AGI_ALLOWED_PEERS"] = f"{DEFAULT_ALLOWED_PEERS},{subnet}"
        scale_args = [f"--scale={name}={count}" for name, count in scale.items()]
        self.compose("up", "--no-start", "--no-build", *scale_args, *names)
        for level in self.levels(services, names):
            started = time.monotonic()
            containers = [c for name in level for c in self.containers(name)]
            if not containers:
                raise StackError(f"podman-compose created no container for {', '.join(level)}")
            run([self.engine, "start", *containers])
            for container in containers:
                if self.has_healthcheck(container):
                    self.wait_healthy(container, deadline)
            took = time.monotonic() - started
            self.say(f"healthy: {', '.join(containers)} ({took:.1f} s)")

    def stop_podman(self) -> None:
        """Stop the containers in reverse dependency order, each level at once.

        podman-compose stops one container at a time, the scaled ones (resolver_2, ...) only
        after RabbitMQ; a resolver whose broker is gone took its whole stop timeout to exit.
        Stopping dependents first lets each one close its connections and exit at once.
        30 s: longer than the gateway's drain (CALLERID_DRAIN_TIMEOUT 20 s in compose).
        """
        services = self.services()
        for level in reversed(self.levels(services, list(services))):
            containers = [c for name in level for c in self.containers(name)]
            if containers:
                run([self.engine, "stop", "-t", "30", *containers], check=False)
        rest = self.containers()  # anything of the project the compose file no longer names
        if rest:
            run([self.engine, "stop", "-t", "30", *rest], check=False)

    # -- both ---------------------------------------------------------------------------

    def wait_ready(self, names: Sequence[str], deadline: float) -> None:
        """Each gateway and resolver container answers /readyz (from inside: resolvers
        publish no port)."""
        for service in names:
            port = READY_PORTS.get(service)
            if port is None:
                continue
            probe = (
                "import urllib.request; "
                f"urllib.request.urlopen('http://127.0.0.1:{port}/readyz', timeout=2)"
            )
            for container in self.containers(service):
                while True:
                    check = run(
                        [self.engine, "exec", container, "python", "-c", probe], check=False
                    )
                    if check.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"{container} is healthy but not ready (/readyz) by the deadline"
                            f"{self.logs_tail(container)}"
                        )
                    time.sleep(HEALTH_POLL)

    def up(self, scale: Mapping[str, int], timeout: float) -> list[str]:
        started = time.monotonic()
        deadline = started + timeout
        names = self.runnable(self.services())
        self.say(f"{self.engine}: starting {', '.join(names)} (deadline {timeout:.0f} s)")
        if self.engine == "docker":
            scale_args = [f"--scale={name}={count}" for name, count in scale.items()]
            self.compose(
                "up", "-d", "--no-build", "--wait", f"--wait-timeout={int(timeout)}",
                *scale_args, *names,
            )  # fmt: skip
        else:
            self.up_podman(names, scale, deadline)
        self.wait_ready(names, deadline)
        self.say(f"up and healthy in {time.monotonic() - started:.1f} s")
        return names

    def leftovers(self) -> list[str]:
        """What of the project is still there: containers, pods, networks, volumes."""
        label = f"label=com.docker.compose.project={self.project}"
        found = [f"container {name}" for name in self.containers()]
        volumes = run(
            [self.engine, "volume", "ls", "--format", "{{.Name}}"], check=False
        ).stdout.split()
        found += [f"volume {v}" for v in volumes if v.startswith(f"{self.project}_")]
        networks = run(
            [self.engine, "network", "ls", "--format", "{{.Name}}", "--filter", label],
            check=False,
        ).stdout.split()
        networks += [
            n
            for n in run([self.engine, "network", "ls", "--format", "{{.Name}}"]).stdout.split()
            if n == self.network_name()
        ]
        found += [f"network {n}" for n in sorted(set(networks))]
        if self.engine == "podman":
            pods = run([self.engine, "pod", "ls", "--format", "{{.Name}}"], check=False)
            found += [f"pod {p}" for p in pods.stdout.split() if p == f"pod_{self.project}"]
        return found

    def down(self) -> None:
        started = time.monotonic()
        if self.engine == "podman" and self.containers():
            self.stop_podman()
        self.compose("down", "--volumes", "--remove-orphans", "-t", "30", check=False)
        if self.engine == "podman":
            # What podman-compose may leave: containers of services it was not told about,
            # its pod, the network created above, volumes of services not started.
            containers = self.containers()
            if containers:
                run([self.engine, "rm", "-f", "-t", "10", *containers], check=False)
            run([self.engine, "pod", "rm", "-f", f"pod_{self.project}"], check=False)
            for item in self.leftovers():
                kind, _, name = item.partition(" ")
                if kind in ("network", "volume"):
                    run([self.engine, kind, "rm", "-f", name], check=False)
        left = self.leftovers()
        if left:
            raise StackError(f"stack-down left {', '.join(left)}: remove them by hand")
        self.say(f"down: nothing of {self.project} left ({time.monotonic() - started:.1f} s)")


def parse_scale(values: Sequence[str]) -> dict[str, int]:
    scale: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise StackError(f"--scale {value!r}: expected SERVICE=N with N >= 1")
        scale[name] = int(count)
    return scale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--scale", action="append", default=[], metavar="SERVICE=N")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for `up`")
    parser.add_argument("--project", default=os.environ.get("CALLERID_STACK_PROJECT", PROJECT))
    args = parser.parse_args(argv)
    try:
        env = compose_environment(os.environ)
        if not env.get("CALLERID_CACHE_KEY_PEPPER"):
            # The compose file refuses to run without one. A stack-up without one of the
            # operator's gets a random one: cache keys nobody can reverse, valid for this run
            # (the stack's Redis keeps nothing on disk anyway). `down` only needs a value.
            env["CALLERID_CACHE_KEY_PEPPER"] = secrets.token_hex(32)
            if args.action == "up":
                print("stack: CALLERID_CACHE_KEY_PEPPER is not set: a random one for this run")
        stack = Stack(find_engine(env), env, project=args.project)
        if args.action == "up":
            stack.up(parse_scale(args.scale), args.timeout)
        else:
            stack.down()
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
