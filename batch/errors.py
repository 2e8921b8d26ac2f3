"""One error tree for pulse-batch, and the one function that decides what a failure means.

::

    PulseBatchError
    ├── ManifestError            bad manifest or usage                  (exit 2)
    │   ├── ShardError           inconsistent --shard / engine variables (exit 2)
    │   └── ExportError          export/score/forget: bad job or filter  (exit 2)
    ├── LockedError              another run of the job holds the lock  (exit 4)
    │   └── ShardCountConflict   shards of another count hold the job   (exit 8)
    ├── OutputError              the output cannot be written or read   (exit 5, no retry)
    ├── InputError               one input cannot be decoded            (item fails, no retry)
    │   └── InputUnavailable     its store failed for now: 5xx, throttled,
    │                            connection dropped, timed out          (retry the item)
    ├── ReferenceUnreadable      a reference text cannot be read        (item stays ok, unscored)
    ├── NotStarted               the run is stopping: session not started (no row)
    │   └── SpendCapReached      the next session would pass the cap    (not started; exit 7)
    ├── JobAborted               a fatal answer for the whole job       (stop the job, exit 3)
    ├── RunFailed                `RunResult.check()`: a library run did not succeed
    │                            (carries the result and its exit_code)
    └── SessionError             one Pulse session went wrong
        ├── HandshakeRejected    HTTP status before the upgrade         (by status)
        ├── ConnectionLost       socket ended before ``is_last``        (retry; a 1008
        │                        before the service took audio: a refusal, not an attempt)
        │   └── Unreachable      no connection at all: refused, DNS, TLS (retry)
        ├── ServerReported       an error message from the service      (retry)
        ├── ProtocolViolation    a frame we cannot parse                (retry)
        ├── SessionTimeout       a named wait ran out                   (retry)
        ├── SessionStalled       fed speech, answered nothing (liveness) (retry)
        └── ServiceRefusing      refused N times in a row, none open    (stop the job, exit 6)
            ├── ServiceUnreachable  could not connect N times in a row  (stop the job, exit 6)
            └── ServiceStalling  N sessions in a row stalled, none ended (stop the job, exit 6)

Every exit code the command line gives is in `ExitCode`, and its meaning in `EXIT_MEANINGS`
(the table docs/resilience.md shows, checked by a test); `exit_code_for` maps the errors the
CLI reports to theirs.

Third-party exceptions (websockets, PyAV, OS) are translated into these at the boundary
(`batch.session`, `batch.decode`, `batch.output`) with ``raise ... from exc``. `classify` is
pure: it looks only at our own error types, so the retry policy is testable without sockets.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path

# Messages quote what they were given, and what they were given can be anything: a 10 MB
# list cell, a value a YAML alias bomb expanded. Quotes and whole messages are bounded.
QUOTE_MAX_CHARS = 200
MESSAGE_MAX_CHARS = 4000
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_MAX_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def clip(text: str, limit: int = QUOTE_MAX_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def quoted(value: object, limit: int = QUOTE_MAX_CHARS) -> str:
    """``repr(value)`` for a message, bounded in length and in the time it takes to make."""
    return clip(_REPR.repr(value), limit)


class PulseBatchError(Exception):
    """Root of every error pulse-batch raises on purpose."""


class ManifestError(PulseBatchError):
    """The manifest (or a list file it names) is invalid. Names the file and the key path."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(clip(f"{path}: {message}", MESSAGE_MAX_CHARS))
        self.path = str(path)


class ShardError(ManifestError):
    """``--shard``/``--shards`` or a batch engine's array variables are inconsistent.
    ``path`` names the flag or variable at fault. Retrying cannot help."""


class ExportError(ManifestError):
    """Bad usage of export, score or forget (a job the output does not hold, a bad filter,
    an id naming no item)."""


class LockedError(PulseBatchError):
    """Another live process is running the same job into the same output."""


class ShardCountConflict(LockedError):
    """Shards of the job with another shard count are running into the output: their
    slices of the items differ, so both would run (and bill) some items. Retrying cannot
    help until they finish or the counts agree."""


class OutputError(PulseBatchError):
    """The output cannot be written (disk full, read-only, permission denied) or read.

    Names the path, the operation and the OS (or Arrow, Delta) error; never a credential.
    Retrying the run cannot help until the cause is fixed; committed rows are never at risk.
    """

    def __init__(self, path: Path | str, operation: str, reason: str) -> None:
        super().__init__(f"cannot {operation} {path}: {reason}")
        self.path = str(path)
        self.operation = operation
        self.reason = reason


class InputError(PulseBatchError):
    """An input file cannot be turned into audio. Retrying cannot help (except for the
    `InputUnavailable` subclass).

    ``kind`` is one of: not_found, symlink_loop, bad_path, permission, empty, not_media,
    no_audio, decode_error, too_short, read_error.
    """

    def __init__(self, kind: str, path: Path | str, message: str) -> None:
        super().__init__(clip(f"{path}: {message}", MESSAGE_MAX_CHARS))
        self.kind = kind
        self.path = str(path)


class InputUnavailable(InputError):
    """The store behind a URL input failed for now (a dropped connection, a 5xx answer,
    throttling such as S3's ``SlowDown``, a timeout), after its SDK's own retries. Another
    attempt after a backoff can succeed. ``kind`` is ``read_error``."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__("read_error", path, message)


class ReferenceUnreadable(PulseBatchError):
    """A reference text file cannot be read: the item stays ok, it is just not scored."""


class JobAborted(PulseBatchError):
    """A fatal answer for the whole job (bad key, forbidden, bad request)."""


class RunFailed(PulseBatchError):
    """A run through the library call ended with a non-zero exit code; raised by
    `batch.RunResult.check()` so an orchestrator's task fails. ``result`` is the run's
    `RunResult` (its ``exit_code``, ``status``, ``report_path``)."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class NotStarted(PulseBatchError):
    """The run is stopping (a signal, the spend cap): the session was not started, the
    item gets no row, and a rerun does it. Retrying in this run cannot help."""


class SpendCapReached(NotStarted):
    """The next session would take the run past its spend cap; it was not started, and a
    rerun continues from there. Retrying in this run cannot help."""


class SessionError(PulseBatchError):
    """A Pulse session failed. ``kind`` is a short stable name for reports."""

    kind = "session"


class HandshakeRejected(SessionError):
    """The service answered the upgrade request with an HTTP error status."""

    kind = "handshake"

    def __init__(self, status: int, reason: str = "", retry_after_s: float | None = None) -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"service refused the session with HTTP {status}{detail}")
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


class ConnectionLost(SessionError):
    """The socket closed or broke before the terminal ``is_last`` message.

    ``after_audio``: the service had taken audio (it answered with a transcript, the end
    signal was sent, or it read audio past the moment a refusal comes), so even a
    concurrency close code (1008) is a failed attempt.
    """

    kind = "connection_lost"

    def __init__(
        self, message: str, close_code: int | None = None, *, after_audio: bool = False
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.after_audio = after_audio

    @property
    def refused(self) -> bool:
        """Closed for concurrency before the service took any audio."""
        return self.close_code == _CONCURRENCY_CLOSE_CODE and not self.after_audio


class Unreachable(ConnectionLost):
    """No connection to the service could be made at all (nothing listening, DNS, TLS,
    proxy, or a connect timeout): the session never opened. Stored as ``connection_lost``."""


class ServerReported(SessionError):
    """The service sent an error message during the session."""

    kind = "server_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"service error{f' {code}' if code else ''}: {message}")
        self.code = code


class ProtocolViolation(SessionError):
    """The service sent a frame that does not follow the protocol."""

    kind = "protocol"


class SessionTimeout(SessionError):
    """A named wait ran out (``timeout`` holds its name, e.g. ``connect_timeout_s``)."""

    kind = "timeout"

    def __init__(self, timeout: str, seconds: float) -> None:
        super().__init__(f"{timeout} ({seconds:g} s) ran out")
        self.timeout = timeout
        self.seconds = seconds


class SessionStalled(SessionError):
    """The service took audio and stopped answering: ``speech_s`` seconds of speech (by
    the detector) went unanswered, and then ``waited_s`` seconds with no more audio (after
    a ``finalize`` probe where the endpoint has one) brought no answer either. The session
    was aborted; the rest of the recording was not fed to it (`batch.pulse.liveness`)."""

    kind = "stalled"

    def __init__(self, speech_s: float, audio_s: float, waited_s: float, probed: bool) -> None:
        probe = " and a finalize probe" if probed else ""
        super().__init__(
            f"the service stopped answering: nothing for {speech_s:.1f} s of speech "
            f"({audio_s:.1f} s of audio){probe}, nor in {waited_s:g} s of waiting; "
            "aborted the session (run.stall_after_speech_s sets the bound)"
        )
        self.speech_s = speech_s
        self.audio_s = audio_s
        self.waited_s = waited_s


class ServiceRefusing(SessionError):
    """The service refused ``refusals`` sessions in a row while none of ours was open: it
    accepts nothing now, and grinding on would take days. Stops the job."""

    kind = "service_refusing"

    def __init__(self, refusals: int, last: BaseException) -> None:
        super().__init__(
            f"the service refused {refusals} sessions in a row and accepted none ({last}); "
            "stopped rather than retry for hours. Check the account's plan and status, then "
            "rerun (run.max_refusals_in_a_row sets how many refusals stop a job)"
        )
        self.refusals = refusals


class ServiceUnreachable(ServiceRefusing):
    """``failures`` connection attempts in a row failed before any session opened: the
    endpoint cannot be reached from here. Names the host (never the key); stops the job."""

    kind = "service_unreachable"

    def __init__(self, failures: int, last: BaseException, host: str) -> None:
        SessionError.__init__(
            self,
            f"cannot reach the service at {host}: {failures} connection attempts in a row "
            f"failed and none opened a session (last: {last}); stopped rather than retry "
            "every item for hours. Check pulse.endpoint (host, port, ws:// or wss://), DNS, "
            "the network or proxy (HTTPS_PROXY) and the TLS certificate, then rerun "
            "(run.max_refusals_in_a_row sets how many failures in a row stop a job)",
        )
        self.refusals = failures
        self.host = host


class ServiceStalling(ServiceRefusing):
    """``stalls`` sessions in a row stalled (took audio, answered nothing) and none ended
    otherwise: the service is up but transcribes nothing. Stops the job."""

    kind = "service_stalling"

    def __init__(self, stalls: int, last: BaseException) -> None:
        SessionError.__init__(
            self,
            f"{stalls} sessions in a row stalled: the service took audio and answered nothing "
            f"(last: {last}); stopped rather than retry every item for hours. Check the "
            "service's status, then rerun (run.max_refusals_in_a_row sets how many stalls "
            "in a row stop a job)",
        )
        self.refusals = stalls


class ExitCode(IntEnum):
    """What a ``pulse-batch`` command's exit status says; the one table of them."""

    OK = 0
    ITEMS_FAILED = 1
    USAGE = 2
    FATAL_SERVICE = 3
    LOCKED = 4
    OUTPUT = 5
    SERVICE_REFUSING = 6
    SPEND_CAP = 7
    SHARD_COUNT = 8
    INTERNAL = 70  # EX_SOFTWARE: a crash must not read as "some items failed" (1)
    SIGINT = 130
    SIGTERM = 143


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "every item ok (or failures within --max-failures / --max-failure-ratio)",
    ExitCode.ITEMS_FAILED: "some items failed or were not run",
    ExitCode.USAGE: "bad manifest, list file or usage",
    ExitCode.FATAL_SERVICE: "the job was stopped by a fatal service answer",
    ExitCode.LOCKED: "another run of the job holds the output's lock",
    ExitCode.OUTPUT: "the output could not be written or read",
    ExitCode.SERVICE_REFUSING: "the service refused everything or could not be reached",
    ExitCode.SPEND_CAP: "the spend cap was reached",
    ExitCode.SHARD_COUNT: "shards of the job with another shard count are running",
    ExitCode.INTERNAL: "an internal error (a bug): the traceback is on stderr; please report it",
    ExitCode.SIGINT: "stopped by SIGINT",
    ExitCode.SIGTERM: "stopped by SIGTERM",
}


# The errors that end a command, most specific first (a subclass before its base).
_EXIT_BY_ERROR: tuple[tuple[type[PulseBatchError], ExitCode], ...] = (
    (ShardCountConflict, ExitCode.SHARD_COUNT),
    (LockedError, ExitCode.LOCKED),
    (ManifestError, ExitCode.USAGE),
    (OutputError, ExitCode.OUTPUT),
    (ServiceRefusing, ExitCode.SERVICE_REFUSING),
    (JobAborted, ExitCode.FATAL_SERVICE),
    (SpendCapReached, ExitCode.SPEND_CAP),
)


def exit_code_for(error: PulseBatchError) -> ExitCode | None:
    """The exit code the CLI gives for an error that ends a command (None: not one of
    those; the caller decides)."""
    return next((code for kind, code in _EXIT_BY_ERROR if isinstance(error, kind)), None)


class Scope(Enum):
    ITEM = "item"  # only this item is affected
    JOB = "job"  # no item can succeed: stop the job


@dataclass(frozen=True)
class Verdict:
    retry: bool
    scope: Scope
    # Refused for concurrency: the pool should shrink rather than burn attempts.
    overloaded: bool = False
    retry_after_s: float | None = None


# Statuses that mean the request itself, or the account, is wrong: no item can succeed.
_JOB_FATAL_STATUSES = frozenset({400, 401, 403, 404})
_CONCURRENCY_CLOSE_CODE = 1008


def is_refusal(error: BaseException) -> bool:
    """The service declined to run a session at all (at the handshake, or 1008 before it
    took audio), for a reason a later attempt may not meet: what a `RefusalStreak` counts."""
    if isinstance(error, HandshakeRejected):
        return classify(error).retry
    return isinstance(error, ConnectionLost) and error.refused


def is_unreachable(error: BaseException) -> bool:
    """No connection could be made (the session never opened): what a `RefusalStreak`
    counts beside refusals, so an endpoint that cannot be reached stops the job early."""
    if isinstance(error, SessionTimeout):
        return error.timeout == "connect_timeout_s"
    return isinstance(error, Unreachable)


def classify(error: BaseException) -> Verdict:
    """Decide whether a failure is worth retrying and how far it reaches. Pure."""
    if isinstance(error, ServiceRefusing):
        return Verdict(retry=False, scope=Scope.JOB)
    if isinstance(error, HandshakeRejected):
        if error.status in _JOB_FATAL_STATUSES:
            return Verdict(retry=False, scope=Scope.JOB)
        if error.status == 429:
            return Verdict(True, Scope.ITEM, overloaded=True, retry_after_s=error.retry_after_s)
        if error.status >= 500 or error.status == 408:
            return Verdict(True, Scope.ITEM, retry_after_s=error.retry_after_s)
        return Verdict(retry=False, scope=Scope.ITEM)
    if isinstance(error, ConnectionLost):
        # Only a refusal spares the item's attempts: a close after the service took the
        # audio was billed, and may repeat forever.
        return Verdict(retry=True, scope=Scope.ITEM, overloaded=error.refused)
    if isinstance(error, SessionError | InputUnavailable):
        return Verdict(retry=True, scope=Scope.ITEM)
    return Verdict(retry=False, scope=Scope.ITEM)


def error_kind(error: BaseException) -> str:
    """The short name stored in the tables' ``error_kind`` column."""
    if isinstance(error, InputError):
        return error.kind
    if isinstance(error, HandshakeRejected):
        return f"http_{error.status}"
    if isinstance(error, SessionError):
        return error.kind
    return "internal"
