"""Planning: sorted globs, dedupe, list files with metadata, stable ids, bad paths as items."""

from __future__ import annotations

import json
from pathlib import Path

from batch.manifest import LoadedManifest, parse_manifest
from batch.model import item_id
from batch.plan import expand_sources, longest_first, make_items
from batch.pulse.protocol import PulseOptions
from tests.media import Burst, tone_track, write_audio


def _loaded(tmp_path: Path, inputs: list[dict[str, str]], **pulse: object) -> LoadedManifest:
    manifest = parse_manifest(
        {"version": 1, "job": "p", "inputs": inputs, "pulse": pulse}, tmp_path / "m.yaml"
    )
    return LoadedManifest(manifest=manifest, path=tmp_path / "m.yaml", base_dir=tmp_path)


def _audio(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio(path, [tone_track([Burst(0.1, 0.1, 440)], seconds, 8000)], 8000)


def test_expand_globs_paths_and_lists_without_duplicates(tmp_path: Path) -> None:
    for name in ("b.wav", "a.wav", "sub/c.wav"):
        _audio(tmp_path / "rec" / name, 0.5)
    (tmp_path / "list.csv").write_text(
        "path,language,customer\nrec/a.wav,de,acme\nrec/z.wav,,zed\n"
    )
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "rec/b.wav", "ticket": 7}) + "\n")
    loaded = _loaded(
        tmp_path,
        [
            {"glob": "rec/**/*.wav"},
            {"list": "list.csv"},
            {"list": "list.jsonl"},
            {"path": "rec/a.wav"},
        ],
    )
    sources = expand_sources(loaded)
    named = [(Path(s.path).relative_to(tmp_path).as_posix(), s.language) for s in sources]
    # a.wav in German is different work from a.wav in the default language; the JSONL's
    # b.wav and the explicit a.wav repeat what the glob already asked for.
    assert named == [
        ("rec/a.wav", None),
        ("rec/b.wav", None),
        ("rec/sub/c.wav", None),
        ("rec/a.wav", "de"),
        ("rec/z.wav", None),
    ]
    items = make_items(sources, loaded)
    assert len({i.item_id for i in items}) == 5
    missing = [i for i in items if i.error is not None]
    assert [(Path(i.source).name, i.error.kind) for i in missing if i.error] == [
        ("z.wav", "not_found")
    ]
    assert items[3].metadata == {"customer": "acme"} and items[4].metadata == {"customer": "zed"}


def test_item_ids_are_stable_and_follow_options(tmp_path: Path) -> None:
    base = PulseOptions()
    assert item_id("/a.wav", None, base) == item_id("/a.wav", None, PulseOptions())
    assert item_id("/a.wav", None, base) != item_id("/a.wav", 0, base)
    assert item_id("/a.wav", None, base) != item_id("/a.wav", None, PulseOptions(diarize=True))
    assert item_id("/a.wav", None, base) != item_id("/a.wav", None, PulseOptions(language="de"))


def test_longest_recordings_start_first(tmp_path: Path) -> None:
    for name, seconds in (("short.wav", 0.5), ("long.wav", 3.0), ("mid.wav", 1.5)):
        _audio(tmp_path / name, seconds)
    loaded = _loaded(tmp_path, [{"glob": "*.wav"}])
    ordered = longest_first(make_items(expand_sources(loaded), loaded))
    assert [Path(i.source).name for i in ordered] == ["long.wav", "mid.wav", "short.wav"]
