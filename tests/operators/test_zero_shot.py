"""Zero-shot scoring, source combination and audit, on synthetic embeddings (no torch).

The text encoder is a random-init bag-of-tokens model: prompts that differ by one word get close
embeddings, which is harder than orthogonal planted directions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmbalance.data import NONE_VALUE, load_vocabulary
from mmbalance.operators.audit import audit_counts, merge_audit, merge_uid_samples, sample_uids, summarise_audit
from mmbalance.operators.combine import COMBINE_RULES, SourceTags, combine_sources
from mmbalance.operators.zero_shot import (
    ClassEmbeddings,
    class_probabilities,
    embedding_matrix,
    hard_tags,
    prompt_embeddings,
    vocabulary_embeddings,
)

DIM = 64


class RandomTextModel:
    """Random token table, mean pooling, random projection, tanh: an untrained text tower."""

    def __init__(self, seed: int = 0, dim: int = DIM):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.table: dict[str, np.ndarray] = {}
        self.proj = self.rng.normal(size=(dim, dim)) / np.sqrt(dim)
        self.calls = 0

    def __call__(self, prompts: list[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for p in prompts:
            toks = p.lower().replace(".", " ").split()
            for t in toks:
                if t not in self.table:
                    self.table[t] = self.rng.normal(size=self.dim)
            out.append(np.tanh(np.mean([self.table[t] for t in toks], axis=0) @ self.proj))
        return np.array(out)


def _noisy_copies(rng, centres: np.ndarray, labels: np.ndarray, noise: float) -> np.ndarray:
    base = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    return (base + noise * rng.normal(size=base.shape) / np.sqrt(base.shape[1])).astype(np.float32)


def test_noisy_copies_of_prompt_embeddings_get_that_value():
    """The issue's check: one prompt per value, images are noisy copies of a prompt's embedding."""
    model = RandomTextModel(0)
    vocab = load_vocabulary("occupation")
    prompts = {v: [vocab.prompts[v][0]] for v in vocab.values}
    classes = prompt_embeddings(prompts, model, vocab.none_prompts)
    assert model.calls == 1  # the text tower runs once for all prompts
    assert classes.classes[-1] == NONE_VALUE and classes.classes[:-1] == vocab.values
    rng = np.random.default_rng(1)
    n = 3000
    labels = rng.integers(len(vocab.values), size=n)
    prompt_emb = model([prompts[vocab.values[k]][0] for k in labels])
    images = _noisy_copies(rng, prompt_emb, np.arange(n), noise=0.2)
    tags = hard_tags(class_probabilities(images, classes, temperature=0.005), classes.classes, 0.3).to_pylist()
    accuracy = np.mean([t == vocab.values[k] for t, k in zip(tags, labels)])
    assert accuracy >= 0.99, accuracy


def test_prompt_ensembles_recover_planted_classes():
    """Ensembles of the shipped prompts; images are noisy copies of their class's ensemble.

    (Copies of a single templated prompt are not asserted against ensembles: in a random
    mean-pooled tower the shared template words dominate, which says nothing about the logic.)
    """
    model = RandomTextModel(1)
    vocab = load_vocabulary("occupation")
    classes = vocabulary_embeddings(vocab, model)
    rng = np.random.default_rng(2)
    none = classes.classes.index(NONE_VALUE)
    # every class drawn, and a fifth of the rows planted as "none" so the null path is exercised
    labels = np.where(rng.random(3000) < 0.2, none, rng.integers(len(classes.classes), size=3000))
    images = _noisy_copies(rng, classes.matrix, labels, noise=0.3)
    tags = hard_tags(class_probabilities(images, classes, temperature=0.005), classes.classes, 0.3).to_pylist()
    truth = [None if classes.classes[k] == NONE_VALUE else classes.classes[k] for k in labels]
    accuracy = np.mean([t == g for t, g in zip(tags, truth)])
    assert accuracy >= 0.99, accuracy
    assert sum(g is None for g in truth) > 500  # the none class is exercised


def test_none_class_and_threshold_give_null():
    model = RandomTextModel(2)
    vocab = load_vocabulary("perceived_gender")
    classes = vocabulary_embeddings(vocab, model)
    rng = np.random.default_rng(3)
    none_emb = model(list(vocab.none_prompts))
    woman_emb = model(list(vocab.prompts["woman"]))
    images = np.concatenate([
        _noisy_copies(rng, none_emb, rng.integers(len(none_emb), size=200), 0.05),
        _noisy_copies(rng, woman_emb, rng.integers(len(woman_emb), size=200), 0.05),
    ])
    probs = class_probabilities(images, classes, temperature=0.005)
    tags = hard_tags(probs, classes.classes, threshold=0.5).to_pylist()
    assert sum(t is None for t in tags[:200]) >= 198
    assert sum(t == "woman" for t in tags[200:]) >= 198
    # argmax "none" is null, and so is a confident-enough-to-be-top but below-threshold value
    p = np.array([[0.2, 0.1, 0.7], [0.45, 0.35, 0.2], [0.6, 0.3, 0.1], [np.nan] * 3], np.float32)
    assert hard_tags(p, ("woman", "man", NONE_VALUE), 0.5).to_pylist() == [None, None, "woman", None]
    assert hard_tags(p, ("woman", "man", NONE_VALUE), 0.4).to_pylist() == [None, "woman", "woman", None]


def test_prompt_ensembles_average_unit_embeddings():
    table = {"a one": np.array([3.0, 0, 0]), "a two": np.array([0, 1.0, 0]), "b": np.array([0, 0, 5.0]), "n": np.array([1.0, 1, 1])}
    classes = prompt_embeddings({"a": ["a one", "a two"], "b": ["b"]}, lambda ps: np.stack([table[p] for p in ps]), ["n"])
    np.testing.assert_allclose(classes.matrix[0], np.array([1, 1, 0]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(classes.matrix[1], [0, 0, 1])
    np.testing.assert_allclose(classes.matrix[2], np.ones(3) / np.sqrt(3), rtol=1e-6)
    assert classes.classes == ("a", "b", NONE_VALUE)
    no_none = prompt_embeddings({"a": ["a one"]}, lambda ps: np.stack([table[p] for p in ps]))
    assert no_none.classes == ("a",) and not no_none.has_none
    with pytest.raises(ValueError, match="reserved"):
        prompt_embeddings({NONE_VALUE: ["n"]}, lambda ps: np.ones((len(ps), 3)))
    with pytest.raises(ValueError, match="shape"):
        prompt_embeddings({"a": ["x", "y"]}, lambda ps: np.ones((1, 3)))
    with pytest.raises(ValueError, match="no prompts"):
        prompt_embeddings({"a": []}, lambda ps: np.ones((len(ps), 3)))


def test_softmax_properties():
    rng = np.random.default_rng(4)
    classes = ClassEmbeddings(("a", "b"), np.eye(3, dtype=np.float32)[:2], False)
    emb = rng.normal(size=(50, 3)).astype(np.float32)
    emb[7] = 0
    p = class_probabilities(emb, classes, 0.1)
    ok = np.ones(50, bool)
    ok[7] = False
    np.testing.assert_allclose(p[ok].sum(axis=1), 1, rtol=1e-5)
    assert np.isnan(p[7]).all()
    np.testing.assert_allclose(class_probabilities(emb * 7, classes, 0.1)[ok], p[ok], rtol=1e-4)
    sharp = class_probabilities(emb, classes, 0.01)
    assert (sharp[ok].max(axis=1) >= p[ok].max(axis=1) - 1e-6).all()
    expected = np.exp(emb[0, :2] / np.linalg.norm(emb[0]) / 0.1)
    np.testing.assert_allclose(p[0], expected / expected.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="dim"):
        class_probabilities(np.ones((2, 4), np.float32), classes)


def test_zero_shot_tags_from_arrow_embedding_columns():
    """As the assign step scores a batch: each side's column to a matrix, probabilities, hard tags."""
    classes = ClassEmbeddings(("woman", "man"), np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32), True)
    img = np.array([[1, 0.1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0.1]], np.float16)
    txt = [[0.1, 1, 0, 0], None, [1, 0, 0, 0]]
    columns = {"image": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), 4),
               "text": pa.array(txt, pa.list_(pa.float32()))}
    tags = {}
    for side, column in columns.items():
        emb, valid = embedding_matrix(column)
        probs = class_probabilities(emb, classes, 0.01, valid)
        tags[side] = hard_tags(probs, classes.classes, 0.5).to_pylist()
        if side == "text":
            assert probs.shape == (3, 3) and np.isnan(probs[1]).all()
            assert probs[0].argmax() == 1 and abs(probs[0].sum() - 1) < 1e-5
    assert tags == {"image": ["woman", None, "man"], "text": ["man", None, "woman"]}


# ---------------------------------------------------------------------------------------------
# Combination

IMG = ["woman", "man", None, "woman", None, "man"]
TXT = ["woman", "woman", None, None, None, "man"]
CAP = ["man", "woman", "man", None, None, "man"]


def _sources():
    return [SourceTags("image", "image", pa.array(IMG, pa.string())),
            SourceTags("text", "text", pa.array(TXT, pa.string())),
            SourceTags("caption", "text", pa.array(CAP, pa.string()))]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("any", [None, None, "man", "woman", None, "man"]),
        ("all", [None, None, None, None, None, "man"]),
        ("image", ["woman", "man", None, "woman", None, "man"]),
        ("text", [None, "woman", "man", None, None, "man"]),
        ("vote", ["woman", "woman", "man", "woman", None, "man"]),
        ("mean", ["woman", "woman", "man", "woman", None, "man"]),
    ],
)
def test_combination_rules(rule, expected):
    tags, fired = combine_sources(_sources(), rule, ["woman", "man"])
    assert tags.to_pylist() == expected
    assert fired.tolist() == [7, 7, 4, 1, 0, 7]  # bit j: source j tagged the row


def test_vote_tie_and_mean_with_scores():
    a = SourceTags("image", "image", pa.array(["woman", "man"]), np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]], np.float32))
    b = SourceTags("text", "text", pa.array(["man", None]), np.array([[0.2, 0.7, 0.1], [np.nan] * 3], np.float32))
    assert combine_sources([a, b], "vote")[0].to_pylist() == [None, "man"]
    # mean of (0.6, 0.3, 0.1) and (0.2, 0.7, 0.1) is (0.4, 0.5, 0.1): man, but below 0.6
    assert combine_sources([a, b], "mean", ["woman", "man"], 0.45)[0].to_pylist() == ["man", "man"]
    assert combine_sources([a, b], "mean", ["woman", "man"], 0.6)[0].to_pylist() == [None, None]
    none_wins = SourceTags("image", "image", pa.array([None]), np.array([[0.05, 0.05, 0.9]], np.float32))
    lexicon = SourceTags("caption", "text", pa.array(["woman+man"]))  # "both": (0.5, 0.5, 0); mean: none
    assert combine_sources([none_wins, lexicon], "mean", ["woman", "man"], 0.1)[0].to_pylist() == [None]
    assert combine_sources([a, b], "any")[0].to_pylist() == [None, "man"]
    with pytest.raises(ValueError, match="rule"):
        combine_sources([a], "median")
    assert set(COMBINE_RULES) == {"any", "all", "image", "text", "vote", "mean"}


# ---------------------------------------------------------------------------------------------
# Audit


def test_audit_counts_merge_and_summary():
    s = _sources()
    whole = audit_counts({x.name: x.tags for x in s})
    parts = [audit_counts({x.name: x.tags.slice(lo, hi - lo) for x in s}) for lo, hi in [(0, 2), (2, 6)]]
    assert merge_audit(*parts) == whole
    summary = summarise_audit(whole)
    assert summary["sources"]["image"]["tagged"] == 4 and summary["sources"]["text"]["tagged"] == 3
    assert summary["sources"]["image"]["prevalence"] == {"man": 0.5, "woman": 0.5}
    pair = summary["agreement"]["image|text"]
    # both tagged on rows 0, 1, 5: agree on 0 and 5
    assert pair["both_tagged"] == 3 and pair["agreement"] == pytest.approx(2 / 3)
    # kappa by hand: on those rows p_image = (w 1/3, m 2/3), p_text = (w 2/3, m 1/3), expected 4/9
    assert pair["kappa"] == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))


def test_uid_samples_are_seeded_and_merge_exactly():
    rng = np.random.default_rng(5)
    n = 5000
    uids = pa.array([f"uid-{i}" for i in range(n)])
    tags = pa.array(rng.choice(["woman", "man", None], size=n).tolist(), pa.string())
    whole = merge_uid_samples([sample_uids(uids, tags, 20, seed=7)], 20)
    shards = [sample_uids(uids.slice(lo, 1000), tags.slice(lo, 1000), 20, seed=7) for lo in range(0, n, 1000)]
    assert merge_uid_samples(shards, 20) == whole
    assert set(whole) == {"woman", "man"} and all(len(v) == 20 for v in whole.values())
    picked = {u for _, u in whole["woman"]}
    assert all(tags[int(u.split("-")[1])].as_py() == "woman" for u in picked)
    other = merge_uid_samples([sample_uids(uids, tags, 20, seed=8)], 20)
    assert {u for _, u in other["woman"]} != picked


def test_uid_sample_per_value_is_that_values_own_bottom_k():
    """One sort for hundreds of values gives each value the sample it would get on its own."""
    rng = np.random.default_rng(5)
    n = 3000
    values = [f"v{j}" for j in range(150)]
    tags = pa.array([values[j] if j < 150 else None for j in rng.integers(0, 170, n)], pa.string())
    uids = pa.array([f"u{i}" for i in range(n)])
    whole = sample_uids(uids, tags, 3, seed=1)
    assert set(whole) == set(tags.drop_null().to_pylist())
    for v in values[:20]:
        rows = np.flatnonzero(np.array(tags.to_pylist(), dtype=object) == v)
        alone = sample_uids(uids.take(pa.array(rows)), tags.take(pa.array(rows)), 3, seed=1)
        assert whole[v] == alone[v] and len(whole[v]) == min(3, len(rows))
        assert [h for h, _ in whole[v]] == sorted(h for h, _ in whole[v])
    everything = sample_uids(uids, tags, n, seed=1)
    assert sum(len(x) for x in everything.values()) == sum(t is not None for t in tags.to_pylist())
