"""Files the package writes: renamed into place with the permissions a plain write would give, and an
interrupted write leaves what was there."""

import os
import stat

import pytest

from intruder.outputs import atomic_write, write_text


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_mode_a_plain_write_gives(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text(tmp_path / "report.md", "# report\n")
    assert _mode(tmp_path / "report.md") == _mode(plain) == 0o644  # not mkstemp's private 0600


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "report.html"
    path.write_text("old")
    path.chmod(0o640)
    write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
