"""The rendered corpus of the model-bias benchmark: deterministic, its cues in the pixels (measured
on the decoded images, not on the generator's bookkeeping), the planted association in the rows
and none in the evaluation set."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from mmbalance.synth_images import OCCUPATIONS, SCENES, eval_table, planted, synth_image_corpus, train_table


def _pixels(table) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()]).astype(np.int32)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synth_image_corpus(tmp_path / name, rows=120, shards=2, seed=seed, eval_dir=tmp_path / f"{name}-eval", eval_neutral=2, eval_cued=1)
    files = ["part-00000.parquet", "part-00001.parquet", "_synth.json"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a-eval" / "eval.parquet").read_bytes() == (tmp_path / "b-eval" / "eval.parquet").read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def test_the_gender_cue_is_the_shade_of_the_mark_and_hidden_is_neither():
    t = train_table(400, seed=1)
    px = _pixels(t)
    white = (px.min(axis=3) > 215).sum(axis=(1, 2))  # nothing else is near white or near black
    black = (px.max(axis=3) < 45).sum(axis=(1, 2))
    gender = np.array(t.column("gender").to_pylist())
    cue = np.array(t.column("cue_visible").to_pylist())
    assert 0.4 < cue.mean() < 0.6
    assert np.all((white >= 20) == (cue & (gender == "woman")))
    assert np.all((black >= 20) == (cue & (gender == "man")))
    assert np.all(white[~cue] + black[~cue] == 0)


def test_occupation_and_scene_are_readable_from_the_pixels():
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    t = train_table(900, seed=2)
    small = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((16, 16), Image.BILINEAR))
                      for b in t.column("image").to_pylist()]).reshape(900, -1) / 255.0
    occ = np.array(t.column("occupation").to_pylist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter; the score is what is tested
        probe = LogisticRegression(max_iter=200).fit(small[:600], occ[:600])
    # chance 0.125; the glyph's colour alone (two colours per occupation) reads ~0.7: the shape is in there
    assert probe.score(small[600:], occ[600:]) > 0.85
    # the latent scene is the background's colour family: its mean colour is nearest its scene's base
    px = _pixels(t)
    corner = px[:, :4, :4].reshape(900, -1, 3).mean(axis=1)
    bases = np.array(list(SCENES.values()))
    nearest = np.argmin(((corner[:, None, :] - bases[None]) ** 2).sum(-1), axis=1)
    assert np.mean(np.array(list(SCENES))[nearest] == np.array(t.column("scene").to_pylist())) > 0.97


def test_the_planted_association_is_in_the_rows():
    t = train_table(6000, seed=3)
    gender = np.array(t.column("gender").to_pylist())
    occ = np.array(t.column("occupation").to_pylist())
    scene = np.array(t.column("scene").to_pylist())
    truth = planted()
    for o, p in truth["p_woman_given_occupation"].items():
        n = (occ == o).sum()
        assert abs(np.mean(gender[occ == o] == "woman") - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9
    for s, p in truth["p_woman_given_scene"].items():
        n = (scene == s).sum()
        assert abs(np.mean(gender[scene == s] == "woman") - p) < 4 * np.sqrt(p * (1 - p) / n)
    captions = t.column("caption").to_pylist()
    assert all(g in c.split() or f"{g}." in c.split() for c, g in zip(captions, gender))  # gender named, cue or not
    assert not any(s in c for c in captions for s in SCENES)  # the scene never is


def test_eval_set_is_balanced_and_neutral_images_are_unlabelled():
    t = eval_table(seed=5, neutral=3, cued=2)
    gender = t.column("gender").to_pylist()
    occ, scene = t.column("occupation").to_pylist(), t.column("scene").to_pylist()
    assert t.num_rows == len(OCCUPATIONS) * len(SCENES) * (3 + 2 * 2)
    for o in OCCUPATIONS:
        cell = [g for g, oo in zip(gender, occ) if oo == o]
        assert cell.count(None) == 3 * len(SCENES) and cell.count("woman") == cell.count("man") == 2 * len(SCENES)
    assert len({(o, s) for o, s in zip(occ, scene)}) == len(OCCUPATIONS) * len(SCENES)
    captions = [c for c in t.column("caption").to_pylist() if c is not None]
    assert len(captions) == len(set(captions)) == len(OCCUPATIONS) * 3  # unique: recall is not a tie-break
    px = _pixels(t)
    hidden = np.array([g is None for g in gender])
    assert np.all((px[hidden].min(axis=3) > 215).sum(axis=(1, 2)) + (px[hidden].max(axis=3) < 45).sum(axis=(1, 2)) == 0)


@pytest.mark.parametrize("bad", [dict(rows=-1), dict(shards=0), dict(cue_rate=1.5)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        synth_image_corpus(tmp_path, **{"rows": 10, "shards": 1, **bad})


def test_cli_writes_the_rendered_corpus_and_eval_set(tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    res = subprocess.run([sys.executable, "-m", "mmbalance.cli", "synth", str(tmp_path / "c"), "--rendered", "--rows", "40",
                          "--shards", "2", "--eval-out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert pq.read_table(tmp_path / "c").num_rows == 40 and pq.read_table(tmp_path / "e" / "eval.parquet").num_rows > 0
    bad = subprocess.run([sys.executable, "-m", "mmbalance.cli", "synth", str(tmp_path / "d"), "--eval-out", str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--rendered" in bad.stderr
