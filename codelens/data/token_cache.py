"""Tokenise a corpus once into a memory-mapped token file that every rank and resume reads.

A token file is the corpus packed as `codelens.data.text.PackedBlocks` packs it (each
document's ids, then eos; the final partial block dropped), stored as raw ``uint16``
(``uint32`` for vocabularies above 65,536) in ``<key>.bin`` beside a JSON header
``<key>.json``. The key is the sha256 of what the tokens depend on: the source's identity
(a local file's sha256; a hub dataset's name, config, split and column), the tokenizer
(the sha256 of its serialised JSON), the block length and the block cap. Both files are
written atomically, the header last, so a header on disk means a complete token file.

One process per machine (``LOCAL_RANK`` 0) builds a missing file while the others wait for
its header; concurrent builders on a shared filesystem write identical bytes, so the last
rename wins harmlessly. The next start, on any rank, maps the file and tokenises nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codelens.files import atomic_path, atomic_write_json, sha256_file, sha256_json

FORMAT = 1
CACHE_ENV = "CODELENS_CACHE"
WAIT_SECONDS = 6 * 3600.0  # how long a rank waits for another to finish tokenising


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where codelens caches derived data: ``cache_dir``, else ``$CODELENS_CACHE``, else
    ``$XDG_CACHE_HOME/codelens`` (``~/.cache/codelens``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "codelens"


def source_identity(
    source: str,
    *,
    split: str,
    text_column: str,
    config_name: str | None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What names a corpus's content: a local file's sha256 (so an edited file is a new
    corpus), or a hub dataset's name, config, split and text column.

    A file's sha256 is remembered in the cache under its path, size and modification
    time, so a later start does not read the whole corpus again to hash it.
    """
    path = Path(source).expanduser()
    if not path.is_file():
        return {"hub": source, "config": config_name, "split": split, "text_column": text_column}
    stat = path.stat()
    seen = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_root(cache_dir) / "sources" / f"{sha256_json(seen)}.json"
    try:
        digest = json.loads(memo.read_text())["sha256"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        digest = sha256_file(path)
        atomic_write_json(memo, {**seen, "sha256": digest})
    return {"file_sha256": digest, "text_column": text_column}


def tokenizer_identity(tokenizer: Any) -> str:
    """The sha256 of a fast tokenizer's serialised JSON (vocabulary, merges, normaliser);
    for a slow one, of its class, vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    return sha256_json(
        {
            "class": type(tokenizer).__name__,
            "vocab": tokenizer.get_vocab(),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        }
    )


@dataclass(frozen=True)
class TokenFile:
    """A finished token file: its header and the packed blocks, memory-mapped read-only."""

    path: Path
    header: dict[str, Any]

    @property
    def blocks(self) -> np.ndarray:
        """``[n_blocks, block_len]`` ids, mapped from disk (rows are read when indexed)."""
        h = self.header
        return np.memmap(self.path, dtype=h["dtype"], mode="r").reshape(
            h["n_blocks"], h["block_len"]
        )


def cached_tokens(
    texts: Iterable[str],
    tokenizer: Any,
    block_len: int,
    *,
    source_id: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    max_blocks: int | None = None,
    vocab_size: int | None = None,
    builder: bool = True,
    wait_seconds: float = WAIT_SECONDS,
) -> TokenFile:
    """The token file of ``texts`` under ``tokenizer`` and ``block_len``, built if missing.

    ``builder=False`` (ranks other than a machine's first) waits up to ``wait_seconds``
    for another process to finish the file instead of tokenising. ``vocab_size`` checks
    every id against the model's vocabulary while building.
    """
    from codelens.data.text import PackedBlocks

    packer = PackedBlocks(texts, tokenizer, block_len, vocab_size=vocab_size, max_blocks=max_blocks)
    key = {
        "format": FORMAT,
        "source": source_id,
        "tokenizer": tokenizer_identity(tokenizer),
        "eos": packer.eos_id,
        "block_len": block_len,
        "max_blocks": max_blocks,
    }
    name = sha256_json(key)
    folder = cache_root(cache_dir) / "tokens"
    bin_path, header_path = folder / f"{name}.bin", folder / f"{name}.json"
    found = _read_header(header_path, bin_path, key)
    if found is not None:
        return found
    if not builder:
        deadline = time.monotonic() + wait_seconds
        while (found := _read_header(header_path, bin_path, key)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {wait_seconds:.0f} s for the process with LOCAL_RANK 0 to write "
                    f"the token file {header_path}; is the cache directory shared by the ranks?"
                )
            time.sleep(0.5)
        return found
    return _build(packer, key, bin_path, header_path)


def _read_header(header_path: Path, bin_path: Path, key: dict[str, Any]) -> TokenFile | None:
    """The token file if its header exists, matches ``key`` and sizes the .bin right."""
    try:
        header = json.loads(header_path.read_text())
        size = bin_path.stat().st_size
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    expected = header.get("n_blocks", -1) * header.get("block_len", 0)
    if header.get("key") != key or size != expected * np.dtype(header.get("dtype")).itemsize:
        raise ValueError(
            f"the token file {bin_path} does not match its header {header_path} (another "
            "version wrote it, or it was changed by hand); delete both to tokenise again"
        )
    return TokenFile(bin_path, header)


def _build(packer: Any, key: dict[str, Any], bin_path: Path, header_path: Path) -> TokenFile:
    """Tokenise ``packer``'s documents batch by batch straight into the .bin file."""
    from codelens.data.text import _batched

    dtype = np.uint16 if len(packer.tokenizer) <= 2**16 else np.uint32
    cap = None if packer.max_blocks is None else packer.max_blocks * packer.block_len
    started, n_tokens = time.perf_counter(), 0
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as out:
        for docs in _batched(iter(packer.texts), packer.doc_batch):
            ids = np.asarray(packer._tokenize(docs), dtype=dtype)
            if cap is not None:
                ids = ids[: cap - n_tokens]
            out.write(ids.tobytes())
            n_tokens += len(ids)
            if cap is not None and n_tokens >= cap:
                break
        n_blocks = n_tokens // packer.block_len
        if n_blocks == 0:
            raise ValueError(
                f"no full block of block_len={packer.block_len} tokens can be made: the "
                f"corpus has only {n_tokens} tokens (including eos separators)"
            )
        out.truncate(n_blocks * packer.block_len * np.dtype(dtype).itemsize)
        out.flush()
    header = {
        "key": key,
        "dtype": np.dtype(dtype).name,
        "n_blocks": n_blocks,
        "block_len": packer.block_len,
        "corpus_tokens": n_tokens,
        "tokenise_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(header_path, header)
    return TokenFile(bin_path, header)


TOKENIZER_MARKER = "codelens_trained_on.json"


def trained_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike,
    *,
    source_id: dict[str, Any],
    builder: bool = True,
    wait_seconds: float = WAIT_SECONDS,
) -> Any:
    """The BPE tokenizer of a from-scratch run: trained once into ``save_dir`` (by the
    ``builder``), then loaded from there by every other rank and by every resume.

    A marker beside the tokenizer names the corpus and vocabulary size it was trained on;
    one trained on something else is retrained, never silently reused.
    """
    from codelens.data.text import load_tokenizer, train_bpe_tokenizer

    save_dir = Path(save_dir)
    marker = save_dir / TOKENIZER_MARKER
    wanted = {"source": source_id, "vocab_size": vocab_size}

    def ready() -> bool:
        try:
            return json.loads(marker.read_text()) == wanted
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    if not ready():
        if builder:
            marker.unlink(missing_ok=True)  # codelens wrote it; it names another corpus
            train_bpe_tokenizer(texts, vocab_size, save_dir=save_dir)
            atomic_write_json(marker, wanted)
        else:
            deadline = time.monotonic() + wait_seconds
            while not ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {wait_seconds:.0f} s for the process with LOCAL_RANK 0 to "
                        f"train the tokenizer into {save_dir}"
                    )
                time.sleep(0.5)
    return load_tokenizer(save_dir)
