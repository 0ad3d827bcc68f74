import pytest

from biopsy.atomic import atomic_path, write_text_atomic


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "labels.ome.tif"
    with atomic_path(target) as temporary:
        assert temporary.name.endswith(".ome.tif") and temporary != target
        temporary.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_replaces(tmp_path):
    target = tmp_path / "a.json"
    write_text_atomic(target, "1")
    write_text_atomic(target, "2")
    assert target.read_text() == "2"
