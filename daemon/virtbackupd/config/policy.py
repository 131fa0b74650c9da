"""Policy files: one YAML file per VM or group of VMs in a policy dir."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from virtbackupd.config.yamlnodes import Source
from virtbackupd.core.backup_documents import RawDisks
from virtbackupd.core.policy import EventAction, Policy, Quiesce, Retention
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
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError("more than zero")
    return value


def _cron(expr: str) -> str:
    from virtbackupd.adapters.scheduler import validate_cron

    validate_cron(expr)
    return expr


def _uuid(text: str) -> str:
    return str(uuidlib.UUID(text))


def load_policy(path: Path) -> Policy:
    src = Source.read(path)
    keys = src.mapping(src.root, "", TOP_KEYS)
    if src.root is None or not keys:
        raise ConfigError(f"{path}: empty policy (it needs at least `domains:` or `uuids:`)")
    kw: dict[str, object] = {"source": path}
    for key in ("domains", "exclude_domains"):
        if key in keys:
            kw[key] = src.string_list(keys[key], key)
    if "uuids" in keys:
        node = keys["uuids"]
        items = node.value if hasattr(node, "value") and isinstance(node.value, list) else []
        kw["uuids"] = (
            tuple(
                src.checked(n, f"uuids[{i}]", _uuid, "a UUID").lower() for i, n in enumerate(items)
            )
            if items
            else src.string_list(node, "uuids")
        )
    if not kw.get("domains") and not kw.get("uuids"):
        raise src.error(src.root, "domains", "a policy must name domains (`domains:` or `uuids:`)")

    disks = src.mapping(keys.get("disks"), "disks", ["include", "exclude", "raw"])
    if "include" in disks:
        kw["include_disks"] = frozenset(src.string_list(disks["include"], "disks.include"))
    if "exclude" in disks:
        kw["exclude_disks"] = frozenset(src.string_list(disks["exclude"], "disks.exclude"))
    if "raw" in disks:
        kw["raw"] = RawDisks(src.choice(disks["raw"], "disks.raw", [r.value for r in RawDisks]))

    schedule = src.mapping(keys.get("schedule"), "schedule", ["full", "incremental", "verify"])
    for level in ("full", "incremental", "verify"):
        if level in schedule and src.scalar(schedule[level], f"schedule.{level}") is not None:
            kw[f"{level}_schedule"] = src.checked(
                schedule[level],
                f"schedule.{level}",
                _cron,
                "a cron expression with 5 fields (minute hour day month weekday)",
            )

    chain = src.mapping(keys.get("chain"), "chain", ["max_incrementals"])
    if "max_incrementals" in chain:
        kw["max_incrementals"] = src.integer(chain["max_incrementals"], "chain.max_incrementals")

    retention = src.mapping(keys.get("retention"), "retention", RETENTION_KEYS)
    kw["retention"] = Retention(
        **{k: src.integer(v, f"retention.{k}") for k, v in retention.items()}
    )

    events = src.mapping(keys.get("events"), "events", ["on_shutdown", "on_define"])
    for ev in ("on_shutdown", "on_define"):
        if ev in events:
            kw[ev] = EventAction(
                src.choice(events[ev], f"events.{ev}", [a.value for a in EventAction])
            )
    if "quiesce" in keys:
        kw["quiesce"] = Quiesce(src.choice(keys["quiesce"], "quiesce", [q.value for q in Quiesce]))
    if "bandwidth" in keys and src.scalar(keys["bandwidth"], "bandwidth") is not None:
        kw["bandwidth"] = src.checked(
            keys["bandwidth"], "bandwidth", parse_rate, "a rate such as 200MiB (per second)"
        )
    if "target" in keys:
        kw["target"] = path.resolve().parent / src.string(keys["target"], "target")
    return Policy(**kw)  # type: ignore[arg-type]


def policy_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml"))
    return files


def load_policies(files: Sequence[Path]) -> tuple[list[Policy], list[ConfigError]]:
    """Every policy that loads, and an error for every one that does not;
    the same domain pattern or UUID in two files is an error too."""
    policies: list[Policy] = []
    errors: list[ConfigError] = []
    for f in files:
        try:
            policies.append(load_policy(f))
        except ConfigError as exc:
            errors.append(exc)
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
    return policies, errors
