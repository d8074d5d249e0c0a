"""Held-out corpora for tests: the recipe's layout, written without ``mmbalance synth``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HELD_OUT_OCCUPATIONS = {  # not synth's list: a different vocabulary, skew and association
    "welder": (0.30, 0.05), "midwife": (0.02, 0.97), "architect": (0.12, 0.35), "judge": (0.05, 0.40),
    "barista": (0.20, 0.55), "astronaut": (0.01, 0.25), "plumber": (0.15, 0.04), "florist": (0.05, 0.85),
    "surgeon": (0.06, 0.30), "tailor": (0.04, 0.50),
}


def held_out_table(rows: int, seed: int, dim: int = 16, uid_prefix: str = "h", fixed_size: bool = False) -> pa.Table:
    """Rows in the recipe's layout (uid, caption, image_emb, text_emb, gender, occupation)."""
    rng = np.random.default_rng(seed)
    names = list(HELD_OUT_OCCUPATIONS)
    shares = np.array([v[0] for v in HELD_OUT_OCCUPATIONS.values()])
    occ = rng.choice(len(names), size=rows, p=shares / shares.sum())
    p_woman = np.array([v[1] for v in HELD_OUT_OCCUPATIONS.values()])[occ]
    person = rng.random(rows) > 0.2
    woman = rng.random(rows) < p_woman
    gender = [("woman" if w else "man") if p else None for p, w in zip(person, woman)]
    img = rng.normal(size=(rows, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(rows, dim)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    def emb(m: np.ndarray) -> pa.Array:
        if fixed_size:
            return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1).astype(np.float16)), dim)
        return pa.array(list(m), pa.list_(pa.float32()))

    return pa.table(
        {
            "uid": [f"{uid_prefix}{seed}-{i}" for i in range(rows)],
            "caption": [f"{names[o]} at work, photo {i}" for i, o in enumerate(occ)],
            "image_emb": emb(img),
            "text_emb": emb(txt),
            "gender": pa.array(gender, pa.string()),
            "occupation": [names[o] for o in occ],
        }
    )


RECIPE_FROM_ISSUE = """\
input:
  path: corpus/
  columns: {uid: uid, caption: caption, image_embedding: image_emb, text_embedding: text_emb}
attributes:                 # sensitive attributes s
  - {name: gender, source: column, column: gender, values: [woman, man]}   # null = no person
labels:                     # concept labels y (one-hot over the values seen)
  - {name: occupation, source: column, column: occupation}
balance:
  method: cap               # MetaCLIP-style per-value cap; other methods come in other issues
  by: occupation
  cap: 1000
export:
  seed: 0
  formats: [parquet]
"""


def write_shards(directory: Path, tables: dict[str, pa.Table]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=1000)
    return directory


def write_with_flipped_byte(path: Path, table: pa.Table, column: str, **kw) -> None:
    """``table`` written with page CRCs (uncompressed and plain, so a flip leaves a readable but
    wrong value) and the last byte of ``column``'s last row group flipped: a byte inside a data page
    of that column, whose CRC then no longer matches. Unverified, it reads back wrong without an error."""
    pq.write_table(table, path, compression="none", use_dictionary=False, write_page_checksum=True, **kw)
    meta = pq.read_metadata(path)
    group = meta.row_group(meta.num_row_groups - 1)
    chunk = next(group.column(j) for j in range(group.num_columns)  # a nested column's leaf: emb.list.element
                 if group.column(j).path_in_schema == column or group.column(j).path_in_schema.startswith(column + "."))
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 1] ^= 0x01
    path.write_bytes(bytes(data))
    assert not pq.read_table(path, columns=[column]).column(column).equals(table.column(column))


# A random-init open_clip model small enough for tests: 2-layer towers, 64 wide, 32 px images.
TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}


# open_clip's SigLIP layout (CustomTextCLIP, learned logit_bias, non-causal text tower pooled at the
# last token), tiny and random; no hf_tokenizer_name: open_clip's bundled CLIP tokenizer, offline
TINY_SIGLIP = {
    "model_cfg": {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
    },
    "preprocess_cfg": {},
}


def tiny_open_clip_dir(directory: Path) -> Path:
    """A ``local-dir:`` open_clip config (no weights: use ``pretrained: random``)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return directory


def record_edit(run: Path, relative: str) -> None:
    """A test's deliberate edit of a run output (e.g. a manifest with planted repeats): its done
    marker's record follows the new bytes, as if the run had written them (every reader checks a
    recorded file against its marker, and would call the edit damage)."""
    import json

    from mmbalance.pipeline.stages import owner
    from mmbalance.io.store import OUTPUTS_KEY, RunStore, file_record

    stage, key = owner(relative)
    marker_path = run / "_done" / stage / f"{key}.json"
    marker = json.loads(marker_path.read_text())
    store = RunStore(str(run))
    marker[OUTPUTS_KEY][relative] = file_record(store.fs, store.path(relative))
    marker_path.write_text(json.dumps(marker))


def without_timings(value):
    """A JSON value without the keys that record how long something took."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k and k != "stages"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def run_outputs(run: Path, markers: bool = False) -> dict[str, bytes]:
    """Every file of a run by path, for byte comparisons: report.json without its timings; the
    stage statistics (timings only) and report.html left out; the done markers only with
    ``markers``, without their timings (the report's, which records report.json, left out)."""
    import json

    found = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel in (".lock", "stats/stages.json", "report.html") or rel.startswith("_done/report/"):
            continue
        data = path.read_bytes()
        if rel.startswith("_done/"):
            if not markers:
                continue
            data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
        elif rel == "report.json":
            data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
        found[rel] = data
    return found


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: ``<key>.<ext>`` members, one sample's members consecutive, in order."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def table_as_samples(table: pa.Table, key: str = "uid", text: str = "caption") -> list[tuple[str, dict[str, bytes]]]:
    """Rows of a table as WebDataset samples: the key column names the sample, ``text`` goes to
    ``.txt``, bytes columns to ``.<column>``, everything else (embeddings as lists) to ``.json``."""
    import json

    out = []
    for row in table.to_pylist():
        members: dict[str, bytes] = {}
        if row.get(text) is not None:
            members["txt"] = row[text].encode()
        fields = {}
        for name, value in row.items():
            if name in (key, text):
                continue
            if isinstance(value, bytes):
                members[name] = value
            else:
                fields[name] = value
        members["json"] = json.dumps(fields).encode()
        out.append((row[key], members))
    return out
