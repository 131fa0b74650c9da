"""libvirt losing its checkpoint metadata (a domain undefined with
--checkpoints-metadata and defined again, a host moved) after a prune: the
oldest kept checkpoint's stored XML names a parent the prune removed. The
next backup redefines the lost lineage from that checkpoint on, as a root,
and the chain goes on as an incremental that restores byte-exact.

Before: every later backup failed with libvirt's "parent ... not found",
forever, until the operator ran forget-checkpoints."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from testbed.cli import run_cli
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.tools import assert_restores


def test_lost_checkpoints_after_a_prune_are_redefined_from_the_oldest_kept(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\nretention: {{keep_last: 2}}\n"
    )
    guest = GuestWriter(td)
    made = []
    for i in range(3):
        guest.write("vda", i * MiB, MiB, 0x31 + i)
        made.append(run_cli(config, capsys, "backup", td.name))
    assert [b["level"] for b in made] == ["full", "incremental", "incremental"]
    run_cli(config, capsys, "prune", td.name)
    kept = run_cli(config, capsys, "list", td.name)
    assert [b["id"] for b in kept] == [made[1]["id"], made[2]["id"]]
    assert made[0]["checkpoint"] not in {cp.getName() for cp in td.dom.listAllCheckpoints(0)}

    # libvirt loses every checkpoint's metadata; the bitmaps stay in the image.
    for cp in td.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)[::-1]:
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    assert td.dom.listAllCheckpoints(0) == []

    guest.write("vda", 8 * MiB, MiB, 0x41)
    after = run_cli(config, capsys, "backup", td.name)
    assert after["level"] == "incremental" and after["parent"] == made[2]["id"], after
    by_disk = {d["name"]: d for d in after["disks"]}
    assert by_disk["vda"]["bytes_written"] == MiB  # only what changed: the bitmap was used
    assert_restores(
        Path(after["path"]), [(d["name"], d["path"]) for d in after["disks"]], td, tmp_path
    )
    # The redefined oldest kept checkpoint is a root: its pruned parent is not named.
    oldest = td.dom.checkpointLookupByName(made[1]["checkpoint"])
    with pytest.raises(libvirt.libvirtError):
        oldest.getParent()
