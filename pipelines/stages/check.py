"""``inpformer check``: the first DVC stage. It validates params.yaml and every other stage depends
on its marker, so ``dvc repro`` / ``dvc exp run -S train.epochs=[1,2]`` stop here, before DVC
removes any other stage's outputs (DVC deletes a stage's outputs just before running its command).

The marker's content never changes, so a params change reruns only the stages whose own params
changed (DVC compares the marker's hash, which stays the same).
"""

from __future__ import annotations

from components.files import atomic_write_text
from pipelines.config import Params
from pipelines.paths import PARAMS_CHECKED_FILE

__all__ = ["MARKER_TEXT", "check"]

MARKER_TEXT = "params.yaml validated by `inpformer check`\n"


def check(p: Params) -> None:
    """Write the marker (``p`` was validated when it was loaded: unknown keys, types, bounds)."""
    del p  # loading it was the check
    atomic_write_text(PARAMS_CHECKED_FILE, MARKER_TEXT)
    print(f"params valid → {PARAMS_CHECKED_FILE}")
