"""Long scoring talks without a progress bar (dvc repro, Prefect): a line every report_every_s seconds."""

from __future__ import annotations

import logging

import torch
from conftest import tiny_model

from components.data import batch as keys
from components.scoring.inference import Heartbeat, ScoringConfig, predict


def test_heartbeat_lines_count_rate_and_eta(caplog) -> None:
    caplog.set_level(logging.INFO, logger="components.scoring.inference")
    beat = Heartbeat(10, every_s=1e-9)
    for _ in range(5):
        beat.tick(2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[0].startswith("scored 2/10 images (20 %)") and "ETA" in lines[0]
    assert lines[-1].startswith("scored 10/10 images (100 %)") and lines[-1].endswith("ETA 0 s")
    caplog.clear()
    quiet = Heartbeat(10, every_s=0.0)
    quiet.tick(10)
    assert not caplog.records  # 0: silent


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {keys.IMAGE: torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(i))}


def test_predict_without_a_bar_reports_and_with_a_bar_does_not(caplog) -> None:
    caplog.set_level(logging.INFO, logger="components.scoring.inference")
    model = tiny_model(image_size=56)
    scoring = ScoringConfig(resize=None)
    predict(model, _Images(), scoring, batch_size=4, progress=False, report_every_s=1e-9)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["scored 4/6 images", "scored 6/6 images"]
    caplog.clear()
    predict(model, _Images(), scoring, batch_size=4, progress=True, report_every_s=1e-9)
    assert not caplog.records  # the bar is the progress
