"""Textual messages posted from the tailer thread to the widgets."""

from __future__ import annotations

from textual.message import Message

from .tailer import TailBatch


class TailUpdate(Message):
    """New content (or a reset / missing-file notice) for one run."""

    def __init__(self, batch: TailBatch) -> None:
        super().__init__()
        self.batch = batch
