"""Guest entry of the real-Xen lab: runs in dom0, started by the baked unit.

``/usr/local/sbin/pyxen9p-guest-boot`` (baked into the image) mounts the
project tree read-only and the results folder writable, then runs this file
from the tree, so it is always the current version.  It reads
``request.json`` from the results folder (written by ``tests/xen/run.py``),
records the environment, runs Debian's pytest on the requested guest test
files with ``PYTHONPATH`` pointing at the shared tree, and writes
``junit.xml``, ``pytest.log``, ``exitcode`` and ``diag/`` into the results
folder.  Lines starting with ``PYXEN9P-GUEST:`` go to the console, where the
host follows them.

Standard library only (it runs on Debian 12's Python 3.11).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MARK = "PYXEN9P-GUEST:"


def say(message: str) -> None:
    """Print a marker line on the console (the unit's stdout)."""
    print(f"{MARK} {message}", flush=True)


def capture(cmd: list[str], out: Path, timeout: float = 30.0) -> None:
    """Run *cmd* and save its output to *out* (failures are recorded, not raised)."""
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
        text = res.stdout + (f"\n[stderr]\n{res.stderr}" if res.stderr else "")
        text += f"\n[exit {res.returncode}]\n"
    except (OSError, subprocess.TimeoutExpired) as exc:
        text = f"[failed: {exc}]\n"
    out.write_text(text)


QUICK_DIAG = {
    "uname": ["uname", "-a"],
    "xl-info": ["xl", "info"],
    "xl-list": ["xl", "list"],
    "lsmod": ["lsmod"],
    "ps": ["ps", "-eo", "pid,ppid,etimes,args"],
}
FULL_DIAG = {
    **QUICK_DIAG,
    "dmesg": ["dmesg"],
    "xl-dmesg": ["xl", "dmesg"],
    "xenstore-ls": ["xenstore-ls", "-fp"],
    "journal": ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
    "failed-units": ["systemctl", "--failed", "--no-pager"],
    "systemd-blame": ["systemd-analyze", "blame", "--no-pager"],
    "qemu-dom0-log": ["tail", "-n", "400", "/var/log/xen/qemu-dom0-pyxen9p.log"],
}


def collect_diag(diag: Path, when: str, commands: dict[str, list[str]]) -> None:
    """Save what helps to understand a failure: Xen, dom0 and service state."""
    diag.mkdir(exist_ok=True)
    for name, cmd in commands.items():
        capture(cmd, diag / f"{when}-{name}.txt")


def run_pytest(
    cmd: list[str], env: dict[str, str], log_path: Path, timeout: float
) -> int:
    """Run pytest, echoing its output to the console and *log_path*.

    :returns: pytest's exit code, or 124 if it was stopped after *timeout*
    """
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd="/tmp",
        )

        def stop() -> None:
            timed_out.set()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()
            proc.wait()
        finally:
            timer.cancel()
        if timed_out.is_set():
            message = f"\n[entry] pytest stopped after the {timeout:.0f}s test timeout\n"
            log.write(message)
            sys.stdout.write(message)
            return 124
    return proc.returncode


def main() -> int:
    """Run the requested guest tests; always writes ``exitcode``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    src: Path = args.src
    res: Path = args.results
    guest = src / "tests" / "xen" / "guest"
    code_file = res / "exitcode"
    try:
        request = json.loads((res / "request.json").read_text())
    except (OSError, ValueError) as exc:
        say(f"cannot read request.json: {exc}")
        code_file.write_text("3\n")
        return 3
    diag = res / "diag"
    collect_diag(diag, "before", QUICK_DIAG)
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(src), str(guest)]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYXEN9P_REQUIRE_PEERS": "1",
            "PYXEN9P_REALXEN": "1",
            "PYXEN9P_SRC": str(src),
            "PYXEN9P_RESULTS": str(res),
            "PYXEN9P_RELEASE": str(request.get("release", "")),
            "HOME": "/root",
            "LC_ALL": "C.UTF-8",
        }
    )
    ini = guest / "pytest.ini"
    cmd = [
        sys.executable, "-m", "pytest",
        "-c", str(ini), "--rootdir", str(guest), "--confcutdir", str(guest),
        "-p", "no:cacheprovider",
        f"--junitxml={res / 'junit.xml'}",
        "-o", f"timeout={request.get('per_test_timeout', 180)}",
        *request.get("pytest_args", []),
        *(str(src / name) for name in request["files"]),
    ]  # fmt: skip
    say(f"pytest started: groups {','.join(request.get('groups', []))}")
    started = time.monotonic()
    rc = run_pytest(cmd, env, res / "pytest.log", float(request.get("test_timeout", 900)))
    say(f"pytest finished rc={rc} in {time.monotonic() - started:.1f}s")
    code_file.write_text(f"{rc}\n")
    short = {"dmesg": ["dmesg"], "xl-dmesg": ["xl", "dmesg"]}
    collect_diag(diag, "after", FULL_DIAG if rc else short)
    os.sync()
    return rc


if __name__ == "__main__":
    sys.exit(main())
