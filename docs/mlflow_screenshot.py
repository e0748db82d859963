"""Take docs/mlflow-compare.png: MLflow's compare view of the pipeline runs, in headless Chromium.

Needs Debian's chromium and Playwright (``pip install playwright``; it drives /usr/bin/chromium, no
browser download) and a running ``mlflow ui`` (``make mlflow-ui`` serves http://127.0.0.1:5000):

    python docs/mlflow_screenshot.py http://127.0.0.1:5000 docs/mlflow-compare.png
"""

from __future__ import annotations

import json
import sys
import urllib.parse

import mlflow
from mlflow import MlflowClient
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTLE_MS = 8000  # the MLflow UI loads its data after the page's load event


def main(base: str, out: str) -> None:
    """Screenshot the compare view of every ``stage=pipeline`` run of the ``inpformer`` experiment."""
    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("inpformer")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'")
    ids = json.dumps([r.info.run_id for r in runs])
    experiments = urllib.parse.quote(json.dumps([exp.experiment_id]))
    url = f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={experiments}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1250})
        page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs", wait_until="load")
        page.wait_for_timeout(SETTLE_MS)
        try:
            page.get_by_text("Model training", exact=True).first.click(timeout=5000)
        except PlaywrightTimeout:
            print("no GenAI / Model training toggle in this MLflow version")
        page.goto(url, wait_until="load")
        page.wait_for_timeout(SETTLE_MS)
        page.get_by_text("Show diff only").first.click()
        for section in ("Visualizations", "Run details"):
            page.get_by_text(section, exact=True).first.click()
        page.wait_for_timeout(SETTLE_MS // 4)
        page.screenshot(path=out)
        browser.close()
    print(f"{out}: {len(runs)} runs")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
