"""Read a JSON Lines file record by record; a bad line is one error naming file and line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


def read_jsonl(
    path: Path,
    parse: Callable[[Any], T],
    fix: str = "fix or remove that line",
    skip_bad: bool = False,
    counts: dict | None = None,
) -> Iterator[T]:
    """parse(record) for each non-blank line. `parse` rejects a record with ValueError(reason) or
    ValueError(reason, its own fix). A rejected or unparsable line raises PipelineError
    "FILE:LINE: reason; fix." or, with skip_bad, is counted in counts["bad"]. Records that parse
    to None are left out (e.g. empty texts)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse(json.loads(line))
            except ValueError as e:  # JSONDecodeError is a ValueError
                if skip_bad:
                    if counts is not None:
                        counts["bad"] = counts.get("bad", 0) + 1
                    continue
                if isinstance(e, json.JSONDecodeError):
                    reason, why = f"not valid JSON ({e.msg})", fix
                else:
                    reason, why = e.args[0], e.args[1] if len(e.args) > 1 else fix
                raise PipelineError(f"{path}:{lineno}: {reason}; {why}.") from None
            if item is not None:
                yield item
