"""How every benchmark module publishes its figures: printed as a table at the end of the
module and written to ``bench-results/<name>.json`` for tracking across runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def publish(results: dict[str, dict[str, Any]], name: str, title: str) -> None:
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    width = max((len(key) for row in results.values() for key in row), default=0) + 2
    print(f"\n\n=== {title} ===")
    for heading, row in results.items():
        print(f"\n{heading}")
        for key, value in row.items():
            print(f"  {key:<{width}} {value}")
    print(f"\nwritten to {path}")
