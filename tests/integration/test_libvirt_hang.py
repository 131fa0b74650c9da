"""A libvirt connection whose peer stops answering mid-session (issue 24,
item 8): a call on it fails within its bound, naming the call, and the
keepalive closes the connection so that the calls waiting on it end too.
The real libvirtd is reached through a proxy of the test's own that stops
forwarding (a dead peer; libvirtd itself is not touched)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from testbed.libvirt_proxy import freezing_proxy
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.errors import LibvirtError, LibvirtTimeoutError


async def test_a_call_whose_peer_stops_answering_is_bounded_and_the_keepalive_ends_it() -> None:
    with freezing_proxy() as (uri, freeze):
        lv = await Libvirt.open(uri, timeout=3)
        await lv.domains()  # answered through the proxy
        freeze()
        started = time.monotonic()
        with pytest.raises(LibvirtTimeoutError) as caught:
            await lv.domains()
        took = time.monotonic() - started
        print(f"a call to a frozen peer: {took:.1f} s: {caught.value}")
        assert took < 15 and "listAllDomains" in str(caught.value)

        # Given up: no second call waits beside the hung one.
        with pytest.raises(LibvirtError, match="given up when listAllDomains did not answer"):
            await lv.xml(DomainRef("x", "00000000-0000-0000-0000-000000000000"))

        # The keepalive (5 s idle, 3 unanswered) closes the connection.
        started = time.monotonic()
        while lv.alive():
            assert time.monotonic() - started < 60, "no keepalive close within 60 s"
            await asyncio.sleep(0.5)
        print(f"the keepalive closed the connection {time.monotonic() - started:.1f} s later")
        await lv.close()
    # The hung call's thread met the closed socket: the process lives on.
    assert threading.active_count() >= 1
