"""Kiln packages as MLflow pyfunc models, so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
predicts with the version's own engine and tokenizer, and MLflow's tools work on it.

Loading verifies the package against the registry's pin before anything is opened (fail closed):

- loaded through the registry (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``): MLflow 3 writes the name and
  version it resolved into ``registered_model_meta`` beside ``MLmodel``; that version's ``kiln.package_digest``
  must be present, well-formed and equal to the sha256 of the downloaded ``kiln.json``, and the version must
  have been registered from the very LoggedModel that was downloaded (its source is ``models:/<model_id>``);
- loaded any other way (``models:/<model_id>``, a copied folder): the pin is the tag ``log_package`` put on the
  MLflow LoggedModel named by ``MLmodel``'s ``model_id``, read through the tracking server.

Either way every file is then checked against ``kiln.json``. A version or LoggedModel without a pin, a model
without a ``model_id``, or a tracking server that cannot be asked, refuses to load (:class:`ArtifactError`).
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta, Predictor
from kiln.tasks.registry import generation_params
from kiln.tasks.registry.pins import check_pin, package_digest
from kiln.yamlfile import read_yaml

PACKAGE_ARTIFACT = "model"
MLMODEL = "MLmodel"
REGISTERED_MODEL_META = "registered_model_meta"  # written by MLflow's ModelsArtifactRepository on download


class KilnModel(mlflow.pyfunc.PythonModel):
    """Predicts with the Kiln package stored as the ``model`` artifact."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts[PACKAGE_ARTIFACT])
        verify_loaded(folder)
        self.predictor = Predictor(folder)  # checks every file against the pinned kiln.json
        # The budget is the serving process's (its KILN_* / kiln.yaml), not the model's: whoever serves decides.
        self.max_new_tokens_limit = load_settings().max_new_tokens_limit

    # No type hints on predict: MLflow would try to derive a signature from them; ours is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        texts = _texts(model_input)
        if self.predictor.meta.task != "causal-lm":
            return self.predictor.predict(texts)
        wanted = generation_params.parse(params, self.max_new_tokens_limit)
        return self.predictor.predict(texts, **generation_params.generate_kwargs(self.predictor.predict, wanted))


def verify_loaded(folder: Path, client: Any = None) -> str:
    """Check the package MLflow put at ``folder`` (``<model>/artifacts/model``) against its registry pin; returns
    the pin. See the module docstring for where the pin comes from."""
    model_dir = folder.parent.parent
    if not (model_dir / MLMODEL).is_file():
        raise ArtifactError(f"{folder} is not inside an MLflow model (no {MLMODEL} at {model_dir}); load the model "
                            "with mlflow.pyfunc.load_model('models:/NAME/VERSION')")
    try:
        model_id = Model.load(str(model_dir / MLMODEL)).model_id
    except (MlflowException, OSError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{model_dir / MLMODEL} is unreadable ({exc.__class__.__name__}); re-register the model"
                            ) from exc
    if not model_id:
        raise ArtifactError(f"the MLflow model at {model_dir} records no model_id, so its registry pin cannot be "
                            "found; re-register the model")
    client = client or mlflow.MlflowClient()
    name, version = _registered_as(model_dir)
    try:
        if name and version:
            what = f"{name} v{version}"
            entry = client.get_model_version(name, version)
            if entry.source != f"models:/{model_id}":
                raise ArtifactError(f"{what} was registered from {entry.source}, not from the downloaded model "
                                    f"{model_id}; re-register the model")
            return check_pin(folder, entry.tags, what)
        what = f"logged model {model_id}"
        return check_pin(folder, client.get_logged_model(model_id).tags, what)
    except MlflowException as exc:
        raise ArtifactError(f"cannot read the registry pin of {name or model_id} ({str(exc).splitlines()[0][:160]}); "
                            "a Kiln model loads only where its MLflow tracking server can be asked") from exc


def _registered_as(model_dir: Path) -> tuple[str | None, str | None]:
    """The registered model name and version MLflow downloaded ``model_dir`` as, or (None, None)."""
    path = model_dir / REGISTERED_MODEL_META
    if not path.is_file():
        return None, None
    try:
        meta = read_yaml(path, str(path)) or {}
    except ConfigError as exc:
        raise ArtifactError(f"{exc}; load the model again") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must be a mapping with model_name and model_version; load the model again")
    name, version = meta.get("model_name"), meta.get("model_version")
    return (str(name), str(version)) if name and version else (None, None)


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return model_input[column].astype(str).tolist()
    if isinstance(model_input, pd.Series):
        return model_input.astype(str).tolist()
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


def _requirements() -> list[str]:
    names = ["mlflow", "onnxruntime", "transformers", "tokenizers", "torch", "pandas", "numpy"]
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def signature(task: str) -> ModelSignature:
    inputs = Schema([ColSpec("string")])  # unnamed: a plain list of strings is valid input
    if task == "causal-lm":  # with the decoding params predict(params=...) honours (generation_params.PARAMS)
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "generated_text")]),
                              params=generation_params.PARAMS)
    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_package(folder: Path, name: str, staging: Path) -> Any:
    """Log the package at ``folder`` as a pyfunc model ``name`` in the active run; returns ModelInfo.

    The LoggedModel is created with its pin (``kiln.package_digest``), so that a retry can repair a version's
    tags from it and the pyfunc loader can check a model loaded without the registry.
    """
    meta = PackageMeta.read(folder)
    # pyfunc stores an artifact folder under its own base name: stage it as ".../model".
    staged = staging / PACKAGE_ARTIFACT
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(folder, staged)
    try:
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={PACKAGE_ARTIFACT: str(staged)},
            pip_requirements=_requirements(), signature=signature(meta.task),
            code_paths=None, metadata={"kiln_format": meta.format, "kiln_task": meta.task},
            tags={vocab.PACKAGE_DIGEST: package_digest(staged)},
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
