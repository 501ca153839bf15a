"""Fuzz target ``server``: the file server fed malformed and adversarial sessions.

Each case builds a small sandbox -- an export directory (files, a
subdirectory, a FIFO, links inside, a relative link with ``..`` that stays
inside, links pointing outside) next to an ``outside`` directory holding a
secret -- and a fresh :class:`~pyxen9p.p9.server.FileServer` on the export.
One to three sessions then send 10 to 80 requests between them, interleaved:
every T-message type, with fids drawn mostly from those the session attached
or walked (and also unknown, reused, ``NOFID`` and huge ones), names that try
to leave (``..``, ``/``, ``a/b``, NUL, long, not UTF-8, links that point
outside), huge counts, offsets and lengths, random tags and flags; about one
request in twelve is mutated on the wire (see :mod:`fuzz.codec_target`),
some so that their framing is broken.  A session may be closed mid-case and
another opened.  In a quarter of the cases, 2 or 3 threads send at once on
1 or 2 sessions whose fids they share (a Tversion or Tclunk of one racing
another's use of the fid).

Checks, per request: ``handle`` answers every well-framed request within
10 s (a Tflush may wait for the request it flushes) (raising
:class:`~pyxen9p.p9.codec.ProtocolError` only for broken framing) with one
reply that decodes, carries the request's tag and the request's reply type
or Rlerror, fits the negotiated msize, never contains the outside secret and
names no outside file in any qid; and the server logs no internal error.
Per case: once the sessions are closed the process holds exactly the
descriptors it held before plus the server's root, none after the server is
closed, and nothing outside the export changed.

Links: what the server's ``confined`` rule forbids fails the case (a new
link whose own target leaves the export, a link moved to where it resolves
outside, a hard link of an outside-pointing link).  What the rule allows is
counted by class (an outside-pointing link renamed, a new link reaching
outside through a link that was there before).  ``Worker(strict_links=True)``
fails those too.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
import tempfile
import threading
import time
import traceback
from collections import Counter
from typing import Any

from fuzz.codec_target import fields_of, integer, mutate
from pyxen9p.p9 import codec as c
from pyxen9p.p9.server import FileServer, Session

SECRET = b"PYXEN9P-FUZZ-OUTSIDE-SECRET"
#: Classes of links found resolving outside the export (see
#: :meth:`Sandbox.links_leaving`); only the first fails a case by default.
NEW_LINK_OUT = "new link whose own target leaves the export"
MOVED_OUT = "link renamed so that it resolves outside"
OUT_LINK_COPIED = "outside-pointing link hard-linked"
OUT_LINK_RENAMED = "outside-pointing link renamed"
CHAINED_OUT = "new link reaching outside through an existing link"
REQUESTS = [cls for t, cls in sorted(c.message_classes().items()) if t % 2 == 0]
#: relative weights of the request types (default 6); Tversion is rare, as
#: it clunks every fid of its session
WEIGHTS = {
    c.Twalk: 28,
    c.Tlopen: 16,
    c.Tread: 16,
    c.Twrite: 12,
    c.Tclunk: 12,
    c.Treaddir: 12,
    c.Tgetattr: 10,
    c.Tlcreate: 10,
    c.Trenameat: 10,
    c.Tunlinkat: 8,
    c.Tattach: 6,
    c.Tsetattr: 8,
    c.Tversion: 1,
    c.Tauth: 1,
    c.Txattrwalk: 2,
    c.Txattrcreate: 2,
}
#: requests that need an open fid
OPEN_FID = (c.Tread, c.Twrite, c.Treaddir, c.Tfsync, c.Tlock, c.Tgetlock)
FID_FIELDS = {"fid", "dfid", "dirfd", "olddirfid", "newdirfid"}
NAMES = [
    "a.txt",
    "dir",
    "sub",
    "b.txt",
    "fifo",
    "link_in",
    "link_out",
    "abs_out",
    "up",
    "new",
    "new2",
    "n\u00e9",
    "..",
    ".",
    "",
    "/",
    "a/b",
    "../outside",
    "x\0y",
    "outside",
    "secret.txt",
    "x" * 255,
    "y" * 300,
    b"\xff\xfe".decode("utf-8", "surrogateescape"),
]
WALK = ["dir", "sub", "..", ".", "link_out", "link_in", "abs_out", "up", "a.txt", "new", "fifo"]
COUNTS = [0, 1, 7, 100, 4096, 8192, 65536, 0x7FFFFFFF, 0xFFFFFFFF]
OFFSETS = [0, 1, 5, 4096, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
MSIZES = [0, 1, 7, 4095, 4096, 8192, 65536, 1 << 20, 0xFFFFFFFF]


class Sandbox:
    """A directory holding the export and, next to it, what must stay out of reach."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pyxen9p-fuzz-")
        self.export = os.path.join(self.base, "export")
        self.outside = os.path.join(self.base, "outside")
        os.mkdir(self.outside)
        os.mkdir(os.path.join(self.outside, "d"))
        with open(os.path.join(self.outside, "secret.txt"), "wb") as f:
            f.write(SECRET * 4)
        self.outside_inodes = {
            os.stat(p).st_ino
            for p in (
                self.base,
                self.outside,
                os.path.join(self.outside, "d"),
                os.path.join(self.outside, "secret.txt"),
            )
        }
        self.outside_view = self.snapshot()

    def fresh_export(self) -> None:
        """(Re)create the export's initial tree."""
        if os.path.lexists(self.export):
            shutil.rmtree(self.export)
        e = self.export
        os.mkdir(e)
        os.makedirs(os.path.join(e, "dir", "sub"))
        with open(os.path.join(e, "a.txt"), "wb") as f:
            f.write(b"hello from the export\n" * 10)
        with open(os.path.join(e, "dir", "b.txt"), "wb") as f:
            f.write(b"b" * 5000)
        os.mkfifo(os.path.join(e, "fifo"))
        os.symlink("a.txt", os.path.join(e, "link_in"))
        os.symlink("../outside", os.path.join(e, "link_out"))
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(e, "abs_out"))
        os.symlink("../a.txt", os.path.join(e, "dir", "up"))
        self.initial_links = self.links()

    def snapshot(self) -> dict[str, tuple[int, int, int, bytes]]:
        """Everything in the sandbox but the export: name -> mode, size, mtime, content."""
        view: dict[str, tuple[int, int, int, bytes]] = {}
        for top, dirs, files in os.walk(self.base):
            if top == self.base:
                dirs[:] = [d for d in dirs if d != "export"]
                files = [f for f in files if f != "export"]
            for name in dirs + files:
                path = os.path.join(top, name)
                st = os.lstat(path)
                data = b""
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        data = f.read()
                view[os.path.relpath(path, self.base)] = (
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    data,
                )
        return view

    def links(self) -> dict[str, tuple[int, str]]:
        """Symbolic links in the export: relative path -> (inode, target)."""
        out = {}
        for top, dirs, files in os.walk(self.export):
            for name in dirs + files:
                path = os.path.join(top, name)
                if os.path.islink(path):
                    out[os.path.relpath(path, self.export)] = (
                        os.lstat(path).st_ino,
                        os.readlink(path),
                    )
        return out

    def _outside(self, path: str) -> bool:
        return not (path + "/").startswith(self.export + "/")

    def links_leaving(self) -> list[tuple[str, str]]:
        """Links that resolve outside the export and did not at the start.

        :returns: ``(class, description)`` pairs; the classes are
            :data:`NEW_LINK_OUT` (a new link whose own target leaves the
            export: the ``confined`` policy forbids it), :data:`MOVED_OUT`
            (a link that resolved inside, renamed to where it resolves
            outside), :data:`OUT_LINK_COPIED` (a link that already pointed
            outside, given a second name by a hard link),
            :data:`OUT_LINK_RENAMED` (such a link renamed) and
            :data:`CHAINED_OUT` (a new link that reaches outside through a
            link that was there before)
        """
        found = []
        now = self.links()
        for rel, (ino, target) in now.items():
            where = os.path.dirname(os.path.join(self.export, rel))
            own_out = self._outside(os.path.normpath(os.path.join(where, target)))
            if not own_out and not self._outside(os.path.realpath(os.path.join(self.export, rel))):
                continue
            places = [r for r, (i, t) in self.initial_links.items() if (i, t) == (ino, target)]
            if rel in places:
                continue  # there from the start
            text = f"{rel} -> {target}"
            if places:
                first = os.path.dirname(os.path.join(self.export, places[0]))
                if self._outside(os.path.normpath(os.path.join(first, target))):
                    linked = any(now.get(p, (None, None))[0] == ino for p in places)
                    found.append((OUT_LINK_COPIED if linked else OUT_LINK_RENAMED, text))
                else:
                    found.append((MOVED_OUT, f"{text} (was {places[0]})"))
            else:
                found.append((NEW_LINK_OUT if own_out else CHAINED_OUT, text))
        return found

    def close(self) -> None:
        """Remove the sandbox."""
        shutil.rmtree(self.base, ignore_errors=True)


def open_fds() -> set[int]:
    """This process's open descriptors."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        fds.add(fd)
    return fds


class _Errors(logging.Handler):
    """Collects log records at ERROR or above (the server's internal failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Client:
    """What the generator knows about one session."""

    def __init__(self, session: Session, *, threaded: bool = False) -> None:
        self.session = session
        #: other threads use the session too (its msize may change under us)
        self.threaded = threaded
        self.fids: list[int] = []
        self.opened: list[int] = []
        self.tag = 0


def _fid(rng: random.Random, client: _Client) -> int:
    if client.fids and rng.random() < 0.8:
        return rng.choice(client.fids)
    return rng.choice([0, 1, 2, 3, 99, c.NOFID, 0xFFFFFFFE, integer(rng, "u32")])


def _newfid(rng: random.Random, client: _Client) -> int:
    if client.fids and rng.random() < 0.15:
        return rng.choice(client.fids)  # already in use
    if rng.random() < 0.03:
        return rng.choice([c.NOFID, integer(rng, "u32")])
    return (max(client.fids, default=0) + 1) & 0xFFFFFFFF


def _name(rng: random.Random) -> str:
    if rng.random() < 0.9:
        return rng.choice(NAMES)
    return integer_name(rng)


def integer_name(rng: random.Random) -> str:
    """A short random printable name."""
    return "".join(rng.choice("abcdef.-_") for _ in range(rng.randrange(1, 12)))


def _field(rng: random.Random, cls: type[c.Message], name: str, kind: str, cl: _Client) -> Any:
    if name == "fid" and cls in OPEN_FID and cl.opened and rng.random() < 0.85:
        return rng.choice(cl.opened)
    if name in FID_FIELDS:
        return _fid(rng, cl)
    if name == "newfid" or (cls is c.Tattach and name == "fid"):
        return _newfid(rng, cl)
    if name == "afid":
        return c.NOFID if rng.random() < 0.9 else _fid(rng, cl)
    if name == "wnames":
        n = rng.choice([0, 1, 1, 2, 3, rng.randrange(17)])
        return tuple(rng.choice(WALK) if rng.random() < 0.85 else _name(rng) for _ in range(n))
    if name in ("name", "oldname", "newname"):
        return _name(rng)
    if name == "symtgt":
        return rng.choice(
            [
                "a.txt",
                "sub",
                "../a.txt",
                "../../outside",
                "/etc",
                "x/../..",
                "",
                "a\0b",
                "b.txt",
                "link_out/secret.txt",
                "abs_out",
                "dir/up",
                "up",
            ]
        )
    if name == "aname":
        return rng.choice(["", "/", "/etc", "..", "export", "/tmp"])
    if name == "version":
        return rng.choice(["9P2000.L"] * 5 + ["9P2000", "9P2000.u", "", "9P2000.Lx"])
    if name == "msize":
        return rng.choice(MSIZES)
    if name == "count":
        return rng.choice(COUNTS)
    if name in ("offset", "start", "length", "size", "attr_size"):
        return rng.choice(OFFSETS) if rng.random() < 0.7 else integer(rng, "u64")
    if name == "flags":
        if cls in (c.Tlopen, c.Tlcreate):
            flags = rng.choice([c.L_O_RDONLY, c.L_O_WRONLY, c.L_O_RDWR, c.L_O_RDWR, c.L_O_NOACCESS])
            for bit in (
                c.L_O_CREAT,
                c.L_O_EXCL,
                c.L_O_TRUNC,
                c.L_O_APPEND,
                c.L_O_DIRECTORY,
                c.L_O_NOFOLLOW,
                c.L_O_NONBLOCK,
            ):
                if rng.random() < 0.15:
                    flags |= bit
            return flags
        if cls is c.Tunlinkat:
            return rng.choice([0, c.AT_REMOVEDIR, 1, 0xFFFFFFFF])
        return integer(rng, kind)
    if name == "mode":
        kind_bits = rng.choice(
            [
                0,
                stat.S_IFREG,
                stat.S_IFIFO,
                stat.S_IFDIR,
                stat.S_IFCHR,
                stat.S_IFBLK,
                stat.S_IFSOCK,
                stat.S_IFLNK,
            ]
        )
        return kind_bits | rng.choice([0o644, 0o755, 0o7777, 0o4755, 0o2755, 0])
    if name == "valid":
        return rng.randrange(1 << 9) if rng.random() < 0.9 else integer(rng, "u32")
    if name == "data":
        return rng.randbytes(rng.choice([0, 1, 10, 500, 3000]))
    if name in ("uname", "client_id"):
        return rng.choice(["root", "", "x" * 300])
    if name == "oldtag":
        return rng.choice([0, 1, cl.tag, c.NOTAG, integer(rng, "u16")])
    if name == "type" and cls in (c.Tlock, c.Tgetlock):
        return rng.choice([0, 1, 2, 3, 255])
    if kind == "s":
        return _name(rng)
    if kind in ("u8", "u16", "u32", "u64", "i64"):
        return integer(rng, kind)
    raise AssertionError(f"no generator for {cls.__name__}.{name} ({kind})")


def request(rng: random.Random, client: _Client) -> c.Message:
    """A random request for *client*'s session."""
    cls = rng.choices(REQUESTS, [WEIGHTS.get(t, 6) for t in REQUESTS])[0]
    client.tag = (client.tag + 1) % 0xFFFF
    tag = client.tag if rng.random() < 0.95 else rng.choice([0, c.NOTAG, integer(rng, "u16")])
    if cls is c.Tversion:
        tag = c.NOTAG if rng.random() < 0.8 else tag
    values = [_field(rng, cls, name, kind, client) for name, kind in fields_of(cls)]
    return cls(tag, *values)


#: What the server's ``confined`` link rule forbids (its module docstring):
#: a new link whose target leaves the export, a link moved to where it
#: resolves outside, a hard link of a link that points outside.  A link that
#: already pointed outside may still be renamed, and a new confined link may
#: reach outside through a link the host made: those are counted.
_NEVER = frozenset({NEW_LINK_OUT, MOVED_OUT, OUT_LINK_COPIED})


class Worker:
    """Plays server cases in one sandbox (the export is rebuilt for each case)."""

    def __init__(self, *, strict_links: bool = False) -> None:
        self.sandbox = Sandbox()
        self.strict_links = strict_links
        self.notes: Counter[str] = Counter()

    def case(self, rng: random.Random) -> str:
        """One case; returns its kind (``sessions:N``)."""
        box = self.sandbox
        box.fresh_export()
        errors = _Errors()
        logger = logging.getLogger("pyxen9p")
        logger.addHandler(errors)
        before = open_fds()
        server = FileServer(box.export, msize=rng.choice([4096, 8192, 65536]))
        try:
            kind = self._play(rng, server, errors)
            after_sessions = open_fds()
        finally:
            server.close()
            logger.removeHandler(errors)
        after = open_fds()
        assert not errors.records, [r.getMessage() for r in errors.records]
        assert len(after_sessions - before) <= 1, (
            f"descriptors left by closed sessions: {sorted(after_sessions - before)}"
        )
        assert after == before, f"descriptors left by the server: {sorted(after - before)}"
        assert box.snapshot() == box.outside_view, "something outside the export changed"
        leaving = box.links_leaving()
        for what, _text in leaving:
            self.notes[what] += 1
        failing = [x for x in leaving if self.strict_links or x[0] in _NEVER]
        assert not failing, f"links resolving outside the export: {failing}"
        return kind

    def _play(self, rng: random.Random, server: FileServer, errors: _Errors) -> str:
        if rng.random() < 0.25:
            return self._play_threads(rng, server)
        clients = [_Client(server.session()) for _ in range(rng.randrange(1, 4))]
        for cl in clients:
            self._setup(rng, cl)
        for _ in range(rng.randrange(10, 81)):
            if rng.random() < 0.02:
                old = rng.choice(clients)
                old.session.close()
                self._exchange(rng, old, request(rng, old))  # a closed session answers too
                clients.remove(old)
                fresh = _Client(server.session())
                self._setup(rng, fresh)
                clients.append(fresh)
            cl = rng.choice(clients)
            if (cl.session.msize == 0 or not cl.fids) and rng.random() < 0.8:
                self._setup(rng, cl)  # start over, as a client would
            self._exchange(rng, cl, request(rng, cl))
        for cl in clients:
            cl.session.close()
        return f"sessions:{len(clients)}"

    def _play_threads(self, rng: random.Random, server: FileServer) -> str:
        """2 or 3 threads at once on 1 or 2 sessions, sharing their fids."""
        sessions = [server.session() for _ in range(rng.randrange(1, 3))]
        fids: dict[Session, list[int]] = {}
        for session in sessions:
            cl = _Client(session)
            self._exchange(rng, cl, c.Tversion(c.NOTAG, 65536, "9P2000.L"))
            self._exchange(rng, cl, c.Tattach(1, 1, c.NOFID, "root", "", c.NONUNAME))
            for fid, names in enumerate([("dir",), ("a.txt",), ("dir", "b.txt"), ("dir", "sub")]):
                self._exchange(rng, cl, c.Twalk(2, 1, fid + 2, names))
            fids[session] = cl.fids
        seeds = [rng.randrange(1 << 32) for _ in range(rng.randrange(2, 4))]
        problems: list[str] = []

        def run(index: int) -> None:
            trng = random.Random(seeds[index])
            session = trng.choice(sessions)
            cl = _Client(session, threaded=True)
            cl.fids = list(fids[session])
            cl.tag = index * 20000
            try:
                for _ in range(trng.randrange(10, 61)):
                    self._exchange(trng, cl, request(trng, cl))
            except Exception:
                problems.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert not problems, problems[0]
        for session in sessions:
            session.close()
        return f"threads:{len(threads)}"

    def _setup(self, rng: random.Random, cl: _Client) -> None:
        if cl.session.msize == 0 and rng.random() < 0.95:
            self._exchange(rng, cl, c.Tversion(c.NOTAG, rng.choice([8192, 65536]), "9P2000.L"))
        if rng.random() < 0.95:
            fid = _newfid(rng, cl)
            self._exchange(rng, cl, c.Tattach(1, fid, c.NOFID, "root", "", c.NONUNAME))

    def _exchange(self, rng: random.Random, cl: _Client, msg: c.Message) -> None:
        frame = c.encode(msg)
        if rng.random() < 0.08:
            _how, frame = mutate(rng, frame)
        framed = len(frame) >= 7 and int.from_bytes(frame[:4], "little") == len(frame)
        msize = 0 if cl.threaded else cl.session.msize
        start = time.monotonic()
        try:
            reply = cl.session.handle(frame)
        except c.ProtocolError:
            assert not framed, f"a well-framed request was not answered: {frame.hex()}"
            return
        took = time.monotonic() - start
        self.notes["requests answered"] += 1
        if not isinstance(msg, c.Tflush):  # Tflush waits for the request it flushes
            assert took < 10, f"{msg!r} took {took:.1f} s"
        assert framed, f"a badly framed request got a reply: {frame.hex()}"
        _size, mtype, tag = c.peek_header(frame)
        answer = c.decode(reply)
        assert answer.tag == tag, (msg, answer)
        expected = {c.MessageType.RLERROR}
        if mtype % 2 == 0 and mtype in c.message_classes():
            expected.add(mtype + 1)
        assert answer.TYPE in expected, (msg, answer)
        if isinstance(msg, c.Tremove):  # clunked whatever the outcome
            for pool in (cl.fids, cl.opened):
                while msg.fid in pool:
                    pool.remove(msg.fid)
        if msize and mtype != c.MessageType.TVERSION:
            assert len(reply) <= msize, f"{len(reply)}-byte reply over msize {msize}: {msg!r}"
        assert SECRET not in reply, f"the outside secret leaked: {msg!r} -> {answer!r}"
        self._check_qids(msg, answer)
        if isinstance(answer, c.Rlerror):
            assert answer.ecode > 0, answer
            if answer.ecode == errno.EIO and not cl.session.closed:
                self.notes["EIO answers"] += 1
            return
        if isinstance(answer, (c.Rattach, c.Rwalk)):
            new = msg.fid if isinstance(msg, c.Tattach) else getattr(msg, "newfid", None)
            if new is not None and new not in cl.fids:
                cl.fids.append(new)
        elif isinstance(answer, (c.Rlopen, c.Rlcreate)):
            cl.opened.append(getattr(msg, "fid", 0))
        elif isinstance(answer, (c.Rclunk, c.Rremove)) and rng.random() < 0.8:
            fid = getattr(msg, "fid", None)
            for pool in (cl.fids, cl.opened):
                while fid in pool:
                    pool.remove(fid)
        elif isinstance(answer, c.Rversion):
            cl.fids.clear()
            cl.opened.clear()

    def _check_qids(self, msg: c.Message, answer: c.Message) -> None:
        qids: list[c.Qid] = []
        for name in ("qid", "aqid"):
            value = getattr(answer, name, None)
            if isinstance(value, c.Qid):
                qids.append(value)
        qids.extend(getattr(answer, "wqids", ()))
        if isinstance(answer, c.Rreaddir):
            qids.extend(e.qid for e in c.parse_dirents(answer.data))
        outside = {q.path for q in qids} & self.sandbox.outside_inodes
        assert not outside, f"a qid of a file outside the export: {msg!r} -> {answer!r}"

    def close(self) -> None:
        """Remove the sandbox."""
        self.sandbox.close()
