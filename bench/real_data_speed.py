"""Real photos against the embedded synthetic data, side by side in one run: loader images/s (cold
decode + transform, and from the image cache) and training iterations/s at the same sizes, through
the pipeline's own stages (prepare → synthesize → the training path of ``inpformer train``).

python bench/real_data_speed.py --real ../shared/data/bsdata [--size 128 --crop 112 --epochs 1]

Prints one table and the ratios the targets are stated in: real / synthetic training iterations/s
(target >= 0.8) and loader images/s / images the training step consumes per second (target >= 2).
The encoder is random-init (no DINOv2 weights here): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def _rate(dataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def measure(name: str, kind: str, source: str, overrides: list[str]) -> dict[str, float]:
    """Prepare and synthesize ``name`` in the current (scratch) workspace, then time its loader and
    one training run; returns images, loader rates and iterations/s."""
    from components.data.cache import ImageCache
    from components.data.datasets import ImageDataset
    from components.engine.training import train as train_model
    from pipelines import stages
    from pipelines.builders import build_transform
    from pipelines.config import load_params
    from pipelines.stages.records import load_records, training_groups
    from pipelines.stages.training_data import assemble_training

    p = load_params(ROOT / "params.yaml", [f"data.name={name}", f"data.dataset={kind}", *overrides])
    stages.prepare(p, source or None)
    stages.synthesize(p, progress=False)
    records = load_records(p)
    train = training_groups(p, records)["all"]
    tf = build_transform(p)
    cold = _rate(ImageDataset(train, tf))
    cache = ImageCache(Path("cache") / name)
    _rate(ImageDataset(train, tf, cache=cache))  # fills the cache
    cached = _rate(ImageDataset(train, tf, cache=cache))
    job = assemble_training(p, train, records, False)
    result = train_model(job.model, job.dataset, job.cfg, job.loss, job.dice)
    its = result.iterations / result.seconds
    return {"images": len(train), "cold": cold, "cached": cached, "its": its, "consumed": its * p.train.batch_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True, help="an MVTec-layout folder of real photos (e.g. ../shared/data/bsdata)")
    ap.add_argument("--size", type=int, default=128, help="data.image_size (default: the demo's)")
    ap.add_argument("--crop", type=int, default=112, help="data.crop_size (default: the demo's)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    real = str(Path(args.real).resolve())
    overrides = [
        f"data.image_size={args.size}",
        f"data.crop_size={args.crop}",
        "data.geometry=center_crop",  # the same field of view for both
        f"train.epochs={args.epochs}",
        "train.head_epochs=0",
        "train.device=cpu",
        f"train.feature_cache={str(args.feature_cache).lower()}",
        "tracking.enabled=false",
    ]
    cwd, work = os.getcwd(), Path(tempfile.mkdtemp(prefix="inpformer-bench-"))
    os.chdir(work)
    try:
        rows = {
            "synthetic (embedded)": measure("synthetic", "synthetic", "", overrides),
            f"real ({Path(real).name})": measure("real", "folder", real, overrides),
        }
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    cache = "on" if args.feature_cache else "off"
    print(f"\n{args.size}→{args.crop} px, {args.epochs} epoch(s), feature cache {cache}, 2 threads\n")
    print(f"{'data':<24} {'images':>7} {'loader cold':>12} {'loader cached':>14} {'train it/s':>11} {'step uses':>10}")
    print("-" * 84)
    for name, r in rows.items():
        print(
            f"{name:<24} {r['images']:>7d} {r['cold']:>10.1f}/s {r['cached']:>12.1f}/s {r['its']:>11.2f} "
            f"{r['consumed']:>8.1f}/s"
        )
    syn, rl = rows.values()
    print(f"\nreal / synthetic training it/s: {rl['its'] / syn['its']:.2f} (target >= 0.8)")
    print(f"real loader (cached) / images the step consumes: {rl['cached'] / rl['consumed']:.1f}x (target >= 2)")
    print(f"real loader (cold) / images the step consumes: {rl['cold'] / rl['consumed']:.1f}x")


if __name__ == "__main__":
    main()
