"""Where each streamed sample came from: a piecewise map from a session's audio to the file's.

A session streams a sequence of *spans* of the source (a piece of a long recording is one
span; a recording with its silence skipped is its speech regions) with *gaps* of silence
between them that come from nowhere in the source (a long pause shortened to a short one).
Every time the service reports is a position in that stream; `TimeMap.to_source` turns it
into seconds of the original file. Positions inside a span map exactly (sample arithmetic,
no accumulated rounding); a position inside a gap maps to the gap's nearer edge and is
reported as adjusted. Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """``length`` samples streamed from ``stream_start`` on are the source's from
    ``source_start`` on."""

    stream_start: int
    source_start: int
    length: int

    @property
    def stream_end(self) -> int:
        return self.stream_start + self.length

    @property
    def source_end(self) -> int:
        return self.source_start + self.length


@dataclass(frozen=True)
class TimeMap:
    """Spans in stream order, none overlapping; ``streamed`` is the session's whole length
    in samples (spans and the gaps between them), at ``rate`` samples per second."""

    spans: tuple[Span, ...]
    streamed: int
    rate: int

    @classmethod
    def whole(cls, source_start: int, length: int, rate: int) -> TimeMap:
        """The source's samples ``[source_start, source_start + length)`` streamed as is."""
        return cls((Span(0, source_start, length),), length, rate)

    @classmethod
    def joined(
        cls, regions: Sequence[tuple[int, int]], gap: int, rate: int, align: int = 1
    ) -> TimeMap:
        """Source regions ``[start, end)`` streamed one after another, at least ``gap``
        samples of silence between each two. Regions must be sorted and apart.

        Each gap is lengthened (by less than ``align`` samples) so every span starts at the
        same phase of an ``align``-sample grid in the stream as in the source: a recognizer
        working in fixed frames then sees the very frames it would in the whole file."""
        spans: list[Span] = []
        position = 0
        for start, end in regions:
            if spans:
                position += gap + (start - position - gap) % align
            spans.append(Span(position, start, end - start))
            position += end - start
        return cls(tuple(spans), position, rate)

    @property
    def streamed_s(self) -> float:
        return self.streamed / self.rate

    @property
    def kept(self) -> int:
        """Source samples streamed (the gaps excluded)."""
        return sum(span.length for span in self.spans)

    def segments(self) -> Iterator[tuple[int, int] | int]:
        """What to stream, in order: ``(source_start, length)`` for a span, an int number
        of silent samples for a gap."""
        position = 0
        for span in self.spans:
            if span.stream_start > position:
                yield span.stream_start - position
            yield (span.source_start, span.length)
            position = span.stream_end
        if self.streamed > position:
            yield self.streamed - position

    def to_source(self, stream_s: float) -> tuple[float, bool]:
        """Seconds of the source for ``stream_s`` seconds into the stream, and whether the
        time fell in a gap (then it is the gap's nearer edge). Before the first span or
        after the last one the nearest span's offset carries on (a reported end a little
        past the audio stays where the recognizer put it)."""
        if not self.spans:
            return 0.0, True
        position = stream_s * self.rate
        starts = [span.stream_start for span in self.spans]
        index = max(0, bisect.bisect_right(starts, position) - 1)
        span = self.spans[index]
        if position <= span.stream_end or index == len(self.spans) - 1:
            return (span.source_start + (position - span.stream_start)) / self.rate, False
        following = self.spans[index + 1]
        if position - span.stream_end <= following.stream_start - position:
            return span.source_end / self.rate, True
        return following.source_start / self.rate, True

    def window(self, start: int, end: int) -> TimeMap:
        """The part of this map streamed in ``[start, end)``, as a map of its own that
        starts at 0 (one piece of a long recording with its silence skipped)."""
        spans = []
        for span in self.spans:
            lo, hi = max(start, span.stream_start), min(end, span.stream_end)
            if hi > lo:
                source = span.source_start + (lo - span.stream_start)
                spans.append(Span(lo - start, source, hi - lo))
        return TimeMap(tuple(spans), max(0, end - start), self.rate)
