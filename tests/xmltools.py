"""XML helpers for tests: the libvirt corpus, canonical comparison, and
libvirt's installed RelaxNG schemas."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "libvirt-testdata"
SCHEMAS = Path("/usr/share/libvirt/schemas")


def corpus(subdir: str) -> list[Path]:
    files = sorted((CORPUS / subdir).glob("*.xml"))
    # The corpus is part of the test inputs: a missing one must fail, not skip.
    assert files, f"no files in {CORPUS / subdir}: is shared/libvirt-testdata beside the repo?"
    return files


def canonical(data: str | bytes) -> bytes:
    """C14N 2.0 with whitespace-only text and comments dropped."""
    raw = data.encode() if isinstance(data, str) else data
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    tree = etree.fromstring(raw, parser)
    # lxml-stubs 0.5 predates C14N 2.0's options (strip_text): lxml takes them.
    out: bytes = etree.tostring(  # type: ignore[call-overload]
        tree, method="c14n2", strip_text=True, with_comments=False
    )
    return out


def child(el: etree._Element, path: str) -> etree._Element:
    """`el.find(path)`, which must be there (a test failing on a missing
    element names its path, not None's missing attribute)."""
    found = el.find(path)
    assert found is not None, f"no {path} under <{el.tag}>"
    return found


@functools.cache
def schema(name: str) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMAS / f"{name}.rng")))


def schema_errors(name: str, xml: str) -> str | None:
    """None when `xml` validates against libvirt's `name`.rng, else the log."""
    rng = schema(name)
    if rng.validate(etree.fromstring(xml.encode())):
        return None
    return str(rng.error_log)
