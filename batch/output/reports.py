"""Run reports in an output: ``_reports/<job>/<run_id>.json|.md|.html`` and ``latest.*``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batch.errors import ManifestError
from batch.html_report import render_html
from batch.output import layout
from batch.output.layout import Location, translated
from batch.report import render_markdown


def _remote_fs(location: Location) -> Any:
    """An fsspec filesystem for a URL output (the cloud extras install them)."""
    try:
        import fsspec  # type: ignore[import-untyped,unused-ignore]

        protocol = location.url.split("://", 1)[0]
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise ManifestError(
            "output.path",
            f"{location.url}: reading and writing reports there needs its fsspec filesystem "
            f"({exc}); install the extra for it, e.g. pip install 'pulse-batch[s3]'",
        ) from None


def write(location: Location, job: str, report: dict[str, Any], *, latest: bool = True) -> str:
    """Write ``<run_id>.json``/``.md``/``.html`` (and, with ``latest``, ``latest.*``)
    atomically where the store allows; returns the JSON's path (or URL)."""
    text = json.dumps(report, indent=2).encode()
    markdown = render_markdown(report).encode()
    html = render_html(report).encode()
    stems = (report["run_id"], "latest") if latest else (report["run_id"],)
    files = [
        (f"{stem}{suffix}", content)
        for stem in stems
        for suffix, content in ((".json", text), (".md", markdown), (".html", html))
    ]
    folder = location.child("_reports", job)
    with translated("write the report to", folder):
        if location.local is not None:
            local = location.local / "_reports" / job
            local.mkdir(parents=True, exist_ok=True)
            for name, content in files:
                layout.write_atomic(local / name, content)
            return str(local / f"{report['run_id']}.json")
        fs = _remote_fs(location)
        for name, content in files:  # one PUT each: an object appears whole or not at all
            with fs.open(f"{folder}/{name}", "wb") as handle:
                handle.write(content)
        return f"{folder}/{report['run_id']}.json"


def latest(location: Location, job: str | None) -> dict[str, Any] | None:
    """The newest report in an output (of one job, if given); None when there is none."""
    if location.local is None:
        fs = _remote_fs(location)
        pattern = location.child("_reports", job or "*", "latest.json")
        found = sorted(fs.glob(pattern), key=lambda p: fs.info(p).get("LastModified", ""))
        if not found:
            return None
        with fs.open(found[-1], "rb") as handle:
            data: dict[str, Any] = json.loads(handle.read())
        return data
    root = Path(location.local) / "_reports"
    candidates = sorted(
        root.glob(f"{job or '*'}/latest.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not candidates:
        return None
    loaded: dict[str, Any] = json.loads(candidates[0].read_text(encoding="utf-8"))
    return loaded


def every_run(location: Location, job: str) -> list[dict[str, Any]]:
    """Every run's report of ``job`` (a run still going, or killed, has the one it wrote
    when it started, with status ``running``)."""
    found = []
    fs: Any = _remote_fs(location) if location.local is None else None
    if fs is not None:
        paths = sorted(fs.glob(location.child("_reports", job, "*.json")))
    else:
        assert location.local is not None
        paths = sorted(str(p) for p in (location.local / "_reports" / job).glob("*.json"))

    def read(path: str) -> bytes:
        return bytes(fs.cat_file(path)) if fs is not None else Path(path).read_bytes()

    for path in paths:
        if path.rsplit("/", 1)[-1] == "latest.json":
            continue
        try:
            found.append(json.loads(read(path)))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # being replaced right now; the next look sees it
    return found


def job_folders(location: Location) -> list[str]:
    """The jobs with a reports folder in a local output (a job may have reports and no
    rows yet)."""
    assert location.local is not None
    root = location.local / "_reports"
    return [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def latest_path(location: Location, job: str) -> str | None:
    """Where ``job``'s latest report is: a local one only if it exists (a URL, always)."""
    if location.local is None:
        return location.child("_reports", job, "latest.json")
    path = location.local / "_reports" / job / "latest.json"
    return str(path) if path.exists() else None
