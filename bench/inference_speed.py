"""Inference speed of the exported scorer vs PyTorch eager, measured side by side in one run.

For the demo size (ViT-S, crop 112, map 256) and ViT-S at 224, with random weights (speed does not
depend on them): ms per image of the whole scorer (model + resize + blur + top-k score) in
PyTorch eager, TorchScript, ONNX Runtime and, when installed, OpenVINO (reading the same ONNX
file), and each one's ratio to eager. Outputs are checked against eager (max relative map diff).

    python bench/inference_speed.py [--batch-size 8] [--iters 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.model import InpFormer, InpFormerConfig
from components.scoring.export import ScoringModule, export_model, load_exported
from components.scoring.inference import ScoringConfig

CONFIGS = (("demo: ViT-S@112", 112), ("ViT-S@224", 224))


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def _openvino(onnx_file: Path):
    try:
        scorer = load_exported(onnx_file, runtime="openvino")
    except ImportError:
        return None
    return scorer


def _bench(name: str, crop: int, scoring: ScoringConfig, batch_size: int, iters: int) -> None:
    torch.manual_seed(0)
    model = InpFormer(InpFormerConfig(encoder_name="dinov2reg_vit_small_14", image_size=crop, num_prototypes=6)).eval()
    x = torch.randn(batch_size, 3, crop, crop)
    module = ScoringModule(model, scoring).eval()
    with torch.no_grad():
        ref = module(x)[0][:, 0].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export_model(model, scoring, {}, Path(tmp) / "m.onnx", x[:2])
        ts_file = export_model(model, scoring, {}, Path(tmp) / "m.pt", x[:2])
        runtimes = {
            "eager": module,
            "torchscript": load_exported(ts_file),
            "onnxruntime": load_exported(onnx_file),
            "openvino": _openvino(onnx_file),
        }
        eager_s = None
        for runtime, scorer in runtimes.items():
            if scorer is None:
                print(f"{name:<18}{runtime:<14}{'(not installed: pip install openvino)':>32}")
                continue
            with torch.no_grad():
                seconds = _time(lambda s=scorer: s(x), iters)
                out = scorer(x)
            maps = out[0][:, 0].numpy() if isinstance(out[0], torch.Tensor) else np.asarray(out[0])
            diff = float(np.abs(maps - ref).max() / np.abs(ref).max())
            eager_s = eager_s or seconds
            ms = seconds / batch_size * 1000
            print(f"{name:<18}{runtime:<14}{ms:>9.1f}{seconds / eager_s:>9.2f}{diff:>14.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scoring = ScoringConfig(map_kind="fused", resize=256)
    print(f"batch {args.batch_size}, {args.iters} iterations, {torch.get_num_threads()} threads, CPU\n")
    print(f"{'config':<18}{'runtime':<14}{'ms/img':>9}{'× eager':>9}{'max map diff':>14}")
    for name, crop in CONFIGS:
        _bench(name, crop, scoring, args.batch_size, args.iters)


if __name__ == "__main__":
    main()
