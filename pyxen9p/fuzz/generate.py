"""Case generators, one per layer the backend trusts; every case is reproducible.

:func:`generate_case` makes case *number* of a run seeded with *seed*; it
depends on nothing else (not on earlier cases, the clock or the backend), so
``(seed, number)`` names a case for good.

* **xenbus** -- the XenBus handshake and XenStore: frontend states out of
  order or repeated (Initialised twice, Closing mid-request, reconnect after
  Closed), bad ``version``, ``num-rings``, ``ring-ref<N>``,
  ``event-channel-<N>`` values, nodes removed under the backend.
* **ring** -- the interface page and the data rings: ``ring_order`` out of
  range, grant references that do not map, producer and consumer indices
  that jump, lie or wrap, a message published in pieces or never finished,
  a tag sent on the wrong ring, notification storms and silences.
* **p9** -- 9P messages built with :mod:`pyxen9p.p9.codec` (every message
  type of 9P2000.L and 9P2000.u, replies and unknown types too) and then
  mutated: sizes, string lengths and counts that lie, fid and tag misuse,
  huge counts, walks that try to leave the export.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from pyxen9p.fuzz.case import Case, Step
from pyxen9p.p9 import codec
from pyxen9p.ring import ring_size

__all__ = ["LAYERS", "build_message", "generate_case", "message_types"]

#: The layers, in the order ``--layers`` lists them.
LAYERS = ("xenbus", "ring", "p9")

#: Names that try to leave the export, or are otherwise odd.
ODD_NAMES = (
    "..", "../fuzz-escape", "../../fuzz-escape", "a/../../fuzz-escape", "/fuzz-escape",
    "fuzz-escape", ".", "", "x" * 255, "x" * 300, "a\x00b", "\udcff\udcfe", "dir", "file",
)  # fmt: skip
_FIDS = (0, 1, 2, 3, 7, codec.NOFID, 0x7FFFFFFF)
_COUNTS = (0, 1, 7, 4096, 8192, 0x7FFFFFFF, 0xFFFFFFFF)
_U64_EDGES = (0, 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
#: Requests that take a file name.
_PATH_OPS = frozenset(("Twalk", "Tmkdir", "Tlcreate", "Tsymlink", "Tmknod", "Tlink", "Trenameat",
                       "Tunlinkat", "Trename", "Tcreate", "Txattrwalk"))
_TVERSION = codec.MessageType.TVERSION
_TATTACH = codec.MessageType.TATTACH


def message_types() -> dict[int, type[codec.Message]]:
    """Every message class of both dialects (T and R), by type number."""
    return {**codec.message_classes(codec.VERSION_9P2000_L),
            **codec.message_classes(codec.VERSION_9P2000_U)}  # fmt: skip


def _rng(seed: int, number: int, salt: str = "") -> random.Random:
    return random.Random(f"pyxen9p-fuzz:{seed}:{number}:{salt}")


def _u(rng: random.Random, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice((0, 1, top, top >> 1, rng.randint(0, top)))


def _field_value(rng: random.Random, name: str, kind: str) -> Any:
    if kind == "u8":
        return _u(rng, 8)
    if kind == "u16":
        return _u(rng, 16)
    if kind == "u32":
        if "fid" in name:
            return rng.choice(_FIDS)
        if name in ("count", "msize", "iounit", "length"):
            return rng.choice(_COUNTS)
        if name in ("n_uname", "uid", "gid"):
            return rng.choice((0, 1000, codec.NONUNAME))
        if name in ("flags", "mode", "perm", "valid", "request_mask"):
            return rng.choice((0, 0o644, 0o755, 0o100000 | 0o644, 0xFFFFFFFF, rng.getrandbits(32)))
        return _u(rng, 32)
    if kind in ("u64", "i64"):
        value = rng.choice((*_U64_EDGES, rng.getrandbits(64)))
        return value - (1 << 64) if kind == "i64" and value >= 1 << 63 else value
    if kind == "qid":
        return codec.Qid(_u(rng, 8), _u(rng, 32), rng.choice(_U64_EDGES))
    if kind == "s":
        if name == "version":
            return rng.choice((codec.VERSION_9P2000_L, codec.VERSION_9P2000_U, "9P2000", "",
                               "9P2000.X", "9P2000.L\x00"))  # fmt: skip
        return rng.choice(ODD_NAMES)
    if kind == "strs":
        return [rng.choice(ODD_NAMES) for _ in range(rng.choice((0, 1, 2, 3, 16)))]
    if kind == "qids":
        return [codec.Qid(0, 0, rng.getrandbits(16)) for _ in range(rng.choice((0, 1, 16)))]
    if kind == "data":
        return rng.randbytes(rng.choice((0, 1, 16, 200)))
    if kind == "stat":
        return codec.Stat(
            _u(rng, 16), _u(rng, 32), codec.Qid(0, 0, 1), _u(rng, 32), _u(rng, 32), _u(rng, 32),
            rng.choice(_U64_EDGES), rng.choice(ODD_NAMES), "", "", "", "", 0, 0, 0,
        )  # fmt: skip
    raise AssertionError(f"unknown field kind {kind!r}")  # pragma: no cover


def build_message(rng: random.Random, cls: type[codec.Message], tag: int) -> bytes:
    """A well-encoded *cls* message with hostile field values (fids, counts, names)."""
    values: dict[str, Any] = {}
    for item in cls._WIRE.split():
        name, _, kind = item.partition(":")
        values[name] = _field_value(rng, name, kind)
    for _ in range(8):
        try:
            return codec.encode(cls(tag=tag, **values))
        except (codec.ProtocolError, TypeError, ValueError):
            # a value the wire cannot hold (e.g. a name that is not encodable): simplify
            values = {k: (0 if isinstance(v, int) else v) for k, v in values.items()}
            values = {k: ("x" if isinstance(v, str) else v) for k, v in values.items()}
    return struct.pack("<IBH", 7, cls.TYPE, tag)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One lie in an encoded message: its size field, its length, a count, a byte."""
    raw = bytearray(data)
    how = rng.randrange(6)
    if how == 0:  # size field that lies
        struct.pack_into("<I", raw, 0, rng.choice((0, 6, 7, len(raw) - 1, len(raw) + 1,
                                                   len(raw) + 4096, 0xFFFFFFFF)))  # fmt: skip
    elif how == 1 and len(raw) > 7:  # truncated, size patched to match
        raw = raw[: rng.randint(7, len(raw) - 1)]
        struct.pack_into("<I", raw, 0, len(raw))
    elif how == 2:  # trailing junk, size patched to match
        raw += rng.randbytes(rng.choice((1, 3, 64)))
        struct.pack_into("<I", raw, 0, len(raw))
    elif how == 3 and len(raw) >= 9:  # a 16-bit length or count inside the body that lies
        at = rng.randrange(7, len(raw) - 1)
        struct.pack_into("<H", raw, at, rng.choice((0xFFFF, 0x8000, len(raw))))
    elif how == 4 and len(raw) >= 11:  # a 32-bit count inside the body that lies
        at = rng.randrange(7, len(raw) - 3)
        struct.pack_into("<I", raw, at, rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 1 << 20)))
    elif len(raw) > 7:  # a flipped byte
        at = rng.randrange(4, len(raw))
        raw[at] ^= 1 << rng.randrange(8)
    return bytes(raw)


def _msg(data: bytes, ring: int | None = None) -> Step:
    step: Step = {"op": "msg", "data": data.hex()}
    if ring is not None:
        step["ring"] = ring
    return step


def _session(rng: random.Random, dialect: str) -> list[Step]:
    """Tversion then Tattach of fid 0, as a client starts."""
    version = codec.encode(codec.Tversion(tag=codec.NOTAG, msize=8192, version=dialect))
    attach = codec.encode(codec.Tattach(
        tag=rng.randrange(16), fid=0, afid=codec.NOFID, uname="root", aname="",
        n_uname=0 if dialect == codec.VERSION_9P2000_L else codec.NONUNAME,
    ))  # fmt: skip
    return [_msg(version), _msg(attach)]


def _connect(rng: random.Random) -> Step:
    step: Step = {"op": "connect", "rings": rng.choice((1, 1, 2)),
                  "order": rng.choice((1, 1, 2, 3))}  # fmt: skip
    if rng.random() < 0.5:  # keys and Initialised in one transaction, as Linux writes them
        step["txn"] = True
    return step


def _gen_p9(rng: random.Random) -> list[Step]:
    dialect = rng.choice((codec.VERSION_9P2000_L, codec.VERSION_9P2000_U))
    steps: list[Step] = [_connect(rng), *_session(rng, dialect)]
    own = codec.message_classes(dialect)
    every = message_types()
    for _ in range(rng.randint(2, 10)):
        tag = rng.choice((1, 2, 3, rng.randrange(0x10000), codec.NOTAG))
        pick = rng.random()
        if pick < 0.08:  # an unknown type number
            mtype = rng.choice((0, 1, 6, 99, 128, 200, 255))
            data = struct.pack("<IBH", 7 + 8, mtype, tag) + rng.randbytes(8)
        elif pick < 0.35:  # the operations that name files: walks out of the export
            cls = rng.choice([c for c in own.values() if c.__name__ in _PATH_OPS])
            data = build_message(rng, cls, tag)
        else:
            table = own if pick < 0.8 else every  # some from the other dialect, replies too
            requests = [c for t, c in sorted(table.items()) if t % 2 == 0 or pick >= 0.8]
            cls = rng.choice(requests)
            data = build_message(rng, cls, tag)
            if rng.random() < 0.3:
                data = _mutate(rng, data)
        steps.append(_msg(data))
    return steps


def _gen_ring(rng: random.Random) -> list[Step]:
    connect = _connect(rng)
    rings, order = connect["rings"], connect["order"]
    size = ring_size(order)
    steps: list[Step] = [connect]
    if rng.random() < 0.3:  # the interface page lies from the start
        steps[0] = {**connect, "ring_order": rng.choice((0, 10, 11, 31, 0xFFFFFFFF)),
                    "refs": rng.choice(("ok", "bogus", "zero", "interface"))}  # fmt: skip
    elif rng.random() < 0.2:
        steps[0] = {**connect, "refs": rng.choice(("bogus", "zero", "interface"))}
    if rng.random() < 0.7:
        steps.append(_session(rng, codec.VERSION_9P2000_L)[0])
    ring = rng.randrange(rings)
    for _ in range(rng.randint(1, 6)):
        what = rng.randrange(9)
        tag = rng.randrange(1, 64)
        whole = codec.encode(codec.Tclunk(tag=tag, fid=rng.choice(_FIDS)))
        if what == 0:  # published in pieces, maybe never finished
            data = build_message(rng, codec.Twalk, tag)
            cut = rng.randint(1, len(data) - 1)
            steps.append({"op": "put", "ring": tag % rings, "data": data.hex(), "publish": cut})
            if rng.random() < 0.5:
                steps.append({"op": "sleep", "seconds": rng.choice((0.05, 0.3))})
                steps.append({"op": "publish", "ring": tag % rings, "count": len(data) - cut})
        elif what == 1:  # producer index that lies
            steps.append({"op": "index", "ring": ring, "field": "out_prod",
                          "delta": rng.choice((size + 1, 2 * size, -1, -7, 0x80000000, 7))})
        elif what == 2:  # consumer index that lies
            steps.append({"op": "index", "ring": ring, "field": "in_cons",
                          "delta": rng.choice((size + 1, -1, 0x80000000, 3))})
        elif what == 3:  # indices near the wrap point (both ends agree)
            steps.append({"op": "wrap", "ring": ring, "value": rng.choice(
                (0xFFFFFFF0, 0xFFFFFFFF - size // 2, 0x7FFFFFF8))})
            steps.append(_msg(whole))
        elif what == 4:  # a tag on the wrong ring
            wrong = (tag % rings + 1) % max(rings, 2)
            steps.append(_msg(whole, ring=wrong))
        elif what == 5:  # the interface page changed after connect
            steps.append({"op": "intf", "ring": ring, "field": rng.choice(("ring_order", "ref")),
                          "value": rng.choice((0, 9, 10, 0xFFFFFFFF, 1))})
            steps.append(_msg(whole))
        elif what == 6:  # a storm of notifications
            steps.append({"op": "notify", "ring": ring, "count": rng.choice((10, 100, 500))})
        elif what == 7:  # silence
            steps.append({"op": "sleep", "seconds": rng.choice((0.05, 0.2, 0.5))})
        else:  # a message whose size field exceeds the ring
            raw = bytearray(whole)
            struct.pack_into("<I", raw, 0, rng.choice((size + 1, 2 * size, 0xFFFFFFFF)))
            steps.append({"op": "put", "ring": tag % rings, "data": bytes(raw).hex()})
    return steps


_BAD_UINTS = ("", "0", "-1", "1x", " 1", "4294967296", "99999999999", "0x1", "\x00", "9")


def _gen_xenbus(rng: random.Random) -> list[Step]:
    steps: list[Step] = []
    if rng.random() < 0.75:
        steps.append(_connect(rng))
    else:  # a handshake with bad values
        connect = _connect(rng)
        key = rng.choice(("version", "num-rings", "ring-ref0", "event-channel-0"))
        steps.append({"op": "setup", "rings": connect["rings"], "order": connect["order"],
                      "keys": {key: rng.choice(_BAD_UINTS)}})  # fmt: skip
        steps.append({"op": "state", "value": "3"})
    choices = (
        ("close", 20), ("reinit", 15), ("connect", 20), ("state", 15), ("rm", 8), ("write", 8),
        ("setup", 4), ("msg", 6), ("sleep", 4),
    )
    ops, weights = zip(*choices, strict=True)
    for _ in range(rng.randint(1, 6)):
        op = rng.choices(ops, weights)[0]
        if op == "connect":
            steps.append(_connect(rng))
        elif op == "state":
            steps.append({"op": "state", "value": rng.choice(
                ("1", "2", "3", "3", "4", "5", "6", "7", "8", "0", "9", "-1", "x", ""))})
        elif op == "rm":
            steps.append({"op": "rm", "key": rng.choice(
                ("state", "ring-ref0", "event-channel-0", "num-rings", "version", "tag", ""))})
        elif op == "write":
            steps.append({"op": "write", "key": rng.choice(
                ("ring-ref0", "event-channel-0", "num-rings", "version", "tag")),
                "value": rng.choice(_BAD_UINTS)})  # fmt: skip
        elif op == "setup":
            steps.append({"op": "setup", "rings": rng.choice((1, 2)), "order": 1})
        elif op == "msg":
            steps.append(_session(rng, codec.VERSION_9P2000_L)[0])
        elif op == "sleep":
            steps.append({"op": "sleep", "seconds": 0.2})
        else:
            steps.append({"op": op})
    return steps


_GENERATORS = {"xenbus": _gen_xenbus, "ring": _gen_ring, "p9": _gen_p9}


def generate_case(seed: int, number: int, layers: tuple[str, ...] = LAYERS) -> Case:
    """Case *number* of the run seeded *seed*, aimed at one of *layers*.

    :raises ValueError: an unknown layer, or none
    """
    unknown = [layer for layer in layers if layer not in _GENERATORS]
    if unknown or not layers:
        raise ValueError(f"unknown layers {unknown}; known: {', '.join(LAYERS)}")
    rng = _rng(seed, number)
    layer = rng.choice(sorted(layers, key=LAYERS.index))
    return Case(seed, number, layer, _GENERATORS[layer](_rng(seed, number, layer)))
