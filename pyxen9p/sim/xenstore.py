"""A simulated XenStore, in pure Python.

:class:`XenStoreTree` is the store itself (what ``xenstored`` holds): a
thread-safe tree of nodes with ``bytes`` values, access lists, transactions,
watches and the bookkeeping of introduced domains, with the semantics of the
C ``xenstored`` of Xen 4.17:

* a path is absolute (``/a/b``) or relative to the caller's
  ``/local/domain/<domid>``; names use ``[A-Za-z0-9-/_@]`` only, without
  doubled or trailing slashes (else ``EINVAL``);
* every node has an access list whose first entry names the owner and the
  rights of domains not listed; domain 0 is privileged, the owner may do
  anything, others need ``READ``/``WRITE``; a new node inherits its parent's
  list, and a node created by an unprivileged domain is owned by it;
* a transaction works on a snapshot and its commit fails with ``EAGAIN`` if a
  node it read or wrote was changed by someone else since it started;
* a watch fires once when registered, then for every change at or below its
  path (for a removal also for watches below the removed node), only for
  watchers allowed to read the changed node (or its parent); the special
  paths ``@introduceDomain`` and ``@releaseDomain`` fire on domain changes.

:class:`SimXenStore` is one connection of one domain to a tree, with the API
of :class:`pyxen9p.libs.xenstore.XenStore`.  :mod:`pyxen9p.sim.xenstored`
serves a tree on a Unix socket with the real wire protocol.

Failures raise :class:`OSError` carrying the errno xenstored answers
(``OSError(errno.ENOENT, ...)`` is a :class:`FileNotFoundError`, and so on).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from typing_extensions import Self

from pyxen9p._shared import Watch, retry_transactions, run_transaction
from pyxen9p.errors import HandleClosedError, TransactionConflictError
from pyxen9p.interfaces import Permission, PermissionFlag, WatchEvent

__all__ = [
    "DOMID_FIRST_RESERVED",
    "SPECIAL_PATHS",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_REL_PATH_MAX",
    "SimTransaction",
    "SimWatch",
    "SimXenStore",
    "TreeTransaction",
    "WatchRegistration",
    "XenStoreTree",
    "permission_from_string",
    "permission_to_string",
]

_log = logging.getLogger(__name__)

#: Longest absolute path (``xs_wire.h``).
XENSTORE_ABS_PATH_MAX = 3072
#: Longest path below a domain's home an unprivileged domain may use.
XENSTORE_REL_PATH_MAX = 2048
#: Domain ids from here on are special (``DOMID_SELF``...), not domains.
DOMID_FIRST_RESERVED = 0x7FF0
#: The watchable paths xenstored invents for domain events.
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")

_READ = int(PermissionFlag.READ)
_WRITE = int(PermissionFlag.WRITE)
_OWNER = 8  # XS_PERM_OWNER: internal, never stored
_ALL = _READ | _WRITE | _OWNER
_VALID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")
_PERM_LETTERS = {"n": 0, "r": _READ, "w": _WRITE, "b": _READ | _WRITE}
_LETTER_OF = {v: k for k, v in _PERM_LETTERS.items()}

# xenstored's default quotas for unprivileged domains
_QUOTA_ENTRY_SIZE = 2048
_QUOTA_PERMS_PER_NODE = 5
_QUOTA_WATCHES_PER_DOMAIN = 128
_QUOTA_TRANSACTIONS = 10


def _error(code: int, detail: str | None = None) -> OSError:
    """An :class:`OSError` for *code* (Python picks the subclass)."""
    if detail is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), detail)


def permission_to_string(permission: Permission) -> str:
    """Format an access-list entry as on the wire: ``n0``, ``r5``, ``w7``, ``b3``.

    :param permission: the entry
    :returns: the letter (``n`` none, ``r`` read, ``w`` write, ``b`` both) and the domid
    """
    return f"{_LETTER_OF[int(permission.perms) & (_READ | _WRITE)]}{permission.domid}"


def permission_from_string(text: str) -> Permission:
    """Parse a wire access-list entry such as ``r5``.

    :param text: a letter among ``n r w b`` followed by a decimal domid
    :returns: the entry
    :raises OSError: ``EINVAL`` if *text* is malformed
    """
    letter, digits = text[:1], text[1:]
    if letter not in _PERM_LETTERS or not digits.isdigit() or not digits.isascii():
        raise _error(errno.EINVAL, f"bad permission {text!r}")
    domid = int(digits)
    if domid > 0xFFFF:
        raise _error(errno.EINVAL, f"bad domid in permission {text!r}")
    return Permission(domid, PermissionFlag(_PERM_LETTERS[letter]))


def _parent(name: str) -> str:
    cut = name.rfind("/")
    return "/" if cut <= 0 else name[:cut]


def _basename(name: str) -> str:
    return name[name.rfind("/") + 1 :]


def _join(parent: str, child: str) -> str:
    return f"/{child}" if parent == "/" else f"{parent}/{child}"


def _is_child(child: str, parent: str) -> bool:
    """Whether *child* is *parent* or below it (``/`` is above everything)."""
    if parent == "/":
        return True
    return child == parent or child.startswith(parent + "/")


def _check_permissions(permissions: Sequence[Permission]) -> tuple[Permission, ...]:
    perms = tuple(permissions)
    if not perms:
        raise _error(errno.EINVAL, "an access list needs at least the owner entry")
    for entry in perms:
        if not isinstance(entry, Permission):
            raise TypeError(f"access-list entries are Permission, not {type(entry).__name__}")
        if not 0 <= entry.domid <= 0xFFFF or int(entry.perms) & ~(_READ | _WRITE):
            raise _error(errno.EINVAL, f"bad access-list entry {entry!r}")
    return tuple(Permission(p.domid, PermissionFlag(int(p.perms))) for p in perms)


@dataclass(frozen=True)
class _Node:
    value: bytes
    perms: tuple[Permission, ...]
    children: tuple[str, ...]
    gen: int


@dataclass
class _Domain:
    mfn: int
    port: int
    target: int | None = None
    shutdown: bool = False


@dataclass
class _Event:
    """A change to report to watchers.

    ``perm_sets``: a watcher that may read by any of these access lists is
    told.  ``removed``: for a removal, the access list of every removed node
    (watches below the removed node fire with their own path).
    """

    name: str
    perm_sets: tuple[tuple[Permission, ...], ...] = ()
    removed: dict[str, tuple[Permission, ...]] | None = None


@dataclass(eq=False)
class WatchRegistration:
    """A watch registered in a :class:`XenStoreTree` (see :meth:`XenStoreTree.add_watch`).

    :ivar domid: the watching domain (its rights filter the events)
    :ivar node: the watched absolute path (or special ``@`` path)
    :ivar token: the token reported with each event
    :ivar relative_prefix: the domain path if the watch was given relative
        (events are then reported relative to it), else ``None``
    :ivar sink: called as ``sink(path, token)`` for each event, with the
        tree's lock held: it must only queue the event
    :ivar owner: the connection the watch belongs to
    """

    domid: int
    node: str
    token: str
    relative_prefix: str | None
    sink: Callable[[str, str], None]
    owner: object

    def event_path(self, name: str) -> str:
        """The path reported to this watch for a change of absolute *name*."""
        prefix = self.relative_prefix
        if prefix is None or not name.startswith(prefix):
            return name
        rest = name[len(prefix) :]
        return rest[1:] if rest.startswith("/") else rest


@dataclass(eq=False)
class TreeTransaction:
    """A transaction of a :class:`XenStoreTree` (see
    :meth:`XenStoreTree.transaction_start`).

    :ivar id: a non-zero 32-bit id, unique among the tree's open transactions
    :ivar domid: the domain that started it
    """

    id: int
    domid: int
    _start_gen: int
    _nodes: dict[str, _Node]
    _accessed: set[str] = field(default_factory=set)
    _modified: dict[str, None] = field(default_factory=dict)
    _events: list[_Event] = field(default_factory=list)


class _View:
    """Where one operation reads and writes nodes: the live tree or a transaction."""

    def __init__(self, tree: XenStoreTree, txn: TreeTransaction | None) -> None:
        self.tree = tree
        self.txn = txn

    def get(self, name: str) -> _Node | None:
        txn = self.txn
        if txn is None:
            return self.tree._nodes.get(name)
        txn._accessed.add(name)
        return txn._nodes.get(name)

    def peek(self, name: str) -> _Node | None:
        """Like :meth:`get`, without counting as an access of the transaction."""
        txn = self.txn
        return self.tree._nodes.get(name) if txn is None else txn._nodes.get(name)

    def put(self, name: str, node: _Node) -> _Node:
        tree = self.tree
        node = replace(node, gen=tree._next_gen())
        txn = self.txn
        if txn is None:
            tree._nodes[name] = node
            tree._tombstones.pop(name, None)
        else:
            txn._accessed.add(name)
            txn._modified[name] = None
            txn._nodes[name] = node
        return node

    def delete(self, name: str) -> None:
        tree = self.tree
        txn = self.txn
        if txn is None:
            if tree._nodes.pop(name, None) is not None and tree._transactions:
                tree._tombstones[name] = tree._next_gen()
        else:
            txn._accessed.add(name)
            txn._modified[name] = None
            txn._nodes.pop(name, None)

    def emit(self, event: _Event) -> None:
        if self.txn is None:
            self.tree._fire(event)
        else:
            self.txn._events.append(event)


class XenStoreTree:
    """A thread-safe in-memory XenStore (the daemon's database).

    Node operations take the calling domain's id first (domain 0 is
    privileged) and optionally a :class:`TreeTransaction`.  The tree starts
    with ``/``, ``/tool`` and ``/tool/xenstored`` (as xenstored does) and
    with domain 0 introduced.

    :param introduce_dom0: introduce domain 0 (creating ``/local/domain/0``)
    """

    def __init__(self, *, introduce_dom0: bool = True) -> None:
        #: The tree's lock (re-entrant).  Watch sinks run with it held.
        self.lock = threading.RLock()
        self._gen = 0
        root = (Permission(0, PermissionFlag.NONE),)
        self._nodes: dict[str, _Node] = {
            "/": _Node(b"", root, ("tool",), 0),
            "/tool": _Node(b"", root, ("xenstored",), 0),
            "/tool/xenstored": _Node(b"", root, (), 0),
        }
        self._tombstones: dict[str, int] = {}
        self._transactions: dict[int, TreeTransaction] = {}
        self._next_txid = 1
        self._watches: list[WatchRegistration] = []
        self._domains: dict[int, _Domain] = {}
        self._special_perms: dict[str, tuple[Permission, ...]] = dict.fromkeys(
            SPECIAL_PATHS, root
        )
        if introduce_dom0:
            self.introduce_domain(0)

    # --- helpers ------------------------------------------------------------

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def _privileged(self, domid: int) -> bool:
        return domid == 0

    def _perm_for(self, domid: int, perms: tuple[Permission, ...]) -> int:
        """The rights of *domid* on a node with access list *perms* (``perm_for_conn``)."""
        domain = self._domains.get(domid)
        target = domain.target if domain is not None else None
        if self._privileged(domid) or perms[0].domid == domid or perms[0].domid == target:
            return _ALL
        for entry in perms[1:]:
            if entry.domid == domid or entry.domid == target:
                return int(entry.perms) & (_READ | _WRITE)
        return int(perms[0].perms) & (_READ | _WRITE)

    def _canonical(self, domid: int, path: str) -> str:
        """The absolute, validated name of *path* as given by *domid*."""
        if not isinstance(path, str):
            raise TypeError(f"XenStore paths are str, not {type(path).__name__}")
        name = path if path.startswith("/") else f"{self.get_domain_path(domid)}/{path}"
        if (
            (name.endswith("/") and name != "/")
            or "//" in name
            or len(name) > XENSTORE_ABS_PATH_MAX
            or not _VALID_CHARS.issuperset(name)
        ):
            raise _error(errno.EINVAL, path)
        if not self._privileged(domid):
            home = self.get_domain_path(domid) + "/"
            if name.startswith(home) and len(name) - len(home) > XENSTORE_REL_PATH_MAX:
                raise _error(errno.EINVAL, path)
        return name

    def _view(self, domid: int, txn: TreeTransaction | None) -> _View:
        if txn is not None and (self._transactions.get(txn.id) is not txn or txn.domid != domid):
            raise _error(errno.ENOENT, f"no open transaction {txn.id}")
        return _View(self, txn)

    def _get_node(self, view: _View, domid: int, name: str, perm: int) -> _Node:
        """``get_node``: the node, if *domid* has the rights *perm* on it.

        A missing node is ``ENOENT`` and a forbidden one ``EACCES``; either is
        reported as ``EACCES`` if the nearest existing ancestor does not
        grant *perm* either (the caller may not learn what exists there).
        """
        node = view.get(name)
        if node is not None:
            if self._perm_for(domid, node.perms) & perm == perm:
                return node
            code = errno.EACCES
        else:
            code = errno.ENOENT
        ancestor: _Node | None = None
        walk = name
        while ancestor is None and walk != "/":
            walk = _parent(walk)
            ancestor = view.get(walk)
        if ancestor is None or not self._perm_for(domid, ancestor.perms) & perm:
            code = errno.EACCES
        raise _error(code, name)

    def _parent_perms(self, view: _View, name: str) -> tuple[tuple[Permission, ...], ...]:
        if name == "/":
            return ()
        parent = view.peek(_parent(name))
        return (parent.perms,) if parent is not None else ()

    def _check_entry_size(
        self, domid: int, value: bytes, node: _Node | None, perms: tuple[Permission, ...]
    ) -> None:
        if self._privileged(domid):
            return
        children = sum(len(c) + 1 for c in node.children) if node is not None else 0
        # sizeof(struct xs_tdb_record_hdr) + perms + data + children, as xenstored
        if 24 + 8 * len(perms) + len(value) + children >= _QUOTA_ENTRY_SIZE:
            raise _error(errno.ENOSPC, "node too large")

    def _create(self, view: _View, domid: int, name: str, value: bytes) -> _Node:
        """``create_node``: make *name* and its missing ancestors."""
        missing = [name]
        parent_name = _parent(name)
        parent = view.get(parent_name)
        while parent is None:
            if parent_name == "/":
                raise _error(errno.EIO, "the root node is missing")
            missing.append(parent_name)
            parent_name = _parent(parent_name)
            parent = view.get(parent_name)
        if not self._perm_for(domid, parent.perms) & _WRITE:
            raise _error(errno.EACCES, name)
        perms = parent.perms
        if not self._privileged(domid):
            perms = (Permission(domid, perms[0].perms), *perms[1:])
        self._check_entry_size(domid, value, None, perms)
        node = parent
        for child_name in reversed(missing):
            view.put(parent_name, replace(node, children=(*node.children, _basename(child_name))))
            node = view.put(
                child_name, _Node(value if child_name == name else b"", perms, (), 0)
            )
            parent_name = child_name
        return node

    # --- node operations ----------------------------------------------------

    def read(self, domid: int, path: str, txn: TreeTransaction | None = None) -> bytes:
        """``XS_READ``: the value of *path*.

        :param domid: the calling domain
        :param path: absolute, or relative to the caller's domain path
        :param txn: a transaction of *domid*, or ``None``
        :raises OSError: ``ENOENT``, ``EACCES``, ``EINVAL``
        """
        with self.lock:
            view = self._view(domid, txn)
            return self._get_node(view, domid, self._canonical(domid, path), _READ).value

    def write(
        self, domid: int, path: str, value: bytes | str, txn: TreeTransaction | None = None
    ) -> None:
        """``XS_WRITE``: create or replace *path* (missing parents are created
        with empty values); a ``str`` value is UTF-8 encoded.

        :raises OSError: ``EACCES``, ``EINVAL``, ``ENOSPC`` (quota of an
            unprivileged domain)
        """
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        with self.lock:
            view = self._view(domid, txn)
            name = self._canonical(domid, path)
            try:
                node = self._get_node(view, domid, name, _WRITE)
            except FileNotFoundError:
                node = self._create(view, domid, name, data)
            else:
                self._check_entry_size(domid, data, node, node.perms)
                node = view.put(name, replace(node, value=data))
            view.emit(_Event(name, (node.perms, *self._parent_perms(view, name))))

    def mkdir(self, domid: int, path: str, txn: TreeTransaction | None = None) -> None:
        """``XS_MKDIR``: create *path* with an empty value unless it exists.

        :raises OSError: ``EACCES`` (also if it exists but is not writable),
            ``EINVAL``
        """
        with self.lock:
            view = self._view(domid, txn)
            name = self._canonical(domid, path)
            try:
                self._get_node(view, domid, name, _WRITE)
            except FileNotFoundError:
                node = self._create(view, domid, name, b"")
                view.emit(_Event(name, (node.perms, *self._parent_perms(view, name))))

    def rm(self, domid: int, path: str, txn: TreeTransaction | None = None) -> None:
        """``XS_RM``: remove *path* and its subtree.

        Removing a missing node is fine if its parent exists.

        :raises OSError: ``ENOENT`` (parent missing too), ``EACCES``,
            ``EINVAL`` (also for ``/``)
        """
        with self.lock:
            view = self._view(domid, txn)
            name = self._canonical(domid, path)
            try:
                node = self._get_node(view, domid, name, _WRITE)
            except FileNotFoundError:
                if name != "/" and view.get(_parent(name)) is not None:
                    return
                raise
            if name == "/":
                raise _error(errno.EINVAL, "cannot remove /")
            parent_name = _parent(name)
            parent = view.get(parent_name)
            if parent is None:
                raise _error(errno.EINVAL, name)
            removed: dict[str, tuple[Permission, ...]] = {}
            order: list[str] = []
            stack = [(name, node)]
            while stack:
                current, current_node = stack.pop()
                removed[current] = current_node.perms
                order.append(current)
                for child in current_node.children:
                    child_name = _join(current, child)
                    child_node = view.get(child_name)
                    if child_node is not None:
                        stack.append((child_name, child_node))
            for current in reversed(order):
                view.delete(current)
            base = _basename(name)
            children = tuple(c for c in parent.children if c != base)
            view.put(parent_name, replace(parent, children=children))
            view.emit(_Event(name, (node.perms, parent.perms), removed))

    def directory(self, domid: int, path: str, txn: TreeTransaction | None = None) -> list[str]:
        """``XS_DIRECTORY``: the names of the children of *path*, in creation order.

        :raises OSError: ``ENOENT``, ``EACCES``, ``EINVAL``
        """
        return self.directory_generation(domid, path, txn)[1]

    def directory_generation(
        self, domid: int, path: str, txn: TreeTransaction | None = None
    ) -> tuple[int, list[str]]:
        """Like :meth:`directory`, with the node's generation count (which
        changes whenever the node does; used by ``XS_DIRECTORY_PART``).

        :returns: ``(generation, children)``
        """
        with self.lock:
            view = self._view(domid, txn)
            node = self._get_node(view, domid, self._canonical(domid, path), _READ)
            return node.gen, list(node.children)

    def get_permissions(
        self, domid: int, path: str, txn: TreeTransaction | None = None
    ) -> list[Permission]:
        """``XS_GET_PERMS``: the access list of *path* (owner first).

        *path* may also be ``@introduceDomain`` or ``@releaseDomain``.

        :raises OSError: ``ENOENT``, ``EACCES``, ``EINVAL``
        """
        with self.lock:
            if isinstance(path, str) and path.startswith("@"):
                perms = self._special(path)
                if not self._perm_for(domid, perms) & _READ:
                    raise _error(errno.EACCES, path)
                return list(perms)
            view = self._view(domid, txn)
            return list(self._get_node(view, domid, self._canonical(domid, path), _READ).perms)

    def set_permissions(
        self,
        domid: int,
        path: str,
        permissions: Sequence[Permission],
        txn: TreeTransaction | None = None,
    ) -> None:
        """``XS_SET_PERMS``: replace the access list of *path*.

        The caller must own the node (or be privileged); an unprivileged owner
        may not give the node away.  *path* may also be a special ``@`` path.

        :raises OSError: ``EACCES``, ``EPERM`` (owner change), ``EINVAL``,
            ``ENOSPC`` (more than 5 entries from an unprivileged domain), ``ENOENT``
        """
        perms = _check_permissions(permissions)
        with self.lock:
            if not self._privileged(domid) and len(perms) > _QUOTA_PERMS_PER_NODE:
                raise _error(errno.ENOSPC, "too many access-list entries")
            if isinstance(path, str) and path.startswith("@"):
                old = self._special(path)
                if self._perm_for(domid, old) & (_WRITE | _OWNER) != _WRITE | _OWNER:
                    raise _error(errno.EACCES, path)
                self._special_perms[path] = perms
                return
            view = self._view(domid, txn)
            name = self._canonical(domid, path)
            node = self._get_node(view, domid, name, _WRITE | _OWNER)
            if not self._privileged(domid) and perms[0].domid != node.perms[0].domid:
                raise _error(errno.EPERM, f"{name}: only a privileged domain may change the owner")
            view.put(name, replace(node, perms=perms))
            view.emit(_Event(name, (perms, node.perms, *self._parent_perms(view, name))))

    def _special(self, path: str) -> tuple[Permission, ...]:
        perms = self._special_perms.get(path)
        if perms is None:
            raise _error(errno.EINVAL, f"{path} is not a special path")
        return perms

    # --- transactions -------------------------------------------------------

    def transaction_start(self, domid: int) -> TreeTransaction:
        """``XS_TRANSACTION_START``: a transaction of *domid* on a snapshot of the tree.

        :returns: the transaction; end it with :meth:`transaction_end`
        """
        with self.lock:
            txid = self._next_txid
            while txid == 0 or txid in self._transactions:
                txid = (txid + 1) & 0xFFFFFFFF
            self._next_txid = (txid + 1) & 0xFFFFFFFF
            txn = TreeTransaction(txid, domid, self._gen, dict(self._nodes))
            self._transactions[txid] = txn
            return txn

    def transaction_end(self, txn: TreeTransaction, commit: bool = True) -> None:
        """``XS_TRANSACTION_END``: commit (or with *commit* false, abort) *txn*.

        The transaction is finished either way.

        :raises OSError: ``EAGAIN`` if a node the transaction read or wrote
            was changed by another party since it started (nothing is
            applied: start again); ``ENOENT`` if *txn* is not open
        """
        with self.lock:
            if self._transactions.get(txn.id) is not txn:
                raise _error(errno.ENOENT, f"no open transaction {txn.id}")
            del self._transactions[txn.id]
            try:
                if not commit:
                    return
                for name in txn._accessed:
                    live = self._nodes.get(name)
                    current = live.gen if live is not None else self._tombstones.get(name, 0)
                    if current > txn._start_gen:
                        raise _error(errno.EAGAIN, f"transaction {txn.id} conflicts on {name}")
                view = _View(self, None)
                for name in txn._modified:
                    node = txn._nodes.get(name)
                    if node is None:
                        view.delete(name)
                    else:
                        view.put(name, node)
                for event in txn._events:
                    self._fire(event)
            finally:
                self._prune_tombstones()

    def _prune_tombstones(self) -> None:
        if not self._transactions:
            self._tombstones.clear()
            return
        oldest = min(t._start_gen for t in self._transactions.values())
        stale = [name for name, gen in self._tombstones.items() if gen <= oldest]
        for name in stale:
            del self._tombstones[name]

    # --- watches ------------------------------------------------------------

    def _watch_node(self, domid: int, path: str) -> tuple[str, str | None]:
        if not isinstance(path, str):
            raise TypeError(f"XenStore paths are str, not {type(path).__name__}")
        if path.startswith("@"):
            if len(path) > XENSTORE_REL_PATH_MAX or "\0" in path:
                raise _error(errno.EINVAL, path)
            return path, None
        relative = None if path.startswith("/") else self.get_domain_path(domid)
        return self._canonical(domid, path), relative

    def add_watch(
        self,
        domid: int,
        path: str,
        token: str,
        sink: Callable[[str, str], None],
        *,
        owner: object = None,
        before_initial: Callable[[], None] | None = None,
    ) -> WatchRegistration:
        """``XS_WATCH``: register a watch and fire it once at once.

        :param domid: the watching domain
        :param path: absolute, relative (events are then relative too) or a
            special ``@`` path
        :param token: reported with every event
        :param sink: ``sink(path, token)`` receives the events; it runs with
            :attr:`lock` held and must not block
        :param owner: the connection; the same *path* and *token* twice for
            one owner is ``EEXIST``
        :param before_initial: called (lock held) after registration and
            before the initial event, e.g. to queue the ``XS_WATCH`` reply
        :returns: the registration, for :meth:`remove_watch`
        :raises OSError: ``EINVAL``, ``EEXIST``, ``E2BIG`` (more than 128
            watches of an unprivileged domain)
        """
        if not isinstance(token, str) or "\0" in token:
            raise _error(errno.EINVAL, f"bad watch token {token!r}")
        with self.lock:
            node, relative = self._watch_node(domid, path)
            for reg in self._watches:
                if reg.owner is owner and reg.node == node and reg.token == token:
                    raise _error(errno.EEXIST, f"watch {path!r} {token!r} exists")
            count = sum(1 for r in self._watches if r.domid == domid)
            if not self._privileged(domid) and count >= _QUOTA_WATCHES_PER_DOMAIN:
                raise _error(errno.E2BIG, "too many watches")
            reg = WatchRegistration(domid, node, token, relative, sink, owner)
            self._watches.append(reg)
            if before_initial is not None:
                before_initial()
            self._deliver(reg, reg.event_path(node))
            return reg

    def remove_watch(self, registration: WatchRegistration) -> bool:
        """Unregister a watch; no event reaches its sink afterwards.

        :returns: whether it was registered
        """
        with self.lock:
            try:
                self._watches.remove(registration)
            except ValueError:
                return False
            return True

    def unwatch(self, domid: int, path: str, token: str, *, owner: object = None) -> None:
        """``XS_UNWATCH``: unregister the watch of *owner* on *path* with *token*.

        :raises OSError: ``ENOENT`` if there is none, ``EINVAL``
        """
        with self.lock:
            node, _ = self._watch_node(domid, path)
            for reg in self._watches:
                if reg.owner is owner and reg.node == node and reg.token == token:
                    self._watches.remove(reg)
                    return
            raise _error(errno.ENOENT, f"no watch {path!r} {token!r}")

    def remove_watches(self, owner: object) -> int:
        """Unregister every watch of *owner* (``XS_RESET_WATCHES``, disconnection).

        :returns: how many were removed
        """
        with self.lock:
            before = len(self._watches)
            self._watches = [r for r in self._watches if r.owner is not owner]
            return before - len(self._watches)

    def _deliver(self, reg: WatchRegistration, path: str) -> None:
        try:
            reg.sink(path, reg.token)
        except Exception:
            _log.exception("watch sink failed for %r %r", reg.node, reg.token)

    def _may_read(self, domid: int, perm_sets: Iterable[tuple[Permission, ...]]) -> bool:
        return any(self._perm_for(domid, perms) & _READ for perms in perm_sets)

    def _fire(self, event: _Event) -> None:
        name = event.name
        for reg in list(self._watches):
            if name.startswith("@"):
                if reg.node == name and self._perm_for(reg.domid, self._special(name)) & _READ:
                    self._deliver(reg, name)
                continue
            if reg.node.startswith("@"):
                continue
            if _is_child(name, reg.node):
                if self._may_read(reg.domid, event.perm_sets):
                    self._deliver(reg, reg.event_path(name))
            elif event.removed is not None and _is_child(reg.node, name):
                # the removal of an ancestor of the watched path: report the
                # watched path; judge by the deepest removed node above it
                walk = reg.node
                while walk not in event.removed:
                    walk = _parent(walk)
                if self._may_read(reg.domid, (event.removed[walk],)):
                    self._deliver(reg, reg.event_path(reg.node))

    # --- domains ------------------------------------------------------------

    def _require_privileged(self, caller: int) -> None:
        if not self._privileged(caller):
            raise _error(errno.EACCES, "only a privileged domain may do this")

    @staticmethod
    def _check_domid(domid: int) -> None:
        if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise _error(errno.EINVAL, f"bad domain id {domid!r}")

    def get_domain_path(self, domid: int) -> str:
        """``XS_GET_DOMAIN_PATH``: ``/local/domain/<domid>``.

        :raises OSError: ``EINVAL`` for a negative or non-integer *domid*
        """
        if not isinstance(domid, int) or domid < 0:
            raise _error(errno.EINVAL, f"bad domain id {domid!r}")
        return f"/local/domain/{domid}"

    def introduce_domain(self, domid: int, mfn: int = 0, port: int = 0, *, caller: int = 0) -> None:
        """``XS_INTRODUCE``: start serving *domid*.

        As the toolstack does, ``/local/domain/<domid>`` is created (owned by
        the domain) if missing, with a ``domid`` node the domain may read.
        Watches on ``@introduceDomain`` fire.  Introducing a domain again
        changes nothing.

        :param mfn: the store page (recorded only)
        :param port: the store event channel (recorded only)
        :param caller: the requesting domain (must be privileged)
        :raises OSError: ``EACCES``, ``EINVAL``
        """
        self._check_domid(domid)
        with self.lock:
            self._require_privileged(caller)
            if domid in self._domains:
                return
            self._domains[domid] = _Domain(mfn, port)
            home = self.get_domain_path(domid)
            if home not in self._nodes:
                self.mkdir(0, home)
                self.set_permissions(0, home, [Permission(domid, PermissionFlag.NONE)])
                self.write(0, f"{home}/domid", str(domid).encode())
                self.set_permissions(
                    0,
                    f"{home}/domid",
                    [Permission(0, PermissionFlag.NONE), Permission(domid, PermissionFlag.READ)],
                )
            self._fire(_Event("@introduceDomain"))

    def release_domain(self, domid: int, *, caller: int = 0) -> None:
        """``XS_RELEASE``: stop serving *domid*; ``@releaseDomain`` fires.

        Its nodes stay (the toolstack removes them).

        :raises OSError: ``ENOENT`` if not introduced, ``EACCES``, ``EINVAL``
        """
        self._check_domid(domid)
        with self.lock:
            self._require_privileged(caller)
            if self._domains.pop(domid, None) is None:
                raise _error(errno.ENOENT, f"domain {domid} is not introduced")
            for domain in self._domains.values():
                if domain.target == domid:
                    domain.target = None
            self._fire(_Event("@releaseDomain"))

    def shutdown_domain(self, domid: int) -> None:
        """Simulate the shutdown of *domid*: ``@releaseDomain`` fires once
        (until :meth:`resume_domain`).

        :raises OSError: ``ENOENT`` if not introduced
        """
        with self.lock:
            domain = self._domains.get(domid)
            if domain is None:
                raise _error(errno.ENOENT, f"domain {domid} is not introduced")
            if not domain.shutdown:
                domain.shutdown = True
                self._fire(_Event("@releaseDomain"))

    def resume_domain(self, domid: int, *, caller: int = 0) -> None:
        """``XS_RESUME``: clear the shutdown state of *domid*.

        :raises OSError: ``ENOENT`` if not introduced, ``EACCES``, ``EINVAL``
        """
        self._check_domid(domid)
        with self.lock:
            self._require_privileged(caller)
            domain = self._domains.get(domid)
            if domain is None:
                raise _error(errno.ENOENT, f"domain {domid} is not introduced")
            domain.shutdown = False

    def set_target(self, domid: int, target: int, *, caller: int = 0) -> None:
        """``XS_SET_TARGET``: let *domid* act with the rights of *target*.

        :raises OSError: ``ENOENT`` if either is not introduced, ``EACCES``,
            ``EINVAL``
        """
        self._check_domid(domid)
        self._check_domid(target)
        with self.lock:
            self._require_privileged(caller)
            domain = self._domains.get(domid)
            if domain is None or target not in self._domains:
                raise _error(errno.ENOENT, "domain is not introduced")
            domain.target = target

    def is_domain_introduced(self, domid: int, *, caller: int = 0) -> bool:
        """``XS_IS_DOMAIN_INTRODUCED``.

        :raises OSError: ``EACCES`` for an unprivileged caller
        """
        with self.lock:
            self._require_privileged(caller)
            return domid in self._domains

    def control(self, command: str, args: Sequence[bytes] = (), *, caller: int = 0) -> bytes:
        """``XS_CONTROL``: a daemon control command.

        Supported: ``check``, ``log`` (``on``/``off``), ``print`` (logs its
        argument), ``quota`` and ``help``.

        :returns: the reply payload (``OK\\0`` or a NUL-terminated text)
        :raises OSError: ``EACCES`` (unprivileged), ``EINVAL`` (unknown command)
        """
        with self.lock:
            self._require_privileged(caller)
            if command == "check":
                return b"OK\0"
            if command == "log":
                if args and args[0] not in (b"on", b"off"):
                    raise _error(errno.EINVAL, "log takes on or off")
                return b"OK\0"
            if command == "print":
                _log.info("xenstored print: %s", b" ".join(args).decode("latin-1"))
                return b"OK\0"
            if command == "quota":
                return (
                    f"transaction-per-domain: {_QUOTA_TRANSACTIONS}\n"
                    f"watches-per-domain: {_QUOTA_WATCHES_PER_DOMAIN}\n"
                    f"permissions-per-node: {_QUOTA_PERMS_PER_NODE}\n"
                    f"entry-size: {_QUOTA_ENTRY_SIZE}\n\0"
                ).encode()
            if command == "help":
                return b"check\nlog [on|off]\nprint <string>\nquota\nhelp\n\0"
            raise _error(errno.EINVAL, f"unknown control command {command!r}")


_R = TypeVar("_R")


class _SimNodeOps:
    """Node operations of a connection, outside or inside a transaction."""

    _store: SimXenStore

    def _txn(self) -> TreeTransaction | None:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        """The value of *path*.

        :raises FileNotFoundError: if the node does not exist
        :raises PermissionError: if the domain may not read it
        """
        txn = self._txn()
        return self._store._tree.read(self._store._domid, path, txn)

    def exists(self, path: str) -> bool:
        """Whether *path* exists (a read that fails with ``ENOENT`` means no)."""
        try:
            self.read(path)
        except FileNotFoundError:
            return False
        return True

    def write(self, path: str, value: bytes | bytearray | memoryview | str) -> None:
        """Create or replace *path*; a ``str`` value is UTF-8 encoded."""
        txn = self._txn()
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        self._store._tree.write(self._store._domid, path, data, txn)

    def mkdir(self, path: str) -> None:
        """Create *path* (with an empty value) if it is missing."""
        txn = self._txn()
        self._store._tree.mkdir(self._store._domid, path, txn)

    def rm(self, path: str) -> None:
        """Remove *path* and its subtree."""
        txn = self._txn()
        self._store._tree.rm(self._store._domid, path, txn)

    def directory(self, path: str) -> list[str]:
        """The names of the children of *path*."""
        txn = self._txn()
        return self._store._tree.directory(self._store._domid, path, txn)

    def get_permissions(self, path: str) -> list[Permission]:
        """The access list of *path* (owner first)."""
        txn = self._txn()
        return self._store._tree.get_permissions(self._store._domid, path, txn)

    def set_permissions(self, path: str, permissions: Sequence[Permission]) -> None:
        """Replace the access list of *path*.

        :raises ValueError: for an empty list
        """
        if not permissions:
            raise ValueError("an access list needs at least the owner entry")
        txn = self._txn()
        self._store._tree.set_permissions(self._store._domid, path, permissions, txn)


class SimTransaction(_SimNodeOps):
    """One attempt at a transaction of a :class:`SimXenStore`.

    The transaction starts when its ``with`` block is entered and is
    committed when the block ends, or aborted if the block raised.  Made by
    :meth:`SimXenStore.transaction` (which retries conflicts) or
    :meth:`SimXenStore.begin` (which raises
    :class:`~pyxen9p.errors.TransactionConflictError` on a conflict).
    """

    def __init__(self, store: SimXenStore, *, retrying: bool = False) -> None:
        self._store = store
        self._retrying = retrying
        self._tree_txn: TreeTransaction | None = None
        #: True once the transaction committed
        self.committed = False
        #: True if the commit failed with ``EAGAIN`` (the attempt must be repeated)
        self.conflicted = False

    @property
    def id(self) -> int | None:
        """The transaction id while the ``with`` block runs, else ``None``."""
        return None if self._tree_txn is None else self._tree_txn.id

    def _txn(self) -> TreeTransaction:
        self._store._check_open()
        if self._tree_txn is None:
            raise RuntimeError("use the transaction inside its with block")
        return self._tree_txn

    def __enter__(self) -> Self:
        if self._tree_txn is not None or self.committed or self.conflicted:
            raise RuntimeError("a transaction attempt can be entered once")
        self._tree_txn = self._store._transaction_start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        txn = self._tree_txn
        if txn is None:
            raise RuntimeError("the transaction was not entered")
        self._tree_txn = None
        if exc is not None:
            try:
                self._store._transaction_end(txn, commit=False)
            except (OSError, HandleClosedError):
                pass  # the original exception matters more
            if self._retrying and isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
                self.conflicted = True
                return True
            return False
        try:
            self._store._transaction_end(txn, commit=True)
        except BlockingIOError as conflict:
            if not self._retrying:
                raise TransactionConflictError(
                    errno.EAGAIN, "transaction_end", "the transaction conflicts"
                ) from conflict
            self.conflicted = True
            return False
        self.committed = True
        return False


class SimWatch(Watch):
    """A watch of a :class:`SimXenStore` (see :class:`pyxen9p._shared.Watch`)."""

    def __init__(self, store: SimXenStore, path: str, token: str) -> None:
        super().__init__(store, path, token)
        self._registration: WatchRegistration | None = None


def _close_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class SimXenStore(_SimNodeOps):
    """One connection of domain *domid* to a :class:`XenStoreTree`.

    It has the API of :class:`pyxen9p.libs.xenstore.XenStore`: node
    operations, :meth:`transaction` (retrying attempts), :meth:`watch`
    (per-watch event queues), :meth:`fileno` (readable while events are
    queued) and :meth:`close` (which unregisters the watches and aborts the
    transactions of the connection).

    :param tree: the store to connect to
    :param domid: the connecting domain (0 is privileged)
    """

    _token_counter = itertools.count(1)

    def __init__(self, tree: XenStoreTree, domid: int = 0) -> None:
        if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"bad domain id {domid!r}")
        self._tree = tree
        self._domid = domid
        self._store = self
        self._closed = False
        self._cond = threading.Condition()
        self._watches: dict[str, SimWatch] = {}
        self._queues: dict[str, deque[tuple[int, WatchEvent]]] = {}
        self._sequence = itertools.count()
        self._pending = 0
        self._fds: list[int] = []  # [read end, write end] of the event pipe, made on demand
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        self._open_txns: dict[int, TreeTransaction] = {}

    # --- state --------------------------------------------------------------

    @property
    def tree(self) -> XenStoreTree:
        """The store this connection talks to."""
        return self._tree

    @property
    def domid(self) -> int:
        """The domain of this connection."""
        return self._domid

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise HandleClosedError("SimXenStore is closed")

    def _txn(self) -> TreeTransaction | None:
        self._check_open()
        return None

    def close(self) -> None:
        """Unregister the watches, abort the open transactions and close the
        event descriptor (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches.values())
            txns = list(self._open_txns.values())
            self._open_txns.clear()
        for watch in watches:
            self._unwatch(watch)
        for txn in txns:
            try:
                self._tree.transaction_end(txn, commit=False)
            except OSError:
                pass
        with self._cond:
            self._queues.clear()
            self._pending = 0
            self._finalizer()
            self._cond.notify_all()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------

    def _transaction_start(self) -> TreeTransaction:
        self._check_open()
        with self._cond:
            if self._domid != 0 and len(self._open_txns) >= _QUOTA_TRANSACTIONS:
                raise _error(errno.ENOSPC, "too many open transactions")
            txn = self._tree.transaction_start(self._domid)
            self._open_txns[txn.id] = txn
        return txn

    def _transaction_end(self, txn: TreeTransaction, *, commit: bool) -> None:
        with self._cond:
            if self._open_txns.pop(txn.id, None) is None:
                raise HandleClosedError("the transaction was ended by close()")
        self._tree.transaction_end(txn, commit)

    def transaction_start(self) -> int:
        """Start a transaction (low level).

        :returns: its id, for :meth:`transaction_end`
        """
        return self._transaction_start().id

    def transaction_end(self, txid: int, abort: bool = False) -> None:
        """End the transaction *txid* (low level).

        :raises TransactionConflictError: on ``EAGAIN``: retry the whole
            transaction
        :raises FileNotFoundError: if *txid* is not an open transaction of
            this connection
        """
        self._check_open()
        with self._cond:
            txn = self._open_txns.get(txid)
        if txn is None:
            raise _error(errno.ENOENT, f"no open transaction {txid}")
        try:
            self._transaction_end(txn, commit=not abort)
        except BlockingIOError as conflict:
            raise TransactionConflictError(errno.EAGAIN, "transaction_end") from conflict

    def begin(self) -> SimTransaction:
        """A single transaction attempt; a conflict raises
        :class:`~pyxen9p.errors.TransactionConflictError`."""
        self._check_open()
        return SimTransaction(self)

    def transaction(self, *, max_attempts: int = 32) -> Iterator[SimTransaction]:
        """Yield transaction attempts until one commits::

            for txn in store.transaction():
                with txn:
                    txn.write("device/x/state", b"3")

        A commit that fails with ``EAGAIN`` (or an ``EAGAIN`` raised by the
        body) aborts the attempt and yields a new one after a short backoff.

        :param max_attempts: how many attempts before giving up
        :raises TransactionConflictError: after *max_attempts* conflicts
        :raises RuntimeError: if an attempt is not used in a ``with`` block
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._check_open()
        yield from retry_transactions(
            lambda: SimTransaction(self, retrying=True), max_attempts, "transaction_end"
        )

    def transact(self, body: Callable[[SimTransaction], _R], *, max_attempts: int = 32) -> _R:
        """Run ``body(txn)`` in a transaction, retrying on conflicts; return its result."""
        return run_transaction(self.transaction(max_attempts=max_attempts), body)

    # --- watches ------------------------------------------------------------

    def watch(self, path: str, token: str | None = None) -> SimWatch:
        """Watch *path*; it fires once at once, then on changes at or below it.

        :param path: absolute, relative (events are reported relative too) or
            ``@introduceDomain`` / ``@releaseDomain``
        :param token: the token (a unique one is generated if ``None``)
        :raises ValueError: if *token* is used by another watch of this connection
        :raises OSError: ``EINVAL`` for a bad path, ``E2BIG`` over quota
        """
        self._check_open()
        if token is None:
            token = f"pyxen9p-{next(self._token_counter)}"
        if not isinstance(token, str) or not token or "\0" in token:
            raise ValueError(f"invalid watch token {token!r}")
        with self._cond:
            if token in self._watches:
                raise ValueError(f"token {token!r} is already used by a watch")
            watch = SimWatch(self, path, token)
            self._watches[token] = watch
            self._queues[token] = deque()
        try:
            watch._registration = self._tree.add_watch(
                self._domid, path, token, self._deliver, owner=self
            )
        except BaseException:
            with self._cond:
                self._watches.pop(token, None)
                queue = self._queues.pop(token, None)
                self._consumed(len(queue) if queue else 0)
            raise
        return watch

    def _deliver(self, path: str, token: str) -> None:
        """The sink of this connection's watches (called with the tree's lock held)."""
        with self._cond:
            queue = self._queues.get(token)
            if self._closed or queue is None:
                return
            queue.append((next(self._sequence), WatchEvent(path, token)))
            self._pending += 1
            if self._pending == 1 and self._fds:
                os.write(self._fds[1], b"!")
            self._cond.notify_all()

    def _consumed(self, count: int) -> None:
        """Account for *count* events taken off the queues (``_cond`` held)."""
        if not count:
            return
        self._pending -= count
        if self._pending == 0 and self._fds:
            try:
                while os.read(self._fds[0], 64):
                    pass
            except BlockingIOError:
                pass

    def _unwatch(self, watch: Watch) -> None:
        assert isinstance(watch, SimWatch)
        with self._cond:
            if watch.closed:
                return
            watch.closed = True
            if self._watches.get(watch.token) is watch:
                del self._watches[watch.token]
                queue = self._queues.pop(watch.token, None)
                self._consumed(len(queue) if queue else 0)
            self._cond.notify_all()
        if watch._registration is not None:
            self._tree.remove_watch(watch._registration)

    def _next_event(self, watch: Watch, timeout: float | None) -> WatchEvent | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                queue = self._queues.get(watch.token)
                if watch.closed or queue is None or self._closed:
                    return None
                if queue:
                    self._consumed(1)
                    return queue.popleft()[1]
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)

    def check_watch(self) -> WatchEvent | None:
        """The oldest queued event of any watch, without blocking, or ``None``.

        Low level: this takes events off the per-watch queues of
        :meth:`SimWatch.get`.
        """
        self._check_open()
        with self._cond:
            oldest: deque[tuple[int, WatchEvent]] | None = None
            for queue in self._queues.values():
                if queue and (oldest is None or queue[0][0] < oldest[0][0]):
                    oldest = queue
            if oldest is None:
                return None
            self._consumed(1)
            return oldest.popleft()[1]

    def read_watch(self, timeout: float | None = None) -> WatchEvent | None:
        """Wait up to *timeout* seconds (``None``: forever) for the oldest
        event of any watch (low level, like :meth:`check_watch`).

        :returns: the event, or ``None`` on timeout or if the store is closed
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                event = self.check_watch()
                if event is not None:
                    return event
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)

    def fileno(self) -> int:
        """A descriptor that is readable while watch events are queued."""
        self._check_open()
        with self._cond:
            if not self._fds:
                read_end, write_end = os.pipe()
                os.set_blocking(read_end, False)
                os.set_blocking(write_end, False)
                self._fds.extend((read_end, write_end))
                if self._pending:
                    os.write(write_end, b"!")
            return self._fds[0]

    # --- domains and control ----------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        """``/local/domain/<domid>``."""
        self._check_open()
        return self._tree.get_domain_path(domid)

    def own_domid(self) -> int:
        """This domain's id, read from the relative node ``domid``."""
        return int(self.read("domid").decode("ascii"))

    def introduce_domain(self, domid: int, mfn: int = 0, eventchn: int = 0) -> None:
        """Introduce *domid* (privileged; see :meth:`XenStoreTree.introduce_domain`)."""
        self._check_open()
        self._tree.introduce_domain(domid, mfn, eventchn, caller=self._domid)

    def release_domain(self, domid: int) -> None:
        """Release *domid* (privileged)."""
        self._check_open()
        self._tree.release_domain(domid, caller=self._domid)

    def resume_domain(self, domid: int) -> None:
        """Clear the shutdown state of *domid* (privileged)."""
        self._check_open()
        self._tree.resume_domain(domid, caller=self._domid)

    def set_target(self, domid: int, target: int) -> None:
        """Let *domid* act with the rights of *target* (privileged)."""
        self._check_open()
        self._tree.set_target(domid, target, caller=self._domid)

    def is_domain_introduced(self, domid: int) -> bool:
        """Whether *domid* is introduced (privileged)."""
        self._check_open()
        return self._tree.is_domain_introduced(domid, caller=self._domid)

    def control_command(self, command: str, data: bytes = b"") -> bytes:
        """A daemon control request (see :meth:`XenStoreTree.control`).

        :param data: the arguments, NUL-separated as on the wire
        :returns: the answer, without its trailing NUL
        """
        self._check_open()
        args = data.split(b"\0") if data else []
        if args and args[-1] == b"":
            args.pop()
        reply = self._tree.control(command, args, caller=self._domid)
        return reply[:-1] if reply.endswith(b"\0") else reply

    def debug_command(self, command: str, data: bytes = b"") -> bytes:
        """Deprecated alias of :meth:`control_command`."""
        return self.control_command(command, data)
