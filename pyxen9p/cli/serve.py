"""``pyxen9p serve``: the agent.  It connects once to a device and serves it to
every local program through the 9P multiplexer (:mod:`pyxen9p.p9.mux`) until it
is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyxen9p import agent
from pyxen9p.cli._common import (
    CommandError,
    UsageError,
    _Command,
    _Context,
    _describe,
    _no_xen_hint,
    _octal_mode,
    _only_device,
    _positive_int,
    _seconds,
    _selection,
    log,
)

if TYPE_CHECKING:
    from pyxen9p.p9.transport import Transport


def _address(text: str) -> agent.Address:
    try:
        return agent.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _user_id(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user named {text!r}") from None


def _group_id(text: str) -> int:
    import grp

    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set *stop* (instead of killing or interrupting) while inside."""

    def handler(signum: int, _frame: object) -> None:
        log.warning("%s: stopping", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _open_backend(
    ctx: _Context, stack: contextlib.ExitStack
) -> tuple[Transport, dict[str, Any]]:
    """Connect to the device (or the upstream server); return it and its description."""
    from pyxen9p.frontend import Frontend

    args = ctx.args
    if args.server is not None:
        upstream = agent.open_transport(args.server, timeout=args.timeout)
        stack.callback(upstream.close)
        return upstream, {"server": args.server}
    options: dict[str, Any] = {
        "rings": args.rings,
        "ring_order": args.ring_order,
        "timeout": args.timeout,
        "allow_reconnect": args.allow_reconnect,
    }
    if args.simulate is not None:
        import pyxen9p
        from pyxen9p.sim.share import SimulatedShare

        share = SimulatedShare(args.simulate, readonly=args.readonly, tag=args.tag or "share")
        stack.callback(share.close)
        frontend = Frontend.connect(
            platform=share.guest, **(_selection(args) or {"devid": 0}), **options
        )
        stack.callback(frontend.close)
        return pyxen9p.SimulatedTransport(frontend, share), {
            "simulate": os.path.realpath(args.simulate), "readonly": bool(args.readonly),
            "tag": frontend.tag,
        }
    selection = _selection(args) or _only_device()
    frontend = Frontend.connect(**selection, **options)
    stack.callback(frontend.close)
    last = frontend.path.rstrip("/").rsplit("/", 1)[-1]
    return frontend, {
        "tag": frontend.tag,
        "devid": int(last) if last.isdigit() else None,
        "path": frontend.path,
        "backend": frontend.backend_path,
        "selector": selection,
    }


def _agent_name(ctx: _Context) -> str | None:
    """The agent's name (its default socket and lock), or ``None`` with ``--server``."""
    args = ctx.args
    if args.server is not None:
        return None
    if args.simulate is not None:
        return agent.agent_name(simulate=args.simulate)
    selection = _selection(args) or _only_device()
    return agent.agent_name(**selection)


def cmd_serve(ctx: _Context) -> None:
    """``serve``: connect once, serve the multiplexer until SIGTERM/SIGINT or the backend dies."""
    from pyxen9p.p9.mux import Limits, MultiplexerThread

    args = ctx.args
    logger = logging.getLogger("pyxen9p")
    if not ctx.quiet and logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        limits = Limits(
            max_clients=args.max_clients, max_requests=args.max_requests,
            max_queued=args.max_queued, max_fids=args.max_fids,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.server is not None and not args.listen:
        raise UsageError("with --server, say where to listen (--listen ADDRESS)")
    soft, hard = agent.raise_nofile_limit()
    log.info("descriptor limit: %d (hard %d)", soft, hard)

    stop = threading.Event()
    with contextlib.ExitStack() as stack, _stop_on_signals(stop):
        name = _agent_name(ctx)
        directory = agent.runtime_dir()
        lock = None
        if name is not None and directory is not None:
            try:
                agent.make_runtime_dir(directory)
                lock = agent.AgentLock(agent.lock_path(name, directory))
                lock.acquire()
            except OSError as exc:
                raise CommandError(f"cannot start the agent {name}: {_describe(exc)}") from exc
            stack.callback(lock.release)
        elif name is not None and not args.listen:
            agent.socket_path(name)  # raises: no runtime directory
        listen = list(args.listen or [])
        if not listen:
            assert name is not None
            listen = [agent.Address("unix", path=agent.socket_path(name, directory))]

        try:
            transport, device = _open_backend(ctx, stack)
        except (OSError, ValueError) as exc:
            raise CommandError(
                f"cannot connect to the 9pfs share: {_describe(exc)}{_no_xen_hint(exc)}"
            ) from exc
        watched = agent.WatchedTransport(transport, args.backend_timeout)
        stack.callback(watched.close)
        log.info("connected: %s", device)

        def failed(exc: BaseException) -> None:
            stop.set()

        try:
            mux = MultiplexerThread(
                watched, timeout=args.timeout, limits=limits, on_failure=failed,
                version=args.version_9p,
            )
        except (OSError, ValueError) as exc:
            raise CommandError(f"the backend's 9P session failed: {_describe(exc)}") from exc
        stack.callback(mux.stop)
        bound: list[str] = []
        for address in [] if stop.is_set() else listen:  # stopped while connecting: no socket
            try:
                if address.kind == "unix":
                    path = mux.listen_unix(
                        address.path, mode=args.mode, group=args.group,
                        allowed_uids={os.geteuid(), 0, *args.allow_user},
                        allowed_gids=(
                            None if not args.allow_group
                            else {*args.allow_group, *([args.group] if args.group else [])}
                        ),
                    )
                    bound.append(f"unix:{path}")
                else:
                    host, port = mux.listen_tcp(
                        address.host, address.port, allow_remote=args.allow_remote
                    )
                    bound.append(str(agent.Address("tcp", host=host, port=port)))
            except (OSError, LookupError) as exc:
                if isinstance(exc, PermissionError) and address.kind == "tcp":
                    raise UsageError(f"{address}: {_describe(exc)} (--allow-remote)") from exc
                raise CommandError(f"cannot listen on {address}: {_describe(exc)}") from exc
        if lock is not None:
            lock.describe({"device": device, "listen": bound})
        log.info(
            "serving %s on %s (%s, msize %d)", device, ", ".join(bound), mux.version, mux.msize
        )
        agent.sd_notify(f"READY=1\nSTATUS=serving on {', '.join(bound)}\nMAINPID={os.getpid()}")
        while not stop.wait(0.5):
            pass
        agent.sd_notify("STOPPING=1")
        failure = mux.failure
        if failure is None:
            log.info("stopping: telling %d clients", mux.clients)
        mux.stop()
    if failure is not None:
        raise CommandError(f"the backend failed: {_describe(failure)}")
    log.info("stopped")


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", type=_address, metavar="ADDRESS",
                   help="unix:PATH or tcp:HOST:PORT (repeatable; default: the device's"
                        " socket in /run/pyxen9p/ for root, $XDG_RUNTIME_DIR/pyxen9p/"
                        " otherwise)")
    p.add_argument("--group", metavar="GROUP",
                   help="give the Unix sockets this group (mode 0660) and let its members"
                        " connect")
    p.add_argument("--mode", type=_octal_mode, metavar="OCTAL",
                   help="the Unix sockets' mode (default 0600, 0660 with --group)")
    p.add_argument("--allow-user", action="append", type=_user_id, default=[],
                   metavar="USER", help="also let this user connect (name or uid; repeatable;"
                                        " the agent's own user and root always may)")
    p.add_argument("--allow-group", action="append", type=_group_id, default=[],
                   metavar="GROUP", help="also let members of this group connect (repeatable)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a TCP address other than loopback (anyone who reaches it"
                        " gets the whole share: TCP carries no credentials)")
    p.add_argument("--max-clients", type=_positive_int, default=64, metavar="N",
                   help="clients at once (default 64)")
    p.add_argument("--max-requests", type=_positive_int, default=64, metavar="N",
                   help="one client's requests on the backend at once (default 64)")
    p.add_argument("--max-queued", type=_positive_int, default=64, metavar="N",
                   help="one client's requests waiting beyond those (default 64)")
    p.add_argument("--max-fids", type=_positive_int, default=1024, metavar="N",
                   help="fids one client may hold (default 1024)")
    p.add_argument("--backend-timeout", type=_seconds, default=120.0, metavar="SECONDS",
                   help="declare the backend dead when requests wait and nothing at all"
                        " is answered for this long (default 120)")


#: The commands of this group, in the order ``--help`` lists them.
COMMANDS = (
    _Command("serve", cmd_serve, "hold the device's connection and serve it to every program",
             "Connect once to the device and serve it, in the backend's 9P dialect (9P2000.L,"
             " or 9P2000.u for xen-9pfsd; --version-9p chooses), to any number of local"
             " programs through a multiplexer, until SIGTERM or SIGINT (exit status 0:"
             " clients are disconnected, the Xen connection is closed) or until the backend"
             " fails (every client gets an error; exit status 1).  By default it listens on"
             " one Unix socket, /run/pyxen9p/NAME.sock for root or"
             " $XDG_RUNTIME_DIR/pyxen9p/NAME.sock, where NAME is tag-TAG, devid-N, path-..."
             " or sim-DIR-HASH; the other commands find it there and use it.  The socket"
             " appears once the device is connected; under systemd, READY=1 is sent then."
             "  Only the agent's own user and root may connect, unless --group,"
             " --allow-user or --allow-group say otherwise.  It runs in the foreground and"
             " logs to standard error.",
             "  pyxen9p --tag share serve\n"
             "  pyxen9p --tag share serve --group staff\n"
             "  pyxen9p --simulate /tmp/x serve --listen unix:/tmp/x.sock"
             " --listen tcp:127.0.0.1:5640\n"
             "  pyxen9p --server unix:/tmp/x.sock ls /", _args_serve),
)
