"""Real media of every common format, decoded by PyAV and run through the runner."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batch.decode import DecodedAudio, WireFormat, probe
from tests.conftest import TIME_UNIT_S, run_cli, write_manifest
from tests.media import (
    FORMATS,
    LOSSY,
    Burst,
    onsets_s,
    tone_track,
    write_format,
    write_video,
    write_wav_channels,
)
from tests.tables import sql

BURSTS = [Burst(1.0, 0.4, 440), Burst(3.1, 0.3, 880)]
VIDEO = {"mp4_video": "mp4", "mkv_video": "matroska", "mov_video": "mov"}


def _make(kind: str, folder: Path) -> Path:
    if kind in VIDEO:
        path = folder / f"{kind}.{kind.split('_')[0]}"
        return write_video(path, tone_track(BURSTS, 5.0, 44100), 44100, VIDEO[kind])
    rate = 8000 if kind in ("wav_mulaw", "wav_alaw") else 44100
    path = folder / f"{kind}.{FORMATS[kind][3]}"
    return write_format(path, kind, [tone_track(BURSTS, 5.0, rate)], rate)


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each kind of test media, made once per session on first use. Tests only read these;
    one that changes a file changes a copy (`_copied`)."""
    folder = tmp_path_factory.mktemp("media-kinds")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = _make(kind, folder)
        return cache[kind]

    return get


def _copied(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, folder))


def _tolerance_s(kind: str) -> float:
    return 0.07 if kind in LOSSY else 0.02


@pytest.mark.parametrize("kind", [*FORMATS, *VIDEO])
def test_decoded_audio_lines_up_with_playback(kind: str, made: Callable[[str], Path]) -> None:
    path = made(kind)
    audio = DecodedAudio(path, WireFormat("linear16", 16000))
    pcm = b"".join(audio)
    assert abs(audio.duration_s - 5.0) < 0.05
    found = onsets_s(pcm, 16000)
    assert len(found) == 2
    for burst, onset in zip(BURSTS, found, strict=True):
        assert abs(onset - burst.start_s) <= _tolerance_s(kind), (kind, found)


@pytest.mark.parametrize("encoding", ["linear16", "linear32", "mulaw", "alaw"])
def test_wire_encodings_have_the_declared_size(encoding: str, made: Callable[[str], Path]) -> None:
    path = made("flac_24")
    wire = WireFormat(encoding, 8000, chunk_bytes=4000)
    chunks = list(DecodedAudio(path, wire))
    assert all(len(c) == 4000 for c in chunks[:-1])
    assert sum(map(len, chunks)) == 5 * wire.bytes_per_second


def test_chunk_size_by_milliseconds() -> None:
    wire = WireFormat.with_chunk_ms("linear16", 16000, 100)
    assert wire.chunk_bytes == 3200


def test_runner_word_times_match_bursts_in_every_format(
    tmp_path: Path, made: Callable[[str], Path]
) -> None:
    kinds = [*FORMATS, *VIDEO]
    paths = {kind: _copied(made(kind), tmp_path / "media") for kind in kinds}
    manifest = write_manifest(tmp_path, run={"concurrency": 4, "pace": 0})
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    rows = sql(
        tmp_path / "out",
        "select t.source, w.word, w.start_s from "
        "{words} w join "
        "{transcripts} t "
        "using (item_id) order by t.source, w.idx",
    )
    by_kind = {kind: [(w, s) for src, w, s in rows if src == str(p)] for kind, p in paths.items()}
    for kind, words in by_kind.items():
        assert [w for w, _ in words] == ["tone440", "tone880"], (kind, words)
        for (_, start), burst in zip(words, BURSTS, strict=True):
            # the synthetic engine's own edge detection adds up to ~10 ms
            assert abs(start - burst.start_s) <= _tolerance_s(kind) + 0.01, (kind, start)


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [("linear16", 8000), ("linear32", 22050), ("mulaw", 8000), ("alaw", 16000),
     ("opus", 16000), ("opus", 48000), ("ogg_opus", 16000), ("ogg_opus", 24000)],
)  # fmt: skip
def test_every_wire_encoding_reaches_the_server_intact(
    encoding: str, rate: int, tmp_path: Path, made: Callable[[str], Path]
) -> None:
    _copied(made("flac_24"), tmp_path / "media")
    manifest = write_manifest(
        tmp_path, pulse={"encoding": encoding, "sample_rate": rate}, run={"pace": 0}
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    rows = sql(tmp_path / "out", "select word, start_s from {words} order by idx")
    assert [w for w, _ in rows] == ["tone440", "tone880"]
    tolerance = 0.03 if encoding in ("opus", "ogg_opus") else 0.015
    for (_, start), burst in zip(rows, BURSTS, strict=True):
        assert abs(start - burst.start_s) <= tolerance, (encoding, rate, rows)


def test_split_channels_put_each_voice_on_its_channel(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    agent = tone_track([Burst(0.5, 0.3, 440), Burst(2.0, 0.3, 440)], 3.0, 16000)
    customer = tone_track([Burst(1.2, 0.3, 880)], 3.0, 16000)
    write_format(media / "call.wav", "wav_s16", [agent, customer], 16000)
    write_format(media / "mono.wav", "wav_s16", [customer], 16000)
    manifest = write_manifest(
        tmp_path, run={"channels": "split", "channel_names": ["agent", "customer"], "pace": 0}
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    rows = sql(
        tmp_path / "out",
        "select source, channel, channel_name, transcript from "
        "{transcripts} "
        "order by source, channel",
    )
    assert [(Path(s).name, c, n, t) for s, c, n, t in rows] == [
        ("call.wav", 0, "agent", "tone440 tone440"),
        ("call.wav", 1, "customer", "tone880"),
        ("mono.wav", 0, None, "tone880"),  # a list names stereo channels, not mono
    ]
    channels = sql(tmp_path / "out", "select distinct channel, word from {words} order by 1")
    assert (0, "tone440") in channels and (1, "tone880") in channels


def test_files_with_many_channels_are_picked_split_and_mixed(tmp_path: Path) -> None:
    # PyAV crashed the process on a planar frame of 8+ channels, and FFmpeg cannot mix
    # 17-23 or 25+ channels without a standard layout.
    media = tmp_path / "media"
    media.mkdir()
    quiet = np.zeros(16000 * 2, dtype=np.float32)
    eight = [quiet] * 8
    eight[2] = tone_track([Burst(1.2, 0.3, 880)], 2.0, 16000)
    eight[7] = tone_track([Burst(0.5, 0.3, 440)], 2.0, 16000)
    write_wav_channels(media / "eight.wav", eight, 16000)
    everywhere = tone_track([Burst(0.5, 0.3, 660)], 2.0, 16000)
    write_wav_channels(media / "twenty.wav", [everywhere] * 20, 16000)
    manifest = write_manifest(
        tmp_path,
        inputs=[
            {"path": "media/eight.wav", "channels": "split"},
            {"path": "media/eight.wav", "channels": 7, "language": "es"},
            {"path": "media/twenty.wav"},
        ],
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    rows = sql(
        tmp_path / "out",
        "select source, language, channel, transcript from "
        "{transcripts} "
        "where transcript <> '' order by source, language, channel",
    )
    assert [(Path(s).name, lang, c, t) for s, lang, c, t in rows] == [
        ("eight.wav", "en", 2, "tone880"),
        ("eight.wav", "en", 7, "tone440"),
        ("eight.wav", "es", 7, "tone440"),
        ("twenty.wav", "en", None, "tone660"),
    ]
    items = sql(tmp_path / "out", "select count(*) from {transcripts} where status = 'ok'")
    assert items == [(8 + 1 + 1,)]


def _corrupt_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    rng = random.Random(1)
    for i in range(len(data) // 2, len(data) // 2 + len(data) // 8):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _bad_inputs(folder: Path) -> list[tuple[str, Path]]:
    """(the error_kind each should fail with, the file)."""
    folder.mkdir()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("meeting notes, not audio\n" * 40)
    silent_video = write_video(folder / "video-only.mp4", None, 44100, "mp4")
    long_tone = [tone_track([Burst(1, 0.4, 440)], 20.0, 44100)]
    return [
        ("empty", folder / "empty.wav"),
        ("not_media", folder / "notes.wav"),
        ("no_audio", silent_video),
        (
            "decode_error",
            _corrupt_middle(write_format(folder / "broken.mp3", "mp3", long_tone, 44100)),
        ),
        ("decode_error", _truncated(write_format(folder / "half.mp3", "mp3", long_tone, 44100))),
        (
            "decode_error",
            _truncated(write_format(folder / "half.wav", "wav_s16", long_tone, 44100)),
        ),
    ]


def test_each_bad_input_fails_alone_with_its_kind(tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path / "media")
    good = write_format(
        tmp_path / "media" / "good.wav", "wav_s16", [tone_track(BURSTS, 5.0, 16000)], 16000
    )
    manifest = write_manifest(
        tmp_path, inputs=[{"glob": "media/*"}, {"path": "media/absent.wav"}], run={"pace": 0}
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 1
    rows = sql(tmp_path / "out", "select source, status, error_kind, error from {transcripts}")
    kinds = {Path(src).name: (status, kind, error) for src, status, kind, error in rows}
    assert kinds[good.name][:2] == ("ok", None)
    assert kinds["absent.wav"][1] == "not_found"
    for kind, path in bad:
        status, found, message = kinds[path.name]
        assert (status, found) == ("failed", kind), (path.name, found, message)
        assert path.name in message
    assert "corrupt audio after" in kinds["broken.mp3"][2]
    assert "looks truncated" in kinds["half.mp3"][2]


def test_wav_recorded_as_a_stream_is_not_called_truncated(
    tmp_path: Path, made: Callable[[str], Path]
) -> None:
    """Recorders that write WAV as a stream leave 0xFFFFFFFF as the data size."""
    path = _copied(made("wav_s16"), tmp_path)
    data = bytearray(path.read_bytes())
    data_at = data.index(b"data")
    data[data_at + 4 : data_at + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    audio = DecodedAudio(path, WireFormat("linear16", 16000))
    assert sum(map(len, audio)) == 5 * 32000


def _as_a_user_the_mode_binds() -> list[str]:
    """A command prefix under which a file's mode binds. Root reads any file (its
    DAC-override capabilities), so as root the child runs without them (setpriv,
    util-linux); anyone else is bound already."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test this as root"
    dropped = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", dropped, "--inh-caps", dropped]


def test_unreadable_file_is_a_permission_error(tmp_path: Path, made: Callable[[str], Path]) -> None:
    """A child process, as root or not: what `probe` says of a file it may not read."""
    path = _copied(made("wav_s16"), tmp_path)
    path.chmod(0)
    command = [*_as_a_user_the_mode_binds(), sys.executable, "-m", "batch", "probe", "--json"]
    done = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, timeout=60 * TIME_UNIT_S
    )
    assert done.returncode == 1, done.stderr
    [row] = json.loads(done.stdout)
    assert row["error_kind"] == "permission" and str(path) in row["error"], row


def test_probe_describes_streams(made: Callable[[str], Path]) -> None:
    info = probe(made("mp4_video"))
    assert (info.codec, info.channels, info.video_streams, info.audio_streams) == ("aac", 1, 1, 1)
    assert info.duration_s is not None and abs(info.duration_s - 5.0) < 0.1
    done = run_cli("probe", str(made("mp4_video")), "--json")
    assert done.returncode == 0 and '"codec": "aac"' in done.stdout
