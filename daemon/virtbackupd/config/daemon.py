"""The daemon configuration file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from enum import StrEnum
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from virtbackupd.config.folder_trust import check_trusted
from virtbackupd.config.yamlnodes import Source, excerpt
from virtbackupd.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/virtbackupd/virtbackupd.yaml")
ENV_CONFIG = "VIRTBACKUPD_CONFIG"
LOG_FORMATS = ("auto", "journal", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class Priority(StrEnum):
    """CPU and I/O priority of the daemon, the CLI and their helpers
    (adapters/priority.py applies it)."""

    LOW = "low"  # yield to the guests (default)
    NORMAL = "normal"  # as started


@dataclass(frozen=True)
class DaemonConfig:
    source: Path
    libvirt_uri: str = "qemu:///system"
    # The bound of one blocking libvirt call, in seconds: a hung libvirtd
    # fails the job with an error naming the call instead of blocking it.
    libvirt_timeout: float = 120.0
    state_dir: Path = Path("/var/lib/virtbackupd")
    backup_root: Path = Path("/var/lib/virtbackupd/backups")
    runtime_dir: Path = Path("/run/virtbackupd")
    # Copy-before-write scratch files of online backups: on disk, never a
    # tmpfs by default (docs/operations.md, "What virtbackupd does to your VMs").
    scratch_dir: Path = Path("/var/lib/virtbackupd/scratch")
    policy_dirs: tuple[Path, ...] = (Path("/etc/virtbackupd/policies.d"),)
    max_concurrent_backups: int = 2
    # CPU and I/O priority of the daemon, the CLI and their helpers.
    priority: Priority = Priority.LOW
    log_format: str = "auto"
    log_level: str = "info"
    # Scheduled runs start up to this many seconds after their minute, at
    # random (many domains on one schedule do not all start at once).
    schedule_jitter: int = 30
    # A request that found its domain busy (another backup, restore or
    # prune holds its lock; another tool's libvirt job) is tried again this
    # many seconds later, for as long as the daemon runs: never dropped.
    busy_retry: int = 15
    # The zone cron expressions are read in: the host's local time, as
    # cron's, unless `schedule.timezone` names one.
    schedule_timezone: tzinfo = field(default_factory=lambda: local_zone())

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"


LOCALTIME = Path("/etc/localtime")


def local_zone() -> tzinfo:
    """The host's local time zone as cron finds it: $TZ, else
    /etc/localtime (by its name under zoneinfo/ when it links there, so
    that `status` can say "Europe/Berlin"), else UTC."""
    tz = os.environ.get("TZ", "").removeprefix(":")
    if tz:
        try:
            return parse_zone(tz)
        except ValueError:
            pass  # as glibc: a TZ it cannot read is UTC, but a file may say better
    try:
        target = str(LOCALTIME.resolve(strict=True))
        if "/zoneinfo/" in target:
            return parse_zone(target.split("/zoneinfo/", 1)[1])
        with LOCALTIME.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


def parse_zone(name: str) -> tzinfo:
    """An IANA time zone name (`Europe/Berlin`, `UTC`); ValueError if the
    host's time zone database does not know it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # The name is untrusted: cut and escaped as every config excerpt.
        raise ValueError(f"no time zone '{excerpt(name)}' in the host's zone database") from exc


def zone_name(zone: tzinfo) -> str:
    """How `status` names the schedules' zone."""
    return str(getattr(zone, "key", None) or zone)


def config_path(cli_value: str | None) -> Path:
    """`-c PATH`, else $VIRTBACKUPD_CONFIG, else the default."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_CONFIG


CONFIG_KEYS = (
    "libvirt_uri",
    "libvirt_timeout",
    "state_dir",
    "backup_root",
    "runtime_dir",
    "scratch_dir",
    "policy_dirs",
    "max_concurrent_backups",
    "priority",
    "log",
    "schedule",
)

# What a file sets, by DaemonConfig field; what it leaves out keeps the default.
_Settings = dict[str, object]
_Keys = dict[str, yaml.Node]


def load_config(path: Path) -> DaemonConfig:
    """Read and validate the daemon config; relative paths resolve against
    the folder of the file, so a repository-local config works anywhere."""
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (give one with -c PATH or ${ENV_CONFIG})")
    src = Source.read(path)
    base = path.resolve().parent
    keys = src.mapping(src.root, "", CONFIG_KEYS)
    cfg = {"source": path, **_folders(src, keys, base), **_limits(src, keys, base)}
    _schedule(src, keys, cfg)
    _log(src, keys, cfg)
    src.raise_errors()
    config = DaemonConfig(**cfg)  # type: ignore[arg-type]
    _refuse_untrusted_folders(config, path)
    return config


def _folders(src: Source, keys: _Keys, base: Path) -> _Settings:
    """The libvirt URI and the folders (relative ones below `base`)."""

    def path_of(key: str, default: Path) -> Path:
        if key not in keys:
            return default
        return base / src.string(keys[key], key)

    state_dir = path_of("state_dir", DaemonConfig.state_dir)
    return {
        "libvirt_uri": src.string(keys["libvirt_uri"], "libvirt_uri")
        if "libvirt_uri" in keys
        else DaemonConfig.libvirt_uri,
        "state_dir": state_dir,
        "backup_root": path_of("backup_root", state_dir / "backups"),
        "runtime_dir": path_of("runtime_dir", DaemonConfig.runtime_dir),
        "scratch_dir": path_of("scratch_dir", state_dir / "scratch"),
    }


def _limits(src: Source, keys: _Keys, base: Path) -> _Settings:
    """libvirt_timeout, policy_dirs, max_concurrent_backups, priority."""
    cfg: _Settings = {}
    if "libvirt_timeout" in keys:
        cfg["libvirt_timeout"] = float(
            src.integer(keys["libvirt_timeout"], "libvirt_timeout", minimum=1)
        )
    if "policy_dirs" in keys:
        dirs = src.string_list(keys["policy_dirs"], "policy_dirs")
        cfg["policy_dirs"] = tuple(base / d for d in dirs)
    if "max_concurrent_backups" in keys:
        cfg["max_concurrent_backups"] = src.integer(
            keys["max_concurrent_backups"], "max_concurrent_backups", minimum=1
        )
    if "priority" in keys:
        cfg["priority"] = Priority(
            src.choice(keys["priority"], "priority", [p.value for p in Priority])
        )
    return cfg


def _schedule(src: Source, keys: _Keys, cfg: _Settings) -> None:
    sched = src.mapping(keys.get("schedule"), "schedule", ["jitter", "busy_retry", "timezone"])
    if "timezone" in sched:
        with src.collecting():
            name = src.string(sched["timezone"], "schedule.timezone")
            cfg["schedule_timezone"] = (
                local_zone()
                if name == "local"
                else src.checked(
                    sched["timezone"],
                    "schedule.timezone",
                    parse_zone,
                    "an IANA time zone name such as Europe/Berlin or UTC, or local",
                )
            )
    if "jitter" in sched:
        jitter = src.integer(sched["jitter"], "schedule.jitter")
        if jitter > 59:
            raise src.error(
                sched["jitter"], "schedule.jitter", f"{jitter} is not below 60 (seconds)"
            )
        cfg["schedule_jitter"] = jitter
    if "busy_retry" in sched:
        cfg["busy_retry"] = src.integer(sched["busy_retry"], "schedule.busy_retry", minimum=1)


def _log(src: Source, keys: _Keys, cfg: _Settings) -> None:
    log = src.mapping(keys.get("log"), "log", ["format", "level"])
    if "format" in log:
        cfg["log_format"] = src.choice(log["format"], "log.format", LOG_FORMATS)
    if "level" in log:
        cfg["log_level"] = src.choice(log["level"], "log.level", LOG_LEVELS)


def _refuse_untrusted_folders(config: DaemonConfig, path: Path) -> None:
    """ConfigError naming the first configured folder another user controls."""
    folders = {
        "state_dir": config.state_dir,
        "backup_root": config.backup_root,
        "runtime_dir": config.runtime_dir,
        "scratch_dir": config.scratch_dir,
        # Whoever can write a policy folder decides what root backs up, and where.
        **{f"policy_dirs[{i}]": d for i, d in enumerate(config.policy_dirs)},
    }
    problems = check_trusted(folders, path)
    if problems:  # the first: the others are often the same folder seen again
        raise ConfigError(problems[0])
