"""Config and policy files are untrusted input: every hostile file is one
ConfigError naming the file (never a traceback, never a hang, never its
content echoed at length), and a set of policy files with a bad one keeps
the good ones."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtbackupd.config.daemon import load_config
from virtbackupd.config.policy import load_policies, load_policy, policy_files
from virtbackupd.errors import ConfigError

SECRET = "root:$y$j9T$Q8sK1Ld9aZ0ExampleHashThatMustNeverBeEchoed/xyz:19700:0:99999:7:::"  # noqa: S105 - a shadow line, the kind of content never to echo

Maker = Callable[[Path], Path]


def _text(text: str) -> Maker:
    def make(folder: Path) -> Path:
        p = folder / "p.yaml"
        p.write_text(text)
        return p

    return make


def _bytes(data: bytes) -> Maker:
    def make(folder: Path) -> Path:
        p = folder / "p.yaml"
        p.write_bytes(data)
        return p

    return make


def _link(target: str) -> Maker:
    def make(folder: Path) -> Path:
        p = folder / "p.yaml"
        p.symlink_to(target)
        return p

    return make


def _link_out(folder: Path) -> Path:
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.yaml").write_text(SECRET + "\n")
    p = folder / "p.yaml"
    p.symlink_to(outside / "secret.yaml")
    return p


def _fifo(folder: Path) -> Path:
    p = folder / "p.yaml"
    os.mkfifo(p)
    return p


def _folder(folder: Path) -> Path:
    p = folder / "p.yaml"
    p.mkdir()
    return p


def _loop(folder: Path) -> Path:
    p = folder / "p.yaml"
    p.symlink_to(folder / "q.link")
    (folder / "q.link").symlink_to(p)
    return p


HOSTILE: list[tuple[str, Maker, str]] = [
    ("nested lists", _text("domains: " + "[" * 20000 + "]" * 20000 + "\n"), "nested"),
    ("nested mappings", _text("domains: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"), "nested"),
    ("slightly nested", _text("domains: " + "[" * 70 + "]" * 70 + "\n"), "nested"),
    ("/dev/zero", _link("/dev/zero"), "not read"),
    ("a fifo", _fifo, "not a regular file"),
    ("a folder", _folder, "not a regular file"),
    ("a symlink loop", _loop, "cannot read"),
    ("too large", _text("# padding\n" * 200_000 + "domains: [x]\n"), "larger than"),
    ("link out of its folder", _link_out, "outside its folder"),
    ("a secret as the policy", _text(SECRET + "\n"), "unknown key"),
    ("a secret as a value", _text(f"domains: [x]\nquiesce: '{SECRET}'\n"), "quiesce"),
    ("not utf-8", _bytes(b"domains: [\xff\xfe]\n"), "not UTF-8"),
    ("a NUL byte", _bytes(b"domains: [x]\n\x00\n"), ""),
    ("octal-looking integer", _text("domains: [x]\nretention: {keep_last: 09}\n"), "keep_last"),
    ("huge integer", _text("domains: [x]\nretention: {keep_last: " + "9" * 5000 + "}\n"), ""),
    ("huge rate", _text("domains: [x]\nbandwidth: " + "9" * 400 + "MiB\n"), "bandwidth"),
    (
        "alias bomb",
        _text(
            "a: &a [x, x, x]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
                for i in range(20)
            )
        ),
        "unknown key",
    ),
    ("control characters", _text('domains: [x]\nquiesce: "\\e[31mred\\a"\n'), "quiesce"),
]


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_policy_file_is_one_short_error(tmp_path: Path, make: Maker, expect: str) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    path = make(folder)
    started = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        load_policy(path)
    assert time.monotonic() - started < 10
    text = str(exc.value)
    assert text.startswith(str(path)), text
    assert expect in text, text
    assert "ExampleHash" not in text, text  # no more than a short excerpt
    assert "\x1b" not in text and "\x07" not in text, repr(text)
    assert all(len(line) < 400 for line in text.splitlines()), text


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_file_beside_good_ones_keeps_the_good_ones(
    tmp_path: Path, make: Maker, expect: str
) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    bad = make(folder)
    (folder / "good.yaml").write_text("domains: [web]\n")
    loaded = load_policies(policy_files([folder]))
    policies, errors = loaded.policies, loaded.errors
    assert [p.domains for p in policies] == [("web",)]
    assert errors and all(str(e).startswith(str(bad)) for e in errors), errors


@pytest.mark.parametrize(
    ("make", "expect"),
    [c[1:] for c in HOSTILE if c[0] not in ("a secret as a value",)],
    ids=[c[0] for c in HOSTILE if c[0] not in ("a secret as a value",)],
)
def test_a_hostile_daemon_config_is_one_short_error(
    tmp_path: Path, make: Maker, expect: str
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = make(folder)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert text.startswith(str(path)), text
    assert "ExampleHash" not in text and "\x1b" not in text, text


def test_a_link_inside_its_folder_is_read(tmp_path: Path) -> None:
    """Configuration management often links a file to a twin beside it."""
    (tmp_path / "real.yaml").write_text("domains: [web]\n")
    (tmp_path / "web.yaml").symlink_to("real.yaml")
    assert load_policy(tmp_path / "web.yaml").domains == ("web",)


UUID = "0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01"


def _folder_with(tmp_path: Path, files: dict[str, str]) -> list[Path]:
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return policy_files([folder])


@pytest.mark.parametrize(
    ("files", "domain", "refused"),
    [
        # The domain's own file has an unknown key: never its defaults instead.
        ({"web.yaml": "domains: [web]\ncolor: red\n"}, "web", "web.yaml:2: color"),
        ({"web.yaml": "domains: [web]\ncolor: red\n"}, "db", None),
        ({"u.yaml": f"uuids: [{UUID}]\nquiesce: x\n"}, "any", "quiesce"),
        # Names unreadable: it may be meant for any domain no policy governs.
        ({"bad.yaml": "domains: [web\n", "db.yaml": "domains: [db]\n"}, "web", "not valid YAML"),
        ({"bad.yaml": "domains: [web\n", "db.yaml": "domains: [db]\n"}, "db", None),
        # A loaded policy governs it, a broken one names it too: refused.
        ({"a.yaml": "domains: [web]\n", "b.yaml": "domains: ['w*']\nchain: 3\n"},
         "web", "b.yaml:2"),
        ({"a.yaml": "domains: [web]\n"}, "web", None),
    ],
)  # fmt: skip
def test_a_broken_file_that_may_govern_a_domain_refuses_it(
    tmp_path: Path, files: dict[str, str], domain: str, refused: str | None
) -> None:
    loaded = load_policies(_folder_with(tmp_path, files))
    why = loaded.refusal(
        domain, "0B1CBD0E-1C2F-4A57-9B43-5B1F1E0F7A01" if domain == "any" else "1-2"
    )
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why and f"domain '{domain}'" in why, why
