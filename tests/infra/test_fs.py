"""Atomic writes: the whole new content or the old, and the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

from lamina.infra.fs import atomic_write_bytes, atomic_write_text


def test_a_new_file_gets_the_umask_permissions_and_a_replaced_one_keeps_its_own(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        import lamina.infra.fs as fs

        before, fs._UMASK = fs._UMASK, 0o022
        path = tmp_path / "report.md"
        atomic_write_text(path, "one")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
        path.chmod(0o600)
        atomic_write_bytes(path, b"two")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == b"two"
        assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left
    finally:
        fs._UMASK = before
        os.umask(mask)
