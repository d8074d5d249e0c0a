import pytest
import yaml

from mmbalance.io.recipes import load_recipe
from mmbalance.schemas.recipe import EXAMPLE_RECIPE, Recipe, RecipeError, parse_recipe


def test_issue_recipe_parses_as_written(issue_recipe):
    assert issue_recipe.input.columns.image_embedding == "image_emb"
    assert issue_recipe.attributes[0].values == ["woman", "man"]
    assert issue_recipe.labels[0].values is None
    assert issue_recipe.balance.method == "cap" and issue_recipe.balance.cap == 1000
    assert issue_recipe.export.formats == ["parquet"]


def test_example_recipe_is_valid():
    recipe = parse_recipe(yaml.safe_load(EXAMPLE_RECIPE), "example")
    cap, m4 = recipe.balance_steps()
    assert (cap.method, cap.by, m4.method) == ("cap", "occupation", "m4") and m4.associate == [("gender", "occupation")]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"inputs": {}}, "unknown key 'inputs'"),
        ({"balance": {"method": "cap", "by": "x", "cap": 5, "cpa": 1}}, "unknown key 'balance.cpa'"),
        ({"attributes": [{"name": "g", "values": ["a"], "colum": "x"}]}, "unknown key 'attributes.0.colum'"),
        ({"balance": {"method": "cap", "by": "occupation", "cap": 5}}, "balance.by names 'occupation'"),
        ({"balance": {"method": "cap", "by": "x", "cap": 0}}, "balance.cap"),
        ({"balance": {"method": "magic"}}, "balance.method"),
        ({"attributes": [{"name": "g", "values": ["a", "a"]}]}, "values must be unique"),
        ({"attributes": [{"name": "g", "values": ["a"]}], "labels": [{"name": "g"}]}, "names must be unique"),
    ],
)
def test_bad_recipes_name_the_key(data, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    message = str(err.value)
    assert message.startswith("r.yaml: ") and expected in message and "\n" not in message


def test_targets_must_name_known_values():
    data = {
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occ"}],
        "balance": {"method": "cap", "by": "occ", "cap": 3, "targets": {"gender": {"women": 1.0}}},
    }
    with pytest.raises(RecipeError, match="not in its attribute"):
        parse_recipe(data)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  columns: {uid: uid\nbalance: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_recipe(path)


def test_fingerprint_ignores_execution_settings(issue_recipe):
    faster = issue_recipe.model_copy(update={"execution": issue_recipe.execution.model_copy(update={"batch_rows": 7})})
    assert faster.fingerprint() == issue_recipe.fingerprint()
    other = parse_recipe({**issue_recipe.model_dump(), "export": {"seed": 1}})
    assert other.fingerprint() != issue_recipe.fingerprint()


def test_default_recipe_balances_nothing():
    assert Recipe().balance.method == "none"
    assert Recipe().attribute_targets() == {}


@pytest.mark.parametrize(
    "balance, expected",
    [
        ({"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "job"]]},
         "balance.associate.0 names 'job', which is not a label"),
        ({"method": "m4", "associate": [["sex", "occupation"]]}, "balance.associate.0 names 'sex', which is not an attribute"),
        ({"method": "reweigh", "attribute": "gender", "label": "occ"}, "balance.label names 'occ'"),
        ({"method": "waterfill", "by": "gender", "size": 10}, "balance.by names 'gender', which is not a label"),
        ({"method": "rake", "label_targets": {"job": {"a": 1.0}}}, "balance.label_targets names 'job'"),
        ({"method": "m4", "targets": {"gender": {"woman": 0.7, "man": 0.7}}}, "balance.targets: targets.gender shares must sum to 1, got 1.4"),
    ],
)
def test_balance_steps_name_existing_columns(balance, expected):
    data = {
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation"}],
        "balance": balance,
    }
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    assert expected in str(err.value) and "Value error" not in str(err.value)


def test_balance_steps_compose_and_errors_point_into_the_list():
    base = {"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}]}
    recipe = parse_recipe({**base, "balance": [
        {"method": "waterfill", "by": "occupation", "retention": 0.8},
        {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "retention": 0.9},
    ]})
    assert recipe.balance_method() == "waterfill+m4" and len(recipe.balance_steps()) == 2
    with pytest.raises(RecipeError, match=r"r.yaml: unknown key 'balance.1.cpa' \(did you mean 'cap'\?\)"):
        parse_recipe({**base, "balance": [{"method": "none"}, {"method": "cap", "by": "occupation", "cpa": 3}]}, "r.yaml")
    with pytest.raises(RecipeError, match="balance.0.by names 'job'"):
        parse_recipe({**base, "balance": [{"method": "cap", "by": "job", "cap": 3}]}, "r.yaml")


def test_duplicate_key_names_the_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("labels:\n  - {name: occupation}\nbalance:\n  method: cap\n  by: occupation\n  cap: 3\n  cap: 5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: line 7 duplicate key 'cap' (first given on line 6)"


def test_duplicate_key_in_a_flow_mapping_and_merge_keys(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("input: {columns: {uid: a, uid: b}}\n")
    with pytest.raises(RecipeError, match=r"line 1 duplicate key 'uid'"):
        load_recipe(path)
    # a '<<' merge overriding a key is YAML's own way to reuse a block, not a duplicate
    path.write_text("labels: [{name: occupation}]\nbalance:\n  <<: {method: cap, by: occupation, cap: 3}\n  cap: 5\n")
    assert load_recipe(path).balance.cap == 5


def test_boolean_words_are_value_names_as_written_and_still_flags(tmp_path):
    """yes/no/on/off/true/false (any case) keep their exact text where a string is expected
    (YAML 1.1 would read them as booleans); bool settings still read them as booleans."""
    path = tmp_path / "words.yaml"
    path.write_text(
        "input: {columns: {uid: uid}}\n"
        "attributes:\n"
        "  - {name: answer, values: [yes, no, true, False, On, OFF, 'y']}\n"
        "labels: [{name: occupation, values: [on, off]}]\n"
        "balance:\n"
        "  method: m4\n"
        "  targets: {answer: {yes: 0.5, no: 0.5}}\n"
        "  budget: no\n"
        "report: {html: NO, leakage: Yes}\n"
    )
    recipe = load_recipe(path)
    assert recipe.attributes[0].values == ["yes", "no", "true", "False", "On", "OFF", "y"]
    assert recipe.labels[0].values == ["on", "off"]
    assert recipe.balance.targets == {"answer": {"yes": 0.5, "no": 0.5}}
    assert recipe.balance.budget is False and recipe.report.html is False and recipe.report.leakage is True
    # the same recipe through PyYAML's own loader fails the way users saw it
    with pytest.raises(RecipeError, match="valid string"):
        parse_recipe(yaml.safe_load(path.read_text()), "r.yaml")


def test_verify_checksums_is_an_execution_setting_on_by_default(issue_recipe):
    off = issue_recipe.model_copy(update={"execution": issue_recipe.execution.model_copy(update={"verify_checksums": False})})
    assert off.fingerprint() == issue_recipe.fingerprint() and Recipe().execution.verify_checksums is True
