"""Which topic a text is about, learned from labelled documents, and how sure a share is.

`TopicClassifier` is a bag-of-words logistic regression (scikit-learn) fit on any labelled
texts: the judge of steering, so "on topic" comes from data and not from word lists.
Words are lowercased word tokens counted once per text (binary), so a forced word
repeated many times weighs what it weighs once, and cannot outweigh the rest of the text.
Words unseen in training are ignored. `fit_heldout` fits on part of the documents and
returns the classifier's accuracy on the rest, for the report.

`on_topic_interval` is the Wilson score interval of an on-topic share over ``n``
generations: with 20 to 40 generations per topic a share alone says little.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from statistics import NormalDist

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

__all__ = ["TopicClassifier", "fit_heldout", "on_topic_interval"]

WORD_PATTERN = r"(?u)\b\w+\b"
"""A word token: a run of letters, digits or underscores (after lowercasing)."""


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a sequence of texts, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{what} must be strings; entries {bad[:5]} are not")
    return texts


class TopicClassifier:
    """Bag-of-words logistic regression: which of ``topics`` a text is about.

    Build it with `TopicClassifier.fit`. ``predict_proba`` gives each text's probability
    of every topic; a text is on a topic (`is_on_topic`) when that topic is its most
    probable one, with at least ``threshold`` probability.
    """

    def __init__(self, vectorizer: CountVectorizer, model: LogisticRegression) -> None:
        self.vectorizer = vectorizer
        self.model = model
        self.topics: tuple[str, ...] = tuple(str(t) for t in model.classes_)

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        seed: int = 0,
        c: float = 1.0,
        max_iter: int = 1000,
    ) -> TopicClassifier:
        """Fit on ``texts`` labelled by topic; ``c`` is the inverse L2 regularisation
        strength (scikit-learn's ``C``). Raises for fewer than two distinct labels,
        mismatched lengths, or texts without a single word."""
        texts = _check_texts(texts, "texts")
        labels = [str(label) for label in _check_texts(labels, "labels")]
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if len(set(labels)) < 2:
            raise ValueError(
                f"a topic classifier needs at least 2 distinct labels, got {sorted(set(labels))}"
            )
        if c <= 0:
            raise ValueError(f"c must be > 0, got {c}")
        vectorizer = CountVectorizer(lowercase=True, binary=True, token_pattern=WORD_PATTERN)
        try:
            x = vectorizer.fit_transform(texts)
        except ValueError as err:  # scikit-learn: "empty vocabulary"
            raise ValueError("the texts hold no words to fit a topic classifier on") from err
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        model.fit(x, np.asarray(labels))
        return cls(vectorizer, model)

    def _proba(self, texts: Iterable[str]) -> np.ndarray:
        return self.model.predict_proba(self.vectorizer.transform(_check_texts(texts, "texts")))

    def predict_proba(self, texts: Iterable[str]) -> list[dict[str, float]]:
        """Probability of each topic, per text."""
        return [dict(zip(self.topics, map(float, row), strict=True)) for row in self._proba(texts)]

    def predict(self, texts: Iterable[str]) -> list[str]:
        """Most probable topic, per text."""
        proba = self._proba(texts)
        return [self.topics[i] for i in proba.argmax(1)] if len(proba) else []

    def is_on_topic(self, text: str, topic: str, threshold: float = 0.5) -> bool:
        """True when ``topic`` is the text's top topic with probability >= ``threshold``."""
        if topic not in self.topics:
            raise ValueError(f"unknown topic {topic!r}; known: {list(self.topics)}")
        proba = self.predict_proba([text])[0]
        return max(proba, key=proba.__getitem__) == topic and proba[topic] >= threshold

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        """Share of ``texts`` whose top topic is their label."""
        texts, labels = _check_texts(texts, "texts"), _check_texts(labels, "labels")
        if len(texts) != len(labels) or not texts:
            raise ValueError(
                f"need as many labels as texts, at least one: {len(texts)}, {len(labels)}"
            )
        predicted = self.predict(texts)
        return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(texts)


def fit_heldout(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    c: float = 1.0,
) -> tuple[TopicClassifier, float]:
    """Fit on a random ``1 - test_fraction`` of the documents (per label, so every label
    is in both parts) and return the classifier and its accuracy on the rest."""
    texts, labels = _check_texts(texts, "texts"), _check_texts(labels, "labels")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    small = {label: len(rows) for label, rows in by_label.items() if len(rows) < 2}
    if small:
        raise ValueError(f"each label needs >= 2 documents to fit and test on; {small}")
    test: list[int] = []
    for rows in by_label.values():
        rng.shuffle(rows)
        test += rows[: min(len(rows) - 1, max(1, round(test_fraction * len(rows))))]
    held = set(test)
    train = [i for i in range(len(texts)) if i not in held]
    classifier = TopicClassifier.fit(
        [texts[i] for i in train], [labels[i] for i in train], seed=seed, c=c
    )
    return classifier, classifier.accuracy([texts[i] for i in test], [labels[i] for i in test])


def on_topic_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the share ``k / n`` at ``confidence`` (two-sided).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or
    k = n, the shares steering produces. The normal quantile comes from the standard
    library (`statistics.NormalDist`).
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got {k!r} and {n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
