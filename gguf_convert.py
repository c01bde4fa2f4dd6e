"""An export (convert_hf.py) into llama.cpp's GGUF: find llama.cpp's own converter, run it, read the GGUF's
metadata, and add what llama.cpp's deepseek2 loader needs that the converter does not write.

llama.cpp's convert_hf_to_gguf.py (and the gguf-py package beside it) ship with llama.cpp, and in the
llama-cpp-python sdist under vendor/llama.cpp; it is found where --converter or $LLAMA_CPP_CONVERTER says. It runs
in this Python, which has what it imports (torch, transformers, numpy).

The two fixes, each a GGUF metadata key (checked logit for logit by benchmarks/llama_cpp.py; results/llama-cpp.md):
  * No query compression (q_lora_rank 0, null in config.json): the converter writes no
    deepseek2.attention.q_lora_rank, and the loader (src/models/deepseek2.cpp) requires it unless it takes the
    model for a "lite" one (26 or 27 layers, as DeepSeek-V2-Lite). Given 0, it takes attn_q (q_proj), as it does
    for V2-Lite.
  * YaRN with mscale != mscale_all_dim: this project (as transformers) scales cos/sin by
    r = mscale(s, mscale) / mscale(s, mscale_all_dim) and the softmax by mscale(s, mscale_all_dim)^2, where
    mscale(s, m) = 0.1 m ln(s) + 1. llama.cpp scales cos/sin by its rope.scaling.attn_factor (r here) and the
    softmax by (attn_factor (1 + 0.1 L ln s))^2, L being the GGUF's yarn_log_multiplier / 0.1; L is chosen so that
    r (1 + 0.1 L ln s) = mscale(s, mscale_all_dim). With mscale == mscale_all_dim (every DeepSeek release), r = 1
    and nothing is needed.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

from attention import yarn_mscale
from cli import CLIError
from model_config import ModelConfig

CONVERTER_ENV = "LLAMA_CPP_CONVERTER"
ARCH = "deepseek2"  # llama.cpp's architecture for DeepSeek-V2 and V3 models


def find_converter(path=None) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py at path, else at $LLAMA_CPP_CONVERTER; None when neither names a file."""
    for candidate in (path, os.environ.get(CONVERTER_ENV)):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def gguf_package(converter: Path):
    """The gguf-py package beside the converter (PyPI's gguf may not match the converter's version)."""
    package_dir = str(converter.parent / "gguf-py")
    if package_dir not in sys.path:
        sys.path.insert(0, package_dir)
    try:
        import gguf
    except ImportError:
        raise CLIError(f"no gguf-py beside {converter} (llama.cpp ships it there)") from None
    return gguf


def convert(converter: Path, hf_dir: Path, out: Path) -> str:
    """Run llama.cpp's converter on the export hf_dir, writing an f32 GGUF to out -> its log."""
    result = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        tail = "; ".join(log.strip().splitlines()[-3:])
        raise CLIError(f"llama.cpp's converter failed on {hf_dir} (exit {result.returncode}): {tail}")
    return log


def read_metadata(gguf, path: Path) -> tuple[dict, list[str]]:
    """The GGUF's metadata, key -> value (the tokenizer's vocabulary-sized arrays left out), and its tensor names."""
    reader = gguf.GGUFReader(path)
    metadata = {}
    for field in reader.fields.values():
        vocabulary_array = field.name.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY
        if not field.name.startswith("GGUF.") and not vocabulary_array:
            metadata[field.name] = field.contents()
    return metadata, [tensor.name for tensor in reader.tensors]


def needed_fixes(config: ModelConfig, metadata: dict) -> dict[str, tuple[str, float | int]]:
    """The metadata keys, each as (GGUF value type, value), that make llama.cpp compute what config's model computes
    (see the module's docstring); empty when the converter's GGUF needs none."""
    fixes = {}
    if f"{ARCH}.attention.q_lora_rank" not in metadata:
        fixes[f"{ARCH}.attention.q_lora_rank"] = ("UINT32", config.q_lora_rank)
    if config.rope_scaling == "yarn" and config.rope_factor > 1:
        s = config.rope_factor
        softmax_mscale = yarn_mscale(s, config.mscale_all_dim)
        cos_sin_factor = yarn_mscale(s, config.mscale) / softmax_mscale
        if abs(cos_sin_factor - 1) > 1e-7:
            log_multiplier = (softmax_mscale / cos_sin_factor - 1) / (0.1 * math.log(s))
            fixes[f"{ARCH}.rope.scaling.attn_factor"] = ("FLOAT32", cos_sin_factor)
            fixes[f"{ARCH}.rope.scaling.yarn_log_multiplier"] = ("FLOAT32", 0.1 * log_multiplier)
    return fixes


def rewrite(gguf, source: Path, target: Path, changes: dict[str, tuple[str, float | int]]) -> None:
    """Copy the GGUF source to target with the metadata keys in changes set (added or replaced); the tensors are
    copied unchanged."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.fields["general.architecture"].contents(),
                             endianess=reader.endianess)
    pending = dict(changes)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        if field.name in pending:
            kind, value = pending.pop(field.name)
            writer.add_key_value(field.name, value, gguf.GGUFValueType[kind])
        else:
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if array else None)
    for key, (kind, value) in pending.items():
        writer.add_key_value(key, value, gguf.GGUFValueType[kind])
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
