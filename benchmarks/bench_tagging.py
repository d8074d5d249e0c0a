"""Caption tagging benchmark (issues 5, 15): captions/s on one core for the shipped lexicons
(perceived gender, age group, occupations) with the chosen matcher against the alternatives,
and metadata matching with a large entry list.

    .venv/bin/python benchmarks/bench_tagging.py                   # 1M captions
    .venv/bin/python benchmarks/bench_tagging.py --rows 200000     # fewer
    .venv/bin/python benchmarks/bench_tagging.py --only-trie --baseline OLD.json   # compare with a run of older code

``trie`` is ``LexiconTagger.counts`` (the dense per-value matrix, the figure earlier runs
recorded); ``trie_tags`` is ``tag(hits=False)``, the tag column the scan uses; ``trie_coverage``
is ``tag_with_coverage``, what the scan runs per caption source (tags plus the untagged-words
summary). Load averages before and after are recorded: the machine is shared.

Matchers compared (all case-insensitive, whole-word):
- ``trie``: mmbalance.operators.lexicon (pyarrow tokenise + one hash lookup per token + a numpy
  trie walk), including negation and longest-match rules and per-value counts.
- ``re``: one compiled Python ``re`` alternation of all phrases (longest first), ``finditer`` per
  caption and a dict lookup per match (pyahocorasick is not installed in this environment).
- ``re2``: pyarrow ``count_substring_regex`` (RE2, vectorised), one alternation per value.
- ``polars_ac``: polars ``str.extract_many`` (Rust Aho-Corasick) on padded normalised text.
Only ``trie`` applies negation and longest-match rules; the others do strictly less work.

Writes benchmarks/results/tagging_<rows>.json. Captions: 6-16 words from a 5k-word Zipf
vocabulary with punctuation, one lexicon word planted in ~30% of them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.data import SHIPPED, load_vocabulary  # noqa: E402
from mmbalance.operators.lexicon import LexiconTagger  # noqa: E402
from mmbalance.operators.metaclip import MetadataMatcher  # noqa: E402
from mmbalance.operators.phrases import normalise  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)


def make_captions(rows: int, seed: int, planted: list[str]) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(5000)]
    vocab += ["a", "the", "of", "in", "with", "and", "on", "at", "photo", "image"]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    lengths = rng.integers(6, 17, size=rows)
    words = np.array(vocab, dtype=object)[rng.choice(len(vocab), size=lengths.sum(), p=p)]
    punct = np.array(["", "", "", "", ",", ".", "!", "'s", ":"], dtype=object)[rng.integers(9, size=lengths.sum())]
    tokens = (words + punct).tolist()
    plant = rng.random(rows) < 0.3
    plant_words = rng.choice(np.array(planted, dtype=object), size=rows)
    out, pos = [], 0
    for i, n in enumerate(lengths):
        ws = tokens[pos : pos + n]
        pos += n
        if plant[i]:
            ws[rng.integers(n)] = plant_words[i].title() if i % 3 == 0 else plant_words[i]
        out.append(" ".join(ws))
    return out


def bench(fn, captions: list[str], batch: int) -> tuple[float, object]:
    arr = pa.array(captions, pa.string())
    t = time.perf_counter()
    result = None
    for lo in range(0, len(captions), batch):
        result = fn(arr.slice(lo, batch), captions[lo : lo + batch])
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=16384, help="rows per Arrow batch (recipe batch_rows)")
    ap.add_argument("--slow-rows", type=int, default=None, help="rows for the re/re2 matchers (default: --rows)")
    ap.add_argument("--entries", type=int, default=50_000, help="metadata entries for the metadata benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--only-trie", action="store_true", help="skip the alternative matchers and metadata")
    ap.add_argument("--baseline", default=None, help="a JSON of an earlier run to record beside this one")
    ap.add_argument("--paired-with", default=None,
                    help="a copy of older code (e.g. git archive COMMIT mmbalance | tar -x -C DIR): time its tagger "
                         "and this one on the same batches, alternating, so load changes hit both alike")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if args.paired_with:
        return paired(args, load_before)

    vocabs = [load_vocabulary(n) for n in SHIPPED]
    phrase_value = {}
    for v in vocabs:
        for value in v.values:
            for phrase in v.lexicon[value]:
                phrase_value.setdefault((v.name, phrase.lower()), value)
    phrases = sorted({p for _, p in phrase_value}, key=len, reverse=True)
    t = time.perf_counter()
    captions = make_captions(args.rows, args.seed, phrases)
    gen_s = time.perf_counter() - t
    slow_rows = min(args.slow_rows or args.rows, args.rows)
    results: dict = {
        "rows": args.rows, "slow_rows": slow_rows, "batch": args.batch, "phrases": len(phrases),
        "values": sum(len(v.values) for v in vocabs), "generate_s": gen_s,
        "mean_caption_chars": float(np.mean([len(c) for c in captions[:10000]])),
        "python": platform.python_version(), "pyarrow": pa.__version__, "polars": pl.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(), "matchers": {},
    }

    t = time.perf_counter()
    tagger = LexiconTagger.from_vocabularies(vocabs)
    compile_s = time.perf_counter() - t
    secs, _ = bench(lambda arr, _c: tagger.counts(arr), captions, args.batch)
    results["matchers"]["trie"] = {"rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs, "compile_s": compile_s}
    print(f"trie: {args.rows / secs:,.0f} captions/s")

    # the same work without negation/longest-match, to show what the rules cost
    bare = LexiconTagger.from_vocabularies(vocabs, negation_window=0, longest_only=False)
    secs, _ = bench(lambda arr, _c: bare.counts(arr), captions, args.batch)
    results["matchers"]["trie_no_rules"] = {"rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs}
    print(f"trie (no rules): {args.rows / secs:,.0f} captions/s")

    secs, _ = bench(lambda arr, _c: tagger.tag(arr, hits=False), captions, args.batch)
    results["matchers"]["trie_tags"] = {"rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs}
    print(f"trie tags: {args.rows / secs:,.0f} captions/s")
    secs, _ = bench(lambda arr, _c: tagger.tag_with_coverage(arr), captions, args.batch)
    results["matchers"]["trie_coverage"] = {"rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs}
    print(f"trie tags + coverage: {args.rows / secs:,.0f} captions/s")
    if args.only_trie:
        return finish(args, results, load_before)

    body = "|".join(re.escape(p).replace(r"\ ", r"[\s_-]+") for p in phrases)
    regex = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)
    lookup: dict[str, list[tuple[str, str]]] = {}
    for (name, p), value in phrase_value.items():
        lookup.setdefault(p, []).append((name, value))

    def run_re(_arr, caps):
        out = []
        for c in caps:
            hits = []
            for m in regex.finditer(c):
                hits.extend(lookup.get(re.sub(r"[\s_-]+", " ", m.group(0).lower()), ()))
            out.append(hits)
        return out

    t = time.perf_counter()
    run_re(None, captions[:1000])
    results["matchers"]["re"] = {"compile_and_warm_s": time.perf_counter() - t}
    secs, _ = bench(run_re, captions[:slow_rows], args.batch)
    results["matchers"]["re"].update({"rows": slow_rows, "seconds": secs, "captions_per_s": slow_rows / secs})
    print(f"re: {slow_rows / secs:,.0f} captions/s")

    per_value = []
    for v in vocabs:
        for value in v.values:
            alts = "|".join(re.escape(p.lower()).replace(r"\ ", " ") for p in sorted(v.lexicon[value], key=len, reverse=True))
            if alts:
                per_value.append(rf"\b(?:{alts})\b")

    def run_re2(arr, _c):
        low = pc.utf8_lower(arr)
        return [pc.count_substring_regex(low, pat) for pat in per_value]

    secs, _ = bench(run_re2, captions[:slow_rows], args.batch)
    results["matchers"]["re2"] = {"rows": slow_rows, "seconds": secs, "captions_per_s": slow_rows / secs, "patterns": len(per_value)}
    print(f"re2: {slow_rows / secs:,.0f} captions/s")

    padded_phrases = sorted({f" {' '.join(normalise([p]).to_pylist()[0].split())} " for p in phrases})

    def run_polars(arr, _c):
        s = pl.Series(normalise(arr)).str.replace_all(r"\s+", " ")
        return (" " + s + " ").str.extract_many(padded_phrases, overlapping=True)

    secs, _ = bench(run_polars, captions, args.batch)
    results["matchers"]["polars_ac"] = {"rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs,
                                        "note": "matched phrase strings only; no per-value counts, rules or positions"}
    print(f"polars_ac: {args.rows / secs:,.0f} captions/s")

    # metadata: many entries (unigrams of the caption vocabulary plus random bigrams)
    rng = np.random.default_rng(args.seed + 1)
    words = sorted({w.strip(",.!:'s") for c in captions[:20000] for w in c.lower().split()} - {""})
    uni = list(rng.choice(words, size=min(len(words), args.entries // 2), replace=False))
    bi = [f"{a} {b}" for a, b in zip(rng.choice(words, args.entries - len(uni)), rng.choice(words, args.entries - len(uni)))]
    entries = uni + bi
    t = time.perf_counter()
    matcher = MetadataMatcher(entries)
    compile_s = time.perf_counter() - t
    secs, last = bench(lambda arr, _c: matcher.match(arr), captions, args.batch)
    results["metadata"] = {"entries": len(entries), "rows": args.rows, "seconds": secs, "captions_per_s": args.rows / secs,
                           "compile_s": compile_s, "mean_matches_last_batch": float(pc.mean(pc.list_value_length(last)).as_py())}
    print(f"metadata ({len(entries)} entries): {args.rows / secs:,.0f} captions/s (compile {compile_s:.1f} s)")

    finish(args, results, load_before)


def paired(args, load_before) -> None:
    """Old and new taggers on the same caption batches, alternating (order rotated per batch).

    Variants, each over all batches: ``old_counts`` / ``new_counts`` (one tagger of the three
    vocabularies, dense counts: the figure earlier runs recorded); ``old_scan`` (what the scan ran
    before: one tagger per caption source, ``tag``) and ``new_scan`` (one tagger per source,
    ``tag_with_coverage``: tags plus the untagged-words summary); ``new_scan_no_coverage``.
    """
    import importlib.util

    root = Path(args.paired_with)
    spec = importlib.util.spec_from_file_location("old_lexicon", root / "mmbalance" / "operators" / "lexicon.py")
    old_lexicon = importlib.util.module_from_spec(spec)
    sys.modules["old_lexicon"] = old_lexicon  # dataclasses look their module up there
    spec.loader.exec_module(old_lexicon)
    new_vocabs = [load_vocabulary(n) for n in SHIPPED]
    old_vocabs = [load_vocabulary(root / "mmbalance" / "data" / f"{n}.yaml") for n in SHIPPED]
    phrases = sorted({p.lower() for v in new_vocabs for value in v.values for p in v.lexicon[value]}, key=len, reverse=True)
    captions = make_captions(args.rows, args.seed, phrases)
    arr = pa.array(captions, pa.string())
    old_one = old_lexicon.LexiconTagger.from_vocabularies(old_vocabs)
    new_one = LexiconTagger.from_vocabularies(new_vocabs)
    old_each = [old_lexicon.LexiconTagger.from_vocabularies([v]) for v in old_vocabs]
    new_each = [LexiconTagger.from_vocabularies([v]) for v in new_vocabs]
    variants = {
        "old_counts": lambda b: old_one.counts(b),
        "new_counts": lambda b: new_one.counts(b),
        "old_scan": lambda b: [t.tag(b) for t in old_each],
        "new_scan_no_coverage": lambda b: [t.tag(b, hits=False) for t in new_each],
        "new_scan": lambda b: [t.tag_with_coverage(b) for t in new_each],
    }
    seconds = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for i, lo in enumerate(range(0, args.rows, args.batch)):
        batch = arr.slice(lo, args.batch)
        for name in names[i % len(names):] + names[: i % len(names)]:
            t = time.perf_counter()
            variants[name](batch)
            seconds[name] += time.perf_counter() - t
    results = {
        "mode": "paired", "rows": args.rows, "batch": args.batch, "older_code": str(root),
        "phrases_new": len(phrases), "values_new": sum(len(v.values) for v in new_vocabs),
        "values_old": sum(len(v.values) for v in old_vocabs),
        "phrases_old": len({p.lower() for v in old_vocabs for value in v.values for p in v.lexicon[value]}),
        "python": platform.python_version(), "pyarrow": pa.__version__, "cpus": os.cpu_count(),
        "captions_per_s": {k: args.rows / v for k, v in seconds.items()},
        "new_vs_old": {"counts": seconds["old_counts"] / seconds["new_counts"],
                       "scan": seconds["old_scan"] / seconds["new_scan"],
                       "scan_no_coverage": seconds["old_scan"] / seconds["new_scan_no_coverage"]},
    }
    for k, v in results["captions_per_s"].items():
        print(f"{k}: {v:,.0f} captions/s")
    print("new/old throughput:", {k: round(v, 3) for k, v in results["new_vs_old"].items()})
    results["loadavg_before"], results["loadavg_after"] = list(load_before), list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tagging_paired_{args.rows}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


def finish(args, results: dict, load_before) -> None:
    results["loadavg_before"], results["loadavg_after"] = list(load_before), list(os.getloadavg())
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        results["baseline"] = base
        ref = base["matchers"]["trie"]["captions_per_s"]
        results["vs_baseline_trie"] = {k: v["captions_per_s"] / ref for k, v in results["matchers"].items()
                                       if k.startswith("trie") and "captions_per_s" in v}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tagging_{args.rows}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
