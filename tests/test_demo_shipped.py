"""The README's main command: ``nodulenet demo`` with the model shipped in the package (default suite, ~20 s)."""

from __future__ import annotations

import time

import numpy as np

from nodulenet.infer.weights import SHIPPED_WEIGHTS_DIR, SHIPPED_WEIGHTS_NAME
from nodulenet.predict_api import run_demo


def test_the_demo_model_is_shipped_in_the_package():
    assert (SHIPPED_WEIGHTS_DIR / SHIPPED_WEIGHTS_NAME).is_file()
    assert (SHIPPED_WEIGHTS_DIR / SHIPPED_WEIGHTS_NAME).stat().st_size <= 25 * 2**20


def test_demo_with_the_shipped_model_runs_in_under_a_minute_and_finds_a_phantom_nodule(tmp_path):
    start = time.perf_counter()
    demo = run_demo(tmp_path / "demo", seed=0)
    seconds = time.perf_counter() - start
    result = demo.result
    assert result.status == "done", result.error
    assert seconds < 60.0
    assert {"nodules_json", "candidates_csv", "label_map", "report_html"} <= set(result.details["files"])
    # A trained model (not random weights): at least one phantom nodule has a finding within its radius.
    hits = [n for n in demo.truth
            if any(np.linalg.norm(np.subtract(f["center_world_xyz_mm"], n["center_world_xyz_mm"]))
                   <= n["diameter_mm"] / 2 for f in result.findings)]
    assert hits, "the shipped model found none of the phantom's nodules"
