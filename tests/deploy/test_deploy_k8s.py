"""Kubernetes manifests: the overlays render offline (kustomize), validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate), and keep the operational rules of issue 4.

Custom resources (KEDA's ScaledObject and TriggerAuthentication, the Prometheus operator's
ServiceMonitor) have no schema in kubernetes-validate: they are validated against the schemas
the @kubernetes-models npm packages publish, unknown fields included
(tests/deploy/k8s_crd_validate), and their meaning is checked field by field here.
The HA overlay (k8s/components/ha) is rendered and validated like the others.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.nodes import build_nodes
from tests import deploy_helpers as h
from tests.deploy_helpers import CrdReport

# The oldest Kubernetes these manifests are meant for, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", "latest")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
WORKLOADS = {"callerid-gateway": "gateway", "callerid-resolver": "resolver"}
# Secrets the manifests may reference without rendering them: created by the operator.
EXTERNAL_OPTIONAL_SECRETS = {"callerid-crm-tokens"}


@pytest.fixture(scope="module", params=h.OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return h.render_overlay(request.param)


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return h.render_overlay("example")


def _deployments(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = h.find(docs, "Deployment")
    assert {d["metadata"]["name"] for d in found} == set(WORKLOADS)
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    assert len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlays_validate_strictly_against_kubernetes_schemas(
    docs: list[dict[str, Any]], version: str
) -> None:
    """Every built-in object of the render passes kubernetes-validate --strict."""
    import kubernetes_validate  # type: ignore[import-untyped]

    target = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, target, strict=True)
        checked += 1
    assert checked >= 10


def test_strict_validation_rejects_an_unknown_field(example: list[dict[str, Any]]) -> None:
    """The schema check can fail: a misspelt Service field is rejected."""
    import kubernetes_validate

    (service,) = h.find(example, "Service", "callerid-gateway")
    broken = yaml.safe_load(yaml.safe_dump(service))
    broken["spec"]["sesionAffinity"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_custom_resources_validate_against_their_schemas(docs: list[dict[str, Any]]) -> None:
    """Every custom resource of the render passes its published schema and has no field the
    schema does not know."""
    crds = [d for d in docs if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in crds} >= {"ServiceMonitor"}
    reports = h.validate_custom_resources(crds)
    assert [r.kind for r in reports] == [d["kind"] for d in crds]
    assert [r for r in reports if r.errors] == []


def test_crd_validation_rejects_wrong_types_missing_fields_and_unknown_fields(
    example: list[dict[str, Any]],
) -> None:
    """The CRD check can fail: a string where KEDA wants an integer, a ScaledObject without its
    required scaleTargetRef, and misspelt fields at three depths are each reported."""
    (scaled,) = h.find(example, "ScaledObject")
    (auth,) = h.find(example, "TriggerAuthentication")
    (monitor,) = h.find(example, "ServiceMonitor")
    wrong_type = copy.deepcopy(scaled)
    wrong_type["spec"]["minReplicaCount"] = "two"
    missing = copy.deepcopy(scaled)
    del missing["spec"]["scaleTargetRef"]
    unknown = copy.deepcopy(scaled)
    unknown["spec"]["triggers"][0]["metdata"] = unknown["spec"]["triggers"][0].pop("metadata")
    misspelt_auth = copy.deepcopy(auth)
    misspelt_auth["spec"]["secretTargetRef"][0]["keys"] = "CALLERID_AMQP_URL"
    misspelt_monitor = copy.deepcopy(monitor)
    misspelt_monitor["spec"]["endpoints"][0]["scrapeTimout"] = "10s"
    reports = h.validate_custom_resources(
        [wrong_type, missing, unknown, misspelt_auth, misspelt_monitor]
    )
    assert all(r.errors for r in reports), reports
    assert any(e.startswith("/spec/minReplicaCount: must be integer") for e in reports[0].errors)
    assert "/spec: must have required property scaleTargetRef" in reports[1].errors
    for report, path in zip(
        reports[2:],
        (
            "/spec/triggers/0/metdata",
            "/spec/secretTargetRef/0/keys",
            "/spec/endpoints/0/scrapeTimout",
        ),
        strict=True,
    ):
        assert f"{path}: unknown field (the schema has no such property)" in report.errors


def test_crd_validation_lets_maps_hold_any_key(example: list[dict[str, Any]]) -> None:
    """Maps are not mistaken for unknown fields: any label, annotation or KEDA trigger
    metadata key passes (the schema declares them as maps of strings)."""
    (scaled,) = h.find(example, "ScaledObject")
    keyed = copy.deepcopy(scaled)
    keyed["metadata"]["labels"]["example.com/any-label"] = "x"
    keyed["metadata"]["annotations"] = {"example.com/any-annotation": "x"}
    keyed["spec"]["triggers"][0]["metadata"]["activationValue"] = "1"
    assert h.validate_custom_resources([keyed]) == [
        CrdReport("ScaledObject", scaled["metadata"]["name"], ())
    ]


def test_crd_validation_refuses_kinds_it_has_no_schema_for() -> None:
    """A custom resource of a kind no package describes is an error, not a silent pass."""
    reports = h.validate_custom_resources(
        [
            {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledThing", "metadata": {"name": "a"}},
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "b"}},
        ]
    )
    assert [len(r.errors) for r in reports] == [1, 1]
    assert "no kind ScaledThing" in reports[0].errors[0]
    assert "no schema package for apiVersion example.com/v1" in reports[1].errors[0]


@pytest.mark.parametrize("ci", ["true", ""])
def test_crd_validation_without_its_packages_fails_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    """With the npm packages missing (an empty cache), CI=true fails the test and a developer
    machine skips it, with the command that installs them."""
    monkeypatch.setenv("CALLERID_CACHE", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match=r"tools/ensure_tools\.sh"):
        h.validate_custom_resources([])


def test_crds_are_the_only_objects_without_a_schema(docs: list[dict[str, Any]]) -> None:
    """Only the known CRDs are skipped by the schema check; nothing else slips through."""
    kinds = {d["kind"] for d in docs}
    builtin = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
    }
    assert kinds - builtin <= CRD_KINDS


def test_probes_on_healthz_and_readyz(docs: list[dict[str, Any]]) -> None:
    """Each container has liveness on /healthz and readiness on /readyz, on its HTTP port."""
    for deployment in _deployments(docs):
        container = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports, probe


def test_requests_and_limits_are_set(docs: list[dict[str, Any]]) -> None:
    """CPU and memory requests and limits on every container."""
    for deployment in _deployments(docs):
        resources = _container(deployment)["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), deployment["metadata"]["name"]


def test_security_context_is_restricted(docs: list[dict[str, Any]]) -> None:
    """Pod Security "restricted": non-root, read-only root, no privilege escalation, no
    capabilities, RuntimeDefault seccomp, and no service account token."""
    for deployment in _deployments(docs):
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        context = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 1000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork")
        assert not pod.get("hostPID")


def test_gateway_grace_period_covers_prestop_and_drain(docs: list[dict[str, Any]]) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + CALLERID_DRAIN_TIMEOUT (+5 s to exit)."""
    (gateway,) = h.find(docs, "Deployment", "callerid-gateway")
    container = _container(gateway)
    drain = float(_env(container)["CALLERID_DRAIN_TIMEOUT"]["value"])
    pre_stop = _prestop_seconds(container)
    assert pre_stop >= 1
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 5


def test_resolver_grace_period_covers_the_longest_crm_budget(docs: list[dict[str, Any]]) -> None:
    """The resolver has time to finish a lookup of the longest allowed CRM budget."""
    from shared.nodes import NodeConfig

    (resolver,) = h.find(docs, "Deployment", "callerid-resolver")
    longest_budget = NodeConfig.model_fields["crm_timeout"].metadata
    limit = max(float(getattr(m, "le", 0) or 0) for m in longest_budget)
    grace = resolver["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= _prestop_seconds(_container(resolver)) + limit


def test_gateway_service_has_no_session_affinity(docs: list[dict[str, Any]]) -> None:
    """One Asterisk host must spread its calls over all gateway pods: no ClientIP affinity."""
    for service in h.find(docs, "Service"):
        assert service["spec"].get("sessionAffinity", "None") == "None"
    (gateway,) = h.find(docs, "Service", "callerid-gateway")
    assert [p["port"] for p in gateway["spec"]["ports"]] == [4573]


def test_keda_and_hpa_are_never_rendered_together(docs: list[dict[str, Any]]) -> None:
    """Exactly one autoscaler owns the resolver replicas in any render."""
    scaled = h.find(docs, "ScaledObject")
    hpas = h.find(docs, "HorizontalPodAutoscaler")
    assert len(scaled) + len(hpas) == 1
    if not scaled:
        assert h.find(docs, "TriggerAuthentication") == []


def test_both_autoscalers_are_available() -> None:
    """The example overlay uses KEDA; the example-hpa overlay uses the HPA component."""
    assert h.find(h.render_overlay("example"), "ScaledObject")
    assert h.find(h.render_overlay("example-hpa"), "HorizontalPodAutoscaler")


def test_keda_scales_the_resolver_on_the_request_queue(example: list[dict[str, Any]]) -> None:
    """ScaledObject: the resolver Deployment, RabbitMQ trigger on the request queue's length,
    credentials through a TriggerAuthentication whose Secret is rendered."""
    (scaled,) = h.find(example, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "callerid-resolver"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == h.REQUEST_QUEUE
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert float(trigger["metadata"]["value"]) > 0
    (auth,) = h.find(example, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret_names = {s["metadata"]["name"] for s in h.find(example, "Secret")}
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] == "host"
        assert ref["name"] in secret_names, "TriggerAuthentication misses the hashed Secret name"


def test_hpa_scales_the_resolver_on_the_request_queue() -> None:
    """HPA alternative: the resolver Deployment, external metric on the request queue."""
    (hpa,) = h.find(h.render_overlay("example-hpa"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "callerid-resolver"
    external = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    (metric,) = external
    assert metric["metric"]["name"] in h.RABBITMQ_QUEUE_METRICS
    assert metric["metric"]["selector"]["matchLabels"] == {"queue": h.REQUEST_QUEUE}


def test_request_queue_name_matches_the_topology_module() -> None:
    """The queue the autoscalers and alerts watch is the one shared/topology.py declares."""
    from shared.topology import Topology

    assert Topology().request_queue == h.REQUEST_QUEUE


def test_pod_disruption_budgets_cover_both_workloads(docs: list[dict[str, Any]]) -> None:
    """Each Deployment's pods are selected by a PodDisruptionBudget."""
    pdbs = h.find(docs, "PodDisruptionBudget")
    for deployment in _deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(
            pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for pdb in pdbs
        ), deployment["metadata"]["name"]


def test_network_policies_deny_by_default_and_open_the_service_ports(
    docs: list[dict[str, Any]],
) -> None:
    """A default-deny policy covers all callerid pods; each container port is opened by a
    policy that selects its pods."""
    policies = h.find(docs, "NetworkPolicy")
    deny = [p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"]]
    assert deny
    assert set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for deployment in _deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selecting = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        opened = {
            port["port"]
            for p in selecting
            for rule in p["spec"].get("ingress", [])
            for port in rule.get("ports", [])
        }
        for port in _container(deployment)["ports"]:
            assert port["containerPort"] in opened, deployment["metadata"]["name"]


def test_secret_references_resolve(docs: list[dict[str, Any]]) -> None:
    """Secret references name a rendered Secret, or an optional one the operator creates;
    CRM tokens come from a Secret, never from a literal value."""
    rendered = {s["metadata"]["name"] for s in h.find(docs, "Secret")}
    for deployment in _deployments(docs):
        container = _container(deployment)
        for env in container.get("env", []):
            assert not env["name"].startswith("CALLERID_CRM_TOKEN") or "valueFrom" in env
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in rendered or ref.get("optional"), env["name"]
        for source in container.get("envFrom", []):
            ref = source["secretRef"]
            assert ref["name"] in rendered or (
                ref.get("optional") and ref["name"] in EXTERNAL_OPTIONAL_SECRETS
            )
    (resolver,) = h.find(docs, "Deployment", "callerid-resolver")
    refs = [s["secretRef"]["name"] for s in _container(resolver).get("envFrom", [])]
    assert "callerid-crm-tokens" in refs


def test_nodes_configmap_is_mounted_and_valid(docs: list[dict[str, Any]]) -> None:
    """Both services mount the nodes ConfigMap at CALLERID_NODES, and it loads."""
    (config_map,) = h.find(docs, "ConfigMap")
    raw = yaml.safe_load(config_map["data"]["nodes.yaml"])
    assert len(build_nodes(raw["nodes"])) >= 1
    for deployment in _deployments(docs):
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        path = _env(container)["CALLERID_NODES"]["value"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [
            m
            for m in container["volumeMounts"]
            if volumes[m["name"]].get("configMap", {}).get("name") == config_map["metadata"]["name"]
        ]
        assert len(mounts) == 1
        assert mounts[0]["readOnly"] is True
        assert path == f"{mounts[0]['mountPath']}/nodes.yaml"


def test_service_monitor_scrapes_both_services_under_the_alert_job_names(
    docs: list[dict[str, Any]],
) -> None:
    """The ServiceMonitor selects the gateway and resolver metrics Services, on their HTTP
    port, and names the jobs as the alert rules expect."""
    (monitor,) = h.find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s
        for s in h.find(docs, "Service")
        if selector.items() <= s["metadata"].get("labels", {}).items()
    ]
    job_label = monitor["spec"]["jobLabel"]
    jobs = {s["metadata"]["labels"][job_label] for s in selected}
    assert jobs == {"callerid-gateway", "callerid-resolver"}
    (endpoint,) = monitor["spec"]["endpoints"]
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- the HA component (k8s/components/ha, overlay example-ha) ---------------------------

CONNECTION_URLS = ("CALLERID_AMQP_URL", "CALLERID_REDIS_URL")
# Ports a URL means when it names none (RabbitMQ, RabbitMQ over TLS, Redis, Redis Sentinel).
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}
SENTINEL_PORT = 26379


@pytest.fixture(scope="module")
def example_ha() -> list[dict[str, Any]]:
    return h.render_overlay("example-ha")


def _hosts(url: str) -> list[str]:
    """The host[:port] parts of a URL whose authority may list several (redis+sentinel)."""
    return urlsplit(url).netloc.rpartition("@")[2].split(",")


def _ports(value: str) -> set[int]:
    """The TCP ports a CALLERID_AMQP_URL (one URL or a comma-separated list) or a
    CALLERID_REDIS_URL connects to. Behind Sentinel the primary is assumed on 6379."""
    if value.startswith(("redis+sentinel://", "rediss+sentinel://")):
        hosts = _hosts(value)
        return {int(p) if p else SENTINEL_PORT for p in (x.partition(":")[2] for x in hosts)} | {
            DEFAULT_PORTS["redis"]
        }
    return {
        parts.port or DEFAULT_PORTS[parts.scheme]
        for parts in (urlsplit(url) for url in value.split(","))
    }


def test_ha_overlay_uses_every_broker_a_quorum_queue_and_sentinel(
    example_ha: list[dict[str, Any]],
) -> None:
    """Both services of the HA overlay get the three RabbitMQ nodes of one cluster as a
    comma-separated CALLERID_AMQP_URL, CALLERID_AMQP_QUEUE_TYPE=quorum, and a
    redis+sentinel:// CALLERID_REDIS_URL naming three Sentinels and the master set."""
    for deployment in _deployments(example_ha):
        env = _env(_container(deployment))
        assert env["CALLERID_AMQP_QUEUE_TYPE"]["value"] == "quorum"
        amqp = h.env_value(example_ha, env["CALLERID_AMQP_URL"])
        assert amqp is not None
        brokers = [urlsplit(url) for url in amqp.split(",")]
        assert len(brokers) == 3
        assert {b.scheme for b in brokers} == {"amqp"}
        assert len({b.hostname for b in brokers}) == 3
        # One cluster: the same user, password and vhost on every node.
        assert len({(b.username, b.password, b.path) for b in brokers}) == 1
        redis = h.env_value(example_ha, env["CALLERID_REDIS_URL"])
        assert redis is not None
        assert urlsplit(redis).scheme == "redis+sentinel"
        sentinels = _hosts(redis)
        assert len(set(sentinels)) == 3
        assert all(s.endswith(f":{SENTINEL_PORT}") for s in sentinels)
        assert urlsplit(redis).path == "/mymaster/0"


def test_ha_component_changes_nothing_but_the_connections(
    example: list[dict[str, Any]], example_ha: list[dict[str, Any]]
) -> None:
    """Apart from the queue type, the Secret's (hashed) name, the Sentinel egress port and
    KEDA's key, the HA overlay renders what the example does."""

    def normalised(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        (secret,) = h.find(docs, "Secret")
        text = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"], sort_keys=True).replace(
            secret["metadata"]["name"], "callerid-connections"
        )
        found: list[dict[str, Any]] = yaml.safe_load(text)
        for doc in found:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                container["env"] = [
                    e for e in container["env"] if e["name"] != "CALLERID_AMQP_QUEUE_TYPE"
                ]
            if doc["kind"] == "NetworkPolicy":
                doc["spec"]["egress"] = [
                    rule
                    for rule in doc["spec"].get("egress", [])
                    if rule != {"ports": [{"port": SENTINEL_PORT, "protocol": "TCP"}]}
                ]
                if not doc["spec"]["egress"]:
                    del doc["spec"]["egress"]
            if doc["kind"] == "TriggerAuthentication":
                doc["spec"]["secretTargetRef"][0]["key"] = "CALLERID_AMQP_URL"
        return found

    assert normalised(example_ha) == normalised(example)


def test_connection_urls_come_from_the_secret(docs: list[dict[str, Any]]) -> None:
    """Broker and cache URLs carry credentials: never a literal value in a Deployment."""
    for deployment in _deployments(docs):
        env = _env(_container(deployment))
        for name in CONNECTION_URLS:
            assert "value" not in env[name], f"{deployment['metadata']['name']}: {name}"
            assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def test_keda_reads_one_broker_url(docs: list[dict[str, Any]]) -> None:
    """KEDA's rabbitmq trigger takes one URL in `host`: never the services' list."""
    for auth in h.find(docs, "TriggerAuthentication"):
        (ref,) = auth["spec"]["secretTargetRef"]
        host = h.secret_value(docs, ref["name"], ref["key"])
        assert host is not None, f"{ref['key']} is not in the Secret {ref['name']}"
        assert "," not in host
        assert urlsplit(host).scheme in {"amqp", "amqps"}


def test_network_policies_let_each_service_reach_its_brokers_and_cache(
    docs: list[dict[str, Any]],
) -> None:
    """Every port the connection URLs name (each broker, each Sentinel, the Redis primary)
    is open for egress in a policy selecting the pods that use it."""
    policies = h.find(docs, "NetworkPolicy")
    for deployment in _deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        egress = {
            port["port"]
            for p in policies
            if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            for rule in p["spec"].get("egress", [])
            for port in rule.get("ports", [])
        }
        env = _env(_container(deployment))
        for name in CONNECTION_URLS:
            value = h.env_value(docs, env[name])
            assert value is not None, name
            assert _ports(value) <= egress, f"{deployment['metadata']['name']}: {name}"


def test_services_accept_the_rendered_environment(
    docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Deployment's environment (Secret values resolved) builds its service's settings:
    the broker list, the queue type and the Redis URL are forms the services take."""
    from agi_gateway.settings import GatewaySettings
    from crm_resolver.settings import ResolverSettings
    from shared.amqp_urls import split_amqp_urls
    from shared.redis_url import SentinelRedis, parse_redis_url

    kinds = {"callerid-gateway": GatewaySettings, "callerid-resolver": ResolverSettings}
    for deployment in _deployments(docs):
        env = {
            e["name"]: value
            for e in _container(deployment)["env"]
            if (value := h.env_value(docs, e)) is not None
        }
        with monkeypatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("CALLERID_")]:
                patch.delenv(name)
            for name, value in env.items():
                patch.setenv(name, value)
            settings = kinds[deployment["metadata"]["name"]]()
        assert settings.amqp_url == env["CALLERID_AMQP_URL"]
        assert settings.amqp_queue_type == env.get("CALLERID_AMQP_QUEUE_TYPE", "classic")
        brokers = split_amqp_urls(env["CALLERID_AMQP_URL"])
        target = parse_redis_url(env["CALLERID_REDIS_URL"])
        if settings.amqp_queue_type == "quorum":  # the HA overlay
            assert len(brokers) == 3
            assert isinstance(target, SentinelRedis)
            assert len(target.sentinels) == 3
            assert (target.service_name, target.db) == ("mymaster", 0)
