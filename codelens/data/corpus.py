"""Labelled corpora: text documents with one label each, from files, a directory, the
`fortunes` and `linux-doc` presets or a Hugging Face dataset.

`load_labelled_corpus` reads any of them into a `LabelledCorpus` and checks it before
anything trains on it (missing columns, empty texts, labels with too few documents,
unknown topics), `LabelledCorpus.split` makes stratified parts for training, code
search and a classifier, and `default_prompts` picks topic-neutral prompts from the
documents' openings.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORTUNES_DIR",
    "FORTUNE_TOPICS",
    "LINUX_DOC_DIR",
    "LINUX_DOC_TOPICS",
    "LabelledCorpus",
    "default_prompts",
    "load_labelled_corpus",
]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
"""Where Debian's ``fortunes`` and ``fortunes-min`` packages put their quotation files."""
FORTUNE_TOPICS = (
    "computers",
    "food",
    "law",
    "love",
    "medicine",
    "politics",
    "science",
    "sports",
)
"""The fortune files the ``"fortunes"`` preset loads by default, one topic each."""

LINUX_DOC_DIR = Path("/usr/share/doc/linux-doc-6.1/Documentation")
"""Debian's ``linux-doc-6.1`` package: the kernel's documentation, one directory per
subsystem (reStructuredText, gzipped)."""
LINUX_DOC_TOPICS = (
    "filesystems",
    "gpu",
    "hwmon",
    "networking",
    "scsi",
    "sound",
    "trace",
    "virt",
)
"""The documentation directories the ``"linux-doc"`` preset loads by default: eight
subsystems of 0.28 to 2.3 MB of text, each with its own vocabulary."""

_PRESETS = {
    "fortunes": ("FORTUNES_DIR", FORTUNE_TOPICS, "apt-get install fortunes fortunes-min"),
    "linux-doc": ("LINUX_DOC_DIR", LINUX_DOC_TOPICS, "apt-get install linux-doc-6.1"),
}
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
PASSAGE_WORDS = 50
"""A label directory's files are cut into passages of at least this many words."""
_SKIPPED_SUFFIXES = (".dat", ".u8")  # fortune's index files and its UTF-8 symlinks
_TEXT_SUFFIXES = ("", ".txt", ".text", ".rst", ".md")  # files read in a label directory
_FORTUNE_SEPARATOR = re.compile(r"^%[ \t]*$", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_RULE = re.compile(r"^[ \t]*[=\-~^*#+`:'\".,_|<>]+[ \t]*$", re.M)  # underlines, rules


@dataclass(frozen=True)
class LabelledCorpus:
    """Documents (``texts``) and their labels, in the same order."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"corpus {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels"
            )

    @property
    def topics(self) -> tuple[str, ...]:
        """The distinct labels, sorted."""
        return tuple(sorted(set(self.labels)))

    def counts(self) -> dict[str, int]:
        """Documents per label, in `topics` order."""
        counts = Counter(self.labels)
        return {t: counts[t] for t in self.topics}

    def select(self, topics: Iterable[str]) -> LabelledCorpus:
        """The documents of ``topics`` only (an unknown topic is an error)."""
        topics = list(topics)
        _check_topics(self, topics)
        keep = set(topics)
        rows = [(x, y) for x, y in zip(self.texts, self.labels, strict=True) if y in keep]
        return LabelledCorpus(self.name, tuple(x for x, _ in rows), tuple(y for _, y in rows))

    def split(self, fractions: Mapping[str, float], seed: int) -> dict[str, LabelledCorpus]:
        """Stratified parts named as in ``fractions`` (which sum to 1): each label's
        documents are shuffled with ``seed`` and shared out by the fractions (largest
        remainders), every part getting at least one document of every label. Parts keep
        the corpus order and are disjoint; the same seed gives the same parts."""
        names = list(fractions)
        shares = [float(fractions[n]) for n in names]
        if not names or any(not s > 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ValueError(f"split fractions must be > 0 and sum to 1, got {dict(fractions)}")
        rng = random.Random(seed)
        parts: list[list[int]] = [[] for _ in names]
        by_label: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            by_label.setdefault(label, []).append(i)
        for label in self.topics:
            rows = by_label[label]
            if len(rows) < len(names):
                raise ValueError(
                    f"corpus {self.name!r}: label {label!r} has {len(rows)} documents, too "
                    f"few for one in each of the {len(names)} parts {names}"
                )
            rng.shuffle(rows)
            start = 0
            for part, size in zip(parts, _part_sizes(len(rows), shares), strict=True):
                part += rows[start : start + size]
                start += size
        return {
            name: LabelledCorpus(
                f"{self.name}[{name}]",
                tuple(self.texts[i] for i in sorted(rows)),
                tuple(self.labels[i] for i in sorted(rows)),
            )
            for name, rows in zip(names, parts, strict=True)
        }


def _part_sizes(n: int, shares: Sequence[float]) -> list[int]:
    """``n`` shared out by ``shares`` (largest remainders), at least one each."""
    exact = [s * n for s in shares]
    sizes = [max(1, int(e)) for e in exact]
    while sum(sizes) < n:
        sizes[max(range(len(sizes)), key=lambda i: exact[i] - sizes[i])] += 1
    while sum(sizes) > n:
        sizes[
            max((i for i in range(len(sizes)) if sizes[i] > 1), key=lambda i: sizes[i] - exact[i])
        ] -= 1
    return sizes


def _check_topics(corpus: LabelledCorpus, topics: Sequence[str]) -> None:
    unknown = [t for t in topics if t not in set(corpus.labels)]
    if unknown:
        raise ValueError(
            f"topics {unknown} are not labels of corpus {corpus.name!r}; "
            f"known: {list(corpus.topics)}"
        )


# ---------------------------------------------------------------------------- loading


def load_labelled_corpus(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    topics: Sequence[str] | None = None,
    min_documents: int = 20,
    skip_empty: bool = False,
) -> LabelledCorpus:
    """Load and check a labelled corpus.

    ``spec`` is one of:

    - a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` or ``.parquet`` file with
      ``text_column`` and ``label_column``;
    - a directory with one text file or one sub-directory per label (the name, less
      ``.gz`` and ``.txt`` suffixes, is the label). A file with lines holding only
      ``%`` is split at them (the fortune format); otherwise at blank lines. A
      sub-directory's text files (no suffix, ``.txt``, ``.text``, ``.rst``, ``.md``, each
      maybe gzipped; at any depth) are cut into passages: paragraphs, less lines of
      only punctuation (reStructuredText and Markdown underlines), joined until they
      hold `PASSAGE_WORDS` words. Hidden files and fortune's ``.dat``/``.u8`` files are
      skipped, ``.gz`` files are decompressed, bytes that are not UTF-8 are replaced,
      and overstruck characters (``_`` backspace ``x``, fortune's underlining) keep the
      last character;
    - a preset, by default its own topics: ``"fortunes"``, Debian's fortune files
      (`FORTUNES_DIR`, `FORTUNE_TOPICS`), or ``"linux-doc"``, the Linux kernel's
      documentation (`LINUX_DOC_DIR`, `LINUX_DOC_TOPICS`);
    - otherwise a Hugging Face dataset id (its ``train`` split; needs the network).

    ``topics`` keeps only those labels (default: every label). Texts are stripped of
    surrounding whitespace. Errors (ValueError) name the problem: a missing file or
    column, an empty text (unless ``skip_empty``: then it is left out), an unknown
    topic, fewer than two topics, or a topic with fewer than ``min_documents``
    documents.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"corpus must be a non-empty string, got {spec!r}")
    if min_documents < 1:
        raise ValueError(f"min_documents must be >= 1, got {min_documents}")
    from codelens.data.text import DataFileNotFoundError  # torch, so not at import time

    if spec in _PRESETS:
        path = preset_directory(spec)
        if not path.is_dir():
            raise DataFileNotFoundError(
                f"the {spec!r} corpus reads {path}, which does not exist; install it with: "
                f"{_PRESETS[spec][2]}"
            )
        topics = _PRESETS[spec][1] if topics is None else topics
    else:
        path = Path(spec).expanduser()
    if path.is_dir():
        corpus = _load_directory(path, topics, skip_empty)
    elif path.suffix.lower() in TABLE_SUFFIXES or path.exists() or _looks_like_path(spec):
        if not path.exists():
            raise DataFileNotFoundError(f"corpus file or directory {spec!r} does not exist")
        corpus = _load_table(path, text_column, label_column, skip_empty)
    else:
        corpus = _load_hub(spec, text_column, label_column, skip_empty)
    if topics is not None:
        corpus = corpus.select(topics)
    _check_sizes(corpus, min_documents)
    return corpus


def preset_directory(spec: str) -> Path | None:
    """The directory a preset (``"fortunes"``, ``"linux-doc"``) reads, else None."""
    return globals()[_PRESETS[spec][0]] if spec in _PRESETS else None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("./", "../", "/", "~")) or Path(spec).suffix != ""


def _check_sizes(corpus: LabelledCorpus, min_documents: int) -> None:
    counts = corpus.counts()
    if len(counts) < 2:
        raise ValueError(
            f"corpus {corpus.name!r} has {len(counts)} topic(s) {list(counts)}; "
            "steering and topic classification need at least 2"
        )
    small = {t: n for t, n in counts.items() if n < min_documents}
    if small:
        raise ValueError(
            f"corpus {corpus.name!r}: these labels have fewer than {min_documents} "
            f"documents: {small}"
        )


def _clean(text: str) -> str:
    """Overstruck characters (``x`` backspace ``y``) keep ``y``; then whitespace stripped."""
    if "\b" in text:
        out: list[str] = []
        for ch in text:
            if ch == "\b":
                if out:
                    out.pop()
            else:
                out.append(ch)
        text = "".join(out)
    return text.strip()


def _label_sources(path: Path) -> dict[str, Path]:
    """Label -> its file or sub-directory."""
    sources = {}
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or f.suffix in _SKIPPED_SUFFIXES:
            continue
        if f.is_dir():
            sources[f.name] = f
        elif f.is_file():
            sources[f.name.removesuffix(".gz").removesuffix(".txt")] = f
    if not sources:
        raise ValueError(
            f"corpus directory {str(path)!r} holds no text files or sub-directories (one per label)"
        )
    return sources


def _read_text(f: Path) -> str:
    raw = f.read_bytes()
    return (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8", "replace")


def _file_entries(f: Path) -> list[str]:
    """A label file's documents: its fortunes, else its paragraphs."""
    raw = _read_text(f)
    if not _FORTUNE_SEPARATOR.search(raw):
        return [e for e in _PARAGRAPH_BREAK.split(raw) if e.strip()]
    entries = _FORTUNE_SEPARATOR.split(raw)
    if not entries[-1].strip():  # a file ending with its separator
        entries.pop()
    if entries and not entries[0].strip():  # or starting with one
        entries.pop(0)
    return entries


def _passages(directory: Path) -> list[str]:
    """A label directory's documents: passages of `PASSAGE_WORDS` words or more, cut at
    paragraph breaks of its text files (a file's short tail joins its last passage)."""
    passages = []
    for f in sorted(directory.rglob("*")):
        name = f.name.removesuffix(".gz")
        hidden = any(part.startswith(".") for part in f.relative_to(directory).parts)
        if hidden or not f.is_file() or Path(name).suffix not in _TEXT_SUFFIXES:
            continue
        mine: list[str] = []
        current: list[str] = []
        words = 0
        for paragraph in _PARAGRAPH_BREAK.split(_RULE.sub("", _read_text(f))):
            if paragraph.strip():
                current.append(paragraph.strip())
                words += len(paragraph.split())
            if words >= PASSAGE_WORDS:
                mine.append("\n\n".join(current))
                current, words = [], 0
        if current and mine:
            mine[-1] = "\n\n".join([mine[-1], *current])
        elif current:
            mine.append("\n\n".join(current))
        passages += mine
    return passages


def _load_directory(path: Path, topics: Sequence[str] | None, skip_empty: bool) -> LabelledCorpus:
    sources = _label_sources(path)
    if topics is not None:
        unknown = [t for t in topics if t not in sources]
        if unknown:
            raise ValueError(
                f"topics {unknown} are not labels of corpus {str(path)!r}; known: {list(sources)}"
            )
        sources = {t: sources[t] for t in sources if t in set(topics)}
    texts, labels = [], []
    for label, f in sources.items():
        entries = _passages(f) if f.is_dir() else _file_entries(f)
        for number, entry in enumerate(entries, 1):
            text = _clean(entry)
            if not text and skip_empty:
                continue
            if not text:
                raise ValueError(f"corpus file {str(f)!r}: entry {number} is empty")
            texts.append(text)
            labels.append(label)
    return LabelledCorpus(str(path), tuple(texts), tuple(labels))


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a table file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not valid JSON lines: {err}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"corpus file {str(path)!r}: every row must be a JSON object")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, rows


def _load_table(
    path: Path, text_column: str, label_column: str, skip_empty: bool
) -> LabelledCorpus:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(
            f"corpus file {str(path)!r}: unsupported extension {suffix or '(none)'!r}; "
            f"expected a directory or one of {', '.join(TABLE_SUFFIXES)}"
        )
    columns, rows = _read_rows(path)
    return _from_rows(str(path), columns, rows, text_column, label_column, skip_empty)


def _from_rows(
    name: str,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    text_column: str,
    label_column: str,
    skip_empty: bool,
    label_names: Sequence[str] | None = None,
) -> LabelledCorpus:
    for kind, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise ValueError(
                f"corpus {name!r} has no {kind} column {column!r}; columns found: {list(columns)}"
            )
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"corpus {name!r}, row {number}: column {text_column!r} holds a "
                f"{type(text).__name__}, not text"
            )
        text = _clean(text or "")
        if not text and skip_empty:
            continue
        if not text:
            raise ValueError(f"corpus {name!r}, row {number}: empty text")
        if label is None or str(label).strip() == "":
            raise ValueError(f"corpus {name!r}, row {number}: no label")
        if label_names is not None and isinstance(label, int):
            label = label_names[label]
        texts.append(text)
        labels.append(str(label).strip())
    if not texts:
        raise ValueError(f"corpus {name!r} has no rows")
    return LabelledCorpus(name, tuple(texts), tuple(labels))


def _load_hub(spec: str, text_column: str, label_column: str, skip_empty: bool) -> LabelledCorpus:
    """The ``train`` split of a Hugging Face dataset (not a local file or directory)."""
    import datasets

    try:
        ds = datasets.load_dataset(spec, split="train")
    except Exception as err:  # offline, unknown id, ...: one line naming the id
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"corpus {spec!r} is not a local file or directory, and loading it as a Hugging "
            f"Face dataset failed ({type(err).__name__}: {first})"
        ) from None
    feature = ds.features.get(label_column)
    names = getattr(feature, "names", None)  # a ClassLabel's class names
    return _from_rows(spec, ds.column_names, iter(ds), text_column, label_column, skip_empty, names)


# ---------------------------------------------------------------------------- prompts


def default_prompts(corpus: LabelledCorpus, n: int = 4) -> tuple[str, ...]:
    """``n`` topic-neutral prompts: the first words that open documents of every label.

    Each document's first word (as written, trailing punctuation kept) is counted per
    label; a word's score is its smallest share of openings over the labels, so a word
    that opens many documents of one topic but none of another scores 0. The ``n``
    highest scores win (ties: more documents overall, then alphabetical); words that
    open no document of some label only fill up when too few open every label's, and
    openings without a letter (list bullets, markup such as ``..``) come last.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_label: dict[str, Counter] = {t: Counter() for t in corpus.topics}
    for text, label in zip(corpus.texts, corpus.labels, strict=True):
        per_label[label][text.split(maxsplit=1)[0]] += 1
    sizes = corpus.counts()
    total: Counter = sum(per_label.values(), Counter())

    def score(word: str) -> tuple[bool, float, int, str]:
        share = min(per_label[t][word] / sizes[t] for t in per_label)
        return (not any(ch.isalpha() for ch in word), -share, -total[word], word)

    ranked = sorted(total, key=score)
    if len(ranked) < n:
        raise ValueError(f"corpus {corpus.name!r} has only {len(ranked)} distinct first words")
    return tuple(ranked[:n])
