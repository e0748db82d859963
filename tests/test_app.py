"""The web inspector in a real headless Chromium: upload an image, read the decision, move the slider."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import model_workspace
from PIL import Image

from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
pytestmark = pytest.mark.slow


def _chromium() -> str:
    """Debian's chromium (installed by .ci/run); a missing browser fails the test, naming the fix."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium found (tried chromium, chromium-browser, google-chrome): apt-get install -y chromium")


@pytest.fixture
def app_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    thresholds = {
        "a": {"image_threshold": -1e9, "pixel_threshold": 0.5, "image_min": 0.0, "image_max": 1.0, "rule": "f1"},
        "b": {"image_threshold": 1e9, "pixel_threshold": 0.5, "rule": "fpr=0.01"},
    }
    model_workspace(tmp_path, ["a", "b"], thresholds)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "part.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


@pytest.fixture
def served_app(app_workspace):
    import uvicorn

    from pipelines.serve.app import create_app, listening_socket, offered_models

    p = load_params("params.yaml", ["train.device=cpu", "tracking.enabled=false"])
    models = offered_models(p, [])
    assert models == ["artifacts/models/all"]
    sock = listening_socket()  # listening before the server starts: no start-up race, no waiting
    server = uvicorn.Server(uvicorn.Config(create_app(p, models), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def test_inspector_in_headless_chromium(served_app, app_workspace) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served_app)
        expect(page.locator("#status")).to_have_text("ready", timeout=60_000)
        page.select_option("#category", "a")
        page.set_input_files("#files", str(app_workspace / "part.png"))
        card = page.locator(".card").first
        expect(card.locator(".decision")).to_have_text("anomalous", timeout=60_000)  # a: threshold -1e9
        assert card.locator("img").evaluate("img => img.naturalWidth") == 90  # the original frame
        score = float(card.locator(".score").inner_text())
        page.locator("#threshold").evaluate(
            "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(score + 0.5)
        )
        expect(card.locator(".decision")).to_have_text("normal")  # the slider moved past the score
        page.select_option("#category", "b")
        page.set_input_files("#files", str(app_workspace / "part.png"))
        expect(page.locator(".card").first.locator(".decision")).to_have_text("normal", timeout=60_000)
        page.set_input_files("#files", str(app_workspace / "broken.png"))
        expect(page.locator("#status")).to_contain_text("not a readable image", timeout=60_000)
        page.screenshot(path=str(app_workspace / "inspector.png"))
        browser.close()


def test_review_tab_marks_two_images_in_headless_chromium(served_app, app_workspace) -> None:
    """Two flagged uploads join the queue; n and d in the Review tab write the ledger and sources/."""
    import json

    from playwright.sync_api import expect, sync_playwright

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(app_workspace / "second.png")
    reviewed = app_workspace / "sources" / "reviewed"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(served_app)
        expect(page.locator("#status")).to_have_text("ready", timeout=60_000)
        page.select_option("#category", "a")  # threshold -1e9: every upload is a reject
        page.set_input_files("#files", [str(app_workspace / "part.png"), str(app_workspace / "second.png")])
        expect(page.locator(".card")).to_have_count(2, timeout=60_000)
        page.click("#tab-review")
        expect(page.locator("#review-list li")).to_have_count(2, timeout=30_000)
        expect(page.locator("#review-info")).to_contain_text("part.png")
        assert page.locator("#review-overlay").evaluate("img => img.complete && img.naturalWidth") == 90
        page.keyboard.press("n")
        expect(page.locator("#review-list li")).to_have_count(1, timeout=30_000)
        page.fill("#defect-type", "scratch")
        page.locator("#review-info").click()  # leave the input: keys are shortcuts again
        expect(page.locator("#review-info")).to_contain_text("second.png")
        page.screenshot(path=str(app_workspace / "review.png"))
        page.keyboard.press("d")
        expect(page.locator("#review-empty")).to_be_visible(timeout=30_000)
        expect(page.locator("#review-count")).to_have_text("0")
        browser.close()
    ledger = [json.loads(x) for x in (reviewed / "verdicts.jsonl").read_text().splitlines()]
    assert [(e["verdict"], e["defect"]) for e in ledger] == [("normal", ""), ("defect", "scratch")]
    assert len(list((reviewed / "a" / "test" / "good").iterdir())) == 1
    assert len(list((reviewed / "a" / "test" / "scratch").iterdir())) == 1
