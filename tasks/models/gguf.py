"""GGUF files (llama.cpp's format) as ordinary Hugging Face folders, so ``kiln register`` can import them.

``transformers`` reads a GGUF's weights (dequantized to fp32) and its tokenizer; the result is saved as
safetensors + tokenizer, the normal package format, so everything downstream (export, quantization, the gate,
serving) treats it like any other causal LM. What the GGUF was (its name, architecture, quantization, sha256)
is returned as :class:`GgufInfo` for the registry to record.

Needs the optional ``gguf`` and ``accelerate`` packages: ``pip install 'kiln-mlops[llm]'``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.errors import ArtifactError, ConfigError
from kiln.tasks.engines.base import sha256_file

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
INSTALL_HINT = "pip install 'kiln-mlops[llm]'"


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file says about itself (``general.*`` metadata and its tensor types)."""

    file: str  # the file's name
    sha256: str
    name: str  # general.name
    architecture: str  # general.architecture, e.g. "llama"
    quantization: str  # general.file_type, e.g. "Q4_1" (LlamaFileType MOSTLY_Q4_1) or "F32" (ALL_F32)
    tensor_types: dict[str, int]  # how many tensors of each type, e.g. {"Q4_1": 210, "F32": 61}
    context_length: int | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def is_gguf(path: Path) -> bool:
    """``path`` names a ``.gguf`` file (present or not), or is a folder that holds one and is not itself a
    Hugging Face folder."""
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        return True
    return path.is_dir() and not (path / "config.json").is_file() and any(_gguf_files(path))


def find_gguf(path: Path) -> Path:
    """The one GGUF file ``path`` names (the file itself, or the only ``.gguf`` in a folder)."""
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; pass the path of a .gguf file")
        return path
    files = _gguf_files(path)
    if len(files) != 1:
        names = ", ".join(f.name for f in files[:5])
        raise ConfigError(f"{path} holds {len(files)} GGUF files ({names}); pass the one to register as a file path")
    return files[0]


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)


def require_llm_extra() -> None:
    """Refuse, in one line, when the packages that read GGUF files are missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"importing a GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")


def read_info(file: Path) -> GgufInfo:
    """The GGUF's own description of itself; refuses a file that is not GGUF."""
    require_llm_extra()
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{file} is not a readable GGUF file ({str(exc).splitlines()[0][:120]}); "
                            "pass a .gguf written by llama.cpp's converter") from None
    fields = reader.fields

    def field(key: str, default: object = None) -> object:
        return fields[key].contents() if key in fields else default

    arch = str(field("general.architecture", "unknown"))
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.split("_", 1)[1] if file_type is not None else "?"
    except ValueError:
        quant = f"file_type {file_type}"
    context = field(f"{arch}.context_length")
    return GgufInfo(file=file.name, sha256=sha256_file(file), name=str(field("general.name", file.stem)),
                    architecture=arch, quantization=quant,
                    tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
                    context_length=int(context) if context is not None else None)


def convert(file: Path, cache: Path) -> tuple[Path, GgufInfo]:
    """A Hugging Face folder (fp32 safetensors, config, tokenizer) made from the GGUF ``file``, and its info.

    Converted once per file content: kept under ``cache/<sha256>`` and found there again, so registering the
    same GGUF twice yields the same folder (and so the same version). A conversion is written into a staging
    folder and renamed into place when complete, so one that stopped half-way is simply redone.
    """
    info = read_info(file)
    out = cache / info.sha256[:32]
    if (out / "config.json").is_file():
        return out, info
    staging = cache / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model, tokenizer = _load(file)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    staging.rename(out)
    log.info("converted %s (%s, %s) to %s", file.name, info.name, info.quantization, out)
    return out, info


def _load(file: Path):  # noqa: ANN202 - (PreTrainedModel, tokenizer)
    """The GGUF's model (dequantized, fp32) as a plain model that ``save_pretrained`` writes as safetensors."""
    require_llm_extra()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise ArtifactError(f"transformers cannot load {file} ({str(exc).splitlines()[0][:160]}); Kiln imports "
                            "the GGUF architectures transformers reads (llama, mistral, qwen2, gpt2, ...)") from None
    # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it, although the
    # weights are plain fp32 tensors by now: copy them into a fresh model of the same config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # batches need one; EOS, as HF's generate
        tokenizer.pad_token = tokenizer.eos_token
    return plain, tokenizer
