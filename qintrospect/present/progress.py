"""Progress on long scans: a single updating line on a terminal, nothing at all when piped."""

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, label: str, total: Optional[int] = None, unit: str = "MiB",
                 scale: int = 1 << 20, stream=None, enabled: Optional[bool] = None):
        self.label = label
        self.total = total
        self.unit = unit
        self.scale = scale
        self.stream = stream or sys.stderr
        self.enabled = enabled if enabled is not None else _isatty(self.stream)
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        rate = self.done / self.scale / max(now - self.start, 1e-6)
        if self.total:
            pct = 100 * self.done / self.total
            text = (f"{self.label}: {pct:5.1f}%  {self.done / self.scale:.0f}/"
                    f"{self.total / self.scale:.0f} {self.unit}  {rate:.0f} {self.unit}/s")
        else:
            text = f"{self.label}: {self.done / self.scale:.0f} {self.unit}"
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
