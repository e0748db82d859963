"""Write plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined, so
`dvc plots show|diff` pages render without a network (DVC's default page loads them from a CDN).

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2   # the versions DVC 3 pins
    python plots/make_offline_template.py /tmp/vega-5.20.2.tgz /tmp/vega-lite-5.2.0.tgz /tmp/vega-embed-6.18.2.tgz

The libraries are BSD-3-Clause (c) the University of Washington Interactive Data Lab; their licence
texts are kept in the page. `.dvc/config` names the page (`plots.html_template`).
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "offline.html"
ORDER = ("vega", "vega-lite", "vega-embed")


def _member(archive: tarfile.TarFile, name: str) -> str:
    return archive.extractfile(archive.getmember(name)).read().decode("utf-8")  # type: ignore[union-attr]


def main(tarballs: list[str]) -> None:
    scripts, licences = {}, []
    for path in tarballs:
        with tarfile.open(path) as archive:
            pkg = next(n for n in ORDER[::-1] if Path(path).name.startswith(n + "-"))
            scripts[pkg] = _member(archive, f"package/build/{pkg}.min.js")
            licences.append(f"{Path(path).name}:\n{_member(archive, 'package/LICENSE')}")
    if set(scripts) != set(ORDER):
        raise SystemExit(f"need the {ORDER} tarballs, got {sorted(scripts)}")
    safe = {p: js.replace("</script", "<\\/script") for p, js in scripts.items()}  # cannot end the tag early
    tags = "\n".join(f"<script>{safe[p]}</script>" for p in ORDER)
    page = (
        "<!DOCTYPE html>\n<!-- inpformer: DVC's plot page with its libraries inlined (no CDN).\n"
        + "\n".join(licences).replace("--", "- -")
        + "\n-->\n<html>\n<head>\n{refresh_tag}\n<title>DVC Plot</title>\n"
        + tags
        + "\n<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )
    OUT.write_text(page)
    print(f"wrote {OUT} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
