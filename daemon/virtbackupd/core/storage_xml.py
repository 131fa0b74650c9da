"""Storage pieces shared by backup targets and scratch files:
`<seclabel>`, `<encryption>` with `<secret>`, `<cipher>` and `<ivgen>`."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.core.xmldoc import element
from virtbackupd.errors import XMLError


@dataclass(frozen=True)
class Seclabel:
    """A per-device security label (`devSeclabel` in libvirt's schema)."""

    model: str | None = None
    labelskip: str | None = None
    relabel: str | None = None
    label: str | None = None

    def to_element(self) -> etree._Element:
        return element(
            "seclabel",
            [("model", self.model), ("labelskip", self.labelskip), ("relabel", self.relabel)],
            children=[element("label", text=self.label) if self.label is not None else None],
        )

    @classmethod
    def from_element(cls, el: etree._Element, document: str) -> Seclabel:
        a = xmldoc.attrs_of(el, document, ("model", "labelskip", "relabel"))
        xmldoc.children_of(el, document, ("label",))
        for key in ("labelskip", "relabel"):
            xmldoc.parse_choice(a.get(key), ("yes", "no"), document, f"seclabel {key}=")
        return cls(
            model=a.get("model"),
            labelskip=a.get("labelskip"),
            relabel=a.get("relabel"),
            label=xmldoc.text_of(xmldoc.single(el, "label", document)),
        )


@dataclass(frozen=True)
class Secret:
    """`<secret type='passphrase' uuid=... | usage=...>` naming a libvirt secret."""

    type: str
    uuid: str | None = None
    usage: str | None = None

    def to_element(self) -> etree._Element:
        return element("secret", [("type", self.type), ("uuid", self.uuid), ("usage", self.usage)])

    @classmethod
    def from_element(cls, el: etree._Element, document: str) -> Secret:
        a = xmldoc.attrs_of(el, document, ("type", "uuid", "usage"))
        xmldoc.children_of(el, document, ())
        if "type" not in a:
            raise XMLError(document, "<secret> needs type='passphrase'")
        if ("uuid" in a) == ("usage" in a):
            raise XMLError(document, "<secret> needs exactly one of uuid= or usage=")
        return cls(type=a["type"], uuid=a.get("uuid"), usage=a.get("usage"))


@dataclass(frozen=True)
class Cipher:
    name: str
    size: int
    mode: str | None = None
    hash: str | None = None

    def to_element(self) -> etree._Element:
        return element(
            "cipher",
            [
                ("name", self.name),
                ("size", str(self.size)),
                ("mode", self.mode),
                ("hash", self.hash),
            ],
        )


@dataclass(frozen=True)
class IvGen:
    name: str
    hash: str | None = None

    def to_element(self) -> etree._Element:
        return element("ivgen", [("name", self.name), ("hash", self.hash)])


@dataclass(frozen=True)
class Encryption:
    """`<encryption format='luks'>` of a backup target or scratch file."""

    format: str
    secrets: tuple[Secret, ...] = ()
    engine: str | None = None
    cipher: Cipher | None = None
    ivgen: IvGen | None = None

    def to_element(self) -> etree._Element:
        return element(
            "encryption",
            [("format", self.format), ("engine", self.engine)],
            children=[
                *(s.to_element() for s in self.secrets),
                self.cipher.to_element() if self.cipher else None,
                self.ivgen.to_element() if self.ivgen else None,
            ],
        )

    @classmethod
    def from_element(cls, el: etree._Element, document: str) -> Encryption:
        a = xmldoc.attrs_of(el, document, ("format", "engine"))
        kids = xmldoc.children_of(el, document, ("secret", "cipher", "ivgen"))
        if "format" not in a:
            raise XMLError(document, "<encryption> needs format='luks'")
        cipher = ivgen = None
        c = xmldoc.single(el, "cipher", document)
        if c is not None:
            ca = xmldoc.attrs_of(c, document, ("name", "size", "mode", "hash"))
            size = xmldoc.parse_uint(ca.get("size"), document, "cipher size=")
            if "name" not in ca or size is None:
                raise XMLError(document, "<cipher> needs name= and size=")
            cipher = Cipher(ca["name"], size, ca.get("mode"), ca.get("hash"))
        i = xmldoc.single(el, "ivgen", document)
        if i is not None:
            ia = xmldoc.attrs_of(i, document, ("name", "hash"))
            if "name" not in ia:
                raise XMLError(document, "<ivgen> needs name=")
            ivgen = IvGen(ia["name"], ia.get("hash"))
        return cls(
            format=a["format"],
            engine=a.get("engine"),
            secrets=tuple(Secret.from_element(k, document) for k in kids if k.tag == "secret"),
            cipher=cipher,
            ivgen=ivgen,
        )
