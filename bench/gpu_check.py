"""One-shot GPU check (run through bench/gpu_check.sh): speed, memory and numerics of the GPU paths.

Prints one table, measured side by side in one run:

* fp32 / bf16 autocast / bf16 + SDPA / bf16 + SDPA + torch.compile: training-step ms and peak memory
  for ViT-B@392 batch 16 (the paper's size), and inference ms per image;
* the largest difference of the anomaly maps bf16 vs fp32 on fixed inputs (relative to the map's max);
* the exported scorer (model + map post-processing, ``ScoringModule``) at batch 1 in fp32, fp16 and
  bf16, eager and TorchScript-traced: latency ms and the largest image-score difference vs fp32
  (the deployment rows; INT8 is a CPU/OpenVINO path, ``inpformer benchmark``);
* a 2-process DDP smoke test: NCCL on 2 GPUs when there are 2 or more, otherwise 2 CPU processes (gloo).

``--dry-run``: the same code on CPU with a tiny model (for the test suite; a few seconds).
Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import time_ms

from components.engine.distributed import init_from_env
from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.optim import StableAdamW
from components.model import InpFormer, InpFormerConfig
from components.scoring.anomaly_map import reconstruction_map
from components.scoring.export import ScoringModule
from components.scoring.inference import ScoringConfig

FULL = {"encoder_name": "dinov2reg_vit_base_14", "image_size": 392, "batch": 16}
DRY = {"encoder_name": "dinov2reg_vit_small_14", "image_size": 56, "batch": 2,
       "encoder_overrides": {"embed_dim": 32, "num_heads": 2}}  # fmt: skip
VARIANTS = (("fp32", False, "explicit", False), ("bf16", True, "explicit", False),
            ("bf16+sdpa", True, "sdpa", False), ("bf16+sdpa+compile", True, "sdpa", True))  # fmt: skip


def _model(spec: dict, attention: str, device: str) -> InpFormer:
    torch.manual_seed(0)
    kw = {k: v for k, v in spec.items() if k != "batch"}
    return InpFormer(InpFormerConfig(num_prototypes=6, seg_head_channels=64, attention=attention, **kw)).to(device)


def _variant(spec: dict, device: str, bf16: bool, attention: str, compiled: bool, iters: int) -> dict:
    model = _model(spec, attention, device)
    loss_fn, dice = NormalPatternLoss(), DiceLoss()
    opt = StableAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backend = "eager" if spec is DRY else "inductor"  # dry run: the code path, not minutes of compiling
    forward = torch.compile(model, backend=backend) if compiled else model
    size, b = spec["image_size"], spec["batch"]
    x = torch.randn(b, 3, size, size, device=device)
    mask = (torch.rand(b, 1, size, size, device=device) > 0.9).float()
    cast = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with cast:
            out = forward(x)
            total = loss_fn(out)["total"] + dice(torch.sigmoid(model.segment(out, (size, size)).float()), mask)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        train_ms = time_ms(step, iters, device)
    except Exception as err:  # compile or a kernel unavailable here: reported, not fatal
        return {"error": f"{type(err).__name__}: {str(err)[:60]}"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    model.eval()
    with torch.no_grad(), cast:
        infer_ms = time_ms(lambda: forward(x), iters, device) / b
        out = forward(x)
        amap = reconstruction_map(out.encoder_groups, out.decoder_groups, (size, size)).float()
    return {"train_ms": train_ms, "peak_gib": peak, "infer_ms": infer_ms, "map": amap}


EXPORT_DTYPES = (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))


def _export_rows(spec: dict, device: str, iters: int) -> list[str]:
    """Batch-1 latency of the scoring module per precision (autocast; traced under it for
    TorchScript), eager and traced, with its image-score difference from fp32 eager."""
    size = spec["image_size"]
    x = torch.randn(1, 3, size, size, device=device)
    module = ScoringModule(_model(spec, "explicit", device).eval(), ScoringConfig()).eval()
    lines, ref = [], None
    for label, dtype in EXPORT_DTYPES:
        cast = torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32 else nullcontext()
        for kind in ("eager", "torchscript"):
            try:
                with torch.no_grad(), cast:
                    run = torch.jit.trace(module, x, check_trace=False) if kind == "torchscript" else module
                    ms = time_ms(lambda run=run: run(x), iters, device)
                    score = run(x)[1].float()
            except Exception as err:  # a precision or kernel unavailable here: reported, not fatal
                lines.append(f"{label + ' ' + kind:<20}{type(err).__name__}: {str(err)[:60]}")
                continue
            ref = score if ref is None else ref
            diff = float((score - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            lines.append(f"{label + ' ' + kind:<20}{ms:>10.2f}{diff:>18.2e}")
    return lines


def _ddp_worker(rank: int, world: int, port: int, device: str, spec: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    ctx = init_from_env(device)
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    model = _model(spec, "explicit", dev)
    ids = [rank] if device == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    x = torch.randn(2, 3, spec["image_size"], spec["image_size"], device=dev)
    for _ in range(2):  # the seg head is not in forward(): unused here
        NormalPatternLoss()(ddp(x))["total"].backward()
    ctx.barrier()
    torch.distributed.destroy_process_group()


def _ddp_smoke(spec: dict) -> str:
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus >= 2 else "cpu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    try:
        mp.spawn(_ddp_worker, args=(2, port, device, spec if device == "cuda" else DRY), nprocs=2, join=True)
    except Exception as err:
        return f"FAILED ({device}): {type(err).__name__}: {str(err)[:80]}"
    backend = "nccl, 2 GPUs" if device == "cuda" else "gloo, 2 CPU processes"
    return f"passed ({backend}, {time.perf_counter() - t:.1f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU (the test suite)")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    spec, iters = (DRY, 1) if args.dry_run else (FULL, args.iters)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; model {spec['encoder_name']}@{spec['image_size']}, batch {spec['batch']}\n")
    print(f"{'variant':<20}{'train ms':>10}{'peak GiB':>10}{'infer ms/img':>14}{'map diff vs fp32':>18}")
    ref = None
    for label, bf16, attention, compiled in VARIANTS:
        r = _variant(spec, device, bf16, attention, compiled, iters)
        if "error" in r:
            print(f"{label:<20}{r['error']}")
            continue
        ref = r["map"] if ref is None else ref
        diff = float((r["map"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        print(f"{label:<20}{r['train_ms']:>10.1f}{r['peak_gib']:>10.2f}{r['infer_ms']:>14.2f}{diff:>18.2e}")
    print(f"\nexported scorer, batch 1\n{'variant':<20}{'ms':>10}{'score diff vs fp32':>18}")
    print("\n".join(_export_rows(spec, device, iters)))
    print(f"\nDDP smoke test: {_ddp_smoke(spec)}")


if __name__ == "__main__":
    main()
