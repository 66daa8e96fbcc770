"""A TensorRT plan's sidecar metadata (``model.plan.json``) and the checks made against it.

A plan runs only on the TensorRT version and GPU that built it (unless built version- or
hardware-compatible): :func:`check_plan_compatible` compares the sidecar with this machine before TensorRT
sees a byte of the plan, and :func:`check_shape_in_profile` refuses an input the plan's profile does not
cover before TensorRT fails with a terse error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError, ConfigError

PLAN_FILE = "model.plan"
METADATA_FORMAT = "kiln-tensorrt-plan/1"
_AMPERE = (8, 0)  # the oldest architecture a HardwareCompatibilityLevel.AMPERE_PLUS plan runs on
DTYPES = {  # TensorRT DataType member name -> the NumPy-style name Kiln records (shared with Triton)
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
    "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
}

Shape = tuple[int, ...]


def metadata_path(plan: Path) -> Path:
    """Where a plan's sidecar metadata lives: ``model.plan`` -> ``model.plan.json``."""
    return plan.with_name(plan.name + ".json")


def read_metadata(plan: Path) -> dict[str, Any]:
    """The sidecar metadata of ``plan``; :class:`ArtifactError` if it is missing or unreadable."""
    path = metadata_path(plan)
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"TensorRT plan {plan} has no {path.name} beside it; rebuild the plan") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}); rebuild the plan") from exc
    if metadata.get("format") != METADATA_FORMAT:
        raise ArtifactError(f"{path} is not Kiln plan metadata ({METADATA_FORMAT}); rebuild the plan")
    return metadata


def check_shape_in_profile(profiles: list[dict[str, Any]], name: str, shape: Shape) -> None:
    """Refuse an input shape outside the plan's first profile, before TensorRT fails with a terse error."""
    if not profiles or name not in profiles[0]:
        return
    low, high = profiles[0][name]["min"], profiles[0][name]["max"]
    if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
        raise ConfigError(
            f"input {name} of shape {list(shape)} is outside the TensorRT plan's profile ({low} to {high}); "
            "send smaller batches or rebuild the plan with a larger max_batch / max_seq"
        )


def check_plan_compatible(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> None:
    """Refuse a plan that this machine cannot, or must not, run.

    Args:
        metadata: the plan's sidecar (``model.plan.json``), written by ``build.build_engine``.
        runtime: this machine's ``tensorrt_version``, ``gpu_name`` and ``compute_capability`` (see
            ``machine.runtime_info``), plus ``plan_sha256``: the hash of the bytes about to be loaded.

    Raises:
        ArtifactError: naming every mismatch, where the plan was built and where it is being opened.
    """
    checksum = _checksum_problem(metadata, runtime)
    others = (_version_problem(metadata, runtime), _hardware_problem(metadata, runtime))
    problems = [p for p in (checksum, *others) if p]
    if not problems:
        return
    built = (f"{metadata.get('gpu_name', '?')} (compute {metadata.get('compute_capability', '?')}) "
             f"with TensorRT {metadata.get('tensorrt_version', '?')}")
    here = (f"{runtime.get('gpu_name', '?')} (compute {runtime.get('compute_capability', '?')}) "
            f"with TensorRT {runtime.get('tensorrt_version', '?')}")
    advice = ("rebuild the plan from its ONNX model on this GPU with this TensorRT version "
              "(or build it version_compatible / hardware_compatibility to share it)")
    if problems == [checksum]:
        advice = "rebuild the plan from its ONNX model; the file was damaged or replaced after it was built"
    raise ArtifactError(f"refusing TensorRT plan: {'; '.join(problems)}. Built on {built}; this machine has "
                        f"{here}. What to do: {advice}")


def _checksum_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    want, got = metadata.get("plan_sha256"), runtime.get("plan_sha256")
    if not want:
        return "its metadata records no plan_sha256"
    if got and got != want:
        return f"plan sha256 {got[:12]}… differs from the {want[:12]}… recorded at build time"
    return None


def _version_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    built, here = _version(metadata.get("tensorrt_version")), _version(runtime.get("tensorrt_version"))
    if built is None or here is None:
        return "the TensorRT version that built it, or this machine's, is unknown"
    if metadata.get("version_compatible"):
        # Version-compatible plans run on the same or a later release of the same major, never an older one.
        if here[0] != built[0] or here < built:
            return (f"it is version-compatible from TensorRT {_dotted(built)} within {built[0]}.x, "
                    f"but this machine has {_dotted(here)}")
        return None
    if here[:2] != built[:2]:
        return f"it was built with TensorRT {_dotted(built[:2])}, this machine has {_dotted(here[:2])}"
    return None


def _hardware_problem(metadata: Mapping[str, Any], runtime: Mapping[str, str]) -> str | None:
    level = metadata.get("hardware_compatibility", "none")
    built, here = _version(metadata.get("compute_capability")), _version(runtime.get("compute_capability"))
    if built is None or here is None:
        return "the compute capability it was built for, or this GPU's, is unknown"
    if level == "ampere_plus":
        return None if here >= _AMPERE else f"it needs an Ampere or newer GPU, this is {_dotted(here)}"
    if here != built:
        return f"it was built for compute capability {_dotted(built)}, this GPU is {_dotted(here)}"
    if level == "none" and metadata.get("gpu_name") != runtime.get("gpu_name"):
        return f"it was built on {metadata.get('gpu_name')}, this GPU is {runtime.get('gpu_name')}"
    return None


def _version(text: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(text).split(".")) if text else None
    except ValueError:
        return None


def _dotted(parts: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in parts)

