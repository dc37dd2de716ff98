"""Kubernetes manifests: the overlays render offline (kustomize), validate strictly against the
Kubernetes OpenAPI schemas (kubernetes-validate), and keep the operational rules of issue 4.

CRDs (KEDA's ScaledObject and TriggerAuthentication, the Prometheus operator's
ServiceMonitor) have no schema in kubernetes-validate; they are checked field by field here.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shared.nodes import build_nodes
from tests import deploy_helpers as h

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
