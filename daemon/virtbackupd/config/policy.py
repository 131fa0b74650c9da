"""Policy files: one YAML file per VM or group of VMs in a policy dir."""

from __future__ import annotations

import hashlib
import re
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from virtbackupd.config.folder_trust import on_pseudo_fs, untrusted_part
from virtbackupd.config.yamlnodes import FileProblemsError, Source, read_untrusted
from virtbackupd.core.backup_documents import RawDisks
from virtbackupd.core.cron import parse_cron
from virtbackupd.core.policy import EventAction, Policy, Quiesce, Rejected, Retention
from virtbackupd.errors import ConfigError

TOP_KEYS = [
    "domains",
    "uuids",
    "exclude_domains",
    "disks",
    "schedule",
    "chain",
    "retention",
    "events",
    "quiesce",
    "bandwidth",
    "target",
]
RETENTION_KEYS = [
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_rate(text: str) -> int:
    """'200MiB' (per second) -> bytes per second. Binary units."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError("a size such as 200MiB or 1GiB")
    unit = (m.group(2) or "").lower()[:1]
    amount = float(m.group(1)) * _UNITS[unit]
    if not amount < 1 << 60:  # also inf, from hundreds of digits
        raise ValueError("at most 1 EiB per second")
    value = int(amount)
    if value <= 0:
        raise ValueError("more than zero")
    return value


def _cron(expr: str) -> str:
    parse_cron(expr)
    return expr


def _uuid(text: str) -> str:
    return str(uuidlib.UUID(text))


# What a policy file sets, by Policy field; what it leaves out keeps the default.
_Settings = dict[str, object]
_Keys = dict[str, yaml.Node]


def load_policy(path: Path) -> Policy:
    """Read one policy file; every problem in it is reported at once
    (FileProblemsError), in line order."""
    src = Source.read(path)
    keys = src.mapping(src.root, "", TOP_KEYS)
    if src.root is None or (not keys and not src.errors):
        raise ConfigError(f"{path}: empty policy (it needs at least `domains:` or `uuids:`)")
    kw: _Settings = {"source": path}
    _names(src, keys, kw)
    # Each section is read on its own: a problem in one does not hide the next's.
    for part in (_disks, _schedules, _chain, _retention, _events):
        with src.collecting():
            part(src, keys, kw)
    _quiesce_and_bandwidth(src, keys, kw)
    if "target" in keys:
        with src.collecting():
            target = path.resolve().parent / src.string(keys["target"], "target")
            why = _untrusted_target(target)
            if why is not None:
                raise src.error(keys["target"], "target", f"{target} is not used: {why}")
            kw["target"] = target
    src.raise_errors()
    return Policy(**kw)  # type: ignore[arg-type]


def _names(src: Source, keys: _Keys, kw: _Settings) -> None:
    """domains, exclude_domains, uuids: and that some domain is named."""
    for key in ("domains", "exclude_domains"):
        if key in keys:
            with src.collecting():
                kw[key] = src.string_list(keys[key], key)
    if "uuids" in keys:
        with src.collecting():
            node = keys["uuids"]
            items = node.value if isinstance(node.value, list) else []
            kw["uuids"] = (
                tuple(
                    src.checked(n, f"uuids[{i}]", _uuid, "a UUID").lower()
                    for i, n in enumerate(items)
                )
                if items
                else src.string_list(node, "uuids")
            )
    if not kw.get("domains") and not kw.get("uuids") and not src.errors:
        src.errors.append(
            src.error(src.root, "domains", "a policy must name domains (`domains:` or `uuids:`)")
        )


def _disks(src: Source, keys: _Keys, kw: _Settings) -> None:
    disks = src.mapping(keys.get("disks"), "disks", ["include", "exclude", "raw"])
    if "include" in disks:
        with src.collecting():
            kw["include_disks"] = frozenset(src.string_list(disks["include"], "disks.include"))
    if "exclude" in disks:
        with src.collecting():
            kw["exclude_disks"] = frozenset(src.string_list(disks["exclude"], "disks.exclude"))
    if "raw" in disks:
        with src.collecting():
            kw["raw"] = RawDisks(src.choice(disks["raw"], "disks.raw", [r.value for r in RawDisks]))


def _schedules(src: Source, keys: _Keys, kw: _Settings) -> None:
    kinds = ["full", "incremental", "verify", "verify_filesystems"]
    schedule = src.mapping(keys.get("schedule"), "schedule", kinds)
    for level in kinds:
        with src.collecting():
            if level in schedule and src.scalar(schedule[level], f"schedule.{level}"):
                kw[f"{level}_schedule"] = src.checked(
                    schedule[level],
                    f"schedule.{level}",
                    _cron,
                    "a crontab(5) expression: minute hour day-of-month month day-of-week",
                )


def _chain(src: Source, keys: _Keys, kw: _Settings) -> None:
    chain = src.mapping(keys.get("chain"), "chain", ["max_incrementals"])
    if "max_incrementals" in chain:
        kw["max_incrementals"] = src.integer(chain["max_incrementals"], "chain.max_incrementals")


def _retention(src: Source, keys: _Keys, kw: _Settings) -> None:
    retention = src.mapping(keys.get("retention"), "retention", RETENTION_KEYS)
    kept: dict[str, int] = {}
    for k, v in retention.items():
        with src.collecting():
            kept[k] = src.integer(v, f"retention.{k}")
    kw["retention"] = Retention(**kept)


def _events(src: Source, keys: _Keys, kw: _Settings) -> None:
    events = src.mapping(keys.get("events"), "events", ["on_shutdown", "on_define"])
    for ev in ("on_shutdown", "on_define"):
        if ev in events:
            with src.collecting():
                kw[ev] = EventAction(
                    src.choice(events[ev], f"events.{ev}", [a.value for a in EventAction])
                )


def _quiesce_and_bandwidth(src: Source, keys: _Keys, kw: _Settings) -> None:
    if "quiesce" in keys:
        with src.collecting():
            kw["quiesce"] = Quiesce(
                src.choice(keys["quiesce"], "quiesce", [q.value for q in Quiesce])
            )
    if "bandwidth" in keys:
        with src.collecting():
            if src.scalar(keys["bandwidth"], "bandwidth") is not None:
                kw["bandwidth"] = src.checked(
                    keys["bandwidth"], "bandwidth", parse_rate, "a rate such as 200MiB (per second)"
                )


def _untrusted_target(target: Path) -> str | None:
    """Why root must not write backups to `target`: a kernel pseudo file
    system, or a folder on the way that another user controls (they could
    plant a link and redirect root's writes)."""
    if on_pseudo_fs(target):
        return "a kernel pseudo file system"
    why = untrusted_part(target)
    if why is not None:
        return f"{why}; a backup folder must be root's and writable only by root, all the way up"
    return None


def policy_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml"))
    return files


def file_digests(files: Iterable[Path]) -> dict[str, str]:
    """file -> SHA-256 of its bytes now ("" when it is not read: a FIFO, a
    device, a link out of its folder, too large; the same untrusted read
    as loading it): what `status` compares with the files the daemon
    loaded."""
    out = {}
    for f in files:
        try:
            out[str(f)] = hashlib.sha256(read_untrusted(f)).hexdigest()
        except ConfigError:
            out[str(f)] = ""
    return out


def missing_dirs(dirs: Iterable[Path]) -> list[Path]:
    """Configured policy folders that do not exist (or are no folder)."""
    return [d for d in dirs if not d.is_dir()]


@dataclass(frozen=True)
class LoadedPolicies:
    """What a policy folder holds: the policies that load, an error for
    each problem, and each file that does not load (Rejected)."""

    policies: list[Policy]
    errors: list[ConfigError]
    rejected: list[Rejected]

    def refusal(self, name: str, uuid: str) -> str | None:
        """Why a domain must not be backed up or pruned now: a file that
        does not load may govern it (None: nothing stands in the way)."""
        governed = any(p.matches(name, uuid) for p in self.policies)
        for r in self.rejected:
            if r.may_govern(name, uuid, governed):
                return r.refusal(name)
        return None


def load_policies(files: Sequence[Path]) -> LoadedPolicies:
    """Every policy that loads, and an error for every one that does not;
    the same domain pattern or UUID in two files is an error too."""
    policies: list[Policy] = []
    errors: list[ConfigError] = []
    rejected: list[Rejected] = []
    for f in files:
        try:
            policies.append(load_policy(f))
        except ConfigError as exc:
            found = exc.errors if isinstance(exc, FileProblemsError) else [exc]
            errors += found
            domains, uuids = _names_of(f)
            rejected.append(Rejected(f, str(found[0]), domains, uuids))
    seen: dict[str, Path] = {}
    for p in policies:
        for key in (*p.domains, *p.uuids):
            if key in seen and seen[key] != p.source:
                errors.append(
                    ConfigError(
                        f"{p.source}: domains: '{key}' is also in {seen[key]}; "
                        "one domain must be governed by one policy"
                    )
                )
            seen.setdefault(key, p.source)
    return LoadedPolicies(policies, errors, rejected)


def _names_of(path: Path) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """The domains and UUIDs a broken policy file names, if those parts
    read well (None where they do not)."""
    try:
        src = Source.read(path)
        keys = src.mapping(src.root, "", TOP_KEYS)
        domains = src.string_list(keys["domains"], "domains") if "domains" in keys else ()
        uuids = src.string_list(keys["uuids"], "uuids") if "uuids" in keys else ()
        return domains, tuple(_uuid(u).lower() for u in uuids)
    except (ConfigError, ValueError):
        return None, None
