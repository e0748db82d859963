"""Data loading speed: images per second, cold (decode + resize) versus on-disk cache, in one run.

python bench/data_speed.py [--root DIR]   (default: a freshly generated synthetic dataset)
e.g. python bench/data_speed.py --root ../shared/data/bsdata --resize 448 --crop 392
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.data.cache import ImageCache
from components.data.datasets import ImageDataset
from components.data.readers import mvtec_records
from components.data.transforms import ImageTransform


def _rate(ds: ImageDataset) -> float:
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="MVTec-layout tree (default: generate the synthetic dataset)")
    ap.add_argument("--resize", type=int, default=448)
    ap.add_argument("--crop", type=int, default=392)
    ap.add_argument("--limit", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inpformer-bench-"))
    try:
        if args.root:
            root = Path(args.root)
        else:
            from components.data.synthetic import generate_synthetic

            root = generate_synthetic(work / "synthetic", size=256)
        recs = [r for r in mvtec_records(root) if r.split == "train"][: args.limit]
        tf = ImageTransform(args.resize, args.crop)
        cold = _rate(ImageDataset(recs, tf))
        cache = ImageCache(work / "cache")
        fill = _rate(ImageDataset(recs, tf, cache=cache))
        warm = _rate(ImageDataset(recs, tf, cache=cache))
        print(f"{len(recs)} training images from {root} → {args.resize}→{args.crop}")
        print(f"{'mode':<28} {'images/s':>9}")
        print("-" * 38)
        print(f"{'cold (decode + resize)':<28} {cold:>9.1f}")
        print(f"{'first cached pass (fill)':<28} {fill:>9.1f}")
        print(f"{'cached':<28} {warm:>9.1f}")
        print(f"speed-up cached / cold: {warm / cold:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
