"""``pyxen9p demo``: the whole stack on a sample directory, with checks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import pyxen9p
from pyxen9p._progress import format_duration, format_size
from pyxen9p._version import __version__
from pyxen9p.cli._common import (
    EXIT_FAILURE,
    PROG,
    CommandError,
    UsageError,
    _Command,
    _Context,
    _only_device,
    _selection,
    log,
)
from pyxen9p.cli.files import _long_lines, _rmtree
from pyxen9p.cli.info import _connection_report, _rings

if TYPE_CHECKING:
    from pyxen9p.p9.client import Client


def _sample_files() -> dict[str, bytes]:
    rng = random.Random(9)
    csv = "n,square,cube\n" + "".join(f"{n},{n * n},{n ** 3}\n" for n in range(1, 3001))
    return {
        "hello.txt": (
            b"Hello from pyxen9p!\n"
            b"This text travelled as 9P2000.L messages over Xen 9pfs shared rings.\n"
        ),
        "README.txt": b"A sample share made by 'pyxen9p demo'.\n",
        "data/numbers.csv": csv.encode(),
        "data/random.bin": rng.randbytes(4 * 1024 * 1024 + 12345),
        "data/empty": b"",
        "data/deeper/notes.md": b"# Notes\n\n* nested directories are copied too\n",
    }


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(root: str) -> dict[str, str]:
    """``relative path -> "dir" | "link:<target>" | "sha256:<hex>"`` for a local tree."""
    digest: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                digest[rel] = "link:" + os.readlink(full)
            elif os.path.isdir(full):
                digest[rel] = "dir"
            else:
                digest[rel] = "sha256:" + _sha256_file(full)
    return digest


class _Demo:
    """The steps of ``pyxen9p demo``, each printed and checked."""

    def __init__(self, ctx: _Context, workdir: str) -> None:
        self.ctx = ctx
        self.workdir = workdir
        self.share_dir = os.path.join(workdir, "share")
        self.checks = 0
        self.failures: list[str] = []
        self.step_no = 0

    def say(self, text: str = "") -> None:
        if not self.ctx.quiet:
            self.ctx.print(text)

    def step(self, title: str) -> None:
        self.step_no += 1
        self.say(f"[{self.step_no}] {title}")

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if ok:
            self.say(f"      ok: {what}")
        else:
            self.failures.append(what)
            self.ctx.print(f"      FAILED: {what}")

    def compare(self, expected: dict[str, str], got: dict[str, str], what: str) -> None:
        if expected == got:
            files = sum(1 for v in got.values() if v.startswith("sha256:"))
            self.check(True, f"{what}: {files} files, every sha256 and link target matches")
            return
        differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        self.check(False, f"{what}: differs at {', '.join(differ[:5])}")

    def run(self) -> None:
        ctx = self.ctx
        samples = _sample_files()
        self.step("A sample directory to share")
        for rel, data in samples.items():
            path = os.path.join(self.share_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        os.symlink("data/numbers.csv", os.path.join(self.share_dir, "latest.csv"))
        total = sum(len(d) for d in samples.values())
        self.say(f"      {self.share_dir}: {len(samples)} files ({format_size(total)}),"
                 " 2 subdirectories, 1 symbolic link")

        self.step("Serve it through a simulated Xen and connect through the whole stack")
        self.say("      (simulated XenStore, grant tables and event channels; the real frontend,")
        self.say("      rings and 9P2000.L client; a QEMU-like backend and a 9P file server)")
        started = time.monotonic()
        with pyxen9p.connect(
            simulate=self.share_dir, tag="demo", **ctx.connect_options()
        ) as fs:
            fs.timeout = ctx.args.timeout
            info = _connection_report(fs)
            self.say(f"      connected in {time.monotonic() - started:.2f} s by tag 'demo'")
            self.say(f"      frontend {info['frontend_path']}")
            self.say(f"      backend  {info['backend_path']} (domain {info['backend_id']})")
            self.say(f"      backend offers versions"
                     f" {', '.join(map(str, info['backend_versions']))},"
                     f" max-rings {info['backend_max_rings']},"
                     f" max-ring-page-order {info['backend_max_ring_order']}")
            self.say(f"      negotiated {_rings(info['rings'])} of order {info['ring_order']}"
                     f" ({format_size(info['ring_bytes_each_way'])} each way,"
                     f" {info['grants']} grants)")
            self.say(f"      {info['version']} session, msize {info['msize']}")
            self.check(info["version"] == "9P2000.L" and info["msize"] >= 4096,
                       "9P2000.L session established")
            self.session(fs, samples)

    def session(self, fs: Client, samples: dict[str, bytes]) -> None:
        self.step("ls -l /")
        rows = []
        for entry in sorted(fs.scandir("/"), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            rows.append((entry.name, st, fs.readlink(entry.path) if entry.is_symlink() else None))
        for line in _long_lines(rows):
            self.say(f"      {line}")
        self.check(sorted(fs.listdir("/")) == ["README.txt", "data", "hello.txt", "latest.csv"],
                   "the listing matches the directory")

        self.step("cat /hello.txt")
        text = fs.read_text("hello.txt")
        for line in text.splitlines():
            self.say(f"      | {line}")
        mismatched = [
            rel for rel, data in samples.items()
            if hashlib.sha256(fs.read_bytes(rel)).digest() != hashlib.sha256(data).digest()
        ]
        self.check(not mismatched, f"read all {len(samples)} files through 9P; every sha256"
                   " matches the local file" + (f" except {mismatched}" if mismatched else ""))
        self.check(fs.read_bytes("latest.csv") == samples["data/numbers.csv"],
                   "the symbolic link latest.csv resolves to data/numbers.csv")

        self.step("Write through 9P: mkdir /made-by-9p, write a file, rename it")
        payload = random.Random(4).randbytes(300_000)
        fs.mkdir("made-by-9p")
        fs.write_bytes("made-by-9p/draft.bin", payload)
        fs.rename("made-by-9p/draft.bin", "made-by-9p/final.bin")
        local = os.path.join(self.share_dir, "made-by-9p", "final.bin")
        with open(local, "rb") as f:
            on_disk = f.read()
        self.check(on_disk == payload and not os.path.exists(local.replace("final", "draft")),
                   f"{format_size(len(payload))} written and renamed; the local file is identical")

        self.step("get -r / : copy the whole share out")
        out = os.path.join(self.workdir, "copied-out")
        started = time.monotonic()
        with self.ctx.progress("get -r /") as bar:
            n = fs.copy_out("/", out, progress=bar)
        took = time.monotonic() - started
        self.say(f"      {format_size(n)} in {took:.2f} s ({format_size(n / max(took, 1e-9))}/s)")
        self.compare(_tree_digest(self.share_dir), _tree_digest(out), "copied tree")

        self.step("put -r : copy it back in as /roundtrip")
        started = time.monotonic()
        with self.ctx.progress("put -r roundtrip") as bar:
            n = fs.copy_in(out, "roundtrip", progress=bar)
        took = time.monotonic() - started
        self.say(f"      {format_size(n)} in {took:.2f} s ({format_size(n / max(took, 1e-9))}/s)")
        self.compare(_tree_digest(out), _tree_digest(os.path.join(self.share_dir, "roundtrip")),
                     "round trip")

        self.step("rm -r /roundtrip, then df")
        _rmtree(fs, "roundtrip")
        self.check(not os.path.exists(os.path.join(self.share_dir, "roundtrip"))
                   and not fs.exists("roundtrip"), "the tree is gone, on both sides")
        sfs = fs.statfs()
        self.say(f"      {format_size(sfs.blocks * sfs.bsize)} file system,"
                 f" {format_size(sfs.bavail * sfs.bsize)} available, names up to"
                 f" {sfs.namelen} bytes")


def _real_share() -> dict[str, Any] | None:
    """The one 9pfs device of this domain on a real Xen, or ``None`` without one."""
    if not os.path.exists("/proc/xen") and not os.path.exists("/dev/xen"):
        return None
    try:
        return _only_device()
    except CommandError as exc:
        log.info("no real 9pfs share for the demo: %s", exc)
        return None


def _real_demo(ctx: _Context, selection: dict[str, Any]) -> None:
    """The demo on a real Xen share: read only, nothing is written to the share."""
    started = time.monotonic()
    ctx.print(f"pyxen9p {__version__} demo: a real Xen 9pfs share (read only)")
    with pyxen9p.connect(**selection, **ctx.connect_options()) as fs:
        fs.timeout = ctx.args.timeout
        info = _connection_report(fs)
        ctx.print(f"  frontend {info['frontend_path']}, backend {info['backend_path']}"
                  f" (domain {info['backend_id']})")
        ctx.print(f"  negotiated {_rings(info['rings'])} of order {info['ring_order']},"
                  f" 9P2000.L msize {fs.msize}")
        entries = sorted(fs.scandir("/"), key=lambda e: e.name)
        ctx.print(f"  / holds {len(entries)} entries")
        read = total = 0
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and read < 5:
                data = fs.read_bytes(entry.name)
                digest = hashlib.sha256(data).hexdigest()[:16]
                ctx.print(f"    {entry.name}: {format_size(len(data))}, sha256 {digest}...")
                read += 1
                total += len(data)
            elif entry.is_dir(follow_symlinks=False):
                ctx.print(f"    {entry.name}/")
        st = fs.statfs("/")
        ctx.print(f"  read {read} files ({format_size(total)}); file system of"
                  f" {format_size(st.blocks * st.bsize)}")
    ctx.print(f"demo passed on real Xen in {time.monotonic() - started:.2f} s"
              " (pyxen9p demo --simulated shows the whole write path on a simulated Xen)")


def cmd_demo(ctx: _Context) -> None:
    """``demo``: on a real Xen share when this domain has one (read only),
    else the whole stack on a simulated Xen, checked end to end."""
    args = ctx.args
    if args.simulate is not None or args.readonly:
        raise UsageError("demo serves its own temporary directory: --simulate and"
                         " --readonly do not apply")
    if not args.simulated:
        selection = _selection(args) or _real_share()
        if selection:
            _real_demo(ctx, selection)
            return
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="pyxen9p-demo-")
    demo = _Demo(ctx, workdir)
    try:
        if not ctx.quiet:
            ctx.print(f"pyxen9p {__version__} demo: the whole stack over a simulated Xen")
            ctx.print("(no hypervisor, no Xen library and no compiler needed)")
            ctx.print()
        demo.run()
    finally:
        if args.keep:
            ctx.stderr.write(f"{PROG}: demo: kept {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    if demo.failures:
        ctx.print(f"demo FAILED: {len(demo.failures)} of {demo.checks} checks failed"
                  f" ({format_duration(took)})")
        ctx.status = EXIT_FAILURE
    else:
        if not ctx.quiet:
            ctx.print()
        ctx.print(f"demo passed: {demo.checks} checks in {took:.2f} s")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (its path is printed)")
    p.add_argument("--simulated", action="store_true",
                   help="use the simulated Xen even on a Xen guest with a 9pfs share")


#: The commands of this group, in the order ``--help`` lists them.
COMMANDS = (
    _Command("demo", cmd_demo, "try the whole stack on a simulated Xen",
             "Create a temporary directory with sample files, a subdirectory and a"
             " symbolic link, serve it through a simulated Xen (XenStore, grant tables,"
             " event channels in this process; the real frontend, rings and 9P client),"
             " then list, read, write, rename, copy the tree out and back, and remove it,"
             " checking every sha256.  Needs no Xen, no Xen library and no compiler."
             "  Exit status 0 if every check passed.",
             "  pyxen9p demo\n  pyxen9p demo --rings 1 --ring-order 4\n"
             "  pyxen9p demo --keep", _args_demo),
)
