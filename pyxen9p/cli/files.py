"""The commands on a share's files: ``ls``, ``cat``, ``get``, ``put``, ``stat``,
``mkdir``, ``rm``, ``rmdir``, ``mv``, ``ln``, ``chmod``, ``df``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import posixpath
import stat as stat_module
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pyxen9p._progress import format_size
from pyxen9p.cli._common import (
    UsageError,
    _args_paths,
    _Command,
    _Context,
    _each,
    _json_name,
    _octal_mode,
    _raw,
    log,
)
from pyxen9p.cli.info import _frontend_of

if TYPE_CHECKING:
    from pyxen9p.p9.client import Client


def _local_time(ns: int, fmt: str, fraction: bool = False) -> str:
    """*ns* (nanoseconds since 1970, signed) as local time in *fmt*.

    A time this system cannot represent as a date (a server may send any
    64-bit count of seconds) is shown as its count of seconds, as GNU ``ls``
    and ``stat`` do.
    """
    seconds, rest = divmod(ns, 1_000_000_000)
    try:
        local = time.localtime(seconds)
        text = time.strftime(fmt, local)
    except (OverflowError, OSError, ValueError):
        return f"{seconds}.{rest:09d}" if fraction else str(seconds)
    if fraction:
        text += f".{rest:09d}" + time.strftime(" %z", local)
    return text


def _mtime(st: os.stat_result) -> str:
    return _local_time(st.st_mtime_ns, "%Y-%m-%d %H:%M")


def _size_field(st: os.stat_result) -> str:
    if stat_module.S_ISCHR(st.st_mode) or stat_module.S_ISBLK(st.st_mode):
        return f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
    return str(st.st_size)


def _long_lines(rows: Sequence[tuple[str, os.stat_result, str | None]]) -> list[str]:
    """``ls -l`` lines for ``(name, lstat, link target)`` rows, columns aligned."""
    cells = [
        (
            stat_module.filemode(st.st_mode),
            str(st.st_nlink),
            str(st.st_uid),
            str(st.st_gid),
            _size_field(st),
            _mtime(st),
            name if target is None else f"{name} -> {target}",
        )
        for name, st, target in rows
    ]
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(5)]
    return [
        f"{c[0]} {c[1]:>{widths[1]}} {c[2]:>{widths[2]}} {c[3]:>{widths[3]}}"
        f" {c[4]:>{widths[4]}} {c[5]} {c[6]}"
        for c in cells
    ]


def _file_type(mode: int, size: int) -> str:
    if stat_module.S_ISREG(mode):
        return "regular empty file" if size == 0 else "regular file"
    for test, name in (
        (stat_module.S_ISDIR, "directory"),
        (stat_module.S_ISLNK, "symbolic link"),
        (stat_module.S_ISFIFO, "fifo"),
        (stat_module.S_ISSOCK, "socket"),
        (stat_module.S_ISCHR, "character special file"),
        (stat_module.S_ISBLK, "block special file"),
    ):
        if test(mode):
            return name
    return "unknown"


def _stat_time(ns: int) -> str:
    return _local_time(ns, "%Y-%m-%d %H:%M:%S", fraction=True)


def _join(directory: str, name: str) -> str:
    return posixpath.join(directory, name) if directory else name


def _names(path: str) -> list[str]:
    """The names of the remote *path*, with ``.`` and ``..`` resolved as the client does."""
    names: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if names:
                names.pop()
            continue
        names.append(name)
    return names


def _basename(path: str) -> str:
    """The last name of the remote *path* (``""`` for the root)."""
    names = _names(path)
    return names[-1] if names else ""


def _is_root(path: str) -> bool:
    """Whether the remote *path* names the share's root (``/``, ``//``, ``a/..``...)."""
    return not _names(path)


class _Row(NamedTuple):
    """One line of ``ls``: the name shown, its path, and what ``-l`` / ``--json`` need."""

    name: str
    path: str
    st: os.stat_result | None
    target: str | None
    d_type: int | None = None


def cmd_ls(ctx: _Context) -> None:
    """``ls``: list directories (or name files)."""
    args = ctx.args
    if args.null and args.long:
        raise UsageError("-0 prints paths only: it does not combine with -l (try --json -l)")
    fs = ctx.client()
    paths = args.paths or ["/"]
    files: list[_Row] = []
    dirs: list[str] = []
    for path in paths:
        try:
            try:
                st = fs.lstat(path)
            except OSError as exc:
                # xen-9pfsd's root has no attributes to give (see the user guide)
                if exc.errno != errno.EOPNOTSUPP or not fs.is_dir(path):
                    raise
                dirs.append(path)
                continue
            is_dir = stat_module.S_ISDIR(st.st_mode)
            if stat_module.S_ISLNK(st.st_mode) and (not args.long or path.endswith("/")):
                is_dir = fs.is_dir(path)  # a link to a directory lists the directory
            if is_dir:
                dirs.append(path)
            else:
                target = fs.readlink(path) if stat_module.S_ISLNK(st.st_mode) else None
                files.append(_Row(path, path, st, target))
        except (OSError, ValueError) as exc:
            ctx.report(exc)
    _print_entries(ctx, files)
    machine = args.json or args.null  # one record per entry: no headers, no blank lines
    headers = not machine and (bool(files) or len(paths) > 1 or args.recursive)
    first = not files
    queue = list(dirs)
    while queue:
        directory = queue.pop(0)
        if not first and not machine:
            ctx.print()
        first = False
        if headers:
            ctx.print(f"{ctx.name(directory)}:")
        try:
            entries = sorted(fs.scandir(directory), key=lambda e: e.name)
        except (OSError, ValueError) as exc:
            ctx.report(exc)
            continue
        if not args.all:
            entries = [entry for entry in entries if not entry.name.startswith(".")]
        # the links' targets asked for together (pipelined: many in flight)
        targets: dict[str, str | OSError | ValueError] = {}
        if args.long:
            links = [entry.path for entry in entries if _is_link(entry)]
            targets = dict(zip(links, fs._readlink_many(links), strict=True))
        rows: list[_Row] = []
        subdirs: list[str] = []
        for entry in entries:
            path = _join(directory, entry.name)
            try:
                if args.long:
                    st = entry.stat(follow_symlinks=False)
                    target = None
                    if entry.is_symlink():
                        found = targets.get(entry.path)
                        if found is None:  # not known a link when the targets were asked
                            found = fs.readlink(entry.path)
                        if isinstance(found, (OSError, ValueError)):
                            raise found
                        target = found
                    rows.append(_Row(entry.name, path, st, target, entry.d_type))
                else:
                    rows.append(_Row(entry.name, path, None, None, entry.d_type))
                if args.recursive and entry.is_dir(follow_symlinks=False):
                    subdirs.append(path)
            except (OSError, ValueError) as exc:
                ctx.report(exc)
        _print_entries(ctx, rows)
        queue[0:0] = subdirs  # depth first, in name order, as ls -R does


def _is_link(entry: Any) -> bool:
    """Whether the listed *entry* is a symbolic link (``False`` if that
    cannot be told: its own row reports why)."""
    try:
        return bool(entry.is_symlink())
    except (OSError, ValueError):
        return False


def _ls_record(row: _Row) -> dict[str, Any]:
    """The ``ls --json`` object of *row*."""
    from pyxen9p.p9 import codec

    if row.st is not None:
        record = _stat_record(row.path, row.st, row.target)
    else:
        kinds = {
            codec.DT_DIR: "directory", codec.DT_REG: "regular file",
            codec.DT_LNK: "symbolic link", codec.DT_FIFO: "fifo", codec.DT_SOCK: "socket",
            codec.DT_CHR: "character special file", codec.DT_BLK: "block special file",
        }  # fmt: skip
        record = {"type": kinds.get(row.d_type if row.d_type is not None else -1, "unknown")}
        _json_name(record, "path", row.path)
    _json_name(record, "name", row.name)
    return record


def _print_entries(ctx: _Context, rows: list[_Row]) -> None:
    args = ctx.args
    if args.null:
        out = ctx.binary_stdout()
        for row in rows:
            out.write(_raw(row.path) + b"\0")
    elif args.json:
        for row in rows:
            ctx.print(json.dumps(_ls_record(row), sort_keys=True))
    elif args.long:
        long_rows = [
            (ctx.name(r.name), r.st, None if r.target is None else ctx.name(r.target))
            for r in rows
            if r.st is not None
        ]
        for line in _long_lines(long_rows):
            ctx.print(line)
    else:
        for row in rows:
            ctx.print(ctx.name(row.name))


def cmd_cat(ctx: _Context) -> None:
    """``cat``: copy files to standard output."""
    fs = ctx.client()
    out = ctx.binary_stdout()

    def cat(path: str) -> None:
        with fs.open(path, "rb", buffering=0) as f:
            buf = bytearray(max(f.iounit * fs.window, 64 * 1024))
            view = memoryview(buf)
            while True:
                n = f.readinto(view)
                if not n:
                    break
                out.write(view[:n])
        out.flush()

    _each(ctx, ctx.args.paths, cat)


def cmd_get(ctx: _Context) -> None:
    """``get``: copy a remote file (or tree, with ``-r``) to the local disk."""
    fs = ctx.client()
    args = ctx.args
    remote: str = args.remote
    try:
        st = fs.stat(remote)
        if stat_module.S_ISDIR(st.st_mode) and not args.recursive:
            raise OSError(errno.EISDIR, "Is a directory (use -r to copy a tree)", remote)
        name = _basename(remote)
        local: str = args.local if args.local is not None else "."
        if os.path.isdir(local):
            if not name:
                raise UsageError("give a LOCAL name for the share's root directory")
            local = os.path.join(local, name)
        with ctx.progress(f"get {remote}") as bar:
            done = fs.copy_out(
                remote, local, progress=bar, preserve=not args.no_preserve,
                no_clobber=args.no_clobber,
            )
        log.info("get: %d bytes from %s to %s", done, remote, local)
    except (OSError, ValueError) as exc:
        _report_copy(ctx, exc)


def cmd_put(ctx: _Context) -> None:
    """``put``: copy a local file (or tree, with ``-r``) to the share."""
    fs = ctx.client()
    args = ctx.args
    local: str = args.local
    try:
        st = os.stat(local)
        if stat_module.S_ISDIR(st.st_mode) and not args.recursive:
            raise OSError(errno.EISDIR, "Is a directory (use -r to copy a tree)", local)
        name = os.path.basename(os.path.abspath(local))
        remote: str = args.remote if args.remote is not None else "/"
        if fs.is_dir(remote):
            remote = _join(remote, name)
        with ctx.progress(f"put {local}") as bar:
            done = fs.copy_in(
                local, remote, progress=bar, preserve=not args.no_preserve,
                no_clobber=args.no_clobber,
            )
        log.info("put: %d bytes from %s to %s", done, local, remote)
    except (OSError, ValueError) as exc:
        _report_copy(ctx, exc)


def _report_copy(ctx: _Context, exc: OSError | ValueError) -> None:
    """Report a failed copy: each entry a tree copy could not copy, on its own line."""
    from pyxen9p.p9.client import CopyError

    for error in exc.errors if isinstance(exc, CopyError) else [exc]:
        ctx.report(error)


def _stat_record(path: str, st: os.stat_result, target: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": _file_type(st.st_mode, st.st_size),
        "mode": st.st_mode,
        "permissions": f"{stat_module.S_IMODE(st.st_mode):04o}",
        "filemode": stat_module.filemode(st.st_mode),
        "inode": st.st_ino,
        "links": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "blocks": st.st_blocks,
        "blksize": st.st_blksize,
        "rdev": st.st_rdev,
        "atime": st.st_atime,
        "mtime": st.st_mtime,
        "ctime": st.st_ctime,
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    _json_name(record, "path", path)
    if target is not None:
        _json_name(record, "target", target)
    return record


def cmd_stat(ctx: _Context) -> None:
    """``stat``: show the attributes of files, like stat(1)."""
    fs = ctx.client()
    args = ctx.args

    def show(path: str) -> None:
        st = fs.stat(path, follow_symlinks=args.dereference)
        target = fs.readlink(path) if stat_module.S_ISLNK(st.st_mode) else None
        if args.json:
            ctx.print(json.dumps(_stat_record(path, st, target), sort_keys=True))
            return
        name = ctx.name(path) if target is None else f"{ctx.name(path)} -> {ctx.name(target)}"
        kind = _file_type(st.st_mode, st.st_size)
        ctx.print(f"  File: {name}")
        ctx.print(
            f"  Size: {st.st_size:<15} Blocks: {st.st_blocks:<10}"
            f" IO Block: {st.st_blksize:<6} {kind}"
        )
        line = f" Inode: {st.st_ino:<15} Links: {st.st_nlink}"
        if stat_module.S_ISCHR(st.st_mode) or stat_module.S_ISBLK(st.st_mode):
            line += f"    Device type: {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        ctx.print(line)
        ctx.print(
            f"Access: ({stat_module.S_IMODE(st.st_mode):04o}/{stat_module.filemode(st.st_mode)})"
            f"  Uid: ({st.st_uid:>5})   Gid: ({st.st_gid:>5})"
        )
        ctx.print(f"Access: {_stat_time(st.st_atime_ns)}")
        ctx.print(f"Modify: {_stat_time(st.st_mtime_ns)}")
        ctx.print(f"Change: {_stat_time(st.st_ctime_ns)}")

    _each(ctx, ctx.args.paths, show)


def cmd_mkdir(ctx: _Context) -> None:
    """``mkdir``: create directories."""
    fs = ctx.client()
    args = ctx.args
    mode = 0o777 if args.mode is None else args.mode

    def make(path: str) -> None:
        if args.parents:
            fs.makedirs(path, mode, exist_ok=True)
        else:
            fs.mkdir(path, mode)
        if args.mode is not None:
            fs.chmod(path, args.mode)  # exactly MODE, as mkdir -m: the umask does not apply

    _each(ctx, args.paths, make)


def _rmtree(fs: Client, top: str) -> None:
    """Remove the directory *top* and everything below it (links are not followed)."""
    fs.rmtree(top)


def cmd_rm(ctx: _Context) -> None:
    """``rm``: remove files (and trees, with ``-r``)."""
    fs = ctx.client()
    args = ctx.args

    def remove(path: str) -> None:
        if _is_root(path):
            raise OSError(errno.EBUSY, "refusing to remove the share's root directory", path)
        try:
            st = fs.lstat(path)
        except FileNotFoundError:
            if args.force:
                return
            raise
        if stat_module.S_ISDIR(st.st_mode):
            if not args.recursive:
                raise OSError(errno.EISDIR, "Is a directory (use -r to remove a tree)", path)
            _rmtree(fs, path)
        else:
            fs.remove(path)

    _each(ctx, args.paths, remove)


def cmd_rmdir(ctx: _Context) -> None:
    """``rmdir``: remove empty directories."""
    fs = ctx.client()
    _each(ctx, ctx.args.paths, fs.rmdir)


def cmd_mv(ctx: _Context) -> None:
    """``mv``: rename (or move into a directory)."""
    fs = ctx.client()
    args = ctx.args
    src: str = args.source
    dst: str = args.dest
    try:
        into = fs.is_dir(dst)
        if into and not args.no_target_directory:
            dst = _join(dst, _basename(src))
        elif dst.endswith("/") and not into and not stat_module.S_ISDIR(fs.lstat(src).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), dst)  # as rename(2)
        fs.rename(src, dst)
    except (OSError, ValueError) as exc:
        ctx.report(exc)


def cmd_ln(ctx: _Context) -> None:
    """``ln``: make a symbolic (``-s``) or hard link."""
    fs = ctx.client()
    args = ctx.args
    target: str = args.target
    link: str = args.link
    try:
        if fs.is_dir(link):
            link = _join(link, _basename(target))
        if args.symbolic:
            fs.symlink(target, link)
        else:
            fs.link(target, link)
    except (OSError, ValueError) as exc:
        ctx.report(exc)


_WHO = {"u": 0o4700, "g": 0o2070, "o": 0o1007, "a": 0o7777}

_PERM = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000}


_SHIFT = {"u": 6, "g": 3, "o": 0}


def apply_mode(spec: str, mode: int, *, is_dir: bool = False) -> int:
    """The permission bits that chmod's *spec* gives a file whose mode is *mode*.

    *spec* is octal (``755``, ``0644``, ``4755``) or symbolic, as chmod(1):
    comma-separated clauses ``[ugoa]*([-+=]([rwxXst]*|[ugo]))+`` such as
    ``u+x``, ``go-w``, ``a=r,u+w`` or ``g=u``.  Without ``u``, ``g``, ``o``
    or ``a`` a clause applies to all (the umask is not consulted).

    :param mode: the current mode (``st_mode``; only the permission bits count)
    :param is_dir: whether the file is a directory (for ``X``)
    :returns: the new permission bits (``0..0o7777``)
    :raises ValueError: *spec* is not a valid mode
    """
    if spec and all(ch in "01234567" for ch in spec):
        if len(spec) > 4:
            raise ValueError(f"invalid mode: {spec!r}")
        return int(spec, 8)
    result = stat_module.S_IMODE(mode)
    if not spec:
        raise ValueError("invalid mode: ''")
    for clause in spec.split(","):
        i = 0
        who = 0
        while i < len(clause) and clause[i] in _WHO:
            who |= _WHO[clause[i]]
            i += 1
        if who == 0:
            who = 0o7777
        if i == len(clause):
            raise ValueError(f"invalid mode: {spec!r}")
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                raise ValueError(f"invalid mode: {spec!r}")
            i += 1
            bits = 0
            if i < len(clause) and clause[i] in _SHIFT:
                triple = (result >> _SHIFT[clause[i]]) & 0o7
                bits = triple * 0o111
                i += 1
            else:
                while i < len(clause) and clause[i] in "rwxXst":
                    ch = clause[i]
                    if ch == "X":
                        if is_dir or result & 0o111:
                            bits |= 0o111
                    else:
                        bits |= _PERM[ch]
                    i += 1
            bits &= who
            if op == "+":
                result |= bits
            elif op == "-":
                result &= ~bits
            else:
                result = (result & ~who) | bits
    return result & 0o7777


def cmd_chmod(ctx: _Context) -> None:
    """``chmod``: change permission bits."""
    fs = ctx.client()
    args = ctx.args
    try:
        apply_mode(args.mode, 0)  # check the syntax once, before touching anything
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def change(path: str) -> None:
        st = fs.stat(path)
        fs.chmod(path, apply_mode(args.mode, st.st_mode, is_dir=stat_module.S_ISDIR(st.st_mode)))

    _each(ctx, args.paths, change)


def cmd_df(ctx: _Context) -> None:
    """``df``: file system statistics of the share."""
    fs = ctx.client()
    args = ctx.args
    try:
        sfs = fs.statfs(args.df_path)
    except (OSError, ValueError) as exc:
        ctx.report(exc)
        return
    share = _frontend_of(fs).tag or "9p"
    size = sfs.blocks * sfs.bsize
    avail = sfs.bavail * sfs.bsize
    used = (sfs.blocks - sfs.bfree) * sfs.bsize
    iused = sfs.files - sfs.ffree
    if args.json:
        record = sfs._asdict()
        record.update(share=share, size=size, used=used, available=avail, inodes_used=iused)
        ctx.print(json.dumps(record, sort_keys=True))
        return

    def pct(part: int, whole: int) -> str:
        return "-" if whole == 0 else f"{-(-100 * part // whole)}%"

    if args.inodes:
        rows = [("Share", "Inodes", "IUsed", "IFree", "IUse%"),
                (share, str(sfs.files), str(iused), str(sfs.ffree), pct(iused, sfs.files))]
    elif args.human_readable:
        rows = [("Share", "Size", "Used", "Avail", "Use%"),
                (share, format_size(size), format_size(used), format_size(avail),
                 pct(used, used + avail))]
    else:
        rows = [("Share", "1K-blocks", "Used", "Available", "Use%"),
                (share, str(size // 1024), str(used // 1024), str(avail // 1024),
                 pct(used, used + avail))]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        ctx.print(
            f"{row[0]:<{widths[0]}} "
            + " ".join(f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(row[1:]))
        )


def _args_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("-l", dest="long", action="store_true",
                   help="long format: mode, links, uid, gid, size, mtime, name (-> target)")
    p.add_argument("-a", "--all", action="store_true", help="include names starting with '.'")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    machine = p.add_mutually_exclusive_group()
    machine.add_argument("--json", action="store_true",
                         help="one JSON object per entry, one per line (with -l: every"
                              " attribute); exact for any name")
    machine.add_argument("-0", "--null", "--zero", dest="null", action="store_true",
                         help="the path of each entry, ended by a NUL byte (raw bytes, as"
                              " find -print0 writes them); exact for any name")
    p.add_argument("paths", nargs="*", metavar="PATH", help="what to list (default: /)")


def _copy_options(p: argparse.ArgumentParser) -> None:
    """The options ``get`` and ``put`` share."""
    p.add_argument("-r", "--recursive", action="store_true", help="copy a directory tree")
    p.add_argument("-n", "--no-clobber", action="store_true",
                   help="do not replace existing files (or links)")
    p.add_argument("--no-preserve", action="store_true",
                   help="do not copy the permission bits and times")


def _args_get(p: argparse.ArgumentParser) -> None:
    _copy_options(p)
    p.add_argument("remote", metavar="REMOTE", help="the file or directory on the share")
    p.add_argument("local", nargs="?", metavar="LOCAL",
                   help="where to put it (default: its name in the current directory;"
                        " an existing directory receives it under its name)")


def _args_put(p: argparse.ArgumentParser) -> None:
    _copy_options(p)
    p.add_argument("local", metavar="LOCAL", help="the local file or directory")
    p.add_argument("remote", nargs="?", metavar="REMOTE",
                   help="where to put it (default: its name at the root; an existing"
                        " directory receives it under its name)")


def _args_stat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-L", "--dereference", action="store_true", help="follow symbolic links")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per file, one per line")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the files")


def _args_mkdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--parents", action="store_true",
                   help="create missing parents; no error if it exists")
    p.add_argument("-m", "--mode", type=_octal_mode, metavar="MODE",
                   help="octal permissions (default: 777 less the umask 022)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the directories")


def _args_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "-R", "--recursive", action="store_true",
                   help="remove directories and their contents")
    p.add_argument("-f", "--force", action="store_true", help="ignore missing files")
    p.add_argument("paths", nargs="+", metavar="PATH", help="what to remove")


def _args_mv(p: argparse.ArgumentParser) -> None:
    p.add_argument("-T", "--no-target-directory", action="store_true",
                   help="treat DST as a plain name even if it is a directory")
    p.add_argument("source", metavar="SRC", help="what to rename")
    p.add_argument("dest", metavar="DST",
                   help="the new name, or an existing directory to move SRC into")


def _args_ln(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--symbolic", action="store_true",
                   help="make a symbolic link (default: a hard link)")
    p.add_argument("target", metavar="TARGET",
                   help="what the link points to (a symbolic link's target is stored as given)")
    p.add_argument("link", metavar="LINK",
                   help="the link to create, or an existing directory to create it in")


def _args_chmod(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", metavar="MODE",
                   help="octal (755) or symbolic (u+x, go-w, a=r,u+w, g=u)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the files")


def _args_df(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--human-readable", action="store_true",
                   help="sizes in KiB, MiB, GiB...")
    p.add_argument("-i", "--inodes", action="store_true", help="inodes instead of blocks")
    p.add_argument("--json", action="store_true", help="every statfs field as JSON")
    p.add_argument("df_path", nargs="?", default="", metavar="PATH",
                   help="a path on the file system (default: the root)")


#: The commands of this group, in the order ``--help`` lists them.
COMMANDS = (
    _Command("ls", cmd_ls, "list directories",
             "List directory contents (or name files), sorted by name.  A symbolic link"
             " to a directory is listed as the directory, except with -l (add a trailing"
             " '/' to list it anyway).  '.' and '..' are never listed.  On a terminal,"
             " names are quoted as GNU ls quotes them ('a b', 'a'$'\\n''b'); to a pipe they"
             " are written as they are; --json and -0 give every name exactly.",
             "  pyxen9p --tag share ls\n  pyxen9p --tag share ls -l /data\n"
             "  pyxen9p --simulate /tmp/x ls -laR\n"
             "  pyxen9p --tag share ls -R -0 / | xargs -0 ...\n"
             "  pyxen9p --tag share ls --json -l /data | jq .size", _args_ls),
    _Command("cat", cmd_cat, "print files",
             "Copy the content of each file to standard output, unchanged.",
             "  pyxen9p --tag share cat /etc/motd\n"
             "  pyxen9p --tag share cat big.log | tail", _args_paths("the files to print")),
    _Command("get", cmd_get, "copy from the share",
             "Copy a file, or with -r a directory tree, from the share to the local disk"
             " (keeping permission bits and times).  Symbolic links are copied as links;"
             " fifos, sockets and devices are skipped with a warning.  A file is written"
             " under a temporary name and renamed when complete, so a failed copy leaves"
             " no partial file.  A tree copy goes on past a failed entry and reports every"
             " failure at the end (exit status 1).  A LOCAL ending in '/' must be a"
             " directory.  A progress bar is drawn when standard error is a terminal.",
             "  pyxen9p --tag share get report.pdf\n"
             "  pyxen9p --tag share get -r /photos ~/photos", _args_get),
    _Command("put", cmd_put, "copy to the share",
             "Copy a local file, or with -r a directory tree, to the share (keeping"
             " permission bits and times; bits the server drops, such as set-user-ID, are"
             " reported).  Symbolic links are copied as links; fifos, sockets and devices"
             " are skipped with a warning.  A tree copy goes on past a failed entry and"
             " reports every failure at the end (exit status 1).  A REMOTE ending in '/'"
             " must be a directory.",
             "  pyxen9p --tag share put notes.txt\n"
             "  pyxen9p --tag share put -r ./site /www", _args_put),
    _Command("stat", cmd_stat, "show file attributes",
             "Show the attributes of each file, like stat(1) (symbolic links are not"
             " followed unless -L is given).  Times are local time.",
             "  pyxen9p --tag share stat /data\n"
             "  pyxen9p --tag share stat --json a b | jq .size", _args_stat),
    _Command("mkdir", cmd_mkdir, "create directories", "Create directories.",
             "  pyxen9p --tag share mkdir new\n  pyxen9p --tag share mkdir -p a/b/c -m 700",
             _args_mkdir),
    _Command("rm", cmd_rm, "remove files",
             "Remove files; with -r, directories and everything below them (symbolic"
             " links are removed, never followed).  The share's root is never removed.",
             "  pyxen9p --tag share rm old.txt\n  pyxen9p --tag share rm -rf build",
             _args_rm),
    _Command("rmdir", cmd_rmdir, "remove empty directories", "Remove empty directories.",
             "  pyxen9p --tag share rmdir empty", _args_paths("the directories")),
    _Command("mv", cmd_mv, "rename or move",
             "Rename SRC to DST, replacing DST if it is a file; if DST is an existing"
             " directory, SRC is moved into it (unless -T).  A DST ending in '/' must be"
             " a directory (or SRC a directory, which gets that name).",
             "  pyxen9p --tag share mv draft.txt final.txt\n"
             "  pyxen9p --tag share mv final.txt archive/", _args_mv),
    _Command("ln", cmd_ln, "make links",
             "Make a symbolic link (-s) or a hard link LINK to TARGET.",
             "  pyxen9p --tag share ln -s data/numbers.csv latest.csv", _args_ln),
    _Command("chmod", cmd_chmod, "change permissions",
             "Change the permission bits of files (symbolic links are followed).  A"
             " symbolic MODE without u, g, o or a applies to all; the umask is not"
             " consulted.  Put '--' before a MODE starting with '-'.",
             "  pyxen9p --tag share chmod 644 notes.txt\n"
             "  pyxen9p --tag share chmod u+x,go-w run.sh\n"
             "  pyxen9p --tag share chmod -- -w frozen.txt", _args_chmod),
    _Command("df", cmd_df, "file system statistics",
             "Show the size and use of the file system holding the share (Tstatfs).",
             "  pyxen9p --tag share df -h\n  pyxen9p --tag share df --json", _args_df),
)
