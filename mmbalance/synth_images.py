"""A rendered image-text corpus whose pixels carry the attribute and the concept, for training a
small CLIP end to end (benchmarks/bench_model_bias.py, docs/model-bias.md).

Each training image (32 x 32 RGB PNG) shows one person: an occupation glyph (the concept, one
shape per occupation, any colour, jittered) on a background whose colour family is a latent
*scene* the captions never name. A gender cue (a small dark mark above the glyph: a triangle for a
woman, a bar for a man) is visible on only ``cue_rate`` of the persons; the caption names the
occupation and the person's gender either way ("a photo of a woman nurse."), as web captions do
for people whose gender the picture does not show clearly.

Planted: P(woman | occupation) per occupation, and P(scene | gender), so gender is associated with
the occupation (named in captions) and with the scene (never named). A contrastive model can tell
a cue-less person's gender only from the occupation and the scene, so on those images it learns
the association itself: that is the mechanism behind a model's association bias, and the only
place it is planted (the evaluation set is balanced and neutral images show no cue).

The evaluation set has, per occupation x scene, ``neutral`` cue-less images (gender null) and
``cued`` images of each gender: the FairFace-style table ``mmbalance evaluate`` reads.
Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.io.store import parquet_options

# occupation -> (share of the corpus, P(woman | occupation)); names are values of the shipped
# occupation vocabulary, so caption tagging finds them
OCCUPATIONS: dict[str, tuple[float, float]] = {
    "engineer": (0.20, 0.15), "pilot": (0.16, 0.10), "nurse": (0.14, 0.90), "mechanic": (0.12, 0.08),
    "teacher": (0.11, 0.75), "farmer": (0.10, 0.30), "baker": (0.09, 0.65), "librarian": (0.08, 0.85),
}
# latent scenes: background colour families; P(scene | gender) planted, never in a caption
SCENES: dict[str, tuple[int, int, int]] = {
    "office": (70, 90, 150), "kitchen": (150, 110, 60), "garden": (60, 130, 70), "street": (115, 115, 115),
}
SCENE_GIVEN_GENDER = {"woman": (0.30, 0.27, 0.23, 0.20), "man": (0.20, 0.23, 0.27, 0.30)}
GLYPH_COLOURS = ((235, 70, 70), (245, 205, 60), (70, 210, 225), (120, 230, 90), (250, 140, 40), (205, 95, 225),
                 (240, 150, 190), (170, 120, 250))
CUE_COLOURS = {"woman": (245, 245, 245), "man": (15, 15, 15), None: (130, 130, 130)}
SIZE = 32
CAPTION_TEMPLATES = ("a photo of a {g} {o}.", "a {g} working as {a} {o}.", "a {g} {o} at work.", "{o}, {g}.")
NEUTRAL_CAPTION = "a photo of {a} {o}."


def caption(template: str, occupation: str, gender: str | None = None) -> str:
    return template.format(g=gender, o=occupation, a="an" if occupation[0] in "aeiou" else "a")


# zero-shot prompts for the evaluation (the training captions' own forms): per occupation, and per
# gender templated with the image's occupation ({o}), as ``mmbalance evaluate`` fills them
LABEL_TEMPLATES = (NEUTRAL_CAPTION, "{a} {o} at work.", "{o}.")
GENDER_TEMPLATES = ("a photo of a {g} {o}.", "a {g} {o} at work.", "{o}, {g}.")


def label_prompts() -> dict[str, list[str]]:
    return {o: [caption(t, o) for t in LABEL_TEMPLATES] for o in OCCUPATIONS}


def gender_prompts(placeholder: str = "{o}") -> dict[str, list[str]]:
    """Per gender, templates naming the occupation by ``placeholder`` (``{occupation}`` for evaluate)."""
    return {g: [t.replace("{g}", g).replace("{o}", placeholder) for t in GENDER_TEMPLATES] for g in ("woman", "man")}


def _shape(draw, occupation: int, cx: float, cy: float, r: float, fill) -> None:
    """One glyph per occupation, centred at (cx, cy) with radius r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2.0, r / 2.5)
    if occupation == 0:
        draw.ellipse(box, fill=fill)
    elif occupation == 1:
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif occupation == 2:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif occupation == 3:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif occupation == 4:
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fill)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)
    elif occupation == 5:
        draw.ellipse(box, outline=fill, width=int(round(w)))
    elif occupation == 6:
        draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx, cy + r)], fill=fill)
    else:
        draw.rectangle((cx - r, cy - r, cx + r, cy - r + w), fill=fill)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)


def render(occupation: int, scene: int, cue: str | None, rng: np.random.Generator) -> bytes:
    """PNG bytes of one image: scene background, occupation glyph, optional gender cue, noise."""
    from PIL import Image, ImageDraw

    base = np.array(list(SCENES.values())[scene], dtype=np.float64) + rng.normal(0, 12, 3)
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in np.clip(base, 0, 255)))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(7.0, 8.5)
    cx, cy = 16 + rng.uniform(-3, 3), 19.5 + rng.uniform(-2, 2)
    # each occupation is drawn in one of two colours, each colour shared with another occupation:
    # colour narrows the occupation down, the shape decides it
    colour = GLYPH_COLOURS[(occupation + int(rng.integers(2))) % len(GLYPH_COLOURS)]
    _shape(draw, occupation, cx, cy, r, colour)
    top = cy - r - 2  # every person wears the mark; its shade is the gender cue, mid grey when hidden
    draw.rectangle((cx - 4, top - 3, cx + 4, top), fill=CUE_COLOURS[cue])
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (SIZE, SIZE, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _draws(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shares = np.array([s for s, _ in OCCUPATIONS.values()])
    occupation = rng.choice(len(OCCUPATIONS), size=rows, p=shares / shares.sum())
    woman = rng.random(rows) < np.array([p for _, p in OCCUPATIONS.values()])[occupation]
    u = rng.random(rows)
    scene = np.where(woman, np.searchsorted(np.cumsum(SCENE_GIVEN_GENDER["woman"]), u, side="right"),
                     np.searchsorted(np.cumsum(SCENE_GIVEN_GENDER["man"]), u, side="right"))
    return occupation, woman, np.minimum(scene, len(SCENES) - 1)


def train_table(rows: int, seed: int, cue_rate: float = 0.5, uid_offset: int = 0) -> pa.Table:
    """``rows`` training rows: uid, caption, image (PNG), and the ground truth the captions and
    pixels were made from (gender, occupation, scene, cue_visible), which a recipe may ignore."""
    rng = np.random.default_rng([seed, 11, uid_offset])
    occupation, woman, scene = _draws(rows, rng)
    cue = rng.random(rows) < cue_rate
    names, scenes = list(OCCUPATIONS), list(SCENES)
    gender = np.where(woman, "woman", "man")
    images, captions = [], []
    for i in range(rows):
        images.append(render(int(occupation[i]), int(scene[i]), gender[i] if cue[i] else None, rng))
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        captions.append(caption(template, names[occupation[i]], gender[i]))
    return pa.table({
        "uid": pa.array([f"t{seed:03d}-{uid_offset + i:07d}" for i in range(rows)], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "gender": pa.array(gender.tolist(), pa.string()),
        "occupation": pa.array([names[o] for o in occupation], pa.string()),
        "scene": pa.array([scenes[s] for s in scene], pa.string()),
        "cue_visible": pa.array(cue),
    })


def eval_table(seed: int, neutral: int = 48, cued: int = 16) -> pa.Table:
    """Per occupation x scene: ``neutral`` cue-less images (gender null) and ``cued`` images of each
    gender. Gender, occupation and scene are independent here: the set itself carries no
    association. Captions (for image<->text recall) only where they are unique: one image per
    occupation x {woman, man, neutral}, the others null; with duplicates a pair's rank among
    identical captions would be a tie-break."""
    rng = np.random.default_rng([seed, 23])
    names, scenes = list(OCCUPATIONS), list(SCENES)
    rows: dict[str, list] = {"uid": [], "caption": [], "image": [], "gender": [], "occupation": [], "scene": []}
    seen: set[str] = set()
    for o, name in enumerate(names):
        for s, scene in enumerate(scenes):
            for g in [None] * neutral + ["woman"] * cued + ["man"] * cued:
                rows["uid"].append(f"e{seed:03d}-{len(rows['uid']):06d}")
                rows["image"].append(render(o, s, g, rng))
                text = caption(NEUTRAL_CAPTION if g is None else CAPTION_TEMPLATES[0], name, g)
                rows["caption"].append(None if text in seen else text)
                seen.add(text)
                rows["gender"].append(g)
                rows["occupation"].append(name)
                rows["scene"].append(scene)
    types = {"image": pa.binary()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in rows.items()})


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=4096, **parquet_options(table.schema))
    tmp.rename(path)


def planted() -> dict:
    """What the generator plants, for reports: P(woman | occupation), P(woman | scene)."""
    shares = np.array([s for s, _ in OCCUPATIONS.values()])
    shares = shares / shares.sum()
    p_w = np.array([p for _, p in OCCUPATIONS.values()])
    women = float(shares @ p_w)
    sw, sm = np.array(SCENE_GIVEN_GENDER["woman"]), np.array(SCENE_GIVEN_GENDER["man"])
    return {
        "p_woman": round(women, 6),
        "p_woman_given_occupation": {k: p for k, (_, p) in OCCUPATIONS.items()},
        "occupation_shares": dict(zip(OCCUPATIONS, shares.round(6).tolist())),
        "p_woman_given_scene": dict(zip(SCENES, (women * sw / (women * sw + (1 - women) * sm)).round(6).tolist())),
    }


def synth_image_corpus(out_dir: str | Path, rows: int, shards: int, seed: int = 0, cue_rate: float = 0.5,
                       eval_dir: str | Path | None = None, eval_neutral: int = 48, eval_cued: int = 16) -> dict:
    """Write ``shards`` training Parquet files (``rows`` in total) and, with ``eval_dir``, the
    evaluation set; returns what was planted."""
    if rows < 0 or shards < 1 or not 0.0 <= cue_rate <= 1.0:
        raise ValueError("need rows >= 0, shards >= 1, 0 <= cue_rate <= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for shard in range(shards):
        n = rows // shards + (1 if shard < rows % shards else 0)
        _write(train_table(n, seed, cue_rate, uid_offset=start), out / f"part-{shard:05d}.parquet")
        start += n
    info = {"rows": rows, "shards": shards, "seed": seed, "cue_rate": cue_rate, "image_size": SIZE, **planted()}
    (out / "_synth.json").write_text(json.dumps(info, indent=2) + "\n")
    if eval_dir is not None:
        ev = Path(eval_dir)
        ev.mkdir(parents=True, exist_ok=True)
        _write(eval_table(seed + 1000, eval_neutral, eval_cued), ev / "eval.parquet")
        info["eval"] = {"path": str(ev / "eval.parquet"), "neutral_per_cell": eval_neutral, "cued_per_cell_per_gender": eval_cued}
    return info
