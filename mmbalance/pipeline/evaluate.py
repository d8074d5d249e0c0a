"""``mmbalance evaluate``: a trained checkpoint's bias and quality on a labelled evaluation set.

    discover + inspect   the set's Parquet files, checked with the corpus' column rules
    scan                 row checks (the corpus' reasons) -> OUT/tags/, OUT/rejects/validate/
    embed                the embed stage itself (same function, same actor pool on Ray) ->
                         OUT/embeddings/, OUT/rejects/embed/, done markers (a rerun skips finished shards)
    figures              prompts through the text tower once, predictions, metrics, bootstrap
                         -> OUT/evaluate.json, OUT/prompts.parquet, OUT/evaluate.html

Small sets run the embed stage in this process; from ``execution.ray_min_images`` images on, on the
embed stage's Ray actor pool. ``compare`` evaluates several checkpoints of one model, each in
OUT/<name>/, on the images every one of them embedded, and puts them side by side with paired
differences (docs/algorithms.md section 9).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.arrays import embedding_matrix
from mmbalance.operators.evaluate import figures as figs
from mmbalance.operators.evaluate.scoring import build_plans
from mmbalance.operators.source import read_batches
from mmbalance.operators.validate import validate_rows
from mmbalance.operators.zero_shot import model_scoring
from mmbalance.pipeline import stages
from mmbalance.pipeline.executor import LocalExecutor, RayExecutor, ray_session
from mmbalance.pipeline.fingerprint import shard_fingerprints
from mmbalance.pipeline.progress import StageProgress
from mmbalance.pipeline.shards import check_output_location, discover_shards, inspect_shards
from mmbalance.pipeline.store import RunStore
from mmbalance.schemas.contract import REJECTS_SCHEMA, InputError, tag_column
from mmbalance.schemas.evaluate import EvalRecipe

SCHEMA = "mmbalance.evaluate/1"
COMPARE_SCHEMA = "mmbalance.evaluate.compare/1"
RECORD = "evaluate_run.json"  # what the embeddings in OUT were made from: a mismatch clears them


@dataclass
class EvaluateOptions:
    executor: str | None = None  # local | ray | auto; overrides execution.executor
    address: str | None = None
    num_cpus: int | None = None
    overwrite: bool = False
    html: bool = True
    show_progress: bool = False
    # compare: (name, checkpoint) per model, the first is the baseline; None: the recipe's model
    checkpoints: list[tuple[str, str]] | None = None


@dataclass
class ScannedSet:
    """The rows of the evaluation set that passed the row checks, in (shard, row) order."""

    shards: list  # pipeline.shards.Shard with num_rows
    tags: dict[str, pa.Table] = field(default_factory=dict)  # shard_id -> row, uid, tag.<name>
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""


def _label_rejects(table: pa.Table, recipe: EvalRecipe, valid: np.ndarray) -> tuple[np.ndarray, list]:
    """Rows whose label value is not among a label's declared values (reason per row)."""
    bad, reasons = np.zeros(table.num_rows, bool), [None] * table.num_rows
    for lab in (lab for lab in recipe.labels if lab.values is not None):
        values = pc.cast(table.column(lab.source_column), pa.string())
        known = pc.fill_null(pc.is_in(values, value_set=pa.array(lab.values, pa.string())), True).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~known & valid & ~bad):
            reasons[i] = f"label {lab.name}: value {values[int(i)].as_py()!r} (column '{lab.source_column}') not in {lab.values}"
        bad |= ~known & valid
    return bad, reasons


def scan(eval_path: str, recipe: EvalRecipe, out: RunStore) -> ScannedSet:
    """Discover, inspect and check every row; the rows kept go to OUT/tags/, the others (with the
    corpus' reasons, duplicates of an earlier uid too) to OUT/rejects/validate/."""
    corpus = recipe.corpus_recipe()
    fs, shards = discover_shards(eval_path, recipe.eval.extensions)
    shards = [i.shard for i in inspect_shards(fs, shards, corpus)]
    cols = recipe.eval.columns
    names = [(a.name, a.source_column) for a in recipe.attributes] + [(lab.name, lab.source_column) for lab in recipe.labels]
    read = list(dict.fromkeys([cols.uid, *(c for _, c in names), *([cols.caption] if cols.caption else [])]))
    result = ScannedSet(shards, fingerprint=hashlib.sha256(json.dumps(shard_fingerprints(fs, shards), sort_keys=True).encode()).hexdigest()[:16])
    seen: dict[str, tuple[str, int]] = {}
    for shard in shards:
        parts, rejects, offset = [], [], 0
        with fs.open_input_file(shard.path) as handle:
            for table in read_batches(handle, shard.relpath, read, recipe.execution.batch_rows, recipe.execution.verify_checksums):
                checked = validate_rows(table, corpus, {}, shard.relpath, offset)
                valid = checked.valid.copy()
                bad, reasons = _label_rejects(table, recipe, valid)
                uids = pc.cast(table.column(cols.uid), pa.string()).to_pylist()
                for i in np.flatnonzero(valid & ~bad):
                    first = seen.setdefault(uids[i], (shard.relpath, offset + int(i)))
                    if first != (shard.relpath, offset + int(i)):
                        bad[i], reasons[i] = True, f"duplicate uid (first in {first[0]} row {first[1]})"
                extra = np.flatnonzero(bad)
                if len(extra):
                    rejects.append(pa.table({"uid": [uids[i] for i in extra], "shard": [shard.relpath] * len(extra),
                                             "row": pa.array(extra + offset, pa.int64()), "stage": ["validate"] * len(extra),
                                             "reason": [reasons[i] for i in extra]}, schema=REJECTS_SCHEMA))
                rejects.append(checked.rejects)
                keep = np.flatnonzero(valid & ~bad)
                data = {"row": pa.array(keep + offset, pa.int64()), "uid": pa.array([uids[i] for i in keep], pa.string())}
                for name, column in names:
                    data[tag_column(name)] = pc.cast(table.column(column), pa.string()).take(pa.array(keep, pa.int64()))
                parts.append(pa.table(data))
                offset += table.num_rows
        all_rejects = pa.concat_tables(rejects) if rejects else REJECTS_SCHEMA.empty_table()
        for reason in all_rejects.column("reason").to_pylist():
            key = reason.split(":")[0] if reason.startswith(("attribute", "label")) else reason.split(" (")[0]
            result.rejected[key] = result.rejected.get(key, 0) + 1
        out.write_table("rejects", "validate", f"{shard.shard_id}.parquet", table=all_rejects)
        result.tags[shard.shard_id] = pa.concat_tables(parts) if parts else pa.table({"row": pa.array([], pa.int64())})
        result.rows += shard.num_rows
    _check_neutral(recipe, result, eval_path)
    return result


def _check_neutral(recipe: EvalRecipe, scanned: ScannedSet, eval_path: str) -> None:
    kept = sum(t.num_rows for t in scanned.tags.values())
    if not kept:
        raise InputError(f"{eval_path}: no row passed the checks ({scanned.rows} rows, all rejected: "
                         f"{', '.join(sorted(scanned.rejected))}); see rejects/validate/")
    for a in recipe.attributes:
        neutral = sum(t.column(tag_column(a.name)).null_count for t in scanned.tags.values())
        if neutral == 0:
            raise InputError(f"{eval_path}: no neutral images for attribute '{a.name}': RB and AB are measured on images "
                             f"whose column '{a.source_column}' is null (no cue); add such images to the set")


def label_values(recipe: EvalRecipe, scanned: ScannedSet) -> dict[str, list[str]]:
    """Each label's classes: declared, else the values the set has (sorted); every one needs prompts."""
    out = {}
    for lab in recipe.labels:
        if lab.values is not None:
            out[lab.name] = list(lab.values)
            continue
        seen = set()
        for t in scanned.tags.values():
            seen.update(v for v in pc.unique(t.column(tag_column(lab.name))).to_pylist() if v is not None)
        if not seen:
            raise InputError(f"label '{lab.name}': column '{lab.source_column}' has no values in the evaluation set")
        out[lab.name] = sorted(seen)
        try:
            lab.check_prompts(out[lab.name])
        except ValueError as err:
            raise InputError(f"labels.{lab.name}: {err}") from None
    return out


# -- one model --------------------------------------------------------------------------------------


def load_bundle(spec):
    """The embed stage's cached model for this spec; any failure is one line naming what to change."""
    try:
        return stages._embed_bundle(spec.model_dump_json())
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - a bad name, file, checkpoint or config: the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].removeprefix("embed.pretrained: ")
        weights = f" with checkpoint {spec.pretrained}" if spec.pretrained else ""
        raise InputError(f"model: cannot load '{spec.model}'{weights} ({first[:300]}); check model.name and "
                         "model.checkpoint/pretrained") from None


def _record_info(bundle) -> dict[str, Any]:
    return {k: v for k, v in bundle.info.items() if k not in ("precision", "device", "image_decode")}


def embed_set(store: RunStore, eval_path: str, recipe: EvalRecipe, scanned: ScannedSet, spec, info: dict,
              executor, show_progress: bool) -> float:
    """Run the embed stage over the kept rows of every shard into ``store`` (finished shards with
    intact outputs are skipped); returns its wall seconds."""
    from mmbalance.schemas.embed import embedding_identity

    record = {"embed_identity": embedding_identity(info), "input": scanned.fingerprint,
              "columns": recipe.corpus_recipe().input.columns.model_dump(), "rows": _rows_digest(scanned)}
    if store.exists(RECORD) and store.read_json(RECORD) != record:
        for part in ("embeddings", ("rejects", "embed"), ("_done", "embed")):
            part = (part,) if isinstance(part, str) else part
            if store.exists(*part):
                store.fs.delete_dir(store.path(*part))
    for shard_id, tags in scanned.tags.items():
        if not store.exists("tags", f"{shard_id}.parquet") or not store.read_table("tags", f"{shard_id}.parquet").equals(tags):
            store.write_table("tags", f"{shard_id}.parquet", table=tags)
    store.write_json(RECORD, obj=record)
    corpus = recipe.corpus_recipe().model_copy(update={"embed": spec})
    ctx = stages.RunContext(eval_path, store.uri, corpus, (), ())
    tasks = [{"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "embed_info": info, stages.UNIT: s.shard_id}
             for s in scanned.shards]
    rows = {s.shard_id: scanned.tags[s.shard_id].num_rows for s in scanned.shards}
    done = store.verified_keys("embed", [t["shard_id"] for t in tasks])
    todo = [t for t in tasks if t["shard_id"] not in done]
    resources = {"actors": spec.actors, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus} if isinstance(executor, RayExecutor) else {}
    start = time.perf_counter()
    with StageProgress("embed", len(tasks), sum(rows.values()), enabled=show_progress) as bar:
        bar.skip(len(tasks) - len(todo), sum(rows[k] for k in done))
        for summary in executor.map(functools.partial(stages.embed_shard_stage, ctx), todo, **resources):
            bar.advance(1, rows.get(summary["shard_id"], 0))
    return time.perf_counter() - start


def _rows_digest(scanned: ScannedSet) -> str:
    h = hashlib.sha256()
    for shard_id in sorted(scanned.tags):
        h.update(shard_id.encode())
        h.update(np.asarray(scanned.tags[shard_id].column("row").to_numpy(), np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Embedded:
    """The rows one model embedded, in (shard, row) order, with their tags as strings."""

    keys: list[tuple[str, int]]  # (shard relpath, row)
    uids: list[str]
    image: np.ndarray  # (n, d) float32 from the sidecar's unit float16
    text: np.ndarray | None  # (n, d), zero where a row has no caption
    has_text: np.ndarray | None
    tags: dict[str, pa.ChunkedArray]  # attribute/label name -> values (null: neutral / no label)
    rejected: dict[str, int]  # the embed stage's rejects by reason

    def subset(self, keep: np.ndarray) -> "Embedded":
        pick = np.flatnonzero(keep)
        return Embedded([self.keys[i] for i in pick], [self.uids[i] for i in pick], self.image[pick],
                        None if self.text is None else self.text[pick], None if self.has_text is None else self.has_text[pick],
                        {k: v.take(pa.array(pick, pa.int64())) for k, v in self.tags.items()}, self.rejected)

    def eval_data(self, recipe: EvalRecipe, values: dict[str, list[str]]) -> figs.EvalData:
        return figs.EvalData(self.uids, self.image, {a.name: _codes(self.tags[a.name], list(a.values)) for a in recipe.attributes},
                             {lab.name: _codes(self.tags[lab.name], values[lab.name]) for lab in recipe.labels},
                             self.text, self.has_text)


def read_embedded(store: RunStore, recipe: EvalRecipe, scanned: ScannedSet) -> Embedded:
    """The embed stage's sidecars joined with the scanned tags."""
    names = [a.name for a in recipe.attributes] + [lab.name for lab in recipe.labels]
    keys, uids, images, texts, has_text, cols = [], [], [], [], [], {n: [] for n in names}
    rejected: dict[str, int] = {}
    for shard in scanned.shards:
        tags = scanned.tags[shard.shard_id]
        side = store.read_table("embeddings", f"{shard.shard_id}.parquet")
        if store.exists("rejects", "embed", f"{shard.shard_id}.parquet"):
            for reason in store.read_table("rejects", "embed", f"{shard.shard_id}.parquet").column("reason").to_pylist():
                rejected[reason.split(" (")[0]] = rejected.get(reason.split(" (")[0], 0) + 1
        image, ok = embedding_matrix(side.column("image_emb"))
        side, image = side.filter(pa.array(ok)), image[ok]
        position = pc.index_in(side.column("row"), value_set=tags.column("row"))
        picked = tags.take(position)
        uids += picked.column("uid").to_pylist()
        keys += [(shard.relpath, int(r)) for r in side.column("row").to_pylist()]
        images.append(np.asarray(image, np.float32))
        if recipe.eval.columns.caption:
            text, tok = embedding_matrix(side.column("text_emb"))
            texts.append(np.where(tok[:, None], np.asarray(text, np.float32), 0.0) if text.shape[1] else np.zeros_like(images[-1]))
            has_text.append(tok)
        for name in names:
            cols[name].append(picked.column(tag_column(name)).combine_chunks())
    dim = images[0].shape[1] if images else 0
    return Embedded(keys, uids, np.concatenate(images) if images else np.zeros((0, dim), np.float32),
                    np.concatenate(texts) if texts else None, np.concatenate(has_text) if has_text else None,
                    {n: pa.chunked_array(c, pa.string()) for n, c in cols.items()}, rejected)


def _codes(values: pa.ChunkedArray, classes: list[str]) -> np.ndarray:
    """Class index per row, -1 for null."""
    codes = pc.fill_null(pc.index_in(values, value_set=pa.array(classes, pa.string())), -1)
    return np.asarray(codes.to_numpy() if isinstance(codes, pa.ChunkedArray) else codes, np.int64)


def model_plans(store: RunStore, recipe: EvalRecipe, values: dict[str, list[str]], bundle):
    """Every prompt through the model's text tower once (-> OUT/prompts.parquet); the plans and scoring."""
    try:
        scoring = model_scoring(bundle.model, recipe.model.scoring)
    except ValueError as err:
        raise InputError(f"model.scoring: {err}") from None
    attributes, labels, prompts = build_plans(recipe, values, bundle.encode_texts, scoring)
    store.write_table("prompts.parquet", table=prompts)
    return attributes, labels, scoring


def evaluate_model(recipe: EvalRecipe, data: figs.EvalData, plans, info: dict, eval_doc: dict) -> tuple[dict, dict]:
    """Predictions, figures and intervals of one model -> (evaluate.json, replicates)."""
    attributes, labels, scoring = plans
    evaluation = figs.Evaluation(data, attributes, labels, recipe.model.temperature, recipe.seed,
                                 recipe.retrieval.k, recipe.retrieval.recall_k)
    body, reps = figs.estimate(evaluation, recipe.bootstrap.samples, recipe.bootstrap.confidence, recipe.seed)
    doc = {
        "schema": SCHEMA,
        "model": {**info, **scoring, "temperature": recipe.model.temperature if scoring["scoring"] == "softmax" else None},
        "eval": {**eval_doc, "images": data.n},
        "settings": {"seed": recipe.seed, "bootstrap": {**recipe.bootstrap.model_dump(), "resample": "images"},
                     "retrieval": recipe.retrieval.model_dump()},
        "attributes": body.get("attributes", {}), "labels": body.get("labels", {}),
        "retrieval": body.get("retrieval"),
    }
    return doc, reps


# -- the command -----------------------------------------------------------------------------------


def _executor(recipe: EvalRecipe, options: EvaluateOptions, images: int) -> str:
    choice = options.executor or recipe.execution.executor
    if choice == "auto":
        return "ray" if images >= recipe.execution.ray_min_images else "local"
    return choice


def model_names(checkpoints: list[str]) -> list[tuple[str, str]]:
    """(name, checkpoint) per ``NAME=PATH`` or ``PATH``; a bare path is named by its run and file
    (open_clip_train's logs/<run>/checkpoints/epoch_4.pt -> <run>-epoch_4); names are made unique."""
    out: list[tuple[str, str]] = []
    for item in checkpoints:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or not name or os.path.exists(item):
            path = item
            parts = [p for p in re.split(r"[\\/]", path) if p and p != "checkpoints"]
            name = "-".join(parts[-2:])
            name = re.sub(r"\.(pt|pth|bin|safetensors|npz)$", "", name) or "model"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        base, i = name, 2
        while name in {n for n, _ in out}:
            name, i = f"{base}-{i}", i + 1
        out.append((name, path))
    return out


def evaluate(eval_path: str, out: str, recipe: EvalRecipe, options: EvaluateOptions | None = None) -> dict:
    """Evaluate the recipe's model (or, with ``options.checkpoints``, compare several checkpoints);
    returns the evaluate.json written to ``out``."""
    options = options or EvaluateOptions()
    store = RunStore(out)
    check_output_location(eval_path, out)
    ours = store.exists(RECORD) or store.exists("compare.json")
    if store.exists() and not ours and not options.overwrite and _has_entries(store):
        raise InputError(f"{out}: output directory is not empty and holds no evaluation; choose another --out or pass --overwrite")
    with store.lock():
        if options.overwrite:
            store.clear()
        return _locked(eval_path, store, recipe, options)


def _has_entries(store: RunStore) -> bool:
    import pyarrow.fs as pafs

    return any(not i.base_name.startswith(".") for i in store.fs.get_file_info(pafs.FileSelector(store.root)))


def _locked(eval_path: str, store: RunStore, recipe: EvalRecipe, options: EvaluateOptions) -> dict:
    t0 = time.perf_counter()
    scanned = scan(eval_path, recipe, store)
    values = label_values(recipe, scanned)
    seconds = {"scan": time.perf_counter() - t0}
    compare = options.checkpoints is not None
    runs = options.checkpoints or [("model", None)]
    kind = _executor(recipe, options, sum(t.num_rows for t in scanned.tags.values()))
    models = []  # (name, checkpoint, store, info, plans, embedded): one model in memory at a time
    with ray_session(options.address or recipe.execution.address, options.num_cpus or recipe.execution.num_cpus) \
            if kind == "ray" else contextlib.nullcontext():
        executor = RayExecutor() if kind == "ray" else LocalExecutor()
        for name, checkpoint in runs:
            sub = RunStore(store.path(name)) if compare else store
            spec = recipe.model.embed_spec(checkpoint)
            t1 = time.perf_counter()
            bundle = load_bundle(spec)
            info = _record_info(bundle)
            seconds[f"load:{name}"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            embed_set(sub, eval_path, recipe, scanned, spec, info, executor, options.show_progress)
            seconds[f"embed:{name}"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            plans = model_plans(sub, recipe, values, bundle)
            seconds[f"prompts:{name}"] = time.perf_counter() - t1
            models.append((name, checkpoint, sub, info, plans, read_embedded(sub, recipe, scanned)))
    common = set.intersection(*(set(m[5].keys) for m in models))  # compare: images every model embedded
    docs = []
    for name, checkpoint, sub, info, plans, embedded in models:
        t1 = time.perf_counter()
        kept = embedded.subset(np.array([k in common for k in embedded.keys], bool))
        reasons = dict(scanned.rejected)
        for reason, count in embedded.rejected.items():
            reasons[reason] = reasons.get(reason, 0) + count
        if len(embedded.keys) > len(kept.keys):
            reasons["not embedded by every compared model"] = len(embedded.keys) - len(kept.keys)
        eval_doc = {"path": eval_path, "shards": len(scanned.shards), "rows": scanned.rows,
                    "rejected": scanned.rows - len(kept.keys), "rejected_by_reason": dict(sorted(reasons.items())),
                    "captions": int(kept.has_text.sum()) if kept.has_text is not None else 0}
        doc, reps = evaluate_model(recipe, kept.eval_data(recipe, values), plans, info, eval_doc)
        seconds[f"figures:{name}"] = time.perf_counter() - t1
        sub.write_json("evaluate.json", obj=doc)
        if options.html:
            from mmbalance.operators.evaluate.render import write_html

            t1 = time.perf_counter()
            write_html(sub, doc)
            seconds[f"html:{name}"] = time.perf_counter() - t1
        docs.append((name, checkpoint, doc, reps))
    store.write_json("stats.json", obj={"seconds": {k: round(v, 3) for k, v in seconds.items()}, "executor": kind})
    if not compare:
        return docs[0][2]
    return _write_compare(store, recipe, docs, options.html)


def _write_compare(store: RunStore, recipe: EvalRecipe, docs: list, html: bool) -> dict:
    base_name, _, base_doc, base_reps = docs[0]
    doc = {
        "schema": COMPARE_SCHEMA, "baseline": base_name,
        "models": {name: {"checkpoint": ckpt, "dir": name, "result": d} for name, ckpt, d, _ in docs},
        "differences": {name: figs.differences((base_doc, base_reps), (d, reps), recipe.bootstrap.confidence)
                        for name, _, d, reps in docs[1:]},
    }
    store.write_json("evaluate.json", obj=doc)
    store.write_json("compare.json", obj={"models": [n for n, *_ in docs]})
    if html:
        from mmbalance.operators.evaluate.render import write_compare_html

        write_compare_html(store, doc)
    return doc
