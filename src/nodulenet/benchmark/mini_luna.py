"""A miniature LUNA16 download, built from phantoms (and optionally real LIDC-IDRI series) for tests and benchmarks.

Layout and files as the real one (see :mod:`.luna16_api`): ``subset<N>/<seriesuid>.mhd`` + ``.raw``,
``annotations.csv``, ``annotations_excluded.csv`` (with diameter -1 rows) and ``seriesuids.csv`` (CRLF, no header).

Phantoms get the UID ``1.2.826.0.1.3680043.10.1410.<seed>``; each phantom's smallest nodule is moved to the
excluded list (every other phantom with its diameter, the others with -1 = unknown), as LUNA16 lists findings
that count neither as hits nor as false positives. A real series (a DICOM folder) is written as MetaImage with
its own geometry (origin, spacing, direction) and gets its rows from the official LUNA16 CSV files given.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from nodulenet.io.atomic import write_text_atomic
from nodulenet.io.luna_csv import (
    LunaAnnotation,
    read_luna_annotations,
    read_luna_excluded,
    write_luna_annotations,
)

PHANTOM_UID_ROOT = "1.2.826.0.1.3680043.10.1410"


def phantom_uid(seed: int) -> str:
    return f"{PHANTOM_UID_ROOT}.{int(seed)}"


def write_mini_luna_tree(root: str | Path, phantom_seeds: Mapping[int, Sequence[int]], *,
                         real_series: Mapping[int, Sequence[Path]] | None = None,
                         official_csv_dir: Path | None = None, n_nodules: int = 4) -> dict[str, list[str]]:
    """Write the tree (``subset -> phantom seeds`` and ``subset -> DICOM series folders``); returns the UIDs per
    subset. Existing scans are kept (the tree is rebuilt only where missing)."""
    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.io.dicom import read_dicom_series
    from nodulenet.io.image_files import read_image, write_image
    from nodulenet.preprocess.phantom import write_phantom

    out = Path(root)
    phantom = replace(SMALL_PHANTOM, n_nodules=n_nodules)
    annotations: list[LunaAnnotation] = []
    excluded: list[LunaAnnotation] = []
    uids: dict[str, list[str]] = {}
    for subset, seeds in sorted(phantom_seeds.items()):
        folder = out / f"subset{subset}"
        for seed in seeds:
            uid = phantom_uid(seed)
            uids.setdefault(folder.name, []).append(uid)
            truth_path = out / "phantom_truth" / f"{uid}.json"
            if not (folder / f"{uid}.mhd").is_file() or not truth_path.is_file():
                tmp = out / "phantom_truth" / f"tmp-{seed}"
                paths = write_phantom(tmp, int(seed), phantom, fmt="mhd")
                folder.mkdir(parents=True, exist_ok=True)
                write_image(read_image(paths["scan"]), folder / f"{uid}.mhd")
                truth_path.write_text(Path(paths["nodules"]).read_text())
                shutil.rmtree(tmp)
            nodules = sorted(json.loads(truth_path.read_text())["nodules"], key=lambda n: -n["diameter_mm"])
            for n in nodules[:-1]:
                annotations.append(LunaAnnotation(uid, tuple(n["center_world_xyz_mm"]), float(n["diameter_mm"])))
            smallest = nodules[-1]
            diameter = float(smallest["diameter_mm"]) if seed % 2 == 0 else None
            excluded.append(LunaAnnotation(uid, tuple(smallest["center_world_xyz_mm"]), diameter))
    if real_series:
        if official_csv_dir is None:
            raise ValueError("real series need the official LUNA16 CSV files (official_csv_dir)")
        official = read_luna_annotations(official_csv_dir / "annotations.csv")
        official_excluded = read_luna_excluded(official_csv_dir / "annotations_excluded.csv")
        for subset, series_dirs in sorted(real_series.items()):
            folder = out / f"subset{subset}"
            for series_dir in series_dirs:
                uid = Path(series_dir).name  # TCIA folders are named after the SeriesInstanceUID
                uids.setdefault(folder.name, []).append(uid)
                if not (folder / f"{uid}.mhd").is_file():
                    folder.mkdir(parents=True, exist_ok=True)
                    write_image(read_dicom_series(series_dir), folder / f"{uid}.mhd")
                annotations += [a for a in official if a.seriesuid == uid]
                excluded += [a for a in official_excluded if a.seriesuid == uid]
    write_luna_annotations(out / "annotations.csv", annotations)
    write_luna_annotations(out / "annotations_excluded.csv", excluded)
    # The official seriesuids.csv has CRLF line ends and no header.
    write_text_atomic(out / "seriesuids.csv", "".join(f"{u}\r\n" for s in sorted(uids) for u in uids[s]))
    return uids
