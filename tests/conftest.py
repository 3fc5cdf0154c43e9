"""Shared fixtures: tiny random-weight models of three architectures, built offline."""

import os

# Forced, not defaulted: an exported HF_HUB_OFFLINE=0 must not let the tests go online.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from more threads, and OpenMP threads competing for busy
# cores stall badly (measured ~50x slower on a loaded 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from codelens import CodebookConfig, HookedCodebookTransformer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Token files go to a temporary cache, never the user's ~/.cache/codelens."""
    os.environ["CODELENS_CACHE"] = str(tmp_path_factory.mktemp("codelens-cache"))


VOCAB = 13

ARCHS = {
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
}


TRAIN_FSM = {"n_states": 12, "n_successors": 3, "seq_len": 24, "seed": 3}
"""A small TokFSM for training runs (``TrainConfig.data={"fsm": TRAIN_FSM}``)."""
TRAIN_NEOX = dict(ARCHS["gpt_neox"], max_position_embeddings=32)
"""The tiny GPT-NeoX of `ARCHS` as a ``TrainConfig.model_config``."""


def word_corpus(path, n_docs: int = 200, words_per_doc: int = 10):
    """A plain-text corpus of random sentences over 17 words, blank-line separated."""
    words = "the a cat dog sat ran on under mat park red blue ball tree big small saw".split()
    gen = torch.Generator().manual_seed(0)
    docs = [
        " ".join(
            words[i] for i in torch.randint(len(words), (words_per_doc,), generator=gen).tolist()
        )
        for _ in range(n_docs)
    ]
    path.write_text("\n\n".join(docs))
    return path


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """Digits 0-9 plus <bos>=10, <eos>=11, <unk>=12; one token per character."""
    vocab = {str(i): i for i in range(10)} | {"<bos>": 10, "<eos>": 11, "<unk>": 12}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<eos>",
    )


def tiny_model(arch: str = "gpt_neox", codebook: CodebookConfig | None = None, seed: int = 0):
    config = dict(ARCHS[arch], vocab_size=VOCAB)
    return HookedCodebookTransformer.from_config(config, digit_tokenizer(), codebook, seed=seed)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(0))
