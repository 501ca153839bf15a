"""``pyxen9p mount`` and ``pyxen9p umount``: the share as a directory, with FUSE
(:mod:`pyxen9p.mount`).
"""

from __future__ import annotations

import argparse
import os

from pyxen9p.cli._common import EXIT_FAILURE, _Command, _Context
from pyxen9p.mount import MountError, mount, umount


def cmd_mount(ctx: _Context) -> None:
    """``mount MOUNTPOINT``: mount the share; in the background once mounted unless ``-f``.

    The connection is made by the process that serves the mount (after the
    fork when it goes to the background), so a failure to connect is still
    reported here, with a non-zero exit status.
    """
    args = ctx.args
    try:
        mount(
            ctx.client,
            args.mountpoint,
            foreground=args.foreground,
            options=args.options,
            debug=args.debug,
            fsname=f"pyxen9p:{_source(args)}",
        )
    except MountError as exc:
        ctx.error(str(exc))
        ctx.status = exc.status if exc.status > 0 else EXIT_FAILURE


def _source(args: argparse.Namespace) -> str:
    """What ``mount`` and ``df`` show as the source (no commas: they split options)."""
    if getattr(args, "server", None) is not None:
        text = args.server
    elif args.simulate is not None:
        text = os.path.abspath(args.simulate)
    elif args.tag is not None:
        text = args.tag
    elif args.devid is not None:
        text = f"device/9pfs/{args.devid}"
    elif args.path is not None:
        text = args.path
    else:
        text = "share"
    return "".join(ch if ch.isprintable() and ch not in ", " else "_" for ch in text)


def cmd_umount(ctx: _Context) -> None:
    """``umount MOUNTPOINT``: unmount a mount made by ``pyxen9p mount`` (``fusermount3 -u``)."""
    try:
        umount(ctx.args.mountpoint, lazy=ctx.args.lazy)
    except MountError as exc:
        ctx.error(str(exc))
        ctx.status = EXIT_FAILURE


def _args_mount(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (until unmounted, SIGTERM or Ctrl-C)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated: ro, allow_other,"
                        " default_permissions, and other options of libfuse and FUSE")
    p.add_argument("-d", "--debug", action="store_true",
                   help="libfuse's debug output (implies -f)")


def _args_umount(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the share is mounted")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach now even if the mount is busy")


#: The commands of this group, in the order ``--help`` lists them.
COMMANDS = (
    _Command("mount", cmd_mount, "mount the share as a directory (FUSE)",
             "Mount the share on MOUNTPOINT with FUSE, so that every program sees its"
             " files.  Like sshfs, the command returns once the mount is ready and a"
             " background process serves it, until 'pyxen9p umount MOUNTPOINT' or"
             " 'fusermount3 -u MOUNTPOINT' (or SIGTERM to that process); with -f it"
             " serves in the foreground until unmounted or interrupted.  A request the"
             " share does not answer within --timeout fails with EIO, and once the"
             " connection is gone every request fails with ENOTCONN.  Needs libfuse 3"
             " (Debian: fuse3) and the extra pyxen9p[mount].",
             "  pyxen9p --tag share mount /mnt/share\n"
             "  pyxen9p --tag share mount /mnt/share -o ro,allow_other\n"
             "  pyxen9p --simulate /srv/data mount -f /tmp/m\n"
             "  pyxen9p umount /mnt/share", _args_mount),
    _Command("umount", cmd_umount, "unmount a share mounted by 'pyxen9p mount'",
             "Unmount MOUNTPOINT with fusermount3 -u; the process serving it then closes"
             " its connection and exits.  -z detaches a busy mount at once.",
             "  pyxen9p umount /mnt/share\n  pyxen9p umount -z /mnt/share", _args_umount),
)
