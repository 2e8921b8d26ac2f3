"""`pulse-batch forget`: the command over `batch.forget.forget` (registered by `batch.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from batch import console
from batch.cli_exits import exit_codes
from batch.forget import forget


def forget_command(
    output: Annotated[
        str, typer.Argument(help="A job's output (output.path: folder or URL).", metavar="OUTPUT")
    ],
    job: Annotated[str, typer.Option(help="The job whose items to forget.")],
    item: Annotated[
        list[str] | None,
        typer.Option("--item", help="An item_id (or a prefix naming one); repeat for more."),
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(help="Or: items where col=value[,col!=value...], as in export."),
    ] = None,
    reason: Annotated[
        str, typer.Option(help="Why, kept in the tombstone (a ticket number; no personal data).")
    ] = "",
    exports_dir: Annotated[
        Path | None,
        typer.Option(
            "--exports",
            help="Folder of the job's exports [default: OUTPUT/_exports/JOB, or "
            "_exports/JOB here for an output at a URL].",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go.")] = False,
) -> None:
    """Erase items: their rows from every table, their exported files; a tombstone (id,
    when, why) keeps later runs from transcribing them again (run --force brings them back)."""
    with exit_codes():
        done = forget(
            output,
            job,
            items=item or (),
            where=where,
            reason=reason,
            exports=exports_dir,
            dry_run=dry_run,
        )
    console.show_forget(done)
