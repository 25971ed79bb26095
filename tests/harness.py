"""Test harness for the root tier: a real sshd, real users, real ssh/scp/sftp clients.

Why this exists: sshlog watches a *stock* OpenSSH server through eBPF, so the only honest
integration test drives a genuine ``/usr/sbin/sshd`` with genuine clients (SPEC §11,
CAPTURE-NOTES §2). Nothing here is mocked. The module uses only the standard library and
imports on Python 3.9+, so it works both under ``/usr/bin/python3`` (bcc) and the pyenv
interpreter.

Ground rules the code follows:
  * every wait is bounded (``wait_for``, ``timeout=`` on every subprocess call);
  * every process the harness starts is stopped by pid, never by name, because other people
    run their own sshd's and tracers on the same machine;
  * ports are picked by binding port 0, never 22/2222/2223;
  * the client side never touches ``~/.ssh`` of the invoking user (``-F /dev/null``, a private
    ``UserKnownHostsFile``, ``IdentitiesOnly=yes``).

Public API (see each docstring):
    free_port, pids_of, proc_tree, wait_for
    TestUser, create_user
    Sshd, ChrootSshd, ensure_trixie_rootfs, debian_mirror
    ssh_run, ssh_password, ssh_bad_key, ssh_unknown_user, scp_upload, sftp_put
    PtySession
    HarnessError, HarnessUnavailable
"""
from __future__ import annotations

import fcntl
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

SSHD_BIN = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
PRIVSEP_DIR = "/run/sshd"
FORBIDDEN_PORTS = frozenset({22, 2222, 2223})
CACHE_DIR = "/var/cache/sshlog-tests"
TRIXIE_TARBALL = "trixie-openssh.tar.zst"
DEBIAN_SOURCES = "/etc/apt/sources.list.d/debian.sources"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEY_COMMENT_TAG = "sshlog-harness:"


# ###########################################################################
# ## Errors
# ###########################################################################

class HarnessError(RuntimeError):
    """The harness could not do what it was asked (a bug or a broken machine)."""


class HarnessUnavailable(HarnessError):
    """A prerequisite is missing (no root, no sshd binary, mirror unreachable...).

    conftest turns this into a skip, or into a failure when SSHLOG_REQUIRE_ROOT=1.
    """


# ###########################################################################
# ## Small helpers: ports, /proc, polling
# ###########################################################################

def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host`` (bind to port 0).

    The kernel's ephemeral range never contains 22, but 2222/2223 are used by hand-run
    sshd's on these VMs, so they are excluded explicitly anyway.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port
    raise HarnessError("could not find a free port on %s" % host)


def _port_free_on_all(port: int, hosts: Iterable[str]) -> bool:
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _free_port_all(hosts: Sequence[str]) -> int:
    """A port free on every address in ``hosts`` (sshd must bind all of them)."""
    for _ in range(50):
        port = free_port(hosts[0])
        if _port_free_on_all(port, hosts[1:]):
            return port
    raise HarnessError("could not find a port free on all of %s" % (list(hosts),))


def _read_stat(pid: int) -> Optional[Tuple[int, str, int]]:
    """(ppid, state, starttime) of ``pid`` from /proc/PID/stat, or None if it is gone.

    comm may contain spaces and ')' so the fields are split after the *last* ')'.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    # rest[0] = state (field 3), rest[1] = ppid (field 4), rest[19] = starttime (field 22)
    return int(rest[1]), rest[0].decode(), int(rest[19])


def _all_pids() -> List[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_of(ppid: int) -> List[int]:
    """Pids whose parent is ``ppid`` (live processes only; zombies excluded)."""
    out = []
    for pid in _all_pids():
        st = _read_stat(pid)
        if st and st[0] == ppid and st[1] != "Z":
            out.append(pid)
    return sorted(out)


def _proc_levels(root: int) -> List[List[int]]:
    """``root``'s live subtree by depth: [[root], [children], [grandchildren], ...]."""
    children: Dict[int, List[int]] = {}
    for pid in _all_pids():
        st = _read_stat(pid)
        if st and st[1] != "Z":
            children.setdefault(st[0], []).append(pid)
    levels, level = [], [root]
    while level:
        levels.append(level)
        level = sorted(c for p in level for c in children.get(p, []))
    return levels


def proc_tree(root: int) -> List[int]:
    """``root`` and all its live descendants (one /proc scan, parents before children)."""
    return [pid for level in _proc_levels(root) for pid in level]


def _alive(pid: int, starttime: Optional[int] = None) -> bool:
    """True while ``pid`` exists, is not a zombie and (if given) has the same start time.

    Comparing the start time guards against signalling a recycled pid.
    """
    st = _read_stat(pid)
    if st is None or st[1] in ("Z", "X"):
        return False
    return starttime is None or st[2] == starttime


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
             desc: Optional[str] = None):
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError after ``timeout`` seconds, naming ``desc`` (or the predicate),
    so a hung test fails with a reason instead of hanging CI.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s"
                                 % (timeout, desc or getattr(predicate, "__name__", predicate)))
        time.sleep(interval)


def _kill_pids(snapshot: Sequence[Tuple[int, int]], timeout: float,
               first: Sequence[int] = (signal.SIGTERM,)) -> None:
    """Send ``first`` signals to each (pid, starttime), wait up to ``timeout``, then SIGKILL."""
    for sigs in (first, (signal.SIGKILL,)):
        for pid, start in snapshot:
            for sig in sigs:
                if _alive(pid, start):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(_alive(pid, start) for pid, start in snapshot):
                return
            time.sleep(0.02)


def _kill_tree(root: int, root_start: Optional[int], timeout: float = 5.0) -> None:
    """Stop ``root`` and its descendants, deepest level first.

    The tree is captured *before* anything is signalled, because once a listener dies its
    session processes are reparented and can no longer be found through their ppid.
    Killing children before their parents lets each parent reap its children; otherwise
    they become orphans of pid 1 (which reaps only now and then on these VMs) and linger
    as ``[sshd] <defunct>`` entries that confuse /proc-based session seeding.
    """
    if not _alive(root, root_start):
        return
    levels = [_snapshot(level) for level in _proc_levels(root)]
    levels[0] = [(p, s) for p, s in levels[0] if root_start is None or s == root_start]
    for depth in range(len(levels) - 1, -1, -1):
        # Below the listener also send SIGHUP: an interactive bash ignores SIGTERM but
        # exits on hangup, as it would when a real connection drops. Not to the listener
        # itself: SIGHUP makes sshd re-exec.
        first = (signal.SIGTERM,) if depth == 0 else (signal.SIGHUP, signal.SIGTERM)
        _kill_pids(levels[depth], timeout, first)


def _snapshot(pids: Iterable[int]) -> List[Tuple[int, int]]:
    out = []
    for pid in pids:
        st = _read_stat(pid)
        if st is not None:
            out.append((pid, st[2]))
    return out


def _run(argv: Sequence[str], timeout: float = 60, input: Optional[bytes] = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run a setup command; on failure raise HarnessError with its stderr."""
    try:
        cp = subprocess.run(list(argv), input=input, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=timeout,
                            stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise HarnessUnavailable("%s not found: %s" % (argv[0], e))
    if check and cp.returncode != 0:
        raise HarnessError("%s failed (rc=%d): %s" % (
            " ".join(shlex.quote(a) for a in argv), cp.returncode,
            cp.stderr.decode(errors="replace").strip()))
    return cp


def _bracket(host: str) -> str:
    """scp/sftp need ``[::1]`` where ssh takes ``::1``."""
    return "[%s]" % host if ":" in host else host


# ###########################################################################
# ## Users and keys
# ###########################################################################

@dataclass
class TestUser:
    """A real Linux account plus a harness-owned key pair (and a key that is *not* authorized)."""
    __test__ = False  # not a pytest test class despite the name

    name: str
    uid: int
    password: str
    key: str          # private key path, authorized
    wrong_key: str    # private key path, NOT authorized
    home: str


def _keygen(path: str, comment: str) -> None:
    """Create an ed25519 key pair at ``path`` unless it already exists."""
    if os.path.exists(path) and os.path.exists(path + ".pub"):
        return
    for p in (path, path + ".pub"):
        if os.path.exists(p):
            os.unlink(p)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    os.chmod(path, 0o600)


def _default_key_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "sshlog-harness-keys")


def make_keys(name: str, key_dir: Optional[str] = None) -> Tuple[str, str]:
    """(good, wrong) private key paths for ``name`` under ``key_dir`` (created 0700).

    The comment of the good key is ``sshlog-harness:<path>`` so that install_authorized_key
    can prune lines whose private key no longer exists (stale pytest tmp dirs).
    """
    kdir = os.path.join(key_dir or _default_key_dir(), name)
    os.makedirs(kdir, mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(kdir), 0o700)
    good = os.path.join(kdir, "id_ed25519")
    wrong = os.path.join(kdir, "wrong_ed25519")
    _keygen(good, KEY_COMMENT_TAG + good)
    _keygen(wrong, "sshlog-harness-wrong")
    return good, wrong


def _merge_authorized_keys(existing: str, pubkey_line: str) -> str:
    """Keep foreign lines and live harness lines, drop stale harness lines, add ours.

    Several test sessions may share one account (the machine is shared), so the file is
    merged rather than overwritten.
    """
    keep = []
    for line in existing.splitlines():
        fields = line.split()
        tag = fields[-1] if fields else ""
        if tag.startswith(KEY_COMMENT_TAG):
            if not os.path.exists(tag[len(KEY_COMMENT_TAG):]):
                continue  # its private key is gone: stale
        if line.strip() == pubkey_line.strip():
            continue
        keep.append(line)
    keep.append(pubkey_line.strip())
    return "\n".join(keep) + "\n"


def install_authorized_key(home_on_host: str, key: str, chown: Callable[[str], None]) -> None:
    """Add ``key``.pub to HOME/.ssh/authorized_keys (0700 dir, 0600 file, owned via ``chown``)."""
    sshdir = os.path.join(home_on_host, ".ssh")
    os.makedirs(sshdir, mode=0o700, exist_ok=True)
    ak = os.path.join(sshdir, "authorized_keys")
    with open(key + ".pub") as f:
        pub = f.read()
    existing = ""
    if os.path.exists(ak):
        with open(ak) as f:
            existing = f.read()
    tmp = ak + ".tmp%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(_merge_authorized_keys(existing, pub))
    os.chmod(tmp, 0o600)
    os.replace(tmp, ak)
    os.chmod(sshdir, 0o700)
    chown(sshdir)


def create_user(name: str, password: str, uid: Optional[int] = None,
                home_root: Optional[str] = None, key_dir: Optional[str] = None) -> TestUser:
    """Create (or reuse) a real user ``name`` with ``password`` and an authorized ed25519 key.

    ``useradd -m -s /bin/bash`` (with ``-u uid`` and ``-b home_root`` when given). An existing
    account is reused and only its password is reset, so repeated and concurrent sessions
    work. Keys live in ``key_dir`` (default: a root-only dir under $TMPDIR), never in the
    user's home, so the user cannot alter them. A second, unauthorized key is made too.
    """
    import pwd

    def lookup():
        try:
            return pwd.getpwnam(name)
        except KeyError:
            return None

    pw = lookup()
    if pw is None:
        argv = ["useradd", "-m", "-s", "/bin/bash"]
        if uid is not None:
            argv += ["-u", str(uid)]
        if home_root is not None:
            os.makedirs(home_root, exist_ok=True)
            argv += ["-b", home_root]
        # Retry: a concurrent useradd holds the passwd lock (rc 10) or wins the race (rc 9).
        for attempt in range(20):
            cp = _run(argv + [name], check=False)
            if cp.returncode == 0 or lookup() is not None:
                break
            if cp.returncode != 10:
                raise HarnessError("useradd %s failed (rc=%d): %s" % (
                    name, cp.returncode, cp.stderr.decode(errors="replace").strip()))
            time.sleep(0.2)
        pw = lookup()
        if pw is None:
            raise HarnessError("useradd %s did not create the user" % name)
    elif uid is not None and pw.pw_uid != uid:
        raise HarnessError("user %s exists with uid %d, wanted %d" % (name, pw.pw_uid, uid))
    _chpasswd(["chpasswd"], name, password)
    if not os.path.isdir(pw.pw_dir):
        os.makedirs(pw.pw_dir, mode=0o755)
        os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
    good, wrong = make_keys(name, key_dir)
    install_authorized_key(
        pw.pw_dir, good,
        lambda sshdir: _chown_tree(sshdir, pw.pw_uid, pw.pw_gid))
    return TestUser(name=name, uid=pw.pw_uid, password=password, key=good,
                    wrong_key=wrong, home=pw.pw_dir)


def _chpasswd(argv: Sequence[str], name: str, password: str) -> None:
    for attempt in range(20):
        cp = _run(argv, input=("%s:%s\n" % (name, password)).encode(), check=False)
        if cp.returncode == 0:
            return
        time.sleep(0.2)  # passwd lock held by a concurrent session
    raise HarnessError("chpasswd for %s failed: %s" % (name, cp.stderr.decode(errors="replace")))


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), uid, gid)


# ###########################################################################
# ## sshd (OpenSSH 9.2 from the host)
# ###########################################################################

def _config_lines(extra: Union[None, str, Mapping[str, object], Sequence[str]]) -> List[str]:
    """Normalise extra sshd config: text, a mapping of Key -> value, or a list of lines."""
    if extra is None:
        return []
    if isinstance(extra, str):
        return [ln for ln in extra.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if isinstance(extra, Mapping):
        return ["%s %s" % (k, v) for k, v in extra.items()]
    return [str(ln) for ln in extra]


class Sshd:
    """A private ``/usr/sbin/sshd -D`` on a free port, with its own host key, config and log.

    ``extra_config`` (text, mapping or lines) is written *before* the harness defaults:
    sshd keeps the first value it reads for a keyword, so extra settings win.
    """

    name = "openssh9"
    STARTUP_TIMEOUT = 10.0

    def __init__(self, workdir: str, port: Optional[int] = None,
                 listen: Sequence[str] = ("127.0.0.1", "::1"),
                 extra_config: Union[None, str, Mapping[str, object], Sequence[str]] = None):
        self.workdir = os.path.abspath(str(workdir))
        self._fixed_port = port
        self.port = port
        self.listen = tuple(listen)
        self.extra_config = extra_config
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self._starttime: Optional[int] = None
        self.config_path = os.path.join(self.workdir, "sshd_config")
        self.log_path = os.path.join(self.workdir, "sshd.log")
        self.host_key = os.path.join(self.workdir, "ssh_host_ed25519_key")
        self.pid_file = os.path.join(self.workdir, "sshd.pid")
        self.known_hosts = os.path.join(self.workdir, "known_hosts")
        self.stderr_path = os.path.join(self.workdir, "sshd.stderr")

    # -- paths as the client sees them (identity here; ChrootSshd prefixes its root) --
    def host_path(self, path: str) -> str:
        """Host path of ``path`` as seen by sessions of this sshd."""
        return path

    def _write_config(self) -> None:
        lines = ["# written by tests/harness.py; extra settings first (first value wins)"]
        lines += _config_lines(self.extra_config)
        lines += [
            "Port %d" % self.port,
            *("ListenAddress %s" % a for a in self.listen),
            "HostKey %s" % self.host_key,
            "PidFile %s" % self.pid_file,
            "UsePAM yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin yes",
            "LogLevel VERBOSE",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "Subsystem sftp %s" % SFTP_SERVER,
        ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _argv(self) -> List[str]:
        return [SSHD_BIN, "-f", self.config_path, "-D", "-E", self.log_path]

    def _prepare(self) -> None:
        """Host key, privsep dir and config; separate so ChrootSshd can override it."""
        if not os.path.exists(SSHD_BIN):
            raise HarnessUnavailable("%s is not installed (apt-get install openssh-server)"
                                     % SSHD_BIN)
        os.makedirs(self.workdir, exist_ok=True)
        if not os.path.exists(self.host_key):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key])
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        os.chmod(PRIVSEP_DIR, 0o755)
        self._write_config()
        _run(self._argv()[:1] + ["-t", "-f", self.config_path], timeout=10)

    def start(self) -> "Sshd":
        """Start sshd and wait (bounded) until it listens on every address.

        When the port was picked by the harness and another process grabbed it between the
        probe and sshd's bind, a new port is tried (up to 3 times).
        """
        if self.proc is not None:
            raise HarnessError("sshd already started (pid %s)" % self.pid)
        last_error = ""
        for attempt in range(3):
            if self._fixed_port is None:
                self.port = _free_port_all(self.listen)
            self._prepare()
            log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            # stderr goes to a file, not a pipe nobody drains during a long session.
            with open(self.stderr_path, "ab") as err:
                self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
            self.pid = self.proc.pid
            st = _read_stat(self.pid)
            self._starttime = st[2] if st else None
            try:
                self._wait_listening(log_offset)
                self._after_start()
                return self
            except HarnessError as e:
                last_error = str(e)
                self._kill_own()
                if "Address already in use" not in last_error or self._fixed_port is not None:
                    raise
        raise HarnessError(last_error)

    def _after_start(self) -> None:
        """Hook for subclasses (pid checks)."""

    def _listening_lines(self) -> List[str]:
        return ["Server listening on %s port %d." % (a, self.port) for a in self.listen]

    def _wait_listening(self, log_offset: int) -> None:
        want = self._listening_lines()
        deadline = time.monotonic() + self.STARTUP_TIMEOUT
        while True:
            text = self.log_text(since=log_offset)
            if all(w in text for w in want):
                return
            rc = self.proc.poll()
            if rc is not None or time.monotonic() >= deadline:
                with open(self.stderr_path, "rb") as f:
                    err = f.read()[-2000:].decode(errors="replace")
                raise HarnessError(
                    "sshd did not listen on %s port %s within %.0fs (rc=%s)\n--- log ---\n%s"
                    "--- stderr ---\n%s"
                    % (list(self.listen), self.port, self.STARTUP_TIMEOUT, rc, text[-3000:], err))
            time.sleep(0.05)

    def log_size(self) -> int:
        """Current size of the sshd log: pass it to ``log_text(since=...)`` later."""
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The sshd log (``-E``) from byte offset ``since``; '' before it exists."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def session_pids(self) -> List[int]:
        """Per-connection processes: children of the listener."""
        return pids_of(self.pid) if self.pid else []

    def _kill_own(self) -> None:
        if self.proc is None:
            return
        # Snapshot listener + its whole subtree *before* signalling (reparenting hides them).
        # The start-time check makes sure a recycled pid is never signalled.
        _kill_tree(self.pid, self._starttime)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        """Stop the listener and the session processes it forked (by pid, never by name)."""
        self._kill_own()

    def __enter__(self) -> "Sshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "<%s pid=%s port=%s listen=%s>" % (type(self).__name__, self.pid, self.port,
                                                   list(self.listen))


# ###########################################################################
# ## OpenSSH 10 (Debian 13) in a chroot
# ###########################################################################

def debian_mirror(sources: str = DEBIAN_SOURCES) -> str:
    """The host's main Debian mirror URL (deb822 ``debian.sources``), else deb.debian.org.

    The security archive is skipped: debootstrap needs the main archive.
    """
    try:
        with open(sources) as f:
            text = f.read()
    except OSError:
        return DEFAULT_MIRROR
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        suites = fields.get("suites", "").split()
        uris = fields.get("uris", "").split()
        if uris and suites and not any(s.endswith("-security") for s in suites):
            return uris[0].rstrip("/")
    return DEFAULT_MIRROR


def _mirror_reachable(mirror: str, timeout: float = 10) -> Optional[str]:
    """None if ``MIRROR/dists/trixie/InRelease`` can be fetched, else the error text."""
    url = mirror + "/dists/trixie/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read(64)
        return None
    except Exception as e:  # network errors come in many classes; all mean "unreachable"
        return "%s: %s" % (url, e)


def ensure_trixie_rootfs(cache_dir: str = CACHE_DIR, mirror: Optional[str] = None,
                         rebuild: bool = False, timeout: float = 900) -> str:
    """Path of the cached Debian 13 + openssh-server rootfs tarball; build it when absent.

    Build: ``debootstrap --variant=minbase --include=openssh-server,openssh-client trixie``
    from the host's mirror (OPENSSH10-NOTES §6), .deb cache removed, packed with
    ``tar --numeric-owner | zstd`` (setuid bits kept). A flock serialises concurrent test
    sessions; the tarball is written under a temporary name and renamed into place.
    Raises HarnessUnavailable when it cannot be built (not root, mirror unreachable).
    """
    if os.geteuid() != 0:
        raise HarnessUnavailable("building the trixie rootfs needs root")
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    tarball = os.path.join(cache_dir, TRIXIE_TARBALL)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(tarball) and not rebuild:
            return tarball
        if shutil.which("zstd") is None:
            raise HarnessUnavailable("zstd is not installed (apt-get install zstd)")
        if shutil.which("debootstrap") is None:
            _run(["apt-get", "install", "-y", "debootstrap"], timeout=300)
        mirror = mirror or debian_mirror()
        err = _mirror_reachable(mirror)
        if err:
            raise HarnessUnavailable("no cached %s and the mirror is unreachable: %s"
                                     % (tarball, err))
        build = tempfile.mkdtemp(prefix="trixie-build.", dir=cache_dir)
        try:
            root = os.path.join(build, "root")
            cp = _run(["debootstrap", "--variant=minbase",
                       "--include=openssh-server,openssh-client", "trixie", root, mirror],
                      timeout=timeout, check=False)
            if cp.returncode != 0:
                raise HarnessError("debootstrap failed (rc=%d): %s" % (
                    cp.returncode, (cp.stdout + cp.stderr).decode(errors="replace")[-3000:]))
            archives = os.path.join(root, "var/cache/apt/archives")
            for n in os.listdir(archives):
                if n.endswith(".deb"):
                    os.unlink(os.path.join(archives, n))
            if not os.path.exists(os.path.join(root, "usr/sbin/sshd")):
                raise HarnessError("debootstrap finished but usr/sbin/sshd is missing")
            tmp = tarball + ".tmp%d" % os.getpid()
            _run(["tar", "--numeric-owner", "-cpf", tmp, "-I", "zstd -3 -T0", "-C", root, "."],
                 timeout=300)
            os.replace(tmp, tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return tarball


def _mounts_under(path: str) -> List[str]:
    """Mount points at or under ``path`` in *our* mount namespace."""
    path = os.path.realpath(path).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if (mp.rstrip("/") + "/").startswith(path):
                out.append(mp)
    return out


class ChrootSshd(Sshd):
    """OpenSSH 10 (Debian 13) sshd inside a chroot, with the same interface as Sshd.

    Started as ``unshare --mount --propagation private sh -c 'mount proc, bind /dev and
    /dev/pts; exec chroot ROOT /usr/sbin/sshd -D ...'``: the mounts exist only in that
    private namespace and vanish when the last sshd process exits, and since unshare, sh
    and chroot all exec in place, the Popen pid *is* the listener (checked in start()).
    Users must be added with ``add_user`` (the chroot has its own /etc/passwd); by default
    they get the host uid so uid->name agrees on both sides (OPENSSH10-NOTES §5.2).
    """

    name = "openssh10"
    LOG_IN_ROOT = "/var/log/sshd.log"
    PID_IN_ROOT = "/run/sshd-harness.pid"

    def __init__(self, workdir: str, port: Optional[int] = None,
                 listen: Sequence[str] = ("127.0.0.1", "::1"),
                 extra_config: Union[None, str, Mapping[str, object], Sequence[str]] = None,
                 tarball: Optional[str] = None, keep_root: bool = False):
        super().__init__(workdir, port=port, listen=listen, extra_config=extra_config)
        self.tarball = tarball
        self.keep_root = keep_root
        self.root = os.path.join(self.workdir, "root")
        self.log_path = self.root + self.LOG_IN_ROOT
        self.users: Dict[str, TestUser] = {}

    def host_path(self, path: str) -> str:
        """Host path of a path inside the chroot (``/home/u/f`` -> ``ROOT/home/u/f``)."""
        return self.root + "/" + path.lstrip("/")

    def unpack(self) -> None:
        """Unpack the cached rootfs into a fresh ``workdir/root`` (idempotent)."""
        if os.path.exists(os.path.join(self.root, "usr/sbin/sshd")):
            return
        tarball = self.tarball or ensure_trixie_rootfs()
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        _run(["tar", "--numeric-owner", "-xpf", tarball, "-I", "zstd", "-C", self.root],
             timeout=300)
        os.makedirs(self.host_path(PRIVSEP_DIR), mode=0o755, exist_ok=True)

    def chroot_run(self, argv: Sequence[str], input: Optional[bytes] = None,
                   check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the chroot (no mounts needed for useradd/chown/chpasswd)."""
        return _run(["chroot", self.root] + list(argv), input=input, check=check)

    def add_user(self, user: TestUser, uid: Optional[int] = None) -> TestUser:
        """Create ``user.name`` inside the chroot with the same password and authorized key.

        ``uid`` defaults to the host uid. Returns a TestUser whose ``home`` is the path
        *inside* the chroot (use ``host_path`` to reach it from the host).
        """
        self.unpack()
        uid = user.uid if uid is None else uid
        cp = self.chroot_run(["id", "-u", user.name], check=False)
        if cp.returncode != 0:
            self.chroot_run(["useradd", "-m", "-o", "-s", "/bin/bash", "-u", str(uid), user.name])
        elif int(cp.stdout) != uid:
            raise HarnessError("chroot user %s exists with uid %s, wanted %d"
                               % (user.name, cp.stdout.strip().decode(), uid))
        _chpasswd(["chroot", self.root, "chpasswd"], user.name, user.password)
        home = self.chroot_run(["sh", "-c", 'getent passwd "$1" | cut -d: -f6', "sh",
                                user.name]).stdout.decode().strip()
        install_authorized_key(
            self.host_path(home), user.key,
            lambda sshdir: self.chroot_run(
                ["chown", "-R", "%s:%s" % (user.name, user.name), sshdir[len(self.root):]]))
        cu = TestUser(name=user.name, uid=uid, password=user.password, key=user.key,
                      wrong_key=user.wrong_key, home=home)
        self.users[user.name] = cu
        return cu

    def _prepare(self) -> None:
        if shutil.which("unshare") is None:
            raise HarnessUnavailable("unshare (util-linux) is not installed")
        os.makedirs(self.workdir, exist_ok=True)
        self.unpack()
        os.makedirs(self.host_path(PRIVSEP_DIR), mode=0o755, exist_ok=True)
        os.chmod(self.host_path(PRIVSEP_DIR), 0o755)

    def _sshd_options(self) -> List[str]:
        opts = _config_lines(self.extra_config) + [
            "ListenAddress %s" % a for a in self.listen] + [
            "PidFile %s" % self.PID_IN_ROOT,
            "UsePAM yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin yes",
            "LogLevel VERBOSE",
        ]
        out = []
        for line in opts:
            k, _, v = line.strip().partition(" ")
            out += ["-o", "%s=%s" % (k, v.strip())]
        return out

    def _argv(self) -> List[str]:
        q = shlex.quote
        sshd = ["chroot", self.root, SSHD_BIN, "-D", "-E", self.LOG_IN_ROOT,
                "-p", str(self.port)] + self._sshd_options()
        script = ("mount -t proc proc {r}/proc && mount --bind /dev {r}/dev && "
                  "mount --bind /dev/pts {r}/dev/pts && exec {cmd}").format(
            r=q(self.root), cmd=" ".join(q(a) for a in sshd))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _after_start(self) -> None:
        """Check that the recorded pid is sshd itself (unshare/sh/chroot exec'd in place)."""
        try:
            exe = os.readlink("/proc/%d/exe" % self.pid)
        except OSError as e:
            raise HarnessError("cannot read exe of chroot sshd pid %d: %s" % (self.pid, e))
        if exe != self.root + SSHD_BIN:
            raise HarnessError("pid %d is %s, not the chroot's sshd" % (self.pid, exe))

    def stop(self) -> None:
        """Stop sshd and its sessions by pid, then delete the unpacked root (unless keep_root).

        The root is removed only when no mount is left under it in our namespace; the private
        namespace's mounts are gone with its last process.
        """
        self._kill_own()
        if not self.keep_root and os.path.isdir(self.root):
            left = _mounts_under(self.root)
            if left:
                raise HarnessError("mounts left under %s, not deleting: %s" % (self.root, left))
            shutil.rmtree(self.root, ignore_errors=True)


# ###########################################################################
# ## Client helpers
# ###########################################################################

def _client_opts(sshd: Sshd, key: Optional[str], password: bool) -> List[str]:
    """Options common to ssh/scp/sftp: isolated from ~/.ssh, explicit auth methods, timeouts."""
    opts = [
        "-F", "/dev/null",
        "-o", "UserKnownHostsFile=%s" % sshd.known_hosts,
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=no",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "IdentitiesOnly=yes",
        "-o", "KbdInteractiveAuthentication=no",
    ]
    if password:
        opts += ["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
                 "-o", "PasswordAuthentication=yes",
                 "-o", "PreferredAuthentications=password",
                 "-o", "NumberOfPasswordPrompts=1"]
    else:
        opts += ["-o", "BatchMode=yes", "-o", "PubkeyAuthentication=yes",
                 "-o", "PasswordAuthentication=no",
                 "-o", "PreferredAuthentications=publickey"]
        if key:
            opts += ["-i", key]
    return opts


def _client_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)  # never let an agent offer other keys
    env.setdefault("TERM", "xterm")
    if extra:
        env.update(extra)
    return env


def _run_client(argv: List[str], timeout: float, env: Optional[Mapping[str, str]] = None,
                input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Run a client with bounded time; text output (utf-8, errors replaced)."""
    return subprocess.run(argv, input=input.decode() if input is not None else None,
                          stdin=subprocess.DEVNULL if input is None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          env=_client_env(env), encoding="utf-8", errors="replace")


def ssh_run(sshd: Sshd, user: TestUser, command: str, host: str = "127.0.0.1",
            key: Optional[str] = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Non-pty ``ssh -p PORT -i KEY user@host command`` (publickey, BatchMode)."""
    argv = ["ssh"] + _client_opts(sshd, key or user.key, password=False) + [
        "-T", "-p", str(sshd.port), "-l", user.name, host, command]
    return _run_client(argv, timeout)


def ssh_password(sshd: Sshd, user_name: str, password: str, command: str,
                 host: str = "127.0.0.1", timeout: float = 30) -> subprocess.CompletedProcess:
    """Password login through sshpass (one prompt, publickey off); returns the CompletedProcess.

    The password is passed with ``sshpass -e`` (environment) rather than ``-p`` so it does
    not show up in argv, which a host-wide exec tracer (sshlog itself) records.
    sshpass exits 5 on a wrong password; 255 is ssh's own failure.
    """
    argv = ["sshpass", "-e", "ssh"] + _client_opts(sshd, None, password=True) + [
        "-T", "-p", str(sshd.port), "-l", user_name, host, command]
    return _run_client(argv, timeout, env={"SSHPASS": password})


def ssh_bad_key(sshd: Sshd, user: TestUser, host: str = "127.0.0.1",
                timeout: float = 30) -> subprocess.CompletedProcess:
    """Publickey login with the user's *unauthorized* key; must fail (rc 255)."""
    return ssh_run(sshd, user, "true", host=host, key=user.wrong_key, timeout=timeout)


def ssh_unknown_user(sshd: Sshd, name: str, password: str, host: str = "127.0.0.1",
                     timeout: float = 30) -> subprocess.CompletedProcess:
    """Password login as a user that does not exist; must fail."""
    return ssh_password(sshd, name, password, "true", host=host, timeout=timeout)


def scp_upload(sshd: Sshd, user: TestUser, local: str, remote_path: str,
               legacy: bool = False, host: str = "127.0.0.1",
               timeout: float = 60) -> subprocess.CompletedProcess:
    """``scp`` one file up: SFTP protocol (the 9.x default) or ``-O`` legacy ``scp -t``."""
    argv = ["scp"] + (["-O"] if legacy else []) + _client_opts(sshd, user.key, False) + [
        "-P", str(sshd.port), str(local), "%s@%s:%s" % (user.name, _bracket(host), remote_path)]
    return _run_client(argv, timeout)


def sftp_put(sshd: Sshd, user: TestUser, pairs: Sequence[Tuple[str, str]],
             host: str = "127.0.0.1", timeout: float = 60) -> subprocess.CompletedProcess:
    """``sftp -b BATCH`` with one ``put LOCAL REMOTE`` line per pair (REMOTE may be relative)."""
    fd, batch = tempfile.mkstemp(prefix="sftp-batch.", dir=sshd.workdir)
    with os.fdopen(fd, "w") as f:
        for local, remote in pairs:
            f.write("put %s %s\n" % (_sftp_quote(str(local)), _sftp_quote(str(remote))))
    try:
        argv = ["sftp"] + _client_opts(sshd, user.key, False) + [
            "-P", str(sshd.port), "-b", batch, "%s@%s" % (user.name, _bracket(host))]
        return _run_client(argv, timeout)
    finally:
        os.unlink(batch)


def _sftp_quote(path: str) -> str:
    """sftp batch files accept double-quoted arguments with backslash escapes."""
    return '"%s"' % path.replace("\\", "\\\\").replace('"', '\\"')


# ###########################################################################
# ## Interactive sessions under a real pty
# ###########################################################################

_marker_counter = itertools.count(1)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_ctty() -> None:
    """preexec_fn: after Popen's setsid(), make stdin (the pty slave) our controlling tty."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtySession:
    """``ssh -tt user@host`` under a real pty, like a person at a terminal.

    A reader thread drains the master into ``output``; ``expect`` searches it from where
    the previous match ended. On start the shell prompt is made deterministic with
    ``export PS1='PROMPT''$ '`` (the quotes keep the echoed command line from matching the
    prompt pattern) and bracketed paste is switched off so output carries no mode escapes.
    """

    PROMPT = re.compile(rb"PROMPT\$ ")

    def __init__(self, sshd: Sshd, user: TestUser, host: str = "127.0.0.1",
                 rows: int = 40, cols: int = 120, key: Optional[str] = None,
                 password: Optional[str] = None, term: str = "xterm",
                 start_timeout: float = 15, setup: bool = True):
        self.sshd = sshd
        self.user = user
        self.host = host
        self.rows, self.cols = rows, cols
        self._buf = bytearray()
        self._pos = 0
        self._cond = threading.Condition()
        self._eof = False
        self.last_output: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.launched = time.time()      # its events are stamped later (SshlogDaemon.established)
        argv = ["ssh", "-tt"] + _client_opts(sshd, key or user.key, password is not None) + [
            "-p", str(sshd.port), "-l", user.name, host]
        master, slave = os.openpty()
        _set_winsize(slave, rows, cols)
        self.master = master
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         start_new_session=True, preexec_fn=_make_ctty,
                                         env=_client_env({"TERM": term}), close_fds=True)
        finally:
            os.close(slave)  # so the reader sees EIO once ssh exits
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="pty-reader-%d" % self.pid)
        self._reader.start()
        try:
            if password is not None:
                self.expect(re.compile(rb"[Pp]assword: "), timeout=start_timeout)
                self.sendline(password)
                # ssh restores the tty with TCSAFLUSH after reading a password, which would
                # discard type-ahead; once it switches the tty to raw mode (ICANON off) the
                # channel is open and input is forwarded.
                wait_for(self._raw_mode, timeout=start_timeout,
                         desc="ssh to enter raw mode after the password")
            if setup:
                self.sendline("export PS1='PROMPT''$ ' PROMPT_COMMAND=; "
                              "bind 'set enable-bracketed-paste off'")
                self.expect(self.PROMPT, timeout=start_timeout)
        except BaseException:
            self.kill()
            raise

    # -- plumbing --
    def _raw_mode(self) -> bool:
        """True once the ssh client has put the local tty into raw mode (session open)."""
        if self.proc.poll() is not None:
            raise AssertionError("ssh exited (rc=%s); output tail:\n%s"
                                 % (self.proc.returncode, self._tail()))
        return not termios.tcgetattr(self.master)[3] & termios.ICANON

    def _read_loop(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every slave fd is closed (ssh exited)
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def output(self) -> bytes:
        """Everything received from the master so far."""
        with self._cond:
            return bytes(self._buf)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def _tail(self, n: int = 600) -> str:
        return self.output[-n:].decode(errors="replace")

    def expect(self, pattern, timeout: float = 10):
        """Wait until ``pattern`` appears after the previous match.

        ``pattern`` is a literal (bytes or str) or a compiled bytes regex (``re.compile(rb...)``).

        Returns the ``re.Match``; raises AssertionError with the output tail on timeout or
        when the session ends first.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        if isinstance(pattern, bytes):
            pattern = re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(bytes(self._buf), self._pos)
                if m:
                    self._pos = m.end()
                    return m
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "session ended" if self._eof else "timeout %.1fs" % timeout
                    raise AssertionError("expect(%r): %s; output tail:\n%s"
                                         % (pattern.pattern, why,
                                            bytes(self._buf[-600:]).decode(errors="replace")))
                self._cond.wait(min(remaining, 0.5))

    def send(self, data: Union[bytes, str]) -> None:
        if isinstance(data, str):
            data = data.encode()
        while data:
            n = os.write(self.master, data)
            data = data[n:]

    def sendline(self, s: Union[bytes, str] = "") -> None:
        self.send((s.encode() if isinstance(s, str) else s) + b"\n")

    def run(self, cmd: str, timeout: float = 10) -> int:
        """Type ``cmd; echo __done_N_$?__``, wait for the marker, return the exit status.

        ``last_output`` is set to what the command printed (best effort: the text between the
        echoed command line and the marker, with CRs removed).
        """
        n = next(_marker_counter)
        start = len(self.output)
        self.sendline("%s; echo __done_%d_$?__" % (cmd, n))
        m = self.expect(re.compile(rb"__done_%d_(\d+)__" % n), timeout=timeout)
        chunk = self.output[start:m.start()]
        echo_end = re.search(rb"__done_%d_\$\?__\r*\n" % n, chunk)
        self.last_output = (chunk[echo_end.end():].replace(b"\r", b"").decode(errors="replace")
                            if echo_end else None)
        self.expect(self.PROMPT, timeout=timeout)
        return int(m.group(1))

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size on the master and SIGWINCH the ssh client (which forwards it)."""
        _set_winsize(self.master, rows, cols)
        self.rows, self.cols = rows, cols
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGWINCH)

    def tty_name(self, timeout: float = 10) -> int:
        """Run ``tty`` in the session and return N of ``/dev/pts/N``."""
        status = self.run("tty", timeout=timeout)
        m = re.search(r"/dev/pts/(\d+)", self.last_output or "")
        assert status == 0 and m, "tty failed (rc=%s): %r" % (status, self.last_output)
        return int(m.group(1))

    # -- shutdown --
    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout: float = 10) -> int:
        """Wait for ssh to exit (bounded) and return its status."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        """SIGTERM, then SIGKILL, the ssh client; close the master."""
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    self.proc.send_signal(sig)
                    self.proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._close_master()

    def _close_master(self) -> None:
        self._reader.join(timeout=5)
        if self.master is not None:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = None

    def close(self, timeout: float = 10) -> Optional[int]:
        """Type ``exit``, wait for ssh to finish, kill it if it does not. Returns its status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.master is not None:
            try:
                self.sendline("exit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        return self.proc.returncode

    def __enter__(self) -> "PtySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
