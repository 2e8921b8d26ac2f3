"""Shard selection, the batch engines' environments and the concurrency share (pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from batch.errors import ManifestError, ShardError
from batch.shard import Shard, from_environment, parse_flag, select, shard_of
from batch.status import tally

IDS = [f"{random.Random(i).getrandbits(80):020x}" for i in range(2000)]


def test_every_item_belongs_to_exactly_one_shard_whatever_the_order() -> None:
    shards = [Shard(i, 5) for i in range(5)]
    owners = Counter(sum(s.owns(item) for s in shards) for item in IDS)
    assert owners == {1: len(IDS)}
    shuffled = IDS[::-1]
    for shard in shards:
        assert [i for i in IDS if shard.owns(i)] == [
            i for i in IDS if shard_of(i, 5) == shard.index
        ]
        assert {i for i in shuffled if shard.owns(i)} == {i for i in IDS if shard.owns(i)}


def test_slices_are_even_and_an_items_shard_ignores_the_others() -> None:
    sizes = Counter(shard_of(i, 4) for i in IDS)
    assert set(sizes) == {0, 1, 2, 3}
    assert all(400 <= n <= 600 for n in sizes.values()), sizes  # 500 expected each
    # The shard depends on the id and N only: adding items moves none of the old ones.
    more = IDS + [f"{n:020x}" for n in range(500)]
    assert [shard_of(i, 4) for i in more[: len(IDS)]] == [shard_of(i, 4) for i in IDS]
    assert shard_of("abc", 1) == 0


def test_select_keeps_order_and_takes_all_when_not_sharded() -> None:
    class Item:
        def __init__(self, item_id: str) -> None:
            self.item_id = item_id

    items = [Item(i) for i in IDS[:50]]
    assert select(items, None) == items
    mine = select(items, Shard(1, 3))
    assert mine == [i for i in items if shard_of(i.item_id, 3) == 1]


@pytest.mark.parametrize(("total", "count"), [(4, 4), (5, 3), (16, 3), (7, 2), (100, 7)])
def test_concurrency_shares_add_up_to_the_total(total: int, count: int) -> None:
    shares = [Shard(i, count).concurrency(total) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the first total % N shards get one more


def test_concurrency_below_the_shard_count_is_refused() -> None:
    with pytest.raises(ShardError, match=r"run.concurrency: 2 is below the shard count 3"):
        Shard(0, 3).concurrency(2)


def test_flag_parsing_and_bad_flags() -> None:
    assert parse_flag("2/4") == Shard(2, 4)
    assert Shard(2, 4).label == "2/4"
    for bad in ("2", "a/4", "1/", "-1/4", "1/4/2"):
        with pytest.raises(ShardError, match=r"--shard: .*form I/N"):
            parse_flag(bad)
    with pytest.raises(ShardError, match=r"--shard: shard index 4 is not in 0..3 \(indexes are 0"):
        parse_flag("4/4")
    with pytest.raises(ShardError, match="count 0"):
        parse_flag("0/0")
    assert issubclass(ShardError, ManifestError)  # the CLI's exit 2


@pytest.mark.parametrize(
    ("env", "flag", "shards", "expected"),
    [
        ({}, None, None, None),
        ({}, "1/3", None, Shard(1, 3)),
        ({"PULSE_BATCH_SHARDS": "3"}, "1/3", None, Shard(1, 3)),
        ({"JOB_COMPLETION_INDEX": "2"}, None, 4, Shard(2, 4)),
        ({"JOB_COMPLETION_INDEX": "0", "PULSE_BATCH_SHARDS": "2"}, None, None, Shard(0, 2)),
        (
            {"AWS_BATCH_JOB_ARRAY_INDEX": "5", "AWS_BATCH_JOB_ARRAY_SIZE": "8"},
            None,
            None,
            Shard(5, 8),
        ),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, None, None, Shard(3, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "21",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_STEP": "10",
            },
            None,
            None,
            Shard(2, 3),
        ),
        # The flag wins over the environment of the engine it runs under.
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, "0/2", None, Shard(0, 2)),
    ],
)
def test_shard_from_flag_or_environment(
    env: dict[str, str], flag: str | None, shards: int | None, expected: Shard | None
) -> None:
    found = from_environment(env, flag, shards)
    if expected is None:
        assert found is None
    else:
        assert found is not None and (found.index, found.count) == (expected.index, expected.count)


@pytest.mark.parametrize(
    ("env", "flag", "shards", "message"),
    [
        ({"JOB_COMPLETION_INDEX": "1"}, None, None, "JOB_COMPLETION_INDEX: is set .* --shards N"),
        ({"JOB_COMPLETION_INDEX": "4"}, None, 4, r"JOB_COMPLETION_INDEX: shard index 4"),
        ({"JOB_COMPLETION_INDEX": "x"}, None, 4, "JOB_COMPLETION_INDEX: 'x' is not a whole"),
        ({"PULSE_BATCH_SHARDS": "3"}, None, 4, "--shards: 4 disagrees with PULSE_BATCH_SHARDS=3"),
        ({}, "1/3", 4, "--shard: 1/3 disagrees with --shards=4"),
        ({}, None, 4, "--shards: gives a shard count .* but no shard index"),
        ({"PULSE_BATCH_SHARDS": "2"}, None, None, "PULSE_BATCH_SHARDS: gives a shard count"),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, None, None, "AWS_BATCH_JOB_ARRAY_INDEX: is set but"),
        ({"AWS_BATCH_JOB_ARRAY_SIZE": "3"}, None, None, "AWS_BATCH_JOB_ARRAY_SIZE: is set but"),
        (
            {"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "3"},
            None,
            2,
            "AWS_BATCH_JOB_ARRAY_SIZE: 3 disagrees with --shards=2",
        ),
        (
            {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3"},
            None,
            None,
            "SLURM_ARRAY_TASK_ID: 7 is not one of 3 .* --array=0-2",
        ),
    ],
)
def test_inconsistent_values_name_the_variable(
    env: dict[str, str], flag: str | None, shards: int | None, message: str
) -> None:
    with pytest.raises(ShardError, match=message):
        from_environment(env, flag, shards)


def test_status_tally_counts_planned_items_by_latest_result() -> None:
    latest = {"a": "ok", "b": "failed", "z": "ok"}  # z: not in this manifest any more
    counted = tally(["a", "b", "c"], latest)
    assert counted.as_dict() == {"planned": 3, "ok": 1, "failed": 1, "not_run": 1}
    assert not counted.complete
    assert tally(["a", "z"], latest).complete
