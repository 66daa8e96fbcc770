"""infra/k8s/progressive/: Kiln's judge for Argo Rollouts and Flagger, schema-checked and held to the code.

No cluster runs here. The built-in kinds are checked by kubernetes-validate (strict), the Argo Rollouts and
Flagger objects by the openAPIV3Schema of their real CRDs (tests/schemas/, source and version in its README),
made strict the way the API server's field validation is (an unknown field is an error, except where the schema
preserves unknown fields). Then the files must agree with the code: the judge's port is the setting's default,
its KILN_* variables are settings, its probe and every URL Argo or Flagger calls are routes the judge has.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from kiln.infra.judge_server import Judge, create_app, parse_args
from kiln.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROGRESSIVE, SCHEMAS = ROOT / "infra" / "k8s" / "progressive", ROOT / "tests" / "schemas"
CRDS = {("argoproj.io", "AnalysisTemplate"): "argo-rollouts-v1.9.1-analysis-template-crd.yaml",
        ("argoproj.io", "Rollout"): "argo-rollouts-v1.9.1-rollout-crd.yaml",
        ("flagger.app", "Canary"): "flagger-v1.44.0-crd.yaml"}
JUDGE_HOST = "kiln-judge.kiln.svc.cluster.local"


def docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(PROGRESSIVE.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in docs() if d["kind"] == kind]
    return doc


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it lists properties and keeps no unknown ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(group: str, kind: str, version: str) -> jsonschema.Validator:
    for crd in yaml.safe_load_all((SCHEMAS / CRDS[(group, kind)]).read_text()):
        if crd and crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
            return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD for {group}/{version} {kind} in {CRDS[(group, kind)]}")


def errors_of(doc: dict[str, Any]) -> list[str]:
    group, version = doc["apiVersion"].split("/")
    validator = crd_validator(group, doc["kind"], version)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_custom_resources_match_their_crds() -> None:
    kinds = set()
    for name, doc in docs():
        if "/" in doc["apiVersion"] and doc["apiVersion"].split("/")[0] in {"argoproj.io", "flagger.app"}:
            kinds.add(doc["kind"])
            assert not errors_of(doc), f"{name}: {errors_of(doc)}"
    assert kinds == {"AnalysisTemplate", "Rollout", "Canary"}


@pytest.mark.parametrize(("kind", "path", "key"), [
    ("AnalysisTemplate", ("spec", "metrics", 0, "provider", "web"), "jsonpath"),  # jsonPath, misspelt
    ("Canary", ("spec", "analysis", "webhooks", 0), "headers"),  # Flagger's webhooks take no headers
    ("Rollout", ("spec", "strategy", "canary", "steps", 0), "setWeigth"),
])
def test_the_crd_check_rejects_an_unknown_field(kind: str, path: tuple, key: str) -> None:
    doc = json.loads(json.dumps(one(kind)))
    target = doc
    for part in path:
        target = target[part]
    target[key] = "x"
    assert any(key in e for e in errors_of(doc))


def test_built_in_kinds_match_kubernetes_strictly() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships the Kubernetes schemas")
    folders = importlib.resources.files(kv) / "kubernetes-json-schema"
    latest = max((p for p in folders.iterdir() if p.name.endswith("-local-strict")),
                 key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])
    built_in = [(n, d) for n, d in docs() if d["apiVersion"] in {"v1", "apps/v1"}]
    for _, doc in built_in:
        kv.validate(doc, latest.name[1:].split("-")[0], strict=True)  # raises on an error or unknown field
    assert {d["kind"] for _, d in built_in} == {"Deployment", "Service"}


def test_kustomization_lists_every_file_in_the_kiln_namespace() -> None:
    kustomization = yaml.safe_load((PROGRESSIVE / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in PROGRESSIVE.glob("*.yaml")} - {"kustomization.yaml"}
    assert all(doc["metadata"]["namespace"] == kustomization["namespace"] == "kiln" for _, doc in docs())
    # Not applied with the base stack: it needs Argo Rollouts or Flagger installed.
    base = yaml.safe_load((ROOT / "infra" / "k8s" / "kustomization.yaml").read_text())
    assert not any("progressive" in r for r in base["resources"])


# ---- the files agree with the code ------------------------------------------------------------------------


def judge_container() -> dict[str, Any]:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def judge_routes() -> set[str]:
    app = create_app(Judge(None, None), "token")  # routes only: nothing is judged
    return {route.path for route in app.routes}


def test_the_judge_deployment_runs_the_judge_on_the_settings_port() -> None:
    container = judge_container()
    module, *argv = container["args"]
    assert module == "kiln.infra.judge_server"
    args = parse_args(argv)
    assert args.port == Settings.model_fields["judge_port"].default == container["ports"][0]["containerPort"]
    assert args.host == "0.0.0.0"
    env = {e["name"] for e in container["env"]}
    assert {"KILN_JUDGE_TOKEN", "KILN_GATEWAY_TOKEN"} <= env
    assert all(n.removeprefix("KILN_").lower() in Settings.model_fields for n in env if n.startswith("KILN_"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in judge_routes()
    (port,) = one("Service")["spec"]["ports"]
    assert port["port"] == args.port and port["targetPort"] == container["ports"][0]["name"]


def called_urls() -> list[str]:
    web = one("AnalysisTemplate")["spec"]["metrics"][0]["provider"]["web"]
    return [web["url"], *(hook["url"] for hook in one("Canary")["spec"]["analysis"]["webhooks"])]


def test_argo_and_flagger_call_routes_the_judge_has() -> None:
    (port,) = one("Service")["spec"]["ports"]
    for url in called_urls():
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == (JUDGE_HOST, port["port"]), url
        assert parts.path in judge_routes(), url
    hooks = one("Canary")["spec"]["analysis"]["webhooks"]
    assert {h["type"] for h in hooks} == {"confirm-rollout", "pre-rollout", "rollout", "confirm-promotion"}
    assert all(h["url"].endswith(f"/judge/flagger/{h['type']}") for h in hooks)
    assert all(set(h["metadata"]) == {"token"} for h in hooks)  # Flagger sends no headers: the token rides here


def test_argo_sends_the_judge_token_from_the_secret_and_reads_the_verdict() -> None:
    template = one("AnalysisTemplate")["spec"]
    args = {a["name"]: a for a in template["args"]}
    assert args["judge-token"]["valueFrom"]["secretKeyRef"] == {"name": "kiln-secrets", "key": "judge-token"}
    (metric,) = template["metrics"]
    assert metric["provider"]["web"]["headers"] == [{"key": "Authorization", "value": "Bearer {{args.judge-token}}"}]
    assert metric["provider"]["web"]["jsonPath"] == "{$.verdict}"
    # Neither condition true (inconclusive) is Argo's Inconclusive: the Rollout pauses for a person.
    assert (metric["successCondition"], metric["failureCondition"]) == ('result == "pass"', 'result == "fail"')
    steps = one("Rollout")["spec"]["strategy"]["canary"]["steps"]
    used = {t["templateName"] for s in steps if "analysis" in s for t in s["analysis"]["templates"]}
    assert used == {one("AnalysisTemplate")["metadata"]["name"]}
