"""The pure parts of skipping silence and cutting pieces: time maps, stream plans, piece
counts, the spend cap. Data in, data out: no sockets, no files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batch.budget import SpendCap
from batch.collect import collect_finals
from batch.errors import Scope, SpendCapReached, classify
from batch.pulse.protocol import Transcription, Word
from batch.speech import SpeechTrack, speech_regions, stream_plan
from batch.split import FRAME_S, choose_cuts, piece_count, stream_energy
from batch.timemap import Span, TimeMap

RATE = 16000


def test_a_whole_span_is_an_exact_offset() -> None:
    timemap = TimeMap.whole(RATE * 300, RATE * 60, RATE)
    assert timemap.streamed_s == 60.0
    assert timemap.to_source(1.25) == (301.25, False)
    # Past the end the offset carries on: a reported end a little late stays put.
    assert timemap.to_source(60.01) == pytest.approx((360.01, False))


def test_joined_regions_map_exactly_and_gaps_go_to_the_nearest_edge() -> None:
    regions = [(RATE * 2, RATE * 5), (RATE * 20, RATE * 22)]
    timemap = TimeMap.joined(regions, gap=RATE // 2, rate=RATE)
    assert timemap.spans == (Span(0, RATE * 2, RATE * 3), Span(RATE * 7 // 2, RATE * 20, RATE * 2))
    assert timemap.streamed == RATE * 11 // 2
    assert timemap.kept == RATE * 5
    assert timemap.to_source(1.0) == (3.0, False)
    assert timemap.to_source(3.0) == (5.0, False)  # the span's last edge is still exact
    assert timemap.to_source(3.1) == (5.0, True)  # in the gap, nearer its start
    assert timemap.to_source(3.4) == (20.0, True)  # nearer its end
    assert timemap.to_source(3.5) == (20.0, False)
    assert timemap.to_source(4.0) == (20.5, False)
    assert list(timemap.segments()) == [(RATE * 2, RATE * 3), RATE // 2, (RATE * 20, RATE * 2)]


def test_a_window_of_a_map_is_a_map_from_zero() -> None:
    timemap = TimeMap.joined([(0, 100), (1000, 1100), (5000, 5200)], gap=10, rate=100)
    piece = timemap.window(105, 230)  # from the gap into the third span
    assert piece.streamed == 125
    assert piece.spans == (Span(5, 1000, 100), Span(115, 5000, 10))
    assert piece.to_source(0.05) == (10.0, False)
    assert piece.to_source(1.2) == (50.05, False)


def test_word_times_come_back_in_the_file_time_base_and_gap_words_are_flagged() -> None:
    timemap = TimeMap.joined([(RATE * 10, RATE * 12), (RATE * 40, RATE * 41)], RATE // 2, RATE)
    finals = [
        Transcription(
            session_id="s",
            transcript="a b c",
            is_final=True,
            is_last=False,
            words=(
                Word("a", 0.5, 0.9, 0.9),
                Word("b", 2.05, 2.2, 0.9),  # inside the shortened pause
                Word("c", 2.6, 2.9, 0.9),
            ),
        )
    ]
    words = collect_finals(finals, timemap=timemap).words
    got = [(w["word"], w["start_s"], w["end_s"], w["time_adjusted"]) for w in words]
    assert got == [
        ("a", 10.5, 10.9, False),
        ("b", 12.0, 12.0, True),
        ("c", 40.1, 40.4, False),
    ]


def _track(probabilities: list[float], window: int = 512) -> SpeechTrack:
    return SpeechTrack(np.array(probabilities), float(window), len(probabilities) * window)


def test_speech_regions_open_high_and_close_low() -> None:
    track = _track([0.1, 0.6, 0.4, 0.4, 0.2, 0.1, 0.9, 0.95])
    assert speech_regions(track) == [(512, 4 * 512), (6 * 512, 8 * 512)]


def test_stream_plan_pads_keeps_short_pauses_and_shortens_long_ones() -> None:
    regions = [(RATE * 2, RATE * 3), (RATE * 3 + RATE // 4, RATE * 4), (RATE * 10, RATE * 11)]
    plan = stream_plan(regions, RATE * 12, RATE, pad_s=0.2, gap_s=0.5)
    # The first two are 0.25 s apart: one span; the pause before the third is shortened.
    assert [(s.source_start, s.source_end) for s in plan.spans] == [
        (RATE * 18 // 10, RATE * 42 // 10),
        (RATE * 98 // 10, RATE * 112 // 10),
    ]
    first, second = plan.spans
    assert second.stream_start - first.stream_end == RATE // 2
    assert plan.streamed == RATE * 24 // 10 + RATE // 2 + RATE * 14 // 10
    # Speech is never cut: every region is inside a span.
    for start, end in regions:
        assert any(s.source_start <= start and end <= s.source_end for s in plan.spans)
    assert stream_plan([], RATE * 12, RATE, pad_s=0.3, gap_s=0.5).streamed == 0
    edge = stream_plan([(0, RATE)], RATE * 2, RATE, pad_s=0.5, gap_s=0.5)
    assert [(s.source_start, s.source_end) for s in edge.spans] == [(0, RATE * 3 // 2)]


def test_spans_keep_the_source_frame_phase() -> None:
    frame = RATE // 50
    regions = [(1234, 5000), (40001, 50007), (90011, 91000)]
    plan = stream_plan(regions, RATE * 6, RATE, pad_s=0.013, gap_s=0.3)
    for span in plan.spans:
        assert (span.stream_start - span.source_start) % frame == 0
    for before, after in itertools.pairwise(plan.spans):
        assert 0 <= after.stream_start - before.stream_end - int(0.3 * RATE) < frame
    for start, end in regions:
        assert any(s.source_start <= start and end <= s.source_end for s in plan.spans)


@pytest.mark.parametrize(
    ("duration_s", "target_s", "sessions", "expected"),
    [
        (1500, 300, 4, 8),  # 5 pieces would run the fifth alone
        (1200, 300, 4, 4),
        (700, 300, 4, 4),  # 3 would leave a session idle
        (700, 300, 64, 4),  # but pieces stay at least half the target long
        (3000, 300, 4, 12),
        (650, 300, 1, 3),
    ],
)
def test_piece_count_fills_the_pool_in_whole_rounds(
    duration_s: float, target_s: float, sessions: int, expected: int
) -> None:
    assert piece_count(duration_s, target_s, sessions) == expected


def test_a_set_piece_count_gives_even_pieces_at_quiet_points() -> None:
    frame = int(RATE * FRAME_S)
    rng = np.random.default_rng(1)
    energy = rng.uniform(0.5, 1.0, int(750 / FRAME_S))
    for second in range(3, 750, 7):  # a short pause every 7 s
        energy[int(second / FRAME_S) : int(second / FRAME_S) + 10] = 0.0
    total = 750 * RATE
    cuts = choose_cuts(energy, frame, total, target_s=750 / 8, window_s=5, pieces=8)
    lengths = [(b - a) / RATE for a, b in itertools.pairwise(cuts)]
    assert len(lengths) == 8
    assert max(lengths) - min(lengths) < 12  # no lone long or short last piece
    for cut in cuts[1:-1]:
        assert energy[cut // frame] == 0.0


def test_stream_energy_is_silent_in_gaps() -> None:
    frame = 320
    energy = np.arange(100, dtype=np.float64) + 1
    timemap = TimeMap.joined([(0, 10 * frame), (50 * frame, 60 * frame)], 5 * frame, RATE)
    streamed = stream_energy(energy, frame, timemap)
    assert streamed.size == 25
    assert list(streamed[:10]) == list(energy[:10])
    assert not streamed[10:15].any()
    assert list(streamed[15:]) == list(energy[50:60])


def test_spend_cap_reserves_in_flight_sessions_and_counts_retries() -> None:
    cap = SpendCap.from_limits(max_billed_minutes=2.0, max_cost=None, price_per_minute=0.0)
    cap.admit(50)
    cap.admit(50)  # two sessions in flight: 100 s reserved
    with pytest.raises(SpendCapReached, match="2 billed minutes"):
        cap.admit(30)
    assert cap.reached
    cap.settle(50, 50)
    with pytest.raises(SpendCapReached):
        cap.admit(1)  # once reached, the run starts nothing new
    assert not classify(SpendCapReached("x")).retry
    assert classify(SpendCapReached("x")).scope is Scope.ITEM


def test_cost_cap_is_the_tighter_and_needs_a_price() -> None:
    cap = SpendCap.from_limits(max_billed_minutes=10, max_cost=1.0, price_per_minute=0.5)
    assert cap.limit_s == 120
    assert SpendCap.from_limits(None, None, 0.0).limit_s is None
    with pytest.raises(ValueError, match="price_per_minute"):
        SpendCap.from_limits(None, 1.0, 0.0)
