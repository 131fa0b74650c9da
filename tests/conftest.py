"""Fixtures of the real test bed (see tests/testbed/ and shared/TESTBED.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.domains import DomainFactory, remove_stale
from testbed.nbd_servers import NbdServers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs libvirtd; under tests/component,
    real qemu tools. Mark them so `-m "not integration"` deselects reliably."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "component" in parts:
            item.add_marker(pytest.mark.component)


class _Connection:
    """The session's libvirt connection, reopened if a test restarted libvirtd."""

    def __init__(self) -> None:
        from testbed.host import connect, ensure_libvirtd

        ensure_libvirtd()
        self._connect = connect
        self.conn = connect()
        remove_stale(self.conn)

    def get(self) -> object:
        import libvirt

        try:
            self.conn.getLibVersion()  # isAlive() stays true until a call fails
        except libvirt.libvirtError:
            from testbed.host import ensure_libvirtd

            ensure_libvirtd()
            self.conn = self._connect()
        return self.conn


@pytest.fixture(scope="session")
def _libvirt_session() -> Iterator[_Connection]:
    holder = _Connection()
    yield holder
    holder.conn.close()


@pytest.fixture
def libvirt_conn(_libvirt_session: _Connection) -> object:
    """A connection to qemu:///system; libvirtd is started if (and only if)
    none is running. Stale test domains of crashed earlier runs are removed."""
    return _libvirt_session.get()


@pytest.fixture
def domains(libvirt_conn: object) -> Iterator[DomainFactory]:
    """Factory of throw-away domains, all removed (with checkpoints and
    images) when the test ends."""
    factory = DomainFactory(libvirt_conn)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def nbd_servers(tmp_path: Path) -> Iterator[NbdServers]:
    """qemu-nbd / nbdkit servers on Unix sockets in a private temp dir."""
    servers = NbdServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()
