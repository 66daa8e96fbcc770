"""Kiln packages as MLflow pyfunc models, so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
predicts with the version's own engine and tokenizer, and MLflow's tools work on it."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from kiln.tasks.models.predictor import PackageMeta, Predictor

PACKAGE_ARTIFACT = "model"


class KilnModel(mlflow.pyfunc.PythonModel):
    """Predicts with the Kiln package stored as the ``model`` artifact."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor(Path(context.artifacts[PACKAGE_ARTIFACT]))

    # No type hints on predict: MLflow would try to derive a signature from them; ours is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        texts = _texts(model_input)
        max_new = int((params or {}).get("max_new_tokens", 16))
        return self.predictor.predict(texts, max_new_tokens=max_new)


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
    if task == "causal-lm":
        outputs = Schema([ColSpec("string", "generated_text")])
    else:
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_package(folder: Path, name: str, staging: Path) -> Any:
    """Log the package at ``folder`` as a pyfunc model ``name`` in the active run; returns ModelInfo."""
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
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
