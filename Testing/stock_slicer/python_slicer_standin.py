"""Stand-in for Slicer's `PythonSlicer`: CTK's application launcher, which starts the real interpreter
(`python-real`) as its child with the same arguments, forwards no signal to it, and exits with the child's code.

Environment: STOCK_LAUNCHER_REAL_PYTHON, the interpreter to start (default: the one running this file);
STOCK_LAUNCHER_PID_FILE, where "LAUNCHER_PID CHILD_PID" is written once the child runs (for the tests' checks).
"""
import os
import subprocess
import sys

real_python = os.environ.get("STOCK_LAUNCHER_REAL_PYTHON") or sys.executable
child = subprocess.Popen([real_python] + sys.argv[1:])
pid_file = os.environ.get("STOCK_LAUNCHER_PID_FILE")
if pid_file:
    with open(pid_file + ".part", "w") as stream:
        stream.write(f"{os.getpid()} {child.pid}\n")
    os.replace(pid_file + ".part", pid_file)  # whole or absent for a reader
sys.exit(child.wait())
