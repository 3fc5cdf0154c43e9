"""Codes and neurons as classifiers of token features: precision, recall and code search.

One implementation serves both analyses of the paper:

- TokFSM, "codes vs neurons": every code is a classifier of "the FSM is in state s".
  `codes_for_classes` scores all codes against all states at once; `best_neurons_for_labels`
  gives the best neuron's precision at each state code's recall.
- Language models, "code search by regular expression": `regex_labels` marks the tokens of a
  regex feature, `search_codes` runs the model, ranks codes with `best_codes_for_labels` and
  compares each one with the best neuron at the same recall.

One module per idea, every public name importable from here:

- `codelens.analysis.firing`: which codes fire at which tokens (`code_firing`, `CodeFiring`);
- `codelens.analysis.codes`: codes as classifiers of a label or of classes (precision,
  recall, f1, best codes);
- `codelens.analysis.neurons`: the best neuron at a code's recall;
- `codelens.analysis.search`: regex labels and end-to-end code search over a model;
- `codelens.analysis.topics`: codes of the topic of a story, for steering;
- `codelens.analysis.examples`: the top activating examples of one code (`top_examples`);
- `codelens.analysis.topic_classifier`: which topic a text is about (`TopicClassifier`, a
  bag-of-words logistic regression) and the confidence interval of an on-topic share;
- `codelens.analysis.probing`: k-sparse probing of per-document features (codes, SAE
  latents, neurons) on document labels, SAEBench's sparse probing metric.

TokFSM use, with ``codes = codelens.vocab.collect_codes(model, tokens)`` and ``states`` the
FSM state per token (-1 at BOS):

    firing = code_firing({site: codes[site] for site in sites}, n_codes)
    per_class = codes_for_classes(firing, states, n_states)
    found = per_class.best_code >= 0
    labels = states.reshape(-1, 1) == found.nonzero().reshape(1, -1)
    neurons = best_neurons_for_labels(acts, labels, per_class.best_recall[found])

LM use: ``search_codes(model, tokens, regex_labels(str_tokens, "20[0-9][0-9]")).table()``.
"""

from codelens.analysis.codes import (
    ClassCodes,
    CodeMatch,
    CodeStats,
    best_codes_for_labels,
    code_label_stats,
    codes_for_classes,
)
from codelens.analysis.examples import Example, top_examples
from codelens.analysis.firing import CodeFiring, code_firing
from codelens.analysis.neurons import (
    NeuronMatch,
    NeuronMatches,
    best_neurons_for_labels,
    neuron_precision_at_recall,
)
from codelens.analysis.probing import (
    PROBE_KS,
    CodeColumns,
    balanced_split,
    document_code_rates,
    k_sparse_probe,
    pooled_features,
    probing_table,
    rates_from_codes,
)
from codelens.analysis.search import SearchResult, regex_labels, search_codes, token_strings
from codelens.analysis.topic_classifier import TopicClassifier, fit_heldout, on_topic_interval
from codelens.analysis.topics import TopicCode, TopicSwap, topic_codes, topic_stats, topic_swaps

__all__ = [
    "PROBE_KS",
    "CodeColumns",
    "balanced_split",
    "document_code_rates",
    "k_sparse_probe",
    "pooled_features",
    "probing_table",
    "rates_from_codes",
    "ClassCodes",
    "CodeFiring",
    "CodeMatch",
    "CodeStats",
    "Example",
    "NeuronMatch",
    "NeuronMatches",
    "SearchResult",
    "best_codes_for_labels",
    "best_neurons_for_labels",
    "code_firing",
    "code_label_stats",
    "fit_heldout",
    "codes_for_classes",
    "neuron_precision_at_recall",
    "on_topic_interval",
    "regex_labels",
    "search_codes",
    "token_strings",
    "top_examples",
    "TopicClassifier",
    "TopicCode",
    "TopicSwap",
    "topic_codes",
    "topic_stats",
    "topic_swaps",
]
