"""Background processes as one tree: start a command so that it and every process it starts end together.

Why: inside 3D Slicer the background interpreter is `PythonSlicer`, an application launcher that starts the real
interpreter (`python-real`) as its child and forwards no signal to it. Ending the launcher alone leaves the work
running, holding the CPU or GPU after its working folder is gone. So a run starts in a process group of its own and
is ended as a group, with every descendant found before anything is ended (an orphan is re-parented and can no
longer be found by its parent):

    process = start_tree([launcher, "-m", "TumorPersonalizationLib.cli", ...], stdout=..., stderr=...)
    ...
    end_tree(process)            # the launcher, the interpreter it started, and anything those started

Platforms: Linux and macOS put the run in a new session (its own process group) and end the group, then any
descendant that left it; Windows starts a new process group without a console window and ends the tree with
`taskkill /T /F`, then each descendant found before. Descendants are listed with psutil when it is installed, else
from /proc (Linux) or `ps` (macOS). Every run started here and still alive is ended when the interpreter exits
(closing Slicer).

No Slicer or Qt import: this runs in Slicer's process and in plain Python alike (Python 3.9+).
"""
import atexit
import logging
import os
import signal
import subprocess
import time
from typing import Any, Dict, List, Sequence

_LIVE: Dict[int, subprocess.Popen] = {}  # pid -> process, for ending what is left when the interpreter exits
_WINDOWS = os.name == "nt"


def start_tree(command: Sequence[str], **popen_options: Any) -> subprocess.Popen:
    """Start `command` as the root of a process tree that end_tree can end as a whole.

    command: the program and its arguments. popen_options: passed to subprocess.Popen (stdout, stderr, cwd, env, ...);
    on Windows `creationflags` are combined with a new process group and no console window; on POSIX
    `start_new_session` is set. Returns the Popen of the root. Raises OSError (as Popen does) when the program cannot
    be started.
    """
    options = dict(popen_options)
    if _WINDOWS:
        options["creationflags"] = (options.get("creationflags", 0) | subprocess.CREATE_NEW_PROCESS_GROUP
                                    | subprocess.CREATE_NO_WINDOW)
    else:
        options["start_new_session"] = True
    process = subprocess.Popen(list(command), **options)
    _LIVE[process.pid] = process
    return process


def forget(process: subprocess.Popen) -> None:
    """Stop tracking a process that ended by itself (no end_tree needed at exit)."""
    _LIVE.pop(process.pid, None)


def descendant_pids(pid: int) -> List[int]:
    """Process ids of every living descendant of `pid` (children, their children, ...), parents first.

    Uses psutil when installed, else /proc (Linux) or `ps -A -o pid=,ppid=` (macOS). Returns [] where none of these
    is available (Windows without psutil: taskkill /T covers the tree there)."""
    try:
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    except ImportError:
        pass
    parents = _parent_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop(0)
        children = sorted(child for child, its_parent in parents.items() if its_parent == parent)
        found += children
        frontier += children
    return found


def _living_proc_stats():
    """(pid, [state, ppid, pgrp, ...]) of every living (not zombie) process in /proc (Linux)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stream:
                stat = stream.read().decode("ascii", "replace")
        except OSError:  # ended meanwhile
            continue
        # "pid (command) state ppid pgrp ...": the command may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z":
            yield int(name), fields


def _parent_table() -> Dict[int, int]:
    """{pid: parent pid} of every process this user can see (POSIX); {} where it cannot be read."""
    table = {}
    if os.path.isdir("/proc/self"):
        return {pid: int(fields[1]) for pid, fields in _living_proc_stats()}
    if _WINDOWS:
        return table
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat="], capture_output=True,
                                 text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return table
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() and not parts[2:3] == ["Z"]:
            table[int(parts[0])] = int(parts[1])
    return table


def group_members(pgid: int) -> List[int]:
    """Living (not zombie) processes of process group `pgid` (POSIX). On Linux read from /proc; elsewhere the group
    counts as one member, [pgid], while it can still be signalled."""
    if os.path.isdir("/proc/self"):
        return [pid for pid, fields in _living_proc_stats() if int(fields[2]) == pgid]
    try:
        os.killpg(pgid, 0)
        return [pgid]
    except (ProcessLookupError, PermissionError):
        return []


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a zombie has ended; only its exit status is left)."""
    if _WINDOWS:
        try:
            import psutil

            return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except ImportError:
            listing = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True,
                                     creationflags=subprocess.CREATE_NO_WINDOW).stdout
            return str(pid) in listing.split()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stream:
                stat = stream.read().decode("ascii", "replace")
            return stat[stat.rfind(")") + 2:].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def end_tree(process: subprocess.Popen, timeout_s: float = 10.0) -> List[int]:
    """End `process` and every process it started, at once (no grace period: the run's outputs are discarded).

    process: the root, as start_tree returned it (a process started otherwise is ended with its descendants too,
    only without the process-group step). timeout_s: how long to wait, in seconds, for all of them to be gone.
    Returns the process ids that were ended (root first). Never raises for processes that have already ended;
    logs a warning when one is still alive after timeout_s.
    """
    pids = [process.pid] + descendant_pids(process.pid)  # before anything ends: orphans lose their parent link
    if _WINDOWS:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
        for pid in pids[1:]:
            _kill(pid, signal.SIGTERM)  # TerminateProcess on Windows
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group outlives its leader while any member is alive
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids[1:]:  # descendants that started a group or session of their own
            _kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout_s
    # Signals are delivered asynchronously: wait until every process found, and the group, are gone.
    while time.monotonic() < deadline and (any(pid_alive(pid) for pid in pids[1:])
                                           or (not _WINDOWS and group_members(process.pid))):
        time.sleep(0.05)
    survivors = [pid for pid in pids if pid_alive(pid)]
    if survivors:
        logging.warning("TumorPersonalization: processes %s still alive after ending the run", survivors)
    forget(process)
    return pids


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (OSError, SystemError):  # ended meanwhile, or not ours
        pass


def end_all() -> None:
    """End every tree started by start_tree that is still running (called when the interpreter exits)."""
    for process in list(_LIVE.values()):
        if process.poll() is None:
            end_tree(process, timeout_s=5.0)
        forget(process)


atexit.register(end_all)

__all__ = ["start_tree", "end_tree", "end_all", "forget", "descendant_pids", "group_members", "pid_alive"]
