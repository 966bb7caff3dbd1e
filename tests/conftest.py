"""Shared fixtures: tiny random-weight models of every supported architecture (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(family: str, layers: int = 2):
    """hidden 160 and intermediate 320: column blocks of 128 and a narrow 32/64-wide last block."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=160, num_hidden_layers=layers, num_attention_heads=5,
                  max_position_embeddings=256)
    if family == "opt":
        return tf.OPTConfig(vocab_size=96, hidden_size=160, num_hidden_layers=layers, num_attention_heads=5,
                            ffn_dim=320, max_position_embeddings=256, word_embed_proj_dim=160)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    extra = dict(head_dim=32) if family == "qwen3" else {}
    return cls(intermediate_size=320, num_key_value_heads=1, **common, **extra)


def tiny_model(family: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32)
    return model.eval()


def random_ids(n: int, seqlen: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


class CharTokenizer:
    """A stand-in tokenizer for data-loader tests: one id per character (no BOS)."""

    def __call__(self, text: str):
        class _Enc:
            input_ids = [ord(c) % 256 for c in text]

        return _Enc()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data directory {DATA_DIR} absent")
    return DATA_DIR


def save_tiny_model_dir(path: Path, family: str = "llama", layers: int = 2) -> Path:
    """A tiny model directory with a character-level fast tokenizer, as `onebit quantize` expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): i for i in range(95)}
    vocab["<unk>"] = 95
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    model = tiny_model(family, layers)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Once per test module: a tiny model directory, a tiny data directory and a scratch root (CLI tests)."""
    root = tmp_path_factory.mktemp("cli")
    return save_tiny_model_dir(root / "model"), write_tiny_data(root / "data"), root


def assert_packed_logits(path: Path, ids: torch.Tensor, logits: torch.Tensor, storage_bpw: float) -> None:
    """The packed checkpoint at ``path``: its measured bpw is ``storage_bpw`` and, loaded by transformers, its
    logits on the reference path are exactly ``logits`` (those of the fake-quant model)."""
    from transformers import AutoModelForCausalLM

    from onebit.formats.checkpoint import measured_bpw
    from onebit.nn import packed_modules

    assert measured_bpw(path)["storage_bpw_measured"] == pytest.approx(storage_bpw, abs=0)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    for mod in packed_modules(loaded).values():
        mod.use_kernel = False
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, atol=0, rtol=0)


def write_tiny_data(root: Path) -> Path:
    """A data directory with small wikitext2-raw and ptb files (same layout as the real one)."""
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "model", "bit", "sign", "scale"]
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "ptb").mkdir()
    for split in ("valid", "test"):
        lines = [" = Title = \n", " \n"] + [" " + " ".join(rng.choices(words, k=12)) + " \n" for _ in range(60)]
        (root / "wikitext-2-raw" / f"wiki.{split}.raw").write_text("".join(lines))
        (root / "ptb" / f"ptb.{split}.txt").write_text("".join(" ".join(rng.choices(words, k=8)) + " \n" for _ in range(60)))
    return root
