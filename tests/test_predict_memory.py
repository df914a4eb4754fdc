"""``--max-memory`` bounds the PEAK resident memory of a whole ``nodulenet predict`` (not only an estimate).

The published-size network (random weights: memory does not depend on them) on LIDC-IDRI-0001 needs ~2 GB in one
pass; under a smaller limit the network runs in tiles, and the process's measured peak (``ru_maxrss`` of a fresh
child process: DICOM read, preprocessing, network, export) must stay below the limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT_GB = 1.6

CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch
from nodulenet.model import NoduleNet, published_config, to_checkpoint_dict
from nodulenet.predict_api import PredictOptions, predict_scans
from nodulenet.infer.cohort import Shard

series, out, limit = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
config = published_config()
torch.save(to_checkpoint_dict(NoduleNet(config), config), out / "random.pt")
options = PredictOptions(weights=out / "random.pt", threshold=0.99, max_memory_gb=limit, dicom_outputs=False)
run = predict_scans([series], out / "pred", options, shard=Shard(0, 1, 0))
(result,) = run.results
print(json.dumps({"status": result.status, "error": result.error, "tiles": result.details.get("tiles"),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
"""


@pytest.mark.slow
def test_max_memory_bounds_the_peak_rss_of_a_whole_predict(lidc_0001_series: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(lidc_0001_series), str(tmp_path), str(LIMIT_GB)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["status"] == "done", figures["error"]
    assert figures["tiles"] >= 2  # the limit is below what one pass needs
    assert figures["peak_rss_mib"] < LIMIT_GB * 1024, figures
