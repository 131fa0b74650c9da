"""Reading and writing libvirt XML documents.

Parsing is hardened (no DTDs, no entity expansion, no network, a size
limit) because domain XML can carry guest-controlled strings. Writing
follows libvirt's own formatter byte for byte: two-space indentation,
single-quoted attributes, ``&apos;``-style escapes, empty elements closed
with ``/>``, and attributes/children in the order the model emits them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lxml import etree

from virtbackupd.errors import XMLError

#: Largest document accepted. A domain XML with hundreds of devices is a few
#: hundred KiB; anything near this is not a libvirt document.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024

_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=True,
    remove_pis=True,
    collect_ids=False,
)


def parse(data: str | bytes, document: str, root: str) -> etree._Element:
    """Parse `data` and check that its root element is `root`.

    `document` names what is being read (a file, or "checkpoint XML of
    domain web01") and is the start of every error message.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise XMLError(
            document, f"document is {len(raw)} bytes, over the {MAX_DOCUMENT_BYTES} limit"
        )
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise XMLError(document, "DOCTYPE and entity declarations are not accepted")
    try:
        el = etree.fromstring(raw, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise XMLError(document, f"malformed XML: {exc}") from exc
    if el.tag != root:
        raise XMLError(document, f"root element is <{el.tag}>, expected <{root}>")
    return el


def element(
    tag: str,
    attrs: Iterable[tuple[str, str | None]] = (),
    text: str | None = None,
    children: Iterable[etree._Element | None] = (),
) -> etree._Element:
    """Build an element; attributes whose value is None are left out, and
    the given order is kept (it is the order libvirt writes them in)."""
    el = etree.Element(tag)
    for name, value in attrs:
        if value is not None:
            el.set(name, value)
    if text is not None:
        el.text = text
    for child in children:
        if child is not None:
            el.append(child)
    return el


def _escape(value: str, attribute: bool) -> str:
    out = (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )
    if attribute:
        # libvirt writes these raw; a parser would then normalise them to
        # spaces. Character references keep the value exact.
        out = out.replace("\n", "&#xA;").replace("\r", "&#xD;").replace("\t", "&#x9;")
    return out


def _format(el: etree._Element, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    attrs = "".join(f" {k!s}='{_escape(str(v), True)}'" for k, v in el.attrib.items())
    children = [c for c in el if isinstance(c.tag, str)]
    text = el.text if el.text and (not children or el.text.strip()) else None
    if children:
        out.append(f"{pad}<{el.tag}{attrs}>\n")
        for child in children:
            _format(child, indent + 1, out)
        out.append(f"{pad}</{el.tag}>\n")
    elif text is not None:
        out.append(f"{pad}<{el.tag}{attrs}>{_escape(text, False)}</{el.tag}>\n")
    else:
        out.append(f"{pad}<{el.tag}{attrs}/>\n")


def serialize(el: etree._Element, indent: int = 0) -> str:
    """Format an element tree exactly as libvirt's formatter would."""
    out: list[str] = []
    _format(el, indent, out)
    return "".join(out)


def attrs_of(el: etree._Element, document: str, allowed: Iterable[str]) -> Mapping[str, str]:
    """The element's attributes, rejecting any the model does not know."""
    known = set(allowed)
    for name in el.attrib:
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise XMLError(
                document, f"unknown attribute '{name!s}' on <{el.tag}> (expected: {expected})"
            )
    return {str(k): str(v) for k, v in el.attrib.items()}


def children_of(el: etree._Element, document: str, allowed: Iterable[str]) -> list[etree._Element]:
    """The element's child elements, rejecting any the model does not know."""
    known = set(allowed)
    kids = [c for c in el if isinstance(c.tag, str)]
    for c in kids:
        if c.tag not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise XMLError(
                document, f"unknown element <{c.tag}> inside <{el.tag}> (expected: {expected})"
            )
    return kids


def single(el: etree._Element, tag: str, document: str) -> etree._Element | None:
    """The one child named `tag`, or None; two of them is an error."""
    found = [c for c in el if c.tag == tag]
    if len(found) > 1:
        raise XMLError(
            document, f"<{el.tag}> has {len(found)} <{tag}> elements, expected at most one"
        )
    return found[0] if found else None


def text_of(el: etree._Element | None) -> str | None:
    if el is None:
        return None
    return el.text or ""


def parse_uint(value: str | None, document: str, where: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise XMLError(document, f"{where} is '{value}', expected a non-negative integer")
    return int(value)


def parse_choice(
    value: str | None, choices: Iterable[str], document: str, where: str
) -> str | None:
    if value is None:
        return None
    options = tuple(choices)
    if value not in options:
        raise XMLError(document, f"{where} is '{value}', expected one of: {', '.join(options)}")
    return value
