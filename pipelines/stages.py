"""The pipeline stages behind ``inpformer prepare | synthesize | train | evaluate``.

Each stage reads validated params, calls ``components``, writes its outputs atomically under
``data/`` or ``artifacts/`` and records an MLflow run. DVC runs them as plain commands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from components.checkpoint import atomic_write_text, load_model, save_model
from components.data.datasets import ImageDataset, Record, read_manifest, write_manifest
from components.data.io import read_rgb
from components.data.readers import (
    MVTEC_CATEGORIES,
    ScanReport,
    flat_records,
    mvtec_records,
    validate_records,
)
from components.engine import predict, seed_everything
from components.engine import train as engine_train
from components.metrics import METRIC_KEYS, evaluate_arrays
from pipelines.builders import (
    build_loss,
    build_model,
    build_synthesizer,
    build_train_config,
    build_transform,
    map_kind,
    model_kwargs,
    resolve_device,
)
from pipelines.config import Params

logger = logging.getLogger(__name__)

DATA = Path("data")
ARTIFACTS = Path("artifacts")

__all__ = ["evaluate", "prepare", "synthesize", "train"]


def _manifest_path(name: str) -> Path:
    return DATA / "prepared" / name / "manifest.csv"


def _rel(path: str, base: Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())


def count_table(records: list[Record]) -> list[dict[str, Any]]:
    """Rows of category | train good | test good | test anomalous (+ a total row)."""
    c = Counter((r.category, r.split, r.label) for r in records)
    cats = list(dict.fromkeys(r.category for r in records))
    rows = [
        {
            "category": k,
            "train_good": c[(k, "train", 0)],
            "test_good": c[(k, "test", 0)],
            "test_anomalous": c[(k, "test", 1)],
        }
        for k in cats
    ]
    rows.append({k: (sum(r[k] for r in rows) if k != "category" else "total") for k in rows[0]} if rows else {})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width table."""
    if not rows:
        return "(empty)"
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "  ".join(k.ljust(width[k]) for k in keys)
    body = [
        "  ".join(str(r[k]).rjust(width[k]) if k != "category" else str(r[k]).ljust(width[k]) for k in keys)
        for r in rows
    ]
    return "\n".join([line, "-" * len(line), *body])


# -- prepare ---------------------------------------------------------------------------------------
def prepare(p: Params, source: str | None = None, dataset: str | None = None, name: str | None = None) -> Path:
    """Index (and for ``synthetic``, generate) a dataset into ``data/prepared/<name>/manifest.csv``."""
    from components.data.download import DATASET_SOURCES, fetch_dataset

    kind = dataset or p.data.dataset
    name = name or p.data.name
    source = source if source is not None else p.data.source
    report = ScanReport()
    raw_dir = DATA / "raw" / name
    if kind == "dtd":  # the texture source of the pseudo anomalies, not a dataset to index
        root = fetch_dataset("dtd", DATA / "raw" / "dtd", source or None)
        images = root / "images" if (root / "images").is_dir() else root
        n = sum(1 for f in images.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        print(f"DTD textures: {n} images in {images}\nSet synthesis.texture_dir: {images}")
        return images
    if kind == "synthetic":
        from components.data.synthetic import generate_synthetic

        s = p.data.synthetic
        root = generate_synthetic(raw_dir, s.seed, s.size, s.n_train, s.n_test_good, s.n_test_per_defect, s.categories)
        records = mvtec_records(root, report=report)
    elif kind in ("folder", "mvtec", "mpdd", "btad", "visa", "realiad"):
        if kind == "folder":
            if not source:
                msg = "data.dataset=folder needs --from <folder in MVTec layout> (or data.source)."
                raise ValueError(msg)
            root = Path(source)
        else:
            root = fetch_dataset(kind, raw_dir, source or None)
        if kind == "realiad":
            from components.data.readers import realiad_records

            records = realiad_records(
                root / "realiad_1024",
                root / "realiad_jsons" / "realiad_jsons",
                p.data.categories or None,
                report,
            )
        else:
            order = MVTEC_CATEGORIES if kind == "mvtec" else DATASET_SOURCES.get(kind, {}).get("order", ())
            records = mvtec_records(root, p.data.categories or None, order=order, report=report)
    else:  # flat
        if not source:
            raise ValueError("data.dataset=flat needs --from <folder with good/ and bad/ (and masks/)>.")
        root = Path(source)
        records = flat_records(
            root / "good", root / "bad" if (root / "bad").is_dir() else None,
            root / "masks" if (root / "masks").is_dir() else None,
            root / "test_good" if (root / "test_good").is_dir() else None,
            category=name, seed=p.seed, report=report,
        )  # fmt: skip
    raw_dir.mkdir(parents=True, exist_ok=True)  # a DVC out even when the images stay where they are
    if kind in ("folder", "flat"):
        atomic_write_text(raw_dir / "SOURCE.txt", f"{kind}: {Path(source).resolve()}\n")
    records = validate_records(records, report, skip_bad=p.data.skip_bad, progress=False)
    report.raise_if_problems(
        "Fix or remove the files listed above, or set data.skip_bad: true to skip them (they are counted)."
    )
    out_dir = _manifest_path(name).parent
    rel = [
        Record(
            _rel(r.path, out_dir),
            r.category,
            r.split,
            r.label,
            _rel(r.mask_path, out_dir) if r.mask_path else "",
            r.defect,
        )
        for r in records
    ]
    write_manifest(_manifest_path(name), rel)
    rows = count_table(records)
    atomic_write_text(out_dir / "counts.json", json.dumps(rows, indent=2))
    print(f"Prepared '{name}' ({kind}) → {_manifest_path(name)}")
    print(format_table(rows))
    if report.skipped_non_images:
        print(f"Skipped {len(report.skipped_non_images)} non-image file(s), e.g. {report.skipped_non_images[0]}")
    if report.skipped_bad:
        print(f"Skipped {len(report.skipped_bad)} unreadable file(s) (data.skip_bad), e.g. {report.skipped_bad[0]}")
    if report.conversions:
        print("Converted: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.conversions.items())))
    return _manifest_path(name)


def _records(p: Params) -> list[Record]:
    """Manifest records of the configured dataset(s), filtered to the configured categories."""
    names = [p.data.name, *p.data.extra_sources]
    out: list[Record] = []
    for n in names:
        recs = read_manifest(_manifest_path(n))
        if len(names) > 1:  # super-multi-class: categories are qualified by their dataset
            recs = [Record(r.path, f"{n}/{r.category}", r.split, r.label, r.mask_path, r.defect) for r in recs]
        out += recs
    if p.data.categories:
        wanted = set(p.data.categories)
        absent = wanted - {r.category for r in out}
        if absent:
            msg = f"data.categories {sorted(absent)} are not in the prepared data."
            raise ValueError(msg)
        out = [r for r in out if r.category in wanted]
    return out


def _manifest_hash(p: Params) -> str:
    h = hashlib.sha256()
    for n in [p.data.name, *p.data.extra_sources]:
        h.update(_manifest_path(n).read_bytes())
    return h.hexdigest()[:16]


def _groups(p: Params, records: list[Record]) -> dict[str, list[Record]]:
    """Training groups: one model for all categories, or one per category (single-class)."""
    train = [r for r in records if r.split == "train"]
    if p.setting.kind == "single_class":
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in train:
            groups[r.category].append(r)
        return dict(groups)
    return {"all": train}


# -- synthesize ------------------------------------------------------------------------------------
def synthesize(p: Params, progress: bool = True) -> Path:
    """Write the fixed pseudo-anomaly bank ``data/synth/<name>/`` (images, masks, index.csv)."""
    from PIL import Image

    out = DATA / "synth" / p.data.name
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    synth = build_synthesizer(p)
    lines = ["source,copy,image,mask,anomalous"]
    if synth is not None and p.synthesis.bank_copies > 0:
        from tqdm.auto import tqdm

        tf = build_transform(p)
        train = [r for r in _records(p) if r.split == "train"]
        for i, rec in enumerate(tqdm(train, desc="synthesize", leave=False, disable=not progress)):
            unit = tf.to_unit(read_rgb(rec.path)).permute(1, 2, 0).numpy()
            for c in range(p.synthesis.bank_copies):
                rng = np.random.default_rng([p.synthesis.seed, c, i])
                aug, mask, beta = synth(unit, rng)
                stem = f"{i:06d}_{c}"
                Image.fromarray((aug * 255 + 0.5).clip(0, 255).astype(np.uint8)).save(
                    tmp / f"{stem}.png", compress_level=1
                )
                Image.fromarray((mask * 255).astype(np.uint8), "L").save(tmp / f"{stem}_mask.png", compress_level=1)
                lines.append(f"{rec.path},{c},{stem}.png,{stem}_mask.png,{int(mask.any())}")
    (tmp / "index.csv").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(
        f"Pseudo-anomaly bank: {len(lines) - 1} samples → {out} (textures: {synth.textures.source if synth else 'off'})"
    )
    return out


def _bank(p: Params, records: list[Record]) -> list[list[tuple[str, str]]] | None:
    index = DATA / "synth" / p.data.name / "index.csv"
    if p.synthesis.bank_copies <= 0 or not index.is_file():
        return None
    by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
    rows = index.read_text().splitlines()[1:]
    for row in rows:
        src, _copy, img, mask, _a = row.rsplit(",", 4)
        by_source[src].append((str(index.parent / img), str(index.parent / mask)))
    bank = [by_source.get(r.path, []) for r in records]
    if not all(bank):
        logger.warning("the pseudo-anomaly bank does not cover every training image: synthesising on the fly.")
        return None
    return bank


# -- train -----------------------------------------------------------------------------------------
def _config_hash(p: Params) -> str:
    keys = {k: p.model_dump(mode="json")[k] for k in ("seed", "setting", "data", "synthesis", "model", "loss", "train")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def train(p: Params, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train one model per group into ``artifacts/models/<group>/``; resumable from checkpoints."""
    from components.data.cache import ImageCache
    from pipelines.tracking import tracked_run

    if p.setting.kind == "zero_shot":
        print("setting.kind=zero_shot: no training (evaluate uses setting.zero_shot_source).")
        out = ARTIFACTS / "models"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ARTIFACTS / "train_summary.json", json.dumps({"setting": "zero_shot"}))
        return {}
    records = _records(p)
    groups = _groups(p, records)
    cfg = build_train_config(p, progress)
    npm, dice = build_loss(p)
    tf = build_transform(p)
    cache = ImageCache(DATA / "cache") if p.data.cache else None
    models_dir = ARTIFACTS / "models"
    tmp_models = ARTIFACTS / ".models.partial"
    if tmp_models.exists():
        shutil.rmtree(tmp_models)
    summary: dict[str, Any] = {"groups": {}, "config_hash": _config_hash(p)}
    for group, recs in groups.items():
        seed_everything(p.seed, p.train.deterministic)  # per group, as the official single-class loop
        model = build_model(p)
        synth = build_synthesizer(p) if cfg.residual_mode != "off" else None
        train_recs, extra = _setting_training_data(p, recs, records, tf)
        bank = _bank(p, train_recs) if synth is not None else None
        dataset: Any = ImageDataset(train_recs, tf, synth, seed=p.synthesis.seed, cache=cache, bank=bank)
        if extra is not None:
            dataset = extra(dataset)
        elif p.train.feature_cache:
            dataset = cached_dataset(model, dataset, tf, cfg.device, progress)
        kwargs = model_kwargs(p)
        model_config = {
            "model": kwargs,
            "encoder_pretrained": model.pretrained_loaded,
            "encoder_weights_source": model.encoder.weights_source,
            "group": group,
            "categories": sorted({r.category for r in recs}),
            "setting": p.setting.kind,
            "dataset": p.data.name,
            "image_size": p.data.image_size,
            "crop_size": p.data.crop_size,
        }
        ckpt_dir = ARTIFACTS / "checkpoints" / summary["config_hash"] / group
        with tracked_run(p, "train", f"train-{group}", {"group": group, "encoder_pretrained": model.pretrained_loaded,
                                                         "manifest_hash": _manifest_hash(p)}) as mlflow:  # fmt: skip
            mlflow.log_params({"encoder_pretrained": model.pretrained_loaded, "n_train_images": len(dataset)})

            def on_epoch(m: dict[str, Any]) -> None:
                mlflow.log_metrics(
                    {f"train_{k}": v for k, v in m.items() if isinstance(v, float)}, step=int(m["epoch"])
                )

            result = engine_train(model, dataset, cfg, npm, dice, ckpt_dir, model_config, resume, on_epoch=on_epoch)
            save_model(tmp_models / group, model, model_config)
            summary["groups"][group] = {
                "images": len(dataset),
                "iterations": result["iterations"],
                "seconds": round(result["seconds"], 2),
                "resumed": result["resumed"],
                "final_loss": result["history"][-1].get("total") if result["history"] else None,
                "encoder_pretrained": model.pretrained_loaded,
            }
            mlflow.log_metrics({"train_seconds": result["seconds"]})
            print(f"[{group}] {len(dataset)} images, {result['iterations']} iterations, {result['seconds']:.1f}s"
                  f"{' (resumed)' if result['resumed'] else ''}; encoder pretrained: {model.pretrained_loaded}")  # fmt: skip
    if models_dir.exists():
        shutil.rmtree(models_dir)
    tmp_models.rename(models_dir)
    atomic_write_text(ARTIFACTS / "train_summary.json", json.dumps(summary, indent=2))
    shutil.rmtree(ARTIFACTS / "checkpoints" / summary["config_hash"], ignore_errors=True)
    return summary


def cached_dataset(model: Any, dataset: ImageDataset, tf: Any, device: str, progress: bool = False) -> Any:
    """Wrap ``dataset`` so the frozen encoder runs once per image (and bank entry), not per epoch."""
    from components.data.io import read_rgb as _read
    from components.feature_cache import CachedFeatureDataset, FeatureCache, encoder_fingerprint

    def load(path: str) -> Any:
        if dataset.cache is not None:
            unit = dataset.cache.get(path, tf, lambda: tf.to_unit(_read(path)))
        else:
            unit = tf.to_unit(_read(path))
        return tf.normalize(unit)

    def load_bank(path: str) -> Any:
        import torch

        arr = np.asarray(_read(path), dtype=np.float32) / 255.0
        return tf.normalize(torch.from_numpy(arr).permute(2, 0, 1))

    key = (tf.resize, tf.crop)
    folder = DATA / "cache" / "features"
    fp = encoder_fingerprint(model)  # hashing the encoder once serves both caches
    normal = FeatureCache(folder, model, [r.path for r in dataset.records], load, key, device=device,
                          progress=progress, fingerprint=fp)  # fmt: skip
    bank, copies = None, 0
    if dataset.bank is not None:
        copies = len(dataset.bank[0])
        flat = [img for entries in dataset.bank for img, _ in entries]
        bank = FeatureCache(
            folder, model, flat, load_bank, ("bank", *key), device=device, progress=progress, fingerprint=fp
        )
    return CachedFeatureDataset(dataset, normal, bank, copies)


def _setting_training_data(p: Params, group_recs: list[Record], all_recs: list[Record], tf: Any):
    """Training records and an optional dataset wrapper for the few-shot / semi-supervised settings."""
    kind = p.setting.kind
    if kind == "few_shot":
        from components.data.fewshot import FewShotDataset, select_shots

        shots = select_shots(group_recs, p.setting.few_shot_k, seed=p.seed)
        return shots, lambda ds: FewShotDataset(ds, seed=p.seed)
    if kind == "semi_supervised":
        from components.data.semi import SemiSupervisedDataset, select_anomalies

        chosen = select_anomalies(all_recs, p.setting.semi_supervised_n, seed=p.seed)
        return group_recs, lambda ds: SemiSupervisedDataset(ds, chosen, tf, seed=p.seed)
    return group_recs, None


# -- evaluate --------------------------------------------------------------------------------------
def _test_records(p: Params, records: list[Record]) -> list[Record]:
    test = [r for r in records if r.split == "test"]
    if p.setting.kind == "semi_supervised":
        from components.data.semi import select_anomalies

        used = {r.path for r in select_anomalies(records, p.setting.semi_supervised_n, seed=p.seed)}
        test = [r for r in test if r.path not in used]
    return test


def _model_for(p: Params, group: str, device: str):
    if p.setting.kind == "zero_shot":
        src = Path(p.setting.zero_shot_source) if p.setting.zero_shot_source else None
        if src is None or not (src / "config.json").is_file():
            msg = "setting.zero_shot_source must name a trained model folder (artifacts/models/all of the source dataset)."
            raise FileNotFoundError(msg)
        return load_model(src, device)
    return load_model(ARTIFACTS / "models" / group, device)


def evaluate(p: Params, progress: bool = True) -> dict[str, Any]:
    """Metrics per category and their mean → ``artifacts/metrics.json`` (+ CSV, Markdown, plots)."""
    import pandas as pd
    import torch

    from components.plots import plot_attention, plot_curves, plot_histogram, plot_map_grid
    from pipelines.tracking import log_and_register_model, tracked_run

    device = resolve_device(p.train.device)
    tf = build_transform(p)
    records = _records(p)
    test = _test_records(p, records)
    cats = list(dict.fromkeys(r.category for r in test))
    groups = {"all": cats} if p.setting.kind != "single_class" else {c: [c] for c in cats}
    out_dir = ARTIFACTS / "eval"
    tmp_dir = ARTIFACTS / ".eval.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "plots").mkdir(parents=True)
    per_cat: dict[str, dict[str, float]] = {}
    thresholds: dict[str, dict[str, float]] = {}
    e = p.eval
    info: dict[str, Any] = {}
    for group, group_cats in groups.items():
        model, mcfg = _model_for(p, group, device)
        kind = map_kind(p, model.seg_head is not None)
        info[group] = {"map": kind, "encoder_pretrained": bool(mcfg.get("encoder_pretrained", False))}
        for cat in group_cats:
            recs = [r for r in test if r.category == cat]
            ds = ImageDataset(recs, tf)
            res = predict(model, ds, kind, e.batch_size, device, e.resize, e.blur_kernel, e.blur_sigma, e.top_ratio,
                          e.fused_l2_norm, p.data.num_workers, progress)  # fmt: skip
            has_masks = res.masks is not None and any(r.mask_path for r in recs)
            m = evaluate_arrays(res.scores, res.labels, res.maps if has_masks else None,
                                res.masks if has_masks else None, e.metrics_mode, e.fpr_limit)  # fmt: skip
            per_cat[cat] = {k: m[k] for k in METRIC_KEYS}
            thresholds[cat] = {
                "image_threshold": m["image_threshold"],
                "pixel_threshold": m["pixel_threshold"],
            }
            if e.plots:
                safe = cat.replace("/", "_")
                plot_curves(tmp_dir / "plots", safe, res.scores, res.labels, res.maps if has_masks else None,
                            res.masks if has_masks else None, e.fpr_limit)  # fmt: skip
                plot_histogram(
                    tmp_dir / "plots" / f"{safe}_scores.png",
                    cat,
                    res.scores,
                    res.labels,
                    m["image_threshold"],
                )
                _grid_and_attention(model, ds, res, tf, tmp_dir / "plots", safe, e.grid_images, device,
                                    plot_map_grid, plot_attention, torch)  # fmt: skip
    mean = {k: float(np.nanmean([v[k] for v in per_cat.values()])) if per_cat else math.nan for k in METRIC_KEYS}
    metrics = {"mean": mean, "categories": per_cat}
    atomic_write_text(tmp_dir / "thresholds.json", json.dumps(thresholds, indent=2))
    df = pd.DataFrame([{"category": c, **v} for c, v in per_cat.items()] + [{"category": "mean", **mean}])
    df.to_csv(tmp_dir / "metrics_per_category.csv", index=False)
    table = markdown_table(per_cat, mean)
    (tmp_dir / "metrics.md").write_text(table + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    atomic_write_text(ARTIFACTS / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))
    pretrained = all(v["encoder_pretrained"] for v in info.values())
    with tracked_run(p, "evaluate", "evaluate", {"encoder_pretrained": pretrained, "map": ",".join({v['map'] for v in info.values()}),
                                                  "manifest_hash": _manifest_hash(p)}) as mlflow:  # fmt: skip
        mlflow.log_metrics({k: v for k, v in mean.items() if math.isfinite(v)})
        for cat, vals in per_cat.items():
            safe = "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in cat)
            mlflow.log_metrics({f"{safe}/{k}": v for k, v in vals.items() if math.isfinite(v)})
        mlflow.log_artifact(str(ARTIFACTS / "metrics.json"))
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        registry = {}
        if p.setting.kind != "zero_shot":
            for group, group_cats in groups.items():
                gm = [per_cat[c]["mad"] for c in group_cats]
                gmad = float(np.nanmean(gm)) if gm else math.nan
                cat0 = group_cats[0] if group_cats else ""
                inference = {
                    "map": info[group]["map"], "image_size": p.data.image_size, "crop_size": p.data.crop_size,
                    "resize": e.resize, "blur_kernel": e.blur_kernel, "blur_sigma": e.blur_sigma,
                    "top_ratio": e.top_ratio, "fused_l2_norm": e.fused_l2_norm,
                    "image_threshold": thresholds.get(cat0, {}).get("image_threshold", math.nan) if len(group_cats) == 1
                    else float(np.nanmedian([thresholds[c]["image_threshold"] for c in group_cats])),
                    "thresholds": {c: thresholds[c] for c in group_cats},
                }  # fmt: skip
                registry[group] = log_and_register_model(
                    mlflow, p, ARTIFACTS / "models" / group, inference, gmad, group
                )
        run_id = getattr(getattr(mlflow, "active_run", lambda: None)(), "info", None)
        atomic_write_text(ARTIFACTS / "eval_run.json", json.dumps(
            {"run_id": getattr(run_id, "run_id", ""), "registry": registry, "maps": info}, indent=2, default=str))  # fmt: skip
    print(table)
    enc = "pretrained DINOv2" if pretrained else "RANDOM-INIT encoder (no DINOv2 weights: not comparable to the paper)"
    print(f"\nEncoder: {enc}. Metrics: {e.metrics_mode}. Written: {ARTIFACTS / 'metrics.json'}, {out_dir}/")
    return metrics


def markdown_table(per_cat: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """Paper-style table in percent: rows categories + mean; I-AUROC … AUPRO, mAD."""
    heads = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD"]

    def fmt(v: float) -> str:
        return f"{100 * v:.1f}" if math.isfinite(v) else "–"

    lines = ["| Category | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for cat, vals in [*per_cat.items(), ("**mean**", mean)]:
        lines.append(f"| {cat} | " + " | ".join(fmt(vals[k]) for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def _grid_and_attention(model, ds, res, tf, out_dir, cat, n, device, plot_map_grid, plot_attention, torch) -> None:
    if n <= 0:
        return
    by_defect: dict[str, list[int]] = defaultdict(list)  # round-robin over defect kinds
    for i in range(len(ds)):
        if res.labels[i] == 1:
            by_defect[Path(res.paths[i]).parent.name].append(i)
    queues = list(by_defect.values())
    idx_anom = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    idx_anom = idx_anom[: max(1, n - n // 4)]
    idx_norm = [i for i in range(len(ds)) if res.labels[i] == 0][: n - len(idx_anom)]
    idx = idx_anom + idx_norm
    vmin, vmax = float(np.percentile(res.maps, 1)), float(res.maps.max())
    size = res.maps.shape[-1]
    images, masks, maps, atts = [], [], [], []
    for i in idx:
        item = ds[i]
        img = tf.denormalize(item["image"])
        img_small = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[
            0
        ]
        images.append(img_small.permute(1, 2, 0).numpy())
        masks.append(res.masks[i] if res.masks is not None else None)
        maps.append(res.maps[i])
        if len(atts) < 4:
            with torch.no_grad():
                out = model(item["image"][None].to(device), return_attention=True)
            a = out.attention[-1][0].mean(0)  # N×M, last decoder block, heads averaged
            h, w = out.grid
            atts.append(a.T.reshape(-1, h, w).cpu().numpy())
    titles = [Path(res.paths[i]).parent.name + "/" + Path(res.paths[i]).name for i in idx]
    plot_map_grid(out_dir / f"{cat}_maps.png", cat, images, masks, maps, vmin, vmax, titles)
    plot_attention(out_dir / f"{cat}_inp_attention.png", cat, images[: len(atts)], atts)
