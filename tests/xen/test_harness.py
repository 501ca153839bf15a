"""Host-side unit tests of the real-Xen harness (``tests/xen/run.py``).

They need no Xen, no root and no network: apt-source parsing, the mirror
plan, group selection and test counting, result judging, and the boot loop's
timeouts and diagnosis against a fake QEMU.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyxen9p_xen_run", HERE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load()

DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://vendor.invalid/node
Suites: nodistro
Components: main

Types: deb
Enabled: no
URIs: http://disabled.invalid/debian
Suites: bookworm
Components: main
"""


def test_parse_deb822_keeps_enabled_stanzas() -> None:
    sources = run.parse_deb822(DEB822)
    assert [s.uris for s in sources] == [
        ["http://mirror.invalid/debian"],
        ["http://mirror.invalid/debian-security"],
        ["https://vendor.invalid/node"],
    ]
    assert sources[0].suites == ["bookworm", "bookworm-updates"]
    assert sources[0].components == ["main", "contrib"]
    assert sources[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_parse_one_line_sources() -> None:
    text = textwrap.dedent(
        """\
        # comment
        deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian trixie main
        deb-src http://mirror.invalid/debian trixie main
        deb http://mirror.invalid/debian-security trixie-security main # tail
        garbage line
        """
    )
    sources = run.parse_one_line(text)
    assert len(sources) == 3
    assert sources[0].options == {"arch": "amd64", "Signed-By": "/k.gpg"}
    assert sources[0].suites == ["trixie"]
    assert sources[1].types == ["deb-src"]
    assert sources[2].components == ["main"]


def test_plan_mirror_same_codename() -> None:
    plan = run.plan_mirror(run.parse_deb822(DEB822), "bookworm")
    assert plan.mirror == "http://mirror.invalid/debian"
    assert "vendor.invalid" not in plan.chroot_sources
    assert "disabled.invalid" not in plan.chroot_sources
    assert "Suites: bookworm bookworm-updates" in plan.chroot_sources
    assert "Suites: bookworm-security" in plan.chroot_sources
    assert plan.keyrings == ["/usr/share/keyrings/debian-archive-keyring.gpg"]


def test_plan_mirror_maps_another_codename_to_bookworm() -> None:
    text = (
        "deb http://mirror.invalid/debian trixie main\n"
        "deb http://mirror.invalid/debian-security trixie-security main\n"
    )
    plan = run.plan_mirror(run.parse_one_line(text), "trixie")
    assert plan.mirror == "http://mirror.invalid/debian"
    assert "Suites: bookworm\n" in plan.chroot_sources
    assert "Suites: bookworm-security\n" in plan.chroot_sources
    assert "trixie" not in plan.chroot_sources


def test_plan_mirror_without_debian_entry_fails_or_uses_override() -> None:
    sources = run.parse_one_line("deb https://vendor.invalid/x nodistro main\n")
    with pytest.raises(run.HarnessError, match="--mirror"):
        run.plan_mirror(sources, "bookworm")
    plan = run.plan_mirror(sources, "bookworm", override="http://local.invalid/debian")
    assert plan.mirror == "http://local.invalid/debian"
    assert plan.chroot_sources.startswith("Types: deb\nURIs: http://local.invalid/debian\n")


def test_read_host_apt_sources_from_a_fake_root(tmp_path: Path) -> None:
    apt = tmp_path / "etc/apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text("deb http://a.invalid/debian bookworm main\n")
    (apt / "sources.list.d/x.sources").write_text(DEB822)
    (apt / "sources.list.d/off.list.disabled").write_text("deb http://no.invalid/ bookworm main\n")
    (tmp_path / "etc/os-release").write_text('NAME="Debian"\nVERSION_CODENAME=bookworm\n')
    sources = run.read_host_apt_sources(tmp_path)
    assert sources[0].uris == ["http://a.invalid/debian"]
    assert all("no.invalid" not in s.uris[0] for s in sources)
    assert run.host_codename(tmp_path) == "bookworm"


def test_no_mirror_host_is_hard_coded() -> None:
    pattern = re.compile(r"\b(deb|ftp|httpredir|security|cdn-fastly)\.debian\.org\b")
    files = [p for p in HERE.rglob("*") if p.is_file() and p.suffix in {".py", ".sh", ""}]
    files.append(HERE.parent.parent / "docs" / "realxen.rst")
    for path in files:
        if path.exists():
            assert not pattern.search(path.read_text(errors="replace")), path


def test_image_key_depends_on_mirror() -> None:
    plan = run.plan_mirror(run.parse_deb822(DEB822), "bookworm")
    changed = DEB822.replace("mirror.invalid", "m2.invalid")
    other = run.plan_mirror(run.parse_deb822(changed), "bookworm")
    assert run.image_key(plan) == run.image_key(plan)
    assert run.image_key(plan) != run.image_key(other)


def test_count_tests_counts_functions_methods_and_params(tmp_path: Path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text(
        textwrap.dedent(
            """\
            import pytest

            def test_a(): pass
            def helper(): pass

            @pytest.mark.parametrize("n", [1, 2, 3])
            def test_b(n): pass

            class TestC:
                def test_d(self): pass
                def other(self): pass
            """
        )
    )
    assert run.count_tests(path) == 5


def test_groups_are_guest_files() -> None:
    groups = run.available_groups()
    assert "lab" in groups and "bindings" in groups
    assert run.select_groups(["bindings"]) == ["bindings"]
    assert run.select_groups(["lab,bindings", "lab"]) == ["lab", "bindings"]
    assert set(run.select_groups([])) == set(groups)
    with pytest.raises(run.HarnessError, match="unknown group"):
        run.select_groups(["nope"])


def test_releases_and_their_groups() -> None:
    assert [r.suite for r in run.select_releases([])] == ["bookworm", "trixie"]
    assert [r.suite for r in run.select_releases(["13"])] == ["trixie"]
    assert [r.suite for r in run.select_releases(["trixie,12", "bookworm"])] == [
        "trixie",
        "bookworm",
    ]
    with pytest.raises(run.HarnessError, match="unknown release"):
        run.select_releases(["sid"])
    trixie, bookworm = run.RELEASES["trixie"], run.RELEASES["bookworm"]
    assert "xen-utils-4.20" in trixie.packages and "xen-utils-4.17" not in trixie.packages
    assert bookworm.packages == run.PACKAGES
    on_13 = run.select_groups([], trixie)
    on_12 = run.select_groups([], bookworm)
    assert {"lab", "bindings", "xen9pfsd", "qemu10"} <= set(on_13)
    assert "frontend_dom0" not in on_13 and "kernel" not in on_13
    assert {"lab", "bindings", "frontend_dom0", "kernel", "teardown"} <= set(on_12)
    assert "xen9pfsd" not in on_12 and "qemu10" not in on_12
    assert run.select_groups(["kernel,bindings"], trixie) == ["bindings"]


def test_image_keys_per_release() -> None:
    plan12 = run.plan_mirror(run.parse_deb822(DEB822), "bookworm", "bookworm")
    plan13 = run.plan_mirror(run.parse_deb822(DEB822), "bookworm", "trixie")
    assert "Suites: trixie trixie-updates" in plan13.chroot_sources
    # Debian 12's key is what it was before there were releases
    assert run.image_key(plan12) == run.image_key(plan12, run.RELEASES["bookworm"])
    assert run.image_key(plan13, run.RELEASES["trixie"]) != run.image_key(plan12)


def test_group_releases_and_release_markers(tmp_path: Path) -> None:
    path = tmp_path / "test_y.py"
    path.write_text(
        textwrap.dedent(
            """            import pytest
            RELEASES = ("trixie",)

            def test_a(): pass

            @pytest.mark.release("bookworm")
            def test_b(): pass

            @pytest.mark.release("trixie", "bookworm")
            @pytest.mark.parametrize("n", [1, 2])
            def test_c(n): pass
            """
        )
    )
    assert run.group_releases(path) == ("trixie",)
    assert run.count_tests(path) == 4
    assert run.count_tests(path, "trixie") == 3
    assert run.count_tests(path, "bookworm") == 4
    path.write_text('RELEASES = ("sid",)\n')
    with pytest.raises(run.HarnessError, match="RELEASES"):
        run.group_releases(path)
    path.write_text("def test_a(): pass\n")
    assert run.group_releases(path) == ("bookworm", "trixie")


def test_a_build_prunes_only_its_own_release(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name, suite in (("a12", "bookworm"), ("b12", "bookworm"), ("c12", "bookworm"),
                        ("t13", "trixie")):  # fmt: skip
        (images / name).mkdir(parents=True)
        (images / name / "manifest.json").write_text(f'{{"suite": "{suite}"}}')
    assert run.image_suite(images / "t13") == "trixie"
    assert run.image_suite(tmp_path) == "bookworm"
    others = {p.name for p in images.iterdir() if run.image_suite(p) != "bookworm"}
    run.prune(images, 2 + len(others), {"c12"} | others)
    left = {p.name for p in images.iterdir()}
    assert "t13" in left and "c12" in left and len(left) >= 3
    assert run.debs_dir(tmp_path, run.RELEASES["trixie"]) == tmp_path / "debs-trixie"
    assert run.debs_dir(tmp_path, run.RELEASES["bookworm"]) == tmp_path / "debs"


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="{e}" failures="{f}" skipped="{s}" tests="{t}">
</testsuite></testsuites>
"""


def _results(tmp_path: Path, code: str | None, t: int, f: int = 0, e: int = 0, s: int = 0) -> Path:
    if code is not None:
        (tmp_path / "exitcode").write_text(code + "\n")
    (tmp_path / "junit.xml").write_text(JUNIT.format(t=t, f=f, e=e, s=s))
    return tmp_path


def test_judge_accepts_a_clean_run(tmp_path: Path) -> None:
    verdict = run.judge(_results(tmp_path, "0", 12), expected=12, allow_skips=False)
    assert verdict.ok and verdict.passed == 12 and verdict.problems == []


@pytest.mark.parametrize(
    ("code", "tests", "failures", "skipped", "expected", "message"),
    [
        ("1", 5, 1, 0, 5, "1 failed"),
        ("0", 4, 0, 0, 5, "only 4 tests ran"),
        ("0", 5, 0, 1, 4, "skipped"),
        (None, 5, 0, 0, 5, "no exit code"),
        ("124", 5, 0, 0, 5, "exit code 124"),
    ],
)
def test_judge_rejects(
    tmp_path: Path,
    code: str | None,
    tests: int,
    failures: int,
    skipped: int,
    expected: int,
    message: str,
) -> None:
    share = _results(tmp_path, code, tests, failures, 0, skipped)
    verdict = run.judge(share, expected=expected, allow_skips=False)
    assert not verdict.ok
    assert any(message in p for p in verdict.problems), verdict.problems


def test_judge_without_junit(tmp_path: Path) -> None:
    verdict = run.judge(tmp_path, expected=1, allow_skips=False)
    assert not verdict.ok
    assert "no exit code" in verdict.problems[0]
    assert "no junit.xml" in verdict.problems[1]


def test_console_watcher_stages_and_fatal(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    watcher = run.ConsoleWatcher(log)
    watcher.poll()
    assert watcher.stage == "nothing on the console"
    log.write_bytes(
        b"(XEN) Xen version 4.17.7 (Debian)\r\n[    0.000] Linux version 6.1.0\n[partial"
    )
    watcher.poll()
    assert watcher.stage == "dom0 kernel"
    with open(log, "ab") as handle:
        handle.write(b" line]\n\x1b[0;32mPYXEN9P-GUEST: unit started\x1b[0m\n")
        handle.write(b"Kernel panic - not syncing: x\n")
    watcher.poll()
    assert watcher.stage == "test unit started"
    assert watcher.fatal is not None and "Kernel panic" in watcher.fatal
    assert watcher.tail(2)[-1].startswith("Kernel panic")


def test_qemu_command_escapes_commas(tmp_path: Path) -> None:
    image = tmp_path / "im,g"
    cmd = run.qemu_command(image, tmp_path, tmp_path / "share", tmp_path, 4096, 2, "qemu")
    initrd = cmd[cmd.index("-initrd") + 1]
    assert "im,,g/vmlinuz" in initrd and initrd.endswith("im,,g/initrd.img")
    assert "tcg,thread=multi" in cmd and "qemu64" in cmd
    assert any("readonly=on" in arg and run.SRC_TAG in arg for arg in cmd)


def test_qemu_command_gives_a_read_only_domu_root_disk_after_dom0s(tmp_path: Path) -> None:
    cmd = run.qemu_command(tmp_path, tmp_path, tmp_path / "share", tmp_path, 4096, 2, "qemu")
    drives = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]
    image = str(tmp_path / "rootfs.img")
    # dom0's root first (its changes go to a snapshot), then the same image read-only
    assert [d.split(",")[0] for d in drives] == [f"file={image}", f"file={image}"]
    assert "snapshot=on" in drives[0] and "id=dom0root" in drives[0]
    assert "readonly=on" in drives[1] and "id=domuroot" in drives[1]
    # each a -device, in that order: PCI slots follow the command line (a
    # legacy if=virtio drive would come after every -device), dom0's is vda
    devices = [(i, cmd[i + 1]) for i, arg in enumerate(cmd) if arg == "-device"]
    assert [d for _, d in devices] == [
        "virtio-blk-pci,drive=dom0root",
        f"virtio-blk-pci,drive=domuroot,serial={run.DOMU_ROOT_SERIAL}",
    ]
    virtfs = [i for i, arg in enumerate(cmd) if arg == "-virtfs"]
    assert devices[0][0] < min(virtfs) and devices[1][0] > max(virtfs)
    assert not any("if=virtio" in d for d in drives)
    # the guest helpers look the disk up by the same serial
    lab = (Path(run.__file__).parent / "guest" / "xenlab.py").read_text()
    assert f'DOMU_ROOT_DISK_SERIAL = "{run.DOMU_ROOT_SERIAL}"' in lab


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(
        "#!" + sys.executable + "\n"
        "import sys, time\n"
        "args = sys.argv\n"
        "spec = args[args.index('-chardev') + 1]\n"
        "path = spec.split('path=', 1)[1].replace(',,', ',')\n"
        "con = open(path, 'a', buffering=1)\n" + textwrap.dedent(body)
    )
    script.chmod(0o755)
    return str(script)


def _boot(tmp_path: Path, qemu: str, boot_timeout: float = 5.0, test_timeout: float = 5.0) -> Any:
    image = tmp_path / "image"
    cmd = run.qemu_command(image, tmp_path, tmp_path / "share", tmp_path, 64, 1, qemu)
    return run.boot(cmd, tmp_path, boot_timeout, test_timeout, 3.0, echo=False)


def test_boot_success_path(tmp_path: Path) -> None:
    qemu = _fake_qemu(
        tmp_path,
        """
        lines = ["(XEN) Xen version 4.17.7", "Linux version 6.1",
                 "EXT4-fs (vda): mounted filesystem x", "PYXEN9P-GUEST: unit started",
                 "PYXEN9P-GUEST: pytest started", "PYXEN9P-GUEST: entry finished rc=0",
                 "reboot: Power down"]
        for line in lines:
            con.write(line + "\\n")
            time.sleep(0.05)
        """,
    )
    outcome = _boot(tmp_path, qemu)
    assert outcome.ok, outcome.reason
    assert outcome.stage == "powered off"
    assert list(outcome.stages) == list(run.STAGE_NAMES)


def test_boot_timeout_stops_qemu_and_names_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "STOP_GRACE", 1.0)
    qemu = _fake_qemu(
        tmp_path,
        """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # force the SIGKILL path
        con.write("(XEN) Xen version 4.17.7\\nLinux version 6.1\\n")
        open(path + ".pid", "w").write(str(__import__("os").getpid()))
        time.sleep(600)
        """,
    )
    started = time.monotonic()
    outcome = _boot(tmp_path, qemu, boot_timeout=1.5)
    assert time.monotonic() - started < 30
    assert not outcome.ok
    assert "boot timeout" in outcome.reason
    assert outcome.stage == "dom0 kernel"
    pid = int((tmp_path / "console.log.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_boot_fatal_line_ends_early(tmp_path: Path) -> None:
    qemu = _fake_qemu(
        tmp_path,
        """
        con.write("(XEN) Xen version 4.17.7\\n(XEN) Panic on CPU 0:\\n")
        time.sleep(600)
        """,
    )
    outcome = _boot(tmp_path, qemu, boot_timeout=60)
    assert not outcome.ok
    assert "Panic on CPU" in outcome.reason


def test_boot_exit_before_tests_is_a_failure(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, 'con.write("(XEN) Xen version 4.17.7\\n")\nsys.exit(1)\n')
    outcome = _boot(tmp_path, qemu)
    assert not outcome.ok
    assert "before the tests finished" in outcome.reason


def test_file_lock_times_out(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    with run.file_lock(lock, 1.0, "test"):
        # a second holder in another process cannot take it
        import subprocess

        code = (
            "import fcntl,sys; f=open(sys.argv[1],'a+');\n"
            "try:\n fcntl.flock(f, fcntl.LOCK_EX|fcntl.LOCK_NB); print('got')\n"
            "except OSError: print('busy')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(lock)], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        assert out == "busy"
    with run.file_lock(lock, 1.0, "test"):
        pass


def test_missing_host_packages_names_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "HOST_TOOLS", {"definitely-not-a-tool-xyz": "some-package"})
    monkeypatch.setattr(run, "HOST_FILES", {"/nonexistent/keyring.gpg": "keyring-package"})
    monkeypatch.setattr(run, "HOST_MODULES", {"no_such_module_xyz": "module-package"})
    assert run.missing_host_packages() == ["keyring-package", "module-package", "some-package"]


def test_help_runs() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "--group" in out.stdout and "--cache-dir" in out.stdout


def test_a_second_sigterm_does_not_cut_stopping_qemu_short() -> None:
    """``timeout`` and ``pkill`` may both send SIGTERM: the one that arrives
    while the harness stops QEMU waits until QEMU is gone (SIGKILL after the
    grace period here, as this stand-in ignores SIGTERM), then is raised."""
    import os
    import signal
    import subprocess
    import threading

    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; sleep 60"],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    previous = signal.signal(signal.SIGTERM, run._raise_terminated)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(run.Terminated):
            run.stop_process(proc, grace=1.0)
            time.sleep(5)  # not reached: the held SIGTERM is raised on the way out
        assert proc.poll() == -signal.SIGKILL
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
