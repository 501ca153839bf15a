"""pyxen9p: the Xen 9pfs transport and a 9P2000.L client, in user space.

The one entry point is :func:`connect`::

    import pyxen9p

    with pyxen9p.connect(tag="share") as fs:          # on a Xen guest
        print(fs.listdir("/"))

    with pyxen9p.connect(simulate="/srv/data") as fs:  # anywhere: simulated Xen
        fs.write_bytes("hello.txt", b"hello")

Importing the package loads no C library; each Xen library is loaded on first
use.  Every exception the library defines derives from
:class:`~pyxen9p.errors.Pyxen9pError`, also exported here as
``pyxen9p.Pyxen9pError``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pyxen9p._version import __version__
from pyxen9p.errors import Pyxen9pError

if TYPE_CHECKING:
    from pyxen9p.errors import TransportError
    from pyxen9p.frontend import Frontend
    from pyxen9p.interfaces import XenPlatform
    from pyxen9p.p9.client import Client
    from pyxen9p.sim.share import SimulatedShare

__all__ = ["Pyxen9pError", "SimulatedTransport", "__version__", "connect"]

_DEFAULT = object()


class SimulatedTransport:
    """A :class:`~pyxen9p.frontend.Frontend` on a simulated share that it owns.

    Closing it closes the frontend, then the simulated host.  Every other
    attribute is the frontend's (``num_rings``, ``ring_order``, ``path``...).

    :ivar frontend: the frontend
    :ivar share: the :class:`~pyxen9p.sim.share.SimulatedShare`
    """

    def __init__(self, frontend: Frontend, share: SimulatedShare) -> None:
        self.frontend = frontend
        self.share = share
        #: the frontend's msize
        self.msize = frontend.msize

    def request(self, message: bytes, *, timeout: float | None = 60.0) -> bytes:
        """:meth:`Frontend.request <pyxen9p.frontend.Frontend.request>`."""
        return self.frontend.request(message, timeout=timeout)

    def flushed(self, tag: int) -> None:
        """:meth:`Frontend.flushed <pyxen9p.frontend.Frontend.flushed>`."""
        self.frontend.flushed(tag)

    def abort(self, exc: TransportError) -> None:
        """:meth:`Frontend.abort <pyxen9p.frontend.Frontend.abort>`."""
        self.frontend.abort(exc)

    def close(self) -> None:
        """Close the frontend, then the simulated host (idempotent)."""
        try:
            self.frontend.close()
        finally:
            self.share.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.frontend, name)


def connect(
    *,
    tag: str | None = None,
    devid: int | None = None,
    path: str | None = None,
    simulate: str | os.PathLike[str] | None = None,
    readonly: bool = False,
    platform: XenPlatform | None = None,
    rings: int | None = None,
    ring_order: int | None = None,
    grant_limit: Any = _DEFAULT,
    timeout: float = 30.0,
    request_timeout: float | None = 60.0,
    allow_reconnect: bool = False,
    server: str | None = None,
    agent: str = "auto",
    **client_options: Any,
) -> Client:
    """Connect to a Xen 9pfs share and return a 9P :class:`~pyxen9p.p9.client.Client`.

    Name the device by *tag*, *devid* (``device/9pfs/<devid>``) or XenStore
    *path* (one of them; with *simulate*, none means device 0).

    :param simulate: serve this local directory on a simulated Xen
        (:class:`~pyxen9p.sim.share.SimulatedShare`) and connect to it through
        the whole stack; no Xen, compiler or Xen library is needed
    :param readonly: with *simulate*, export the directory read-only
    :param platform: where the Xen objects come from (default: the real
        libraries); ignored with *simulate*
    :param rings: wished number of rings (see :func:`~pyxen9p.frontend.choose_layout`)
    :param ring_order: wished ring order
    :param grant_limit: keep all shared pages within this many grants
        (default 1024, gntalloc's default; ``None``: no limit).  gntalloc's
        limit counts every grant the *domain* shares through it, so when
        several connections are open at once, give each a share of it: two
        default connections (514 grants each) do not fit together, two with
        ``grant_limit=512`` (2 rings of order 7) do
    :param timeout: limit for each step of the connection
    :param request_timeout: limit for each 9P request afterwards (``None``:
        none; a Tflush is sent when it expires)
    :param allow_reconnect: connect even when the device's backend is Closed
        (it has served a connection that ended).  Refused by default with
        :class:`~pyxen9p.frontend.ReconnectRefusedError`: QEMU 7.2's Xen 9pfs
        backend aborts when a device is connected a second time, taking every
        device it serves with it.  Pass ``True`` only for a backend known to
        reconnect (the simulated one does); a ``xen-9pfsd`` device
        (``backend/xen_9pfs``) is reconnected without it (see
        :data:`pyxen9p.frontend.BACKEND_TYPES`)
    :param server: instead of a Xen device, the 9P2000.L server at this
        address (``unix:PATH`` or ``tcp:HOST:PORT``: an agent, diod, another
        pyxen9p...; see :func:`pyxen9p.agent.parse_address`); no device
        selector may be given with it
    :param agent: whether to go through the device's agent (``pyxen9p
        serve``, found by :func:`pyxen9p.agent.find_agent`): ``"auto"`` (the
        default) uses it when one answers and connects directly otherwise,
        ``"never"`` always connects directly, ``"require"`` fails with
        :class:`FileNotFoundError` when none answers.  Not with *platform*
        (an agent serves the real Xen, or a simulated share of the same
        directory)
    :param client_options: passed to :class:`~pyxen9p.p9.client.Client`
        (``msize``, ``uname``, ``aname``, ``window``, ``version``: the 9P
        dialect, ``"auto"`` by default, which falls back from 9P2000.L to
        9P2000.u...)
    :raises OSError: the device cannot be found or connected, or the 9P
        session cannot be established
    :raises ValueError: *server* with a device selector, or an unknown *agent*
    """
    from pyxen9p.frontend import DEFAULT_GRANT_LIMIT, Frontend
    from pyxen9p.p9.client import Client

    if agent not in ("auto", "never", "require"):
        raise ValueError(f"agent must be 'auto', 'never' or 'require', not {agent!r}")
    if server is not None:
        from pyxen9p.agent import open_transport

        if tag is not None or devid is not None or path is not None or simulate is not None:
            raise ValueError("server= names the server: give no tag, devid, path or simulate")
        return Client(open_transport(server, timeout=timeout), timeout=request_timeout,
                      **client_options)
    if agent != "never" and platform is None:
        from pyxen9p.agent import find_agent, open_transport

        found = find_agent(tag=tag, devid=devid, path=path, simulate=simulate)
        if found is not None:
            import logging

            logging.getLogger(__name__).info("using the agent at %s", found)
            return Client(open_transport(f"unix:{found}", timeout=timeout),
                          timeout=request_timeout, **client_options)
        if agent == "require":
            import errno

            what = f"the simulated share of {simulate}" if simulate is not None else (
                f"tag {tag!r}" if tag is not None else f"devid {devid}" if devid is not None
                else f"path {path!r}" if path is not None else "no device named")
            raise FileNotFoundError(
                errno.ENOENT, f"no agent is running for {what} (start one with 'pyxen9p serve')"
            )

    limit = DEFAULT_GRANT_LIMIT if grant_limit is _DEFAULT else grant_limit

    def open_frontend(on: XenPlatform | None, devid: int | None) -> Frontend:
        return Frontend.connect(
            tag=tag,
            devid=devid,
            path=path,
            platform=on,
            rings=rings,
            ring_order=ring_order,
            grant_limit=limit,
            timeout=timeout,
            allow_reconnect=allow_reconnect,
        )

    if simulate is None:
        return Client(open_frontend(platform, devid), timeout=request_timeout, **client_options)

    from pyxen9p.sim.share import SimulatedShare

    share = SimulatedShare(simulate, readonly=readonly, tag=tag or "share")
    try:
        if tag is None and devid is None and path is None:
            devid = 0
        frontend = open_frontend(share.guest, devid)
    except BaseException:
        share.close()
        raise
    return Client(SimulatedTransport(frontend, share), timeout=request_timeout, **client_options)
