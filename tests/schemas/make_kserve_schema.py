"""Write kserve-inferenceservice-v1beta1.json: a JSON schema of KServe's InferenceService (v1beta1).

No PyPI package ships KServe's CRD schemas, and the CRD (config/crd/full/...) is a 1 MB YAML file. The
KServe Python SDK does ship the API types, generated from the same Go structs: every
``kserve/models/v1beta1_*.py`` has ``openapi_types`` (field: type) and ``attribute_map`` (field: JSON
key). This script reads them with ``ast`` (nothing is imported) and writes a schema where every KServe
object rejects unknown keys, and Kubernetes types (``V1Container``, ``V1Probe``, ...) point into the
Kubernetes definitions that ``kubernetes-validate`` ships, registered under their ``$id`` at test time.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve && unzip -q /tmp/kserve/*.whl -d /tmp/kserve/x
    python tests/schemas/make_kserve_schema.py /tmp/kserve/x/kserve/models

``status`` is left open: manifests do not write it.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
import sys
from pathlib import Path

K8S_ID = "https://kubernetes.io/api/_definitions.json"
OUT = Path(__file__).with_name("kserve-inferenceservice-v1beta1.json")
SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
           "bool": {"type": "boolean"}, "object": {}, "datetime": {"type": "string"}}
# Types the SDK names after their Go package rather than V1<Name>.
K8S_ALIASES = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
               "V1beta1MetricQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",  # no SDK class
               "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
               "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior":
                   "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}
# Fields the Go API requires but the SDK does not check.
REQUIRED = {"V1beta1InferenceServiceSpec": ["predictor"]}


def _dict_literal(tree: ast.Module, name: str) -> dict[str, str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"no {name} in the module")


def _class_files(models: Path) -> dict[str, Path]:
    """Each SDK model class by the file defining it (file names split acronyms unpredictably: onnx_runtime)."""
    found = {}
    for path in models.glob("v1*.py"):
        if m := re.search(r"^class (V1\w+)\(", path.read_text(), re.MULTILINE):
            found[m.group(1)] = path
    return found


class Builder:
    def __init__(self, models: Path, k8s_defs: set[str]) -> None:
        self.files, self.k8s_defs, self.defs, self.unknown = _class_files(models), k8s_defs, {}, set()

    def k8s_ref(self, type_name: str) -> dict:
        name = K8S_ALIASES.get(type_name)
        if name is None:
            short = type_name[2:]  # V1Container -> Container
            for prefix in ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1."):
                if prefix + short in self.k8s_defs:
                    name = prefix + short
                    break
        if name is None or name not in self.k8s_defs:
            self.unknown.add(type_name)
            return {"type": "object"}  # a Kubernetes type this Kubernetes release does not define
        return {"$ref": f"{K8S_ID}#/$defs/{name}"}

    def type_schema(self, spec: str) -> dict:
        if spec in SCALARS:
            return dict(SCALARS[spec])
        if m := re.fullmatch(r"list\[(.+)\]", spec):
            return {"type": "array", "items": self.type_schema(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", spec):
            return {"type": "object", "additionalProperties": self.type_schema(m.group(1))}
        if re.match(r"V1(alpha|beta)\d", spec) and spec not in K8S_ALIASES:
            self.model(spec)
            return {"$ref": f"#/$defs/{spec}"}
        return self.k8s_ref(spec)

    def model(self, type_name: str) -> None:
        if type_name in self.defs:
            return
        self.defs[type_name] = {}  # placeholder: recursion stops here
        tree = ast.parse(self.files[type_name].read_text())
        types, keys = _dict_literal(tree, "openapi_types"), _dict_literal(tree, "attribute_map")
        required = REQUIRED.get(type_name, []) + [
            keys[f] for f in types if f"Invalid value for `{f}`, must not be `None`" in ast.unparse(tree)]
        props = {keys[f]: ({} if keys[f] == "status" else self.type_schema(t)) for f, t in types.items()}
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            schema["required"] = sorted(set(required))
        self.defs[type_name] = schema


def main(models: Path) -> None:
    dist = sorted(models.parent.parent.glob("kserve-*.dist-info"))
    sdk = dist[-1].name.removesuffix(".dist-info").replace("-", " ") if dist else "kserve (version unknown)"
    defs_file = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    latest = sorted((p for p in defs_file.iterdir() if p.name.endswith("-local-strict")),
                    key=lambda p: [int(x) for x in p.name[1:].split("-")[0].split(".")])[-1]
    k8s_defs = set(json.loads((latest / "_definitions.json").read_text())["$defs"])
    builder = Builder(models, k8s_defs)
    builder.model("V1beta1InferenceService")
    root = builder.defs["V1beta1InferenceService"]
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$comment": (f"Generated by tests/schemas/make_kserve_schema.py from the API types of the {sdk} "
                           f"SDK (kserve/models/v1beta1_*.py); Kubernetes types refer to {K8S_ID} "
                           f"({latest.name} of kubernetes-validate). Types with no Kubernetes definition there, "
                           f"left as plain objects: {sorted(builder.unknown) or 'none'}."),
              "$ref": "#/$defs/V1beta1InferenceService", "$defs": dict(sorted(builder.defs.items()))}
    OUT.write_text(json.dumps(schema, indent=1) + "\n")
    print(f"wrote {OUT} ({len(builder.defs)} KServe types; unresolved Kubernetes types: {sorted(builder.unknown)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
