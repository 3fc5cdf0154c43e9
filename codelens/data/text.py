"""Text data for language-model training: loading, BPE tokenizers and packed token blocks.

The pieces compose into a small pipeline:

    docs = load_text_dataset("corpus.txt")
    tok = train_bpe_tokenizer(docs, vocab_size=4096, save_dir="runs/tok")
    blocks = PackedBlocks(docs, tok, block_len=128, n_ctx=model.cfg.n_ctx)
    loader = torch.utils.data.DataLoader(blocks, batch_size=32)

Everything streams: documents are read lazily and tokenised in batches, so corpora larger than
memory work. ``pack_to_tensor`` is the eager shortcut for small corpora.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "DataFileNotFoundError",
    "PackedBlocks",
    "TextDocuments",
    "check_token_ids",
    "load_text_dataset",
    "load_tokenizer",
    "pack_to_tensor",
    "train_bpe_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"
"""Special token used as bos, eos and pad by tokenizers from `train_bpe_tokenizer`."""

DEFAULT_TOKENIZER_NAME = "codelens-bpe"

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Suffixes that mark a source as a file path even when it does not exist (hub names have none).
_FILE_LIKE_SUFFIXES = SUPPORTED_SUFFIXES + (
    ".csv",
    ".tsv",
    ".arrow",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
    ".tar",
    ".md",
    ".text",
)
_DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_ITER_BATCH = 1000


class DataFileNotFoundError(FileNotFoundError, ValueError):
    """A local data file does not exist (also a ValueError, like every other bad input here)."""


# --------------------------------------------------------------------------------------------
# Loading documents
# --------------------------------------------------------------------------------------------


class TextDocuments:
    """Re-iterable collection of the non-empty documents of a text dataset.

    Each ``iter()`` starts a fresh pass over the source, so the object can be handed to both
    `train_bpe_tokenizer` and `PackedBlocks`. Empty and whitespace-only documents
    are skipped.
    """

    def __init__(self, name: str, make_iter: Callable[[], Iterator[str]]) -> None:
        self.name = name
        self._make_iter = make_iter

    def __iter__(self) -> Iterator[str]:
        for doc in self._make_iter():
            if doc.strip():
                yield doc

    def __repr__(self) -> str:
        return f"TextDocuments({self.name!r})"


def load_text_dataset(
    source: str,
    *,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    config_name: str | None = None,
) -> TextDocuments:
    """Load the documents of a local file or Hugging Face hub dataset as an iterable of strings.

    ``source`` is either a local file or a hub dataset name:

    - ``.txt``: one document per paragraph; paragraphs are separated by blank (empty or
      whitespace-only) lines, and the lines of a paragraph are joined with ``"\\n"``.
    - ``.jsonl`` / ``.json``: JSON lines, one object per line holding ``text_column``.
    - ``.parquet``: a table with a ``text_column`` column.
    - anything else is passed to ``datasets.load_dataset(source, config_name, split=split,
      streaming=streaming)``, e.g. ``"roneneldan/TinyStories"`` or ``"wikitext"`` with
      ``config_name="wikitext-103-raw-v1"``.

    Local files have a single ``"train"`` split. Empty documents are skipped; the call fails
    early when the dataset has none at all, or lacks ``text_column``.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    if not isinstance(text_column, str) or not text_column:
        raise ValueError(f"text_column must be a non-empty string, got {text_column!r}")
    if not isinstance(streaming, bool):
        raise ValueError(f"streaming must be a bool, got {streaming!r}")
    if config_name is not None and (not isinstance(config_name, str) or not config_name):
        raise ValueError(f"config_name must be a non-empty string or None, got {config_name!r}")

    if _looks_local(source):
        docs = _load_local(source, split=split, text_column=text_column, streaming=streaming)
    else:
        docs = _load_hub(
            source,
            split=split,
            text_column=text_column,
            streaming=streaming,
            config_name=config_name,
        )
    # Fail now rather than deep inside a training loop: peek at the first document.
    if next(iter(docs), None) is None:
        raise ValueError(f"dataset {docs.name!r} has no non-empty documents")
    return docs


def _looks_local(source: str) -> bool:
    """True when ``source`` names a file path rather than a hub dataset."""
    path = Path(source).expanduser()
    if path.exists():
        return True
    if source.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(source):
        return True
    return path.suffix.lower() in _FILE_LIKE_SUFFIXES


def _load_local(source: str, *, split: str, text_column: str, streaming: bool) -> TextDocuments:
    """Documents of a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"data file {source!r} does not exist")
    if path.is_dir():
        raise ValueError(
            f"data source {source!r} is a directory; pass a single "
            f"{'/'.join(SUPPORTED_SUFFIXES)} file"
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported file extension {suffix or '(none)'!r} for data file {source!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if split != "train":
        raise ValueError(
            f"local data file {source!r} has a single split 'train', got split={split!r}"
        )
    if suffix == ".txt":
        return TextDocuments(str(path), lambda: _iter_paragraphs(path))

    import datasets

    ds = datasets.load_dataset(
        _DATASETS_BUILDERS[suffix], data_files=str(path), split="train", streaming=streaming
    )
    return _documents_from_hf(ds, str(path), text_column)


def _load_hub(
    source: str, *, split: str, text_column: str, streaming: bool, config_name: str | None
) -> TextDocuments:
    """Documents of a Hugging Face hub dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(source, config_name, split=split, streaming=streaming)
    except Exception as e:  # re-raised with the source named
        raise ValueError(
            f"could not load dataset {source!r} (config {config_name!r}, split {split!r}) "
            f"from the Hugging Face hub: {e}"
        ) from e
    return _documents_from_hf(ds, source, text_column)


def _documents_from_hf(ds: Any, name: str, text_column: str) -> TextDocuments:
    """Wrap a ``datasets`` (Iterable)Dataset as `TextDocuments` over ``text_column``."""
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"text column {text_column!r} not found in dataset {name!r}; "
            f"available columns: {list(columns)}"
        )

    def make_iter() -> Iterator[str]:
        if columns is None:  # schema unknown until we read (some streaming datasets)
            rows = ds.iter(batch_size=_ITER_BATCH)
        else:
            rows = ds.select_columns([text_column]).iter(batch_size=_ITER_BATCH)
        for batch in rows:
            if text_column not in batch:
                raise ValueError(
                    f"text column {text_column!r} not found in dataset {name!r}; "
                    f"available columns: {list(batch)}"
                )
            for text in batch[text_column]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ValueError(
                        f"text column {text_column!r} of dataset {name!r} holds "
                        f"{type(text).__name__} values, not strings"
                    )
                yield text

    return TextDocuments(name, make_iter)


def _iter_paragraphs(path: Path) -> Iterator[str]:
    """Yield blank-line-separated paragraphs of a text file, one line in memory at a time."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, save_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) and wrap it for transformers/TransformerLens.

    ``<|endoftext|>`` (id 0) is the bos, eos and pad token. Every byte has a token, so any text
    can be encoded; ``len(tokenizer)`` can be below ``vocab_size`` on a small corpus. Encoding
    does not add special tokens (TransformerLens prepends the bos itself). The returned
    ``transformers.PreTrainedTokenizerFast`` carries ``init_kwargs["name_or_path"]`` and
    ``init_kwargs["add_bos_token"] = True`` so TransformerLens 4 uses it as is instead of
    reloading a tokenizer from the hub. With ``save_dir`` it is also saved (atomically) with
    ``save_pretrained``; reload it with `load_tokenizer`.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise ValueError(
            f"texts must be an iterable of strings (e.g. a list of documents), "
            f"got {type(texts).__name__}"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < 257:
        raise ValueError(
            f"vocab_size must be at least 257 (256 byte tokens + {ENDOFTEXT}), got {vocab_size}"
        )

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_docs = 0

    def checked() -> Iterator[str]:
        nonlocal n_docs
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
            if text.strip():
                n_docs += 1
                yield text

    tok.train_from_iterator(checked(), trainer)
    if n_docs == 0:
        raise ValueError("texts has no non-empty documents to train the tokenizer on")

    name = str(save_dir) if save_dir is not None else DEFAULT_TOKENIZER_NAME
    hf_tok = _wrap_tokenizer(tok, name)
    if save_dir is not None:
        _save_tokenizer_atomic(hf_tok, Path(save_dir))
    return hf_tok


def _wrap_tokenizer(tok: Any, name: str) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` as a TransformerLens-ready PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT
    )
    return _mark_for_transformer_lens(hf_tok, name)


def _mark_for_transformer_lens(hf_tok: Any, name: str) -> Any:
    """Set the init kwargs TransformerLens 4 reads, so it never reloads the tokenizer by name."""
    hf_tok.name_or_path = name
    hf_tok.init_kwargs["name_or_path"] = name
    hf_tok.init_kwargs["add_bos_token"] = True
    return hf_tok


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by `train_bpe_tokenizer` (or any local tokenizer dir).

    Sets the same init kwargs as `train_bpe_tokenizer`, so TransformerLens 4 uses it as is.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DataFileNotFoundError(f"no tokenizer.json in tokenizer directory {str(path)!r}")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _mark_for_transformer_lens(hf_tok, str(path))


def _save_tokenizer_atomic(hf_tok: Any, save_dir: Path) -> None:
    """``save_pretrained`` into a temp dir next to ``save_dir``, then move it into place.

    A new ``save_dir`` appears in one rename; into an existing one, each file is replaced
    atomically and unrelated files there are left alone.
    """
    save_dir = save_dir.expanduser()
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"save_dir {str(save_dir)!r} exists and is not a directory")
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        hf_tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, save_dir)  # atomic when save_dir does not exist yet
            return
        except OSError:
            if not save_dir.is_dir():
                raise
        for file in tmp.iterdir():
            os.replace(file, save_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Packing into fixed-length blocks
# --------------------------------------------------------------------------------------------


def check_token_ids(
    tokens: Tensor | Sequence[int] | Sequence[Sequence[int]], vocab_size: int
) -> None:
    """Raise ValueError when any token id is outside ``[0, vocab_size)``.

    Out-of-range ids otherwise surface as an opaque CUDA assert or an IndexError in the
    embedding; the message names the offending id and the vocab size. Accepts a tensor or
    (possibly ragged) nested lists of ints.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(tokens, Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got a tensor of dtype {tokens.dtype}")
        flat = tokens
    else:
        values = list(_flatten(tokens))
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise ValueError(f"token ids must be integers, got {bad!r}")
        flat = torch.tensor(values, dtype=torch.long)
    if flat.numel() == 0:
        return
    max_id, min_id = int(flat.max()), int(flat.min())
    if max_id >= vocab_size:
        raise ValueError(
            f"token id {max_id} is out of range for vocab size {vocab_size} "
            f"(max id {max_id}, ids must be < {vocab_size}); "
            "does the tokenizer match the model?"
        )
    if min_id < 0:
        raise ValueError(f"negative token id {min_id} (vocab size {vocab_size})")


def _flatten(tokens: Any) -> Iterator[Any]:
    """Flatten nested sequences of token ids (tensors inside lists are flattened too)."""
    for item in tokens:
        if isinstance(item, Tensor):
            yield from item.flatten().tolist()
        elif isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def _check_block_args(
    block_len: int, n_ctx: int | None, vocab_size: int | None, max_blocks: int | None
) -> None:
    """Validate the shared packing arguments."""
    for name, value in (("block_len", block_len), ("n_ctx", n_ctx), ("vocab_size", vocab_size)):
        if value is None and name != "block_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_ctx is not None and block_len > n_ctx:
        raise ValueError(f"block_len {block_len} exceeds the model's context {n_ctx}")
    if max_blocks is not None and (
        isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1
    ):
        raise ValueError(f"max_blocks must be a positive int or None, got {max_blocks!r}")


def _eos_id(tokenizer: Any) -> int:
    """The tokenizer's eos id, which separates packed documents."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "tokenizer has no eos token, which is needed to separate packed documents; "
            "set tokenizer.eos_token"
        )
    return int(eos)


class PackedBlocks(IterableDataset):
    """Stream of fixed-length token blocks: documents + eos, concatenated and cut.

    Each document is tokenised (without special tokens) and followed by the eos token; the
    stream is cut into blocks of ``block_len`` tokens and the final partial block is dropped.
    Documents are tokenised ``doc_batch`` at a time, so memory stays bounded. Yields
    ``Int[Tensor, "block_len"]``; a ``DataLoader`` batches them into ``(batch, block_len)``.
    With several DataLoader workers, each worker packs its own share of document batches.

    ``n_ctx`` (model context) and ``vocab_size`` (model vocabulary) are optional checks.
    """

    def __init__(
        self,
        texts: Iterable[str],
        tokenizer: Any,
        block_len: int,
        *,
        n_ctx: int | None = None,
        vocab_size: int | None = None,
        max_blocks: int | None = None,
        doc_batch: int = 256,
    ) -> None:
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise ValueError(f"texts must be an iterable of strings, got {type(texts).__name__}")
        if isinstance(texts, Iterator):
            raise ValueError(
                "texts must be re-iterable (a list or TextDocuments), not a one-shot iterator"
            )
        _check_block_args(block_len, n_ctx, vocab_size, max_blocks)
        if isinstance(doc_batch, bool) or not isinstance(doc_batch, int) or doc_batch < 1:
            raise ValueError(f"doc_batch must be a positive int, got {doc_batch!r}")
        self.texts = texts
        self.tokenizer = tokenizer
        self.block_len = block_len
        self.n_ctx = n_ctx
        self.vocab_size = vocab_size
        self.max_blocks = max_blocks
        self.doc_batch = doc_batch
        self.eos_id = _eos_id(tokenizer)
        if vocab_size is not None:
            check_token_ids([self.eos_id], vocab_size)

    def __iter__(self) -> Iterator[Int[Tensor, " block_len"]]:
        info = get_worker_info()
        if info is None or info.num_workers <= 1:
            yield from self._blocks(0, 1, strict=True, cap=self.max_blocks)
        else:
            max_blocks = self.max_blocks
            if max_blocks is not None:  # split the cap so the workers' union respects it
                max_blocks = max_blocks // info.num_workers + (
                    info.id < max_blocks % info.num_workers
                )
                if max_blocks == 0:
                    return
            yield from self._blocks(info.id, info.num_workers, strict=False, cap=max_blocks)

    def _blocks(
        self, shard: int, n_shards: int, *, strict: bool, cap: int | None
    ) -> Iterator[Int[Tensor, " block_len"]]:
        """Pack every ``n_shards``-th document batch, stopping after ``cap`` blocks.

        ``strict`` raises when the shard yields no block at all.
        """
        buffer: list[int] = []
        n_tokens = n_blocks = 0
        batches = _batched(iter(self.texts), self.doc_batch)
        for i, docs in enumerate(batches):
            if i % n_shards != shard:
                continue
            ids = self._tokenize(docs)
            n_tokens += len(ids)
            buffer.extend(ids)
            n_full = len(buffer) // self.block_len
            if n_full == 0:
                continue
            cut = n_full * self.block_len
            blocks = torch.tensor(buffer[:cut], dtype=torch.long).view(n_full, self.block_len)
            buffer = buffer[cut:]
            for block in blocks:
                yield block
                n_blocks += 1
                if cap is not None and n_blocks >= cap:
                    return
        if strict and n_blocks == 0:
            raise ValueError(
                f"no full block of block_len={self.block_len} tokens can be made: "
                f"the corpus has only {n_tokens} tokens (including eos separators)"
            )

    def _tokenize(self, docs: list[str]) -> list[int]:
        """Token ids of ``docs``, each followed by eos, as one flat list."""
        for doc in docs:
            if not isinstance(doc, str):
                raise ValueError(f"documents must be strings, got {type(doc).__name__}")
        encoded = self.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        ids: list[int] = []
        for doc_ids in encoded:
            ids.extend(doc_ids)
            ids.append(self.eos_id)
        if self.vocab_size is not None:
            check_token_ids(ids, self.vocab_size)
        return ids


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    """Consecutive lists of ``n`` items (the last may be shorter)."""
    while batch := list(itertools.islice(it, n)):
        yield batch


def pack_to_tensor(
    texts: Iterable[str],
    tokenizer: Any,
    block_len: int,
    max_blocks: int | None = None,
    *,
    n_ctx: int | None = None,
    vocab_size: int | None = None,
) -> Int[Tensor, "n block_len"]:
    """Pack a small corpus into one ``(n_blocks, block_len)`` tensor (see `PackedBlocks`)."""
    if isinstance(texts, Iterator):
        texts = list(texts)
    blocks = PackedBlocks(
        texts, tokenizer, block_len, n_ctx=n_ctx, vocab_size=vocab_size, max_blocks=max_blocks
    )
    return torch.stack(list(blocks._blocks(0, 1, strict=True, cap=max_blocks)))
