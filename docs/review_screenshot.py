"""Take docs/review-tab.png: the app's Review tab on the demo's flagged brick images, in headless Chromium.

After `make demo`, queue the flagged test images of one category and serve the app:

    inpformer serve-scoring --once --watch data/raw/synthetic/brick/test --model artifacts/models/all
    inpformer app --port 7861 &
    python docs/review_screenshot.py http://127.0.0.1:7861/ docs/review-tab.png

(add the same ``--set review.queue_dir=… --set review.dir=…`` to all three to keep sources/ untouched).
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def main(url: str, out: str) -> None:
    """Open the Review tab, step to the second item and screenshot it."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        page.click("#tab-review")
        page.wait_for_selector("#review-list li")
        page.keyboard.press("j")
        page.wait_for_function("document.getElementById('review-overlay').complete")
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
