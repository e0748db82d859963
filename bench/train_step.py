"""The CPU training step, side by side in one run: today's fp32 step and every switch that could
make it faster, each with its time ratio and how far its losses move; then the profile of the fp32
step by kind of work (why it is as fast as it is).

    python bench/train_step.py [--size 224] [--batch 4] [--steps 10] [--threads 2] [--no-compile]

Each row is a fresh process that trains the pipeline's own step (``components.engine.training.train``
with params.yaml's model, loss and optimiser; random-init ViT-S, joint residual learning, the
segmentation head) on the same fixed random batches from the same initial weights, and reports the
median step time over steps 3..N and the largest difference of the total loss from the fp32 row
over the first 8 steps. Rows:

* ``fp32 (pinned kernels)``: today's step, the kernels ``pipelines`` pins (the reproducible bits);
* ``fp32, native kernels``: ``INPFORMER_CPU_KERNELS=native`` (this CPU's fastest; other bits);
* ``fp32 + torch.compile``: ``train.compile: true`` (inductor, C++ on CPU; first call compiles);
* ``bf16 autocast``: ``train.amp: bf16`` (pinned ATen and MKL; oneDNN stays on under bf16, which
  its matrix products need; native kernels in the next row);
* ``fp32, encoder cached``: ``train.feature_cache: true`` serves the frozen encoder's outputs
  instead of running it every step, stored as ``train.feature_cache_dtype`` fp32 (the encoder's
  exact values: the same arithmetic, to rounding) or fp16 (half the bytes; what the demo trains with).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_STEPS = 8
VARIANTS = {
    "fp32 (pinned kernels)": {},
    "fp32, native kernels": {"INPFORMER_CPU_KERNELS": "native"},
    "fp32 + torch.compile": {"COMPILE": "1"},
    "bf16 autocast (pinned, oneDNN on)": {"AMP": "bf16"},
    "bf16 autocast (native)": {"AMP": "bf16", "INPFORMER_CPU_KERNELS": "native"},
    "fp32, encoder cached (fp32)": {"CACHED": "fp32"},
    "fp32, encoder cached (fp16)": {"CACHED": "fp16"},
}
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
size, batch, steps, threads, profile = (int(a) for a in sys.argv[2:7])
import pipelines, torch
from dataclasses import replace
from components.data import batch as keys
from components.engine.training import train
from pipelines.builders import apply_cpu_policy, build_loss, build_model, build_train_config, cpu_runtime
from pipelines.config import load_params

sets = [f"data.image_size={size}", f"data.crop_size={size}", "model.pretrained=false",
        f"train.batch_size={batch}", "train.epochs=1", f"train.num_threads={threads}", "train.log_every=1",
        f"train.amp={os.environ.get('AMP', 'none')}",
        f"train.compile={'true' if os.environ.get('COMPILE') else 'false'}"]
p = load_params(os.path.join(sys.argv[1], "params.yaml"), sets)
apply_cpu_policy(p)
torch.manual_seed(0)
model = build_model(p)
npm, dice = build_loss(p)
cfg = replace(build_train_config(p, progress=False), device="cpu", num_workers=0, checkpoint_every=0)
gen = torch.Generator().manual_seed(1)
items = []
for _ in range(steps * batch):
    x, xa = torch.randn(3, size, size, generator=gen), torch.randn(3, size, size, generator=gen)
    items.append({keys.IMAGE: x, keys.ANOMALY_IMAGE: xa,
                  keys.ANOMALY_MASK: (torch.rand(1, size, size, generator=gen) > 0.9).float()})
if os.environ.get("CACHED"):
    model.eval()
    with torch.no_grad():
        for it in items:
            for image_key, feat_key in ((keys.IMAGE, keys.FEATURES), (keys.ANOMALY_IMAGE, keys.ANOMALY_FEATURES)):
                fused, groups, _ = model.encode(it.pop(image_key)[None])
                stack = torch.stack([fused, *groups], 1)[0]
                it[feat_key] = stack.half() if os.environ["CACHED"] == "fp16" else stack
stamps, losses = [], []
def tick(logs):
    stamps.append(time.perf_counter())
    losses.append(float(logs["total"]))
start = time.perf_counter()
if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, items, cfg, npm, dice, on_iteration=tick)
    kinds = {}
    for e in prof.key_averages():
        kinds[e.key] = kinds.get(e.key, 0.0) + e.self_cpu_time_total / 1e3
    print(json.dumps({"profile": kinds}))
else:
    train(model, items, cfg, npm, dice, on_iteration=tick)
times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
warm = sorted(times[2:]) or times
print(json.dumps({"step_ms": 1000 * warm[len(warm) // 2], "first_ms": 1000 * times[0], "losses": losses[:8],
                  **cpu_runtime()}))
"""
KINDS = {
    "matrix products (linear layers, attention, conv GEMMs)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "convolutions (im2col, col2im; their GEMMs above)": ("conv", "Conv"),
    "softmax, GELU, LayerNorm": ("softmax", "gelu", "layer_norm"),
    "optimiser (StableAdamW) and clipping": ("Optimizer", "addcdiv", "addcmul", "maximum", "sqrt", "norm"),
}


def _run(extra: dict[str, str], args: argparse.Namespace, profile: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("INPFORMER_CPU_KERNELS", "AMP", "COMPILE", "CACHED")}
    env |= {"HF_HUB_OFFLINE": "1", **extra}
    argv = [str(ROOT), str(args.size), str(args.batch), str(args.steps), str(args.threads), str(int(profile))]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:120] if out.stderr.strip() else f"exit {out.returncode}"}
    return {k: v for line in out.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


def _profile_table(kinds: dict[str, float]) -> list[str]:
    total = sum(kinds.values())
    shares = dict.fromkeys(KINDS, 0.0)
    for op, ms in kinds.items():
        kind = next((k for k, names in KINDS.items() if any(n in op for n in names)), None)
        if kind is not None:
            shares[kind] += ms
    shares["everything else (copies, elementwise, autograd)"] = total - sum(shares.values())
    return [f"  {kind:<50} {ms / total:>6.1%}" for kind, ms in shares.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles first)")
    parser.add_argument("--rows", default="", help="only the rows whose name contains this (the fp32 row always)")
    args = parser.parse_args()
    args.steps = max(args.steps, LOSS_STEPS)
    rows = {}
    for name, extra in VARIANTS.items():
        if (args.no_compile and "COMPILE" in extra) or (extra and args.rows not in name):
            continue
        rows[name] = _run(extra, args)
        print(f"measured {name}", flush=True)
    base = rows["fp32 (pinned kernels)"]
    print(f"\nViT-S@{args.size}, batch {args.batch}, {args.threads} threads, random init, joint residual learning")
    print(f"{'step':<32}{'kernels':>9}{'ms/step':>9}{'ratio':>7}{'first ms':>10}  max |loss - fp32| over 8 steps")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<32}  failed: {r['error']}")
            continue
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        print(
            f"{name:<32}{r['cpu_kernels']:>9}{r['step_ms']:>9.0f}{r['step_ms'] / base['step_ms']:>7.2f}"
            f"{r['first_ms']:>10.0f}  {diff:.1e}"
        )
    prof = _run({}, args, profile=True).get("profile")
    if prof:
        print("\nwhere the fp32 (pinned) step's time goes (torch.profiler, self CPU time):")
        print("\n".join(_profile_table(prof)))


if __name__ == "__main__":
    main()
