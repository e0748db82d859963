"""Model: shapes, gradients, parity with an independent reference of the official code, interop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, tiny_model
from reference_inpformer import ref_encoder_taps, ref_global_cosine_hm_adaptive, ref_inpformer

from components.engine.losses import NormalPatternLoss
from components.model import (
    EncoderWeightsError,
    FrozenDinoEncoder,
    InpFormer,
    InpFormerConfig,
    convert_meta_dinov2_state_dict,
    load_pretrained,
)


@pytest.mark.parametrize(
    ("name", "taps"),
    [
        ("dinov2reg_vit_small_14", (2, 3, 4, 5, 6, 7, 8, 9)),
        ("dinov2reg_vit_base_14", (2, 3, 4, 5, 6, 7, 8, 9)),
        ("dinov2reg_vit_large_14", (4, 6, 8, 10, 12, 14, 16, 18)),
    ],
)
def test_token_grid_and_shapes(name: str, taps: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = InpFormer(InpFormerConfig(name, image_size=392, num_prototypes=6, encoder_overrides=TINY, seg_head=None))
    assert model.encoder.taps == taps
    x = torch.randn(2, 3, 392, 392)
    tokens, grid = model.encoder.prepare_tokens(x)
    assert grid == (28, 28)
    assert tokens.shape == (2, 789, 32)  # cls + 4 registers + 784 patches (spec §17)
    out = model(x)
    assert len(out.encoder_groups) == len(out.decoder_groups) == 2
    for g in out.encoder_groups + out.decoder_groups:
        assert g.shape == (2, 32, 28, 28)
    assert out.prototypes.shape == (2, 6, 32)
    assert out.fused_features.shape == (2, 784, 32)
    expected_depth = 24 if "large" in name else 12
    assert model.encoder.depth == expected_depth


def test_gradients_reach_trainables_not_encoder(tiny: InpFormer) -> None:
    x = torch.randn(2, 3, 56, 56)
    loss = NormalPatternLoss()(tiny(x))["total"]
    loss.backward()
    for n, p in tiny.named_parameters():
        if n.startswith("encoder."):
            assert p.grad is None and not p.requires_grad, n
        elif n.startswith("seg_head."):
            assert p.grad is None, f"normal-pattern loss must not reach the head ({n})"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"


def test_segmentation_loss_reaches_only_the_head(tiny: InpFormer) -> None:
    x = torch.randn(2, 3, 56, 56)
    out = tiny(x)
    logits = tiny.segment(out)
    assert logits.shape == (2, 1, 56, 56)
    torch.sigmoid(logits).mean().backward()
    for n, p in tiny.named_parameters():
        if n.startswith("seg_head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, f"stop-gradient violated: {n}"


@pytest.mark.slow  # builds the full ViT-B
def test_vit_b_parameter_counts() -> None:
    model = InpFormer(InpFormerConfig("dinov2reg_vit_base_14", image_size=392, seg_head="onenip"))
    trunk = sum(p.numel() for p in model.trunk_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    assert abs(trunk - 68.52e6) < 0.005e6  # spec §17: ≈ 68.52 M
    assert abs(head - 2.885e6) < 0.001e6  # spec §13.4: OneNIP-style 256-channel head
    dec = model.decoder[0]
    assert dec.attn.learn_scale.shape == (12, 1, 1) and torch.all(dec.attn.learn_scale == 1)
    assert model.prototype_token.shape == (6, 768)
    # official init: trunc normal std 0.01 within ±0.03, zero bias, unit LayerNorm
    w = model.decoder[3].mlp.fc1.weight.detach()
    # N(0, 0.01²) cut at ±3σ has std 0.01·sqrt(1 − 6φ(3)/(2Φ(3) − 1)) ≈ 0.009866
    assert w.abs().max() <= 0.03 and abs(float(w.std()) - 0.009866) < 0.0002
    assert torch.all(model.decoder[3].mlp.fc1.bias == 0) and torch.all(model.decoder[3].norm1.weight == 1)
    assert abs(float(model.prototype_token.detach().std()) - 1.0) < 0.1  # randn, untouched by the trunc init


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"encoder_name": "resnet50"}, "resnet50"),
        ({"taps": (2, 3, 4, 5, 6, 7, 8, 12)}, "[12]"),
        ({"image_size": 100}, "100"),
        ({"encoder_groups": ((0, 1), (2, 9))}, "[9]"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        tiny_model(**kwargs)
    assert needle in str(err.value)


def test_pos_embed_official_interpolation() -> None:
    enc = FrozenDinoEncoder("small", overrides=TINY)
    table = enc.vit.pos_embed.detach()
    assert torch.equal(enc.patch_pos_embed((37, 37)), enc.vit.pos_embed)  # 518 px: unchanged
    got = enc.patch_pos_embed((28, 28))
    c = table.shape[-1]
    grid = table.reshape(1, 37, 37, c).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=28.1 / 37, mode="bicubic", antialias=False)
    assert want.shape[-1] == 28
    assert torch.allclose(got, want.permute(0, 2, 3, 1).reshape(1, -1, c))
    by_size = torch.nn.functional.interpolate(grid, size=(28, 28), mode="bicubic", antialias=False)
    assert not torch.allclose(got, by_size.permute(0, 2, 3, 1).reshape(1, -1, c))  # the 0.1 offset matters
    timm_style = FrozenDinoEncoder("small", overrides=TINY, pos_embed_interp="timm")
    timm_style.load_state_dict(enc.state_dict())
    assert not torch.allclose(timm_style.patch_pos_embed((28, 28)), got)


def _official_state_dict(model: InpFormer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official naming (encoder in Meta naming) for ``model``'s shapes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    enc = model.encoder.vit.state_dict()
    c = enc["cls_token"].shape[-1]
    for k, v in enc.items():
        if k in ("cls_token", "pos_embed", "reg_token") or k.startswith("norm."):
            continue
        scale = 0.02 if k.endswith("weight") and v.ndim > 1 else 0.1
        base = 1.0 if (k.endswith("norm1.weight") or k.endswith("norm2.weight")) else 0.0
        sd[f"encoder.{k}"] = base + scale * torch.randn(v.shape, generator=g)
    sd["encoder.cls_token"] = torch.randn(1, 1, c, generator=g)
    sd["encoder.pos_embed"] = 0.5 * torch.randn(1, 1 + 37 * 37, c, generator=g)
    sd["encoder.register_tokens"] = torch.randn(1, 4, c, generator=g)
    sd["encoder.mask_token"] = torch.zeros(1, c)
    sd["encoder.norm.weight"] = torch.ones(c)
    sd["encoder.norm.bias"] = torch.zeros(c)
    for k, v in model.state_dict().items():
        if k.startswith(("encoder.", "seg_head.")):
            continue
        name = "prototype_token.0" if k == "prototype_token" else k
        if "norm" in k and k.endswith("weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("learn_scale"):
            sd[name] = 1.0 + 0.5 * torch.rand(v.shape, generator=g)
        else:
            sd[name] = 0.08 * torch.randn(v.shape, generator=g)
    return sd


@pytest.mark.parametrize("size", [224, 56])
def test_parity_with_reference_official_computation(size: int, torch_threads) -> None:
    """Our model vs an independent transcription of the official computation: the same sums in
    another order (conftest's rule; backward doubles the depth, the losses sum over every element)."""
    from conftest import TINY_DEPTH, TINY_REDUCTION, max_rel_diff, reorder_tolerance

    tokens = (size // 14) ** 2 + 5  # patches + class and register tokens: the attention's sums
    n = max(TINY_REDUCTION, tokens)
    encoder, forward, backward = (reorder_tolerance(n, d) for d in (12, TINY_DEPTH, 2 * TINY_DEPTH))
    torch.manual_seed(0)
    model = tiny_model(image_size=size, num_prototypes=6, seg_head=None)
    sd = _official_state_dict(model)
    model.load_official_state_dict(sd)
    assert model.pretrained_loaded
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    ref = {k: v.clone().requires_grad_(not k.startswith("encoder.")) for k, v in sd.items()}
    en_r, de_r, g_r, p_r, fq_r = ref_inpformer(ref, x, list(model.encoder.taps), heads=2)
    loss_r = ref_global_cosine_hm_adaptive(en_r, de_r, 3.0) + 0.2 * g_r
    loss_r.backward()

    out = model(x)
    loss_fn = NormalPatternLoss(gamma=3.0, lam=0.2, coherence="hard")
    terms = loss_fn(out)
    terms["total"].backward()

    taps_r = ref_encoder_taps(
        {k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, x, list(model.encoder.taps), 2
    )
    taps, _ = model.encoder(x)
    for a, b in zip(taps, taps_r):
        assert max_rel_diff(a, b) <= encoder
    assert max_rel_diff(out.fused_features, fq_r) <= encoder
    assert max_rel_diff(out.prototypes, p_r) <= reorder_tolerance(n, 13)
    elements = out.fused_features.numel()  # the losses sum over every element
    assert max_rel_diff(terms["coherence"], g_r) <= reorder_tolerance(elements, TINY_DEPTH)
    assert max_rel_diff(terms["total"], loss_r) <= reorder_tolerance(elements, TINY_DEPTH)
    for a, b in zip(out.encoder_groups, en_r):
        assert max_rel_diff(a, b) <= encoder
    for a, b in zip(out.decoder_groups, de_r):
        assert max_rel_diff(a, b) <= forward
    for i, blk in enumerate(model.decoder):
        for name, p in blk.named_parameters():
            assert max_rel_diff(p.grad, ref[f"decoder.{i}.{name}"].grad) <= backward, f"decoder.{i}.{name}"
    assert max_rel_diff(model.prototype_token.grad, ref["prototype_token.0"].grad) <= backward


def test_chunked_meta_checkpoint_is_converted() -> None:
    """Meta's chunked checkpoints name blocks blocks.<chunk>.<i>.; cls gets its position row added."""
    c = 4
    pos = torch.arange(1 + 9, dtype=torch.float32).repeat_interleave(c).reshape(1, 10, c)
    state = {
        "cls_token": torch.ones(1, 1, c),
        "pos_embed": pos,
        "register_tokens": torch.full((1, 4, c), 2.0),
        "mask_token": torch.zeros(1, c),
        "blocks.1.7.attn.qkv.weight": torch.eye(c),
        "blocks.3.norm1.bias": torch.zeros(c),
    }
    out = convert_meta_dinov2_state_dict(state)
    assert set(out) == {"cls_token", "pos_embed", "reg_token", "blocks.7.attn.qkv.weight", "blocks.3.norm1.bias"}
    assert torch.equal(out["cls_token"], torch.ones(1, 1, c))  # 1 + pos row 0 (= 0)
    assert torch.equal(out["pos_embed"], pos[:, 1:]) and out["pos_embed"].shape == (1, 9, c)
    assert torch.equal(out["reg_token"], state["register_tokens"])
    shifted = convert_meta_dinov2_state_dict({**state, "pos_embed": pos + 1})
    assert torch.equal(shifted["cls_token"], torch.full((1, 1, c), 2.0))


def test_config_roundtrip_builds_the_same_network(tiny: InpFormer) -> None:
    cfg = tiny.config
    again = InpFormerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    rebuilt = InpFormer(again)
    assert rebuilt.state_dict().keys() == tiny.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(), tiny.state_dict().values()))
    legacy = {**cfg.to_dict(), "pretrained": "auto", "weights": None, "download": True}  # older model folders
    assert InpFormerConfig.from_dict(legacy) == cfg
    with pytest.raises(ValueError, match="num_protoypes"):
        InpFormerConfig.from_dict({**cfg.to_dict(), "num_protoypes": 3})


def test_building_a_model_opens_no_socket(monkeypatch) -> None:
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened while building a model")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = tiny_model()
    assert model.pretrained_loaded is False and model.encoder.weights_source == "random-init"


def test_load_official_state_dict_rejects_wrong_keys(tiny: InpFormer) -> None:
    sd = _official_state_dict(tiny)
    sd.pop("decoder.0.attn.q.weight")
    with pytest.raises(KeyError, match=r"decoder\.0\.attn\.q\.weight"):
        tiny.load_official_state_dict(sd)


def test_encoder_weight_files_meta_and_timm(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = FrozenDinoEncoder("small", overrides=TINY)
    x = torch.randn(1, 3, 56, 56)
    want, _ = ref(x)
    # timm format (safetensors)
    save_file({k: v.contiguous() for k, v in ref.vit.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = FrozenDinoEncoder("small", overrides=TINY)
    assert load_pretrained(enc, True, weights=tmp_path / "w.safetensors") and enc.pretrained_loaded
    got, _ = enc(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # Meta format (.pth, loaded with weights_only=True): cls without its position, pos with cls row
    sd = {k: v.clone() for k, v in ref.vit.state_dict().items()}
    pos0 = torch.zeros(1, 1, sd["cls_token"].shape[-1])
    meta = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    meta.update(
        cls_token=sd["cls_token"],
        pos_embed=torch.cat([pos0, sd["pos_embed"]], 1),
        register_tokens=sd["reg_token"],
        mask_token=torch.zeros(1, sd["cls_token"].shape[-1]),
    )
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    enc2 = FrozenDinoEncoder("small", overrides=TINY)
    assert load_pretrained(enc2, True, weights_dir=tmp_path)
    assert enc2.pretrained_loaded and enc2.weights_source.endswith(".pth")
    got2, _ = enc2(x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got2, want))


def test_offline_pretrained_true_fails_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsError) as err:
        load_pretrained(FrozenDinoEncoder("base", overrides=TINY), True, weights_dir=tmp_path)
    msg = str(err.value)
    assert "dinov2_vitb14_reg4_pretrain.pth" in msg and "weights=<file>" in msg and "HF_HUB_OFFLINE" in msg


def test_offline_auto_warns_and_records(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = FrozenDinoEncoder("small", overrides=TINY)
    with pytest.warns(UserWarning, match="RANDOM-INIT ENCODER"):
        assert load_pretrained(enc, "auto", weights_dir=tmp_path) is False
    assert enc.pretrained_loaded is False and enc.weights_source == "random-init"


def test_missing_weight_file_is_named(tmp_path) -> None:
    with pytest.raises(EncoderWeightsError, match="nope.pth"):
        load_pretrained(FrozenDinoEncoder("small", overrides=TINY), True, weights=tmp_path / "nope.pth")


def test_encoder_stays_frozen_in_train_mode(tiny: InpFormer) -> None:
    tiny.train()
    assert not tiny.encoder.training and tiny.decoder.training
    assert all(not p.requires_grad for p in tiny.encoder.parameters())


def test_attention_output_for_figure(tiny: InpFormer) -> None:
    out = tiny(torch.randn(1, 3, 56, 56), return_attention=True)
    assert len(out.attention) == 8
    assert out.attention[0].shape == (1, 2, 16, 3)  # B×heads×N×M
    assert torch.all(out.attention[0] >= 0)  # ReLU attention
    assert math.isfinite(float(out.attention[-1].sum()))


def test_sdpa_attention_matches_the_explicit_softmax(torch_threads) -> None:
    """attention=sdpa (encoder ViT blocks + INP extractor) vs the official explicit softmax, fp32 CPU:
    the same sums in another order (conftest's tolerance rule)."""
    from conftest import TINY_DEPTH, TINY_REDUCTION, max_rel_diff, reorder_tolerance, tiny_model

    torch.manual_seed(0)
    explicit = tiny_model().eval()
    fused = tiny_model(attention="sdpa").eval()
    fused.load_state_dict(explicit.state_dict())
    assert all(b.attn.fused_attn for b in fused.encoder.vit.blocks)
    assert not any(b.attn.fused_attn for b in explicit.encoder.vit.blocks)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = explicit(x), fused(x)
    pairs = [(a.prototypes, b.prototypes), (a.fused_features, b.fused_features)]
    pairs += list(zip(a.decoder_groups, b.decoder_groups))
    tolerance = reorder_tolerance(TINY_REDUCTION, TINY_DEPTH)
    for ref, got in pairs:
        assert max_rel_diff(got, ref) <= tolerance
    auto = tiny_model(attention="auto").eval()
    auto.load_state_dict(explicit.state_dict())
    with torch.no_grad():
        same = auto(x)  # on CPU, auto is the explicit path: bit-identical
    assert torch.equal(same.prototypes, a.prototypes) and torch.equal(same.decoder_groups[0], a.decoder_groups[0])


def test_bf16_encoder_gives_fp32_features_close_to_fp32(torch_threads) -> None:
    from conftest import max_rel_diff, storage_tolerance, tiny_model

    torch.manual_seed(0)
    ref = tiny_model().eval()
    low = tiny_model(encoder_dtype="bf16").eval()
    low.load_state_dict(ref.state_dict())
    assert next(low.encoder.parameters()).dtype == torch.bfloat16
    assert next(low.decoder.parameters()).dtype == torch.float32  # the trainable part stays fp32
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = ref(x), low(x)
    assert b.fused_features.dtype == torch.float32
    rel = max_rel_diff(b.fused_features, a.fused_features)
    assert 0 < rel <= storage_tolerance(len(ref.encoder.vit.blocks))  # the bf16 encoder's 12 blocks: close, not equal
