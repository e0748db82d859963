"""Which CPU settings change the trained bits, side by side in one run, and whether this machine
reproduces the committed fingerprint (the pinned kernels at 2 threads, measured on the machine that
produced the committed demo results).

python bench/reproducibility.py [--images 24] [--write]

Each variant is a fresh process that trains the demo config (params.yaml: random-init ViT-S, 112 px,
the embedded synthetic data, prepared in a scratch workspace) for one epoch on the first
``--images`` training images and hashes the weights. Variants: the pinned kernels (the default),
each CPU, each thread count and each library path that can differ between machines. On another
x86 CPU with AVX2 the ``pinned`` row must match the committed fingerprint for ``make demo`` to
leave the git tree clean there; the other rows show what each setting would change. ``--write``
records this machine's pinned fingerprint (for the machine whose results are committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = ROOT / "bench" / "fingerprint.json"
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "INPFORMER_CPU_KERNELS")
VARIANTS = {
    "pinned": {},
    "pinned, 1 thread": {"THREADS": "1"},
    "native (no pins)": {"INPFORMER_CPU_KERNELS": "native"},
    "pinned, ATen default ISA": {"ATEN_CPU_CAPABILITY": "default"},
    "pinned, MKL compatible path": {"MKL_CBWR": "COMPATIBLE"},
    "pinned + oneDNN on, SSE4.1": {"ONEDNN": "1", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "pinned + oneDNN on": {"ONEDNN": "1"},
}
CHILD = r"""
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import pipelines, torch
from dataclasses import replace
from components.engine.training import train
from pipelines.builders import apply_cpu_policy, cpu_runtime
from pipelines.config import load_params
from pipelines.stages.records import load_records, training_groups
from pipelines.stages.training_data import assemble_training
p = load_params("params.yaml", ["train.epochs=1", "train.feature_cache=false"])
if os.environ.get("THREADS"):
    p.train.num_threads = int(os.environ["THREADS"])
apply_cpu_policy(p)
if os.environ.get("ONEDNN"):
    torch.backends.mkldnn.enabled = True
records = load_records(p)
job = assemble_training(p, training_groups(p, records)["all"][: int(sys.argv[2])], records, False)
start = time.perf_counter()
train(job.model, job.dataset, replace(job.cfg, progress=False), job.loss, job.dice)
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in job.model.parameters())).hexdigest()
print(json.dumps({"sha256": digest[:16], "seconds": time.perf_counter() - start, **cpu_runtime()}))
"""


def _variant(work: Path, extra: dict[str, str], images: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    env.update({"HF_HUB_OFFLINE": "1", **extra})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(images)], cwd=work, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--write", action="store_true", help="record this machine's pinned fingerprint")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    committed = json.loads(FINGERPRINT.read_text()) if FINGERPRINT.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="inpformer-repro-bench-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        prep = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "prepare"],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        )
        if prep.returncode != 0:
            raise SystemExit(prep.stderr[-2000:])
        rows = {name: _variant(work, extra, args.images) for name, extra in VARIANTS.items()}
    pinned = rows["pinned"]
    print(f"\n{'variant':<30}{'kernels':>9}{'MKL_CBWR':>13}{'oneDNN':>8}{'threads':>8}{'seconds':>9}  weights sha256")
    for name, r in rows.items():
        same = "= pinned" if r["sha256"] == pinned["sha256"] else "differs"
        print(
            f"{name:<30}{r['cpu_kernels']:>9}{r['mkl_cbwr']:>13}{r['onednn']:>8}{r['num_threads']:>8}"
            f"{r['seconds']:>9.1f}  {r['sha256']}  {same}"
        )
    print(f"\nCPU: {pinned['cpu']}; {args.images} images, 1 epoch of the demo config")
    want = committed.get(str(args.images))
    if want:
        verdict = "MATCHES" if want["sha256"] == pinned["sha256"] else "DIFFERS FROM"
        print(f"pinned {verdict} the committed fingerprint {want['sha256']} (measured on {want['cpu']})")
    if args.write:
        committed[str(args.images)] = {
            "sha256": pinned["sha256"],
            "cpu": pinned["cpu"],
            "kernels": pinned["cpu_kernels"],
        }
        FINGERPRINT.write_text(json.dumps(committed, indent=2, sort_keys=True) + "\n")
        print(f"wrote {FINGERPRINT}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
