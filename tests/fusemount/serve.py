"""Serve a FUSE mount of a simulated share or a 9P server, for the mount tests.

``python -m fusemount.serve (--simulate DIR | --unix PATH --aname ROOT)
[--timeout S] [-f] [--pidfile F] [-o OPTIONS] MOUNTPOINT``: a real program
around :func:`pyxen9p.mount.mount` (in the background once mounted, unless
``-f``); exits 1 with the error on stderr when the mount fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyxen9p
from pyxen9p.mount import MountError, mount
from pyxen9p.p9.client import Client


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--simulate")
    parser.add_argument("--unix")
    parser.add_argument("--aname", default="")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("-f", dest="foreground", action="store_true")
    parser.add_argument("--pidfile")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()

    def connect() -> Client:
        if args.unix:
            return Client.unix(
                args.unix, aname=args.aname, timeout=args.timeout, flush_timeout=args.timeout
            )
        return pyxen9p.connect(simulate=args.simulate, request_timeout=args.timeout)

    def ready() -> None:
        if args.pidfile:
            Path(args.pidfile).write_text(str(os.getpid()))

    try:
        mount(connect, args.mountpoint, foreground=args.foreground, options=args.options,
              on_ready=ready)
    except (MountError, OSError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return getattr(exc, "status", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
