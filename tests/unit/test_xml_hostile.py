"""Hostile and awkward input to the XML model: a hardened parser, exact
escaping, and errors that name the document and the problem."""

from __future__ import annotations

import pytest
from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.core.backup_xml import (
    Backup,
    BackupDisk,
    BackupMode,
    Server,
    Store,
    StoreType,
    Transport,
)
from virtbackupd.core.checkpoint_xml import Checkpoint
from virtbackupd.errors import XMLError
from xmltools import child

AWKWARD = '/srv/a b/it\'s "q" & <x> é ü 日本.sock'


def test_entity_expansion_is_refused() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
        "<domaincheckpoint><name>&b;</name></domaincheckpoint>"
    )
    with pytest.raises(XMLError, match="cp.xml: DOCTYPE and entity declarations are not accepted"):
        Checkpoint.from_xml(bomb, "cp.xml")


def test_external_entity_is_refused() -> None:
    xxe = (
        '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<domaincheckpoint><description>&x;</description></domaincheckpoint>"
    )
    with pytest.raises(XMLError, match="not accepted"):
        Checkpoint.from_xml(xxe, "cp.xml")


def test_oversized_document_is_refused() -> None:
    huge = "<domaincheckpoint><description>" + "x" * xmldoc.MAX_DOCUMENT_BYTES
    huge += "</description></domaincheckpoint>"
    with pytest.raises(XMLError, match="over the .* limit"):
        Checkpoint.from_xml(huge, "big.xml")


def test_malformed_xml_names_document_and_problem() -> None:
    with pytest.raises(XMLError, match=r"^backup of web01: malformed XML: .*line 1"):
        Backup.from_xml("<domainbackup><disks></domainbackup>", "backup of web01")


def test_wrong_root_element() -> None:
    with pytest.raises(XMLError, match="root element is <domain>, expected <domaincheckpoint>"):
        Checkpoint.from_xml("<domain/>", "x.xml")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domainbackup mode='push2'/>", "mode= is 'push2', expected one of: push, pull"),
        ("<domainbackup colour='x'/>", "unknown attribute 'colour' on <domainbackup>"),
        ("<domainbackup><extra/></domainbackup>", "unknown element <extra> inside <domainbackup>"),
        (
            "<domainbackup><server transport='unix' socket='/s'/></domainbackup>",
            "<server> is only allowed with mode='pull'",
        ),
        (
            "<domainbackup mode='pull'><server transport='unix'/></domainbackup>",
            "transport='unix' needs socket=",
        ),
        (
            "<domainbackup mode='pull'><server name='h' port='x'/></domainbackup>",
            "server port= is 'x', expected a non-negative integer",
        ),
        (
            "<domainbackup><disks><disk name='vda'/><disk name='vda'/></disks></domainbackup>",
            "disk 'vda' is listed twice",
        ),
        (
            "<domainbackup><disks><disk name='vda' backupmode='full' incremental='c'/>"
            "</disks></domainbackup>",
            "is backupmode='full' but names incremental=",
        ),
        (
            "<domaincheckpoint><creationTime>-1</creationTime></domaincheckpoint>",
            "<creationTime> is '-1', expected a non-negative integer",
        ),
        (
            "<domaincheckpoint><disks><disk name='vda' checkpoint='maybe'/></disks>"
            "</domaincheckpoint>",
            "checkpoint= of disk 'vda' is 'maybe', expected one of: no, bitmap",
        ),
    ],
)
def test_invalid_documents_get_precise_errors(xml: str, message: str) -> None:
    parse = Checkpoint.from_xml if xml.startswith("<domaincheckpoint") else Backup.from_xml
    with pytest.raises(XMLError) as exc:
        parse(xml, "doc.xml")
    assert str(exc.value).startswith("doc.xml: ")
    assert message in str(exc.value)


def test_awkward_names_and_paths_are_escaped_and_round_trip() -> None:
    backup = Backup(
        mode=BackupMode.PULL,
        server=Server(transport=Transport.UNIX, socket=AWKWARD),
        disks=(
            BackupDisk(
                name="vda",
                backup=True,
                type=StoreType.FILE,
                exportname="it's & <me>",
                store=Store(path=AWKWARD + "\nnext\tline"),
            ),
        ),
    )
    text = backup.to_xml()
    assert "&apos;" in text and "&amp;" in text and "&lt;x&gt;" in text and "日本" in text
    # Any standard parser reads back the exact values.
    el = etree.fromstring(text.encode())
    assert child(el, "server").get("socket") == AWKWARD
    assert Backup.from_xml(text) == backup


def test_awkward_description_round_trips() -> None:
    cp = Checkpoint(name="c1", description="a < b & 'c' \"d\"\n  ünïcode")
    assert Checkpoint.from_xml(cp.to_xml()) == cp
