"""A generated corpus with known structure, for the demo, tests and benchmarks.

Each row: a uid, a caption, a small real PNG image, unit-norm image and text embeddings drawn
around a centre per (occupation, subclass), a perceived-gender column with a planted
occupation association (null = no person) and a long-tailed occupation column. Deterministic:
the same seed gives the same bytes; shards are generated independently, in bounded memory.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.pipeline.store import parquet_options

# occupation -> P(woman | occupation, a person is present): the planted association
OCCUPATIONS: dict[str, float] = {
    "teacher": 0.70, "engineer": 0.15, "nurse": 0.90, "doctor": 0.45, "programmer": 0.20,
    "chef": 0.40, "farmer": 0.30, "lawyer": 0.40, "secretary": 0.85, "pilot": 0.10,
    "librarian": 0.80, "mechanic": 0.08, "cashier": 0.65, "scientist": 0.35, "ceo": 0.15,
    "dancer": 0.80, "firefighter": 0.10, "baker": 0.60, "artist": 0.55, "soldier": 0.12,
}
NO_PERSON_RATE = 0.15
SUBCLASSES_PER_OCCUPATION = 3
ZIPF_EXPONENT = 1.1
IMAGE_POOL = 256


def occupation_shares() -> np.ndarray:
    ranks = np.arange(1, len(OCCUPATIONS) + 1, dtype=np.float64)
    p = ranks**-ZIPF_EXPONENT
    return p / p.sum()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _image_pool(seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    pool = []
    for _ in range(IMAGE_POOL):
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        pool.append(buf.getvalue())
    return pool


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(matrix.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def generate_shard(
    shard: int, rows: int, seed: int, dim: int, centres: np.ndarray, images: list[bytes] | None
) -> pa.Table:
    rng = np.random.default_rng([seed, shard])
    names = list(OCCUPATIONS)
    occ = rng.choice(len(names), size=rows, p=occupation_shares())
    sub = rng.integers(0, SUBCLASSES_PER_OCCUPATION, size=rows)
    p_woman = np.array(list(OCCUPATIONS.values()))[occ]
    has_person = rng.random(rows) >= NO_PERSON_RATE
    is_woman = rng.random(rows) < p_woman
    gender = np.where(has_person, np.where(is_woman, "woman", "man"), None)
    centre = centres[occ * SUBCLASSES_PER_OCCUPATION + sub]
    image_emb = _unit(centre + rng.normal(0, 0.8 / np.sqrt(dim), size=(rows, dim)))
    text_emb = _unit(centre + rng.normal(0, 1.0 / np.sqrt(dim), size=(rows, dim)))
    person_word = np.where(has_person, np.where(is_woman, "woman", "man"), "")
    settings = np.array(["at work", "in a city", "outdoors", "in a studio", "portrait", "close-up"])
    setting = settings[rng.integers(0, len(settings), rows)]
    captions = [
        f"a photo of a {w} {names[o]} {s}" if w else f"a photo of a {names[o]} workplace {s}"
        for w, o, s in zip(person_word.tolist(), occ.tolist(), setting.tolist())
    ]
    columns = {
        "uid": pa.array([f"{seed:04x}{shard:05d}{r:08d}" for r in range(rows)], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "url": pa.array([f"https://example.invalid/{shard}/{r}.png" for r in range(rows)], pa.string()),
        "image_emb": _fixed_list(image_emb),
        "text_emb": _fixed_list(text_emb),
        "gender": pa.array(gender.tolist(), pa.string()),
        "occupation": pa.array([names[o] for o in occ.tolist()], pa.string()),
        "subclass": pa.array((occ * SUBCLASSES_PER_OCCUPATION + sub).astype(np.int32)),
        "clip_score": pa.array(np.round(0.2 + 0.15 * rng.random(rows), 4)),
    }
    if images is not None:
        columns["image"] = pa.array([images[i] for i in rng.integers(0, len(images), rows).tolist()], pa.binary())
    return pa.table(columns)


def synth_corpus(out_dir: str | Path, rows: int, shards: int, seed: int = 0, dim: int = 64, images: bool = True) -> dict:
    """Write ``shards`` Parquet files with ``rows`` rows in total; returns what was planted."""
    if rows < 0 or shards < 1 or dim < 2:
        raise ValueError("need rows >= 0, shards >= 1, dim >= 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    centres = _unit(np.random.default_rng([seed, 1]).normal(size=(len(OCCUPATIONS) * SUBCLASSES_PER_OCCUPATION, dim)))
    pool = _image_pool(seed) if images else None
    per_shard = [rows // shards + (1 if i < rows % shards else 0) for i in range(shards)]
    chunk = 100_000
    for shard, n in enumerate(per_shard):
        path = out / f"part-{shard:05d}.parquet"
        tmp = out / f".part-{shard:05d}.parquet.tmp"
        writer = None
        for start in range(0, max(n, 1), chunk):
            # sub-seeded per chunk so memory stays bounded for big shards
            table = generate_shard(shard * 1_000_003 + start // chunk, min(chunk, n - start), seed, dim, centres, pool)
            uids = pa.array([f"{seed:04x}{shard:05d}{start + r:08d}" for r in range(table.num_rows)], pa.string())
            table = table.set_column(0, "uid", uids)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, **parquet_options(table.schema))
            writer.write_table(table, row_group_size=16384)
        writer.close()
        tmp.rename(path)
    info = {
        "rows": rows,
        "shards": shards,
        "seed": seed,
        "dim": dim,
        "images": images,
        "p_woman_given_occupation": OCCUPATIONS,
        "no_person_rate": NO_PERSON_RATE,
        "occupation_shares": dict(zip(OCCUPATIONS, occupation_shares().round(6).tolist())),
    }
    (out / "_synth.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# The pipeline this project is about: attributes and concepts tagged from captions, concept
# clusters from the image embeddings, a MetaCLIP-style cap on concepts, then M4 against
# occupations and concept clusters (representation and association), with leakage probes.
DEMO_RECIPE = {
    "input": {"columns": {"uid": "uid", "caption": "caption", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
    "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"}, "values": ["woman", "man"]}],
    "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
    "clusters": [{"name": "concept", "embedding": "image", "k": 60}],
    "balance": [
        {"method": "cap", "by": "concept", "cap": 500},
        {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
         "associate": [["gender", "occupation"], ["gender", "concept"], ["gender", "embedding.image"]],
         "tolerance": {"representation": 0.002, "association": 0.005, "association_per_label": 0.05,
                       "association_embedding": 0.005},
         "retention": 0.6, "on_infeasible": "max_retention"},
    ],
    "export": {"seed": 0, "formats": ["parquet"]},
}
