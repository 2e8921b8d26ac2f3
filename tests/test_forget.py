"""`pulse-batch forget`: items erased from every table and their exports, a tombstone that
keeps later runs from transcribing them again; local Parquet, local Delta and Delta on S3,
read back; a kill mid-forget, then a rerun, converges."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from batch.errors import ExportError
from batch.export import export_job
from batch.forget import choose, forget
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.output import JobOutput, OutputReader
from batch.status import job_status
from tests.conftest import run_cli, start_cli, wait_for, write_manifest
from tests.media import tone_calls
from tests.rows import rows, write
from tests.s3server import S3Bucket
from tests.tables import TABLES, sql
from tests.test_metrics import one, samples

JOB = "test-job"


def _job(
    tmp_path: Path, count: int = 3, output: dict[str, object] | None = None, **sections: object
) -> Path:
    tone_calls(tmp_path / "media", count)
    manifest = write_manifest(
        tmp_path,
        output={"path": "out", **(output or {})},
        pulse={"sentence_timestamps": True},
        **sections,
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == count, result.report
    return manifest


def _held(location: str | Path) -> dict[str, set[str]]:
    """Item ids each table holds for the job, read back."""
    reader = OutputReader(location)
    return {t: set(reader.table(t, JOB, ["item_id"])["item_id"].to_pylist()) for t in TABLES}


def _id_of(location: str | Path, name: str) -> str:
    rows = OutputReader(location).rows("transcripts", JOB)
    return next(str(r["item_id"]) for r in rows if str(r["source"]).endswith(name))


def test_choose_by_prefix_or_condition_is_pure_and_strict() -> None:
    rows = [{"item_id": "abc1", "language": "en"}, {"item_id": "abd2", "language": "de"}]
    ids = ["abc1", "abd2"]
    assert choose(ids, {"ffff"}, ["abc"]) == {"abc1"}
    assert choose(ids, {"ffff"}, ["ff"]) == {"ffff"}  # forgotten before: still named
    with pytest.raises(ExportError, match="2 items"):
        choose(ids, set(), ["ab"])
    with pytest.raises(ExportError, match="no item"):
        choose(ids, set(), ["zz"])
    from batch.export import parse_where

    assert choose(ids, set(), (), parse_where("language=de", ["language"]), rows) == {"abd2"}


def test_forget_in_parquet_erases_rows_and_exports_and_runs_skip_it(tmp_path: Path) -> None:
    manifest = _job(tmp_path)
    out = tmp_path / "out"
    export_job(out, JOB, "srt", out / "_exports" / JOB / "srt")
    gone = _id_of(out, "call-0001.wav")
    before = sql(out, "select count(*) from {words} where item_id <> '" + gone + "'")

    dry = run_cli("forget", str(out), "--job", JOB, "--item", gone[:10], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would forget 1 item(s)" in dry.stdout and "call-0001.srt" in dry.stdout
    assert all(gone in ids for ids in _held(out).values())  # nothing went

    done = run_cli("forget", str(out), "--job", JOB, "--item", gone[:10], "--reason", "T-17")
    assert done.returncode == 0, done.stderr
    for table in TABLES:  # DuckDB over every file: no row of the item anywhere
        assert sql(out, f"select count(*) from {{{table}}} where item_id = '{gone}'") == [(0,)]
    assert sql(out, "select count(*) from {words} where item_id <> '" + gone + "'") == before
    assert sql(out, "select count(*) from {transcripts}") == [(2,)]
    srts = sorted(p.name for p in (out / "_exports" / JOB / "srt").iterdir())
    assert srts == ["call-0000.srt", "call-0002.srt"]
    stone = json.loads((out / "_forgotten" / JOB / f"{gone}.json").read_text())
    assert stone["item_id"] == gone and stone["reason"] == "T-17" and stone["forgotten_at"]
    assert "call-0001" not in json.dumps(stone)  # no source, no content

    plan = anyio.run(run_job, load_manifest(manifest), RunOptions(dry_run=True)).report
    assert plan["items"]["forgotten"] == 1 and plan["items"]["to_stream"] == 0
    assert [p["action"] for p in plan["plan"] if p["item_id"] == gone] == ["skip: forgotten"]
    rerun = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert rerun.report["items"]["skipped_forgotten"] == 1
    assert rerun.report["items"]["ok"] == 0 and rerun.report["job_so_far"]["forgotten"] == 1
    shown = run_cli("report", str(out), "--json")
    assert json.loads(shown.stdout)["job_so_far"]["forgotten"] == 1
    status = job_status(out, JOB, manifest)
    assert status.complete and status.total.forgotten == 1 and status.total.ok == 2
    shown = run_cli("status", str(out), "--job", JOB, "--manifest", str(manifest))
    assert shown.returncode == 0 and "2/3 planned item(s) ok" in shown.stdout
    assert "1 forgotten" in shown.stdout, shown.stdout
    again = run_cli("forget", str(out), "--job", JOB, "--item", gone)  # converged: a no-op
    assert again.returncode == 0 and "nothing to forget" in again.stdout

    forced = anyio.run(run_job, load_manifest(manifest), RunOptions(force=True))
    assert forced.report["items"]["ok"] == 3  # --force brings it back
    assert all(gone in ids for ids in _held(out).values())
    assert not (out / "_forgotten" / JOB / f"{gone}.json").exists()


def test_forgetting_every_item_leaves_every_table_readable(tmp_path: Path) -> None:
    _job(tmp_path, 2)
    out = tmp_path / "out"
    done = forget(out, JOB, where="status=ok", reason="all")
    assert len(done.items) == 2 and done.rows["transcripts"] == 2 and done.rows["words"] > 0
    for table in TABLES:  # a glob over the table finds files: 0 rows, not "No files found"
        assert sql(out, f"select count(*) from {{{table}}}") == [(0,)]
    assert OutputReader(out).forgotten(JOB) == {g.item_id for g in done.items}


def test_a_changed_source_is_a_new_item_and_is_transcribed(tmp_path: Path) -> None:
    manifest = _job(tmp_path, 1, run={"identity": "content"})
    out = tmp_path / "out"
    forget(out, JOB, items=[_id_of(out, "call-0000.wav")])
    rerun = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert rerun.report["items"]["ok"] == 0 and rerun.report["items"]["skipped_forgotten"] == 1
    media = tmp_path / "media"
    (media / "call-0000.wav").write_bytes((media / "call-0000.wav").read_bytes() + b"\0\0")
    rerun = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert rerun.report["items"]["ok"] == 1 and rerun.report["items"]["skipped_forgotten"] == 0


def test_a_rerun_after_forget_counts_the_item_in_its_metrics(tmp_path: Path) -> None:
    # pulse_batch_items by status adds up to the items planned, the forgotten one included.
    manifest = _job(tmp_path, 2)
    out = tmp_path / "out"
    forget(out, JOB, items=[_id_of(out, "call-0000.wav")])
    prom = tmp_path / "m.prom"
    done = run_cli("run", str(manifest), "--metrics-file", str(prom))
    assert done.returncode == 0, done.output
    found = samples(prom.read_text())
    assert one(found, "pulse_batch_items", status="skipped_forgotten") == 1
    assert one(found, "pulse_batch_items", status="skipped_already_ok") == 1
    by_status = [v for (name, _), v in found.items() if name == "pulse_batch_items"]
    assert sum(by_status) == one(found, "pulse_batch_items_planned") == 2


def test_forget_names_a_bad_selection_and_a_missing_output(tmp_path: Path) -> None:
    _job(tmp_path, 1)
    out = tmp_path / "out"
    unknown = run_cli("forget", str(out), "--job", JOB, "--item", "nope")
    assert unknown.returncode == 2 and "no item of the job has an id starting 'nope'" in (
        unknown.stderr
    )
    both = run_cli("forget", str(out), "--job", JOB)
    assert both.returncode == 2 and "--item" in both.stderr
    missing = run_cli("forget", str(tmp_path / "nothing"), "--job", JOB, "--item", "x")
    assert missing.returncode == 2 and "no pulse-batch output here" in missing.stderr


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_forget_in_delta_deletes_from_every_table(
    tmp_path: Path, where: str, s3_bucket: S3Bucket
) -> None:
    location = s3_bucket.url("lake") if where == "bucket" else str(tmp_path / "lake")
    manifest = _job(tmp_path, 2, {"path": location, "format": "delta"})
    gone = _id_of(location, "call-0000.wav")
    done = run_cli(
        "forget",
        location,
        "--job",
        JOB,
        "--where",
        "source!=nothing,status=ok",
        "--exports",
        str(tmp_path / "none"),
        "--dry-run",
    )
    assert done.returncode == 0 and "would forget 2 item(s)" in done.stdout
    exports = tmp_path / "exports"
    export_job(location, JOB, "txt", exports / "txt")
    done = run_cli("forget", location, "--job", JOB, "--item", gone, "--exports", str(exports))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (exports / "txt").iterdir()] == ["call-0001.txt"]
    if where == "bucket":
        (stone,) = s3_bucket.keys("lake/_forgotten/")
        assert stone.endswith(f"/{JOB}/{gone}.json") and b"call-" not in s3_bucket.read(stone)
    held = _held(location)
    assert all(gone not in ids and len(ids) == 1 for ids in held.values()), held
    rerun = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert rerun.report["items"]["skipped_forgotten"] == 1 and rerun.report["items"]["ok"] == 0


def test_sigkill_mid_forget_then_a_rerun_converges(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    """Killed after the other tables' deletes, while transcripts' is being tried (its
    commit refused by the S3 server): the tombstone is written, so no run redoes the item, and a
    rerun of forget removes what is left."""
    location = s3_bucket.url("lake")
    manifest = _job(tmp_path, 2, {"path": location, "format": "delta"})
    gone = _id_of(location, "call-0000.wav")
    log = [k for k in s3_bucket.keys("lake/transcripts/_delta_log/") if k.endswith(".json")]
    version = max(int(Path(k).stem) for k in log) + 1
    # Every PUT of transcripts' next log entry (its commit) is answered 503 until the kill.
    key = f"lake/transcripts/_delta_log/{version:020d}.json"
    fault = s3_bucket.fault(key, method="PUT", status=503, times=10**6)
    process = start_cli("forget", location, "--job", JOB, "--item", gone)
    try:
        assert wait_for(lambda: fault.applied >= 1, 60), "the transcripts commit never came"
    finally:
        process.kill()
        process.wait(timeout=30)
        fault.times = 0  # served again from now on
    assert process.returncode != 0
    held = _held(location)
    assert gone not in held["words"] and gone in held["transcripts"]  # killed mid-way
    assert gone in OutputReader(location).forgotten(JOB)
    halfway = job_status(location, JOB, manifest)
    assert halfway.half_forgotten == 1 and not halfway.complete and halfway.unfinished == 0
    rerun = anyio.run(run_job, load_manifest(manifest), RunOptions())  # redoes nothing
    assert rerun.report["items"]["ok"] == 0 and rerun.report["items"]["skipped_forgotten"] == 1
    again = run_cli("forget", location, "--job", JOB, "--item", gone)
    assert again.returncode == 0, again.stderr
    assert all(gone not in ids for ids in _held(location).values())
    assert all(len(ids) == 1 for ids in _held(location).values())
    assert job_status(location, JOB, manifest).complete


def test_forget_never_runs_beside_a_run_of_the_job(tmp_path: Path) -> None:
    _job(tmp_path, 1)
    out = tmp_path / "out"
    gone = _id_of(out, "call-0000.wav")
    with JobOutput.open(out, JOB, ["job", "date"]):  # what a run of the job holds
        refused = run_cli("forget", str(out), "--job", JOB, "--item", gone)
    assert refused.returncode == 4 and "already running" in refused.stderr, refused.stderr
    assert gone in _held(out)["transcripts"] and not OutputReader(out).forgotten(JOB)


def test_sigkill_while_a_parquet_forget_stages_then_a_rerun_converges(tmp_path: Path) -> None:
    """Killed while the one commit is being staged (rewrites of many files): nothing of
    it is visible, the tombstones are written; the rerun discards the staging and commits."""
    out = tmp_path / "out"
    batches = [
        [rows(f"keep{n:03d}", 3, job=JOB), rows(f"drop{n:03d}", 3, job=JOB)] for n in range(120)
    ]
    write(out, batches, job=JOB)
    dropped = [f"drop{n:03d}" for n in range(120)]
    args = [a for item in dropped for a in ("--item", item)]
    process = start_cli("forget", str(out), "--job", JOB, *args)
    staging = out / "_staging" / JOB
    try:
        assert wait_for(lambda: any(staging.glob("forget-*/*.parquet")), 20), "never staged"
    finally:
        process.kill()
        process.wait(timeout=30)
    assert len(OutputReader(out).forgotten(JOB)) == 120  # written before the commit
    assert not any(staging.glob("forget-*/PLAN.json"))  # killed before the commit point
    # Nothing of the commit is visible yet: every file still holds its rows.
    assert sql(out, "select count(*) from {transcripts} where item_id like 'drop%'") == [(120,)]
    again = run_cli("forget", str(out), "--job", JOB, *args)
    assert again.returncode == 0, again.stderr
    assert not list(staging.glob("forget-*"))  # the killed staging was discarded
    for table in ("transcripts", "words"):
        found = sql(out, f"select count(*), count(distinct item_id) from {{{table}}}")
        assert found == [(120 if table == "transcripts" else 360, 120)], (table, found)
    assert sql(out, "select count(*) from {transcripts} where item_id like 'drop%'") == [(0,)]
