"""The job's lock in a local output, and the check before each commit that it still holds.

::

    _locks/README-DO-NOT-DELETE.txt      says what the files beside it are
    _locks/<job>.lock                    one run per job; its shards hold it shared
    _locks/<job>.shard-<I>-of-<N>.lock   one run per shard
    _locks/<job>.shards.lock             held a moment while a shard takes its lock

The lock files stay after every run (an OS lock needs a file to lock); deleting them, or the
output folder, while a run is going would let a second run start beside it. So a run
remembers which files it locked (device and inode) and `Held.check` compares them before
every commit: a run whose locks were deleted or replaced stops and commits nothing more.
A run's own lock in ``_staging`` (`batch.output.parquet.run_lock`) names the shard it runs,
so a run whose ``_locks`` were deleted is still seen by the next one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from batch.errors import LockedError, OutputError, ShardCountConflict
from batch.output import layout, parquet
from batch.output.layout import Busy, FileId, exclusive, file_id, holder_note, shared, translated
from batch.shard import Shard

LOCKS: Final = "_locks"
README: Final = "README-DO-NOT-DELETE.txt"
_README_TEXT: Final = """\
These files are the locks of the pulse-batch jobs writing into this output.
They stay after every run and look unused, but do not delete them (or this folder) while
any job may be running: a run whose lock files disappear stops, and another run could
start beside it and store items twice. They are a few bytes each; removing them when no
job runs is harmless.
"""


def run_label(shard: Shard | None) -> str:
    """What a run's own lock says it runs: ``whole job`` or ``shard I/N``."""
    return "whole job" if shard is None else f"shard {shard.label}"


@dataclass
class Held:
    """The output folder and lock files a run locked, by identity (device, inode)."""

    root: Path
    root_id: FileId | None
    files: dict[Path, FileId] = field(default_factory=dict)

    def check(self) -> None:
        """Raise `OutputError` if the output folder or a lock file was deleted or replaced
        since it was locked: another run may have started beside this one."""
        if file_id(self.root) != self.root_id:
            raise OutputError(
                self.root,
                "commit to",
                "the output folder was deleted or replaced while this run was writing to it; "
                "stopped, nothing more is committed (run the job again to redo what is missing)",
            )
        for path, held in self.files.items():
            if file_id(path) != held:
                raise OutputError(
                    path,
                    "commit to",
                    f"this run's lock file was deleted or replaced while it ran (another run "
                    f"may have started beside it); stopped, nothing more is committed. The "
                    f"files in {LOCKS}/ must stay (see {README} there)",
                )


@contextlib.contextmanager
def job_lock(root: Path, job: str, shard: Shard | None = None) -> Iterator[Held]:
    """One run per job, or per shard of a job, in one output; an overlapping one is refused.

    A whole-job run holds the job's lock exclusively. A shard holds it shared (so shards
    of the job run side by side, but never beside a whole-job run), its own shard lock
    exclusively (so shard I runs once at a time), and is refused while shards of another
    count hold theirs (`ShardCountConflict`): their slices differ, so both would run some
    items. Raises `LockedError`, `OutputError`."""
    folder = root / LOCKS
    held = Held(root, file_id(root))
    path = folder / f"{job}.lock"
    with contextlib.ExitStack() as stack:
        with translated("lock", folder):
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / README).exists():
                layout.write_atomic(folder / README, _README_TEXT.encode())
        if shard is None:
            try:
                with translated("lock", path):
                    held.files[path] = stack.enter_context(exclusive(path, holder_note()))
            except Busy:
                raise LockedError(
                    f"job {job!r} is already running into {root} "
                    f"({_holder(path, 'shards of the job')}); "
                    "wait for it to finish, or use another output.path"
                ) from None
        else:
            try:
                with translated("lock", path):
                    held.files[path] = stack.enter_context(shared(path))
            except Busy:
                raise LockedError(
                    f"job {job!r} is running unsharded into {root} "
                    f"({_holder(path, 'another process')}); a shard cannot run beside it: "
                    "wait for it to finish"
                ) from None
            shard_path, shard_id = _take_shard(stack, folder, job, shard, root)
            held.files[shard_path] = shard_id
        _refuse_orphaned_runs(root, job, shard)
        yield held


def _take_shard(
    stack: contextlib.ExitStack, folder: Path, job: str, shard: Shard, root: Path
) -> tuple[Path, FileId]:
    """Take shard I-of-N's lock, then look for live shards of another count, both under
    one short lock so that two starting shards of different counts cannot both pass."""
    path = folder / f"{job}.shard-{shard.index}-of-{shard.count}.lock"
    with translated("lock", folder), exclusive(folder / f"{job}.shards.lock", None, wait=True):
        try:
            with translated("lock", path):
                taken = stack.enter_context(exclusive(path, holder_note()))
        except Busy:
            raise LockedError(
                f"shard {shard.label} of job {job!r} is already running into {root} "
                f"({_holder(path, 'another process')}); wait for it to finish"
            ) from None
        others = _other_counts(folder, job, shard.count)
    if others:
        running, count = others[0]
        raise ShardCountConflict(
            f"job {job!r} is running into {root} as {running}, but this is shard "
            f"{shard.label}: shards of different counts would run some items twice. Wait "
            f"for them to finish, or run with --shard I/{count}"
        )
    return path, taken


def _other_counts(folder: Path, job: str, count: int) -> list[tuple[str, int]]:
    """Live shards of ``job`` whose count is not ``count``: ``shard I/N (holder)``, N."""
    pattern = re.compile(re.escape(job) + r"\.shard-(\d+)-of-(\d+)\.lock")
    found = []
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or int(match[2]) == count or not layout.is_locked(path):
            continue
        holder = _holder(path, "another process")
        found.append((f"shard {match[1]}/{match[2]} ({holder})", int(match[2])))
    return found


def _refuse_orphaned_runs(root: Path, job: str, shard: Shard | None) -> None:
    """A live run of the job that this lock did not keep out (its lock files were deleted
    while it ran) is found by its own run lock: refuse to start beside it."""
    for note in parquet.live_run_notes(root, job):
        label = note.rsplit("; ", 1)[-1]
        if shard is not None and label.startswith("shard "):
            index, _, count = label.removeprefix("shard ").partition("/")
            if count != str(shard.count):
                raise ShardCountConflict(
                    f"job {job!r} has a run going into {root} as {label} ({note}); this is "
                    f"shard {shard.label}: wait for it to finish"
                )
            if index != str(shard.index):
                continue  # another shard of the same count: allowed beside us
        raise LockedError(
            f"job {job!r} has a run going into {root} ({note}) although its lock file is "
            f"gone (was {LOCKS}/ deleted?); wait for it to finish"
        )


def _holder(path: Path, default: str) -> str:
    try:
        return path.read_text().strip() or default
    except OSError:
        return default
