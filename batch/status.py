"""Is the job done? Every planned item of its manifest against the tables' latest results,
for a workflow's final step after its shards (`pulse-batch status`).

`tally` is pure; `job_status` plans the manifest (probing only items not yet ok) and reads
each item's latest result from the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.errors import ManifestError
from batch.manifest import LoadedManifest, load_manifest
from batch.model import ItemStatus
from batch.output import OutputReader
from batch.shard import shard_of


@dataclass
class Tally:
    """Planned items by their latest result."""

    planned: int = 0
    ok: int = 0
    failed: int = 0
    not_run: int = 0
    forgotten: int = 0  # forgotten on request (`pulse-batch forget`): done, without rows

    @property
    def complete(self) -> bool:
        return self.planned == self.ok + self.forgotten

    def as_dict(self) -> dict[str, int]:
        return {
            "planned": self.planned,
            "ok": self.ok,
            "failed": self.failed,
            "not_run": self.not_run,
            **({"forgotten": self.forgotten} if self.forgotten else {}),
        }


@dataclass
class JobStatus:
    job: str
    manifest: str
    total: Tally
    shards: int | None = None  # the shard count the job last ran with, if sharded
    by_shard: dict[int, Tally] = field(default_factory=dict)
    duplicates: int = 0  # items with more than one row: runs overlapped; never complete
    unfinished: int = 0  # items a killed run committed some tables of (counted not run)
    half_forgotten: int = 0  # forgotten items a stopped `forget` left rows of

    @property
    def complete(self) -> bool:
        return self.total.complete and not self.duplicates and not self.half_forgotten

    def problems(self) -> list[str]:
        """What keeps an output from being trusted as it is, and what to do."""
        found = []
        if self.duplicates:
            found.append(
                f"{self.duplicates} item(s) have more than one row (runs of the job "
                "overlapped); the next `pulse-batch run` keeps the latest result of each"
            )
        if self.unfinished:
            found.append(
                f"{self.unfinished} item(s) have some of their tables only (a run was "
                "killed mid-commit); the next `pulse-batch run` redoes them"
            )
        if self.half_forgotten:
            found.append(
                f"{self.half_forgotten} forgotten item(s) still have rows (a `pulse-batch "
                "forget` was stopped); run it again to remove them"
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "manifest": self.manifest,
            "complete": self.complete,
            **self.total.as_dict(),
            "duplicates": self.duplicates,
            "unfinished": self.unfinished,
            "half_forgotten": self.half_forgotten,
            "shards": self.shards,
            "by_shard": {f"{i}/{self.shards}": t.as_dict() for i, t in self.by_shard.items()},
        }


def tally(
    planned: Iterable[str],
    latest: Mapping[str, str],
    shards: int | None = None,
    forgotten: frozenset[str] = frozenset(),
) -> Tally:
    """Count ``planned`` item ids by ``latest`` (item id -> status) and ``forgotten``; with
    ``shards``, the caller passes one shard's ids."""
    result = Tally()
    for item_id in planned:
        result.planned += 1
        status = latest.get(item_id)
        if item_id in forgotten:
            result.forgotten += 1
        elif status == ItemStatus.OK:
            result.ok += 1
        elif status is None:
            result.not_run += 1
        else:
            result.failed += 1
    return result


def _manifest_of(out_dir: str | Path, job: str, manifest: Path | None) -> LoadedManifest:
    if manifest is None:
        try:
            recorded = OutputReader(out_dir).latest_report(job).get("manifest")
        except FileNotFoundError:
            recorded = None
        if not recorded:
            others = [name for name in OutputReader(out_dir).job_names() if name != job]
            hint = f" (jobs here: {', '.join(others)})" if others else ""
            raise ManifestError(
                out_dir,
                f"no run of job {job!r} recorded its manifest here{hint}; pass --manifest M",
            )
        manifest = Path(recorded)
    loaded = load_manifest(manifest)
    if loaded.manifest.job != job:
        raise ManifestError(
            manifest, f"is the manifest of job {loaded.manifest.job!r}, not {job!r}"
        )
    return loaded


def _last_shard_count(out_dir: str | Path, job: str) -> int | None:
    try:
        label = OutputReader(out_dir).latest_report(job).get("shard")
    except FileNotFoundError:
        return None
    return int(str(label).split("/")[1]) if label else None


def job_status(out_dir: str | Path, job: str, manifest: Path | None = None) -> JobStatus:
    """The job's planned items by latest result, and the items held more than once or
    left unfinished by a killed run. Raises `ManifestError` (no manifest given or recorded,
    wrong job, bad manifest), `OutputError`."""
    from batch.job import plan_items  # the job module imports much; only needed here

    loaded = _manifest_of(out_dir, job, manifest)
    reader = OutputReader(out_dir, loaded.manifest.output.storage_options)
    history = reader.history(job)
    forgotten = frozenset(reader.forgotten(job))
    latest = {i: ItemStatus.OK for i in history.ok} | {i: ItemStatus.FAILED for i in history.failed}
    done = frozenset(i for i, status in latest.items() if status == ItemStatus.OK)
    planned = sorted({item.item_id for item in plan_items(loaded, done | forgotten)})
    result = JobStatus(job, str(loaded.path), tally(planned, latest, forgotten=forgotten))
    result.duplicates = len(history.duplicates)
    result.unfinished = len(history.unfinished - forgotten)
    result.half_forgotten = len((history.ok | history.failed | history.unfinished) & forgotten)
    count = _last_shard_count(out_dir, job)
    if count is not None:
        result.shards = count
        for index in range(count):
            mine = [i for i in planned if shard_of(i, count) == index]
            result.by_shard[index] = tally(mine, latest, forgotten=forgotten)
    return result
