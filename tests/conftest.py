"""Shared fixtures: tiny random-weight models, offline and on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = {"embed_dim": 32, "num_heads": 2}
# params overrides for pipeline tests: the embedded synthetic data and the model at the smallest size
TINY_PIPELINE = [
    "data.image_size=64",
    "data.crop_size=56",
    "data.synthetic.size=64",
    "data.synthetic.n_test_good=2",
    "data.synthetic.n_test_per_defect=1",
    "data.synthetic.categories=[brick]",
    "synthesis.bank_copies=1",
    "model.encoder_overrides={embed_dim: 32, num_heads: 2}",
    "model.seg_head_channels=8",
    "train.batch_size=4",
    "train.warmup_iters=2",
    "eval.resize=64",
]


def tiny_model(**kw):
    """A DINOv2-shaped InpFormer with a 32-wide encoder (fast on CPU)."""
    from components.model import InpFormer, InpFormerConfig

    args = dict(
        encoder_name="dinov2reg_vit_small_14",
        image_size=56,
        num_prototypes=3,
        encoder_overrides=TINY,
        seg_head="onenip",
        seg_head_channels=8,
    )
    args.update(kw)
    return InpFormer(InpFormerConfig(**args))


def bare_package(model, resize: int | None = None, categories: tuple[str, ...] = ()):
    """The package of ``model`` alone (resize side: its crop unless given)."""
    from components.scoring.package import ModelPackage

    return ModelPackage(model.config, resize or model.config.image_size, categories)


def model_workspace(root: Path, categories: list[str], thresholds: dict | None = None) -> Path:
    """``root`` as a workspace (params.yaml) holding a tiny model folder ``artifacts/models/all`` of
    ``categories`` (images resized to 64, cropped to 56) and, when given, the package the evaluate
    stage would calibrate (``artifacts/eval/packages/all``: params.yaml's scoring, these thresholds)."""
    import shutil

    from components.engine.checkpoint import save_model
    from components.scoring.decision import CategoryThresholds
    from components.scoring.package import ModelPackage, read_package, write_package
    from pipelines.builders import build_scoring
    from pipelines.config import load_params

    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", root / "params.yaml")
    torch.manual_seed(0)
    model = tiny_model(image_size=56)
    folder = save_model(root / "artifacts" / "models" / "all", model, ModelPackage(model.config, 64, tuple(categories)))
    if thresholds is not None:
        scoring = build_scoring(load_params(root / "params.yaml"), has_head=True)
        rules = {c: CategoryThresholds.from_dict(t) for c, t in thresholds.items()}
        write_package(root / "artifacts" / "eval" / "packages" / "all", read_package(folder).calibrate(scoring, rules))
    return root


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return tiny_model()


@pytest.fixture(autouse=True)
def _tracking_store_fresh():
    """A tracking store that failed in one test is tried again in the next."""
    yield
    from pipelines.tracking.guard import reset_unavailable

    reset_unavailable()
