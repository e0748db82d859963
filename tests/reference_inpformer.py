"""An independent, deliberately literal reference of the official INP-Former computation.

Written from the method spec in the *official code's style* (Meta-named raw weights, explicit
per-step tensor code, ``register_hook`` gradient re-weighting, broadcast cosine similarities), and
sharing no code with ``components``. The tests compare our model against it with the same weights.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F


def ref_pos_embed(pos_meta: torch.Tensor, grid: int) -> torch.Tensor:
    """Meta pos_embed 1×(1+M²)×C → 1×(1+grid²)×C with DINOv2's offset-0.1 bicubic rule."""
    cls_pos, patch_pos = pos_meta[:, :1], pos_meta[:, 1:]
    m = int(math.sqrt(patch_pos.shape[1]))
    if grid == m:
        return pos_meta
    c = patch_pos.shape[-1]
    sx = float(grid + 0.1) / m
    table = F.interpolate(
        patch_pos.reshape(1, m, m, c).permute(0, 3, 1, 2),
        scale_factor=(sx, sx),
        mode="bicubic",
        antialias=False,
    )
    assert table.shape[-2:] == (grid, grid)
    return torch.cat([cls_pos, table.permute(0, 2, 3, 1).reshape(1, -1, c)], dim=1)


def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_encoder_taps(
    sd: dict[str, torch.Tensor], images: torch.Tensor, taps: list[int], heads: int
) -> list[torch.Tensor]:
    """DINOv2-reg4 forward from Meta-named weights; returns tapped patch tokens (prefix removed)."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    b, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + ref_pos_embed(sd["pos_embed"], gh)
    x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    out = []
    for i in range(max(taps) + 1):
        p = f"blocks.{i}."
        h = ref_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        qkv = qkv.reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        a = a @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + a * sd[p + "ls1.gamma"]
        h = ref_layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h * sd[p + "ls2.gamma"]
        if i in taps:
            out.append(x[:, 5:, :])
    return out


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _mlp(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return _lin(F.gelu(_lin(x, sd, p + "fc1")), sd, p + "fc2")


def ref_inpformer(sd: dict[str, torch.Tensor], images: torch.Tensor, taps: list[int], heads: int, depth: int = 8):
    """The official forward on official-named weights: returns (en, de, g_loss, agg_prototype, x_fq)."""
    en_list = ref_encoder_taps({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
                               images, taps, heads)  # fmt: skip
    b = images.shape[0]
    side = int(math.sqrt(en_list[0].shape[1]))
    x = torch.stack(en_list, dim=1).mean(dim=1)
    fq = x
    c = x.shape[-1]
    hd = c // heads
    # INP extractor (aggregation block, shared norm1)
    t = sd["prototype_token.0"].unsqueeze(0).repeat((b, 1, 1))
    p = "aggregation.0."
    n1t = ref_layer_norm(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-8)
    n1x = ref_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-8)
    q = _lin(n1t, sd, p + "attn.q").reshape(b, -1, 1, heads, hd).permute(2, 0, 3, 1, 4)[0]
    kv = _lin(n1x, sd, p + "attn.kv").reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * hd**-0.5).softmax(-1)
    y = _lin((attn @ kv[1]).transpose(1, 2).reshape(b, -1, c), sd, p + "attn.proj")
    t = t + y
    t = t + _mlp(ref_layer_norm(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-8), sd, p + "mlp.")
    protos = t
    # gather loss (broadcast cosine similarity, as the official code)
    dist = 1.0 - F.cosine_similarity(x.unsqueeze(2), protos.unsqueeze(1), dim=-1)
    g_loss = dist.min(dim=2)[0].mean()
    # bottleneck
    x = _mlp(x, sd, "bottleneck.0.")
    de_list = []
    for i in range(depth):
        p = f"decoder.{i}."
        n1x = ref_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-8)
        n1p = ref_layer_norm(protos, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-8)
        q = _lin(n1x, sd, p + "attn.q").reshape(b, -1, 1, heads, hd).permute(2, 0, 3, 1, 4)[0]
        kv = _lin(n1p, sd, p + "attn.kv").reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        qn = F.normalize(q, dim=-1)
        kn = F.normalize(kv[0], dim=-1)
        a = F.relu((qn @ kn.transpose(-2, -1)) * sd[p + "attn.learn_scale"])
        y = _lin((a @ kv[1]).transpose(1, 2).reshape(b, -1, c), sd, p + "attn.proj")
        x = y + _mlp(ref_layer_norm(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-8), sd, p + "mlp.")
        de_list.append(x)
    de_list = de_list[::-1]
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    en = [torch.stack([en_list[i] for i in g], 1).mean(1) for g in groups]
    de = [torch.stack([de_list[i] for i in g], 1).mean(1) for g in groups]
    en = [e.permute(0, 2, 1).reshape([b, -1, side, side]).contiguous() for e in en]
    de = [d.permute(0, 2, 1).reshape([b, -1, side, side]).contiguous() for d in de]
    return en, de, g_loss, protos, fq


def _modify_grad(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return grad * factor.expand_as(grad)


def ref_global_cosine_hm_adaptive(a: list[torch.Tensor], b: list[torch.Tensor], y: float = 3.0) -> torch.Tensor:
    """The official soft-mining loss with backward hooks on the decoder maps."""
    cos = torch.nn.CosineSimilarity()
    loss = 0.0
    for item in range(len(a)):
        a_ = a[item].detach()
        b_ = b[item]
        with torch.no_grad():
            point_dist = 1 - cos(a_, b_).unsqueeze(1)
        factor = (point_dist / point_dist.mean()) ** y
        loss = loss + torch.mean(1 - cos(a_.reshape(a_.shape[0], -1), b_.reshape(b_.shape[0], -1)))
        b_.register_hook(partial(_modify_grad, factor=factor))
    return loss / len(a)
