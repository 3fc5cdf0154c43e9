"""Synthetic children's-story corpus with ground-truth topics and regex features.

A stand-in for TinyStories: `generate_stories` builds short, simple stories about
one topic each from a template grammar (shared sentences plus topic-specific sentences
and a per-topic lexicon). A topic-neutral opening comes first; in about half the stories
a short sentence then names the topic before the topic's own intro. Regex-detectable
features (months, four-digit years, names starting with "B", digit numbers, number
words) are sprinkled in at the rates in `FEATURE_RATES`, and `PATTERNS` holds the
regexes that find them.
`lexicon_hits` counts a topic's lexicon words in a text, an interpretable check; which
topic a generated text is about is judged by `codelens.analysis.TopicClassifier`.

The vocabulary and the grammar are package data, ``codelens/data/stories.json``: names,
months, number words, shared word slots, openings, endings, fillers and closing clauses,
and per topic its lexicon, hints, intro / middle / end templates and word slots. Templates
use ``{slot}`` for words and ``[a|b|c]`` for inline alternatives; ``{n}`` is a count that
renders as digits, a number word or a vague quantity, depending on the story. This module
reads the file once, at import, and holds the generator.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from codelens.files import atomic_write_text

__all__ = [
    "B_NAMES",
    "FEATURE_RATES",
    "LEXICONS",
    "MONTHS",
    "NAMES",
    "NUMBER_WORDS",
    "OTHER_NAMES",
    "PATTERNS",
    "TOPICS",
    "Story",
    "feature_rates",
    "generate_stories",
    "lexicon_hits",
    "read_corpus",
    "tokenize",
    "write_corpus",
]


@dataclass(frozen=True)
class Story:
    """One generated story and its ground-truth topic."""

    text: str
    topic: str


# --------------------------------------------------------------------------- story data


def _table(value: Any, where: str) -> dict[str, Any]:
    """A non-empty object from the story data."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"story data: {where} must be a non-empty object")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A non-empty list of strings from the story data, as a tuple."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"story data: {where} must be a non-empty list of strings")
    return tuple(value)


_DATA_KEYS = ("months", "number_words", "names", "shared_slots", "openings", "endings")
_DATA_KEYS += ("fillers", "tails", "topics")
_TOPIC_KEYS = ("lexicon", "hints", "intro", "middle", "end", "slots")


def _read_data(path: Any) -> dict[str, Any]:
    """The vocabulary and grammar in ``path`` (``stories.json``), failing early on a
    broken file or a missing key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the story data {path}: {err}") from err
    missing = [k for k in _DATA_KEYS if k not in _table(data, str(path))]
    if missing:
        raise ValueError(f"story data {path} lacks {missing}")
    for topic, entry in _table(data["topics"], "topics").items():
        lacks = [k for k in _TOPIC_KEYS if k not in _table(entry, f"topics.{topic}")]
        if lacks:
            raise ValueError(f"story data {path}: topic {topic!r} lacks {lacks}")
    return data


_DATA = _read_data(resources.files(__package__).joinpath("stories.json"))
_TOPIC_DATA: dict[str, dict[str, Any]] = _DATA["topics"]

TOPICS: tuple[str, ...] = tuple(_TOPIC_DATA)
MONTHS: tuple[str, ...] = _strings(_DATA["months"], "months")
NUMBER_WORDS: tuple[str, ...] = _strings(_DATA["number_words"], "number_words")


def _names(kind: str) -> tuple[tuple[str, str], ...]:
    """``(name, "f" | "m")`` pairs of ``names.{kind}`` in the story data."""
    names = _table(_table(_DATA["names"], "names").get(kind), f"names.{kind}")
    bad = [name for name, gender in names.items() if gender not in ("f", "m")]
    if bad:
        raise ValueError(f"story data: names.{kind} {bad} need the gender 'f' or 'm'")
    return tuple(names.items())


_B_NAMES_G = _names("b")
_OTHER_NAMES_G = _names("other")

B_NAMES: tuple[str, ...] = tuple(n for n, _ in _B_NAMES_G)
OTHER_NAMES: tuple[str, ...] = tuple(n for n, _ in _OTHER_NAMES_G)
NAMES: tuple[str, ...] = B_NAMES + OTHER_NAMES

FEATURE_RATES: dict[str, float] = {
    "month": 0.35,  # share of stories with a month name
    "year": 0.25,  # share of stories with a four-digit year
    "b_name": 0.30,  # share of *drawn character names* that start with "B"
    "number": 0.40,  # share of stories with a digit number
    "number_word": 0.35,  # share of stories with a number word (two..twelve)
}


def _alternation(words: Iterable[str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


PATTERNS: dict[str, str] = {
    # Capitalised English month names as whole words ("may" the verb is not matched).
    "month": r"\b(?:" + _alternation(MONTHS) + r")\b",
    # Four-digit years 1000-2099 standing alone.
    "year": r"\b(?:1\d{3}|20\d{2})\b",
    # Character names from B_NAMES (capitalised, whole word).
    "b_name": r"\b(?:" + _alternation(B_NAMES) + r")\b",
    # Stand-alone numbers of one to three digits (years are four digits, so excluded).
    "number": r"\b\d{1,3}\b",
    # Number words two..twelve in any case ("one" is left out: "one day", "no one").
    "number_word": r"(?i)\b(?:" + _alternation(NUMBER_WORDS) + r")\b",
}
# Distinct words that signal each topic. Generated stories use a topic's lexicon words
# only in stories of that topic (the tests check this), so hits are clean ground truth.
LEXICONS: dict[str, frozenset[str]] = {
    topic: frozenset(_strings(entry["lexicon"], f"topics.{topic}.lexicon"))
    for topic, entry in _TOPIC_DATA.items()
}

# --------------------------------------------------------------------------- grammar

_SHARED = {
    slot: _strings(words, f"shared_slots.{slot}")
    for slot, words in _table(_DATA["shared_slots"], "shared_slots").items()
}


def _templates(section: str, kind: str) -> tuple[str, ...]:
    return _strings(_table(_DATA[section], section).get(kind), f"{section}.{kind}")


_OPEN_PLAIN = _templates("openings", "plain")
_OPEN_MONTH = _templates("openings", "month")
_OPEN_YEAR = _templates("openings", "year")
_OPEN_BOTH = _templates("openings", "month_year")
_END_PLAIN = _templates("endings", "plain")
_END_MONTH = _templates("endings", "month")
_END_YEAR = _templates("endings", "year")
_FILLERS = _templates("fillers", "plain")
_FILLERS_DIGITS = _templates("fillers", "digits")
_FILLERS_WORDS = _templates("fillers", "number_words")
_TAILS = _strings(_DATA["tails"], "tails")


@dataclass(frozen=True)
class _Grammar:
    intro: tuple[str, ...]
    middle: tuple[str, ...]  # roughly in narrative order
    end: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]  # fixed once per story


def _grammar(topic: str, entry: dict[str, Any]) -> _Grammar:
    where = f"topics.{topic}"
    slots = entry["slots"]
    if not isinstance(slots, dict):
        raise ValueError(f"story data: {where}.slots must be an object")
    return _Grammar(
        intro=_strings(entry["intro"], f"{where}.intro"),
        middle=_strings(entry["middle"], f"{where}.middle"),
        end=_strings(entry["end"], f"{where}.end"),
        slots={k: _strings(v, f"{where}.slots.{k}") for k, v in slots.items()},
    )


_GRAMMARS: dict[str, _Grammar] = {t: _grammar(t, e) for t, e in _TOPIC_DATA.items()}

# A sentence after the opening that names the topic early, as TinyStories often does in
# its first lines. Without it the topic would never be in context before the intro, and
# a model could not learn to let an earlier mention of the topic choose the intro.
_HINTS: dict[str, tuple[str, ...]] = {
    t: _strings(e["hints"], f"topics.{t}.hints") for t, e in _TOPIC_DATA.items()
}

_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")
_TOKEN_RE = re.compile(r"[a-z]+")
_WORD_RE = re.compile(r"\S+")
_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeio]|u(?!ni|se))")
_MIN_WORDS, _MAX_WORDS = 60, 150
_MAX_SENTS = 8
_MIN_LEXICON = 3  # distinct topic-lexicon words every story must contain
_TAIL_RATE = 0.3
_HINT_RATE = 0.5


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (runs of a-z)."""
    return _TOKEN_RE.findall(text.lower())


def _digits(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return str(rng.randint(2, 12))
    return str(rng.choice((15, 20, 25, 30, 50, 100)))


def _render(template: str, ctx: dict, rng: random.Random) -> str:
    """Fill one template: [a|b] alternatives, then {slot}s; capitalise the start."""

    def fill(m: re.Match) -> str:
        value = ctx[m.group(1)]
        if isinstance(value, str):
            return value
        if callable(value):
            return value(rng)
        return rng.choice(value)

    text = _ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    text = _SLOT_RE.sub(fill, text)
    text = _ARTICLE_RE.sub(r"\1n ", text)
    i = 1 if text.startswith('"') else 0
    return text[:i] + text[i].upper() + text[i + 1 :]


def _pick_name(rng: random.Random, avoid: str = "") -> tuple[str, str]:
    pool = _B_NAMES_G if rng.random() < FEATURE_RATES["b_name"] else _OTHER_NAMES_G
    while True:
        name, gender = rng.choice(pool)
        if name != avoid:
            return name, gender


def _context(rng: random.Random, grammar: _Grammar, digits: bool, words: bool) -> dict:
    name, gender = _pick_name(rng)
    pal, pal_gender = _pick_name(rng, avoid=name)
    year = rng.randint(1900, 2024)
    he, him, his = ("she", "her", "her") if gender == "f" else ("he", "him", "his")
    ctx: dict = dict(_SHARED)
    ctx.update(
        Name=name,
        Pal=pal,
        he=he,
        He=he.capitalize(),
        him=him,
        his=his,
        His=his.capitalize(),
        kind=rng.choice(_SHARED["kind_f" if gender == "f" else "kind_m"]),
        pal_kind=rng.choice(_SHARED["kind_f" if pal_gender == "f" else "kind_m"]),
        pal_him="her" if pal_gender == "f" else "him",
        pal_sib="sister" if pal_gender == "f" else "brother",
        main_sib="sister" if gender == "f" else "brother",
        Adult=rng.choice(_SHARED["adult"]),
        month=rng.choice(MONTHS),
        year=str(year),
        year2=str(min(2099, year + rng.randint(10, 40))),
        age=str(rng.randint(3, 9)),
        agew=NUMBER_WORDS[rng.randint(1, 7)],
        digits=_digits,
        numword=NUMBER_WORDS,
    )
    for slot, options in grammar.slots.items():
        ctx[slot] = rng.choice(options)
    forms = [f for f, ok in ((_digits, digits), (NUMBER_WORDS, words)) if ok]
    ctx["n"] = (lambda r: _pick_form(r, forms)) if forms else _SHARED["vague"]
    return ctx


def _pick_form(rng: random.Random, forms: list) -> str:
    form = rng.choice(forms)
    return form(rng) if callable(form) else rng.choice(form)


def _frame(rng: random.Random, month: bool, year: bool) -> tuple[str, str | None]:
    """Choose opening and (optional) ending templates carrying the month/year features."""
    if month and year:
        if rng.random() < 0.5:
            return rng.choice(_OPEN_BOTH), rng.choice(_END_PLAIN + (None,))
        if rng.random() < 0.5:
            return rng.choice(_OPEN_MONTH), rng.choice(_END_YEAR)
        return rng.choice(_OPEN_YEAR), rng.choice(_END_MONTH)
    for flag, opens, ends in ((month, _OPEN_MONTH, _END_MONTH), (year, _OPEN_YEAR, _END_YEAR)):
        if flag:
            if rng.random() < 0.6:
                return rng.choice(opens), rng.choice(_END_PLAIN + (None,))
            return rng.choice(_OPEN_PLAIN), rng.choice(ends)
    return rng.choice(_OPEN_PLAIN), rng.choice(_END_PLAIN + (None, None))


def _with_tail(template: str, rng: random.Random) -> str:
    """Sometimes lengthen a plain sentence with a shared closing clause."""
    if template.endswith('."') or rng.random() >= _TAIL_RATE:
        return template
    return template[:-1] + rng.choice(_TAILS) + template[-1]


def _one_story(rng: random.Random, topic: str) -> Story:
    grammar = _GRAMMARS[topic]
    month = rng.random() < FEATURE_RATES["month"]
    year = rng.random() < FEATURE_RATES["year"]
    digits = rng.random() < FEATURE_RATES["number"]
    words = rng.random() < FEATURE_RATES["number_word"]
    for _ in range(100):
        ctx = _context(rng, grammar, digits, words)
        opening, ending = _frame(rng, month, year)
        room = _MAX_SENTS - 3 - (ending is not None) - digits - words
        hint = room > 2 and rng.random() < _HINT_RATE
        room -= hint
        n_fill = 1 if room > 2 and rng.random() < 0.4 else 0
        n_mid = rng.randint(2, room - n_fill)
        picks = sorted(rng.sample(range(len(grammar.middle)), n_mid))
        middle = [_with_tail(grammar.middle[i], rng) for i in picks]
        if n_fill:
            middle.insert(rng.randint(0, len(middle)), rng.choice(_FILLERS))
        head = [_render(opening, ctx, rng), _render(rng.choice(grammar.intro), ctx, rng)]
        if hint:
            head.insert(1, _render(rng.choice(_HINTS[topic]), ctx, rng))
        body = [_render(t, ctx, rng) for t in middle]
        tail = [_render(rng.choice(grammar.end), ctx, rng)]
        if ending is not None:
            tail.append(_render(ending, ctx, rng))
        so_far = " ".join(head + body + tail)
        for flag, key, fillers in (
            (digits, "number", _FILLERS_DIGITS),
            (words, "number_word", _FILLERS_WORDS),
        ):
            if flag and not re.search(PATTERNS[key], so_far):
                extra = _render(rng.choice(fillers), ctx, rng)
                body.insert(rng.randint(0, len(body)), extra)
        text = " ".join(head + body + tail)
        if (
            _MIN_WORDS <= len(_WORD_RE.findall(text)) <= _MAX_WORDS
            and lexicon_hits(text, topic) >= _MIN_LEXICON
        ):
            return Story(text=text, topic=topic)
    raise RuntimeError(f"could not build a story for topic {topic!r}")  # pragma: no cover


def generate_stories(n: int, seed: int = 0, topics: Sequence[str] = TOPICS) -> list[Story]:
    """Generate ``n`` stories, deterministically per ``seed``, with balanced topics.

    Topics are dealt in shuffled rounds, so each topic's count differs by at most one.
    The first ``k`` stories of ``generate_stories(n, seed)`` equal ``generate_stories(k, seed)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    topics = tuple(topics)
    if not topics:
        raise ValueError("topics must not be empty")
    unknown = [t for t in topics if t not in _GRAMMARS]
    if unknown:
        raise ValueError(f"unknown topics {unknown}; known: {list(_GRAMMARS)}")
    rng = random.Random(seed)
    stories: list[Story] = []
    order: list[str] = []
    for _ in range(n):
        if not order:
            order = list(topics)
            rng.shuffle(order)
        stories.append(_one_story(rng, order.pop()))
    return stories


def feature_rates(texts: Iterable[str]) -> dict[str, float]:
    """Share of texts in which each `PATTERNS` regex matches at least once."""
    compiled = {k: re.compile(p) for k, p in PATTERNS.items()}
    hits = Counter()
    total = 0
    for text in texts:
        total += 1
        for key, rx in compiled.items():
            if rx.search(text):
                hits[key] += 1
    return {k: hits[k] / total if total else 0.0 for k in PATTERNS}


def lexicon_hits(text: str, topic: str) -> int:
    """Number of distinct `LEXICONS` words of ``topic`` present in ``text``."""
    if topic not in LEXICONS:
        raise ValueError(f"unknown topic {topic!r}")
    return len(LEXICONS[topic].intersection(tokenize(text)))


def write_corpus(
    path: str | os.PathLike, n: int, seed: int = 0, topics: Sequence[str] = TOPICS
) -> Path:
    """Write ``n`` generated stories as JSON lines ``{"text", "topic"}``, atomically."""
    path = Path(path)
    stories = generate_stories(n, seed=seed, topics=topics)
    lines = (json.dumps({"text": s.text, "topic": s.topic}) + "\n" for s in stories)
    atomic_write_text(path, "".join(lines))
    return path


def read_corpus(path: str | os.PathLike) -> list[Story]:
    """Read a JSON-lines corpus written by `write_corpus`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    stories = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in ("text", "topic") if k not in record]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing}")
            if not isinstance(record["text"], str) or not isinstance(record["topic"], str):
                raise ValueError(f"{path}:{lineno}: 'text' and 'topic' must be strings")
            stories.append(Story(text=record["text"], topic=record["topic"]))
    return stories
