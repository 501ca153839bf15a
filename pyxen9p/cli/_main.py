"""The ``pyxen9p`` argument parser and :func:`main`: one subcommand per entry of
the command groups' ``COMMANDS`` tables.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from pyxen9p._version import __version__
from pyxen9p.cli import demo, files, fuzz_backend, info, mount
from pyxen9p.cli import serve as serve_cli
from pyxen9p.cli._common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CommandError,
    UsageError,
    _Context,
    _describe,
    _devid,
    _positive_int,
    _ring_order,
    _seconds,
    escape_controls,
)

if TYPE_CHECKING:
    pass


def _add_server_options(group: Any, default: Callable[[object], object]) -> None:
    """``--server``, ``--direct``, ``--via-agent``: where the 9P server is."""
    group.add_argument("--server", type=_server_address, default=default(None),
                       metavar="ADDRESS",
                       help="use the 9P2000.L server at ADDRESS (unix:PATH or"
                            " tcp:HOST:PORT: an agent, diod, ...) instead of a Xen device")
    how = group.add_mutually_exclusive_group()
    how.add_argument("--direct", dest="agent", action="store_const", const="never",
                     default=default("auto"),
                     help="connect to the device itself, never through its agent")
    how.add_argument("--via-agent", dest="agent", action="store_const", const="require",
                     default=default("auto"),
                     help="use the device's running agent, fail if there is none"
                          " (default: its agent if one answers, else the device itself)")


def _server_address(text: str) -> str:
    from pyxen9p.agent import parse_address

    try:
        return str(parse_address(text, connect=True))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The choices of ``--version-9p`` (:data:`pyxen9p.p9.client.VERSIONS`, not imported
#: here to keep the start-up light).
_VERSIONS_9P = ("auto", "9P2000.L", "9P2000.u")


def _add_global_options(parser: argparse.ArgumentParser, *, repeated: bool) -> None:
    """The options choosing and tuning the share.

    :param repeated: add them to a command's parser (defaults are then
        suppressed so that a value given before the command is kept)
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if repeated else value

    title = "global options (also accepted after the command)" if repeated else "global options"
    group = parser.add_argument_group(title)
    group.add_argument("--tag", default=default(None), metavar="TAG",
                       help="the Xen 9pfs device whose mount tag is TAG")
    group.add_argument("--devid", type=_devid, default=default(None), metavar="N",
                       help="the device device/9pfs/N of this domain")
    group.add_argument("--path", default=default(None), metavar="XSPATH",
                       help="the device whose frontend directory in XenStore is XSPATH")
    group.add_argument("--simulate", default=default(None), metavar="DIR",
                       help="serve the local directory DIR through a simulated Xen and use"
                            " that (the whole stack; no Xen needed)")
    _add_server_options(group, default)
    group.add_argument("--readonly", action="store_true", default=default(False),
                       help="with --simulate: export DIR read-only")
    group.add_argument("--timeout", type=_seconds, default=default(30.0), metavar="SECONDS",
                       help="limit for each connection step and each request (default: 30)")
    group.add_argument("--rings", type=_positive_int, default=default(None), metavar="N",
                       help="number of rings wished (default 2; capped by the backend)")
    group.add_argument("--ring-order", type=_ring_order, default=default(None), metavar="N",
                       help="ring order wished, 1..9 (default: the largest allowed)")
    group.add_argument("--version-9p", dest="version_9p", choices=_VERSIONS_9P,
                       default=default("auto"), metavar="{auto,9P2000.L,9P2000.u}",
                       help="the 9P dialect, as Linux's version= mount option: auto (the"
                            " default) tries 9P2000.L, then 9P2000.u (xen-9pfsd's)")
    group.add_argument("--allow-reconnect", action="store_true", default=default(False),
                       help="connect even if the backend has served this device before (it"
                            " is Closed); QEMU 7.2 aborts on that, so only for a backend"
                            " known to reconnect")
    group.add_argument("-v", "--verbose", action="count", default=default(0),
                       help="log what happens (-vv: debug) and show tracebacks of errors")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="no progress bars, no warnings")


_DESCRIPTION = """\
Files on a Xen 9pfs share, from the shell: a user-space Xen 9pfs frontend
and 9P2000.L client.  On a Xen guest, the share is chosen with --tag,
--devid or --path (default: the only 9pfs device of this domain); anywhere,
--simulate DIR serves a local directory through a simulated Xen.
"""


_EPILOG = """\
examples:
  pyxen9p demo                             try the whole stack, no Xen needed
  pyxen9p info                             what this machine has
  pyxen9p --tag share ls -l /              list the share tagged 'share'
  pyxen9p --devid 0 get -r docs ./docs     copy a tree out
  pyxen9p --simulate /tmp/x put notes.txt  anywhere, over a simulated Xen

exit status: 0 success, 1 an operation failed, 2 usage error,
130 interrupted (Ctrl-C), 141 standard output closed early.
Run 'pyxen9p COMMAND --help' for each command's options.
"""


#: Every command, in the order ``--help`` lists them.
_COMMANDS = (
    *files.COMMANDS, *info.COMMANDS, *mount.COMMANDS, *demo.COMMANDS, *serve_cli.COMMANDS,
    *fuzz_backend.COMMANDS,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyxen9p`` command (with one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, repeated=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for command in _COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.summary,
            description=textwrap.fill(command.description, 78),
            epilog="examples:\n" + command.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=command.name != "df",  # df's -h is --human-readable, as in df(1)
        )
        if command.name == "df":
            sub.add_argument("--help", action="help", help="show this help message and exit")
        command.arguments(sub)
        _add_global_options(sub, repeated=True)
        sub.set_defaults(func=command.func)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    chosen = [f"--{key}" for key in ("tag", "devid", "path") if getattr(args, key) is not None]
    if len(chosen) > 1:
        parser.error(f"give at most one of --tag, --devid, --path (got {', '.join(chosen)})")
    if args.server is not None and (chosen or args.simulate is not None):
        parser.error("--server names the server: no --tag, --devid, --path or --simulate with it")
    if args.server is not None and args.agent != "auto":
        parser.error("--direct and --via-agent choose how to reach a device, not a --server")
    if args.readonly and args.simulate is None:
        parser.error("--readonly only applies with --simulate DIR")
    if args.quiet and args.verbose:
        parser.error("-q and -v contradict each other")


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    return EXIT_FAILURE


class _EscapingFormatter(logging.Formatter):
    """Log lines with their control characters escaped (they may carry a server's names)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape_controls(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info), keep_newlines=True)


@contextlib.contextmanager
def _logging(args: argparse.Namespace, stream: TextIO) -> Iterator[None]:
    logger = logging.getLogger("pyxen9p")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_EscapingFormatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    old_level = logger.level
    verbose = int(args.verbose or 0)
    if args.quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    else:
        level = logging.WARNING
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _silence_stdout(stdout: TextIO) -> None:
    """After a broken pipe: point standard output at /dev/null so that exiting is quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, stdout.fileno())
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyxen9p`` command line.

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :returns: the exit status: :data:`EXIT_OK`, :data:`EXIT_FAILURE`,
        :data:`EXIT_USAGE`, :data:`EXIT_INTERRUPTED` or :data:`EXIT_BROKEN_PIPE`
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
    except SystemExit as exc:  # --help, --version, usage errors
        return _exit_code(exc.code)
    stdout, stderr = sys.stdout, sys.stderr
    ctx = _Context(args, stdout, stderr)
    with _logging(args, stderr):
        try:
            try:
                args.func(ctx)
                stdout.flush()
            finally:
                ctx.close()
        except KeyboardInterrupt:
            stderr.write(f"\n{PROG}: interrupted\n")
            return EXIT_INTERRUPTED
        except BrokenPipeError as exc:
            if exc.filename is not None:
                ctx.report(exc)
                return EXIT_FAILURE
            _silence_stdout(stdout)
            return EXIT_BROKEN_PIPE
        except UsageError as exc:
            ctx.error(str(exc))
            stderr.write(f"Try '{PROG} {ctx.command} --help'.\n")
            return EXIT_USAGE
        except (CommandError, OSError, ValueError) as exc:
            ctx.report(exc)
            return EXIT_FAILURE
        except Exception as exc:
            ctx.status = EXIT_FAILURE
            ctx.error(f"internal error: {type(exc).__name__}: {_describe(exc)}"
                      + ("" if ctx.verbose else " (-v shows the traceback)"))
            if ctx.verbose:
                ctx.traceback(exc)
            return EXIT_FAILURE
    return ctx.status
