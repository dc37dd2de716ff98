"""The image and the compose stack, for real, on this machine's container engine.

`make image` (tools/container/build_image.sh; cached, so a second run takes seconds) builds
callerid:local; the image runs as uid 10001 on a read-only root and both services start in it
and pass the compose file's healthchecks. Then docker-compose.yml comes up (tools/container/
stack.py, what `make stack-up` runs: every service but Grafana here, resolvers scaled to 3,
each healthy), calls go through its gateway (the simulator, and the load generator at a small
rate checking every decision), Prometheus scrapes every target, every resolver handled some of
the requests, and `down` leaves nothing of the project behind.

The stack runs as its own compose project on free host ports, so a developer's `make
stack-up` and the shared RabbitMQ (5672, 4369, 25672) and Redis (6379) of this host are never
touched: the stack's RabbitMQ and Redis publish no port at all. No engine: the module fails
under CI=true and is skipped elsewhere (tests/deploy_helpers.missing_tool).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import deploy_helpers as h
from tools.container import stack as compose_stack
from tools.node_fixture import nodes_yaml
from tools.stack import delete_topology, free_port, http_get

pytestmark = [pytest.mark.deploy, pytest.mark.integration, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("CALLERID_IMAGE", "callerid:local")
UID = "10001"
BIN = Path(sys.executable).parent
# The load generator's node layout (tools/fixtures/nodes.yaml) with the stack's mock CRM, and
# what examples/mock_crm_table.yaml (the table the stack's mock CRM serves) makes of its ids.
ID_LENGTH = 8
EXPECT = {
    "1": {"^1": "identified 1,3", "": "not_identified 1,4"},
    "2": {"": "identified 1,5"},
    "3": {"^1": "identified 1,3", "^2": "crm_destination 1,5", "": "not_identified 1,4"},
}
RESOLVERS = 3
DEADLINE = 120.0  # seconds for anything the stack does after it is up (scrapes: every 15 s)


def sh(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(argv[:5])}: {result.stderr[-2000:]}"
    return result


def wait_for(what: str, condition: Any, within: float = DEADLINE) -> Any:
    """Poll `condition` until it returns something true; fail naming `what` otherwise."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(1)
    pytest.fail(f"{what}: not within {within:.0f} s (last: {last!r})", pytrace=False)


@pytest.fixture(scope="module")
def engine() -> str:
    try:
        return compose_stack.find_engine(compose_stack.compose_environment(os.environ))
    except compose_stack.StackError as exc:
        h.missing_tool(f"{exc} (make services installs podman as root)")
        raise


@pytest.fixture(scope="module")
def image(engine: str) -> str:
    """`make image`'s script: builds only what changed since the last run."""
    env = {**os.environ, "CALLERID_CONTAINER_ENGINE": engine}
    result = subprocess.run(
        ["bash", str(h.ROOT / "tools/container/build_image.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return IMAGE


def test_image_runs_as_uid_10001_on_a_read_only_root(engine: str, image: str) -> None:
    """USER is the numeric 10001 (Kubernetes' runAsNonRoot can check it); with --read-only,
    / is mounted read-only and only the /tmp tmpfs takes writes."""
    user = sh(engine, "image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user.split(":")[0] == UID
    probe = (
        "import os\n"
        "print(os.getuid(), os.getgid())\n"
        "root = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/'][0]\n"
        "print(root[5].split(',')[0])\n"
        "try:\n"
        "    open('/opt/callerid/written', 'w')\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
        "open('/tmp/written', 'w').write('ok')\n"
        "print('tmp ok')\n"
    )
    result = sh(
        engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",
        image, "python", "-c", probe,
    )  # fmt: skip
    uid, root_mode, write_errno, tmp = result.stdout.split("\n")[:4]
    assert uid == f"{UID} {UID}"
    assert root_mode == "ro"
    assert write_errno in ("30", "13")  # EROFS (or EACCES: uid 10001 owns nothing there)
    assert tmp == "tmp ok"


def compose_healthcheck(service: str, port: int) -> list[str]:
    """The compose file's healthcheck command for `service`, pointed at `port`."""
    compose = yaml.safe_load(h.COMPOSE_FILE.read_text())
    test: list[str] = compose["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD"
    default = {"gateway": 9100, "resolver": 9101}[service]
    return [part.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}") for part in test[1:]]


@pytest.mark.parametrize("service", ["resolver", "gateway"])
def test_image_starts_each_service_and_passes_its_healthcheck(
    engine: str, image: str, service: str, amqp_url: str, redis_base_url: str
) -> None:
    """Each service starts in the image, read-only and without capabilities as compose runs
    it, against this host's RabbitMQ and Redis (host network, its own RabbitMQ names and
    ports), and the compose file's healthcheck passes (`podman healthcheck run`: podman runs
    no healthcheck by itself without systemd)."""
    http_port = free_port()
    prefix = f"image-test-{uuid.uuid4().hex[:10]}"
    name = f"callerid-image-test-{service}-{uuid.uuid4().hex[:6]}"
    env = {
        "CALLERID_AMQP_URL": amqp_url,
        "CALLERID_REDIS_URL": redis_base_url,
        "CALLERID_AMQP_PREFIX": prefix,
        "CALLERID_CACHE_KEY_PEPPER": f"{prefix}-pepper-0123456789",
        "CALLERID_NODES": "/etc/callerid/nodes.yaml",
        "CALLERID_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }
    if service == "gateway":
        env["CALLERID_AGI_LISTEN"] = f"127.0.0.1:{free_port()}"
    command = "agi-gateway" if service == "gateway" else "crm-resolver"
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    sh(
        engine, "run", "-d", "--name", name, "--network", "host", "--read-only",
        "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "-v", f"{h.DEPLOY / 'compose' / 'nodes.yaml'}:/etc/callerid/nodes.yaml:ro",
        "--health-cmd", json.dumps(compose_healthcheck(service, http_port)),
        *env_args, image, command,
    )  # fmt: skip
    try:

        def healthy() -> bool:
            state = sh(engine, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                logs = sh(engine, "logs", "--tail", "20", name, check=False)
                pytest.fail(f"{service} {state}: {logs.stdout}{logs.stderr}", pytrace=False)
            return sh(engine, "healthcheck", "run", name, check=False).returncode == 0

        wait_for(f"{service}'s healthcheck in the image", healthy, within=60)
        status, _ = http_get(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200
    finally:
        sh(engine, "rm", "-f", "-t", "10", name, check=False)
        delete_topology(amqp_url, prefix)


# -- the compose stack -------------------------------------------------------------------


class RunningStack:
    def __init__(self, stack: compose_stack.Stack, ports: dict[str, int], up_s: float) -> None:
        self.stack = stack
        self.ports = ports
        self.up_s = up_s
        self.down_done = False

    def containers(self, service: str) -> list[str]:
        return self.stack.containers(service)


@pytest.fixture(scope="module")
def running(
    engine: str, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    workdir = tmp_path_factory.mktemp("stack")
    nodes = workdir / "nodes.yaml"
    nodes.write_text(nodes_yaml("http://mock-crm:8081", crm_timeout=4, id_length=ID_LENGTH))
    nodes.chmod(0o644)  # read by uid 10001 in the containers
    ports = {
        "CALLERID_PUBLISH_AGI_PORT": free_port(),
        "CALLERID_PUBLISH_HTTP_PORT": free_port(),
        "CALLERID_PUBLISH_PROMETHEUS_PORT": free_port(),
        "CALLERID_PUBLISH_GRAFANA_PORT": free_port(),
    }
    env = compose_stack.compose_environment(os.environ)
    env.update({key: str(port) for key, port in ports.items()})
    env.update(
        CALLERID_CONTAINER_ENGINE=engine,
        CALLERID_IMAGE=image,
        CALLERID_COMPOSE_NODES=str(nodes),
        CALLERID_CACHE_KEY_PEPPER=f"stack-test-{uuid.uuid4().hex}",
        CALLERID_PUBLISH_ADDRESS="127.0.0.1",
    )
    project = f"callerid-test-{uuid.uuid4().hex[:6]}"
    stack = compose_stack.Stack(engine, env, project=project)
    started = time.monotonic()
    try:
        stack.up({"resolver": RESOLVERS}, timeout=420)
    except compose_stack.StackError as exc:
        stack.down()
        pytest.fail(f"stack-up: {exc}", pytrace=False)
    running = RunningStack(stack, ports, time.monotonic() - started)
    yield running
    if not running.down_done:
        stack.down()


def test_stack_runs_every_service_but_grafana_healthy(running: RunningStack) -> None:
    """Every service the machine can run is up and healthy, with 3 resolvers; the callerid
    containers run as uid 10001 on a read-only root, as in the image test."""
    stack = running.stack
    expected = {"rabbitmq", "redis", "mock-crm", "gateway", "resolver", "prometheus"}
    if stack.env.get("CALLERID_GRAFANA_IMAGE"):
        expected.add("grafana")
    for service in expected:
        containers = running.containers(service)
        assert len(containers) == (RESOLVERS if service == "resolver" else 1), service
        for container in containers:
            health = sh(stack.engine, "healthcheck", "run", container, check=False)
            assert health.returncode == 0, f"{container}: {health.stdout}{health.stderr}"
    for service in ("gateway", "resolver", "mock-crm"):
        for container in running.containers(service):
            inspect = sh(
                stack.engine, "inspect", "--format",
                "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}", container,
            ).stdout.split()  # fmt: skip
            assert inspect[0].split(":")[0] == UID, container
            assert inspect[1] == "true", container


def test_calls_through_the_stack_are_decided(running: RunningStack) -> None:
    """The simulator's calls through the published FastAGI port: a known customer on the CRM
    true/false node, and a CRM-routed one, each decided as the mock CRM's table says."""
    port = str(running.ports["CALLERID_PUBLISH_AGI_PORT"])
    sim = str(BIN / "callerid-asterisk-sim")
    cases = [("1", "10000001", "identified", "1,3"), ("3", "20000002", "crm_destination", "1,5")]
    for node, entry, outcome, dest in cases:
        result = sh(sim, "--port", port, "--node", node, "--entries", entry, "--calls", "3")
        calls = [line for line in result.stdout.splitlines() if line.startswith("call ")]
        assert len(calls) == 3, result.stdout
        for line in calls:
            assert f"outcome={outcome}" in line, line
            assert f"dest={dest}" in line, line


def test_load_through_the_stack_decides_every_call(running: RunningStack, tmp_path: Path) -> None:
    """The load generator at a small, bounded rate: every call decided and checked against
    what the stack's nodes and mock CRM must answer, no failure."""
    expect = tmp_path / "expect.yaml"
    expect.write_text(json.dumps(EXPECT))  # in order: the first regex that finds the id wins
    out = tmp_path / "load.json"
    port = str(running.ports["CALLERID_PUBLISH_AGI_PORT"])
    result = sh(
        str(BIN / "callerid-loadgen"), "--port", port, "--rate", "20", "--calls", "200",
        "--duration", "0", "--id-length", str(ID_LENGTH), "--expect", str(expect),
        "--timeout", "15", "--output", str(out), timeout=180, check=False,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert result.returncode == 0, (report.get("failure_examples"), result.stderr[-1000:])
    assert report["calls"] == 200
    assert report["failures"]["total"] == 0, report["failure_examples"]
    assert report["checked_against_expected"] > 100, report
    assert "identified" in report["outcomes"], report["outcomes"]


def test_prometheus_scrapes_every_target(running: RunningStack) -> None:
    """Prometheus's own view (/api/v1/targets): the gateway, all 3 resolvers (found through
    the network's DNS), RabbitMQ's exporter and itself, every one up."""
    url = f"http://127.0.0.1:{running.ports['CALLERID_PUBLISH_PROMETHEUS_PORT']}/api/v1/targets"

    def all_up() -> list[tuple[str, str, str]] | None:
        status, body = http_get(url, timeout=5)
        if status != 200:
            return None
        targets = json.loads(body)["data"]["activeTargets"]
        seen = [(t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in targets]
        jobs = [job for job, _, _ in seen]
        complete = jobs.count("callerid-resolver") == RESOLVERS and {
            "callerid-gateway",
            "rabbitmq",
            "prometheus",
        } <= set(jobs)
        if complete and all(health == "up" for _, _, health in seen):
            return seen
        return None

    seen = wait_for("every Prometheus target up", all_up)
    assert len(seen) == RESOLVERS + 3


def resolver_requests(stack: compose_stack.Stack, container: str) -> float:
    """callerid_resolver_requests_total summed over nodes and verdicts, read inside the
    container (the resolvers publish no port: they are scaled)."""
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9101/metrics').read().decode())"
    text = sh(stack.engine, "exec", container, "python", "-c", fetch).stdout
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "callerid_resolver_requests_total"
    )


def test_resolvers_share_the_work(running: RunningStack) -> None:
    """After the calls above, each of the 3 resolvers handled requests from the one queue."""
    handled = {c: resolver_requests(running.stack, c) for c in running.containers("resolver")}
    assert len(handled) == RESOLVERS
    assert all(count > 0 for count in handled.values()), handled


def test_stack_down_leaves_nothing(running: RunningStack) -> None:
    """`make stack-down`: no container, pod, network or volume of the project is left; the
    images stay cached."""
    running.stack.down()
    running.down_done = True
    assert running.stack.leftovers() == []
    assert sh(running.stack.engine, "image", "inspect", IMAGE, check=False).returncode == 0
