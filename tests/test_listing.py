"""Planning never hangs and reads lists as written: symlink loops, odd paths, encodings,
CSV dialects, items equal in effect kept once, ``source`` as listed."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest

from batch.errors import ManifestError
from batch.job import RunOptions, run_job
from batch.manifest import LoadedManifest, load_manifest, parse_manifest
from batch.model import item_id
from batch.plan import expand_sources, make_items
from batch.score import read_reference
from tests.conftest import TIME_UNIT_S, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import parquet


def _loaded(tmp_path: Path, inputs: list[dict[str, Any]], **run: Any) -> LoadedManifest:
    data = {"version": 1, "job": "p", "inputs": inputs, "run": run}
    manifest = parse_manifest(data, tmp_path / "m.yaml")
    return LoadedManifest(manifest=manifest, path=tmp_path / "m.yaml", base_dir=tmp_path)


def _audio(path: Path, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    track = tone_track([Burst(0.1, 0.1, 440)], 0.4, 8000)
    return write_audio(path, [track] * channels, 8000)


def _plan(loaded: LoadedManifest) -> list[Any]:
    return make_items(expand_sources(loaded), loaded)


def test_glob_over_symlink_loops_ends_with_each_real_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = tmp_path / "rec"
    _audio(rec / "a.wav")
    _audio(rec / "sub" / "b.wav")
    (rec / "sub" / "back").symlink_to(rec)  # loop: sub/back -> rec
    (rec / "self").symlink_to(".")  # loop: self -> rec
    (rec / "again").symlink_to(rec / "sub")  # a second way into sub
    (rec / "dead").symlink_to(rec / "dead")  # a link to itself
    caplog.set_level(logging.INFO)
    loaded = _loaded(tmp_path, [{"glob": "rec/**/*.wav"}])
    with ThreadPoolExecutor(1) as pool:  # bounded: the old walk never finished
        items = pool.submit(_plan, loaded).result(timeout=30 * TIME_UNIT_S)
    assert sorted(Path(i.source).relative_to(rec).as_posix() for i in items) == [
        "a.wav",
        "sub/b.wav",
    ]
    assert all(i.error is None for i in items)
    assert "already walked (a symlink loop" in caplog.text


def test_bad_listed_paths_become_failed_rows(tmp_path: Path) -> None:
    _audio(tmp_path / "media" / "good.wav")
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop2.wav")
    (tmp_path / "loop2.wav").symlink_to(tmp_path / "loop.wav")
    rows = [
        {"path": "media/good.wav"},
        {"path": "loop.wav"},
        {"path": "bad\u0000name.wav"},
        {"path": "x" * 300 + ".wav"},
        {"path": "missing.wav"},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = write_manifest(tmp_path, inputs=[{"list": "list.jsonl"}])
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1 and result.report["items"]["failed"] == 4
    t = parquet(tmp_path / "out", "transcripts")
    kinds = duckdb.sql(f"select error_kind, source from {t} order by source").fetchall()
    by_kind = sorted(kind or "ok" for kind, _ in kinds)
    assert by_kind == ["bad_path", "bad_path", "not_found", "ok", "symlink_loop"]
    assert any("\\x00" in source for kind, source in kinds if kind == "bad_path")
    assert all(source.startswith(str(tmp_path)) for _, source in kinds)  # absolute, as listed


def test_a_dangling_symlink_a_glob_matches_is_a_failed_row_naming_it(tmp_path: Path) -> None:
    media = tmp_path / "media"
    _audio(media / "good.wav")
    (media / "gone.wav").symlink_to(tmp_path / "archive" / "moved.wav")  # target missing
    (media / "loop.wav").symlink_to(media / "loop.wav")
    manifest = write_manifest(tmp_path, inputs=[{"glob": "media/*.wav"}])
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1 and result.report["items"]["failed"] == 2
    t = parquet(tmp_path / "out", "transcripts")
    rows = duckdb.sql(f"select source, status, error_kind, error from {t} order by source")
    by_name = {
        Path(source).name: (status, kind, error) for source, status, kind, error in rows.fetchall()
    }
    assert by_name["good.wav"][0] == "ok"
    status, kind, error = by_name["gone.wav"]
    assert (status, kind) == ("failed", "not_found")
    assert error.startswith(str(media / "gone.wav"))  # the link's own path, as matched
    assert f"symlink to {tmp_path / 'archive' / 'moved.wav'}, which does not exist" in error
    assert by_name["loop.wav"][:2] == ("failed", "symlink_loop")
    # A listed path to the same link says the same.
    listed = _plan(_loaded(tmp_path, [{"path": "media/gone.wav"}]))
    assert listed[0].error is not None and "which does not exist" in str(listed[0].error)


def test_source_is_the_path_as_listed_and_ids_follow_the_real_file(tmp_path: Path) -> None:
    real = _audio(tmp_path / "archive" / "call.wav")
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "call.wav").symlink_to(real)
    via_link = _plan(_loaded(tmp_path, [{"path": "inbox/call.wav"}]))
    direct = _plan(_loaded(tmp_path, [{"path": "archive/call.wav"}]))
    assert via_link[0].source == str(tmp_path / "inbox" / "call.wav")  # not the target
    assert via_link[0].item_id == direct[0].item_id  # the id of the real file, as before
    both = _plan(_loaded(tmp_path, [{"path": "inbox/call.wav"}, {"path": "archive/call.wav"}]))
    assert len(both) == 1


def test_items_equal_in_effect_are_one_item(tmp_path: Path) -> None:
    _audio(tmp_path / "m.wav")
    _audio(tmp_path / "s.wav", channels=2)
    (tmp_path / "l.csv").write_text("path,language,channels\nm.wav,,\nm.wav,en,mix\ns.wav,,1\n")
    inputs = [
        {"path": "m.wav"},
        {"path": "m.wav", "language": "en"},
        {"path": "m.wav", "channels": "mix"},
        {"list": "l.csv"},
        {"path": "s.wav", "channels": "split"},
        {"path": "s.wav", "channels": 1},
        {"path": "s.wav", "channels": 0},
    ]
    items = _plan(_loaded(tmp_path, inputs))
    named = sorted((Path(i.source).name, i.channel) for i in items)
    assert named == [("m.wav", None), ("s.wav", 0), ("s.wav", 1)]
    assert len({i.item_id for i in items}) == 3


def test_mono_under_split_is_named_only_when_the_names_say_so(tmp_path: Path) -> None:
    _audio(tmp_path / "mono.wav")
    _audio(tmp_path / "stereo.wav", channels=2)
    inputs = [{"glob": "*.wav"}]
    listed = _plan(_loaded(tmp_path, inputs, channels="split", channel_names=["agent", "customer"]))
    assert sorted((Path(i.source).stem, i.channel, i.channel_name) for i in listed) == [
        ("mono", 0, None),
        ("stereo", 0, "agent"),
        ("stereo", 1, "customer"),
    ]
    names = {0: "agent", 1: "customer", "mono": "caller"}
    mapped = _plan(_loaded(tmp_path, inputs, channels="split", channel_names=names))
    assert sorted((Path(i.source).stem, i.channel_name) for i in mapped) == [
        ("mono", "caller"),
        ("stereo", "agent"),
        ("stereo", "customer"),
    ]


def test_excel_csv_with_bom_semicolons_and_quotes(tmp_path: Path) -> None:
    _audio(tmp_path / "a.wav")
    _audio(tmp_path / "b c.wav")
    text = 'Path;Language;note\r\na.wav;de;"one; two"\r\n"b c.wav";;"say ""hi"""\r\n'
    (tmp_path / "l.csv").write_bytes(text.encode("utf-8-sig"))
    items = _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    got = sorted((Path(i.source).name, i.options.language, i.metadata["note"]) for i in items)
    assert got == [("a.wav", "de", "one; two"), ("b c.wav", "en", 'say "hi"')]
    assert all(i.error is None for i in items)


def test_csv_cells_padded_with_spaces_still_name_their_files(tmp_path: Path) -> None:
    _audio(tmp_path / "a.wav")
    _audio(tmp_path / "b.wav")
    (tmp_path / "ref.txt").write_text("tone")
    text = "path, language, reference_path, team\na.wav , es , ref.txt , sales\n  b.wav,en,,x\n"
    (tmp_path / "l.csv").write_text(text)
    items = _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    got = sorted((i.source, i.options.language, i.error) for i in items)
    assert got == [(str(tmp_path / "a.wav"), "es", None), (str(tmp_path / "b.wav"), "en", None)]
    referenced = next(i for i in items if i.source.endswith("a.wav"))
    assert referenced.reference is not None
    assert read_reference(referenced.reference) == "tone"


def test_latin1_csv_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _audio(tmp_path / "café.wav")
    (tmp_path / "l.csv").write_bytes("path,agent\ncafé.wav,Müller\n".encode("cp1252"))
    items = _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    assert [(Path(i.source).name, i.metadata) for i in items] == [("café.wav", {"agent": "Müller"})]
    assert items[0].error is None
    assert "l.csv is not UTF-8" in caplog.text and "Windows-1252" in caplog.text


def test_utf16_list_with_bom_is_read(tmp_path: Path) -> None:
    _audio(tmp_path / "a.wav")
    (tmp_path / "l.csv").write_bytes("path\ta\r\na.wav\tx\r\n".encode("utf-16"))
    items = _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    assert [Path(i.source).name for i in items] == ["a.wav"]


def test_jsonl_metadata_values_are_stored_as_json_text(tmp_path: Path) -> None:
    _audio(tmp_path / "a.wav")
    row = {"path": "a.wav", "channels": 0, "tags": ["vip", "é"], "n": 5, "ok": True, "x": None}
    (tmp_path / "l.jsonl").write_text(json.dumps(row) + "\n")
    (item,) = _plan(_loaded(tmp_path, [{"list": "l.jsonl"}]))
    assert item.channel == 0  # a known column keeps its own meaning
    assert item.metadata == {"tags": '["vip", "é"]', "n": "5", "ok": "true", "x": ""}
    assert json.loads(item.metadata["tags"]) == ["vip", "é"]


def test_channel_names_apply_to_an_entry_split_on_its_own(tmp_path: Path) -> None:
    _audio(tmp_path / "stereo.wav", channels=2)
    _audio(tmp_path / "mono.wav")
    inputs = [{"path": "stereo.wav", "channels": "split"}, {"path": "mono.wav"}]
    items = _plan(_loaded(tmp_path, inputs, channel_names=["agent", "customer"]))
    assert sorted((Path(i.source).stem, i.channel, i.channel_name) for i in items) == [
        ("mono", None, None),
        ("stereo", 0, "agent"),
        ("stereo", 1, "customer"),
    ]


def test_glob_leaves_out_the_manifest_and_the_jobs_own_output(tmp_path: Path) -> None:
    _audio(tmp_path / "calls" / "a.wav")
    (tmp_path / "m.yaml").write_text("version: 1\n")
    for own in ("_reports/p/latest.json", "_locks/p.lock", "transcripts/job=p/part-1.parquet"):
        (tmp_path / "out" / own).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / own).write_text("{}")
    (tmp_path / "outside.txt").write_text("not audio")  # not the job's: still listed
    items = _plan(_loaded(tmp_path, [{"glob": "**/*"}]))
    assert sorted(Path(i.source).name for i in items) == ["a.wav", "outside.txt"]
    # A path entry is explicit: it is taken even inside the output folder.
    items = _plan(_loaded(tmp_path, [{"path": "out/_locks/p.lock"}]))
    assert [i.error.kind for i in items if i.error is not None] == ["not_media"]


def test_list_without_a_path_column_names_the_columns_found(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("file;lang\na.wav;en\n")
    with pytest.raises(ManifestError) as caught:
        _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    message = str(caught.value)
    assert "l.csv" in message and "no 'path' column" in message
    assert "['file', 'lang']" in message
    (tmp_path / "l.jsonl").write_text('{"file": "a.wav"}\n')
    with pytest.raises(ManifestError, match=r"line 1: no 'path' key; .*\['file'\]"):
        _plan(_loaded(tmp_path, [{"list": "l.jsonl"}]))


def test_undecodable_list_and_non_utf8_manifest_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_bytes(b"path\n\x81\x8d\x90.wav\n")  # not UTF-8 nor cp1252
    with pytest.raises(
        ManifestError, match=r"l\.csv: list file is not UTF-8 \(byte 0x81 on line 2\)"
    ):
        _plan(_loaded(tmp_path, [{"list": "l.csv"}]))
    manifest = tmp_path / "job.yaml"
    manifest.write_bytes("version: 1\njob: caf\xe9\ninputs: [{glob: '*.wav'}]\n".encode("latin-1"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert "job.yaml" in str(caught.value) and "Windows-1252/Latin-1" in str(caught.value)


def test_empty_glob_or_list_is_an_error_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path\n")
    for entry in ({"glob": "nope/*.wav"}, {"list": "l.csv"}):
        with pytest.raises(ManifestError, match=r"inputs\.0: .*(matched no files|has no rows)"):
            _plan(_loaded(tmp_path, [entry]))
        assert _plan(_loaded(tmp_path, [{**entry, "allow_empty": True}])) == []


def test_list_rows_longer_than_the_header_are_refused(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,a\nx.wav,1,2\n")
    with pytest.raises(ManifestError, match="line 2: 3 fields but the header has 2"):
        _plan(_loaded(tmp_path, [{"list": "l.csv"}]))


def test_ids_hash_the_real_file(tmp_path: Path) -> None:
    real = _audio(tmp_path / "r.wav")
    items = _plan(_loaded(tmp_path, [{"path": "r.wav"}]))
    assert items[0].item_id == item_id(str(real.resolve()), None, items[0].options)
    assert os.path.isabs(items[0].source)
