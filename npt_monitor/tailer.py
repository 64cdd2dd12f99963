"""Follow a growing JSONL file: partial lines, truncation, rotation, late creation.

:class:`FileTailer` is a synchronous reader (used directly by ``--check``);
:class:`TailerThread` polls it in a background thread, parses the new lines and
hands :class:`TailBatch` objects to a ``sink`` callable (the app posts them as
Textual messages; the thread never touches widgets).

* An incomplete last line is kept until its ``\\n`` arrives.  If it is already a
  complete JSON object at end of file (a writer that omits the final newline),
  it is delivered and the newline, when it comes, is swallowed.
* A "line" longer than ``max_line`` bytes (16 MiB) is reported as one corrupt
  line and skipped up to its newline, so memory stays bounded.
* Truncation (size < offset) restarts from byte 0 with ``reset=True``.
* Rotation/replacement (inode or device changed, e.g. ``rsync`` or
  ``logrotate``) reopens the path and reads it from the start with
  ``reset=True``: the display always reflects the file's current content.
* A path that does not exist yet is polled until it appears; a deleted file
  keeps being read through the open handle until a new one appears.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from .parsing import Batch, CorruptLine, parse_lines

__all__ = ["FileTailer", "TailBatch", "TailChunk", "TailerThread"]


def _decode_lines(data: bytes) -> list[str | bytes]:
    """Split complete lines, decoding once per chunk; lines that are not valid
    UTF-8 stay ``bytes`` (the parser reports them as corrupt)."""
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        out: list[str | bytes] = []
        for line in data.split(b"\n"):
            try:
                out.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(line)
        return out


@dataclass
class TailChunk:
    lines: list[str | bytes]  # str, or bytes for a line that is not valid UTF-8
    first_line_no: int
    reset: bool = False
    reason: str = ""
    more: bool = False  # the read filled its buffer: more data is waiting


class FileTailer:
    def __init__(self, path: str | Path, read_size: int = 4 << 20, max_line: int = 16 << 20) -> None:
        self.path = Path(path)
        self.read_size = read_size
        self.max_line = max_line
        self._fh: BinaryIO | None = None
        self._id: tuple[int, int] | None = None
        self.offset = 0
        self.partial = b""
        self.line_no = 0
        self._swallow_newline = False
        self._discard = False

    @property
    def exists(self) -> bool:
        return self._fh is not None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None

    def _open(self) -> bool:
        try:
            fh = open(self.path, "rb")
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return False
        self.close()
        self._fh = fh
        st = os.fstat(fh.fileno())
        self._id = (st.st_dev, st.st_ino)
        self._rewind()
        return True

    def _rewind(self) -> None:
        self.offset = 0
        self.partial = b""
        self.line_no = 0
        self._swallow_newline = False
        self._discard = False

    def poll(self) -> TailChunk | None:
        """Read what is new.  ``None`` means nothing happened."""
        reset, reason = False, ""
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if self._fh is None:
            if st is None or not self._open():
                return None
        elif st is not None and (st.st_dev, st.st_ino) != self._id:
            had_data = self.offset > 0
            if not self._open():
                return None
            reset, reason = had_data, "rotated"
        fh = self._fh
        assert fh is not None
        size = os.fstat(fh.fileno()).st_size
        if size < self.offset:
            self._rewind()
            reset, reason = True, "truncated"
        if size == self.offset:
            return TailChunk([], self.line_no + 1, reset, reason) if reset else None
        fh.seek(self.offset)
        data = fh.read(self.read_size)
        self.offset += len(data)
        more = len(data) >= self.read_size
        if self._swallow_newline and data:
            self._swallow_newline = False
            if data.startswith(b"\n"):
                data = data[1:]
        if self._discard:  # rest of an over-long line: drop up to its newline
            nl = data.find(b"\n")
            if nl < 0:
                return TailChunk([], self.line_no + 1, reset, reason, more)
            self._discard = False
            data = data[nl + 1 :]
        buf = self.partial + data if self.partial else data
        cut = buf.rfind(b"\n")
        self.partial = buf[cut + 1 :]
        lines = _decode_lines(buf[:cut]) if cut >= 0 else []
        if len(self.partial) > self.max_line:  # no newline for max_line bytes: not a metrics line
            lines.append(self.partial[:80])  # reported as one corrupt line
            self.partial = b""
            self._discard = True
        if not more and self.partial and self.partial.rstrip().endswith(b"}"):
            # a complete object missing only its newline (writer without trailing \n)
            try:
                ok = type(json.loads(self.partial)) is dict
            except ValueError:
                ok = False
            if ok:
                lines.extend(_decode_lines(self.partial))
                self.partial = b""
                self._swallow_newline = True
        first = self.line_no + 1
        self.line_no += len(lines)
        return TailChunk(lines, first, reset, reason, more)

    def read_all(self) -> list[TailChunk]:
        """Drain the file as it is now (headless use)."""
        chunks = []
        while True:
            chunk = self.poll()
            if chunk is None:
                return chunks
            chunks.append(chunk)
            if not chunk.more:
                return chunks


@dataclass
class TailBatch:
    """Parsed new content of one file, as handed to the sink."""

    batch: Batch = field(default_factory=Batch)
    corrupt: list[CorruptLine] = field(default_factory=list)
    reset: bool = False
    reason: str = ""
    exists: bool = True
    more: bool = False


class TailerThread(threading.Thread):
    """Poll a :class:`FileTailer` and feed parsed batches to ``sink``.

    At most ``max_in_flight`` batches are outstanding: the consumer must call
    :meth:`done` after handling each one (back-pressure keeps memory bounded
    while a huge file is loaded).
    """

    def __init__(
        self,
        path: str | Path,
        sink: Callable[[TailBatch], object],
        interval: float = 0.2,
        read_size: int = 1 << 20,
        max_in_flight: int = 2,
    ) -> None:
        super().__init__(name=f"tail:{path}", daemon=True)
        self.tailer = FileTailer(path, read_size)
        self.sink = sink
        self.interval = interval
        self._stop_event = threading.Event()
        self._slots = threading.Semaphore(max_in_flight)

    def stop(self) -> None:
        self._stop_event.set()

    def done(self) -> None:
        self._slots.release()

    def _deliver(self, batch: TailBatch) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._stop_event.is_set():
                return False
        self.sink(batch)
        return True

    def run(self) -> None:
        stop = self._stop_event
        announced_missing = False
        try:
            while not stop.is_set():
                chunk = self.tailer.poll()
                if chunk is None:
                    if not self.tailer.exists and not announced_missing:
                        announced_missing = True
                        if not self._deliver(TailBatch(exists=False)):
                            return
                    stop.wait(self.interval)
                    continue
                announced_missing = False
                parsed, corrupt = parse_lines(chunk.lines, chunk.first_line_no)
                parsed.precompute()
                batch = TailBatch(parsed, corrupt, chunk.reset, chunk.reason, True, chunk.more)
                if not self._deliver(batch):
                    return
                if not chunk.more:
                    stop.wait(self.interval)
        finally:
            self.tailer.close()
