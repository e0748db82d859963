"""Model speed and attention memory, measured side by side in one run.

Prints, for ViT-S at 224 and ViT-B at 392 (random weights; speed does not depend on them):
inference ms/image, training-step ms, encoder-only forward ms and its share of inference, and the
memory of INP-guided attention (N×M) versus self-attention (N×N) in one decoder block (the
paper's Table 1 argument), measured (CUDA peak allocation, or CPU timing) and analytic.

    python bench/model_speed.py [--batch-size 2] [--iters 3] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.engine.losses import DiceLoss, NormalPatternLoss
from components.engine.optim import StableAdamW, clip_grad_norm
from components.model import InpFormer, InpFormerConfig
from components.model.layers import PrototypeBlock
from components.scoring.anomaly_map import reconstruction_map


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, iters: int, device: str) -> float:
    """Milliseconds per call of ``fn`` after one warm-up call (CUDA synchronised)."""
    fn()  # warm-up
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters * 1000


class SelfAttentionBlock(torch.nn.Module):
    """A standard pre-norm ViT block of the same width (softmax self-attention), for comparison."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)  # explicit N×N map
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def attention_memory(dim: int, heads: int, n: int, m: int, batch: int, device: str, iters: int) -> dict:
    x = torch.randn(batch, n, dim, device=device)
    p = torch.randn(batch, m, dim, device=device)
    inp = PrototypeBlock(dim, heads).to(device)
    sa = SelfAttentionBlock(dim, heads).to(device)
    out = {}
    for name, fn in (("inp", lambda: inp(x, p)), ("self", lambda: sa(x))):
        with torch.no_grad():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                out[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            out[f"{name}_ms"] = time_ms(fn, iters, device)
    out["inp_map_mib"] = batch * heads * n * m * 4 / 2**20
    out["self_map_mib"] = batch * heads * n * n * 4 / 2**20
    return out


def bench(name: str, size: int, batch: int, iters: int, device: str) -> dict:
    torch.manual_seed(0)
    model = InpFormer(InpFormerConfig(name, image_size=size, seg_head="onenip")).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()
    npm, dice = NormalPatternLoss(coherence="soft"), DiceLoss()
    opt = StableAdamW(model.trunk_parameters() + model.head_parameters())

    @torch.no_grad()
    def infer() -> None:
        out = model(x)
        reconstruction_map(out.encoder_groups, out.decoder_groups, (size, size))
        model.segment(out)

    @torch.no_grad()
    def encoder_only() -> None:
        model.encoder(x)

    def step() -> None:
        model.train()
        loss = npm(model(x))["total"]
        with torch.no_grad():
            oa = model(x)
        loss = loss + dice(torch.sigmoid(model.segment(oa)), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model.trunk_parameters(), 0.1)
        opt.step()

    model.eval()
    inf = time_ms(infer, iters, device)
    enc = time_ms(encoder_only, iters, device)
    tr = time_ms(step, iters, device)
    grid = size // 14
    mem = attention_memory(model.encoder.embed_dim, model.encoder.num_heads, grid * grid, 6, batch, device, iters)
    return {"config": f"{name.split('_')[2]}@{size}", "batch": batch, "infer_ms_per_img": inf / batch,
            "train_step_ms": tr, "encoder_ms": enc, "encoder_share": enc / inf, **mem}  # fmt: skip


def variants(name: str, size: int, batch: int, iters: int, device: str) -> list[dict]:
    """Explicit vs SDPA attention (encoder + INP extractor), fp32 and bf16 autocast: ms and map difference."""
    x = torch.randn(batch, 3, size, size, device=device)
    bf16_ok = (device.startswith("cuda") and torch.cuda.is_bf16_supported()) or device == "cpu"
    rows, ref = [], None
    for attention, bf16 in (("explicit", False), ("sdpa", False), ("explicit", True), ("sdpa", True)):
        if bf16 and not bf16_ok:
            continue
        torch.manual_seed(0)
        model = (
            InpFormer(InpFormerConfig(name, image_size=size, seg_head="onenip", attention=attention)).to(device).eval()
        )
        cast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()

        @torch.no_grad()
        def infer(model=model, cast=cast) -> torch.Tensor:
            with cast:
                out = model(x)
                return reconstruction_map(out.encoder_groups, out.decoder_groups, (size, size)).float()

        ms = time_ms(infer, iters, device) / batch
        amap = infer()
        ref = amap if ref is None else ref
        diff = float((amap - ref).abs().max() / ref.abs().max())
        rows.append({"variant": f"{attention}{'+bf16' if bf16 else ''}", "ms": ms, "diff": diff})
    for r in rows:
        r["ratio"] = r["ms"] / rows[0]["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch = args.batch_size or (16 if device.startswith("cuda") else 2)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} batch={batch}")
    rows = [bench("dinov2reg_vit_small_14", 224, batch, args.iters, device),
            bench("dinov2reg_vit_base_14", 392, batch, args.iters, device)]  # fmt: skip
    head = (
        f"{'config':<10} {'infer ms/img':>12} {'train step ms':>13} {'encoder ms':>10} {'enc/infer':>9} "
        f"{'INP-attn ms':>11} {'self-attn ms':>12} {'INP map MiB':>11} {'self map MiB':>12} {'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<10} {r['infer_ms_per_img']:>12.1f} {r['train_step_ms']:>13.1f} {r['encoder_ms']:>10.1f} "
              f"{r['encoder_share']:>9.2f} {r['inp_ms']:>11.2f} {r['self_ms']:>12.2f} {r['inp_map_mib']:>11.3f} "
              f"{r['self_map_mib']:>12.3f} {r['self_map_mib'] / r['inp_map_mib']:>6.0f}x")  # fmt: skip
        if "inp_peak_mib" in r:
            print(
                f"{'':<10} measured peak MiB: INP-guided block {r['inp_peak_mib']:.1f}, "
                f"self-attention block {r['self_peak_mib']:.1f}"
            )
    print("ratio = self-attention map / INP-guided attention map (N/M); M = 6 INPs.")
    print(f"\nattention and precision, ViT-S@224 batch {batch}: inference ms/img, ratio to explicit fp32, max map diff")
    for r in variants("dinov2reg_vit_small_14", 224, batch, args.iters, device):
        print(f"{r['variant']:<14} {r['ms']:>8.1f} ms/img {r['ratio']:>6.2f}x   map diff {r['diff']:.1e}")


if __name__ == "__main__":
    main()
