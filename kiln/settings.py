"""The one settings model: environment variables prefixed ``KILN_``, an optional YAML file, defaults.

Everything Kiln writes by default lives under one project folder (``./.kiln``): the MLflow SQLite store,
MLflow artifacts, the stage cache and Prefect's home. Point ``KILN_TRACKING_URI`` at any MLflow server
to use it instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln.credentials import split_credentials
from kiln.errors import ConfigError, unknown_key, validation_problems
from kiln.metrics_config import MetricsSource
from kiln.router_config import RouterConfig
from kiln.yamlfile import read_yaml

_GATEWAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class Settings(BaseSettings):
    """Where Kiln keeps its state and how it measures."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="forbid")

    home: Path = Field(Path(".kiln"), description="Project folder for the embedded MLflow store, cache, logs.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite at <home>/mlflow.db with artifacts in <home>."
    )
    registry_uri: str | None = Field(None, description="MLflow registry URI; default: the tracking URI.")
    experiment: str = Field("kiln", description="MLflow experiment that optimize runs are logged to.")
    threads: int = Field(2, ge=1, le=256, description="Intra-op threads for engines and benchmarks.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    device: str = Field("auto", description="Where fine-tuning, distillation and QAT train: auto (a CUDA GPU when "
                        "torch sees one, else the CPU), cpu, cuda or cuda:N. Engines and benchmarks ignore it.")
    bench_seconds: float = Field(3.0, gt=0, description="Seconds of timed runs per model and batch size.")
    # cost per request (kiln.tasks.evaluate.cost): the load a model must serve, how fast, at what price
    cost_target_p95_ms: float = Field(100.0, gt=0, description="Latency target (p95 ms) cost_per_million is at.")
    cost_expected_rps: float = Field(1000.0, gt=0, description="Expected load (requests/s) for cost_per_million.")
    cost_instance_hour: float = Field(1.0, gt=0, description="Price of one serving instance per hour (no currency).")

    # ---- the local stack (`kiln up`): every service binds to `host` ----
    host: str = Field("127.0.0.1", description="Address the local stack's services bind to (loopback by default).")
    prefect_port: int = Field(4200, ge=1, le=65535, description="Prefect server port (`kiln up`).")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="MLflow tracking server port (`kiln up`).")
    webhook_port: int = Field(8765, ge=1, le=65535, description="Webhook receiver port (`kiln up`).")
    server_port: int = Field(8000, ge=1, le=65535, description="Model server port (OIP v2).")
    server_max_body_bytes: int = Field(8 << 20, ge=1024, description="Largest infer request body a model server "
                                       "takes; larger ones are refused with 413 (`--max-body-bytes`).")
    follow_interval_s: float = Field(5.0, gt=0, description="How often a model server on NAME@ALIAS asks the "
                                     "registry whether the alias moved (`kiln serve --follow-interval`).")
    follow_webhook_interval_s: float = Field(60.0, gt=0, description="How often a model server that registered an "
                                             "MLflow webhook for alias events (`kiln serve --webhook-url`) still "
                                             "polls, in case a delivery is lost; --follow-interval overrides it.")
    gateway_port: int = Field(8080, ge=1, le=65535, description="Canary gateway port.")
    gateway_token: SecretStr | None = Field(None, description="Bearer token of the gateway's admin API.")
    gateway_feedback_token: SecretStr | None = Field(None, description=(
        "Bearer token that POST /feedback also takes besides the admin token (give it to whatever posts true "
        "labels, so it cannot move traffic). Unset: feedback needs the admin token."))
    judge_token: SecretStr | None = Field(None, description=(
        "Bearer token of the judge (`kiln judge serve`), the Argo Rollouts web metric / Flagger webhook endpoint. "
        "Give Argo and Flagger this one, never the gateway's: it reads verdicts and moves no traffic."))
    judge_port: int = Field(8090, ge=1, le=65535, description="Port of the judge (`kiln judge serve`).")
    rollout_lease_s: float | None = Field(None, ge=1, le=3600, description=(
        "The lease a rollout holds on its model, in seconds, and so the TTL of the traffic split it sets: a driver "
        "that dies leaves a split that lapses back to the champion within this time. Unset: the lease's default, "
        "60 s. Shorter reverts sooner; the driver renews every third of it."))
    handover_timeout_s: float = Field(120.0, gt=0, description="After a canary promotes, how long the rollout waits "
                                      "for the gateway's champion upstream (a server following NAME@champion) to "
                                      "serve the new champion before it leaves the split as it is and says what to "
                                      "do: about 2 x follow_interval_s + the time to load the model, with room.")
    # NoDecode: KILN_ROLLOUT_GATEWAYS=prod=http://gw:8080,staging=http://gw2:8080 (a JSON object works too).
    rollout_gateways: Annotated[dict[str, AnyHttpUrl], NoDecode] = Field(default_factory=dict, description=(
        "The gateways a rollout may drive (and send the admin token to), by name: a rollout names one "
        "(`kiln rollout NAME --gateway prod`), never a URL. Empty: {default: http://127.0.0.1:<gateway_port>}."))
    rollout_routers: dict[str, RouterConfig] = Field(default_factory=dict, description=(
        "Kubernetes traffic routers a rollout may drive, by name (`kiln rollout NAME --gateway NAME` takes these "
        "names too): {kind: gateway-api, route, champion_service, challenger_service}, {kind: kserve, "
        "inference_service} or {kind: istio, virtual_service, champion_host, challenger_host, champion_subset, "
        "challenger_subset}, each with namespace, api_url, context. KILN_ROLLOUT_ROUTERS takes JSON."))
    rollout_metrics: dict[str, MetricsSource] = Field(default_factory=dict, description=(
        "Where a rollout may read its evidence, by name (`kiln rollout NAME --metrics prom`): {kind: prometheus, "
        "url, preset: kiln|istio|envoy-gateway|kserve, queries, selector, namespace, upstreams, variables}. "
        "'gateway' (the default) is always the router's own windows. KILN_ROLLOUT_METRICS takes JSON."))
    prometheus_token: SecretStr | None = Field(None, description="Bearer token sent to the Prometheus servers of "
                                               "rollout_metrics, if they need one.")

    # ---- monitoring the served champion (`kiln monitor`, the kiln-monitor deployment) ----
    monitor_models: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Models the kiln-monitor deployment judges on a schedule (one schedule each); comma-separated in "
        "KILN_MONITOR_MODELS. Empty: the deployment runs only when started by hand."))
    monitor_interval_s: float = Field(3600.0, ge=60, description="Seconds between scheduled monitor evaluations.")
    monitor_notify_secret: SecretStr | None = Field(None, description=(
        "HMAC key of the monitor's notify webhook (X-Kiln-Signature: sha256=<hex of the body>); unset: unsigned."))
    prefect_api_url: str | None = Field(None, description="Prefect API for deployments; default: PREFECT_API_URL.")

    # ---- content drift on live traffic ----
    gateway_text_sample: int = Field(2000, ge=0, le=1_000_000, description=(
        "How many of the most recent input texts the gateway keeps per window for the content and embedding drift "
        "checks (`kiln gateway --text-sample`): in memory only, served only with the admin token, never written "
        "by the gateway. 0 keeps none (input drift then sees lengths only)."))

    # ---- labelled feedback as data (the gateway writes it, `kiln feedback`, retrain feedback_days read it) ----
    feedback_store: str | None = Field(None, description=(
        "Where the gateway writes scored feedback rows as Parquet (text, label, prediction, answering version): a "
        "folder, or s3://bucket/prefix (with s3_endpoint_url/s3_region and the AWS credential chain). Default "
        "<home>/feedback; 'off' keeps none."))
    feedback_retention_days: int = Field(90, ge=1, le=36_500, description=(
        "Feedback day partitions older than this are deleted by `kiln feedback prune` and before a retrain reads "
        "feedback (never by the gateway)."))
    feedback_flush_rows: int = Field(500, ge=1, le=1_000_000, description=(
        "The gateway writes its buffered feedback rows once this many are waiting ..."))
    feedback_flush_s: float = Field(10.0, gt=0, le=86_400, description="... or at least this often, seconds.")

    # ---- search: `kiln optimize --search` (an Optuna study of generated recipes) ----
    search_storage: SecretStr | None = Field(None, description=(
        "Optuna RDB storage URL for search studies (e.g. postgresql://user:pass@host:5432/optuna); default: "
        "SQLite at <home>/search.db. A re-run with the same model, data and space resumes its study."))
    search_parallel: int = Field(1, ge=1, le=64, description=(
        "Search trials built at the same time (Optuna ask/tell in batches; latency is still timed one at a time)."))

    # ---- configured stores: PostgreSQL and S3 ----
    database_url: SecretStr | None = Field(None, description=(
        "PostgreSQL URL (postgresql://user:pass@host:5432/db) for MLflow and Prefect in `kiln up`; default SQLite. "
        "Its password reaches the servers through their environment, never their command line."))
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for artifacts (SeaweedFS, MinIO); None = AWS.")
    s3_bucket: str | None = Field(None, description="Bucket for MLflow artifacts and engines; set to use S3.")
    s3_region: str = Field("us-east-1", description="S3 region name.")

    # ---- triggers: git pushes and registry events ----
    webhook_secret: SecretStr | None = Field(None, description="GitHub webhook secret (X-Hub-Signature-256 HMAC).")
    gitlab_token: SecretStr | None = Field(None, description="GitLab webhook secret token (X-Gitlab-Token).")
    mlflow_webhook_secret: SecretStr | None = Field(None, description="Secret of MLflow registry webhooks.")
    webhook_repository: str | None = Field(None, description="Only pushes to this repository (owner/name) retrain.")
    webhook_branch: str = Field("main", description="Only pushes to this branch retrain.")
    webhook_max_body: int = Field(1_048_576, ge=1024, description="Largest webhook body accepted, bytes.")
    # NoDecode: KILN_WEBHOOK_REPOSITORIES=https://github.com/acme/models.git,... (a JSON list works too).
    webhook_repositories: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Clone URLs a push may name when KILN_REPO is unset; the run clones the listed URL. With neither set, "
        "pushes are refused (503): a URL only the payload names is never cloned."))
    train_models: Annotated[list[str] | None, NoDecode] = Field(None, description=(
        "Model names a pushed kiln-train.yaml may train into (a list, or a,b). Unset or empty: only names "
        "already registered. A retrained version never gets an alias by itself, a new name's first one included."))
    repo: str | None = Field(None, description="Git repository (path or URL) holding the training config; "
                             "credentials written into its URL move to repo_token.")
    repo_token: SecretStr | None = Field(None, description=(
        "Credentials the worker clones over http(s) with, sent only to KILN_REPO's host: USER:TOKEN, or a token "
        "alone (sent as x-access-token:TOKEN, GitHub's form). Never part of a run's parameters."))
    watch_models: list[str] = Field(default_factory=list, description="Registered models whose new versions "
                                    "start the optimize flow.")
    poll_interval_s: float = Field(10.0, gt=0, description="Registry polling interval when webhooks are off.")

    # ---- who acts and who may approve (None: not set here, so the approval policy file decides) ----
    user: str | None = Field(None, description="Who is acting, recorded in tags and the audit log; default: "
                             "the login name. Set it in CI and on workers.")
    # NoDecode: KILN_APPROVERS=alice,bob stays a comma list, as it always was (JSON lists work too).
    approvers: Annotated[list[str] | None, NoDecode] = Field(None, description=(
        "Principals of allowed_signers who may approve or reject a challenger (a list, or alice,bob); beats the "
        "approval policy file. Unset there too: every principal allowed_signers lists for kiln-approval."))
    four_eyes: bool | None = Field(None, description="Whoever requested the work (signed request) may not approve "
                                   "it, and without a signed request two approvers must; beats the approval policy "
                                   "file (default there: false).")
    approval_policy: Path | None = Field(None, description="Approval policy YAML (approvers:, four_eyes:); "
                                         "default: <home>/approvers.yaml when present.")
    allowed_signers: Path | None = Field(None, description=(
        "The approvers' public keys, ssh-keygen's allowed_signers format (`PRINCIPAL KEYTYPE PUBLICKEY` per line, "
        "as git uses): a decision, request or rollout command counts only when its signature verifies against "
        "it. Default: <home>/allowed_signers."))
    signing_key: Path | None = Field(None, description=(
        "Your SSH private key (or its .pub, with the key in ssh-agent), used by `kiln approve|reject`, "
        "`kiln rollout pause|resume|promote|abort` and `kiln optimize --sign`; --key overrides it."))

    # ---- generation budgets for causal LMs (mlflow.pyfunc predict params) ----
    max_new_tokens_limit: int = Field(256, ge=1, le=8192, description="The most new tokens one request may ask a "
                                      "causal LM for (pyfunc predict params=max_new_tokens); more is refused.")

    # ---- LLM serving ----
    # Per-request budgets of the model server's causal LMs (infer, generate, generate_stream), refused with a 4xx
    # before any decoding; max_new_tokens_limit above is the one for new tokens.
    llm_max_prompt_tokens: int = Field(1024, ge=1, le=1 << 20, description="The most prompt tokens one generate "
                                       "request may send (never more than the package's seq_len); more is refused.")
    llm_max_batch_tokens: int = Field(4096, ge=1, le=1 << 24, description="The most rows x max_new_tokens one "
                                      "request may ask a causal LM to decode; more is refused (413).")

    # ---- fan-out: where candidate builds and search trials run (flows/runners.py) ----
    task_runner: Literal["thread", "dask"] = Field("thread", description="Prefect task runner for builds and "
                                                    "trials: thread (one worker thread, as before) or dask (needs "
                                                    "the fanout extra). Latency benchmarks stay serial either way.")
    dask_address: str | None = Field(None, description="Dask scheduler to send builds to (tcp://host:8786), e.g. "
                                     "on Kubernetes; default: a local cluster of dask_workers processes per run.")
    dask_workers: int = Field(2, ge=1, le=256, description="Worker processes of the local Dask cluster.")

    @field_validator("approvers", "webhook_repositories", "train_models", "monitor_models", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)  # invalid JSON: a ValueError, reported as one line naming the field
        return [v.strip() for v in value.split(",") if v.strip()]

    @field_validator("rollout_gateways", mode="before")
    @classmethod
    def _name_equals_url(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("{"):
            return json.loads(value)  # invalid JSON: a ValueError, reported as one line naming the field
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("write name=URL pairs separated by commas, e.g. default=http://127.0.0.1:8080")
        return {name.strip(): url.strip() for name, _, url in pairs}

    @field_validator("rollout_gateways")
    @classmethod
    def _gateway_names(cls, value: dict[str, AnyHttpUrl]) -> dict[str, AnyHttpUrl]:
        for name, url in value.items():
            if not _GATEWAY_NAME.fullmatch(name):
                raise ValueError(f"gateway name {name!r}: use letters, digits, '.', '_' or '-'")
            if url.username or url.password:
                raise ValueError(f"gateway {name!r}: no credentials in the URL; the admin token is "
                                 "KILN_GATEWAY_TOKEN")
        return value

    @model_validator(mode="after")
    def _router_names(self) -> Settings:
        for name in self.rollout_routers:
            if not _GATEWAY_NAME.fullmatch(name):
                raise ValueError(f"router name {name!r}: use letters, digits, '.', '_' or '-'")
        if both := sorted(set(self.rollout_routers) & set(self.rollout_gateways)):
            raise ValueError(f"{', '.join(both)} named in both rollout_gateways and rollout_routers; rename one")
        return self

    @model_validator(mode="before")
    @classmethod
    def _repo_credentials(cls, data: Any) -> Any:
        """Credentials in KILN_REPO move to ``repo_token``: ``repo`` is shown and recorded, a SecretStr never."""
        repo = data.get("repo") if isinstance(data, dict) else None
        public, credentials = split_credentials(repo) if isinstance(repo, str) else (repo, None)
        if credentials is None:
            return data
        if data.get("repo_token"):
            raise ValueError("repo carries credentials and repo_token is set too; keep one (KILN_REPO_TOKEN)")
        return data | {"repo": public, "repo_token": credentials}

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"KILN_DEVICE={value!r}: use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
        if value.startswith("cuda"):  # torch is imported only when CUDA is asked for: `kiln --help` stays quick
            import torch

            index, count = int(value.partition(":")[2] or 0), torch.cuda.device_count()
            if not torch.cuda.is_available() or index >= count:
                raise ValueError(f"KILN_DEVICE={value} but torch sees {count} CUDA GPU(s) here; "
                                 "set KILN_DEVICE=auto or cpu")
        return value

    @field_validator("home")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def embedded(self) -> bool:
        """True when Kiln owns the store (SQLite under ``home``) rather than a configured server."""
        return self.tracking_uri is None

    def gateways(self) -> dict[str, str]:
        """The rollout's allow-list, name → base URL (default: the local gateway on ``gateway_port``)."""
        if self.rollout_gateways:
            return {name: str(url).rstrip("/") for name, url in self.rollout_gateways.items()}
        return {"default": f"http://127.0.0.1:{self.gateway_port}"}

    def gateway_url(self, name: str) -> str:
        """The URL of the gateway called ``name``; a :class:`ConfigError` listing the known names otherwise."""
        known = self.gateways()
        if name not in known:
            raise ConfigError(f"unknown gateway {name!r}; a rollout may drive only the gateways named in the "
                              f"rollout_gateways setting: {', '.join(sorted(known))} (add it in kiln.yaml or "
                              "KILN_ROLLOUT_GATEWAYS)" + (f", or the routers of rollout_routers: "
                              f"{', '.join(sorted(self.rollout_routers))}" if self.rollout_routers else ""))
        return known[name]

    def signers_file(self) -> Path:
        """The approvers' allowed_signers file: the ``allowed_signers`` setting, else ``<home>/allowed_signers``."""
        return self.allowed_signers or self.home / "allowed_signers"

    def ensure_dirs(self) -> None:
        for path in (self.home, self.artifact_root, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from (lowest to highest) defaults, a YAML file, ``KILN_*`` variables, overrides.

    The file defaults to ``$KILN_CONFIG`` or ``./kiln.yaml`` when present.
    """
    path = config_file or (Path(os.environ["KILN_CONFIG"]) if "KILN_CONFIG" in os.environ else None)
    if path is None and Path("kiln.yaml").is_file():
        path = Path("kiln.yaml")
    file_values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; create it or unset KILN_CONFIG")
        file_values = read_yaml(path, f"config file {path}") or {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {path} must be a mapping of setting: value")
        unknown = [unknown_key(key, list(Settings.model_fields)) for key in file_values
                   if key not in Settings.model_fields]
        if unknown:  # a misspelt setting is an error, not a silent default
            raise ConfigError(f"config file {path}: {'; '.join(unknown)}")
    env_keys = {name for name in Settings.model_fields if f"KILN_{name.upper()}" in os.environ}
    # Environment beats the file: drop file keys that the environment sets.
    merged = {k: v for k, v in file_values.items() if k not in env_keys} | {
        k: v for k, v in overrides.items() if v is not None
    }
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = validation_problems(exc, model=Settings)
        where = f"config file {path}" if path is not None else "config file"
        raise ConfigError(f"invalid settings ({problems}); fix the KILN_* variable or {where}") from exc
