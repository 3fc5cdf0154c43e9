"""Tests for the synthetic children's-story corpus (codelens.data.stories)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from codelens.data import stories
from codelens.data.stories import (
    _HINTS,
    B_NAMES,
    FEATURE_RATES,
    LEXICONS,
    MONTHS,
    NAMES,
    PATTERNS,
    TOPICS,
    Story,
    feature_rates,
    generate_stories,
    lexicon_hits,
    read_corpus,
    tokenize,
    write_corpus,
)

# Split after ., ! or ? (optionally closing a quote) when a new sentence starts.
_SENT_SPLIT = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=[A-Z"])')
_NAME_RE = re.compile(r"\b(?:" + "|".join(NAMES) + r")\b")


def sentences(text: str) -> list[str]:
    return _SENT_SPLIT.split(text)


@pytest.fixture(scope="module")
def corpus() -> list[Story]:
    return generate_stories(3000, seed=11)


# ----------------------------------------------------------------- generation


def test_deterministic_per_seed():
    a = generate_stories(40, seed=3)
    assert a == generate_stories(40, seed=3)
    assert a != generate_stories(40, seed=4)
    assert generate_stories(15, seed=3) == a[:15]
    assert all(isinstance(s, Story) for s in a)
    with pytest.raises(AttributeError):
        a[0].text = "x"  # frozen


def test_story_shape(corpus):
    for story in corpus:
        n_words = len(story.text.split())
        assert 60 <= n_words <= 150, story.text
        sents = sentences(story.text)
        assert 4 <= len(sents) <= 8, sents
        # The topic word is not in every sentence ...
        assert any(story.topic not in tokenize(s) for s in sents)
        # ... the topic is spread over the lexicon and over several sentences.
        assert lexicon_hits(story.text, story.topic) >= 3, story.text
        assert sum(lexicon_hits(s, story.topic) > 0 for s in sents) >= 2, story.text


def test_about_half_the_stories_name_their_topic_right_after_the_opening(corpus):
    def template(hint: str) -> re.Pattern:
        return re.compile(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(hint)))

    hints = {t: [template(h) for h in hs] for t, hs in _HINTS.items()}
    hinted = 0
    for story in corpus:
        second = sentences(story.text)[1]
        mine = any(rx.fullmatch(second) for rx in hints[story.topic])
        others = [
            t
            for t, rxs in hints.items()
            if t != story.topic and any(rx.fullmatch(second) for rx in rxs)
        ]
        assert not others, (story.topic, second)
        hinted += mine
    assert 0.35 <= hinted / len(corpus) <= 0.55


def test_topics_balanced(corpus):
    counts = Counter(s.topic for s in corpus)
    assert set(counts) == set(TOPICS)
    share = 1 / len(TOPICS)
    for topic in TOPICS:
        assert abs(counts[topic] / len(corpus) - share) < 0.02
    sub = generate_stories(31, seed=0, topics=("dragon", "slide"))
    assert sorted(Counter(s.topic for s in sub).values()) == [15, 16]


def test_bad_arguments():
    assert generate_stories(0) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_stories(-1)
    with pytest.raises(ValueError, match="unknown topics"):
        generate_stories(3, topics=("dragon", "spaceship"))
    with pytest.raises(ValueError, match="empty"):
        generate_stories(3, topics=())


def test_required_topics_present():
    for topic in ("dragon", "flower", "fire", "princess", "football", "baby", "slide", "friend"):
        assert topic in TOPICS


def test_lexicons_are_clean(corpus):
    names = {n.lower() for n in NAMES}
    assert not set(MONTHS) & set(NAMES)
    assert all(n[0] == "B" for n in B_NAMES)
    for topic, words in LEXICONS.items():
        assert topic in words
        assert 15 <= len(words) <= 30, topic
        assert not words & names
        for other, other_words in LEXICONS.items():
            if other != topic:
                assert not words & other_words, (topic, other)
    used = {t: set() for t in TOPICS}
    for story in corpus:
        used[story.topic].update(tokenize(story.text))
        for other in TOPICS:
            if other != story.topic:
                assert lexicon_hits(story.text, other) == 0, (other, story.text)
    for topic in TOPICS:
        assert LEXICONS[topic] <= used[topic], LEXICONS[topic] - used[topic]


def test_vocabulary_is_varied(corpus):
    vocab = set()
    for story in corpus:
        vocab.update(tokenize(story.text))
    assert len(vocab) > 800
    assert len({s.text for s in corpus}) == len(corpus)


# ------------------------------------------------------------------- patterns

_POSITIVE = {
    "month": ["One day in May, Lily", "in October", "It was December 2004."],
    "year": ["in 1998,", "the summer of 2004.", "In 1000 and 2099"],
    "b_name": ["Ben went home.", "Bella's kite", "and Bonnie smiled"],
    "number": ["3 apples", "counted 12 stars", "100 times"],
    "number_word": ["two apples", "Seven birds", "saw twelve rocks"],
}
_NEGATIVE = {
    "month": ["you may go", "they march on", "Mayor Tom", "Junebug", "AUGUST"],
    "year": ["3 apples", "999 cats", "2100 dogs", "12345", "x1998", "0998"],
    "b_name": ["Baby cried", "But then", "Big dog", "ben", "Benjamin", "Bobby", "Lily"],
    "number": ["in 1998", "2004", "x3", "3rd", "three apples"],
    "number_word": ["one day", "no one", "often", "tent", "twenty", "seventh", "3 apples"],
}


def test_patterns_are_the_five_features():
    assert set(PATTERNS) == {"month", "year", "b_name", "number", "number_word"}


@pytest.mark.parametrize("key", sorted(_POSITIVE))
def test_pattern_hand_built(key):
    rx = re.compile(PATTERNS[key])
    for text in _POSITIVE[key]:
        assert rx.search(text), (key, text)
    for text in _NEGATIVE[key]:
        assert not rx.search(text), (key, text)


def test_pattern_matches_exact_spans():
    assert re.findall(PATTERNS["month"], "May and June, not may") == ["May", "June"]
    assert re.findall(PATTERNS["b_name"], "Ben met Bella, Bob and Lily.") == ["Ben", "Bella", "Bob"]
    assert re.findall(PATTERNS["number"], "3 cats, 12 dogs in 1998") == ["3", "12"]
    assert re.findall(PATTERNS["year"], "In 1000, 1999 and 2099 but not 2100") == [
        "1000",
        "1999",
        "2099",
    ]
    assert re.findall(PATTERNS["number_word"], "Two cats and three dogs") == ["Two", "three"]


def test_feature_rates_in_corpus(corpus):
    rates = feature_rates(s.text for s in corpus)
    print("\nfeature rates (share of stories):", {k: round(v, 3) for k, v in rates.items()})
    for key in ("month", "year", "number", "number_word"):
        assert abs(rates[key] - FEATURE_RATES[key]) < 0.04, (key, rates[key])
    assert 0.25 < rates["b_name"] < 0.6
    # Per drawn name, the share starting with "B" is FEATURE_RATES["b_name"].
    drawn = [n for s in corpus for n in set(_NAME_RE.findall(s.text))]
    b_share = sum(n in B_NAMES for n in drawn) / len(drawn)
    print("B-name share of distinct names per story:", round(b_share, 3))
    assert abs(b_share - FEATURE_RATES["b_name"]) < 0.03
    # Years span both centuries ("years starting with 2" is a feature in the paper).
    years = [y for s in corpus for y in re.findall(PATTERNS["year"], s.text)]
    assert any(y.startswith("19") for y in years) and any(y.startswith("20") for y in years)


# ---------------------------------------------------------------- lexicon


def test_lexicon_hits():
    text = "The dragon flapped its wings. The dragon flew to its cave."
    assert lexicon_hits(text, "dragon") == 4  # dragon, wings, flew, cave
    assert lexicon_hits(text, "flower") == 0
    with pytest.raises(ValueError, match="unknown topic"):
        lexicon_hits(text, "spaceship")


# --------------------------------------------------------------------- corpus


def test_corpus_round_trip(tmp_path):
    path = tmp_path / "sub" / "stories.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    assert write_corpus(path, 25, seed=5) == path
    assert read_corpus(path) == generate_stories(25, seed=5)
    assert read_corpus(str(path)) == generate_stories(25, seed=5)
    assert [p.name for p in path.parent.iterdir()] == ["stories.jsonl"]  # no temp file left
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25
    assert set(json.loads(lines[0])) == {"text", "topic"}


def test_write_corpus_failure_leaves_old_file(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("old content\n")
    with pytest.raises(ValueError):
        write_corpus(path, 3, topics=("spaceship",))
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stories.jsonl"]


def test_read_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "missing.jsonl")
    good = json.dumps({"text": "hi", "topic": "dragon"})
    cases = {
        "bad_json": (f"{good}\n{{not json\n", r":2: invalid JSON"),
        "missing_key": (f"{good}\n\n{json.dumps({'text': 'x'})}\n", r":3: missing key.*topic"),
        "not_object": (f"{good}\n[1, 2]\n", r":2: expected a JSON object"),
        "not_string": (f"{json.dumps({'text': 1, 'topic': 'x'})}\n", r":1: .*must be strings"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_corpus(path)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(f"\n{good}\n\n")
    assert read_corpus(blank) == [Story("hi", "dragon")]


# ----------------------------------------------------------------- package data


def _package_data() -> dict:
    return json.loads(resources.files("codelens.data").joinpath("stories.json").read_text())


def test_vocabulary_and_grammar_are_read_from_the_package_data():
    data = _package_data()
    assert TOPICS == tuple(data["topics"])
    assert MONTHS == tuple(data["months"])
    assert B_NAMES == tuple(data["names"]["b"])
    for topic, entry in data["topics"].items():
        assert LEXICONS[topic] == frozenset(entry["lexicon"])
        assert _HINTS[topic] == tuple(entry["hints"])
        grammar = stories._GRAMMARS[topic]
        assert (grammar.intro, grammar.middle, grammar.end) == tuple(
            tuple(entry[k]) for k in ("intro", "middle", "end")
        )
    assert stories._OPEN_BOTH == tuple(data["openings"]["month_year"])
    assert stories._SHARED == {k: tuple(v) for k, v in data["shared_slots"].items()}


def test_the_package_data_ships_with_the_package():
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    assert "stories.json" in declared["codelens.data"]


def test_a_broken_story_data_file_fails_early_and_names_the_problem(tmp_path):
    data = _package_data()
    path = tmp_path / "stories.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the story data"):
        stories._read_data(path)
    del data["topics"]["dragon"]["middle"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"topic 'dragon' lacks \['middle'\]"):
        stories._read_data(path)
    del data["tails"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks \['tails'\]"):
        stories._read_data(path)
    with pytest.raises(ValueError, match="topics.zoo.intro must be a non-empty list"):
        stories._strings([], "topics.zoo.intro")
