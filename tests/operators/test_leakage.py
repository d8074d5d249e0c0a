import numpy as np
import pyarrow as pa
import pytest

from mmbalance.console import leakage_lines
from mmbalance.operators.leakage import MIN_READABLE_ROWS, effective_rows, probe_intervals, leakage_report
from mmbalance.schemas.recipe import parse_recipe


def _sample(n=6000, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    occ = rng.choice(["nurse", "pilot", "chef"], size=n, p=[0.4, 0.4, 0.2])
    p_woman = np.select([occ == "nurse", occ == "pilot"], [0.9, 0.1], 0.5)
    woman = rng.random(n) < p_woman
    gender = np.where(woman, "woman", "man")
    direction = rng.normal(size=dim)
    emb = rng.normal(size=(n, dim)) + np.where(woman, 1.5, -1.5)[:, None] * direction / np.linalg.norm(direction)
    return pa.table({
        "uid": [f"u{i}" for i in range(n)],
        "priority": pa.array(rng.integers(0, 2**63, n).astype(np.uint64) * 2, pa.uint64()),
        "tag.gender": gender, "tag.occ": occ,
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float16)), dim),
    }), gender, occ


def test_reweighing_removes_dataset_leakage_but_not_embedding_leakage():
    sample, gender, occ = _sample()
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    n = len(gender)
    # Kamiran-Calders weights: s and y independent under w
    w = np.empty(n)
    for s in ("woman", "man"):
        for y in ("nurse", "pilot", "chef"):
            cell = (gender == s) & (occ == y)
            w[cell] = (gender == s).sum() * (occ == y).sum() / (n * cell.sum())
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, w, max_rows=n)
    ds = out["gender"]["dataset"]
    assert ds["before"]["accuracy"] > ds["before"]["majority_rate"] + 0.15  # occupation predicts gender
    assert ds["after"]["excess"] == pytest.approx(0.0, abs=0.03)  # independence: nothing to learn
    emb = out["gender"]["embedding_image"]
    assert emb["before"]["accuracy"] > 0.85 and emb["after"]["accuracy"] > 0.85  # balancing labels leaves this
    assert out["sample_rows"] == n
    # 6,000 rows: the held-out fifth is too small, so every row is scored out of fold
    assert ds["before"]["scoring"] == "cross_fit" and ds["before"]["test_rows"] == n
    for view in ("before", "after"):
        for key in ("accuracy", "excess", "majority_rate"):
            lo, hi = emb[view][f"{key}_ci"]
            assert lo <= emb[view][key] <= hi


def test_large_samples_hold_out_one_fifth():
    sample, gender, occ = _sample(n=15_000, seed=3)
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, np.ones(15_000), max_rows=15_000)
    probe = out["gender"]["dataset"]["before"]
    fold0 = ((sample.column("priority").to_numpy() >> np.uint64(7)) % 5 == 0).sum()
    assert probe["scoring"] == "held_out" and probe["test_rows"] == fold0 and probe["test_rows"] + probe["train_rows"] == 15_000
    assert probe["readable"] and probe["effective_test_rows"] == pytest.approx(fold0)


def test_a_small_run_widens_to_every_row_and_says_when_too_few():
    # the 400-row run: a fifth held out is 80 rows; cross-fitting scores all 400
    sample, gender, occ = _sample(n=400, seed=5)
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    w = np.where(np.arange(400) % 2 == 0, 1.0, 0.0)  # the after view keeps half the rows
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, w, max_rows=400)
    before, after = out["gender"]["embedding_image"]["before"], out["gender"]["embedding_image"]["after"]
    assert before["scoring"] == "cross_fit" and before["test_rows"] == 400
    assert after["test_rows"] == 200 and not after["readable"] and after["effective_test_rows"] < MIN_READABLE_ROWS
    # the interval of 200 rows is wide, and the terminal says the figure is too thin to read
    assert after["accuracy_ci"][1] - after["accuracy_ci"][0] > 0.04
    line = next(l for l in leakage_lines(out) if "embedding image" in l)
    assert f"[{after['accuracy_ci'][0]:.3f}, {after['accuracy_ci'][1]:.3f}]" in line and "too few scored rows" in line


def _percentile_bootstrap(correct, y, w, rng, resamples=2000):
    """Independent reference: resample the scored rows with their weights, percentile interval."""
    n = len(y)
    acc, exc = [], []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        wi, ci, yi = w[i], correct[i], y[i]
        a = (wi * ci).sum() / wi.sum()
        maj = max((wi * (yi == k)).sum() for k in (0, 1)) / wi.sum()
        acc.append(a)
        exc.append(a - maj)
    return np.percentile(acc, [2.5, 97.5]), np.percentile(exc, [2.5, 97.5])


@pytest.mark.parametrize("n, p, weighted", [(600, 0.7, False), (2000, 0.62, True), (500, 0.93, True)])
def test_intervals_agree_with_a_percentile_bootstrap(n, p, weighted):
    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.55).astype(int)
    correct = (rng.random(n) < p).astype(float)
    w = rng.gamma(2.0, 0.5, n) if weighted else np.ones(n)
    ours = probe_intervals(correct, y, w)
    acc, exc = _percentile_bootstrap(correct, y, w, rng)
    for got, ref in ((ours["accuracy"], acc), (ours["excess"], exc)):
        width = ref[1] - ref[0]
        assert got[0] == pytest.approx(ref[0], abs=0.12 * width) and got[1] == pytest.approx(ref[1], abs=0.12 * width)


def test_intervals_cover_the_true_accuracy_at_their_level():
    # rows right with a known probability, weights drawn independently: ~95% of intervals cover it
    rng = np.random.default_rng(11)
    reps, n, p = 400, 300, 0.8
    covered = 0
    for _ in range(reps):
        ci = probe_intervals((rng.random(n) < p).astype(float), rng.integers(0, 2, n), rng.gamma(2.0, 0.5, n))["accuracy"]
        covered += ci[0] <= p <= ci[1]
    assert 0.92 <= covered / reps <= 0.98


def test_a_perfect_probe_gets_a_one_sided_interval():
    ci = probe_intervals(np.ones(400), np.zeros(400, int), np.ones(400))["accuracy"]
    assert ci[1] == 1.0 and 0.98 < ci[0] < 1.0  # Wilson: 1 / (1 + z^2 / n)


def test_effective_rows_is_kish():
    w = np.array([1.0, 1.0, 2.0, 0.5])
    assert effective_rows(w) == pytest.approx(w.sum() ** 2 / (w ** 2).sum())
    assert effective_rows(np.ones(7)) == pytest.approx(7)


def test_zero_weights_are_excluded_and_tiny_inputs_give_none():
    sample, gender, occ = _sample(n=40)
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, np.zeros(40), max_rows=40)
    assert out["gender"]["dataset"]["after"] is None
