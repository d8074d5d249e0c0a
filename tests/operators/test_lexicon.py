"""Caption lexicon tagger and metadata matcher on held-out captions.

The captions come from templates and surface forms written here, independently of the shipped
lexicons, so a missing plural or a broken variant in the data files fails these tests.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from mmbalance.data import SHIPPED, load_lines, load_vocabulary
from mmbalance.operators.lexicon import LexiconAttribute, LexiconTagger, hits_column, source_tag_column
from mmbalance.operators.metaclip import (MetadataMatcher, capped_entries, entry_count_table, keep_probability,
                                          merge_entry_counts)

GENDER = source_tag_column("perceived_gender", "caption")
AGE = source_tag_column("age_group", "caption")
OCC = source_tag_column("occupation", "caption")

# surface forms chosen for the test, not copied from the data files
GENDER_FORMS = {
    "woman": ["woman", "women", "girl", "she", "her", "lady", "mother", "daughter", "wife", "sister", "grandmother", "actress"],
    "man": ["man", "men", "boy", "he", "his", "him", "gentleman", "father", "son", "husband", "grandfather", "boyfriend"],
}
OCCUPATION_FORMS = {
    "nurse": ["nurse", "nurses"], "doctor": ["doctor", "physicians"], "engineer": ["engineers", "engineer"],
    "librarian": ["librarian"], "ceo": ["CEO", "chief executive officer"], "secretary": ["secretaries"],
    "police_officer": ["police officer", "cops", "policewoman"], "firefighter": ["fire-fighter", "firefighters"],
    "construction_worker": ["construction workers"], "developer": ["software developer", "programmers"],
    "hairdresser": ["hairdresser", "hairstylists"], "barber": ["barbers"], "cashier": ["cashiers"], "receptionist": ["receptionist"],
    "carpenter": ["carpenters"], "lawyer": ["attorney", "lawyers"], "farmer": ["farmers"], "pilot": ["pilot"],
    "teacher": ["teachers"], "chef": ["chef"], "mechanic": ["mechanic"], "janitor_as_cleaner": ["janitor"],
    "surgeon": ["surgeons"], "scientist": ["scientist"], "waiter": ["waitress"], "accountant": ["accountants"],
}
OCC_TRUTH = {k: ("cleaner" if k == "janitor_as_cleaner" else k) for k in OCCUPATION_FORMS}
# words that contain lexicon entries without being them
GENDER_TRAPS = ["manager", "shepherd", "mankind", "human", "Sheffield", "hemisphere", "Herbert", "Manhattan",
                "chemistry", "therapist", "womanhood", "shell", "ashes", "sonnet", "boycott", "heroic", "mensa"]
OCC_TRAPS = ["nursery", "doctoral", "engineering", "bakery", "judgemental", "painting", "copper", "tailored",
             "pilotless", "chefchaouen", "barbershop", "authority", "vetting", "clerical", "designed"]
FILLERS = ["sunset", "bicycle", "kitchen", "river", "laptop", "garden", "red", "old", "bus", "market", "rain", "city"]
TEMPLATES = [
    "{W} near the {f}",
    "in this picture, {w} holds a {f}.",
    "{f} and {w}!",
    "close-up: {w}'s {f} ({f})",
    "\"{w}\" at the {f}; {t}",
    "{f}-themed shot of {w} - {t}",
    "{t} {f} {w}",
    "{w}\t{f}\n{t}",
]


@pytest.fixture(scope="module")
def tagger() -> LexiconTagger:
    return LexiconTagger.from_vocabularies([load_vocabulary(n) for n in SHIPPED])


def _caption(rng, word: str | None, traps: list[str]) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if word is None:
        word = rng.choice(FILLERS)
    case = rng.integers(3)
    w = word.upper() if case == 0 else word.title() if case == 1 else word
    return template.format(w=w, W=w[:1].upper() + w[1:], f=rng.choice(FILLERS), t=rng.choice(traps))


def _precision_recall(pred: list, truth: list) -> tuple[float, float]:
    tagged = [(p, t) for p, t in zip(pred, truth) if p is not None]
    planted = [(p, t) for p, t in zip(pred, truth) if t is not None]
    precision = sum(p == t for p, t in tagged) / len(tagged)
    recall = sum(p == t for p, t in planted) / len(planted)
    return precision, recall


def test_planted_gender_words_are_recovered(tagger):
    rng = np.random.default_rng(1)
    captions, truth = [], []
    for _ in range(3000):
        value = rng.choice(["woman", "man", None], p=[0.4, 0.4, 0.2])
        word = rng.choice(GENDER_FORMS[value]) if value else None
        captions.append(_caption(rng, word, GENDER_TRAPS))
        truth.append(value)
    pred = tagger.tag(pa.array(captions)).column(GENDER).to_pylist()
    precision, recall = _precision_recall(pred, truth)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)
    # untagged captions hold a trap word every time a template has {t}: none of them fires
    assert all(p is None for p, t in zip(pred, truth) if t is None)


def test_planted_occupations_are_recovered(tagger):
    rng = np.random.default_rng(2)
    names = list(OCCUPATION_FORMS)
    captions, truth = [], []
    for _ in range(3000):
        key = names[rng.integers(len(names))] if rng.random() < 0.8 else None
        word = rng.choice(OCCUPATION_FORMS[key]) if key else None
        captions.append(_caption(rng, word, OCC_TRAPS))
        truth.append(OCC_TRUTH[key] if key else None)
    pred = tagger.tag(pa.array(captions)).column(OCC).to_pylist()
    precision, recall = _precision_recall(pred, truth)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)


@pytest.mark.parametrize("caption", [f"a {w} in the office" for w in GENDER_TRAPS] + ["hello", "sheep", "the mens-a"])
def test_no_firing_on_substrings(tagger, caption):
    if caption == "the mens-a":  # hyphens split words: "mens" (as in "mens shirts") fires, by design
        assert tagger.tag([caption]).column(GENDER).to_pylist() == ["man"]
        return
    assert tagger.tag([caption]).column(GENDER).to_pylist() == [None]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("WOMAN!", "woman"), ("(woman)", "woman"), ("the woman's hat", "woman"), ("Woman\u2019s day", "woman"),
        ("\u00abShe\u00bb said", "woman"), ("portrait:man,standing", "man"), ("MR. Smith", "man"),
        ("a man\u2014tall", "man"), ("men_at_work", "man"), ("", None), (None, None), ("   ", None),
    ],
)
def test_punctuation_and_case(tagger, caption, expected):
    assert tagger.tag([caption]).column(GENDER).to_pylist() == [expected]


def test_multiple_values_follow_the_rule():
    vocab = load_vocabulary("perceived_gender")
    captions = ["he and she", "she, her sister and he", "a woman", "a man and a woman", "nothing"]
    got = {}
    for rule in ("unknown", "both", "majority"):
        t = LexiconTagger([LexiconAttribute.from_vocabulary(vocab, multiple=rule, name="g")])
        got[rule] = t.tag(captions).column(source_tag_column("g", "caption")).to_pylist()
    assert got["unknown"] == [None, None, "woman", None, None]
    assert got["both"] == ["woman+man", "woman+man", "woman", "woman+man", None]
    assert got["majority"] == [None, "woman", "woman", None, None]


def test_hit_counts_per_value(tagger):
    table = tagger.tag(["she, her sister and he", "a nurse and two nurses"])
    assert table.column(hits_column("perceived_gender", "woman")).to_pylist() == [3, 0]
    assert table.column(hits_column("perceived_gender", "man")).to_pylist() == [1, 0]
    assert table.column(hits_column("occupation", "nurse")).to_pylist() == [0, 2]


def test_negation_is_conservative(tagger):
    captions = ["no women allowed", "a street without a man", "a man with no hat", "not a doctor", "never he"]
    table = tagger.tag(captions)
    assert table.column(GENDER).to_pylist() == [None, None, "man", None, None]
    assert table.column(OCC).to_pylist() == [None, None, None, None, None]
    off = LexiconTagger.from_vocabularies([load_vocabulary("perceived_gender")], negation_window=0)
    assert off.tag(captions).column(GENDER).to_pylist() == ["woman", "man", "man", None, "man"]
    assert "without" in load_lines("negation_cues")


def test_longest_match_within_attribute_only(tagger):
    table = tagger.tag(["an old man on a bench", "a little girl and her grandmother", "young woman"])
    assert table.column(AGE).to_pylist() == ["senior", None, "adult"]
    assert table.column(GENDER).to_pylist() == ["man", "woman", "woman"]
    assert table.column(hits_column("age_group", "adult")).to_pylist() == [0, 0, 1]
    kept_all = LexiconTagger.from_vocabularies([load_vocabulary("age_group")], longest_only=False)
    assert kept_all.tag(["an old man"]).column(AGE).to_pylist() == [None]  # senior + adult


def test_phrase_under_two_values_is_an_error():
    with pytest.raises(ValueError, match="listed under both"):
        LexiconTagger([LexiconAttribute("g", ("a", "b"), {"a": ("x y",), "b": ("X-y",)})])
    with pytest.raises(ValueError, match="not in"):
        LexiconAttribute("g", ("a",), {"b": ("x",)})


def test_shipped_vocabularies_are_complete():
    occ = load_vocabulary("occupation")
    assert len(occ.values) >= 40 and occ.kind == "label"
    for benchmark_word in ["nurse", "doctor", "engineer", "librarian", "ceo", "secretary"]:
        assert benchmark_word in occ.values
    for value in occ.values:  # every occupation lists a plural
        assert any(re.search(r"(s|men|people|staff)$", w) for w in occ.lexicon[value]), value
        assert len(occ.prompts[value]) >= 2
    for name in SHIPPED:
        vocab = load_vocabulary(name)
        assert vocab.none_prompts and all(vocab.lexicon[v] for v in vocab.values)
    assert load_vocabulary("age_group").values == ("child", "teenager", "adult", "senior")


def test_user_vocabulary_file(tmp_path):
    path = tmp_path / "pets.yaml"
    path.write_text("name: pet\nkind: label\nprompt_templates: ['a photo of {}.']\n"
                    "values:\n  cat: {phrase: a cat, lexicon: [cat, cats, kitten]}\n  dog: {lexicon: [dog]}\n")
    vocab = load_vocabulary(path)
    assert vocab.prompts["cat"] == ("a photo of a cat.",) and vocab.prompts["dog"] == ("a photo of dog.",)
    t = LexiconTagger.from_vocabularies([vocab])
    assert t.tag(["Kitten!", "hot dogs", "dog"]).column(source_tag_column("pet", "caption")).to_pylist() == ["cat", None, "dog"]
    path.write_text("name: pet\nvalues:\n  none: {lexicon: [x]}\n")
    with pytest.raises(ValueError, match="reserved"):
        load_vocabulary(path)


def test_tagger_on_a_chunked_arrow_column(tagger):
    out = tagger.tag(pa.chunked_array([["A nurse", None], ["he"]]))
    assert out.num_rows == 3
    assert out.column(OCC).to_pylist() == ["nurse", None, None]
    assert out.column(GENDER).to_pylist() == [None, None, "man"]
    large = tagger.tag(pa.array(["A nurse"], pa.large_string()))
    assert large.column(OCC).to_pylist() == ["nurse"]


# ---------------------------------------------------------------------------------------------
# Metadata matcher


def _brute_normalise(text: str) -> str:
    # independent of the implementation: ASCII only, punctuation padded, hyphen/underscore -> space
    text = re.sub(r"[-_]", " ", text.lower())
    text = re.sub(r"([^a-z0-9\s])", r" \1 ", text)
    return " " + " ".join(text.split()) + " "


def _brute_match(entries: list[str], captions: list[str | None]) -> list[list[int]]:
    padded = [" " + " ".join(_brute_normalise(e).split()) + " " for e in entries]
    out = []
    for c in captions:
        text = _brute_normalise(c or "")
        out.append([i for i, e in enumerate(padded) if e.strip() and e in text])
    return out


ENTRY_WORDS = ["new", "york", "city", "t", "shirt", "red", "car", "c", "+", "&", "rock", "roll", "a", "big", "apple"]


def _metadata_case(seed: int, n: int):
    rng = np.random.default_rng(seed)
    entries = ["new york", "york", "new york city", "t-shirt", "t shirt", "c++", "rock & roll", "red car",
               "big apple", "apple", "city", "a", "Red", "car rental"]
    captions = []
    for _ in range(n):
        words = rng.choice(ENTRY_WORDS + ["the", "on", "in"], size=rng.integers(0, 9))
        seps = rng.choice([" ", "  ", "-", ", ", "!"], size=len(words))
        captions.append("".join(w + s for w, s in zip(words, seps)) if rng.random() > 0.05 else None)
    return entries, captions


def test_metadata_matches_equal_brute_force():
    entries, captions = _metadata_case(3, 2000)
    matcher = MetadataMatcher(entries)
    got = matcher.match(captions)
    expected = _brute_match(entries, captions)
    assert got.to_pylist() == expected
    brute_counts = np.zeros(len(entries), np.int64)
    for ids in expected:
        brute_counts[ids] += 1
    np.testing.assert_array_equal(merge_entry_counts([entry_count_table(got)], matcher.num_entries), brute_counts)
    assert got.type == pa.list_(pa.int32())


def test_entry_counts_merge_across_shards():
    entries, captions = _metadata_case(4, 1500)
    matcher = MetadataMatcher(entries)
    shards = [captions[:400], captions[400:1100], captions[1100:]]
    tables = [entry_count_table(matcher.match(s)) for s in shards]
    whole = merge_entry_counts([entry_count_table(matcher.match(captions))], len(entries))
    np.testing.assert_array_equal(merge_entry_counts(tables, len(entries)), whole)
    assert all(t.column("count").to_numpy().min() > 0 for t in tables if t.num_rows)


def test_entry_keep_probability_matches_metaclip_rule():
    entries, captions = _metadata_case(5, 800)
    matcher = MetadataMatcher(entries)
    matched = matcher.match(captions)
    counts = merge_entry_counts([entry_count_table(matched)], len(entries))
    cap = 50
    got = keep_probability(pa.chunked_array([matched.slice(0, 300), matched.slice(300)]), *capped_entries(counts, cap), 0.25)
    for ids, p in zip(matched.to_pylist(), got):
        drop = np.prod([1 - cap / max(counts[e], cap) for e in ids]) if ids else None
        assert p == (0.25 if drop is None else pytest.approx(1 - drop, abs=1e-12))


def test_metadata_longest_only_and_file(tmp_path):
    path = tmp_path / "entries.txt"
    path.write_text("new york\n\n  york  \nnew york city\n#1\n")
    matcher = MetadataMatcher.from_file(path)
    assert matcher.entries == ["new york", "york", "new york city", "#1"]
    assert matcher.match(["New York City", "#1 fan"]).to_pylist() == [[0, 1, 2], [3]]
    longest = MetadataMatcher.from_file(path, longest_only=True)
    assert longest.match(["New York City", "york"]).to_pylist() == [[2], [1]]


def test_metadata_matcher_on_a_chunked_arrow_column():
    matcher = MetadataMatcher(["cat", "dog"])
    assert matcher.match(pa.chunked_array([["a Cat and a DOG"], [None]])).to_pylist() == [[0, 1], []]
