"""Labelled corpora (codelens.data.corpus): every format, every bad-input error, split
and prompts, and the `codelens steer --corpus` checks before any training."""

import csv
import dataclasses
import gzip
import json

import pytest

from codelens.data import LabelledCorpus, default_prompts, load_labelled_corpus
from codelens.data.corpus import FORTUNE_TOPICS, FORTUNES_DIR, LINUX_DOC_DIR, LINUX_DOC_TOPICS

ROWS = [
    (f"The cake number {i} was sweet." if i % 2 else f"A bowl of soup {i}.", "food")
    for i in range(6)
] + [
    (f"The game {i} ended in a draw." if i % 2 else f"A goal in minute {i}.", "sports")
    for i in range(5)
]


def write_table(path, rows=ROWS, text="text", label="label"):
    records = [{text: x, label: y} for x, y in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, [text, label])
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_fortunes(directory, rows=ROWS):
    """A fortune-style directory: one file per label, entries between `%` lines."""
    directory.mkdir()
    for label in {y for _, y in rows}:
        entries = [x for x, y in rows if y == label]
        (directory / label).write_text("".join(f"{x}\n%\n" for x in entries))
        (directory / f"{label}.dat").write_bytes(b"\x00\x01index")
        (directory / f"{label}.u8").write_text("not a label")
    (directory / ".hidden").write_text("a\n%\nb\n")
    return directory


OPENERS = ("The", "A", "One", "Every", "Some", "My", "Our", "This", "That")


def expected():
    pairs = sorted(ROWS, key=lambda r: r[1])
    return tuple(x for x, _ in pairs), tuple(y for _, y in pairs)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_table_format_loads_the_same_corpus(tmp_path, suffix):
    corpus = load_labelled_corpus(str(write_table(tmp_path / f"c{suffix}")), min_documents=5)
    pairs = sorted(zip(corpus.texts, corpus.labels, strict=True), key=lambda r: r[1])
    assert (tuple(x for x, _ in pairs), tuple(y for _, y in pairs)) == expected()
    assert corpus.counts() == {"food": 6, "sports": 5}
    assert corpus.topics == ("food", "sports")


def test_columns_can_be_renamed(tmp_path):
    path = write_table(tmp_path / "c.csv", text="body", label="topic")
    corpus = load_labelled_corpus(
        str(path), text_column="body", label_column="topic", min_documents=5
    )
    assert corpus.counts() == {"food": 6, "sports": 5}


def test_fortune_directory_loads_the_same_corpus_and_skips_index_files(tmp_path):
    corpus = load_labelled_corpus(str(write_fortunes(tmp_path / "f")), min_documents=5)
    assert (corpus.texts, corpus.labels) == expected()


def test_blank_line_directory_and_overstrike_and_bad_bytes(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "food.txt").write_text("Soup is\ngood.\n\n  \nBread _\bi_\bs warm.\n\n")
    (d / "sports.txt").write_bytes(b"Caf\xe9 football.\n\nA race.\n")
    corpus = load_labelled_corpus(str(d), min_documents=2)
    assert corpus.texts == ("Soup is\ngood.", "Bread is warm.", "Caf\ufffd football.", "A race.")
    assert corpus.labels == ("food", "food", "sports", "sports")


def test_label_directories_are_cut_into_passages(tmp_path, monkeypatch):
    from codelens.data import corpus as corpora

    monkeypatch.setattr(corpora, "PASSAGE_WORDS", 4)
    d = tmp_path / "docs"
    (d / "sound" / "cards").mkdir(parents=True)
    (d / "sound" / "intro.rst").write_text(
        "=====\nSound\n=====\n\nThe codec plays audio.\n\nOne two.\n\nThree four five.\n\nTail.\n"
    )
    (d / "sound" / "cards" / "usb.md.gz").write_bytes(gzip.compress(b"A short file.\n"))
    (d / "sound" / "diagram.svg").write_text("<svg>not text for a passage</svg>")
    (d / "sound" / ".notes.txt").write_text("a hidden file")
    (d / "net.txt.gz").write_bytes(gzip.compress(b"Packets go out.\n\nRoutes change.\n"))
    corpus = load_labelled_corpus(str(d), min_documents=2)
    assert corpus.labels == ("net", "net", "sound", "sound", "sound")
    assert corpus.texts == (
        "Packets go out.",  # a label file: its paragraphs, decompressed
        "Routes change.",
        "A short file.",  # a file shorter than a passage is one (sorted by path)
        "Sound\n\nThe codec plays audio.",  # the underlines are gone
        "One two.\n\nThree four five.\n\nTail.",  # the short tail joins the last passage
    )


def test_multiline_fortunes_keep_their_attribution(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "law").write_text("%\nA lawyer's advice.\n\t\t-- Someone\n%\nA judge.\n%\n")
    (d / "love").write_text("Love is blind.\n%\nAnd deaf.\n")
    corpus = load_labelled_corpus(str(d), min_documents=2)
    assert corpus.texts[:2] == ("A lawyer's advice.\n\t\t-- Someone", "A judge.")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: str(p / "missing.jsonl"), "does not exist"),
        (lambda p: str(p / "missing_dir/"), "does not exist"),
        (lambda p: str(write_table(p / "c.csv", text="body")), r"no text column 'text'.*body"),
        (lambda p: str(write_table(p / "c.jsonl", label="y")), r"no label column 'label'.*'y'"),
        (
            lambda p: str(write_table(p / "c.jsonl", ROWS[:3] + [("  ", "food")] + ROWS[3:])),
            "row 4: empty text",
        ),
        (lambda p: str(write_table(p / "c.jsonl", ROWS[:6])), r"1 topic\(s\) \['food'\]"),
        (lambda p: str((p / "e").mkdir() or p / "e"), "holds no text files or sub-directories"),
    ],
)
def test_bad_input_errors_name_the_problem(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        load_labelled_corpus(make(tmp_path), min_documents=1)


def test_too_few_documents_names_the_label_and_count(tmp_path):
    path = str(write_table(tmp_path / "c.jsonl"))
    with pytest.raises(ValueError, match=r"fewer than 6 documents: \{'sports': 5\}"):
        load_labelled_corpus(path, min_documents=6)


def test_unknown_topics_list_the_known_ones(tmp_path):
    for spec in (str(write_table(tmp_path / "c.jsonl")), str(write_fortunes(tmp_path / "f"))):
        with pytest.raises(ValueError, match=r"\['cars'\] are not labels.*'food', 'sports'"):
            load_labelled_corpus(spec, topics=["food", "cars"], min_documents=1)


def test_empty_fortune_entry_names_file_and_entry_unless_skipped(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("one\n%\ntwo\n%\n%\nthree\n")
    (d / "b").write_text("x\n%\ny\n")
    with pytest.raises(ValueError, match=r"'.*/a': entry 3 is empty"):
        load_labelled_corpus(str(d), min_documents=1)
    corpus = load_labelled_corpus(str(d), min_documents=1, skip_empty=True)
    assert corpus.counts() == {"a": 3, "b": 2}


def test_hub_id_offline_fails_with_a_message_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="'no-such-user/no-such-corpus' is not a local file"):
        load_labelled_corpus("no-such-user/no-such-corpus")


def test_select_keeps_those_labels_and_rejects_unknown():
    corpus = LabelledCorpus("c", ("a", "b", "c"), ("x", "y", "z"))
    assert corpus.select(["z", "x"]) == LabelledCorpus("c", ("a", "c"), ("x", "z"))
    with pytest.raises(ValueError, match=r"\['w'\] are not labels.*known: \['x', 'y', 'z'\]"):
        corpus.select(["w"])


def test_split_is_stratified_disjoint_and_deterministic():
    texts = tuple(f"doc {i}" for i in range(100))
    labels = tuple("a" if i < 70 else "b" for i in range(100))
    corpus = LabelledCorpus("c", texts, labels)
    fractions = {"train": 0.6, "search": 0.2, "fit": 0.1, "test": 0.1}
    parts = corpus.split(fractions, seed=3)
    assert {n: p.counts() for n, p in parts.items()} == {
        "train": {"a": 42, "b": 18},
        "search": {"a": 14, "b": 6},
        "fit": {"a": 7, "b": 3},
        "test": {"a": 7, "b": 3},
    }
    seen = [t for p in parts.values() for t in p.texts]
    assert sorted(seen) == sorted(texts)
    assert corpus.split(fractions, seed=3) == parts
    assert corpus.split(fractions, seed=4)["train"] != parts["train"]


def test_split_gives_every_label_a_document_in_every_part_or_fails():
    corpus = LabelledCorpus("c", tuple("abcdefgh"), ("x",) * 5 + ("y",) * 3)
    parts = corpus.split({"big": 0.9, "small": 0.05, "tiny": 0.05}, seed=0)
    assert all(
        p.counts() == {"x": c, "y": 1} for p, c in zip(parts.values(), (3, 1, 1), strict=True)
    )
    with pytest.raises(ValueError, match="label 'y' has 3 documents, too few.*4 parts"):
        corpus.split({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        corpus.split({"a": 0.5, "b": 0.3}, seed=0)


def test_default_prompts_are_openings_common_to_every_label():
    texts = ["The cat", "The dog", "Cats purr", "A cat", "The ball", "Balls fly", "A goal"]
    labels = ["pets"] * 4 + ["sports"] * 3
    prompts = default_prompts(LabelledCorpus("c", tuple(texts), tuple(labels)), n=2)
    assert prompts == ("The", "A")  # "Cats" and "Balls" open only one topic's documents


def test_default_prompts_put_openings_without_a_letter_last():
    texts = ["- a cat", ".. note", "The cat", "- a ball", ".. note", "The ball", "If balls"]
    labels = ["pets"] * 3 + ["sports"] * 4
    prompts = default_prompts(LabelledCorpus("c", tuple(texts), tuple(labels)), n=3)
    assert prompts == ("The", "If", "-")  # "If" opens no pets document, yet comes first


@pytest.mark.parametrize(
    ("preset", "attribute", "install"),
    [
        ("fortunes", "FORTUNES_DIR", "apt-get install fortunes fortunes-min"),
        ("linux-doc", "LINUX_DOC_DIR", "apt-get install linux-doc-6.1"),
    ],
)
def test_a_missing_preset_says_how_to_install_it(tmp_path, monkeypatch, preset, attribute, install):
    from codelens.data import corpus as corpora
    from codelens.data.text import DataFileNotFoundError

    monkeypatch.setattr(corpora, attribute, tmp_path / "absent")
    with pytest.raises(DataFileNotFoundError, match=f"{preset!r} corpus reads .*{install}"):
        load_labelled_corpus(preset)


@pytest.mark.skipif(not LINUX_DOC_DIR.is_dir(), reason="apt-get install linux-doc-6.1")
def test_the_linux_doc_preset_loads_its_eight_topics():
    from codelens.data.corpus import PASSAGE_WORDS

    corpus = load_labelled_corpus("linux-doc")
    assert corpus.topics == LINUX_DOC_TOPICS
    assert min(corpus.counts().values()) >= 400
    words = sorted(len(t.split()) for t in corpus.texts)
    assert words[len(words) // 2] >= PASSAGE_WORDS


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="apt-get install fortunes fortunes-min")
def test_the_fortunes_preset_loads_its_eight_topics():
    corpus = load_labelled_corpus("fortunes")
    assert corpus.topics == FORTUNE_TOPICS
    assert min(corpus.counts().values()) >= 50
    assert all(t and "\b" not in t for t in corpus.texts)


# ---------------------------------------------------------------------------- the experiment


def tiny_experiment(run_dir, corpus, **changes):
    """The generic corpus path at toy size: a 1-layer model, a few steps."""
    from codelens.experiments.steering import FORTUNES_QUICK, _neox

    settings = dict(
        run_dir=str(run_dir),
        corpus=str(corpus),
        topics=(),
        pretrain_every_label=False,
        vocab_size=400,
        model=_neox(32, 1, 2, 128),
        baseline={"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        codebook_stage={
            "codebook": {"n_codes": 32, "k": 2, "sites": ["attn", "mlp"]},
            "steps": 10,
            "train": "all",
            "lr": 1e-3,
            "codebook_lr": 3e-3,
            "warmup_steps": 2,
            "batch_size": 8,
            "init_samples": 512,
        },
        samples=2,
        unsteered_samples=2,
        new_tokens=8,
        candidates=2,
        sweep_samples=1,
    )
    return dataclasses.replace(FORTUNES_QUICK, **(settings | changes))


def story_table(path, n=300, topics=3):
    from codelens.data.stories import TOPICS, generate_stories

    stories = generate_stories(n, seed=0, topics=TOPICS[:topics])
    rows = [{"body": s.text, "topic": s.topic} for s in stories]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generic_corpus_pipeline_end_to_end(tmp_path, monkeypatch):
    """Any labelled corpus runs through training, code search, steering and the report."""
    from codelens.experiments.steering import run_experiment

    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    corpus = story_table(tmp_path / "c.jsonl")
    exp = tiny_experiment(tmp_path / "run", corpus, text_column="body", label_column="topic")
    report = run_experiment(exp)
    rows = report["steering"]["topics"]
    assert [r["topic"] for r in rows] == ["dragon", "fire", "flower"]
    assert all(0 <= r["before"] <= 1 and 0 <= r.get("after", 0) <= 1 for r in rows)
    assert any("after" in r for r in rows)
    info = report["corpus"]
    assert info["documents"] == {"dragon": 100, "fire": 100, "flower": 100}
    assert info["parts"] == {"lm": 120, "search": 60, "classifier": 90, "classifier_heldout": 30}
    judge = report["classifier"]
    assert (judge["fit_stories"], judge["heldout_stories"]) == (90, 30)
    assert 0 <= judge["heldout_accuracy"] <= 1
    real = judge["real_text_on_topic"]
    assert list(real) == ["dragon", "fire", "flower"] and all(0 <= x <= 1 for x in real.values())
    assert info["search rows"] >= 60 and info["search length"] == exp.search_len
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "of 30 held-out documents." in markdown
    assert f"cut to their first {exp.new_tokens} tokens" in markdown
    lm = [json.loads(line)["text"] for line in (tmp_path / "run" / "corpus.jsonl").open()]
    assert len(lm) == 120
    assert report["reused_stages"] == []
    # a rerun with other search and steering settings reuses both trained models: same
    # data, same tokenizer, same training settings
    again = run_experiment(dataclasses.replace(exp, sweep_perplexity_ratio=1.5, max_search_rows=40))
    assert again["reused_stages"] == ["baseline", "codebooks"]
    assert again["corpus"]["search rows"] == 40  # a random subset of the rows
    assert again["heldout_loss"] == report["heldout_loss"]
    assert "Not trained again" in (tmp_path / "run" / "report.md").read_text()


def test_generic_corpus_baselines_and_probing(tmp_path, monkeypatch):
    """The baselines (SAE, PCA, ICA, neurons, mean-difference direction) and the k-sparse
    probing table run on a labelled corpus too, indexed by its own topics."""
    from codelens.experiments.steering import run_experiment

    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    corpus = story_table(tmp_path / "c.jsonl", topics=2)
    settings = {"steps": 20, "sweep_ks": [2], "sweep_steps": 10, "ce_sequences": 4}
    settings |= {"train_blocks": 16, "ica_tokens": 500, "strengths": [2.0]}
    exp = tiny_experiment(
        tmp_path / "run", corpus, text_column="body", label_column="topic",
        baselines=settings | {"direction_scales": [1.0]},
    )  # fmt: skip
    section = run_experiment(exp)["baselines"]
    methods = [r["method"] for r in section["rows"]]
    assert methods[0] == "codes" and any("mean-difference" in m for m in methods)
    for row in section["rows"]:
        assert 0 <= row.get("steering_success", 0) <= 1
    probed = {r["method"] for r in section["probing"]["rows"]}
    assert any("code" in m for m in probed) and len(probed) >= 4
    assert set(section["probing"]["topics"]) == {"dragon", "flower"}
    # baselines too wide to encode stop the rerun before any code search or steering
    from codelens.experiments import steering

    monkeypatch.setattr(steering, "regex_search", lambda *a: pytest.fail("searched"))
    too_wide = dataclasses.replace(exp, baselines=exp.baselines | {"expansion": 10**5})
    with pytest.raises(ValueError, match="features needs .* over memory_budget_mb"):
        run_experiment(too_wide)


def test_experiment_data_split_prompts_and_pretraining_set(tmp_path):
    """The corpus' parts, prompts and (with pretrain_every_label) the other labels'
    documents go where they should, and nothing the classifier or search sees is trained on."""
    from codelens.experiments.steering import load_experiment_corpus

    d = tmp_path / "d"
    d.mkdir()
    shared = "The same quote, filed twice."
    for label, word in (("food", "soup"), ("law", "judge"), ("other", "thing")):
        docs = [f"{OPENERS[i % 9]} {word} number {i}." for i in range(36)]
        (d / label).write_text("\n%\n".join([shared, *docs]) + "\n")
    exp = tiny_experiment(tmp_path / "run", d, topics=("food", "law"), min_documents=5)
    data = load_experiment_corpus(exp)
    assert data.topics == ("food", "law") and data.steered == ("food", "law")
    evaluation, sweep = data.prompts
    assert len(evaluation) == len(sweep) == 4 and not set(evaluation) & set(sweep)
    assert set(evaluation + sweep) <= set(OPENERS)
    assert not any("thing" in t for t in data.lm_texts)
    held_out_somewhere = 0
    for seed in range(10):
        run = dataclasses.replace(exp, pretrain_every_label=True, seed=seed)
        pretrain = load_experiment_corpus(run)
        assert len([t for t in pretrain.lm_texts if "thing" in t]) == 36
        held = {*pretrain.search_texts, *pretrain.classifier_heldout.texts}
        assert not held & set(pretrain.lm_texts)  # not even the copy under another label
        held_out_somewhere += shared in held
    assert held_out_somewhere


@pytest.mark.parametrize(
    ("preset", "attribute", "topics"),
    [
        ("fortunes", "FORTUNES_DIR", FORTUNE_TOPICS),
        ("linux-doc", "LINUX_DOC_DIR", LINUX_DOC_TOPICS),
    ],
)
def test_a_preset_pretrains_on_every_label(tmp_path, monkeypatch, preset, attribute, topics):
    from codelens.data import corpus as corpora
    from codelens.experiments.steering import load_experiment_corpus

    fake = tmp_path / preset
    fake.mkdir()
    for label in (*topics, "zippy"):
        quotes = [f"{OPENERS[i % 9]} {label} quote {i}." for i in range(30)]
        if preset == "fortunes":
            (fake / label).write_text("\n%\n".join(quotes))
        else:  # a directory per label, passages of one quote (4 words) each
            (fake / label / "sub").mkdir(parents=True)
            (fake / label / "sub" / "a.rst.gz").write_bytes(
                gzip.compress("\n\n".join(quotes).encode())
            )
    monkeypatch.setattr(corpora, attribute, fake)
    monkeypatch.setattr(corpora, "PASSAGE_WORDS", 4)
    exp = tiny_experiment(tmp_path / "run", preset, topics=topics[:2])
    data = load_experiment_corpus(dataclasses.replace(exp, pretrain_every_label=True))
    assert data.topics == topics[:2]
    assert len(data.prompts[0]) == 4
    trained = {t.split()[1] for t in data.lm_texts}
    assert trained == {*topics, "zippy"}


def test_the_topic_circuit_is_refused_for_other_corpora(tmp_path):
    from codelens.experiments.steering import FORTUNES

    with pytest.raises(ValueError, match="circuit_pairs needs the stories corpus"):
        dataclasses.replace(FORTUNES, circuit_pairs=4)


def test_cli_steer_refuses_a_bad_corpus_before_training(tmp_path, capsys):
    from codelens.cli import main

    corpus = write_table(tmp_path / "c.csv", text="body")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", "--quick", "--corpus", str(corpus), "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "codelens steer: error:" in err and "no text column 'text'" in err
    assert not run_dir.exists()
    with pytest.raises(SystemExit):
        main(["steer", "--corpus", str(corpus), "--text-column", "body", "--topics", "cars"])
    assert "['cars'] are not labels" in capsys.readouterr().err


def test_cli_corpus_presets():
    from codelens.experiments.steering import FORTUNES, FORTUNES_QUICK, corpus_preset

    assert corpus_preset("fortunes", quick=True) is FORTUNES_QUICK
    assert corpus_preset("fortunes", quick=False) is FORTUNES
    for quick in (True, False):
        docs = corpus_preset("linux-doc", quick=quick)
        assert (docs.corpus, docs.pretrain_every_label) == ("linux-doc", True)
        assert set(docs.topics) <= set(LINUX_DOC_TOPICS) and docs.run_dir.endswith(
            "linux-doc" + "-quick" * quick
        )
    mine = corpus_preset("data/mine.csv", quick=True)
    assert (mine.corpus, mine.topics, mine.run_dir) == (
        "data/mine.csv",
        (),
        "runs/steering-corpus-quick",
    )


def test_cli_circuit_refuses_a_steering_run_on_another_corpus(tmp_path):
    from codelens.cli import main
    from codelens.experiments.steering import FORTUNES

    (tmp_path / "codebooks" / "final").mkdir(parents=True)
    report = {"experiment": dataclasses.asdict(FORTUNES)}
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="on corpus 'fortunes'; the topic circuit is built"):
        main(["circuit", str(tmp_path)])
