"""The ``pyxen9p`` command line: files on a Xen 9pfs share, from the shell.

::

    pyxen9p demo                               # the whole stack, no Xen needed
    pyxen9p info                               # what this machine has
    pyxen9p --tag share ls -l /                # on a Xen guest
    pyxen9p --simulate /srv/data get -r docs   # anywhere: a simulated Xen

:func:`main` parses the arguments, connects (once, and only for the commands
that need a share) and runs one command.  Errors are reported on one line of
standard error (``pyxen9p: cat: /x: No such file or directory``); the exit
status is 0 on success, 1 when an operation failed, 2 for a usage error, 130
after Ctrl-C and 141 when standard output was closed early (a broken pipe).
``-v`` adds logging and tracebacks.  The commands are described in the
documentation's command-line page and by ``pyxen9p COMMAND --help``.

The package has one module per group of commands (:mod:`pyxen9p.cli.files`,
:mod:`pyxen9p.cli.info`, :mod:`pyxen9p.cli.demo`, :mod:`pyxen9p.cli.serve`),
each with a ``COMMANDS`` table; what they share (the per-run context, errors, quoting) lives in
``pyxen9p.cli._common`` and the parser in ``pyxen9p.cli._main``.
"""

from __future__ import annotations

import pyxen9p as pyxen9p  # callers patch pyxen9p.connect through it
from pyxen9p.cli._common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    DeviceSummary,
    UsageError,
    escape_controls,
    list_devices,
    quote_name,
)
from pyxen9p.cli._main import _COMMANDS as _COMMANDS
from pyxen9p.cli._main import _logging as _logging
from pyxen9p.cli._main import build_parser, main
from pyxen9p.cli.files import apply_mode

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "DeviceSummary",
    "UsageError",
    "apply_mode",
    "build_parser",
    "escape_controls",
    "list_devices",
    "main",
    "quote_name",
]
