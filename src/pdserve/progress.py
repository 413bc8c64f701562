"""Progress where people wait: bars on a terminal, nothing of the sort in logs, and start-up stages that a
launcher can follow.

``bar`` is tqdm on a terminal (stderr is a TTY) and a disabled tqdm otherwise, so a command's progress
never fills a log file with carriage returns. ``report_stage`` appends one JSON line per start-up stage
(``kernels``, ``weights``) to the file named by ``$PDSERVE_PROGRESS_FILE`` when it is set (``pdserve
up`` sets it for each worker it starts, cluster/startup.py reads it); otherwise it does nothing.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PROGRESS_FILE_ENV = "PDSERVE_PROGRESS_FILE"


def on_terminal() -> bool:
    """Whether progress bars are worth drawing: stderr (where tqdm writes) is a terminal."""
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar, drawn only when ``enabled`` and on a terminal (a disabled bar accepts the same calls)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and on_terminal()), **kwargs)


def report_stage(stage: str, **fields) -> None:
    """Record that this process finished a start-up ``stage`` (with JSON-able ``fields``)."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    line = json.dumps({"stage": stage, "unix_s": time.time(), **fields})
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        logger.warning("cannot write start-up progress to %s: %s", path, e)


def read_stages(path: str | Path) -> list[dict]:
    """The stages recorded in ``path`` so far (none when it does not exist yet; a partly written last
    line is left for the next read)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # being written
    return out
