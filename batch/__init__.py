"""pulse-batch: batch transcription jobs for the Pulse streaming speech-to-text service.

The library call (docs/library.md)::

    import batch

    result = batch.run_job("jobs/calls.yaml", max_failures=3)
    result.check()  # raises batch.errors.RunFailed unless the exit code is 0
    words = batch.read_table("jobs/out", "words", job="calls")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batch.version import __version__

if TYPE_CHECKING:
    from batch.api import RunResult, read_table, run_job, run_job_async

__all__ = ["RunResult", "__version__", "read_table", "run_job", "run_job_async"]

_LAZY = frozenset({"RunResult", "read_table", "run_job", "run_job_async"})


def __getattr__(name: str) -> Any:
    # `import batch` stays light (the CLI's --help, the local server's processes): the
    # runner, pyarrow and PyAV load on first use of the library call.
    if name in _LAZY:
        from batch import api

        return getattr(api, name)
    raise AttributeError(f"module 'batch' has no attribute {name!r}")
