"""An item's audio as the wire wants it, and the cache of whole decoded items.

A long item (cut into pieces) or one whose silence is skipped is decoded once, whole, into a
file of wire-ready samples in the run's scratch folder (`AudioCache`); its pieces or speech
spans then stream from that file (`split.CachedSlice`). The decode runs in a worker thread
and is read again, after a backoff, while its store fails for now.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import anyio

from batch.decode import DecodedAudio, WireFormat
from batch.manifest import LoadedManifest, RunConfig
from batch.model import Item
from batch.retry import RetryPolicy, retryable
from batch.speech import FoundSpeech, find_speech
from batch.split import CachedAudio, cache_and_cut

logger = logging.getLogger(__name__)

T = TypeVar("T")


def wire_format(loaded: LoadedManifest) -> WireFormat:
    pulse, run = loaded.manifest.pulse, loaded.manifest.run
    if run.chunk_ms is not None:
        return WireFormat.with_chunk_ms(pulse.encoding, pulse.sample_rate, run.chunk_ms)
    return WireFormat(pulse.encoding, pulse.sample_rate, run.chunk_bytes)


def item_audio(item: Item, wire: WireFormat, run: RunConfig) -> DecodedAudio:
    """The item's audio decoded for the wire (opened only when read)."""
    return DecodedAudio(
        item.open_path or item.source,
        wire,
        channel=item.channel,
        stream_index=run.stream_index,
        storage_options=item.storage_options,
    )


@dataclass(eq=False)  # a part of the run, not a value
class AudioCache:
    """Whole items decoded into ``folder``, one ``<item_id>.pcm`` file each."""

    folder: Path
    run: RunConfig
    wire: WireFormat
    retry: RetryPolicy  # reads of a store that fails for now: the run's, as sessions'
    # The detector is CPU work: one item per core at a time, first come first served,
    # so the items next in line get their speech found first.
    _detectors: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(os.cpu_count() or 1), init=False
    )

    def path(self, item: Item) -> Path:
        return self.folder / f"{item.item_id}.pcm"

    async def cut(
        self,
        item: Item,
        *,
        target_s: float,
        pieces: int,
        on_piece: Callable[[int, int], None],
        again: Callable[[], bool],
    ) -> CachedAudio:
        """Decode ``item`` into its cache file, cutting it into about ``pieces`` pieces of
        about ``target_s``; ``on_piece(start, end)`` (in the event loop) hears each piece's
        samples as soon as it is settled. ``again``: whether a failed pass may run again."""
        return await self._read_whole(
            lambda: cache_and_cut(
                item_audio(item, self.wire, self.run),
                self.path(item),
                target_s=target_s,
                window_s=self.run.split_window_s,
                pieces=pieces,
                on_piece=lambda start, end: anyio.from_thread.run_sync(on_piece, start, end),
            ),
            again=again,
        )

    async def find_speech(self, item: Item) -> FoundSpeech:
        """Decode ``item`` into its cache file, finding its speech as it goes."""
        return await self._read_whole(
            lambda: find_speech(
                item_audio(item, self.wire, self.run),
                self.path(item),
                pad_s=self.run.skip_silence_pad_s,
                gap_s=self.run.skip_silence_gap_s,
            ),
            limiter=self._detectors,
        )

    async def _read_whole(
        self,
        work: Callable[[], T],
        *,
        limiter: anyio.CapacityLimiter | None = None,
        again: Callable[[], bool] = lambda: True,
    ) -> T:
        """Run ``work`` (a decode of a whole item: its speech search or its cut) in a worker
        thread; while the store behind it fails for now (`InputUnavailable`) and ``again``
        allows, run it again after a backoff, up to ``run.max_attempts`` times in all."""
        policy = replace(self.retry, retry_on=lambda error: retryable(error) and again())

        def reading_again(error: BaseException, attempt: int, delay_s: float) -> None:
            logger.info("%s; reading it again in %.1f s", error, delay_s)

        return await policy.acall(
            lambda: anyio.to_thread.run_sync(work, limiter=limiter), on_retry=reading_again
        )
