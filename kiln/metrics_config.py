"""Where a rollout's evidence comes from (the ``rollout_metrics`` setting), by name.

A rollout names a source (`kiln rollout NAME --metrics prom`), never a URL: the operator lists them in
kiln.yaml. ``gateway`` (always there, the default) is the router's own analysis windows (the Kiln gateway's);
a ``prometheus`` source reads the same figures as PromQL from a Prometheus server. The templates themselves,
their presets and their placeholders are :mod:`kiln.tasks.rollout.prometheus`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

GATEWAY_WINDOWS = "gateway"  # the name of the default source: the router's own windows


class MetricsSource(BaseModel):
    """One source of analysis windows: ``kind: gateway`` (the router's own) or ``kind: prometheus``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gateway", "prometheus"] = Field("prometheus", description="gateway: the router's own windows "
                                                   "(the Kiln gateway's); prometheus: PromQL over url.")
    url: AnyHttpUrl | None = Field(None, description="Prometheus base URL (e.g. http://prometheus:9090), no "
                                   "credentials in it (the bearer token is KILN_PROMETHEUS_TOKEN).")
    preset: Literal["kiln", "istio", "envoy-gateway", "kserve"] = Field("kiln", description=(
        "The query set to start from: kiln (the Kiln gateway's metrics), istio, envoy-gateway or kserve."))
    queries: dict[str, Any] = Field(default_factory=dict, description=(
        "Templates that replace the preset's, by metric: requests, errors, latency_p95_ms, latency_p99_ms, "
        "compared, agreed, feedback, correct, versions, version_label, and shadow: {...} for mirrored traffic."))
    namespace: str = Field("", description="Fills {namespace} in the templates (a Kubernetes namespace).")
    selector: str = Field("", description="Extra label matchers for {selector} (e.g. job=\"kiln-gateway\"), so "
                          "one Prometheus can hold several gateways' metrics apart.")
    upstreams: dict[str, str] = Field(default_factory=dict, description=(
        "Fills {upstream}: the name the metrics give each role (champion, challenger), e.g. its Service or "
        "workload; default: the role's name."))
    variables: dict[str, str] = Field(default_factory=dict, description="More {name} placeholders and their values.")
    timeout_s: float = Field(10.0, gt=0, le=120, description="Per query.")

    @model_validator(mode="after")
    def _prometheus_has_url(self) -> MetricsSource:
        if self.kind == "prometheus" and self.url is None:
            raise ValueError("a prometheus source needs url (e.g. http://prometheus:9090)")
        if self.url is not None and (self.url.username or self.url.password):
            raise ValueError("no credentials in the Prometheus URL; the bearer token is KILN_PROMETHEUS_TOKEN")
        if unknown := sorted(set(self.upstreams) - {"champion", "challenger"}):
            raise ValueError(f"upstreams names roles champion and challenger, not {', '.join(unknown)}")
        return self
