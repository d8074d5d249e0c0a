"""The tagging audit: counts that merge across shards by summing (rows tagged and prevalence per
source, joint counts per pair of sources, for agreement and Cohen's kappa) and a bottom-k uid
sample per value that merges exactly across shards."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.hashing import audit_priority

NULL_KEY = "<null>"  # JSON-friendly key for untagged rows


def _value_counts(tags: pa.Array) -> dict[str, int]:
    out = {}
    for item in pc.value_counts(tags).to_pylist():
        out[NULL_KEY if item["values"] is None else item["values"]] = int(item["counts"])
    return out


def audit_counts(tags: Mapping[str, pa.Array | pa.ChunkedArray]) -> dict:
    """Mergeable counts for one shard: rows; per source the rows per value (``<null>`` untagged);
    per pair of sources the joint counts of their values where both tagged.

    ``tags`` maps source names (e.g. ``image``, ``text``, ``caption``, ``combined``) to tag arrays.
    """
    arrays = {k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v) for k, v in tags.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError("all tag arrays must have the same length")
    out = {"rows": lengths.pop() if lengths else 0, "values": {}, "joint": {}}
    names = list(arrays)
    for name in names:
        out["values"][name] = _value_counts(arrays[name])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = pc.and_(arrays[a].is_valid(), arrays[b].is_valid())
            pairs = pa.table({"a": arrays[a].filter(both), "b": arrays[b].filter(both)})
            joint: dict[str, dict[str, int]] = {}
            for item in pairs.group_by(["a", "b"]).aggregate([([], "count_all")]).to_pylist():
                joint.setdefault(item["a"], {})[item["b"]] = int(item["count_all"])
            out["joint"][f"{a}|{b}"] = joint
    return out


def merge_audit(a: dict, b: dict) -> dict:
    """Sum two ``audit_counts`` results (or any nested dicts of ints)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = merge_audit(a.get(k, {}), v)
        else:
            out[k] = a.get(k, 0) + v
    return out


def summarise_audit(counts: dict) -> dict:
    """Prevalence per value among tagged rows, rows tagged per source, and per pair of sources the
    agreement rate and Cohen's kappa on rows both tagged."""
    rows = counts["rows"]
    out: dict = {"rows": rows, "sources": {}, "agreement": {}}
    for source, vc in counts["values"].items():
        tagged = sum(c for v, c in vc.items() if v != NULL_KEY)
        out["sources"][source] = {
            "tagged": tagged,
            "tagged_share": tagged / rows if rows else 0.0,
            "prevalence": {v: c / tagged for v, c in sorted(vc.items()) if v != NULL_KEY} if tagged else {},
            "counts": dict(sorted(vc.items())),
        }
    for pair, joint in counts["joint"].items():
        total = sum(c for row in joint.values() for c in row.values())
        agree = sum(row.get(v, 0) for v, row in joint.items())
        pa_ = {v: sum(row.values()) / total for v, row in joint.items()} if total else {}
        pb: dict[str, float] = {}
        for row in joint.values():
            for v, c in row.items():
                pb[v] = pb.get(v, 0.0) + c / total
        expected = sum(pa_.get(v, 0.0) * pb.get(v, 0.0) for v in set(pa_) | set(pb))
        observed = agree / total if total else float("nan")
        kappa = (observed - expected) / (1 - expected) if total and expected < 1 else float("nan")
        out["agreement"][pair] = {"both_tagged": total, "agreement": observed, "kappa": kappa, "confusion": joint}
    return out


def sample_uids(uids: pa.Array | pa.ChunkedArray, tags: pa.Array | pa.ChunkedArray, per_value: int, seed: int) -> dict[str, list[tuple[int, str]]]:
    """Per value, the ``per_value`` uids with the smallest seeded hash: (hash, uid) pairs.

    A bottom-k sample: merging shards' samples with ``merge_uid_samples`` gives exactly the sample
    of the whole corpus, whatever the sharding, and the same uids on every rerun with the seed.
    """
    uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    tags = tags.combine_chunks() if isinstance(tags, pa.ChunkedArray) else tags
    h = audit_priority(uids, seed)
    # one sort for all values (a vocabulary can have hundreds): by value, then hash, then row
    encoded = pc.dictionary_encode(pc.cast(tags, pa.string()))
    code = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((np.arange(len(code)), h, code))
    order = order[code[order] >= 0]
    starts = np.flatnonzero(np.r_[True, code[order][1:] != code[order][:-1]]) if len(order) else order
    names = encoded.dictionary.to_pylist()
    out: dict[str, list[tuple[int, str]]] = {}
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
        pick = order[lo : min(hi, lo + per_value)]
        out[names[code[order[lo]]]] = [(int(h[i]), u) for i, u in zip(pick, uids.take(pa.array(pick)).to_pylist())]
    return out


def merge_uid_samples(samples: Sequence[dict[str, list[tuple[int, str]]]], per_value: int) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for s in samples:
        for v, items in s.items():
            out.setdefault(v, []).extend(items)
    return {v: sorted(set(map(tuple, items)))[:per_value] for v, items in sorted(out.items())}
