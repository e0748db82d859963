"""``inpformer synthesize``: the fixed pseudo-anomaly bank ``data/synth/<name>/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from components.data.io import read_rgb
from pipelines.builders import build_synthesizer, build_transform
from pipelines.config import Params
from pipelines.paths import remove_tree, synth_dir
from pipelines.stages.records import load_records, training_groups

__all__ = ["synthesize"]

INDEX_HEADER = "source,copy,image,mask,anomalous"
PNG_COMPRESSION = 1  # fast writes; the bank is regenerated, not archived


def synthesize(p: Params, progress: bool = True) -> Path:
    """Write ``synthesis.bank_copies`` pseudo anomalies per training image (images, masks, index.csv)."""
    out = synth_dir(p.data.name)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    synth = build_synthesizer(p)
    lines = [INDEX_HEADER]
    if synth is not None and p.synthesis.bank_copies > 0:
        tf = build_transform(p)
        train = [r for group in training_groups(p, load_records(p)).values() for r in group]  # tiles too
        for i, rec in enumerate(tqdm(train, desc="synthesize", leave=False, disable=not progress)):
            unit = tf.to_unit(read_rgb(rec.path)).permute(1, 2, 0).numpy()
            for c in range(p.synthesis.bank_copies):
                aug, mask, _beta = synth(unit, np.random.default_rng([p.synthesis.seed, c, i]))
                stem = f"{i:06d}_{c}"
                image = Image.fromarray((aug * 255 + 0.5).clip(0, 255).astype(np.uint8))
                image.save(tmp / f"{stem}.png", compress_level=PNG_COMPRESSION)
                mask_image = Image.fromarray((mask * 255).astype(np.uint8), "L")
                mask_image.save(tmp / f"{stem}_mask.png", compress_level=PNG_COMPRESSION)
                lines.append(f"{rec.path},{c},{stem}.png,{stem}_mask.png,{int(mask.any())}")
    (tmp / "index.csv").write_text("\n".join(lines) + "\n")
    remove_tree(out)
    tmp.rename(out)
    textures = synth.textures.source if synth else "off"
    print(f"Pseudo-anomaly bank: {len(lines) - 1} samples → {out} (textures: {textures})")
    return out
