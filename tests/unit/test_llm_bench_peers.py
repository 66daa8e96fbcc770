"""The llama.cpp peer rows of benchmarks/llm_bench.py: their helpers, without llama.cpp or the real GGUF."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ is a folder of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_greedy_takes_the_first_of_equal_maxima() -> None:
    peers = load("llm_peers")
    assert peers.greedy(np.array([0.1, 3.0, -1.0, 3.0], dtype=np.float32)) == 1


def test_context_holds_prompt_new_tokens_and_a_perplexity_window() -> None:
    peers = load("llm_peers")
    assert peers.context_size(20, 32) == 256  # the 256-token perplexity window is the floor
    assert peers.context_size(20, 256) == 512  # rounded up, never short of prompt + new tokens
    assert peers.context_size(0, 0, window=256) == 256


def test_only_the_shipped_row_loads_the_shipped_file(tmp_path: Path) -> None:
    peers = load("llm_peers")
    shipped = tmp_path / "shipped.gguf"
    assert peers.model_file("llamacpp-q4_1", tmp_path, shipped) == shipped
    assert peers.model_file("llamacpp-q8_0", tmp_path, shipped) == tmp_path / "llamacpp-q8_0" / "model.gguf"


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_requantize_keeps_metadata_and_weights(tmp_path: Path, qtype: str) -> None:
    gguf = pytest.importorskip("gguf")
    peers = load("llm_peers")
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    source = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(source, arch="llama")
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    q4 = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.ffn_up.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    target = tmp_path / "out" / "model.gguf"
    peers.requantize(source, target, qtype)

    reader = gguf.GGUFReader(target)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType[qtype]
    # the rewrite carries the Q4_1 weights (what every fp32 row dequantizes), not the original fp32 ones
    expected = gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_1)
    got = gguf.quants.dequantize(up.data, up.tensor_type).reshape(expected.shape)
    assert np.allclose(got, expected, atol=0.02 * np.abs(expected).max())


def test_table_prints_a_dash_row_for_a_batch_one_only_engine() -> None:
    bench = load("llm_bench")
    results = [
        {"engine": "transformers-fp32", "batches": {"1": {"ttft_ms": 50.0, "itl_ms": 20.0, "tokens_per_s": 40.0},
                                                    "8": {"ttft_ms": 90.0, "itl_ms": 30.0, "tokens_per_s": 200.0}},
         "perplexity": 10.0, "peak_rss_mib": 900.0},
        {"engine": "llamacpp-q4_1", "batches": {"1": {"ttft_ms": 10.0, "itl_ms": 8.0, "tokens_per_s": 120.0},
                                                "8": None},
         "perplexity": 10.2, "peak_rss_mib": 200.0},
    ]
    lines = bench.table(results).splitlines()
    llama_1, llama_8 = (line.split() for line in lines[-2:])
    assert llama_1[:2] == ["llamacpp-q4_1", "1"] and llama_1[5] == "3.00" and llama_1[-1] == "+2.0%"
    assert llama_8[:7] == ["llamacpp-q4_1", "8", "—", "—", "—", "—", "200"] and llama_8[-1] == "+2.0%"
