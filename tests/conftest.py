"""Shared fixtures: tiny random-weight models, offline and on CPU; the one rule for numeric tolerances.

Numeric tolerances (every comparison of two computations of the same values: SDPA vs the explicit
softmax, DDP vs one process, exported runtimes vs eager PyTorch, bf16 vs fp32, our model vs the
reference implementation) follow one rule, derived from the dtype and the size of the computation,
never from what one machine measured:

* **Reordering** (another kernel, thread count, all-reduce or runtime sums the same terms in another
  order): each term of a reduction is a multiply and an add, each rounded by at most the unit
  roundoff ``u = eps / 2``, so at most ``eps`` per term; independent rounding errors add like a
  random walk, so over a reduction of ``n`` terms in each of ``depth`` layers in sequence the error,
  relative to the compared tensor's scale (its largest magnitude), has a standard deviation of about
  ``eps * sqrt(n * depth)``. :func:`reorder_tolerance` allows ``SIGMAS`` standard deviations.
* **Storage rounding** (bf16 vs fp32: every layer's inputs and weights are rounded to the lower
  precision once, ``eps`` of it per layer), adding over ``depth`` layers like a random walk:
  :func:`storage_tolerance` = ``SIGMAS * eps * sqrt(depth)``.

:func:`max_rel_diff` measures ``max |got - want| / max |want|``. A real defect (a wrong term, a
missing layer) moves values by O(1) of the scale, far above these bounds. The numeric tests also run
with 1 and 2 torch threads (the ``torch_threads`` fixture), so a thread-count dependence shows in CI.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as hermetic_env: busy CI cores
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))

SIGMAS = 8  # standard deviations of rounding noise a tolerance allows


def reorder_tolerance(n: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Relative tolerance for a reordered computation: ``SIGMAS * eps * sqrt(n * depth)`` (see the module)."""
    return SIGMAS * torch.finfo(dtype).eps * math.sqrt(n * depth)


def storage_tolerance(depth: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Relative tolerance for a computation stored in ``dtype`` instead of fp32: ``SIGMAS * eps * sqrt(depth)``."""
    return SIGMAS * torch.finfo(dtype).eps * math.sqrt(depth)


def max_rel_diff(got, want) -> float:
    """``max |got - want| / max |want|`` (tensors or arrays), in float64."""
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


TINY = {"embed_dim": 32, "num_heads": 2}
# The tiny model's computation, for the tolerance rule: the widest reduction of one layer (the MLP's
# second projection sums its 4 x 32 hidden units; attention sums over 16 + 5 tokens at 56 px) and
# the layers in sequence from the image to the decoder output (12 encoder blocks, 1 extractor, 8
# decoder blocks); scoring adds the map's resize and blur.
TINY_REDUCTION = 4 * TINY["embed_dim"]
TINY_DEPTH = 12 + 1 + 8
SCORING_DEPTH = TINY_DEPTH + 2
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


def copy_repository(dst: Path) -> Path:
    """The files git tracks (as they are in the working tree) copied into ``dst``, made a fresh git
    repository (DVC wants one); returns ``dst``."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (root / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


@pytest.fixture(scope="session")
def e2e_project(tmp_path_factory):
    """The tiny DVC project after its baseline ``dvc repro`` (committed), shared by test_pipeline and
    test_settings: one baseline run for both (CI time). (project, env, the baseline's output)."""
    from test_pipeline import BIN, _run, make_project

    proj, env = make_project(tmp_path_factory.mktemp("e2e"))
    first = _run([str(BIN / "dvc"), "repro"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "baseline"], proj, env)  # dvc.lock and metrics/ are versioned by git
    return proj, env, first


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def torch_threads(request):
    """Run a numeric test with 1 and with 2 torch threads (kernels split reductions by thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


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
