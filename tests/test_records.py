"""Records and the one training path: what each setting trains on, from a prepared workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import tiny_model

from components.data import batch as keys
from components.data.datasets import ImageDataset, Record, write_manifest
from components.data.fewshot import NUM_AUGMENTATIONS, FewShotDataset
from components.data.semi import SemiSupervisedDataset
from components.engine.feature_cache import CachedFeatureDataset
from pipelines.config import load_params
from pipelines.stages import prepare, synthesize
from pipelines.stages.records import evaluation_records, load_records, pseudo_anomaly_bank, training_groups
from pipelines.stages.training_data import training_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=64",
    "data.crop_size=56",
    "data.synthetic.size=64",
    "data.synthetic.n_train=6",
    "data.synthetic.n_test_good=2",
    "data.synthetic.n_test_per_defect=1",
    "data.synthetic.categories=[brick, washer]",
    "synthesis.bank_copies=1",
    "model.encoder_overrides={embed_dim: 32, num_heads: 2}",
    "model.seg_head_channels=8",
    "setting.few_shot_k=2",
    "setting.semi_supervised_n=1",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    p = load_params("params.yaml", TINY)
    prepare(p)
    synthesize(p, progress=False)
    yield root
    mp.undo()


def _params(*extra: str):
    return load_params("params.yaml", [*TINY, *extra])


def _dataset(p):
    records = load_records(p)
    (group, recs), *_ = training_groups(p, records).items()
    return training_dataset(p, recs, records, tiny_model(), "cpu", False), recs, records


def test_multi_class_uses_the_bank_and_the_feature_cache(workspace) -> None:
    p = _params()
    ds, recs, records = _dataset(p)
    assert list(training_groups(p, records)) == ["all"] and len(recs) == 12
    assert isinstance(ds, CachedFeatureDataset) and len(ds) == 12
    item = ds[0]
    assert {keys.FEATURES, keys.ANOMALY_FEATURES, keys.ANOMALY_MASK} <= set(item)
    bank = pseudo_anomaly_bank(p, recs)
    assert bank is not None and all(len(b) == 1 for b in bank)
    plain, _, _ = _dataset(_params("train.feature_cache=false"))
    assert isinstance(plain, ImageDataset) and plain.bank == bank


def test_single_class_has_one_group_per_category(workspace) -> None:
    p = _params("setting.kind=single_class")
    groups = training_groups(p, load_records(p))
    assert sorted(groups) == ["brick", "washer"]
    assert all({r.category for r in g} == {c} and len(g) == 6 for c, g in groups.items())


def test_few_shot_trains_on_k_shots_times_22(workspace) -> None:
    ds, recs, _ = _dataset(_params("setting.kind=few_shot"))
    assert isinstance(ds, FewShotDataset)
    assert len(ds) == 2 * 2 * NUM_AUGMENTATIONS  # k=2 shots × 2 categories × 22 augmentations
    assert len({ds[i][keys.PATH] for i in range(len(ds))}) == 4
    assert {ds[i][keys.PATH] for i in range(len(ds))} <= {r.path for r in recs}


def test_semi_supervised_removes_its_anomalies_from_the_test_split(workspace) -> None:
    p = _params("setting.kind=semi_supervised")
    ds, _, records = _dataset(p)
    assert isinstance(ds, SemiSupervisedDataset) and len(ds.cutouts) == 2  # n=1 per category
    all_test = [r for r in records if r.split == "test"]
    assert len(evaluation_records(p, records)) == len(all_test) - 2
    multi = _params()
    assert len(evaluation_records(multi, load_records(multi))) == len(all_test)


def test_super_multi_class_qualifies_categories(workspace) -> None:
    for name, cat in (("mvtec", "bottle"), ("visa", "candle")):
        write_manifest(
            Path("data/prepared") / name / "manifest.csv", [Record(f"/x/{name}/{cat}/0.png", cat, "train", 0)]
        )
    p = load_params("params.yaml", ["data.name=mvtec", "data.extra_sources=[visa]", "setting.kind=super_multi_class"])
    recs = load_records(p)
    assert sorted(r.category for r in recs) == ["mvtec/bottle", "visa/candle"]
    assert list(training_groups(p, recs)) == ["all"]
    with pytest.raises(ValueError, match="not in the prepared data"):
        load_records(load_params("params.yaml", ["data.name=mvtec", "data.categories=[nope]"]))
