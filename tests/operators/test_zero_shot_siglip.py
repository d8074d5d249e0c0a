"""Zero-shot scoring chosen from the model: SigLIP (sigmoid loss, learned bias) against open_clip's
own SigLIP logits, CLIP (softmax) against open_clip's zero-shot convention. Random-init towers
with open_clip's bundled CLIP tokenizer (the SigLIP hub tokenizer cannot be downloaded here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from corpora import TINY_SIGLIP

from mmbalance.operators.zero_shot import ClassEmbeddings, class_probabilities, hard_tags, model_scoring

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a photo of a woman.", "a photo of a man.", "a photo of an empty street."]


def tiny_siglip_dir(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_SIGLIP))
    return directory


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from mmbalance.operators.embed.model import load_model

    bundle = load_model({"model": f"local-dir:{tiny_siglip_dir(tmp_path_factory.mktemp('siglip'))}", "pretrained": "random"})
    with torch.no_grad():  # a trained-looking head: a scale and bias other than the init values
        bundle.model.logit_scale.fill_(np.log(30.0))
        bundle.model.logit_bias.fill_(-3.0)
    yield bundle
    bundle.close()


def _features(bundle, n: int, seed: int):
    images = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        out = bundle.model(images, bundle.tokenizer(PROMPTS))
    return out


def test_siglip_scores_are_open_clips_sigmoid_logits(siglip):
    image_features, text_features, scale, bias = _features(siglip, 16, 0)
    # the reference: open_clip's SigLIP loss logits of these features, through a sigmoid
    with torch.no_grad():
        reference = torch.sigmoid(open_clip.loss.SigLipLoss().get_logits(image_features, text_features, scale, bias)).numpy()
    scoring = model_scoring(siglip.model)
    assert scoring["scoring"] == "sigmoid"
    assert scoring["logit_scale"] == pytest.approx(30.0, rel=1e-6) and scoring["logit_bias"] == pytest.approx(-3.0)
    classes = ClassEmbeddings(("woman", "man"), text_features.numpy(), True, **scoring)
    probs = class_probabilities(image_features.numpy(), classes)
    np.testing.assert_allclose(probs, reference, rtol=1e-4, atol=1e-6)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # independent per class, not a softmax


def test_siglip_run_through_the_model_bundle(siglip):
    """The pipeline's path: prompts through ``encode_texts`` (fp16 unit rows), scores from the model head."""
    from mmbalance.data import load_vocabulary
    from mmbalance.operators.zero_shot import vocabulary_embeddings
    import dataclasses

    vocab = dataclasses.replace(load_vocabulary("perceived_gender"), values=("woman", "man"))
    classes = vocabulary_embeddings(vocab, siglip.encode_texts, model_scoring(siglip.model))
    assert classes.scoring == "sigmoid" and classes.classes == ("woman", "man", "none")
    # embeddings on a class direction score highest for that class; threshold 0 tags the argmax
    probs = class_probabilities(classes.matrix[[0, 1, 2, 0]], classes)
    assert hard_tags(probs, classes.classes, 0.0).to_pylist() == ["woman", "man", None, "woman"]
    expected = 1 / (1 + np.exp(-(30.0 * 1.0 - 3.0)))  # cosine 1 with itself
    np.testing.assert_allclose(np.diag(probs[:3]), expected, rtol=1e-3)


def test_clip_keeps_softmax_and_sigmoid_needs_a_bias(tmp_path):
    from corpora import tiny_open_clip_dir

    from mmbalance.operators.embed.model import load_model

    bundle = load_model({"model": f"local-dir:{tiny_open_clip_dir(tmp_path / 'clip')}", "pretrained": "random"})
    try:
        assert model_scoring(bundle.model) == {"scoring": "softmax", "logit_scale": None, "logit_bias": None}
        with pytest.raises(ValueError, match="no.*logit_bias|has none"):
            model_scoring(bundle.model, "sigmoid")
        out = bundle.model(torch.zeros(4, 3, 32, 32).normal_(generator=torch.Generator().manual_seed(1)),
                           bundle.tokenizer(PROMPTS))
        image_features, text_features = out[0], out[1]
        # open_clip's zero-shot convention: softmax of 100 * cosine
        reference = torch.softmax(100.0 * image_features @ text_features.T, dim=-1).detach().numpy()
        classes = ClassEmbeddings(("woman", "man"), text_features.detach().numpy(), True)
        np.testing.assert_allclose(class_probabilities(image_features.detach().numpy(), classes, 0.01), reference,
                                   rtol=1e-4, atol=1e-6)
    finally:
        bundle.close()


def test_scoring_is_saved_and_read_back(tmp_path):
    from mmbalance.io.store import RunStore
    from mmbalance.operators.models import load_models, save_model

    classes = ClassEmbeddings(("a",), np.eye(1, 4, dtype=np.float32), False, "sigmoid", 10.0, -2.0, {"vocabulary": "v"})
    save_model(RunStore(str(tmp_path)), "g", classes)
    back = load_models(RunStore(str(tmp_path)))["g"]
    assert (back.values, back.scoring, back.logit_scale, back.logit_bias) == (("a",), "sigmoid", 10.0, -2.0)
    assert back.meta["vocabulary"] == "v" and np.array_equal(back.matrix, classes.matrix)
    old = ClassEmbeddings.from_files(classes.matrix, {"values": ["a"], "has_none": False})  # runs before scoring existed
    assert old.scoring == "softmax"
    with pytest.raises(ValueError, match="needs the model's logit_scale"):
        ClassEmbeddings(("a",), classes.matrix, False, "sigmoid")
