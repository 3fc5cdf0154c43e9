"""codelens.analysis.topic_classifier: the bag-of-words topic judge and the Wilson interval."""

from __future__ import annotations

import random
import re

import pytest

from codelens.analysis import TopicClassifier, fit_heldout, on_topic_interval
from codelens.data.stories import TOPICS, generate_stories, lexicon_hits

# Toy topics: each draws 6 words from its own list and 6 from a shared one.
WORDS = {
    "sea": "boat wave fish sail shore tide anchor gull".split(),
    "farm": "cow barn hay tractor field goat hen plough".split(),
    "space": "rocket star orbit moon planet comet alien crater".split(),
}
SHARED = "the a and then saw went big small day happy".split()


def toy(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        topic = list(WORDS)[i % len(WORDS)]
        words = rng.choices(WORDS[topic], k=6) + rng.choices(SHARED, k=6)
        rng.shuffle(words)
        texts.append(" ".join(words).capitalize() + ".")
        labels.append(topic)
    return texts, labels


@pytest.fixture(scope="module")
def toy_classifier() -> TopicClassifier:
    return TopicClassifier.fit(*toy(90, seed=0))


@pytest.fixture(scope="module")
def story_classifier() -> TopicClassifier:
    stories = generate_stories(1000, seed=1)
    return TopicClassifier.fit([s.text for s in stories], [s.topic for s in stories])


def test_learns_separable_toy_topics(toy_classifier):
    texts, labels = toy(60, seed=1)
    assert toy_classifier.topics == ("farm", "sea", "space")
    assert toy_classifier.accuracy(texts, labels) == 1.0
    assert toy_classifier.predict(["A ROCKET and a Comet."]) == ["space"]  # lowercased
    proba = toy_classifier.predict_proba(texts[:3])
    assert [set(p) for p in proba] == [set(WORDS)] * 3
    assert all(sum(p.values()) == pytest.approx(1.0) for p in proba)
    assert toy_classifier.is_on_topic(texts[0], labels[0])
    assert not toy_classifier.is_on_topic(texts[0], labels[1])
    # A threshold above the top probability makes nothing on topic.
    top = max(proba[0].values())
    assert not toy_classifier.is_on_topic(texts[0], labels[0], threshold=min(1.0, top + 1e-9))


def test_unseen_words_change_nothing(toy_classifier):
    text = "the boat and the fish"
    (plain,), (padded,) = (toy_classifier.predict_proba([t]) for t in (text, f"zzz {text} qqq"))
    assert padded == pytest.approx(plain, rel=1e-12)


def test_heldout_accuracy_on_stories():
    stories = generate_stories(600, seed=3)
    classifier, accuracy = fit_heldout(
        [s.text for s in stories], [s.topic for s in stories], test_fraction=0.25, seed=0
    )
    assert set(classifier.topics) == set(TOPICS)
    print(f"\nheld-out accuracy on 150 of 600 stories: {accuracy:.3f}")
    assert accuracy >= 0.95
    # fit_heldout really holds documents out: on a label-noise corpus the fit part is
    # learned by heart and the rest is at chance.
    rng = random.Random(0)
    texts = [f"w{i} w{i}x" for i in range(200)]  # every text its own words
    labels = [rng.choice("ab") for _ in texts]
    _, chance = fit_heldout(texts, labels, test_fraction=0.5, seed=1)
    assert 0.3 < chance < 0.7


def test_a_repeated_word_does_not_outweigh_the_text(toy_classifier, story_classifier):
    texts, labels = toy(30, seed=2)
    for text, label in zip(texts, labels, strict=True):
        for other, words in WORDS.items():
            if other != label:
                forced = " ".join([words[0]] * 50) + " " + text
                assert toy_classifier.predict([forced]) == [label], forced
    # Stories: the target topic's name before every sentence and 30 more times at the end.
    for story in generate_stories(len(TOPICS) * 2, seed=8):
        for target in TOPICS:
            if target == story.topic:
                continue
            parts = re.split(r"(?<=[.!?])\s+", story.text)
            forced = " ".join(f"{target} {s}" for s in parts) + f" {target}" * 30
            assert story_classifier.predict([forced]) == [story.topic], (target, forced)
            assert not story_classifier.is_on_topic(forced, target)
            # A keyword check would call it on topic; the lexicon count stays at one word.
            assert lexicon_hits(forced, target) == 1


def test_wilson_interval_known_values():
    # k=8, n=10 at 95% (z = 1.95996): centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167,
    # half-width z / (1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.2266.
    low, high = on_topic_interval(8, 10)
    assert (round(low, 2), round(high, 2)) == (0.49, 0.94)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # Edges: 0 of n and n of n have a one-sided interval that reaches the edge.
    z2 = 1.959963984540054**2
    assert on_topic_interval(0, 20) == (0.0, pytest.approx(z2 / (20 + z2)))
    assert on_topic_interval(20, 20) == (pytest.approx(20 / (20 + z2)), 1.0)
    # Symmetric under k -> n - k, narrower with more generations, wider with more confidence.
    a, b = on_topic_interval(3, 40), on_topic_interval(37, 40)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])
    width = [h - lo for lo, h in (on_topic_interval(30, 40), on_topic_interval(300, 400))]
    assert width[1] < width[0] / 3
    w90, w99 = (on_topic_interval(5, 10, c) for c in (0.90, 0.99))
    assert w99[0] < w90[0] and w99[1] > w90[1]


def test_errors(toy_classifier):
    texts, labels = toy(6, seed=0)
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        TopicClassifier.fit(texts, ["sea"] * 6)
    with pytest.raises(ValueError, match="6 texts but 5 labels"):
        TopicClassifier.fit(texts, labels[:5])
    with pytest.raises(ValueError, match="no words"):
        TopicClassifier.fit(["", "!!"], ["a", "b"])
    with pytest.raises(ValueError, match="not one string"):
        toy_classifier.predict("a boat")
    with pytest.raises(
        ValueError, match=r"unknown topic 'city'; known: \['farm', 'sea', 'space'\]"
    ):
        toy_classifier.is_on_topic("a boat", "city")
    with pytest.raises(ValueError, match=">= 2 documents"):
        fit_heldout([*texts, "a cow"], [*labels, "cows"])
    with pytest.raises(ValueError, match="test_fraction"):
        fit_heldout(texts, labels, test_fraction=1.0)
    for k, n in ((11, 10), (-1, 10), (0, 0), (1.5, 3)):
        with pytest.raises(ValueError, match="k"):
            on_topic_interval(k, n)
    with pytest.raises(ValueError, match="confidence"):
        on_topic_interval(1, 2, confidence=1.0)
