"""host_folders.set_owner never drops a POSIX lock this process holds.

Closing any descriptor of a file drops every fcntl lock the process holds
on it. SQLite keeps a shared lock on state.db while a connection is open; a
chown/chmod through an ordinary descriptor of state.db dropped the daemon's,
so the next CLI command to close its connection believed itself the last
one, checkpointed and deleted the WAL under the daemon: the daemon's writes
never reached state.db again (seen by hand: `cancel` found no running
backup, every command rebuilt the catalogue)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from virtbackupd.adapters import host_folders
from virtbackupd.errors import UntrustedFolderError

READ_AND_CLOSE = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print(con.execute("SELECT count(*) FROM t").fetchone()[0])
con.close()
"""


def test_set_owner_keeps_the_sqlite_lock_of_this_process(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (1)")
        host_folders.set_owner(db, mode=0o600)
        out = subprocess.run(
            [sys.executable, "-c", READ_AND_CLOSE, str(db)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "1"
        # The other process was not the last connection: the WAL it would
        # have checkpointed and deleted is still ours.
        assert (tmp_path / "state.db-wal").exists(), "this process's lock on state.db was dropped"
        con.execute("INSERT INTO t VALUES (2)")
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_set_owner_refuses_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"x")
    target.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UntrustedFolderError, match="symbolic link"):
        host_folders.set_owner(link, (65534, 65534), 0o600)
    st = target.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o644")
