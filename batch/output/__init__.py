"""The output boundary: tables (local Parquet or Delta Lake), locks, commits and reports.

Two objects own it: `JobOutput` runs a job into an output (its lock, commits and reports),
`OutputReader` looks at one without taking its lock (export, score, status, report,
--dry-run).
"""

from __future__ import annotations

from batch.output.history import History
from batch.output.job_output import JobOutput, RunWriter
from batch.output.layout import FORMATS
from batch.output.reader import JobTables, OutputReader, latest_ok
from batch.output.schema import (
    COLUMNS,
    PARTITION_CHOICES,
    SCHEMA_VERSION,
    TABLES,
    logical_schema,
)

__all__ = [
    "COLUMNS",
    "FORMATS",
    "PARTITION_CHOICES",
    "SCHEMA_VERSION",
    "TABLES",
    "History",
    "JobOutput",
    "JobTables",
    "OutputReader",
    "RunWriter",
    "latest_ok",
    "logical_schema",
]
