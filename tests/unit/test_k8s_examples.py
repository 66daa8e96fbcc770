"""infra/k8s/monitoring/, infra/k8s/traffic/ and the Kubernetes work pool's storage: schema-checked, held to the code.

No cluster runs here. The Prometheus Operator's ServiceMonitor / PodMonitor are checked against the real CRDs
(tests/schemas/, source and version in its README), strict the way the API server's field validation is; the
HTTPRoute against the Gateway API CRD and the InferenceService against KServe's schema, as the routers' API
stand-in does (tests/k8s_api.py). Then the files must agree with the code and with each other: the monitors
select the gateway's Service and the model servers' pods on ports and paths those servers have; the router and
metrics settings the traffic examples document parse as Settings, and Kiln's routers, run against the stand-in
serving the examples, accept them and move their split. The kiln-kubernetes work pool's job template is
Prefect's default plus a PersistentVolumeClaim at KILN_HOME, and the Job it renders is a valid Kubernetes Job.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kiln.settings import Settings
from kiln.tasks.rollout.judge import load_spec
from kiln.tasks.rollout.router import Split
from tests import k8s_api
from tests.unit.test_deploy_files import container_argv, containers, has_route, k8s_env, kiln_apps
from tests.unit.test_progressive_manifests import strict

ROOT = Path(__file__).resolve().parents[2]
K8S, SCHEMAS = ROOT / "infra" / "k8s", ROOT / "tests" / "schemas"
MONITORING, TRAFFIC = K8S / "monitoring", K8S / "traffic"
CRDS = {"ServiceMonitor": "prometheus-operator-v0.93.0-servicemonitors.yaml",
        "PodMonitor": "prometheus-operator-v0.93.0-podmonitors.yaml"}
KSERVE_POD_LABEL = "serving.kserve.io/inferenceservice"  # KServe's constants.InferenceServicePodLabelKey
SERVER_PORT = 8000  # the model servers' container port in ../model-server.yaml


def docs(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def one(folder: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in docs(folder) if d["kind"] == kind]
    return doc


def base_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


@functools.cache
def monitor_validator(kind: str) -> jsonschema.Validator:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("monitoring.coreos.com", kind)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


def errors_of(doc: dict[str, Any], validator: jsonschema.Validator) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@functools.cache
def kserve_validator() -> jsonschema.Validator:
    return k8s_api.kserve_validator()


@functools.cache
def httproute_validator() -> jsonschema.Validator:
    return k8s_api.httproute_validator()


# ---- schemas ------------------------------------------------------------------------------------------------


def test_monitors_match_the_prometheus_operator_crds() -> None:
    kinds = []
    for name, doc in docs(MONITORING):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1", name
        kinds.append(doc["kind"])
        errors = errors_of(doc, monitor_validator(doc["kind"]))
        assert not errors, f"{name}: {errors}"
    assert sorted(kinds) == ["PodMonitor", "ServiceMonitor"]


@pytest.mark.parametrize(("kind", "endpoints"), [("ServiceMonitor", "endpoints"),
                                                  ("PodMonitor", "podMetricsEndpoints")])
def test_the_monitor_check_rejects_an_unknown_field(kind: str, endpoints: str) -> None:
    doc = copy.deepcopy(one(MONITORING, kind))
    doc["spec"][endpoints][0]["metricsPath"] = "/metrics"  # Prometheus' own name for it; the CRD says `path`
    assert any("metricsPath" in e for e in errors_of(doc, monitor_validator(kind)))


def test_traffic_examples_match_the_gateway_api_and_kserve_schemas() -> None:
    route, isvc = one(TRAFFIC, "HTTPRoute"), one(TRAFFIC, "InferenceService")
    assert not errors_of(route, httproute_validator())
    assert not errors_of(isvc, kserve_validator())
    bad = copy.deepcopy(route)
    bad["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    assert errors_of(bad, httproute_validator())
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["canaryTrafficPercnt"] = 0
    assert errors_of(bad, kserve_validator())


@pytest.mark.parametrize("folder", [MONITORING, TRAFFIC], ids=lambda p: p.name)
def test_kustomization_lists_every_file_in_the_kiln_namespace_apart_from_the_base(folder: Path) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert all(doc["metadata"]["namespace"] == kustomization["namespace"] == "kiln" for _, doc in docs(folder))
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())  # they need the Operator / Knative / a Gateway
    assert not any(folder.name in r for r in base["resources"])


# ---- the monitors scrape what the servers serve ----------------------------------------------------------------


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        value = labels.get(expr["key"])
        values = expr.get("values", [])
        ok = ok and {"Exists": value is not None, "DoesNotExist": value is None,
                     "In": value in values, "NotIn": value not in values}[expr["operator"]]
    return ok


def test_the_service_monitor_scrapes_the_gateways_metrics_route(monkeypatch, tmp_path: Path) -> None:
    monitor = one(MONITORING, "ServiceMonitor")["spec"]
    (service,) = [d for d in base_docs() if d["kind"] == "Service" and _matches(monitor["selector"],
                                                                                 d["metadata"]["labels"])]
    assert service["metadata"]["namespace"] in monitor["namespaceSelector"]["matchNames"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    (gateway,) = [c for owner, c in containers() if owner == "kiln-gateway"]
    app = kiln_apps(monkeypatch, tmp_path, container_argv(gateway), k8s_env(gateway) | {"KILN_GATEWAY_TOKEN": "t"})
    assert has_route(app, endpoint["path"])


def isvc_containers() -> list[tuple[str, dict[str, Any]]]:
    isvcs = [d for d in base_docs() if d["kind"] == "InferenceService"] + [one(TRAFFIC, "InferenceService")]
    return [(d["metadata"]["name"], c) for d in isvcs for c in d["spec"]["predictor"].get("containers", [])
            if c["image"].startswith("kiln/serve")]


def test_the_pod_monitor_scrapes_every_kiln_model_server_on_its_metrics_route() -> None:
    from kiln.infra.server import create_app, parse_args

    monitor = one(MONITORING, "PodMonitor")["spec"]
    assert monitor["selector"] == {"matchExpressions": [{"key": KSERVE_POD_LABEL, "operator": "Exists"}]}
    kiln_endpoint, queue_proxy = monitor["podMetricsEndpoints"]
    servers = isvc_containers()
    assert len(servers) == 3  # champion, challenger (Standard mode) and the serverless canary example
    app = create_app({"model": object()})
    for name, c in servers:
        argv = container_argv(c)
        args = parse_args(argv[3:])
        assert args.port == kiln_endpoint["portNumber"] == SERVER_PORT, name
        assert kiln_endpoint["portNumber"] in {p["containerPort"] for p in c["ports"]}, name  # else it is dropped
        assert has_route(app, kiln_endpoint["path"]), name
    # Knative's queue-proxy (knative.dev/serving: UserQueueMetricsPortName), on serverless predictors only.
    assert (queue_proxy["port"], queue_proxy["path"]) == ("http-usermetric", "/metrics")


def test_the_serverless_example_can_canary_and_pins_one_version_per_revision() -> None:
    from kiln.infra.server import parse_args
    from kiln.tasks.rollout.k8s_routers import DEPLOYMENT_MODE, NO_CANARY_MODES

    isvc = one(TRAFFIC, "InferenceService")
    assert isvc["metadata"]["annotations"][DEPLOYMENT_MODE] == "Knative"
    assert "Knative" not in NO_CANARY_MODES
    predictor = isvc["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 0 and predictor["minReplicas"] >= 1
    (container,) = predictor["containers"]
    (model,) = parse_args(container_argv(container)[3:]).model
    assert re.fullmatch(r"[\w.-]+/\d+", model), "a revision must serve one version: NAME/VERSION, not NAME@ALIAS"
    assert "securityContext" not in predictor  # Knative refuses a pod securityContext unless a feature flag is on
    assert [p["name"] for p in container["ports"]] == ["http1"]  # Knative: one port, http1 or h2c


# ---- the settings the traffic examples document, and Kiln's routers on them -------------------------------------


def documented_settings() -> dict[str, Any]:
    """The kiln.yaml block in traffic/kustomization.yaml's comment, parsed."""
    lines = (TRAFFIC / "kustomization.yaml").read_text().splitlines()
    start = lines.index("# kiln.yaml:") + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    return yaml.safe_load("\n".join(block))


def test_the_documented_router_and_metrics_settings_fit_the_examples(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, **documented_settings())
    route, isvc = one(TRAFFIC, "HTTPRoute"), one(TRAFFIC, "InferenceService")
    gw, ks = settings.rollout_routers["route"], settings.rollout_routers["kserve"]
    assert (gw.kind, gw.route, gw.namespace) == ("gateway-api", route["metadata"]["name"], "kiln")
    assert (ks.kind, ks.inference_service, ks.namespace) == ("kserve", isvc["metadata"]["name"], "kiln")
    # The HTTPRoute's backends are the Services KServe makes for ../model-server.yaml (<name>-predictor, port 80),
    # and the istio preset's upstreams are their workloads (the Deployments of the same name).
    predictors = {d["metadata"]["labels"]["kiln.dev/alias"]: f"{d['metadata']['name']}-predictor"
                  for d in base_docs() if "kiln.dev/alias" in d["metadata"].get("labels", {})}
    assert (gw.champion_service, gw.challenger_service) == (predictors["champion"], predictors["challenger"])
    assert {r["name"] for r in route["spec"]["rules"][0]["backendRefs"]} == set(predictors.values())
    prom, knative = settings.rollout_metrics["prom"], settings.rollout_metrics["knative"]
    assert (prom.preset, prom.namespace, prom.upstreams) == ("istio", "kiln", predictors)
    assert (knative.preset, knative.namespace) == ("kserve", "kiln")
    assert all(v.startswith(f"{isvc['metadata']['name']}-predictor-") for v in knative.upstreams.values())


class _Windows:
    """What build_router pairs a router with: the champion's side already serves the promoted version."""

    def next_window(self) -> dict[str, Any]:
        raise AssertionError("no analysis here")

    def served_versions(self) -> dict[str, str | None]:
        return {"champion": "2", "challenger": "2"}


@pytest.fixture(scope="module")
def examples_api():
    """The routers' API stand-in (every stored body schema-checked) holding the two traffic examples."""
    from kubernetes import client

    gw, ks = ("gateway.networking.k8s.io", "v1", "httproutes"), ("serving.kserve.io", "v1beta1", "inferenceservices")
    with k8s_api.serve({gw: httproute_validator(), ks: kserve_validator()}) as api:
        with k8s_api.api_client(api.url) as c:
            objects = client.CustomObjectsApi(c)
            for key, kind in ((gw, "HTTPRoute"), (ks, "InferenceService")):
                objects.create_namespaced_custom_object(key[0], key[1], "kiln", key[2],
                                                        copy.deepcopy(one(TRAFFIC, kind)))
        yield api


def _router(api, name: str, tmp_path: Path):
    from kiln.tasks.rollout.k8s_routers import build_router

    settings = Settings(home=tmp_path, **documented_settings())
    return build_router(settings.rollout_routers[name], _Windows(), handover_timeout_s=1,
                        api_client=k8s_api.api_client(api.url))


def test_the_gateway_api_router_drives_the_example_httproute(examples_api, tmp_path: Path) -> None:
    from kiln.tasks.rollout.params import DEFAULT_SPEC

    canary = _router(examples_api, "route", tmp_path)
    try:
        canary.router.check_spec(load_spec(DEFAULT_SPEC))  # the default preset, shadow step included
        assert canary.read_split() == Split(0.0, 0.0)
        canary.set_split(Split(10.0, 0.5), ttl_s=60)  # weights and a RequestMirror, accepted by the schema
        assert canary.read_split() == Split(10.0, 0.5)
        assert canary.promote("2") == ""  # the champion's Service serves v2: everything on it
        assert canary.read_split() == Split(0.0, 0.0)
    finally:
        canary.close()
    assert not examples_api.refused


def test_the_kserve_router_drives_the_example_inference_service(examples_api, tmp_path: Path) -> None:
    canary = _router(examples_api, "kserve", tmp_path)
    try:
        canary.router.check_spec(load_spec({"steps": [{"weight": 10}, {"weight": 50}, {"weight": 100}]}))
        canary.set_split(Split(10.0, 0.0), ttl_s=60)
        assert canary.read_split() == Split(10.0, 0.0)
        assert canary.promote("2") == ""
        obj = examples_api.get("serving.kserve.io", "v1beta1", "kiln", "inferenceservices", "sentiment")
        assert "canaryTrafficPercent" not in obj["spec"]["predictor"]  # the canary is the default now
    finally:
        canary.close()
    assert not examples_api.refused


# ---- the Kubernetes work pool's Jobs keep KILN_HOME on a PersistentVolumeClaim ------------------------------------


JOB_TEMPLATE = K8S / "prefect-job-template.json"


def worker_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / "prefect-worker.yaml").read_text()) if d]


def test_the_job_template_is_prefects_default_plus_the_kiln_home_claim() -> None:
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    ours = json.loads(JOB_TEMPLATE.read_text())
    # Every variable Prefect defines, unchanged (deployments' job_variables are checked against them).
    assert {k: v for k, v in ours["variables"]["properties"].items() if k in default["variables"]["properties"]} \
        == default["variables"]["properties"]
    assert set(ours["variables"]["properties"]) - set(default["variables"]["properties"]) == {"kiln_home_claim"}
    assert set(ours["job_configuration"]) == set(default["job_configuration"])
    assert {k: v for k, v in ours["job_configuration"].items() if k != "job_manifest"} == \
        {k: v for k, v in default["job_configuration"].items() if k != "job_manifest"}


def rendered_job(prefect_yaml: dict[str, Any]) -> dict[str, Any]:
    """The Job the kiln-kubernetes worker creates for a kiln-optimize run: the template filled with the variables'
    defaults and the deployment's job_variables, as Prefect's worker does (before it adds its own env)."""
    from prefect.utilities.templating import apply_values

    template = json.loads(JOB_TEMPLATE.read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    (deployment,) = [d for d in prefect_yaml["deployments"] if d["name"] == "kiln-optimize"]
    values |= deployment["work_pool"]["job_variables"] | {"name": "kiln-optimize-run",
                                                          "command": ["prefect", "flow-run", "execute"]}
    values["env"] = [{"name": k, "value": v} for k, v in values.get("env", {}).items()]
    return apply_values(template["job_configuration"], values)["job_manifest"]


def test_the_rendered_job_is_a_valid_kubernetes_job_with_kiln_home_on_the_claim() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships the Kubernetes schemas")
    prefect_yaml = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    job = rendered_job(prefect_yaml)
    folders = importlib.resources.files(kv) / "kubernetes-json-schema"
    latest = max((p for p in folders.iterdir() if p.name.endswith("-local-strict")),
                 key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])
    kv.validate(job, latest.name[1:].split("-")[0], strict=True)  # raises on an error or unknown field
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    config = next(d for d in base_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kiln-config")
    assert env["KILN_HOME"] == config["data"]["KILN_HOME"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["KILN_HOME"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (claim,) = [d for d in worker_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # Jobs of several runs, on any node, share it
    assert pod["securityContext"]["fsGroup"] == 10001  # the kiln/worker image's user can write to the volume


def test_the_worker_creates_the_pool_with_the_template_kustomize_mounts() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "prefect-job-template"]
    assert generator["files"] == [JOB_TEMPLATE.name]
    deployment = next(d for d in worker_docs() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = container["args"][container["args"].index("--base-job-template") + 1]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generator["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert path == f"{mount['mountPath']}/{JOB_TEMPLATE.name}"
    assert "--base-job-template infra/k8s/prefect-job-template.json" in (ROOT / "infra" / "prefect.yaml").read_text()
