"""Exact metrics speed and peak memory versus scikit-learn, side by side in one run.

1,000 anomaly maps of 256×256 with realistic masks (a few blob-shaped defects in half of the
images): our seven exact metrics (I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO) versus
scikit-learn computing only P-AUROC and P-AP on the same arrays. Each side runs in a fresh process
so its peak resident memory is its own.

    python bench/metrics_speed.py [--n 1000] [--size 256]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(n // 2):
        labels[i] = 1
        for _ in range(int(rng.integers(1, 4))):
            c = rng.integers(10, size - 10, 2)
            axes = rng.integers(2, size // 10, 2)
            cv2.ellipse(
                masks[i],
                (int(c[0]), int(c[1])),
                (int(axes[0]), int(axes[1])),
                float(rng.uniform(0, 180)),
                0,
                360,
                1,
                -1,
            )
    maps = rng.normal(0.2, 0.05, (n, size, size)).astype(np.float32)
    maps += masks * rng.uniform(0.02, 0.15, (n, 1, 1)).astype(np.float32)
    scores = np.sort(maps.reshape(n, -1), axis=1)[:, -655:].mean(1)
    return maps, masks, scores, labels


def _ours(n: int, size: int, q: mp.Queue) -> None:
    from components.evaluation.metrics import evaluate_arrays

    maps, masks, scores, labels = make_data(n, size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    m = evaluate_arrays(scores, labels, maps, masks)
    dt = time.perf_counter() - t
    q.put((dt, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20, m))


def _sklearn(n: int, size: int, q: mp.Queue) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    maps, masks, _, _ = make_data(n, size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    y, s = masks.ravel(), maps.ravel()
    auroc = roc_auc_score(y, s)
    ap = average_precision_score(y, s)
    dt = time.perf_counter() - t
    q.put(
        (
            dt,
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20,
            {"pixel_auroc": auroc, "pixel_ap": ap},
        )
    )


def _run(fn, n: int, size: int):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(n, size, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    print(f"{args.n} maps of {args.size}×{args.size} = {args.n * args.size**2 / 1e6:.1f} M pixels")
    t_ours, mem_ours, m = _run(_ours, args.n, args.size)
    t_sk, mem_sk, sk = _run(_sklearn, args.n, args.size)
    print(f"{'implementation':<44} {'seconds':>8} {'peak extra GiB':>15}")
    print("-" * 69)
    print(f"{'inpformer: 7 exact metrics':<44} {t_ours:>8.2f} {mem_ours:>15.2f}")
    print(f"{'scikit-learn: pixel AUROC + AP only':<44} {t_sk:>8.2f} {mem_sk:>15.2f}")
    print(f"ratio (ours / sklearn): time {t_ours / t_sk:.2f}x, memory {mem_ours / max(mem_sk, 1e-9):.2f}x")
    print(
        f"agreement: P-AUROC Δ={abs(m['pixel_auroc'] - sk['pixel_auroc']):.2e}, "
        f"P-AP Δ={abs(m['pixel_ap'] - sk['pixel_ap']):.2e}"
    )
    print("ours: " + ", ".join(f"{k}={m[k]:.4f}" for k in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc",
                                                            "pixel_ap", "pixel_f1_max", "pixel_aupro")))  # fmt: skip


if __name__ == "__main__":
    main()
