"""The Kubernetes traffic routers a rollout may drive (the ``rollout_routers`` setting), one model per kind.

Each is chosen by ``kind`` (a pydantic discriminated union), and named in settings: a rollout names one
(`kiln rollout NAME --gateway NAME`), never an API server or an object. See
:mod:`kiln.tasks.rollout.k8s_routers` for what each kind does with its object.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator


class _K8sRouterConfig(BaseModel):
    """Where a Kubernetes router's object lives, and how Kiln reaches the API server."""

    model_config = ConfigDict(extra="forbid")
    namespace: str = Field("default", min_length=1, description="Namespace of the routed object.")
    api_url: AnyHttpUrl | None = Field(None, description="Kubernetes API URL with no credentials in it (e.g. "
                                       "`kubectl proxy`'s http://127.0.0.1:8001). Unset: the kubeconfig "
                                       "($KUBECONFIG or ~/.kube/config, `context`), else the pod's service account.")
    context: str | None = Field(None, description="kubeconfig context (unset: the current one).")


class GatewayApiRouterConfig(_K8sRouterConfig):
    """A Gateway API HTTPRoute whose rule sends traffic to two Services, by backendRef weight."""

    kind: Literal["gateway-api"]
    route: str = Field(..., min_length=1, description="HTTPRoute name (gateway.networking.k8s.io/v1).")
    champion_service: str = Field(..., min_length=1, description="Service in front of `kiln serve NAME@champion`.")
    challenger_service: str = Field(..., min_length=1, description="Service in front of the @challenger's server.")
    port: int | None = Field(None, ge=1, le=65535, description="The Services' port in the backendRefs (unset: any).")


class KServeRouterConfig(_K8sRouterConfig):
    """A KServe InferenceService in serverless mode: its predictor's canaryTrafficPercent is the split."""

    kind: Literal["kserve"]
    inference_service: str = Field(..., min_length=1, description="InferenceService name (serving.kserve.io/v1beta1).")


class IstioRouterConfig(_K8sRouterConfig):
    """An Istio VirtualService whose HTTP route sends traffic to two destinations, by weight (a host each, or one
    host's two DestinationRule subsets)."""

    kind: Literal["istio"]
    virtual_service: str = Field(..., min_length=1, description="VirtualService name (networking.istio.io/v1).")
    champion_host: str = Field(..., min_length=1, description="Destination host of `kiln serve NAME@champion`.")
    challenger_host: str = Field(..., min_length=1, description="Destination host of the @challenger's server.")
    champion_subset: str | None = Field(None, description="The champion's subset of its host (unset: none).")
    challenger_subset: str | None = Field(None, description="The challenger's subset of its host (unset: none).")
    port: int | None = Field(None, ge=1, le=65535, description="The destinations' port number (unset: any).")

    @model_validator(mode="after")
    def _two_destinations(self) -> IstioRouterConfig:
        if (self.champion_host, self.champion_subset) == (self.challenger_host, self.challenger_subset):
            raise ValueError("champion and challenger name the same destination; give them different hosts, or "
                             "one host with two subsets")
        return self


RouterConfig = Annotated[GatewayApiRouterConfig | KServeRouterConfig | IstioRouterConfig, Field(discriminator="kind")]
