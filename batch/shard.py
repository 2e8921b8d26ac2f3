"""Shards: one job split across processes (Kubernetes Indexed Jobs, AWS Batch and Slurm
arrays, CI matrices), each taking a fixed slice of the job's items.

Pure: which shard an item belongs to, which shard this process is (from a ``--shard I/N``
flag or the batch engine's environment), and each shard's share of ``run.concurrency``.

An item belongs to shard ``floor(h * N / 2**64)``, where ``h`` is the first 8 bytes of
``sha256(item_id)``: the hash space is cut into N equal slices, so an item's shard depends
only on its id and N, never on the listing order or on which other items exist. A rerun of
shard I therefore redoes only shard I's items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from batch.errors import ShardError

MAX_SHARDS: Final = 10_000
SHARDS_ENV: Final = "PULSE_BATCH_SHARDS"
_HASH_BITS: Final = 64

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``; where the numbers came from, for messages."""

    index: int
    count: int
    origin: str = "--shard"

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ShardError(self.origin, f"shard count {self.count} is not in 1..{MAX_SHARDS}")
        if not 0 <= self.index < self.count:
            raise ShardError(
                self.origin,
                f"shard index {self.index} is not in 0..{self.count - 1} "
                f"(indexes are 0-based: shard I of N takes I = 0 .. N-1)",
            )

    @property
    def label(self) -> str:
        """``I/N``, as the flag takes it and the summary line prints it."""
        return f"{self.index}/{self.count}"

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    def concurrency(self, total: int) -> int:
        """This shard's share of the job's ``run.concurrency``: ``total // N``, plus one for
        the first ``total % N`` shards, so the shares add up to exactly ``total``."""
        if total < self.count:
            raise ShardError(
                "run.concurrency",
                f"{total} is below the shard count {self.count}: each shard needs at least one "
                f"session; raise run.concurrency to {self.count} or more, or run fewer shards",
            )
        return total // self.count + (1 if self.index < total % self.count else 0)


def shard_of(item_id: str, count: int) -> int:
    """The shard (0-based) of ``count`` that owns ``item_id``. Stable across runs and hosts."""
    digest = hashlib.sha256(item_id.encode()).digest()
    position = int.from_bytes(digest[: _HASH_BITS // 8], "big")
    return (position * count) >> _HASH_BITS


def select(items: Iterable[T], shard: Shard | None, key: str = "item_id") -> list[T]:
    """The items ``shard`` owns, in their order; all of them when not sharded."""
    if shard is None:
        return list(items)
    return [item for item in items if shard.owns(str(getattr(item, key)))]


def parse_flag(text: str) -> Shard:
    """``"I/N"`` from ``--shard``: raises `ShardError` saying what the form is."""
    index_text, sep, count_text = text.partition("/")
    if not sep or not index_text.strip().isdigit() or not count_text.strip().isdigit():
        raise ShardError("--shard", f"{text!r} is not of the form I/N, e.g. 0/4 (0-based index)")
    return Shard(int(index_text), int(count_text), "--shard")


def _number(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    if not raw.strip().isdigit():
        raise ShardError(name, f"{raw!r} is not a whole number 0 or more")
    return int(raw)


# (index variable, count variable) the batch engines set for each task of an array.
_ENGINES: Final = (
    ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
)
_K8S_INDEX: Final = "JOB_COMPLETION_INDEX"


def from_environment(
    env: Mapping[str, str], flag: str | None = None, shards: int | None = None
) -> Shard | None:
    """Which shard this process is, or None for the whole job.

    ``flag`` (``--shard I/N``) wins over the environment. Otherwise, in order:
    ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job) with the count from ``shards``
    (``--shards N``) or ``PULSE_BATCH_SHARDS``; ``AWS_BATCH_JOB_ARRAY_INDEX`` +
    ``AWS_BATCH_JOB_ARRAY_SIZE``; ``SLURM_ARRAY_TASK_ID`` + ``SLURM_ARRAY_TASK_COUNT``.
    ``shards`` (or ``PULSE_BATCH_SHARDS``), when given, must agree with any count the
    environment sets. Raises `ShardError` for anything inconsistent.
    """
    count_env = _number(env, SHARDS_ENV)
    if shards is not None and count_env is not None and shards != count_env:
        raise ShardError("--shards", f"{shards} disagrees with {SHARDS_ENV}={count_env}")
    count = shards if shards is not None else count_env
    count_from = "--shards" if shards is not None else SHARDS_ENV
    if flag is not None:
        shard = parse_flag(flag)
        if count is not None and count != shard.count:
            raise ShardError("--shard", f"{flag} disagrees with {count_from}={count}")
        return shard
    k8s_index = _number(env, _K8S_INDEX)
    if k8s_index is not None:
        if count is None:
            raise ShardError(
                _K8S_INDEX,
                f"is set ({k8s_index}) but the shard count is not: pass --shards N or set "
                f"{SHARDS_ENV} to the Indexed Job's completions",
            )
        return Shard(k8s_index, count, _K8S_INDEX)
    for index_name, count_name in _ENGINES:
        index, size = _number(env, index_name), _number(env, count_name)
        if index is None and size is None:
            continue
        if index is None or size is None:
            present, missing = (
                (index_name, count_name) if index is not None else (count_name, index_name)
            )
            raise ShardError(present, f"is set but {missing} is not; both are needed")
        if count is not None and count != size:
            raise ShardError(count_name, f"{size} disagrees with {count_from}={count}")
        if index_name == "SLURM_ARRAY_TASK_ID":
            index = _slurm_position(env, index, size)
        return Shard(index, size, index_name)
    if count is not None:
        raise ShardError(
            count_from,
            f"gives a shard count ({count}) but no shard index: pass --shard I/N, or run under "
            f"a batch engine that sets {_K8S_INDEX}, AWS_BATCH_JOB_ARRAY_INDEX or "
            "SLURM_ARRAY_TASK_ID",
        )
    return None


def _slurm_position(env: Mapping[str, str], task_id: int, count: int) -> int:
    """Slurm numbers tasks as the --array range says (``--array=1-8`` or ``0-30:10``): the
    shard index is the task's position in that range."""
    first = _number(env, "SLURM_ARRAY_TASK_MIN") or 0
    step = _number(env, "SLURM_ARRAY_TASK_STEP") or 1
    offset = task_id - first
    if offset < 0 or offset % step or offset // step >= count:
        raise ShardError(
            "SLURM_ARRAY_TASK_ID",
            f"{task_id} is not one of {count} evenly spaced tasks from {first} in steps of "
            f"{step}; submit the array as --array=0-{count - 1}",
        )
    return offset // step
