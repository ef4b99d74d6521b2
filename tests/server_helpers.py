"""Reading a server's output in tests: wait for the line that says something (its address), not the first line."""
from __future__ import annotations

import queue
import subprocess
import threading
import time


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """The first line of proc's (text) stdout containing `needle`, and the lines printed before it. Raises with
    everything printed when the process exits or `timeout` seconds pass first; a reader thread keeps a silent
    server from blocking the test."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    before: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"the server exited (code {proc.wait()}) before printing {needle!r}: {''.join(before)}")
        if needle in line:
            return line, before
        before.append(line)
    raise AssertionError(f"no line with {needle!r} within {timeout:g} s; printed: {''.join(before)}")
