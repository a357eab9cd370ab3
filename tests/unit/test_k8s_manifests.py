"""deploy/k8s, rendered per overlay and checked offline: schemas (kubernetes-validate's
bundled ones), and what running the fleet relies on: honest probes, a grace period longer than
the drain, the securityContext the image runs under, PDB, HPA on queue depth, resources from
the measured RSS, credentials from Secrets, and alerts identical to deploy/prometheus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from ingest import config as C
from ingest.metrics import Metrics
from ingest.pod.control import WORKER_CLOSE_SECONDS
from ingest.tools import prometheus_rule
from tests.unit._kustomize import build, containers, merge

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["dev", "prod"]
K8S_VERSION = "1.32.0"  # the oldest version still supported upstream when this was written
CRDS = {"ServiceMonitor", "PrometheusRule"}  # no bundled schema: checked below by hand
# Peak RSS of the image running deploy/k8s's config (production mode) with INGEST_WORKERS =
# key, 50,000 records in 60 s: scripts/image/measure_rss.py --production --workers N.
MEASURED_PEAK_RSS_MIB = {1: 158, 2: 311}


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert m, f"memory quantities here are in Ki/Mi/Gi, got {quantity}"
    return int(m[1]) * units[m[2]]


def dockerfile(instruction: str) -> str:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return [line for line in lines if line.startswith(instruction + " ")][-1].split(" ", 1)[1]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(K8S / "overlays" / request.param)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind]
    assert len(hits) == 1, f"{len(hits)} {kind}"
    return hits[0]


def worker(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "ingest-worker"
    (c,) = containers(dep)
    return dep, c


def service_config(docs: list[dict[str, Any]]) -> C.Config:
    raw = yaml.safe_load(one(docs, "ConfigMap")["data"]["ingest.yaml"])
    return C.Config.model_validate(raw)


def test_every_resource_matches_the_kubernetes_schema(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap", "ServiceAccount", *CRDS} <= kinds  # fmt: skip
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_schema_error_is_caught() -> None:
    """The validation above can fail: a misspelt probe field is refused."""
    _, c = worker(build(K8S / "overlays" / "prod"))
    dep = build(K8S / "overlays" / "prod")
    bad = merge(one(dep, "Deployment"), {"spec": {"template": {"spec": {"containers": [
        {"name": c["name"], "readinessProbe": {"httpGet": {"pth": "/health/ready"}}}]}}}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_probes_ask_the_right_questions(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    _, c = worker(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    cfg = service_config(docs)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == cfg.http.port == 8080
    assert cfg.http.host == "0.0.0.0"
    # Liveness must not restart a pod that is merely draining or briefly slow.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= cfg.health.live_timeout_seconds


def test_grace_period_outlasts_prestop_and_drain(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    dep, c = worker(docs)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = service_config(docs).shutdown.drain_timeout_seconds
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod before intake stops"
    assert grace > pre_stop + drain + WORKER_CLOSE_SECONDS, (grace, pre_stop, drain)
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pod_runs_as_the_image_user_read_only_without_privileges(
    overlay: tuple[str, Any],
) -> None:
    _, docs = overlay
    dep, c = worker(docs)
    pod = dep["spec"]["template"]["spec"]
    uid, gid = (int(x) for x in dockerfile("USER").split(":"))
    assert uid != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid,
                                                                                          gid)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    # What the service writes is on writable emptyDirs: the data dir of the image, and /tmp.
    data_dir = re.search(r"INGEST_DATA_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert data_dir
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in (data_dir[1], "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
        assert not mounts[path].get("readOnly", False)


def test_credentials_come_from_secrets_not_the_configmap(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    dep, c = worker(docs)
    env = {e["name"]: e for e in c["env"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    cred = Path(env["INGEST_CREDENTIALS_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if cred.parent == Path(m["mountPath"]))
    assert "secret" in volumes[mount["name"]] and mount["readOnly"] is True
    for var in ("INGEST_POSTGRES_URL", "INGEST_REDIS_URL"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    cfg = service_config(docs)
    assert isinstance(cfg.state, C.ProductionStateConfig)
    assert cfg.auth.credentials_file is None and not cfg.auth.disabled
    text = one(docs, "ConfigMap")["data"]["ingest.yaml"]
    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", text), "a password in the ConfigMap"
    assert not re.search(r"whsec_|ingt_|whmk_|ik_", text)


def test_service_reaches_the_pods_on_8080(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    dep, c = worker(docs)
    svc = one(docs, "Service")
    assert svc["metadata"]["name"] == "ingest-service"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    http = next(p for p in svc["spec"]["ports"] if p["port"] == 8080)
    assert http["targetPort"] in {p["name"] for p in c["ports"]}


def test_disruption_budget_and_replicas(overlay: tuple[str, Any]) -> None:
    name, docs = overlay
    dep, _ = worker(docs)
    pdb = one(docs, "PodDisruptionBudget")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    if name == "prod":
        assert dep["spec"]["replicas"] == 3
        assert one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3


def test_hpa_scales_on_queue_depth_through_the_adapter(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "ingest-worker"}  # fmt: skip
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    names = [m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert "ingest_queue_depth" in names
    exported = generate_latest(Metrics().registry).decode()
    adapter = yaml.safe_load((K8S / "metrics" / "prometheus-adapter-rules.yaml").read_text())
    served = {r["name"]["as"]: r for r in adapter["rules"]["external"]}
    relabel = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["relabelings"][0]
    for m in hpa["spec"]["metrics"]:
        name = m["external"]["metric"]["name"]
        assert f"# TYPE {name} gauge" in exported, f"the service exports no gauge {name}"
        assert name in served and name in served[name]["metricsQuery"]
        # the HPA's selector is a label the ServiceMonitor puts on every series
        assert m["external"]["metric"]["selector"]["matchLabels"] == {
            relabel["targetLabel"]: relabel["replacement"]}  # fmt: skip
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_resources_cover_the_measured_rss(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    _, c = worker(docs)
    res = c["resources"]
    workers = int(next(e["value"] for e in c["env"] if e["name"] == "INGEST_WORKERS"))
    peak = MEASURED_PEAK_RSS_MIB[workers]
    assert mib(res["requests"]["memory"]) >= 1.2 * peak
    assert mib(res["limits"]["memory"]) >= 2 * peak
    cpu = res["requests"]["cpu"]
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert cores >= workers / 2, "at least half a core per pipeline worker"


def test_servicemonitor_scrapes_metrics(overlay: tuple[str, Any]) -> None:
    _, docs = overlay
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_admin_answers_where_the_runbook_calls_it(overlay: tuple[str, Any]) -> None:
    """`curl -X POST http://ingest-service:8080/admin/drain` (runbook): /admin/* is on the
    Service's port 8080, and the NetworkPolicy lets it in; nothing else leaves but the stores."""
    _, docs = overlay
    cfg = service_config(docs)
    assert cfg.http.admin_port is None
    np_ = one(docs, "NetworkPolicy")
    assert set(np_["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = np_["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": cfg.http.port}] and "from" not in rule
    egress = {p["port"] for r in np_["spec"]["egress"] for p in r["ports"]}
    assert {53, 5432, 6379, 9092} <= egress


def test_prometheusrule_is_generated_from_alerts_yml() -> None:
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    checked_in = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert checked_in == prometheus_rule.render(alerts), (
        "deploy/k8s/base/prometheusrule.yaml is stale: run `uv run python -m "
        "ingest.tools.prometheus_rule > deploy/k8s/base/prometheusrule.yaml`"
    )
    rule = yaml.safe_load(checked_in)
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"]
    assert len([r for g in rule["spec"]["groups"] for r in g["rules"]]) >= 8


def test_prometheusrule_render_notices_a_changed_alert() -> None:
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    changed = alerts.replace("> 60\n", "> 61\n", 1)
    assert changed != alerts
    assert prometheus_rule.render(changed) != (K8S / "base" / "prometheusrule.yaml").read_text()


def test_image_of_the_deployment_is_the_one_make_image_builds() -> None:
    _, c = worker(build(K8S / "base"))
    assert c["image"] == "localhost/ingest:latest"
    # args only: a `command` would replace the image's entry point, tini (the init that
    # reaps a pod's orphaned workers) with it
    assert "command" not in c
    assert c["args"][0] == "run"
    assert dockerfile("ENTRYPOINT") == '["/usr/bin/tini", "-s", "--", "ingest"]'


def test_renderer_merges_lists_of_named_items_like_kustomize() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"},
                                                 {"name": "Y", "value": "2"}]}],
            "args": ["1", "2"]}  # fmt: skip
    patch = {"containers": [{"name": "a", "env": [{"name": "X", "value": "9"}]},
                            {"name": "b"}], "args": ["3"]}  # fmt: skip
    assert merge(base, patch) == {
        "containers": [{"name": "a", "env": [{"name": "X", "value": "9"},
                                             {"name": "Y", "value": "2"}]}, {"name": "b"}],
        "args": ["3"]}  # fmt: skip
