"""One way into any job on one domain's backups: backup, restore, verify,
prune (and the daemon's clean-up at start) enter through
:func:`domain_job`, which takes the domain's lock (engine.locks) and then
finishes what dead processes left behind before the job sees anything:

- with libvirt (a backup, the daemon): everything engine.recovery.leftovers does
  (a frozen guest thawed, an orphaned pull job aborted, undo logs
  replayed or their committed backups catalogued, stale records failed);
- always: the helpers dead processes left and their export folders
  (engine.recovery.leftovers.sweep_runtime);
- without libvirt (restore to a folder, verify, prune from the CLI): the
  undo logs of backups that committed are catalogued, and those that need
  nothing of libvirt replayed; one naming a libvirt job or checkpoint is
  left for the domain's next backup, which can take those back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.engine.locks import domain_lock
from virtbackupd.engine.recovery.leftovers import clean_leftovers, settle, sweep_runtime


@dataclass(frozen=True)
class DomainJob:
    """What a job on one domain holds while it runs."""

    uuid: str
    name: str
    repo: Repository
    ref: DomainRef | None  # with libvirt only
    cleaned: tuple[str, ...]  # backups of dead processes cleaned on entry


# PLR0913: which domain and job, then keyword-only options with defaults
@contextlib.asynccontextmanager
async def domain_job(  # noqa: PLR0913 (see above)
    config: DaemonConfig,
    store: Store,
    repo: Repository,
    uuid: str,
    name: str,
    what: str,
    *,
    libvirt: Libvirt | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> AsyncIterator[DomainJob]:
    with domain_lock(config.runtime_dir, uuid, name, what):
        await sweep_runtime(config.runtime_dir)
        if libvirt is not None:
            ref = await libvirt.domain(uuid)
            cleaned = await clean_leftovers(libvirt, store, ref, config, repo, now())
            yield DomainJob(uuid, name, repo, ref, tuple(cleaned))
        else:
            cleaned = await settle(store, repo, uuid, now(), libvirt_free_only=True)
            yield DomainJob(uuid, name, repo, None, tuple(cleaned))
