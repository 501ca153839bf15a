#!/usr/bin/env python3
"""Run pyxen9p's real-Xen tests: boot Xen with a Debian dom0 under QEMU, on two releases.

The releases (``--release``; default: both, one boot each): Debian 12
(bookworm: Xen 4.17, QEMU 7.2) and Debian 13 (trixie: Xen 4.20, QEMU 10.0,
xen-9pfsd).

The harness (host side, standard library only):

1. checks the host tools and names the Debian packages that are missing;
2. builds (once, then from a cache outside the repository) a dom0 disk image
   from Debian packages with ``debootstrap`` and ``mkfs.ext4 -d``, using the
   package mirror configured in this machine's apt sources;
3. boots the Xen hypervisor under ``qemu-system-x86_64`` (TCG), with the
   project tree shared read-only and a results folder shared writable;
4. inside dom0 a baked systemd unit runs ``tests/xen/guest/entry.py`` from the
   shared tree, which runs pytest on the selected ``tests/xen/guest/test_*.py``
   groups and writes junit XML, the log and the exit code to the results share;
5. prints the guest's pytest output and exits non-zero on any failure.

Run ``python3 tests/xen/run.py --help``.  See ``docs/realxen.rst``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
IMAGE_DIR = HERE / "image"
GUEST_DIR = HERE / "guest"

SUITE = "bookworm"
#: Packages given to ``debootstrap --include`` (a minbase system plus these).
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "procps",
    "iproute2",
    "xz-utils",
    "ca-certificates",
)
#: Packages installed in the chroot with ``apt-get install --no-install-recommends``.
PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xenstore-utils",
    "qemu-system-xen",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "python3-pytest",
    "python3-pytest-timeout",
    "python3-typing-extensions",
    "busybox-static",
    "strace",
    "fuse3",
)


@dataclasses.dataclass(frozen=True)
class Release:
    """A Debian release the lab can boot.

    :ivar suite: the Debian suite (codename) bootstrapped
    :ivar label: what the release brings, for messages and docs
    :ivar packages: packages installed in the chroot
    """

    suite: str
    label: str
    packages: tuple[str, ...]


def _with_xen(version: str) -> tuple[str, ...]:
    """:data:`PACKAGES` with the Xen packages of *version* instead of 4.17's."""
    swap = {
        "xen-hypervisor-4.17-amd64": f"xen-hypervisor-{version}-amd64",
        "xen-utils-4.17": f"xen-utils-{version}",
    }
    return tuple(swap.get(name, name) for name in PACKAGES)


#: The releases, by suite.  Debian 12's entry builds exactly the image it
#: always built (same cache key).
RELEASES: dict[str, Release] = {
    "bookworm": Release("bookworm", "Debian 12: Xen 4.17, QEMU 7.2, kernel 6.1", PACKAGES),
    "trixie": Release(
        "trixie", "Debian 13: Xen 4.20 (xen-9pfsd), QEMU 10.0, kernel 6.12", _with_xen("4.20")
    ),
}
#: ``--release`` aliases.
RELEASE_ALIASES = {"12": "bookworm", "13": "trixie", "debian12": "bookworm", "debian13": "trixie"}

#: Python packages that Debian 12 does not have, from PyPI: downloaded as wheels
#: on the host by its own ``pip download`` (the host's pip configuration
#: applies) and unpacked into the image's ``dist-packages``.  Pure Python only.
GUEST_WHEELS = ("mfusepy==3.1.1",)
#: Bump to force a rebuild when something outside the hashed files changes.
IMAGE_RECIPE_VERSION = "1"
IMAGE_FILES = ("rootfs.img", "xen", "vmlinuz", "initrd.img")

#: host tool -> Debian package that provides it
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
    "unshare": "util-linux",
    "chroot": "coreutils",
    "gzip": "gzip",
    "du": "coreutils",
}
HOST_FILES = {
    "/usr/share/keyrings/debian-archive-keyring.gpg": "debian-archive-keyring",
}
#: Python module of this interpreter -> Debian package that provides it
HOST_MODULES = {"pip": "python3-pip"}

XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=2048M,max:2048M dom0_max_vcpus=2 "
    "noreboot loglvl=warning guest_loglvl=warning"
)
DOM0_CMDLINE = (
    "root=/dev/vda rw console=hvc0 earlyprintk=xen fsck.mode=skip "
    "systemd.show_status=1 panic=-1"
)
SRC_TAG = "pyxen9p_src"
#: The serial of the read-only second disk (the image again) that a PV domU
#: gets as its root (``tests/xen/guest/xenlab.py``: ``DOMU_ROOT_DISK_SERIAL``).
DOMU_ROOT_SERIAL = "pyxen9p-domu-root"
RES_TAG = "pyxen9p_res"
GUEST_MARK = "PYXEN9P-GUEST:"

#: (stage name, pattern seen on the console when that stage is reached), in order.
STAGES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Xen banner", re.compile(r"\(XEN\) Xen version 4\.")),
    ("dom0 kernel", re.compile(r"Linux version \d")),
    ("root mounted", re.compile(r"EXT4-fs \(vda\): mounted filesystem|Welcome to Debian")),
    ("test unit started", re.compile(re.escape(GUEST_MARK) + r" unit started")),
    ("tests started", re.compile(re.escape(GUEST_MARK) + r" pytest started")),
    ("tests finished", re.compile(re.escape(GUEST_MARK) + r" entry finished")),
    ("powered off", re.compile(r"reboot: Power down|\(XEN\) Hardware Dom0 shutdown")),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)
#: Console lines that mean the boot cannot succeed any more.
FATAL = re.compile(
    r"Kernel panic - not syncing|\(XEN\) Panic on CPU|\(XEN\) \*+ Panic|"
    r"You are in emergency mode|Give root password for maintenance"
)
#: Seconds between SIGTERM and SIGKILL when QEMU is stopped.
STOP_GRACE = 10.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class HarnessError(Exception):
    """A failure of the harness itself (tools, build, boot), with a message for the user."""


def log(msg: str) -> None:
    """Print a harness message (flushed, prefixed)."""
    print(f"[realxen] {msg}", flush=True)


# --------------------------------------------------------------------------- host tools


def missing_host_packages() -> list[str]:
    """Return the Debian packages providing host tools that are not installed.

    :returns: sorted package names, empty when everything is present
    """
    extra = "/usr/sbin:/sbin:/usr/local/sbin"
    path = os.environ.get("PATH", "") + os.pathsep + extra
    missing = {pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool, path=path) is None}
    missing |= {pkg for file, pkg in HOST_FILES.items() if not os.path.exists(file)}
    missing |= {pkg for mod, pkg in HOST_MODULES.items() if importlib.util.find_spec(mod) is None}
    return sorted(missing)


# --------------------------------------------------------------------------- apt sources


@dataclasses.dataclass
class AptSource:
    """One apt source entry (a one-line ``deb`` line or a deb822 stanza)."""

    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    options: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def signed_by(self) -> str | None:
        """The ``Signed-By`` value (a keyring path or an inline key), if any."""
        for key, value in self.options.items():
            if key.lower() in ("signed-by", "signed_by"):
                return value
        return None


def parse_deb822(text: str) -> list[AptSource]:
    """Parse a deb822 ``.sources`` file.

    :param text: the file's contents
    :returns: the enabled stanzas that have ``Types``, ``URIs`` and ``Suites``
    """
    sources: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last: str | None = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and last is not None:
                fields[last] += "\n" + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if not sep:
                continue
            last = key.strip()
            fields[last] = value.strip()
        lower = {k.lower(): v for k, v in fields.items()}
        if lower.get("enabled", "yes").strip().lower() == "no":
            continue
        if not all(k in lower for k in ("types", "uris", "suites")):
            continue
        options = {
            k: v
            for k, v in fields.items()
            if k.lower() not in ("types", "uris", "suites", "components", "enabled")
        }
        sources.append(
            AptSource(
                types=lower["types"].split(),
                uris=lower["uris"].split(),
                suites=lower["suites"].split(),
                components=lower.get("components", "").split(),
                options=options,
            )
        )
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """Parse a one-line-style ``sources.list``.

    :param text: the file's contents
    :returns: one entry per ``deb``/``deb-src`` line
    """
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: dict[str, str] = {}
        match = re.match(r"^(deb|deb-src)\s+\[([^\]]*)\]\s+(.*)$", line)
        if match:
            kind, opts, rest = match.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[{"signed-by": "Signed-By"}.get(key.lower(), key)] = value
        else:
            kind, _, rest = line.partition(" ")
            if kind not in ("deb", "deb-src"):
                continue
        parts = rest.split()
        if len(parts) < 2:
            continue
        sources.append(AptSource([kind], [parts[0]], [parts[1]], parts[2:], options))
    return sources


def read_host_apt_sources(root: Path = Path("/")) -> list[AptSource]:
    """Read every apt source configured on this machine.

    :param root: filesystem root (for tests)
    :returns: entries of ``/etc/apt/sources.list``, ``sources.list.d/*.list``
        and ``sources.list.d/*.sources``, in apt's reading order
    """
    etc = root / "etc/apt"
    sources: list[AptSource] = []
    main = etc / "sources.list"
    if main.is_file():
        sources += parse_one_line(main.read_text(errors="replace"))
    directory = etc / "sources.list.d"
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text(errors="replace"))
    return sources


def host_codename(root: Path = Path("/")) -> str | None:
    """Return this machine's ``VERSION_CODENAME`` from ``/etc/os-release``.

    :param root: filesystem root (for tests)
    """
    for name in ("etc/os-release", "usr/lib/os-release"):
        path = root / name
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("VERSION_CODENAME="):
                    return line.partition("=")[2].strip().strip('"') or None
    return None


@dataclasses.dataclass
class MirrorPlan:
    """Where the image's packages come from.

    :ivar mirror: the URL given to ``debootstrap``
    :ivar keyring: keyring file for ``debootstrap`` (``None``: its default)
    :ivar chroot_sources: the deb822 text installed as the chroot's apt sources
    :ivar keyrings: keyring files that the chroot's sources refer to
    """

    mirror: str
    keyring: str | None
    chroot_sources: str
    keyrings: list[str]


def _map_suite(suite: str, codename: str | None, target: str) -> str | None:
    """Map a host suite name to the matching *target* suite (``None``: not Debian)."""
    for base in {codename, target} - {None}:
        assert base is not None
        if suite == base:
            return target
        for sep in ("-", "/"):
            if suite.startswith(base + sep):
                return target + suite[len(base) :]
    return None


def plan_mirror(
    sources: Sequence[AptSource],
    codename: str | None,
    target: str = SUITE,
    override: str | None = None,
) -> MirrorPlan:
    """Choose the debootstrap mirror and the chroot's apt sources from the host's.

    Only entries whose suites are the host's Debian codename (or *target*),
    optionally with a ``-updates``/``-security`` style suffix, are used; their
    suites are renamed to *target*.  No mirror host name is built in.

    :param sources: the host's apt entries
    :param codename: the host's Debian codename
    :param target: the suite to build
    :param override: a mirror URL given by the user, used for debootstrap and
        as the chroot's main entry
    :returns: the plan
    :raises HarnessError: if no usable Debian entry exists
    """
    stanzas: list[str] = []
    keyrings: list[str] = []
    main_entry: AptSource | None = None
    for src in sources:
        if "deb" not in src.types:
            continue
        suites = [_map_suite(s, codename, target) for s in src.suites]
        mapped = [s for s in suites if s is not None]
        if not mapped:
            continue
        if main_entry is None and target in mapped and "main" in src.components:
            main_entry = src
        lines = ["Types: deb", "URIs: " + " ".join(src.uris), "Suites: " + " ".join(mapped)]
        lines.append("Components: " + " ".join(src.components or ["main"]))
        for key, value in src.options.items():
            if "\n" in value:
                value = value.replace("\n", "\n ")
            lines.append(f"{key}: {value}")
        stanzas.append("\n".join(lines))
        signed = src.signed_by
        if signed and "\n" not in signed and signed.startswith("/") and signed not in keyrings:
            keyrings.append(signed)
    if override:
        stanzas.insert(0, f"Types: deb\nURIs: {override}\nSuites: {target}\nComponents: main")
        return MirrorPlan(override, None, "\n\n".join(stanzas) + "\n", keyrings)
    if main_entry is None:
        raise HarnessError(
            f"no Debian '{target}' (or host codename {codename!r}) entry with component "
            "'main' in /etc/apt/sources.list{,.d/*.list,.d/*.sources}; pass --mirror URL"
        )
    signed = main_entry.signed_by
    keyring = signed if signed and "\n" not in signed and os.path.isfile(signed) else None
    return MirrorPlan(main_entry.uris[0], keyring, "\n\n".join(stanzas) + "\n", keyrings)


def host_apt_conf_dir() -> Path | None:
    """Return ``/etc/apt/apt.conf.d`` if it exists (copied into the chroot)."""
    path = Path("/etc/apt/apt.conf.d")
    return path if path.is_dir() else None


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """The cache folder: ``$PYXEN9P_XEN_CACHE`` or ``~/.cache/pyxen9p-xen``."""
    env = os.environ.get("PYXEN9P_XEN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyxen9p-xen"


def image_key(plan: MirrorPlan, release: Release | None = None) -> str:
    """Hash of everything the image is built from.

    :param plan: the mirror plan (the mirror and the chroot's sources)
    :param release: the release (default: Debian 12)
    :returns: a short hex digest naming the cached image
    """
    release = release or RELEASES[SUITE]
    digest = hashlib.sha256()
    parts: list[bytes] = [
        IMAGE_RECIPE_VERSION.encode(),
        release.suite.encode(),
        ",".join(BASE_PACKAGES).encode(),
        " ".join(release.packages).encode(),

        " ".join(GUEST_WHEELS).encode(),
        plan.mirror.encode(),
        plan.chroot_sources.encode(),
    ]
    for path in sorted(IMAGE_DIR.iterdir()):
        if path.is_file():
            parts.append(path.name.encode())
            parts.append(path.read_bytes())
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path*, waiting at most *timeout* seconds.

    :raises HarnessError: on timeout
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out after {timeout:.0f}s waiting for the {what} lock")
            if not told:
                log(f"waiting for another run holding {path} ({what})")
                told = True
            time.sleep(1.0)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def image_ready(directory: Path) -> bool:
    """True if *directory* holds a complete image (its manifest is written last)."""
    return (directory / "manifest.json").is_file() and all(
        (directory / name).is_file() for name in IMAGE_FILES
    )


def run_group_killable(
    cmd: Sequence[str], env: dict[str, str], timeout: float, log_path: Path
) -> int:
    """Run *cmd* in its own process group, streaming its output to stdout and *log_path*.

    On timeout or interruption the group started here is sent SIGTERM, then
    SIGKILL.

    :returns: the exit status
    :raises HarnessError: on timeout
    """
    with open(log_path, "ab") as sink:
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            while True:
                chunk = proc.stdout.read()
                if chunk:
                    sink.write(chunk)
                    sink.flush()
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                if proc.poll() is not None:
                    rest = proc.stdout.read()
                    if rest:
                        sink.write(rest)
                        sys.stdout.write(rest.decode(errors="replace"))
                    return proc.returncode
                if time.monotonic() > deadline:
                    raise HarnessError(f"{cmd[0]} timed out after {timeout:.0f}s")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                stop_process_group(proc)
            proc.stdout.close()


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group led by *proc* (started with ``start_new_session``)."""
    with signals_held():
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


def debs_dir(cache: Path, release: Release) -> Path:
    """The ``.deb`` cache of *release* (Debian 12 keeps the historical ``debs``)."""
    return cache / ("debs" if release.suite == SUITE else f"debs-{release.suite}")


def image_suite(directory: Path) -> str:
    """The suite recorded in a cached image's manifest (Debian 12 if unreadable)."""
    try:
        return str(json.loads((directory / "manifest.json").read_text()).get("suite", SUITE))
    except (OSError, ValueError, AttributeError):
        return SUITE


def build_image(
    cache: Path,
    key: str,
    plan: MirrorPlan,
    timeout: float,
    keep_images: int,
    release: Release | None = None,
) -> Path:
    """Build the image for *key* into ``cache/images/<key>`` (under the build lock).

    Images of other releases are never pruned by a build (each release keeps
    *keep_images* of its own).

    :returns: the image directory
    :raises HarnessError: if the build fails
    """
    release = release or RELEASES[SUITE]
    images = cache / "images"
    target = images / key
    with file_lock(cache / "build.lock", timeout, "image build"):
        if image_ready(target):
            return target
        if os.geteuid() != 0:
            raise HarnessError("building the image needs root (debootstrap, chroot, mounts)")
        tmp_root = cache / "tmp"
        if tmp_root.exists():  # leftovers of an interrupted build (we hold the lock)
            shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=tmp_root))
        out = work / "out"
        out.mkdir()
        sources_file = work / "host.sources"
        sources_file.write_text(plan.chroot_sources)
        wheels = work / "wheels"
        download_wheels(wheels, timeout)
        conf = host_apt_conf_dir()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "OUT": str(out),
            "WORK": str(work),
            "SUITE": release.suite,
            "MIRROR": plan.mirror,
            "KEYRING": plan.keyring or "",
            "APT_SOURCES": str(sources_file),
            "APT_CONF_DIR": str(conf) if conf else "",
            "APT_KEYS": "\n".join(plan.keyrings),
            "DEB_CACHE": str(debs_dir(cache, release)),
            "BASE_PKGS": ",".join(BASE_PACKAGES),
            "PACKAGES": " ".join(release.packages),
            "IMAGE_DIR": str(IMAGE_DIR),
            "WHEELS": str(wheels),
            "HEADROOM_MB": "1024",
        }
        for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            if name in os.environ:
                env[name] = os.environ[name]
        log(f"building the dom0 image {key} (mirror {plan.mirror}) in {work}")
        started = time.monotonic()
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            str(IMAGE_DIR / "build-rootfs.sh"),
        ]
        try:
            status = run_group_killable(cmd, env, timeout, work / "build.log")
            if status != 0:
                failed_log = cache / "last-failed-build.log"
                shutil.copy2(work / "build.log", failed_log)
                raise HarnessError(f"image build failed (exit {status}); log: {failed_log}")
            manifest = {
                "key": key,
                "suite": release.suite,
                "mirror": plan.mirror,
                "base_packages": list(BASE_PACKAGES),
                "packages": list(release.packages),
                "wheels": list(GUEST_WHEELS),
                "built": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            shutil.copy2(work / "build.log", out / "build.log")
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            images.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.rename(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"image built in {time.monotonic() - started:.0f}s: {target}")
        others = {p.name for p in images.iterdir() if image_suite(p) != release.suite}
        prune(images, keep_images + len(others), {key} | others)
        prune_debs(debs_dir(cache, release), target / "packages.txt")
        return target


def download_wheels(directory: Path, timeout: float) -> None:
    """Download :data:`GUEST_WHEELS` (no dependencies, wheels only) into *directory*
    with this machine's ``pip download``.

    :raises HarnessError: if pip fails
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not GUEST_WHEELS:
        return
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--dest", str(directory), *GUEST_WHEELS]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HarnessError(f"pip download {' '.join(GUEST_WHEELS)} timed out") from None
    if done.returncode != 0:
        raise HarnessError(
            f"pip download {' '.join(GUEST_WHEELS)} failed: {done.stderr.strip()[-2000:]}"
        )


def prune_debs(debs: Path, packages_txt: Path) -> None:
    """Delete cached ``.deb`` files that the image just built does not use.

    :param debs: the package cache shared by builds
    :param packages_txt: ``<package> <version>`` lines of the image
    """
    if not debs.is_dir() or not packages_txt.is_file():
        return
    keep = set()
    for line in packages_txt.read_text().splitlines():
        name, _, version = line.partition(" ")
        if name and version:
            keep.add(f"{name}_{version.replace(':', '%3a')}_")
    for deb in debs.glob("*.deb"):
        if not any(deb.name.startswith(prefix) for prefix in keep):
            deb.unlink()


def prune(directory: Path, keep: int, keep_names: set[str] | None = None) -> None:
    """Remove all but the *keep* most recently modified entries of *directory*.

    :param directory: a folder of cached images or runs
    :param keep: how many of the newest entries to keep
    :param keep_names: names never removed
    """
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for index, entry in enumerate(entries):
        if index >= keep and entry.name not in (keep_names or set()):
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------- groups


def available_groups() -> dict[str, Path]:
    """Map each test group name to its guest file ``tests/xen/guest/test_<name>.py``."""
    return {path.stem[len("test_") :]: path for path in sorted(GUEST_DIR.glob("test_*.py"))}


def count_tests(path: Path, release: str | None = None) -> int:
    """Count the test functions of a guest test file without importing it.

    Counts module-level ``test_*`` functions and ``test_*`` methods of
    ``Test*`` classes; a ``parametrize`` decorator whose argument list is a
    literal counts once per value.  This is the minimum number of tests that
    pytest must report for the file.  With *release*, a test marked
    ``@pytest.mark.release("<suite>", ...)`` for other releases counts 0 (the
    guest's conftest deselects it there).

    :param path: a ``test_*.py`` file
    :param release: the suite the tests run on (``None``: count every test)
    :returns: the count
    """
    tree = ast.parse(path.read_text(), filename=str(path))

    def weight(func: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        total = 1
        for deco in func.decorator_list:
            if (
                release is not None
                and isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "release"
                and release not in [a.value for a in deco.args if isinstance(a, ast.Constant)]
            ):
                return 0
            if (
                isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "parametrize"
                and len(deco.args) >= 2
                and isinstance(deco.args[1], (ast.List, ast.Tuple))
            ):
                total *= max(1, len(deco.args[1].elts))
        return total

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    count = 0
    for node in tree.body:
        if isinstance(node, functions) and node.name.startswith("test"):
            count += weight(node)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, functions) and item.name.startswith("test"):
                    count += weight(item)
    return count


def group_releases(path: Path) -> tuple[str, ...]:
    """The releases a guest test file applies to, without importing it.

    A group names them in a module-level ``RELEASES = ("bookworm", ...)``
    (literal strings); a group without one applies to every release.

    :param path: a ``test_*.py`` file
    :returns: suites of :data:`RELEASES`
    :raises HarnessError: for a ``RELEASES`` that is not a literal of known suites
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == "RELEASES":
            try:
                names = ast.literal_eval(value)
            except ValueError:
                names = None
            if not isinstance(names, (tuple, list)) or not all(n in RELEASES for n in names):
                raise HarnessError(
                    f"{path.name}: RELEASES must be a literal tuple of {list(RELEASES)}"
                )
            return tuple(names)
    return tuple(RELEASES)


def select_releases(requested: Sequence[str]) -> list[Release]:
    """Resolve ``--release`` values (repeatable, comma-separated; ``all`` = both).

    :raises HarnessError: for an unknown release
    """
    names: list[str] = []
    for value in requested or ["all"]:
        for raw in filter(None, (part.strip().lower() for part in value.split(","))):
            picked = list(RELEASES) if raw == "all" else [RELEASE_ALIASES.get(raw, raw)]
            for name in picked:
                if name not in RELEASES:
                    known = ", ".join([*RELEASES, *RELEASE_ALIASES, "all"])
                    raise HarnessError(f"unknown release {raw!r}; known: {known}")
                if name not in names:
                    names.append(name)
    return [RELEASES[name] for name in names]


def select_groups(requested: Sequence[str], release: Release | None = None) -> list[str]:
    """Resolve ``--group`` values (repeatable, comma-separated; ``all`` = every group).

    :param release: keep only the groups that apply to this release (``all``
        selects those; a group named explicitly that does not apply is dropped
        with a message)
    :raises HarnessError: for an unknown group
    """
    groups = available_groups()
    names: list[str] = []
    for value in requested or ["all"]:
        for name in filter(None, (part.strip() for part in value.split(","))):
            if name == "all":
                names.extend(n for n in groups if n not in names)
            elif name not in groups:
                raise HarnessError(f"unknown group {name!r}; known: {', '.join(groups)}")
            elif name not in names:
                names.append(name)
    if not names:
        raise HarnessError(f"no test groups found in {GUEST_DIR}")
    if release is not None:
        kept = [n for n in names if release.suite in group_releases(groups[n])]
        dropped = [n for n in names if n not in kept]
        if dropped and requested and "all" not in ",".join(requested).split(","):
            log(f"{release.suite}: groups that do not apply there: {', '.join(dropped)}")
        names = kept
    return names


# --------------------------------------------------------------------------- boot


def qemu_escape(value: str) -> str:
    """Escape a QEMU option value (a comma is written twice)."""
    return value.replace(",", ",,")


def qemu_command(
    image: Path, run_dir: Path, share: Path, src: Path, memory_mb: int, smp: int, qemu: str
) -> list[str]:
    """The QEMU command line that boots Xen and dom0 from *image*.

    :param image: the cached image folder
    :param run_dir: the run folder (console log)
    :param share: the writable results folder shared with dom0
    :param src: the project tree shared read-only
    :returns: argv
    """
    kernel = qemu_escape(str(image / "vmlinuz"))
    modules = f"{kernel} {DOM0_CMDLINE},{qemu_escape(str(image / 'initrd.img'))}"
    return [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-accel", "tcg,thread=multi",
        "-cpu", "qemu64",
        "-smp", str(smp),
        "-m", str(memory_mb),
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-chardev", f"file,id=con0,path={qemu_escape(str(run_dir / 'console.log'))}",
        "-serial", "chardev:con0",
        "-kernel", str(image / "xen"),
        "-append", XEN_CMDLINE,
        "-initrd", modules,
        # dom0's root: a -device of its own, so that it is the first virtio disk
        # (vda); a legacy if=virtio drive would be placed after every -device
        "-drive",
        f"file={qemu_escape(str(image / 'rootfs.img'))},format=raw,if=none,id=dom0root,snapshot=on",
        "-device", "virtio-blk-pci,drive=dom0root",
        "-virtfs",
        f"local,path={qemu_escape(str(src))},mount_tag={SRC_TAG},security_model=none,readonly=on",
        "-virtfs",
        f"local,path={qemu_escape(str(share))},mount_tag={RES_TAG},security_model=none",
        # the same image again, read-only and never mounted in dom0: the root
        # of a PV domU through blkback (see xenlab.domu_root_disk); last (PCI
        # slots follow the command line), so that dom0's root stays vda
        "-drive",
        f"file={qemu_escape(str(image / 'rootfs.img'))},format=raw,if=none,id=domuroot,readonly=on",
        "-device", f"virtio-blk-pci,drive=domuroot,serial={DOMU_ROOT_SERIAL}",
    ]  # fmt: skip


@dataclasses.dataclass
class ConsoleWatcher:
    """Follows the console log: stages reached, fatal lines, the guest's markers."""

    path: Path
    echo: bool = False
    offset: int = 0
    partial: str = ""
    reached: dict[str, float] = dataclasses.field(default_factory=dict)
    fatal: str | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    def poll(self) -> None:
        """Read what the console printed since the last call."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        lines = text.split("\n")
        self.partial = lines.pop()
        for line in lines:
            self.feed(ANSI.sub("", line))

    def feed(self, line: str) -> None:
        """Process one console line."""
        now = time.monotonic() - self.started
        if self.echo:
            print(f"  | {line}", flush=True)
        for name, pattern in STAGES:
            if name not in self.reached and pattern.search(line):
                self.reached[name] = now
                if not self.echo:
                    log(f"{now:6.1f}s  {name}")
        if self.fatal is None and FATAL.search(line):
            self.fatal = line.strip()

    @property
    def stage(self) -> str:
        """The furthest stage reached (``"nothing"`` before the Xen banner)."""
        reached = [name for name in STAGE_NAMES if name in self.reached]
        return reached[-1] if reached else "nothing on the console"

    def tail(self, count: int = 40) -> list[str]:
        """The last *count* lines of the console log (escape codes removed)."""
        try:
            text = self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [ANSI.sub("", line) for line in text.splitlines()[-count:]]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends: a second Ctrl-C or
    SIGTERM (``timeout`` and ``pkill`` may both send one) must not cut a
    cleanup short and leave QEMU running.  The first one held is raised again
    afterwards, to the handler that was in place.  (Python runs signal
    handlers in the main thread; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def stop_process(proc: subprocess.Popen[bytes], grace: float | None = None) -> None:
    """Stop *proc* by its pid: SIGTERM, then SIGKILL after *grace* seconds
    (default :data:`STOP_GRACE`); signals to this process wait until it is done."""
    grace = STOP_GRACE if grace is None else grace
    if proc.poll() is not None:
        return
    with signals_held():
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5.0)


@dataclasses.dataclass
class BootOutcome:
    """What happened to one boot: ``ok`` means dom0 ran the entry and QEMU exited."""

    ok: bool
    reason: str
    stage: str
    seconds: float
    stages: dict[str, float]


class Terminated(KeyboardInterrupt):
    """SIGTERM received by the harness (handled like Ctrl-C: everything started is stopped)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def boot(
    cmd: Sequence[str],
    run_dir: Path,
    boot_timeout: float,
    test_timeout: float,
    shutdown_timeout: float,
    echo: bool,
) -> BootOutcome:
    """Start QEMU, follow the console, enforce every timeout, always stop QEMU.

    :param boot_timeout: seconds from start until the test unit starts
    :param test_timeout: seconds from the unit's start until the entry finishes
    :param shutdown_timeout: seconds from the entry's end until QEMU exits
    :returns: the outcome (never raises for a guest failure)
    """
    watcher = ConsoleWatcher(run_dir / "console.log", echo=echo)
    (run_dir / "console.log").touch()
    qemu_log = open(run_dir / "qemu.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        list(cmd), stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log(f"QEMU started (pid {proc.pid}); console: {run_dir / 'console.log'}")
    reason = ""
    ok = False
    try:
        while True:
            watcher.poll()
            elapsed = time.monotonic() - watcher.started
            if proc.poll() is not None:
                watcher.poll()
                if "tests finished" in watcher.reached:
                    ok, reason = True, "dom0 finished and powered off"
                else:
                    reason = f"QEMU exited (status {proc.returncode}) before the tests finished"
                break
            if watcher.fatal:
                reason = f"fatal console line: {watcher.fatal}"
                break
            unit = watcher.reached.get("test unit started")
            done = watcher.reached.get("tests finished")
            if unit is None and elapsed > boot_timeout:
                reason = f"boot timeout: the test unit did not start within {boot_timeout:.0f}s"
                break
            if unit is not None and done is None and elapsed - unit > test_timeout:
                reason = f"test timeout: the guest entry did not finish within {test_timeout:.0f}s"
                break
            if done is not None and elapsed - done > shutdown_timeout:
                ok = True
                reason = f"dom0 finished but did not power off within {shutdown_timeout:.0f}s"
                log(f"warning: {reason}; stopping QEMU")
                break
            time.sleep(0.25)
    except Terminated:
        reason = "terminated (SIGTERM)"
    except KeyboardInterrupt:
        reason = "interrupted (Ctrl-C)"
    finally:
        stop_process(proc)
        qemu_log.close()
        watcher.poll()
    seconds = time.monotonic() - watcher.started
    return BootOutcome(ok, reason, watcher.stage, seconds, dict(watcher.reached))


def diagnose(outcome: BootOutcome, run_dir: Path, lines: int = 40) -> None:
    """Print why a boot failed: the reason, the stage reached and the console's end."""
    log(f"FAILED: {outcome.reason}")
    log(f"stage reached: {outcome.stage} (stages: {', '.join(STAGE_NAMES[:-1])})")
    nxt = [name for name in STAGE_NAMES if name not in outcome.stages]
    if nxt:
        log(f"next stage expected: {nxt[0]}")
    watcher = ConsoleWatcher(run_dir / "console.log")
    log(f"last console lines ({run_dir / 'console.log'}):")
    for line in watcher.tail(lines):
        print(f"  | {line}")
    qemu_out = (run_dir / "qemu.log").read_text(errors="replace").strip() if (
        run_dir / "qemu.log"
    ).is_file() else ""
    if qemu_out:
        log("QEMU said:")
        for line in qemu_out.splitlines()[-20:]:
            print(f"  ! {line}")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Verdict:
    """The judged outcome of the guest's pytest run."""

    ok: bool
    problems: list[str]
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def passed(self) -> int:
        """Tests that neither failed, errored nor were skipped."""
        return self.tests - self.failures - self.errors - self.skipped


def parse_junit(path: Path) -> tuple[int, int, int, int]:
    """Sum (tests, failures, errors, skipped) over the test suites of a junit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = [0, 0, 0, 0]
    for suite in suites:
        for index, attr in enumerate(("tests", "failures", "errors", "skipped")):
            totals[index] += int(suite.get(attr, "0") or 0)
    return totals[0], totals[1], totals[2], totals[3]


def judge(share: Path, expected: int, allow_skips: bool) -> Verdict:
    """Judge the guest's results in *share*.

    Failure if: no exit code or junit file was written, pytest's exit code is
    not 0, any test failed or errored, fewer than *expected* tests ran, or a
    test was skipped (unless *allow_skips*).

    :param share: the results folder written by dom0
    :param expected: the minimum number of tests that must have run
    :param allow_skips: accept skipped tests
    """
    problems: list[str] = []
    code_file = share / "exitcode"
    junit = share / "junit.xml"
    if not code_file.is_file():
        problems.append("the guest wrote no exit code (tests not run?)")
    else:
        text = code_file.read_text().strip()
        if text != "0":
            problems.append(f"guest pytest exit code {text or '(empty)'}")
    if not junit.is_file():
        problems.append("the guest wrote no junit.xml")
        return Verdict(False, problems)
    try:
        tests, failures, errors, skipped = parse_junit(junit)
    except (ET.ParseError, ValueError) as exc:
        problems.append(f"unreadable junit.xml: {exc}")
        return Verdict(False, problems)
    if failures or errors:
        problems.append(f"{failures} failed, {errors} errors")
    if tests - skipped < expected:
        problems.append(f"only {tests - skipped} tests ran, expected at least {expected}")
    if skipped and not allow_skips:
        problems.append(f"{skipped} tests skipped (use --allow-skips to accept)")
    return Verdict(not problems, problems, tests, failures, errors, skipped)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    groups = ", ".join(available_groups()) or "(none found)"
    parser = argparse.ArgumentParser(
        prog="tests/xen/run.py",
        description=(
            "Boot a real Xen hypervisor with a Debian dom0 under QEMU (TCG): Debian 12 "
            "(Xen 4.17) and Debian 13 (Xen 4.20), and run pyxen9p's guest tests "
            "(tests/xen/guest/test_<group>.py) in dom0. Needs root and "
            "the Debian packages debootstrap, qemu-system-x86, e2fsprogs, python3-pip."
        ),
        epilog=(
            f"groups: {groups}. Exit status: 0 all passed, 1 test failure, "
            "2 harness/boot failure."
        ),
    )
    parser.add_argument(
        "--group", "-g", action="append", default=[],
        help="test group(s) to run (repeatable or comma-separated); default: all",
    )  # fmt: skip
    parser.add_argument(
        "--release", "-r", action="append", default=[],
        help="Debian release(s) to boot: bookworm (12), trixie (13) or all "
        "(repeatable or comma-separated; default: all, one boot each)",
    )  # fmt: skip
    parser.add_argument("--list-groups", action="store_true", help="list the groups and exit")
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="image cache (default: $PYXEN9P_XEN_CACHE or ~/.cache/pyxen9p-xen)",
    )  # fmt: skip
    parser.add_argument(
        "--results-dir", type=Path, default=None,
        help="where to put this run's console log and results (default: CACHE/runs/<time>)",
    )  # fmt: skip
    parser.add_argument("--rebuild", action="store_true", help="rebuild the image even if cached")
    parser.add_argument("--build-only", action="store_true", help="build/check the image, no boot")
    parser.add_argument("--check-tools", action="store_true", help="only check the host tools")
    parser.add_argument("--mirror", default=os.environ.get("PYXEN9P_XEN_MIRROR"),
                        help="Debian mirror URL (default: from this machine's apt sources)")
    parser.add_argument("--console", action="store_true", help="echo the serial console live")
    parser.add_argument("--pytest-args", default="",
                        help="extra arguments for the guest's pytest (e.g. \"-k watch -x\")")
    parser.add_argument("--min-tests", type=int, default=None,
                        help="minimum number of tests that must run (default: counted statically)")
    parser.add_argument("--allow-skips", action="store_true", help="do not fail on skipped tests")
    parser.add_argument("--bench", action="store_true",
                        help="the kernel group runs the full bench/bench_realxen.py and prints "
                        "its figures (see docs/realxen-benchmark.rst)")
    parser.add_argument("--bench-args", default="",
                        help="more options for bench/bench_realxen.py with --bench, one string"
                        " (e.g. \"--rings 1 --ring-order 9\")")
    parser.add_argument("--boot-timeout", type=float, default=300.0,
                        help="seconds until dom0's test unit starts (default 300)")
    parser.add_argument("--test-timeout", type=float, default=900.0,
                        help="seconds for the guest tests once the unit started (default 900)")
    parser.add_argument("--per-test-timeout", type=float, default=180.0,
                        help="pytest-timeout for each guest test (default 180)")
    parser.add_argument("--build-timeout", type=float, default=1800.0,
                        help="seconds allowed for building the image, and for waiting on "
                        "another run's build (default 1800)")
    parser.add_argument("--memory", type=int, default=4096, help="QEMU memory in MiB (4096)")
    parser.add_argument("--smp", type=int, default=2, help="QEMU CPUs (2)")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    parser.add_argument("--src", type=Path, default=REPO,
                        help="project tree shared read-only with dom0 (default: this repository)")
    parser.add_argument("--keep-images", type=int, default=2, help="cached images kept (2)")
    parser.add_argument("--keep-runs", type=int, default=10, help="run folders kept (10)")
    return parser  # fmt: skip


def print_guest_log(share: Path) -> None:
    """Print the guest's pytest output."""
    path = share / "pytest.log"
    if not path.is_file():
        log("no guest pytest log was written")
        return
    log(f"guest pytest output ({path}):")
    sys.stdout.write(path.read_text(errors="replace"))
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see ``--help``.

    :returns: 0 when every selected guest test passed, 1 on a test failure,
        2 on a harness or boot failure
    """
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    except HarnessError as exc:
        log(f"ERROR: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        log("terminated" if isinstance(exc, Terminated) else "interrupted")
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    if args.list_groups:
        for name, path in available_groups().items():
            where = ",".join(group_releases(path))
            print(f"{name:12s} {count_tests(path):3d} tests  {path.relative_to(REPO)}  [{where}]")
        return 0
    missing = missing_host_packages()
    if missing:
        raise HarnessError(
            "missing host tools; install: apt-get install --no-install-recommends "
            + " ".join(missing)
        )
    if args.check_tools:
        log("host tools present")
        return 0
    releases = select_releases(args.release)
    cache = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    if args.results_dir:
        base = args.results_dir.resolve()
        if base.exists() and any(base.iterdir()):
            raise HarnessError(f"--results-dir {base} is not empty")
    status = 0
    lines: list[str] = []
    for release in releases:
        rc, line = run_release(args, release, cache)
        lines.append(line)
        status = max(status, rc)
    if len(releases) > 1:
        for line in lines:
            print(line, flush=True)
    return status


def run_release(args: argparse.Namespace, release: Release, cache: Path) -> tuple[int, str]:
    """Build (or reuse) *release*'s image, boot it and judge its guest tests.

    :returns: (exit status as :func:`main`'s, a one-line summary)
    """
    groups = [] if args.build_only else select_groups(args.group, release)
    if not args.build_only and not groups:
        log(f"{release.suite}: none of the selected groups applies; nothing to boot")
        return 0, f"real-Xen {release.suite}: no group applies"
    started = time.monotonic()
    plan = plan_mirror(read_host_apt_sources(), host_codename(), release.suite, args.mirror)
    key = image_key(plan, release)
    image = cache / "images" / key
    log(f"release {release.suite} ({release.label})")
    if args.rebuild and image_ready(image):
        with file_lock(cache / "build.lock", args.build_timeout, "image build"):
            shutil.rmtree(image, ignore_errors=True)
    if image_ready(image):
        log(f"using cached image {image}")
        os.utime(image)
    else:
        image = build_image(cache, key, plan, args.build_timeout, args.keep_images, release)
    if args.build_only:
        log(f"image ready: {image} ({time.monotonic() - started:.0f}s)")
        return 0, f"real-Xen {release.suite}: image ready"

    src = args.src.resolve()
    if args.results_dir:
        run_dir = args.results_dir.resolve() / release.suite
    else:
        runs = cache / "runs"
        prune(runs, max(0, args.keep_runs - 1))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = runs / f"{stamp}-{os.getpid()}-{release.suite}"
    share = run_dir / "share"
    share.mkdir(parents=True)
    files = [available_groups()[name].relative_to(REPO).as_posix() for name in groups]
    extra = shlex.split(args.pytest_args)
    if args.min_tests is not None:
        expected = args.min_tests
    elif extra:
        expected = 1
    else:
        expected = sum(count_tests(available_groups()[name], release.suite) for name in groups)
    request = {
        "release": release.suite,
        "groups": groups,
        "files": files,
        "pytest_args": extra,
        "test_timeout": args.test_timeout,
        "per_test_timeout": args.per_test_timeout,
        "bench": args.bench,
        "bench_args": shlex.split(args.bench_args),
    }
    (share / "request.json").write_text(json.dumps(request, indent=2) + "\n")
    log(f"groups: {', '.join(groups)} (expect >= {expected} tests); run folder: {run_dir}")
    cmd = qemu_command(image, run_dir, share, src, args.memory, args.smp, args.qemu)
    (run_dir / "qemu-command.txt").write_text(" ".join(cmd) + "\n")
    outcome = boot(cmd, run_dir, args.boot_timeout, args.test_timeout + 120.0, 90.0, args.console)
    print_guest_log(share)
    verdict = judge(share, expected, args.allow_skips)
    total = time.monotonic() - started
    summary = {
        "release": release.suite,
        "groups": groups,
        "boot": dataclasses.asdict(outcome),
        "verdict": dataclasses.asdict(verdict),
        "total_seconds": round(total, 1),
        "image": str(image),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not outcome.ok:
        diagnose(outcome, run_dir)
        for problem in verdict.problems:
            log(f"FAILED: {problem}")
        return 2, f"real-Xen {release.suite}: harness/boot failure ({outcome.reason})"
    for problem in verdict.problems:
        log(f"FAILED: {problem}")
    timing = ", ".join(f"{name} {sec:.1f}s" for name, sec in outcome.stages.items())
    log(f"boot timeline: {timing}")
    log(f"run folder: {run_dir}; total {total:.0f}s")
    line = (
        f"real-Xen {release.suite}: {verdict.passed} passed, "
        f"{verdict.failures + verdict.errors} failed"
        + (f", {verdict.skipped} skipped" if verdict.skipped else "")
    )
    print(line, flush=True)
    return (0 if verdict.ok else 1), line


if __name__ == "__main__":
    sys.exit(main())
