"""Tests for codelens.data.text: loading, BPE tokenizer training and block packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codelens.data.text import (
    DataFileNotFoundError,
    PackedBlocks,
    TextDocuments,
    check_token_ids,
    load_text_dataset,
    load_tokenizer,
    pack_to_tensor,
    train_bpe_tokenizer,
)

SENTENCES = [
    "the cat sat on the mat",
    "once upon a time there was a little dog",
    "hello world, hello codebooks",
    "a quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(SENTENCES * 3, vocab_size=300)


# --- loading --------------------------------------------------------------------------------


def test_txt_paragraphs(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text("first line\nsecond line\n\n\n  \nthird doc\n\nfourth\n", encoding="utf-8")
    docs = load_text_dataset(str(path))
    assert isinstance(docs, TextDocuments)
    assert list(docs) == ["first line\nsecond line", "third doc", "fourth"]
    assert list(docs) == list(docs)  # re-iterable


def test_jsonl(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    rows = [{"body": "doc a", "id": 1}, {"body": "", "id": 2}, {"body": "doc b", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert list(load_text_dataset(str(path), text_column="body")) == ["doc a", "doc b"]
    streamed = load_text_dataset(str(path), text_column="body", streaming=True)
    assert list(streamed) == ["doc a", "doc b"]


def test_parquet(tmp_path: Path):
    import datasets

    path = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": ["x y", "  ", "z"], "n": [1, 2, 3]}).to_parquet(str(path))
    assert list(load_text_dataset(str(path))) == ["x y", "z"]


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="does not exist"):  # also a ValueError
        load_text_dataset(str(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path: Path):
    path = tmp_path / "c.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.csv'"):
        load_text_dataset(str(path))


def test_missing_text_column(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"text column 'text' not found.*'content'"):
        load_text_dataset(str(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_dataset(tmp_path: Path, content: str):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="has no non-empty documents"):
        load_text_dataset(str(path))


def test_empty_jsonl_texts(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match=r"dataset '.*c\.jsonl' has no non-empty documents"):
        load_text_dataset(str(path))


def test_local_split_and_args(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text("hi\n")
    with pytest.raises(ValueError, match="single split 'train'"):
        load_text_dataset(str(path), split="validation")
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        load_text_dataset("")
    with pytest.raises(ValueError, match="is a directory"):
        load_text_dataset(str(tmp_path))


def test_hub_failure_names_source(monkeypatch: pytest.MonkeyPatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ValueError, match="could not load dataset 'someone/corpus'.*offline"):
        load_text_dataset("someone/corpus")


def test_hub_call_arguments(monkeypatch: pytest.MonkeyPatch):
    import datasets

    seen = {}

    def fake(path, name=None, **kwargs):
        seen.update(path=path, name=name, **kwargs)
        return datasets.Dataset.from_dict({"text": ["a b", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    docs = load_text_dataset(
        "wikitext", config_name="wikitext-103-raw-v1", split="validation", streaming=True
    )
    assert list(docs) == ["a b", "c"]
    assert seen == {
        "path": "wikitext",
        "name": "wikitext-103-raw-v1",
        "split": "validation",
        "streaming": True,
    }


# --- tokenizer ------------------------------------------------------------------------------


def test_train_bpe_tokenizer(tok):
    assert 257 <= len(tok) <= 300
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0
    assert tok.init_kwargs["name_or_path"] == "codelens-bpe"
    assert tok.init_kwargs["add_bos_token"] is True
    ids = tok("the cat sat")["input_ids"]
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode(tok("ünïcödé ☃")["input_ids"]) == "ünïcödé ☃"  # byte-level: no unknowns


def test_tokenizer_save_and_reload(tmp_path: Path):
    save_dir = tmp_path / "tok"
    t = train_bpe_tokenizer(SENTENCES, vocab_size=280, save_dir=save_dir)
    assert t.init_kwargs["name_or_path"] == str(save_dir)
    assert (save_dir / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned
    again = load_tokenizer(save_dir)
    assert again.init_kwargs["add_bos_token"] is True
    assert again("hello world")["input_ids"] == t("hello world")["input_ids"]
    # Saving into an existing directory replaces the tokenizer files, keeps other files.
    (save_dir / "other.txt").write_text("keep me")
    train_bpe_tokenizer(SENTENCES, vocab_size=270, save_dir=save_dir)
    assert (save_dir / "other.txt").read_text() == "keep me"
    assert len(load_tokenizer(save_dir)) <= 270


def test_tokenizer_bad_inputs(tmp_path: Path):
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(SENTENCES, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        train_bpe_tokenizer(SENTENCES, vocab_size="300")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iterable of strings"):
        train_bpe_tokenizer("just one string", vocab_size=300)
    with pytest.raises(ValueError, match="no non-empty documents"):
        train_bpe_tokenizer(["", "  "], vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a string"):
        train_bpe_tokenizer(["ok", 3], vocab_size=300)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# --- packing --------------------------------------------------------------------------------


def _expected_stream(tok, docs):
    ids = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def test_pack_to_tensor(tok):
    docs = SENTENCES * 2
    stream = _expected_stream(tok, docs)
    out = pack_to_tensor(docs, tok, block_len=7)
    n = len(stream) // 7
    assert out.shape == (n, 7) and out.dtype == torch.long
    assert out.flatten().tolist() == stream[: n * 7]
    assert (out == tok.eos_token_id).sum() >= len(docs) - 1  # documents are eos-separated
    assert pack_to_tensor(docs, tok, block_len=7, max_blocks=2).shape == (2, 7)
    assert pack_to_tensor(iter(docs), tok, block_len=7).shape == (n, 7)  # iterator is fine here


def test_packed_blocks_streams_in_batches(tok):
    docs = SENTENCES * 5
    expected = pack_to_tensor(docs, tok, block_len=5)
    blocks = PackedBlocks(docs, tok, block_len=5, doc_batch=3)
    got = torch.stack(list(blocks))
    assert torch.equal(got, expected)  # batching documents does not change the stream
    assert torch.equal(torch.stack(list(blocks)), got)  # re-iterable (epochs)
    loader = torch.utils.data.DataLoader(blocks, batch_size=4)
    first = next(iter(loader))
    assert first.shape == (4, 5)
    assert len(list(PackedBlocks(docs, tok, block_len=5, max_blocks=3))) == 3


def test_packed_blocks_from_loaded_text(tmp_path: Path, tok):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(SENTENCES))
    docs = load_text_dataset(str(path))
    blocks = PackedBlocks(docs, tok, block_len=4)
    assert torch.equal(torch.stack(list(blocks)), pack_to_tensor(SENTENCES, tok, block_len=4))


def test_block_len_exceeds_context(tok):
    with pytest.raises(ValueError, match="block_len 1024 exceeds the model's context 512"):
        PackedBlocks(SENTENCES, tok, block_len=1024, n_ctx=512)
    with pytest.raises(ValueError, match="block_len 1024 exceeds the model's context 512"):
        pack_to_tensor(SENTENCES, tok, block_len=1024, n_ctx=512)


def test_token_ids_beyond_vocab(tok):
    with pytest.raises(ValueError, match=r"token id \d+ is out of range for vocab size 100"):
        pack_to_tensor(SENTENCES, tok, block_len=4, vocab_size=100)


def test_no_full_block(tok):
    with pytest.raises(ValueError, match=r"no full block of block_len=1000 tokens.*only \d+"):
        pack_to_tensor(SENTENCES, tok, block_len=1000)
    with pytest.raises(ValueError, match="no full block"):
        list(PackedBlocks(SENTENCES, tok, block_len=1000))


def test_packing_bad_args(tok):
    with pytest.raises(ValueError, match="block_len must be a positive int"):
        PackedBlocks(SENTENCES, tok, block_len=0)
    with pytest.raises(ValueError, match="max_blocks must be a positive int"):
        pack_to_tensor(SENTENCES, tok, block_len=4, max_blocks=0)
    with pytest.raises(ValueError, match="re-iterable"):
        PackedBlocks(iter(SENTENCES), tok, block_len=4)
    with pytest.raises(ValueError, match="iterable of strings"):
        PackedBlocks("a string", tok, block_len=4)
    with pytest.raises(ValueError, match="documents must be strings"):
        pack_to_tensor(["ok", 5], tok, block_len=2)  # type: ignore[list-item]

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="tokenizer has no eos token"):
        PackedBlocks(SENTENCES, NoEos(), block_len=4)


# --- check_token_ids ------------------------------------------------------------------------


def test_check_token_ids():
    check_token_ids(torch.tensor([[0, 5], [9, 1]]), 10)
    check_token_ids([[0, 1], [2]], 3)
    check_token_ids([], 3)
    with pytest.raises(ValueError, match=r"token id 10 is out of range for vocab size 10"):
        check_token_ids(torch.tensor([[0, 10]]), 10)
    with pytest.raises(ValueError, match=r"token id 7 .*vocab size 5"):
        check_token_ids([[1], [7, 2]], 5)
    with pytest.raises(ValueError, match="negative token id -1"):
        check_token_ids([0, -1], 5)
    with pytest.raises(ValueError, match="must be integers"):
        check_token_ids(torch.tensor([0.5]), 5)
    with pytest.raises(ValueError, match="must be integers"):
        check_token_ids([1, 2.0], 5)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        check_token_ids([1], 0)


def test_packed_blocks_shards_across_workers(tok):
    docs = [f"{s} number {i}" for i, s in enumerate(SENTENCES * 4)]
    blocks = PackedBlocks(docs, tok, block_len=6, doc_batch=2)
    loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=2)
    got = sorted(tuple(b.tolist()) for b in loader)
    # Worker w packs document batches w, w + 2, ... on its own.
    expected = []
    for w in range(2):
        shard = [d for i in range(w * 2, len(docs), 4) for d in docs[i : i + 2]]
        expected += [tuple(b) for b in pack_to_tensor(shard, tok, block_len=6).tolist()]
    assert got == sorted(expected)
    capped = PackedBlocks(docs, tok, block_len=6, doc_batch=2, max_blocks=3)
    loader = torch.utils.data.DataLoader(capped, batch_size=None, num_workers=2)
    assert len(list(loader)) == 3
