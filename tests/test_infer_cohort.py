"""Scan arguments, scan lists, output folder names and torchrun sharding of a prediction cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodulenet.errors import InputError
from nodulenet.infer.cohort import Shard, case_names, cohort_items, expand_scan_arguments, shard_from_environment

LIDC_SERIES = Path("/data/LIDC-IDRI/LIDC-IDRI-0001/1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178/"
                   "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192")


def test_scan_list_is_expanded_in_order_relative_to_its_folder(tmp_path):
    listing = tmp_path / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text("# my cohort\n\nscans/a.nii.gz\n  /abs/b.mhd  \n# done\n../c\n")
    scans = expand_scan_arguments([tmp_path / "first.nrrd", listing, tmp_path / "last"])
    assert scans == [tmp_path / "first.nrrd", listing.parent / "scans/a.nii.gz", Path("/abs/b.mhd"),
                     listing.parent / "../c", tmp_path / "last"]


def test_empty_scan_list_and_no_scans_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(InputError, match="empty.txt: the scan list names no scan"):
        expand_scan_arguments([empty])
    with pytest.raises(InputError, match="no scan given"):
        expand_scan_arguments([])


def test_output_names_are_readable_and_unique():
    names = case_names([
        LIDC_SERIES,
        Path("/a/x/scan.nii.gz"),
        Path("/a/y/scan.nii.gz"),
        Path("/a/y/scan.nii.gz"),  # the same scan twice: two runs, two folders
        Path("/b/patient 7.MHD"),
        Path("/c/series7/IM0001.dcm"),
    ])
    # TCIA's UID folder -> patient folder + the series UID's last 8 characters.
    assert names == ["LIDC-IDRI-0001_20603192", "x_scan", "y_scan_1", "y_scan_2", "patient_7", "series7"]


def test_shard_from_torchrun_environment():
    assert shard_from_environment({}) == Shard(rank=0, world_size=1, local_rank=0)
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    with pytest.raises(InputError, match="invalid RANK=4 for WORLD_SIZE=4"):
        shard_from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_ranks_split_the_cohort_without_overlap_and_agree_on_names(tmp_path):
    scans = [tmp_path / f"{k}" / "scan.nii.gz" for k in range(7)]
    everything = cohort_items(scans)
    shards = [cohort_items(scans, Shard(rank, 3, rank)) for rank in range(3)]
    assert [i.index for i in shards[1]] == [1, 4]
    assert sorted(i.index for s in shards for i in s) == list(range(7))
    by_index = {i.index: i.name for i in everything}
    assert all(by_index[i.index] == i.name for s in shards for i in s)
