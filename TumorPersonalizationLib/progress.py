"""One progress protocol and one way to cancel, shared by the solver, the inversion, the pipeline, dataset generation
and training.

Progress: a callable ``progress(fraction, message)`` with fraction in [0, 1] of the whole job and a short message
saying what is being done. ``None`` means nobody listens.

Cancel: anything with an ``is_set()`` method (a ``threading.Event``, a ``multiprocessing.Event``) or a
zero-argument callable returning True when the job should stop. Long loops call ``check_cancel(cancel)`` between
iterations and solver steps, which raises ``Cancelled``; the pipeline then writes nothing.
"""
import json
import sys
from typing import Callable, Optional

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """The user cancelled the run; no output was written."""


def is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def check_cancel(cancel) -> None:
    """Raise Cancelled when the cancel flag is set."""
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, end: float,
                 prefix: str = "") -> Optional[ProgressCallback]:
    """A callback for one stage of a job: its fractions 0..1 are mapped onto [start, end] of the parent's."""
    if progress is None:
        return None

    def stage(fraction: float, message: str = "") -> None:
        text = f"{prefix}: {message}" if prefix and message else (prefix or message)
        progress(start + (end - start) * min(max(float(fraction), 0.0), 1.0), text)

    return stage


class JsonLinesProgress:
    """Progress as one JSON object per update on a stream ({"fraction": .., "message": ..}), for a parent process
    (the Slicer module) that follows a background run. Repeated identical updates are dropped."""

    def __init__(self, stream=None, resolution: float = 0.001):
        self.stream = stream if stream is not None else sys.stderr
        self.resolution = resolution
        self.last = (-1.0, None)

    def __call__(self, fraction: float, message: str = "") -> None:
        if abs(fraction - self.last[0]) < self.resolution and message == self.last[1]:
            return
        self.last = (fraction, message)
        self.stream.write(json.dumps({"fraction": round(float(fraction), 4), "message": message}) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar on stderr fed with (fraction, message)."""

    def __init__(self, description: str, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=description, file=sys.stderr, disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self.done = 0

    def __call__(self, fraction: float, message: str = "") -> None:
        target = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        if message:
            self.bar.set_postfix_str(message[:60], refresh=False)
        if target > self.done:
            self.bar.update(target - self.done)
            self.done = target
        elif message:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
