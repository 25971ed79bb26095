"""Shared pytest setup: markers, the root-tier gate, and real sshd/user fixtures.

Markers:
  root    needs euid 0, a real sshd and the client tools, and bcc for this interpreter.
  chroot  additionally needs the Debian 13 (OpenSSH 10) chroot (built or cached).

When the root tier cannot run, its tests are skipped with the reason -- except when
SSHLOG_REQUIRE_ROOT=1 (set by CI), where they FAIL with the reason, so the root tier can
never silently disappear from a CI run.

Fixtures (session scope, so one sshd serves the whole run):
  sshd         harness.Sshd (OpenSSH 9.2 from the host) on 127.0.0.1 and ::1, free port.
  users        {"sshlogt1": TestUser, "sshlogt2": TestUser} real host accounts with keys.
  chroot_sshd  harness.ChrootSshd (OpenSSH 10, Debian 13 chroot) with the same users.
  target       parametrized over "openssh9" / "openssh10": a Target(name, sshd, users).
"""
import importlib.util
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)  # so tests can `import harness` without tests/__init__.py

import harness  # noqa: E402

REQUIRE_ROOT_ENV = "SSHLOG_REQUIRE_ROOT"
USER_NAMES = ("sshlogt1", "sshlogt2")
ROOT_TOOLS = ("ssh", "scp", "sftp", "sshpass", "ssh-keygen", "useradd", "chpasswd")


def pytest_configure(config):
    # A run started in the background (`make test &`) inherits SIGINT ignored, and
    # every program the tests start would too: a `watch` stopped with SIGINT would
    # never exit.  Children get SIGINT's default action, as from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "root: needs euid 0, a real sshd and bcc (skipped otherwise; "
        "fails instead when %s=1)" % REQUIRE_ROOT_ENV)
    config.addinivalue_line(
        "markers", "chroot: needs the Debian 13 / OpenSSH 10 chroot target (root tier)")


def root_tier_required() -> bool:
    return os.environ.get(REQUIRE_ROOT_ENV) == "1"


def unavailable(reason: str):
    """Skip with ``reason``, or fail with it when the root tier is required (CI)."""
    if root_tier_required():
        pytest.fail("root tier cannot run but %s=1: %s" % (REQUIRE_ROOT_ENV, reason),
                    pytrace=False)
    pytest.skip(reason)


def root_tier_problem() -> Optional[str]:
    """Why the root tier cannot run on this machine/interpreter, or None."""
    if os.geteuid() != 0:
        return "root tier needs euid 0 (running as uid %d)" % os.geteuid()
    if not os.path.exists(harness.SSHD_BIN):
        return "%s is missing (apt-get install openssh-server)" % harness.SSHD_BIN
    missing = [t for t in ROOT_TOOLS if shutil.which(t) is None]
    if missing:
        return "missing tools: %s" % ", ".join(missing)
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable by %s (use /usr/bin/python3, python3-bpfcc)" % sys.executable
    return None


def require_root_tier() -> None:
    problem = root_tier_problem()
    if problem:
        unavailable(problem)


def pytest_runtest_setup(item):
    if item.get_closest_marker("root") or item.get_closest_marker("chroot"):
        require_root_tier()


@pytest.fixture(scope="session")
def users(tmp_path_factory) -> Dict[str, harness.TestUser]:
    """Real accounts sshlogt1/sshlogt2 (reused if present), keys in a session tmp dir."""
    require_root_tier()
    key_dir = str(tmp_path_factory.mktemp("keys"))
    return {name: harness.create_user(name, "Pw-%s-9" % name, key_dir=key_dir)
            for name in USER_NAMES}


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One host sshd (OpenSSH 9.2) for the session, on 127.0.0.1 and ::1."""
    require_root_tier()
    server = harness.Sshd(str(tmp_path_factory.mktemp("sshd")),
                          listen=("127.0.0.1", "::1"))
    try:
        server.start()
    except harness.HarnessUnavailable as e:
        unavailable(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chroot_sshd(tmp_path_factory, users):
    """One OpenSSH 10 sshd in a Debian 13 chroot, with the same users (same uids)."""
    require_root_tier()
    server = harness.ChrootSshd(str(tmp_path_factory.mktemp("sshd10")),
                                listen=("127.0.0.1", "::1"))
    try:
        for user in users.values():
            server.add_user(user)
        server.start()
    except harness.HarnessUnavailable as e:
        server.stop()
        unavailable(str(e))
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@dataclass
class Target:
    """An sshd to test against plus its users (homes as the sessions see them)."""
    name: str
    sshd: harness.Sshd
    users: Dict[str, harness.TestUser]


@pytest.fixture(scope="session", params=[
    "openssh9", pytest.param("openssh10", marks=pytest.mark.chroot)])
def target(request):
    """The test runs once per OpenSSH flavour; each flavour's sshd is session-scoped."""
    if request.param == "openssh9":
        return Target("openssh9", request.getfixturevalue("sshd"),
                      request.getfixturevalue("users"))
    server = request.getfixturevalue("chroot_sshd")
    return Target("openssh10", server, dict(server.users))
