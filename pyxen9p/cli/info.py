"""``pyxen9p info``: what this machine has (Xen, the libraries, 9pfs devices) and,
with a device, what its connection looks like.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from typing import TYPE_CHECKING, Any

import pyxen9p
from pyxen9p._progress import format_size
from pyxen9p._version import __version__
from pyxen9p.cli._common import (
    _XEN_PATHS,
    EXIT_FAILURE,
    EXIT_OK,
    _Command,
    _Context,
    _describe,
    _no_xen_hint,
    _selection,
    list_devices,
)

if TYPE_CHECKING:
    from pyxen9p.frontend import Frontend
    from pyxen9p.p9.client import Client


def _mapped_file(soname: str) -> str | None:
    """The file this process mapped for the library *soname* (from ``/proc/self/maps``)."""
    base = os.path.basename(soname)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(base):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def _probe_library(module: Any) -> dict[str, Any]:
    spec = module.LIBRARY
    entry: dict[str, Any] = {"name": spec.name, "package": spec.package}
    if os.environ.get(spec.env_var):
        entry["override"] = f"{spec.env_var}={os.environ[spec.env_var]}"
    try:
        bound = spec.load()
    except OSError as exc:
        entry.update(loaded=False, error=_describe(exc))
        return entry
    entry.update(loaded=True, soname=bound.name, file=_mapped_file(bound.name) or bound.name)
    if bound.missing:
        entry["missing_functions"] = list(bound.missing)
    return entry


def _probe_path(path: str) -> dict[str, Any]:
    exists = os.path.exists(path)
    entry: dict[str, Any] = {"exists": exists}
    if exists and not os.path.isdir(path):
        entry["accessible"] = os.access(path, os.R_OK | os.W_OK)
    return entry


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(200).strip()
    except OSError:
        return None


def _probe_xenstore() -> dict[str, Any]:
    from pyxen9p.libs import RealXen

    entry: dict[str, Any] = {"reachable": False}
    if os.environ.get("XENSTORED_PATH"):
        entry["xenstored_path"] = os.environ["XENSTORED_PATH"]
    try:
        store = RealXen().open_xenstore()
    except OSError as exc:
        entry["error"] = _describe(exc)
        return entry
    with store:
        entry["reachable"] = True
        try:
            base, devices = list_devices(store)
        except (OSError, ValueError) as exc:
            entry["error"] = f"cannot list the 9pfs devices: {_describe(exc)}"
            return entry
        entry["device_directory"] = base
        entry["devices"] = [dataclasses.asdict(d) for d in devices]
    return entry


def _frontend_of(client: Client) -> Frontend:
    """The Xen frontend carrying *client*'s messages."""
    from pyxen9p.frontend import Frontend

    transport = client.transport
    if isinstance(transport, pyxen9p.SimulatedTransport):
        return transport.frontend
    if not isinstance(transport, Frontend):
        raise TypeError(f"not a Xen 9pfs transport: {transport!r}")
    return transport


def _connection_report(client: Client) -> dict[str, Any]:
    from pyxen9p.ring import ring_size

    fe = _frontend_of(client)
    rings, order = fe.num_rings, fe.ring_order
    return {
        "frontend_path": fe.path,
        "backend_path": fe.backend_path,
        "backend_id": fe.backend_id,
        "tag": fe.tag,
        "backend_versions": sorted(fe.backend_versions),
        "backend_max_rings": fe.backend_max_rings,
        "backend_max_ring_order": fe.backend_max_ring_order,
        "rings": rings,
        "ring_order": order,
        "ring_bytes_each_way": ring_size(order),
        "grants": rings * (1 + (1 << order)),
        "transport_msize": int(fe.msize),
        "version": client.version,
        "msize": client.msize,
    }


def _gather_info(ctx: _Context) -> dict[str, Any]:
    from pyxen9p.libs import xenevtchn, xengnttab, xenstore

    args = ctx.args
    report: dict[str, Any] = {
        "pyxen9p": __version__,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "hypervisor": _read_small("/sys/hypervisor/type"),
        "paths": {path: _probe_path(path) for path, _ in _XEN_PATHS},
        "kernel_9pnet_xen_loaded": os.path.isdir("/sys/module/9pnet_xen"),
        "libraries": [_probe_library(m) for m in (xengnttab, xenevtchn, xenstore)],
        "xenstore": _probe_xenstore(),
        "agents": _probe_agents(),
    }
    selection = _selection(args)
    requested = bool(selection) or args.simulate is not None
    conn: dict[str, Any] = {"simulated": args.simulate is not None, "connected": False}
    report["connection"] = conn
    if args.simulate is not None:
        conn["directory"] = os.path.abspath(args.simulate)
        conn["readonly"] = bool(args.readonly)
        _connect_simulated(ctx, conn, selection)
    elif requested:
        conn["requested"] = selection
        _connect_real(ctx, conn, selection)
    else:
        devices = report["xenstore"].get("devices")
        if args.no_connect:
            conn["reason"] = "not connecting (--no-connect)"
        elif report["xenstore"]["reachable"] and devices is not None and len(devices) == 1:
            only = devices[0]
            pick = {"devid": int(only["devid"])} if only["devid"].isdigit() else {
                "path": only["path"]}
            conn["requested"] = pick
            conn["automatic"] = True
            _connect_real(ctx, conn, pick)
        elif not report["xenstore"]["reachable"]:
            conn["reason"] = "XenStore is not reachable: no 9pfs device can be found"
        elif devices is None:
            conn["reason"] = "the 9pfs devices could not be listed"
        elif not devices:
            conn["reason"] = "this domain has no 9pfs device"
        else:
            conn["reason"] = (
                f"this domain has {len(devices)} 9pfs devices:"
                " choose one with --tag, --devid or --path to see its negotiation"
            )
    return report


def _probe_agents() -> dict[str, Any]:
    """The agents' runtime directories and the sockets found there."""
    from pyxen9p.agent import list_agents, runtime_dirs

    dirs = runtime_dirs()
    return {
        "directories": dirs,
        "found": [dataclasses.asdict(a) for a in list_agents(dirs)],
    }


def _connect_real(ctx: _Context, conn: dict[str, Any], selection: dict[str, Any]) -> None:
    from pyxen9p.agent import find_agent

    served = None if ctx.args.agent == "never" else find_agent(**selection)
    if served is not None:
        # the device is held by its agent: a second connection would be refused
        conn["agent"] = served
        try:
            client = pyxen9p.connect(server=f"unix:{served}", timeout=ctx.args.timeout)
        except (OSError, ValueError) as exc:
            conn["error"] = f"its agent at {served}: {_describe(exc)}"
            return
        with client:
            conn.update(version=client.version, msize=client.msize, connected=True)
        return
    try:
        client = pyxen9p.connect(**selection, **ctx.connect_options())
    except (OSError, ValueError) as exc:
        conn["error"] = _describe(exc) + _no_xen_hint(exc)
        return
    with client:
        conn.update(_connection_report(client), connected=True)


def _connect_simulated(ctx: _Context, conn: dict[str, Any], selection: dict[str, Any]) -> None:
    from pyxen9p.sim.share import SimulatedShare

    args = ctx.args
    try:
        share = SimulatedShare(args.simulate, readonly=args.readonly, tag=args.tag or "share")
    except (OSError, ValueError) as exc:
        conn["error"] = _describe(exc)
        return
    with share, share.guest.open_xenstore() as store:
        base, devices = list_devices(store)
        conn["device_directory"] = base
        try:
            client = pyxen9p.connect(
                platform=share.guest, **(selection or {"devid": 0}), **ctx.connect_options()
            )
        except (OSError, ValueError) as exc:
            conn["error"] = _describe(exc)
        else:
            with client:
                conn.update(_connection_report(client), connected=True)
                _, devices = list_devices(store)  # the states while connected
        conn["devices"] = [dataclasses.asdict(d) for d in devices]


def _rings(n: int) -> str:
    return f"{n} ring" if n == 1 else f"{n} rings"


def _render_info(report: dict[str, Any]) -> list[str]:
    lines = [f"pyxen9p {report['pyxen9p']} on Python {report['python']}, {report['system']}", ""]

    def row(key: str, value: str) -> None:
        lines.append(f"  {key:<22}{value}")

    lines.append("This machine")
    row("hypervisor", report["hypervisor"] or "none detected (no /sys/hypervisor/type)")
    for path, role in _XEN_PATHS:
        probe = report["paths"][path]
        state = "present" if probe["exists"] else "absent"
        if probe.get("accessible") is False:
            state += " (no read/write access)"
        row(path, f"{state:<36} {role}")
    row("9pnet_xen module", "loaded: it may claim 9pfs devices first"
        if report["kernel_9pnet_xen_loaded"] else "not loaded")
    for lib in report["libraries"]:
        if lib["loaded"]:
            text = f"loads: {lib['file']}"
            if lib.get("missing_functions"):
                text += f" (lacks {', '.join(lib['missing_functions'])})"
        else:
            text = f"does not load: {lib['error']}"
        if lib.get("override"):
            text += f" [{lib['override']}]"
        row(lib["name"], text)
    xs = report["xenstore"]
    if xs["reachable"]:
        via = f" through XENSTORED_PATH={xs['xenstored_path']}" if "xenstored_path" in xs else ""
        row("XenStore", f"reachable{via}")
    else:
        row("XenStore", f"not reachable: {xs.get('error', 'unknown error')}")
    lines.append("")
    agents = report["agents"]
    lines.append(f"Agents (pyxen9p serve; sockets in {', '.join(agents['directories']) or '-'})")
    if not agents["found"]:
        lines.append("  none")
    for a in agents["found"]:
        device = ", ".join(f"{k} {v!r}" for k, v in sorted(a["device"].items())
                           if k in ("tag", "devid", "path", "simulate", "server"))
        state = "answers" if a["answers"] else "does not answer"
        if not a["locked"]:
            state += ", no agent holds its lock (stale)"
        pid = f", pid {a['pid']}" if a["pid"] is not None else ""
        lines.append(f"  {a['socket']}: {device or 'device unknown'}; {state}{pid}")
    lines.append("")
    conn = report["connection"]
    if conn["simulated"]:
        devices = conn.get("devices")
        title = f"9pfs devices of the simulated guest ({conn.get('device_directory', '?')})"
    else:
        devices = xs.get("devices")
        title = f"9pfs devices of this domain ({xs.get('device_directory', 'unknown')})"
    lines.append(title)
    if devices is None:
        lines.append("  unknown: " + (xs.get("error") or "XenStore is not reachable"))
    elif not devices:
        lines.append("  none")
    for d in devices or []:
        tag = repr(d["tag"]) if d["tag"] is not None else "none"
        lines.append(
            f"  {d['devid']:<4} tag {tag}, state {d['state'] or '-'};"
            f" backend {d['backend'] or '-'} (domain {d['backend_id'] or '-'},"
            f" state {d['backend_state'] or '-'})"
        )
    lines.append("")
    if conn["simulated"]:
        ro = ", read-only" if conn.get("readonly") else ""
        lines.append(f"Connection (simulated Xen serving {conn['directory']}{ro})")
    else:
        how = conn.get("requested")
        what = ", ".join(f"{k} {v!r}" for k, v in how.items()) if how else "none requested"
        auto = ", the only device" if conn.get("automatic") else ""
        lines.append(f"Connection ({what}{auto})")
    if conn["connected"] and "agent" in conn:
        row("through its agent", conn["agent"])
        row("9P session", f"{conn['version']}, msize {conn['msize']}")
    elif conn["connected"]:
        versions = ", ".join(str(v) for v in conn["backend_versions"])
        row("frontend", conn["frontend_path"])
        row("backend", f"{conn['backend_path']} (domain {conn['backend_id']})")
        row("tag", str(conn["tag"]))
        row("backend offers", f"versions {versions}, max-rings {conn['backend_max_rings']},"
            f" max-ring-page-order {conn['backend_max_ring_order']}")
        row("in use", f"{_rings(conn['rings'])} of order {conn['ring_order']}"
            f" ({format_size(conn['ring_bytes_each_way'])} each way per ring,"
            f" {conn['grants']} grants)")
        row("transport msize", str(conn["transport_msize"]))
        row("9P session", f"{conn['version']}, msize {conn['msize']}")
    elif "error" in conn:
        lines.append(f"  failed: {conn['error']}")
    else:
        lines.append(f"  no 9pfs device is reachable: {conn.get('reason', 'unknown')}")
        if not conn["simulated"]:
            lines.append("  (pyxen9p --simulate DIR info shows the same over a simulated Xen)")
    return lines


def cmd_info(ctx: _Context) -> None:
    """``info``: what this machine has, what XenStore says, what was negotiated.

    Exit status: when a device was asked for (``--tag``, ``--devid``,
    ``--path``, ``--simulate``) or ``--require-device`` is given, 0 only if
    it was connected; a plain survey exits 0 whatever it found.
    """
    args = ctx.args
    report = _gather_info(ctx)
    conn = report["connection"]
    must_connect = args.require_device or bool(_selection(args)) or args.simulate is not None
    report["exit_status"] = EXIT_FAILURE if must_connect and not conn["connected"] else EXIT_OK
    if args.json:
        ctx.print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in _render_info(report):
            ctx.print(line)
    ctx.status = max(ctx.status, report["exit_status"])


def _args_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--require-device", action="store_true",
                   help="exit with status 1 unless a 9pfs device was connected")
    p.add_argument("--no-connect", action="store_true",
                   help="without a chosen device: only report what XenStore says, do not"
                        " connect to the only device")


#: The commands of this group, in the order ``--help`` lists them.
COMMANDS = (
    _Command("info", cmd_info, "what this machine has and what was negotiated",
             "Report the Xen libraries that load, the Xen device files, whether XenStore"
             " is reachable, the 9pfs devices of this domain, and, for the chosen device"
             " (or the only one, unless --no-connect), what was negotiated by connecting to"
             " it and disconnecting: frontend and backend paths, backend"
             " id, tag, versions, max-rings, max-ring-page-order, the rings and ring order"
             " in use, the msize of the transport and of the 9P session.  It works on any"
             " machine.  Exit status: a plain survey exits 0 whatever it finds (no Xen"
             " is an answer, not a failure); when a device was asked for (--tag, --devid,"
             " --path, --simulate) or --require-device is given, it exits 0 only if a"
             " device was connected, else 1.",
             "  pyxen9p info\n  pyxen9p --tag share info --json\n"
             "  pyxen9p info --require-device && echo usable\n"
             "  pyxen9p --simulate /tmp/x info", _args_info),
)
