"""Data at scale: a token file built once and shared, per-rank reads, streaming epochs."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_NEOX, word_corpus

from codelens.data import text, token_cache
from codelens.training import trainer
from codelens.training.batches import BlockBatches, StreamingBatches
from codelens.training.config import TrainConfig

NEOX = dict(TRAIN_NEOX, max_position_embeddings=16)


def _corpus(path: Path, n_docs: int = 200) -> Path:
    return word_corpus(path, n_docs, words_per_doc=10)


def _config(tmp_path: Path, **data) -> TrainConfig:
    return TrainConfig(
        run_dir=str(tmp_path / "run"),
        data={
            "source": str(_corpus(tmp_path / "corpus.txt")),
            "block_len": 16,
            "vocab_size": 300,
            "eval_blocks": 4,
            "cache_dir": str(tmp_path / "cache"),
        }
        | data,
        model_config=NEOX,
        steps=4,
        batch_size=4,
    )


class _Counting:
    """Counts tokenizer trainings and tokenised document batches."""

    def __init__(self, monkeypatch):
        self.trained = self.tokenised = 0
        train, tokenize = text.train_bpe_tokenizer, text.PackedBlocks._tokenize

        def counted_train(*args, **kwargs):
            self.trained += 1
            return train(*args, **kwargs)

        def counted_tokenize(packer, docs):
            self.tokenised += 1
            return tokenize(packer, docs)

        monkeypatch.setattr(text, "train_bpe_tokenizer", counted_train)
        monkeypatch.setattr(text.PackedBlocks, "_tokenize", counted_tokenize)


@pytest.mark.parametrize("streaming", [False, True])
def test_second_start_reads_the_cache_and_tokenises_nothing(tmp_path, monkeypatch, streaming):
    counts = _Counting(monkeypatch)
    cfg = _config(tmp_path, streaming=streaming)
    first, tok, _ = trainer.build_data(cfg)
    assert counts.trained == 1 and counts.tokenised > 0
    before = counts.tokenised
    hashed = []
    monkeypatch.setattr(token_cache, "sha256_file", lambda path: hashed.append(path))
    again, tok2, _ = trainer.build_data(cfg)  # a resume, or another rank
    assert counts.trained == 1, "the BPE tokenizer was trained again"
    assert counts.tokenised == before, "the corpus was tokenised again"
    assert not hashed, "the whole corpus was read again to hash it"
    monkeypatch.undo()
    assert tok2.get_vocab() == tok.get_vocab()
    for step in (0, 3):
        assert torch.equal(first.batch(step), again.batch(step))
    # The cached blocks are exactly what packing the corpus in memory makes.
    docs = text.load_text_dataset(cfg.data["source"])
    packed = text.pack_to_tensor(docs, tok, 16)
    cached = token_cache.cached_tokens(
        docs,
        tok,
        16,
        source_id=token_cache.source_identity(
            cfg.data["source"], split="train", text_column="text", config_name=None
        ),
        cache_dir=tmp_path / "cache",
    )
    assert torch.equal(torch.from_numpy(cached.blocks.astype(np.int64)), packed)
    assert cached.blocks.dtype == np.uint16 and isinstance(cached.blocks, np.memmap)


def test_an_edited_corpus_is_tokenised_afresh(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    trainer.build_data(cfg)
    counts = _Counting(monkeypatch)
    Path(cfg.data["source"]).write_text("a new corpus entirely\n\n" * 300)
    source, _, _ = trainer.build_data(cfg)
    assert counts.trained == 1 and counts.tokenised > 0  # new tokenizer, new token file
    assert len(list((tmp_path / "cache" / "tokens").glob("*.json"))) == 2


def test_ranks_wait_for_the_builder_and_read_its_file(tmp_path):
    docs = ["one two three four five six"] * 50
    tok = text.train_bpe_tokenizer(docs, 300)
    kwargs = dict(source_id={"test": 1}, cache_dir=tmp_path)
    with pytest.raises(TimeoutError, match="LOCAL_RANK 0"):
        token_cache.cached_tokens(docs, tok, 8, builder=False, wait_seconds=0.2, **kwargs)
    got = {}
    waiter = threading.Thread(
        target=lambda: got.update(
            f=token_cache.cached_tokens(docs, tok, 8, builder=False, **kwargs)
        )
    )
    waiter.start()
    time.sleep(0.3)
    built = token_cache.cached_tokens(docs, tok, 8, **kwargs)
    waiter.join(timeout=10)
    assert np.array_equal(got["f"].blocks, built.blocks)


def test_a_damaged_token_file_is_a_clear_error(tmp_path):
    docs = ["one two three four five six"] * 50
    tok = text.train_bpe_tokenizer(docs, 300)
    kwargs = dict(source_id={"test": 1}, cache_dir=tmp_path)
    built = token_cache.cached_tokens(docs, tok, 8, **kwargs)
    with open(built.path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="does not match its header"):
        token_cache.cached_tokens(docs, tok, 8, **kwargs)


class _Recording:
    """A [n, len] array that records which rows were read."""

    def __init__(self, n: int, length: int = 3):
        self.data = np.arange(n * length).reshape(n, length)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows):
        self.read.extend(np.atleast_1d(np.arange(len(self.data))[rows]).tolist())
        return self.data[rows]


@pytest.mark.parametrize("in_order", [False, True])
def test_each_rank_reads_only_its_rows(in_order):
    blocks = _Recording(40)
    source = BlockBatches(blocks, 8, seed=2, eval_blocks=4, in_order=in_order)
    whole = source.batch(5)
    blocks.read.clear()
    parts = [source.batch(5, rank, 2) for rank in range(2)]
    assert len(blocks.read) == 8  # four rows each, nothing more
    assert torch.equal(torch.stack(parts, 1).flatten(0, 1), whole)


def test_streaming_runs_epochs_and_resumes_in_constant_reads():
    blocks = _Recording(12)  # 2 held out, 10 to train on
    stream = StreamingBatches(blocks, batch_size=4, eval_blocks=2)
    seen = [stream.batch(step)[:, 0] // 3 for step in range(6)]  # 24 blocks: past 2 epochs
    assert torch.cat(seen).tolist() == [2 + i % 10 for i in range(24)]
    blocks.read.clear()
    resumed = StreamingBatches(blocks, batch_size=4, eval_blocks=2)
    blocks.read.clear()
    assert torch.equal(resumed.batch(1000), stream.batch(1000))
    assert len(blocks.read) == 8  # the resumed stream read its batch, not the 4000 before it


def test_slow_and_fast_tokenizers_have_identities():
    docs = ["one two three four five six"] * 50
    fast = text.train_bpe_tokenizer(docs, 300)
    other = text.train_bpe_tokenizer(docs + ["seven eight nine ten"] * 50, 300)
    assert token_cache.tokenizer_identity(fast) != token_cache.tokenizer_identity(other)

    class Slow:  # what the cache reads of a tokenizer without a Rust backend
        special_tokens_map = {"eos_token": "<|endoftext|>"}

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a, b = Slow({"a": 0, "b": 1}), Slow({"a": 0, "c": 1})
    assert token_cache.tokenizer_identity(a) != token_cache.tokenizer_identity(b)


@pytest.mark.slow
def test_two_processes_share_one_token_file_and_match_one_process(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from codelens.checkpoint import read_tensors
    from codelens.training.trainer import train

    def run_config(name: str) -> TrainConfig:
        cfg = _config(tmp_path, cache_dir=str(tmp_path / f"cache-{name}"))
        cfg.run_dir, cfg.steps, cfg.batch_size = str(tmp_path / name), 8, 8
        cfg.codebook, cfg.init_samples, cfg.grad_clip = {"n_codes": 16, "k": 1}, 256, None
        cfg.eval_every = cfg.checkpoint_every = 0
        cfg.validate()
        return cfg

    train(run_config("single"), progress=False)
    cfg_file = tmp_path / "ddp.json"
    cfg_file.write_text(json.dumps(run_config("ddp").to_dict()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).parent / "scripts" / "train_run.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*cmd, f"--master_port={port}", str(script), str(cfg_file)], check=True, env=env)
    assert len(list((tmp_path / "cache-ddp" / "tokens").glob("*.bin"))) == 1
    final = {n: tmp_path / n / "final" for n in ("single", "ddp")}
    a, b = (
        {**read_tensors(f / "model.safetensors"), **read_tensors(f / "codebooks.safetensors")}
        for f in final.values()
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
