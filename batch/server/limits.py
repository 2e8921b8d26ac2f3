"""What the local engines cannot do, said once per job instead of faked.

`engine_limits` is pure: an engine name and the options a job asks for in, one sentence per
option the engine does not honour out. `pulse-batch validate` prints them, `run` logs them
once and writes them into the report's ``warnings``.
"""

from __future__ import annotations

from collections.abc import Iterable

from batch.pulse.protocol import PulseOptions

# Extra parameters the local server acts on; every other one is accepted and ignored.
HONOURED_EXTRA_PARAMS = frozenset({"vad_events", "vad"})


def engine_limits(engine: str, options: Iterable[PulseOptions]) -> list[str]:
    """Sentences naming each asked-for option the engine cannot honour, without repeats."""
    notes: dict[str, None] = {}
    for option in options:
        for note in _limits(engine, option):
            notes.setdefault(note)
    return list(notes)


def _limits(engine: str, options: PulseOptions) -> list[str]:
    notes = []
    if options.diarize:
        notes.append("the local engine does not diarize: speaker is null")
    if options.redact_pii:
        notes.append(
            "the local engine redacts emails and phone numbers only: names, addresses and "
            "other personal data need an NER model it does not have and stay in clear"
        )
    if engine == "whisper" and options.language != "en":
        notes.append(
            f"the local whisper engine (tiny.en) recognises English only: language "
            f"{options.language!r} is transcribed as English and reported as 'en'"
        )
    if engine != "whisper" and options.keywords:
        notes.append(f"the local {engine} engine has no vocabulary: keywords are ignored")
    ignored = sorted(set(options.extra) - HONOURED_EXTRA_PARAMS)
    if ignored:
        notes.append(f"the local server accepts but ignores extra_params {ignored}")
    return notes
