"""rlhf.io's folder ownership: rlhf deletes a folder only when it created it (or it is empty)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.io import OWNED_MARKER, check_removable, is_owned, mark_owned, remove_owned_dir

FLAG = "--overwrite true"


def test_owned_folders_are_deleted_whole(tmp_path: Path) -> None:
    folder = mark_owned(tmp_path / "a" / "b")
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(b"x")
    (folder / "link").symlink_to(tmp_path)  # a link inside is removed, never followed
    assert is_owned(folder)
    remove_owned_dir(folder, FLAG)
    assert not folder.exists() and (tmp_path / "a").is_dir()
    remove_owned_dir(folder, FLAG)  # absent: nothing to do


def test_a_folder_killed_mid_delete_still_carries_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    folder = mark_owned(tmp_path / "f")
    for name in ("a", "b", "c"):
        (folder / name).mkdir()
    calls = []

    def dies_on_second(path: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("killed")
        real(path)

    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", dies_on_second)
    with pytest.raises(OSError, match="killed"):
        remove_owned_dir(folder, FLAG)
    monkeypatch.undo()
    assert is_owned(folder)  # so the rerun may finish the job
    remove_owned_dir(folder, FLAG)
    assert not folder.exists()


def test_empty_folders_are_reused_and_foreign_ones_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_owned_dir(empty, FLAG)
    assert not empty.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".hidden").write_text("still mine")
    with pytest.raises(UserError) as e:
        remove_owned_dir(mine, FLAG)
    assert str(e.value) == (f"{mine} holds files rlhf did not write (no {OWNED_MARKER} in it); move them away, "
                            "use another --output_dir, or pass --overwrite true to delete them")
    assert (mine / ".hidden").read_text() == "still mine"
    remove_owned_dir(mine, FLAG, force=True)
    assert not mine.exists()


def test_files_and_links_are_never_taken_for_folders(tmp_path: Path) -> None:
    target = mark_owned(tmp_path / "target")
    (target / "keep").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for path, kind in ((link, "link"), (afile, "file")):
        assert not is_owned(path)
        with pytest.raises(UserError, match=f"^{path} is a {kind} where rlhf writes a folder; .*--overwrite true"):
            check_removable(path, FLAG)
    remove_owned_dir(link, FLAG, force=True)  # the link goes, not what it points to
    assert not os.path.lexists(link) and (target / "keep").is_file()
