"""The library's one progress callback: ``progress(event, info)``.

Training, evaluation, packing and calibration never print; they report what they are doing by
calling a :class:`Progress` with an event name and a dict of plain values. The CLI renders the
events with Rich (``cli/common.progress_bars``); any other caller may log them, collect them in a
test, or pass :func:`no_progress`.

Events that count something carry ``label`` (what is counted: a data set, a task, a model),
``done`` and ``total`` (``None`` when not known yet); training events carry their own keys
(``block``, ``epoch``, ``loss``, ...), documented where they are sent.

No torch, Rich or Typer here.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol


class Progress(Protocol):
    """``progress(event, info)``: ``event`` names what happened, ``info`` holds its values."""

    def __call__(self, event: str, info: dict[str, Any], /) -> None: ...


def no_progress(event: str, info: dict[str, Any]) -> None:
    """The default callback: report nothing."""


def count(progress: Optional[Progress], event: str, label: str, done: int, total: Optional[int]) -> None:
    """Report ``done`` of ``total`` for ``label`` (no-op when ``progress`` is None)."""
    if progress is not None:
        progress(event, {"label": label, "done": done, "total": total})

