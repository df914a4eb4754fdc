import numpy as np
import pytest

from nodulenet.io.volume import Geometry, Volume


def test_identity_geometry_maps_voxel_centres_to_mm():
    g = Geometry((10, 20, 30), (2.5, 0.7, 0.7), (-100.0, -50.0, -300.0))
    # voxel (z=4, y=10, x=3) -> x = -100 + 3*0.7, y = -50 + 10*0.7, z = -300 + 4*2.5
    np.testing.assert_allclose(g.voxel_to_world([4, 10, 3]), [-97.9, -43.0, -290.0])
    np.testing.assert_allclose(g.world_to_voxel([-97.9, -43.0, -290.0]), [4, 10, 3], atol=1e-9)


def test_non_identity_direction_is_honoured():
    # index axis i (x) runs along world -x, j (y) along world +z, k (z) along world +y (a rotated scan)
    direction = (-1, 0, 0, 0, 0, 1, 0, 1, 0)
    g = Geometry((5, 6, 7), (3.0, 2.0, 1.0), (10.0, 20.0, 30.0), direction)
    # index (z=2, y=1, x=4): i*sx=4 along -x, j*sy=2 along +z, k*sz=6 along +y
    np.testing.assert_allclose(g.voxel_to_world([2, 1, 4]), [6.0, 26.0, 32.0])
    pts = np.random.default_rng(0).uniform(0, 5, size=(50, 3))
    np.testing.assert_allclose(g.world_to_voxel(g.voxel_to_world(pts)), pts, atol=1e-9)


def test_geometry_rejects_bad_values():
    with pytest.raises(ValueError, match="spacing"):
        Geometry((2, 2, 2), (0, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (2, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((2, 2)), (1, 1, 1), (0, 0, 0))


def test_geometry_dict_round_trip():
    g = Geometry((5, 6, 7), (3.0, 2.0, 1.0), (10.0, 20.0, 30.0), (0, 1, 0, 1, 0, 0, 0, 0, -1))
    assert Geometry.from_dict(g.to_dict()) == g


def test_atomic_write_gives_normal_permissions_and_leaves_nothing_on_failure(tmp_path):
    import os
    import stat

    from nodulenet.io.atomic import atomic_path, default_file_mode, write_json_atomic

    target = write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE(os.stat(target).st_mode) == default_file_mode()
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
