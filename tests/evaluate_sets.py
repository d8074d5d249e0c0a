"""Small labelled evaluation sets for ``mmbalance evaluate`` tests: rendered PNGs whose pixels carry
an occupation colour and, on cued images, a gender marker, so even a random-init model's zero-shot
predictions vary from image to image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OCCUPATIONS = {"nurse": (220, 60, 60), "welder": (60, 60, 220), "chef": (60, 200, 60), "pilot": (200, 200, 40)}
GENDERS = ("woman", "man")


def render(occupation: str, gender: str | None, rng: np.random.Generator, size: int = 32) -> bytes:
    from PIL import Image

    base = np.array(OCCUPATIONS[occupation], np.float64)
    img = base[None, None, :] * rng.uniform(0.5, 1.0) + rng.normal(0, 40, (size, size, 3))
    y, x = np.mgrid[0:size, 0:size]
    img += 60 * np.sin((x + y * rng.uniform(-1, 1)) * rng.uniform(0.1, 0.8))[:, :, None]
    if gender == "woman":
        img[4:14, 4:14] = 255
    elif gender == "man":
        img[18:28, :] = 0
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def eval_table(rows: int, seed: int = 0, neutral: float = 0.5, captions: bool = True, unlabelled: float = 0.0) -> pa.Table:
    """uid, image (PNG bytes), gender (null on neutral images), occupation (null on about
    ``unlabelled`` of the rows, whose pixels still have a colour), caption."""
    rng = np.random.default_rng(seed)
    names = list(OCCUPATIONS)
    occ = [names[i] for i in rng.integers(0, len(names), rows)]
    gender = [None if rng.random() < neutral else GENDERS[int(rng.integers(0, 2))] for _ in range(rows)]
    data = {"uid": [f"e{seed}-{i}" for i in range(rows)], "image": [render(o, g, rng) for o, g in zip(occ, gender)],
            "gender": pa.array(gender, pa.string())}
    occ = [None if rng.random() < unlabelled else o for o in occ]
    data["occupation"] = pa.array(occ, pa.string())
    if captions:
        data["caption"] = [f"a {g or 'person'} working as a {o or 'worker'}, photo {i}" for i, (o, g) in enumerate(zip(occ, gender))]
    return pa.table(data)


RECIPE = """\
model: {{name: "local-dir:{model}", {weights}}}
eval: {{columns: {{uid: uid, image: image{caption}}}}}
attributes:
  - name: gender
    values: [woman, man]
    prompts: {{woman: ["a photo of a woman working as a {{occupation}}", "a woman, a {{label}}"],
              man: ["a photo of a man working as a {{occupation}}", "a man, a {{label}}"]}}
labels:
  - {{name: occupation, prompts: ["a photo of a {{occupation}}.", "a {{label}} at work."]}}
bootstrap: {{samples: {samples}}}
retrieval: {{k: [5, 10, 1000]}}
seed: {seed}
"""


def write_eval_set(directory: Path, rows: int = 60, seed: int = 0, model_dir: Path | None = None,
                   weights: str = "pretrained: random", samples: int = 40, captions: bool = True, **kw) -> tuple[Path, Path]:
    """(eval.parquet, eval.yaml) in ``directory``; the recipe names ``model_dir`` as a local-dir model."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "eval.parquet"
    pq.write_table(eval_table(rows, seed, captions=captions, **kw), path, row_group_size=25)
    recipe = directory / "eval.yaml"
    recipe.write_text(RECIPE.format(model=model_dir, weights=weights, caption=", caption: caption" if captions else "",
                                    samples=samples, seed=seed))
    return path, recipe


def model_dir(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory
