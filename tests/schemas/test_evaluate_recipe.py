"""The evaluation recipe: strict like the main recipe, prompts resolved from lists, templates and the
shipped vocabularies, placeholders checked up front."""

from __future__ import annotations

import pytest

from mmbalance.operators.evaluate.scoring import prompt_groups
from mmbalance.schemas.evaluate import load_eval_recipe, parse_eval_recipe
from mmbalance.schemas.recipe import RecipeError

MODEL = {"name": "local-dir:/m", "checkpoint": "logs/run/checkpoints/epoch_3.pt"}

ISSUE_EXAMPLE = """\
model: {name: "local-dir:tiny-clip", checkpoint: logs/run/checkpoints/epoch_3.pt}
eval: {path: eval.parquet, columns: {uid: uid, image: image}}
attributes:
  - name: gender
    column: gender            # null = neutral image
    values: [woman, man]
    prompts: {woman: ["a woman at work as a {occupation}"], man: ["a man at work as a {occupation}"]}
labels:
  - {name: occupation, column: occupation, prompts: ["at work as a {occupation}"]}
"""


def parse(**kw):
    return parse_eval_recipe({"model": MODEL, **kw}, "e.yaml")


def error(**kw) -> str:
    with pytest.raises(RecipeError) as err:
        parse(**kw)
    return str(err.value)


def test_the_issues_example_parses(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(ISSUE_EXAMPLE)
    recipe = load_eval_recipe(path)
    attr = recipe.attributes[0]
    assert recipe.condition_of(attr) == "occupation"
    assert recipe.model.embed_spec().pretrained == "logs/run/checkpoints/epoch_3.pt"
    assert recipe.model.embed_spec("other.pt").pretrained == "other.pt"
    groups = prompt_groups("attribute", "gender", attr.resolved(), attr.phrase, sorted(attr.own_names()),
                           ("occupation", ["software_developer"], recipe.labels[0].phrase), ["occupation"])
    assert groups[0].prompts == {"woman": ("a woman at work as a software developer",),
                                 "man": ("a man at work as a software developer",)}
    corpus = recipe.corpus_recipe()
    assert corpus.input.columns.image == "image" and [a.values for a in corpus.attributes] == [["woman", "man"]]


def test_shipped_vocabularies_give_values_and_prompts():
    recipe = parse(attributes=[{"name": "age", "vocabulary": "age_group"}],
                   labels=[{"name": "occupation", "vocabulary": "occupation", "prompts": {"nurse": ["a nurse on duty"]}}])
    age = recipe.attributes[0]
    assert age.values == ["child", "teenager", "adult", "senior"]
    assert "a photo of a child." in age.resolved()["child"]
    resolved = recipe.labels[0].resolved(["nurse", "welder"])
    assert resolved["nurse"] == ("a nurse on duty",) and "a photo of a welder." in resolved["welder"]
    assert age.target_shares() == {v: 0.25 for v in age.values}


def test_templates_fill_the_phrases_and_the_label_alias():
    recipe = parse(attributes=[{"name": "g", "values": ["woman", "man"], "prompts": ["a {g} who is a {label}", "{value}"],
                                "phrases": {"woman": "female person"}}],
                   labels=[{"name": "job", "prompts": ["a {job}", "the {label}", "a {value}"]}])
    attr = recipe.attributes[0]
    assert recipe.condition_of(attr) == "job"
    groups = prompt_groups("attribute", "g", attr.resolved(), attr.phrase, sorted(attr.own_names()),
                           ("job", ["fire_fighter"], recipe.labels[0].phrase), ["job"])
    assert groups[0].prompts == {"woman": ("a female person who is a fire fighter", "female person"),
                                 "man": ("a man who is a fire fighter", "man")}
    lab = recipe.labels[0]
    label_groups = prompt_groups("label", "job", lab.resolved(["pilot"]), lab.phrase, sorted(lab.own_names()))
    assert label_groups[0].prompts == {"pilot": ("a pilot", "the pilot")}  # a repeated prompt counts once


def test_errors_name_the_key():
    assert "attributes.0: value 'b' has no prompts: add prompts.b" in error(
        attributes=[{"name": "g", "values": ["a", "b"], "prompts": {"a": ["x"]}}])
    assert "template 'a {job}' names {job}; known: {g}, {value}" in error(
        attributes=[{"name": "g", "values": ["a"], "prompts": ["a {job}"]}])
    assert "templates may name one label" in error(
        attributes=[{"name": "g", "values": ["a"], "prompts": ["{x} {y}"]}],
        labels=[{"name": "x", "prompts": ["{x}"]}, {"name": "y", "prompts": ["{y}"]}])
    assert "positional {}" in error(attributes=[{"name": "g", "values": ["a"], "prompts": ["a {}"]}])
    assert "prompts names values not in values" in error(attributes=[{"name": "g", "values": ["a"], "prompts": {"a": ["x"], "b": ["y"]}}])
    assert "no prompts" in error(labels=[{"name": "job"}])
    assert "unknown key 'attributes.0.prompt' (did you mean 'prompts'?)" in error(attributes=[{"name": "g", "values": ["a"], "prompt": ["x"]}])
    assert "unknown key 'model.chekpoint' (did you mean 'checkpoint'?)" in str(
        pytest.raises(RecipeError, parse_eval_recipe, {"model": {"name": "m", "chekpoint": "x"}, "labels": [{"name": "j", "prompts": ["{j}"]}]}, "e.yaml").value)
    assert "give model.checkpoint or model.pretrained, not both" in str(pytest.raises(
        RecipeError, parse_eval_recipe, {"model": {**MODEL, "pretrained": "random"}, "labels": [{"name": "j", "prompts": ["{j}"]}]}, "e.yaml").value)
    assert "nothing to evaluate" in error()
    assert "shares must sum to 1" in error(attributes=[{"name": "g", "values": ["a", "b"], "prompts": ["{g}"], "target": {"a": 0.7}}])
    assert "vocabulary: nope: no such vocabulary file" in error(attributes=[{"name": "g", "vocabulary": "nope"}])
    assert "attribute and label names must be unique" in error(attributes=[{"name": "g", "values": ["a"], "prompts": ["{g}"]}],
                                                                labels=[{"name": "g", "prompts": ["{g}"]}])
    assert "retrieval.k" in error(labels=[{"name": "j", "prompts": ["{j}"]}], retrieval={"k": [0]})


def test_yaml_rules_of_the_main_recipe(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model: {name: m}\nlabels: [{name: j, prompts: ['{j}']}]\nseed: 1\nseed: 2\n")
    with pytest.raises(RecipeError, match=r"e.yaml: line 4 duplicate key 'seed' \(first given on line 3\)"):
        load_eval_recipe(path)
    path.write_text("model: {name: m}\nattributes: [{name: g, values: [yes, no], prompts: ['{g}']}]\n")
    assert load_eval_recipe(path).attributes[0].values == ["yes", "no"]
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_eval_recipe(tmp_path / "missing.yaml")


def test_the_readme_example_parses_and_every_key_is_documented():
    import re
    from pathlib import Path

    from mmbalance.schemas.evaluate import EvalRecipe

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Evaluating a trained checkpoint: `mmbalance evaluate`", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    from mmbalance.schemas.recipe import recipe_mapping

    recipe = parse_eval_recipe(recipe_mapping(example, "README"), "README")
    assert recipe.condition_of(recipe.attributes[0]) == "occupation" and recipe.attributes[1].values[0] == "child"
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)(?:\[\])?`", section))
    fields = {f"{top}.{sub}" for top, field in EvalRecipe.model_fields.items()
              for sub in getattr(field.annotation, "model_fields", {})}
    words = {w for d in documented for w in d.split(".")}
    missing = sorted(f for f in fields if f not in documented and f.split(".")[1] not in words)
    assert not missing, missing
