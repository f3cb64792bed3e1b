"""Log handlers for the ``biref`` program: the library logs through named loggers (``biref_sdk.*``)
and never writes to a stream itself; the program decides where lines go. A service must not stall
because nobody reads its output, so lines go through a bounded queue to a writer thread: when the
reader of a pipe falls behind, lines are dropped (and counted in the next line written), never waited
for."""
from __future__ import annotations

import logging
import queue
import threading


class NonBlockingHandler(logging.Handler):
    """Formats records on the caller's thread, writes them to ``stream`` on its own thread."""

    def __init__(self, stream, capacity: int = 1000) -> None:
        super().__init__()
        self.stream = stream
        self.dropped = 0
        self._lines: queue.Queue = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._write, name="biref-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put_nowait(self.format(record))
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            if line is None:
                return
            dropped, self.dropped = self.dropped, 0
            if dropped:
                line = f"({dropped} log lines dropped: output not read fast enough)\n{line}"
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):   # a closed pipe: nothing more to say
                return

    def flush_and_stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout_s`` for a slow reader)."""
        try:
            self._lines.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


def configure(stream, output_stream=None, level=logging.INFO) -> list[NonBlockingHandler]:
    """Library records (``biref_sdk``) to ``stream``; the program's own output lines (logger
    ``biref``) to ``output_stream`` (default ``stream``). Returns the handlers (for flush_and_stop)."""
    handlers = []
    for name, target in (("biref_sdk", stream), ("biref", output_stream or stream)):
        handler = NonBlockingHandler(target)
        handler.setFormatter(logging.Formatter("%(message)s" if name == "biref" else "%(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
        handlers.append(handler)
    return handlers
