"""Where a guest's filesystems lie: partition tables as sfdisk reports
them (GPT, MBR with logical partitions), LVM volumes as lvm reports them."""

from __future__ import annotations

import json

import pytest

from virtbackupd.core.volumes import Region, VolumeReadError, logical_volumes, partitions

MiB = 1024 * 1024


def sfdisk(label: str, parts: list[tuple[int, int, int, str]]) -> str:
    return json.dumps(
        {
            "partitiontable": {
                "label": label,
                "sectorsize": 512,
                "partitions": [
                    {"node": f"/x/disk.raw{n}", "start": start, "size": size, "type": t}
                    for n, start, size, t in parts
                ],
            }
        }
    )


@pytest.mark.parametrize(
    ("label", "parts", "want"),
    [
        (
            "gpt",
            [(1, 2048, 2048, "L"), (2, 4096, 8192, "L")],
            [("part1", MiB, MiB), ("part2", 2 * MiB, 4 * MiB)],
        ),
        # MBR: the extended partition (type 5, f or 85) holds no filesystem
        (
            "dos",
            [(1, 2048, 2048, "83"), (2, 4096, 8192, "5"), (5, 6144, 2048, "c")],
            [("part1", MiB, MiB), ("part5", 3 * MiB, MiB)],
        ),
        ("dos", [(1, 2048, 2048, "83"), (2, 4096, 8192, "F")], [("part1", MiB, MiB)]),
    ],
)
def test_partitions(
    label: str, parts: list[tuple[int, int, int, str]], want: list[tuple[str, int, int]]
) -> None:
    got = partitions("vda", sfdisk(label, parts), 64 * MiB)
    assert [(r.name, r.offset, r.size) for r in got] == want
    assert got[0].label == "vda/part1"


def test_no_table_is_no_partitions() -> None:
    assert partitions("vda", "", MiB) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "unreadable partition table"),
        (sfdisk("gpt", [(1, 2048, 999999, "L")]), "past the disk's end"),
    ],
)
def test_bad_tables_are_named(text: str, problem: str) -> None:
    with pytest.raises(VolumeReadError, match=f"disk vda: .*{problem}"):
        partitions("vda", text, 64 * MiB)


def lvs(*segs: tuple[str, str, str, str]) -> str:
    return json.dumps(
        {
            "report": [
                {
                    "seg": [
                        {
                            "vg_name": vg,
                            "lv_name": lv,
                            "segtype": t,
                            "seg_pe_ranges": r,
                            "vg_extent_size": "4194304",
                        }
                        for vg, lv, t, r in segs
                    ]
                }
            ]
        }
    )


def test_linear_volumes_become_byte_ranges() -> None:
    pv = Region("vda", "part4", 100 * MiB, 200 * MiB)
    got, skipped = logical_volumes(
        pv,
        lvs(
            ("vg", "data", "linear", "/dev/loop3:0-9"), ("vg", "logs", "linear", "/dev/loop3:10-14")
        ),
        MiB,
    )
    assert skipped == []
    assert got == [
        Region("vda", "part4/vg/data", 101 * MiB, 40 * MiB),
        Region("vda", "part4/vg/logs", 141 * MiB, 20 * MiB),
    ]
    whole, _ = logical_volumes(
        Region("vdb", "", 0, 64 * MiB), lvs(("vg", "a", "linear", "/dev/l:1-1")), MiB
    )
    assert whole == [Region("vdb", "vg/a", 5 * MiB, 4 * MiB)]


def test_volumes_only_device_mapper_could_assemble_are_named_not_shown() -> None:
    pv = Region("vda", "part4", 0, 400 * MiB)
    got, skipped = logical_volumes(
        pv,
        lvs(
            ("vg", "split", "linear", "/dev/l:0-1"),
            ("vg", "split", "linear", "/dev/l:5-6"),
            ("vg", "fast", "striped", "/dev/l:2-3 /dev/m:0-1"),
            ("vg", "ok", "linear", "/dev/l:7-7"),
        ),
        0,
    )
    assert [r.name for r in got] == ["part4/vg/ok"]
    assert len(skipped) == 2
    assert any("vda/part4/vg/split: not shown" in s and "2 segment(s)" in s for s in skipped)
    assert any("vda/part4/vg/fast: not shown" in s and "striped" in s for s in skipped)


def test_a_volume_past_its_physical_volume_is_an_error() -> None:
    with pytest.raises(VolumeReadError, match="past the end of its physical volume"):
        logical_volumes(Region("vda", "", 0, 8 * MiB), lvs(("vg", "a", "linear", "/d:0-9")), 0)
