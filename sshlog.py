#!/usr/bin/python3
"""sshlog: record and watch OpenSSH sessions through eBPF, with no change to sshd.

Watches a stock OpenSSH server with tracepoint-only BPF programs (bcc) and
records who logged in from where, failed logins, every command with its argv
and exit status, uploads, and the terminal output of every session; runs
actions (event log, syslog, statsd, Slack, webhooks, e-mail, commands) chosen
by YAML configuration compatible with the original sshlog agent.

USAGE:
    sshlog daemon [--config-dir DIR] [--plugin-dir DIR] [--socket PATH] [--log-file PATH]
                  [--argv-cap BYTES] [--stdout-cap BYTES] [--enable-session-injection] [--debug]
    sshlog watch [--json] [--all]         print events as they happen
    sshlog sessions [--json]              list live sessions
    sshlog status [--json]                daemon counters (events, drops, queues)
    sshlog attach TTY [--readonly]        a live session's screen, then its output;
                                          Ctrl+Q detaches
    sshlog kill TTY                       end a live session (root)
    sshlog replay FILE [--speed X] [--idle-limit S] [--text]   play a .cast recording
    sshlog check-config [--config-dir DIR] [--plugin-dir DIR] [--explain]
    sshlog doctor                         check what the daemon needs
    sshlog report [--since 24h|7d|DATE|DATETIME|all] [--until WHEN] [--user U]
                  [--format text|json|csv|markdown] [--top N] [LOGFILE...]
    sshlog install [--prefix P]           copy to /usr/local/bin, /etc/sshlog, systemd unit
    sshlog uninstall [--prefix P] [--purge]
    sshlog version
    sshlog dump-probes                    print the BPF C text and flags

CAVEATS:
    Linux >= 5.8 (BPF ring buffer), root for `daemon`; the other commands talk
    to the daemon's socket (root or group `sshlog`).  Capture is passive: a
    root user inside a session can still hide from any in-kernel observer
    (unload programs, kill the daemon); treat the records as evidence, not as
    a tamper-proof audit trail.  internal-sftp (inside sshd) uploads are not
    seen.

Copyright the sshlog authors.  License: Apache-2.0.
"""

# Contents (sections, in dependency order; grep -n '^# .*####' lists them):
#   Imports, version, paths
#   Errors
#   Small helpers
#   Event model
#   BPF wire format (ctypes)
#   Probe loader (bcc)
#   Session tracker
#   Config schema & loading
#   Filters
#   Actions
#   Plugin loader
#   Pipeline / dispatcher
#   Daemon & socket API
#   Reports
#   CLI commands
#   main()

###############################################################################
# Imports, version, paths #####################################################
###############################################################################

import argparse
import base64
import binascii
import calendar
import codecs
import collections
import csv
import ctypes
import dataclasses
import datetime
import difflib
import errno
import fcntl
import glob
import grp
import gzip
import hashlib
import ipaddress
import json
import logging
import logging.handlers
import mmap
import operator
import os
import platform
import queue
import re
import select
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

__version__ = "0.2.0"

CONF_DIR = "/etc/sshlog"
SOCKET_PATH = "/run/sshlog/sshlog.sock"
LOG_DIR = "/var/log/sshlog"
SOCKET_GROUP = "sshlog"
PROC = "/proc"
TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
DEV_PTS = "/dev/pts"                                     # pty slaves (window size, TIOCSTI)
INSTALL_BIN = "/usr/local/bin/sshlog"                    # `install` copies the zipapp here
SYSTEMD_UNIT = "/etc/systemd/system/sshlog.service"
SYSTEMD_RUNNING = "/run/systemd/system"                  # exists when systemd is PID 1
INSTALL_MANIFEST = "/var/lib/sshlog/install.json"        # what `install` created
# Where the distro's bcc bindings live when another python3 runs us.
DISTRO_SITE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib/python3*/site-packages",
                    "/usr/lib64/python3*/site-packages")
HERE = os.path.dirname(os.path.abspath(__file__))
RECORDING_NICE = 10            # niceness of the recording threads (see SessionLog)

log = logging.getLogger("sshlog")

###############################################################################
# Errors ######################################################################
###############################################################################


class SshlogError(Exception):
    """A runtime problem explained in one sentence (exit status 1)."""

    exit_status = 1


class UsageError(SshlogError):
    """Bad command line (exit status 2)."""

    exit_status = 2


class ConfigError(SshlogError):
    """Invalid configuration; carries every problem found (exit status 2)."""

    exit_status = 2

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("%d configuration problem(s)" % len(self.problems))


###############################################################################
# Small helpers ###############################################################
###############################################################################

def read_text(path, default=None):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return default


def decode_bytes(data):
    """Bytes to text, never losing any: invalid UTF-8 is backslash-escaped."""
    return data.decode("utf-8", "backslashreplace")


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text):
    """Escape control characters so a log line or a watcher's terminal stays
    one line and cannot be driven by escape sequences from a session.
    (str.isprintable() is false for every character the pattern matches:
    the common, clean line skips the regex.)"""
    if text.isprintable():
        return text
    return _CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class Clock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) to wall-clock seconds."""

    def __init__(self):
        self.offset = time.time() - time.monotonic()

    def wall(self, ktime_ns):
        return self.offset + ktime_ns / 1e9


def rfc3339(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


_local_second = (None, "")       # (second, zone) last formatted by local_time(), and its text


def local_time(ts):
    """YYYY-mm-dd HH:MM:SS in local time.  Events come in bursts within one
    second: the last second's text is kept (in one tuple, so threads agree)."""
    global _local_second
    key, text = _local_second
    if key != (int(ts), time.tzname):
        key = (int(ts), time.tzname)
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key[0]))
        _local_second = (key, text)
    return text


def boot_id():
    return (read_text(BOOT_ID) or "").strip()


def proc_starttime(pid, proc=PROC):
    """Start time of a process in clock ticks since boot, or None."""
    text = read_text("%s/%d/stat" % (proc, pid))
    if not text:
        return None
    try:
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def proc_ppid_comm(pid, proc=PROC):
    text = read_text("%s/%d/stat" % (proc, pid))
    if not text:
        return None, None
    try:
        comm = text[text.index("(") + 1:text.rindex(")")]
        return int(text[text.rindex(")") + 2:].split()[1]), comm
    except (ValueError, IndexError):
        return None, None


def proc_uid(pid, proc=PROC):
    for line in (read_text("%s/%d/status" % (proc, pid)) or "").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def boot_time(proc=PROC):
    for line in (read_text(proc + "/stat") or "").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    return 0


def passwd_entry(uid, root="/"):
    """(name, home) of `uid` in the passwd file of the sshd's own root (a
    chroot or a container has its own users), or (uid as text, "")."""
    text = read_text(os.path.join(root, "etc/passwd")) or ""
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) > 5 and parts[2] == str(uid):
            return parts[0], parts[5]
    return str(uid), ""


def passwd_name(uid, root="/"):
    return passwd_entry(uid, root)[0]


def passwd_uid(name, root="/"):
    """uid of `name` in that root's passwd, or None."""
    for line in (read_text(os.path.join(root, "etc/passwd")) or "").splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[0] == name and parts[2].isdigit():
            return int(parts[2])
    return None


SYS_PIDFD_OPEN = 434              # the same number on every Linux architecture
SYS_PIDFD_GETFD = 438
_libc = None


def libc():
    """The C library this process runs on (errno kept for ctypes.get_errno),
    loaded once."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def lower_thread_priority(nice, who):
    """Set the calling thread's niceness (a per-thread attribute on Linux)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("%s: cannot lower its priority: %s", who, e)


def pidfd_getfd(pid, fd):
    """A duplicate, in this process, of file descriptor `fd` of process
    `pid` (pidfd_open + pidfd_getfd, Linux >= 5.6; needs ptrace rights)."""
    pidfd = libc().syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        e = ctypes.get_errno()
        raise OSError(e, "pidfd_open(%d): %s" % (pid, os.strerror(e)))
    try:
        dup = libc().syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd),
                            ctypes.c_uint(0))
        if dup < 0:
            e = ctypes.get_errno()
            raise OSError(e, "pidfd_getfd(%d, %d): %s" % (pid, fd, os.strerror(e)))
        return dup
    finally:
        os.close(pidfd)


def signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return "SIG%d" % num


def parse_audit_fields(text):
    """key=value pairs of a Linux audit message; unquoted hex values of
    acct/exe are decoded the way auditd does."""
    fields = {}
    for m in re.finditer(r'(\w+)=("([^"]*)"|\S+)', text):
        key, raw, quoted = m.group(1), m.group(2), m.group(3)
        if quoted is not None:
            fields[key] = quoted
        elif key in ("acct", "exe") and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", raw):
            fields[key] = bytes.fromhex(raw).decode("utf-8", "backslashreplace")
        else:
            fields[key] = raw
    return fields


def humanize_age(seconds):
    if seconds < 10:
        return "just now"
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return "%d %s%s ago" % (n, unit, "s" if n > 1 and unit != "min" else "")
    return "%d sec ago" % seconds


def format_table(headers, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)] if rows else \
        [len(h) for h in headers]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [headers] + list(rows))


###############################################################################
# Event model #################################################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class Event:
    """Fields every event carries (SPEC §5).  `timestamp` is epoch seconds;
    JSON shows it as RFC 3339."""

    timestamp: float
    hostname: str
    ptm_pid: int
    session_id: str
    username: str = ""
    user_id: int = -1
    tty_id: int = -1
    client_ip: str = ""
    client_port: int = 0
    server_ip: str = ""
    server_port: int = 0
    sshd_pid: int = 0             # the listening sshd (host, chroot or container)
    sshd_root: str = "/"          # that sshd's root directory as the host sees it
    start_time: float = 0.0       # when the connection began
    existing: bool = False        # the session was open before the daemon started

    type = "event"
    _defaults = {}                # field -> default, per class (set below EVENT_TYPES)

    @classmethod
    def of(cls, base, **fields):
        """The capture thread's constructor: equal to cls(**base, **fields)
        at a third of the cost, as a frozen dataclass's __init__ sets each of
        its ~20 fields through object.__setattr__ (5 us an event, two events
        a command).  `base` must hold every field without a default
        (Tracker._base does; a test compares the two constructions)."""
        obj = object.__new__(cls)
        attrs = obj.__dict__
        attrs.update(cls._defaults)
        attrs.update(base)
        attrs.update(fields)
        return obj

    def to_dict(self):
        d = {"event_type": self.type}
        for f in dataclasses.fields(self):
            d[f.name] = getattr(self, f.name)
        d["timestamp"] = rfc3339(self.timestamp)
        d["start_time"] = rfc3339(self.start_time) if self.start_time else None
        d["tcp_info"] = {"client_ip": self.client_ip, "client_port": self.client_port,
                         "server_ip": self.server_ip, "server_port": self.server_port}
        return d

    def text(self):
        """One-line text form (event log, `watch`, syslog), control
        characters escaped."""
        who = " %s" % self.username if self.username else ""
        return printable("%s (%d)%s %s" % (self.type, self.ptm_pid, who, self.detail()))

    def detail(self):
        return "from ip %s" % self.peer()

    def peer(self):
        ip = "[%s]" % self.client_ip if ":" in self.client_ip else self.client_ip
        return "%s:%d" % (ip or "?", self.client_port)


@dataclasses.dataclass(frozen=True)
class ConnectionEstablished(Event):
    rows: int = 0                 # window size at login (0: no pty or not known yet)
    cols: int = 0
    type = "connection_established"

    def detail(self):
        return "from ip %s tty %d" % (self.peer(), self.tty_id)


@dataclasses.dataclass(frozen=True)
class ConnectionAuthFailed(Event):
    auth_method: str = ""
    reason: str = ""
    type = "connection_auth_failed"


@dataclasses.dataclass(frozen=True)
class ConnectionClose(Event):
    end_time: float = 0.0
    duration_ms: int = 0
    type = "connection_close"

    def to_dict(self):
        d = super().to_dict()
        d["end_time"] = rfc3339(self.end_time)
        return d


@dataclasses.dataclass(frozen=True)
class CommandStart(Event):
    pid: int = 0
    parent_pid: int = 0
    filename: str = ""
    argv: tuple = ()
    argv_truncated: bool = False
    command_uid: int = -1
    type = "command_start"

    @property
    def args(self):
        return " ".join((self.filename,) + self.argv[1:])

    def to_dict(self):
        d = super().to_dict()
        d["argv"] = list(self.argv)
        d["args"] = self.args
        d["start_time"] = rfc3339(self.timestamp)
        d["session_start"] = rfc3339(self.start_time) if self.start_time else None
        return d

    def detail(self):
        return "executed %s" % self.args


@dataclasses.dataclass(frozen=True)
class CommandFinish(CommandStart):
    command_start: float = 0.0
    duration_ms: int = 0
    exit_code: int = -1
    signal: str = None
    stdout: str = ""
    stdout_size: int = 0
    type = "command_finish"

    def to_dict(self):
        d = super().to_dict()
        d["start_time"] = rfc3339(self.command_start)
        d["end_time"] = rfc3339(self.timestamp)
        del d["command_start"]
        return d

    def detail(self):
        how = ", killed by %s" % self.signal if self.signal else ""
        return "execute complete (exit code: %d%s) %s" % (self.exit_code, how, self.args)


@dataclasses.dataclass(frozen=True)
class FileUpload(Event):
    pid: int = 0
    target_path: str = ""
    file_mode: str = ""
    bytes: int = 0
    type = "file_upload"

    def detail(self):
        return "uploaded file %s" % self.target_path


@dataclasses.dataclass(frozen=True)
class TerminalUpdate(Event):
    terminal_data: str = ""
    data_len: int = 0
    raw: bytes = b""              # exact bytes, for recordings and attach
    offset: int = 0               # bytes of this session's stream before this chunk
    lost_bytes: int = 0           # bytes lost (BPF ring full) just before this chunk
    type = "terminal_update"

    def __post_init__(self):
        if not self.terminal_data:        # not given: `raw` decoded when read (_DecodedRaw)
            del self.__dict__["terminal_data"]

    def to_dict(self):
        d = super().to_dict()
        del d["raw"]
        return d

    def detail(self):
        lost = ", %d bytes lost before it" % self.lost_bytes if self.lost_bytes else ""
        return "terminal update (%d bytes%s)" % (self.data_len, lost)


@dataclasses.dataclass(frozen=True)
class TerminalInput(TerminalUpdate):
    """Keystrokes sshd wrote to the pty master: only when a sessionlog action
    asks for input capture, and never while the pty has ECHO off (the BPF
    side drops them)."""
    type = "terminal_input"

    def detail(self):
        return "terminal input (%d bytes)" % self.data_len


@dataclasses.dataclass(frozen=True)
class TerminalResize(Event):
    """The client's window changed size (sshd's TIOCSWINSZ on the master)."""
    rows: int = 0
    cols: int = 0
    type = "terminal_resize"

    def detail(self):
        return "window resized to %dx%d" % (self.cols, self.rows)


@dataclasses.dataclass(frozen=True)
class SessionAttach(Event):
    """Audit trail of the admin's hands on a session: `action` is attach,
    detach, input (bytes typed through attach) or kill; the admin is the
    socket peer (SO_PEERCRED).  `username` etc. describe the watched session."""
    action: str = ""
    admin_uid: int = -1
    admin_pid: int = 0
    admin_name: str = ""
    readonly: bool = True
    data_len: int = 0
    input_data: str = ""          # what was typed ("" at a password prompt: ECHO off, ICANON on)
    detail_text: str = ""         # e.g. which pids a kill signalled, or why it failed
    type = "session_attach"

    def detail(self):
        who = "%s (uid %d, pid %d)" % (self.admin_name or "?", self.admin_uid, self.admin_pid)
        extra = ": %s" % self.detail_text if self.detail_text else ""
        if self.action == "attach":
            return "attached by %s%s%s" % (who, ", read-only" if self.readonly else "", extra)
        if self.action == "input":
            return "input from %s: %d bytes%s" % (who, self.data_len, extra)
        if self.action == "kill":
            return "killed by %s%s" % (who, extra)
        return "%s by %s%s" % (self.action, who, extra)


class _DecodedRaw:
    """`terminal_data` of a terminal event built by Event.of() or given no
    text: `raw` decoded on first use.  Most configurations never read it, so
    the capture thread need not decode every byte of a flood."""

    def __get__(self, event, cls=None):
        if event is None:
            return ""
        text = event.__dict__["terminal_data"] = decode_bytes(event.raw)
        return text


TerminalUpdate.terminal_data = _DecodedRaw()     # TerminalInput inherits it
EVENT_TYPES = {cls.type: cls for cls in (
    ConnectionEstablished, ConnectionAuthFailed, ConnectionClose, CommandStart,
    CommandFinish, FileUpload, TerminalUpdate, TerminalInput, TerminalResize, SessionAttach)}
for _cls in EVENT_TYPES.values():         # what Event.of() fills in (not _DecodedRaw's field)
    _cls._defaults = {f.name: f.default for f in dataclasses.fields(_cls)
                      if f.default is not dataclasses.MISSING and f.name != "terminal_data"}
del _cls
TERMINAL_EVENTS = frozenset((TerminalUpdate, TerminalInput))
WATCH_DEFAULT_TYPES = tuple(t for t in EVENT_TYPES
                            if t not in ("terminal_update", "terminal_input", "terminal_resize"))

###############################################################################
# BPF wire format (ctypes) ####################################################
###############################################################################
# One ctypes.Structure per C struct of bpf_probes.c; tests check the sizes.

REC_CONNECT, REC_EXEC, REC_EXIT, REC_SETUID, REC_PTY, REC_WINSZ, REC_AUDIT, \
    REC_TTY_OUT, REC_TTY_IN, REC_STDOUT, REC_UPLOAD_OPEN, REC_UPLOAD_CLOSE, \
    REC_BTMP, REC_TTY_LOSS = range(1, 15)

F_LISTENER, F_SSHD, F_USER, F_CMD, F_XFER, F_MONITOR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
FD_PTMX, FD_AUDIT, FD_BTMP, FD_UPLOAD = 1, 2, 3, 4

ARGV_CAP = 8192          # bytes of argv kept per exec (power of two)
STDOUT_CAP = 4096        # bytes of a command's first output kept
FNAME_CAP = 256
LAST_ARG_CAP = 256
BIG_CAP = 16384          # data bytes per data record (longer reads: several records)
PATH_CAP = 4096
CTL_PAGES = 1024         # 4 MiB: control records
TTY_PAGES = 2048         # 8 MiB: terminal bytes
TRACK_MAX = 65536
MERGE_SPAN_NS = 10_000_000   # one terminal record's pty reads span at most this
DEV_ZERO = "/dev/zero"       # the daemon's read of it flushes the merge slots


class RecHdr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("sess", ctypes.c_uint32), ("len", ctypes.c_uint32),
                ("ts", ctypes.c_uint64)]


class RecConnect(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("listener", ctypes.c_uint32), ("family", ctypes.c_uint16),
                ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16),
                ("server_addr", ctypes.c_uint8 * 16), ("server_port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16 * 3)]


_EXEC_HEAD_FIELDS = [("h", RecHdr), ("ppid", ctypes.c_uint32), ("uid", ctypes.c_uint32),
                     ("argc", ctypes.c_uint16), ("truncated", ctypes.c_uint16),
                     ("fname_len", ctypes.c_uint32), ("fname", ctypes.c_char * FNAME_CAP)]


class RecExecHead(ctypes.Structure):
    """rec_exec up to argv: the ring holds a record only up to its h.len
    bytes of argv."""
    _fields_ = _EXEC_HEAD_FIELDS


def make_rec_exec(argv_cap=ARGV_CAP):
    class RecExec(ctypes.Structure):
        _fields_ = _EXEC_HEAD_FIELDS + [("argv", ctypes.c_char * (argv_cap + LAST_ARG_CAP))]
    return RecExec


RecExec = make_rec_exec()                  # struct rec_exec


class RecExit(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("status", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class RecU32(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("value", ctypes.c_uint32), ("fd", ctypes.c_uint32)]


class RecWinsz(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("rows", ctypes.c_uint16), ("cols", ctypes.c_uint16),
                ("fd", ctypes.c_uint32)]


class RecDataHead(ctypes.Structure):
    """Fixed part of rec_data_big; `h.len` bytes follow (in the ring, no more).
    `lost`: for terminal records, bytes of that session's stream (output or
    input) lost to a full ring since its previous record."""
    _fields_ = [("h", RecHdr), ("fd", ctypes.c_uint32), ("lost", ctypes.c_uint32)]


class RecUploadOpen(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("mode", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("path", ctypes.c_char * PATH_CAP)]


class RecUploadClose(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("fd", ctypes.c_int32), ("pad", ctypes.c_uint32),
                ("bytes", ctypes.c_uint64)]


class ProcEntry(ctypes.Structure):
    """Value of the BPF `tracked` map (struct proc)."""
    _fields_ = [("sess", ctypes.c_uint32), ("ppid", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("out_left", ctypes.c_uint32),
                ("status", ctypes.c_int32), ("pad", ctypes.c_uint32),
                ("fds_marked", ctypes.c_uint64), ("fds_ptmx", ctypes.c_uint64)]


class FdKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class FdVal(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bytes", ctypes.c_uint64)]


# Decoded records: plain tuples, built by decode_record().
Connect = collections.namedtuple("Connect", "ts pid sess listener ip port server_ip server_port",
                                 defaults=("", 0))
Exec = collections.namedtuple("Exec", "ts pid sess ppid uid filename argv truncated")
Exit = collections.namedtuple("Exit", "ts pid sess status flags")
Value = collections.namedtuple("Value", "type ts pid sess value fd")
Winsz = collections.namedtuple("Winsz", "ts pid sess rows cols fd")
Data = collections.namedtuple("Data", "type ts pid sess fd data lost", defaults=(0,))
UploadOpen = collections.namedtuple("UploadOpen", "ts pid sess fd flags mode path")
UploadClose = collections.namedtuple("UploadClose", "ts pid sess fd bytes")

_DATA_HEAD = ctypes.sizeof(RecDataHead)
_TS_OF = operator.attrgetter("ts")
_STAMP_AT = RecHdr.ts.offset                 # every record's time, from its header
_STAMP_END = _STAMP_AT + 8
_STAMP = struct.Struct("@Q")
_TYPE = struct.Struct("<I")
# The three records of every command and every pty read are decoded with struct
# (a ctypes from_buffer_copy costs ~1 us each); tests tie these to the ctypes layouts.
_DATA_HDR = struct.Struct("<IIIIQiI")      # rec_hdr + rec_data_head: type pid sess len ts fd lost
_EXEC_HDR = struct.Struct("<IIIIQIIHHI")   # rec_hdr + rec_exec up to fname: ... ppid uid argc
                                           # truncated fname_len
_EXIT_REC = struct.Struct("<IIIIQiI")      # rec_exit: rec_hdr status flags
_EXEC_HEAD = ctypes.sizeof(RecExecHead)
DATA_RECORDS = frozenset((REC_TTY_OUT, REC_TTY_IN, REC_STDOUT, REC_AUDIT, REC_BTMP))


def _ip_text(family, raw):
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == socket.AF_INET6:
        addr = ipaddress.IPv6Address(bytes(raw[:16]))
        return str(addr.ipv4_mapped or addr)
    return ""


def _need(raw, cls):
    if len(raw) < ctypes.sizeof(cls):
        raise ValueError("short %s record: %d bytes" % (cls.__name__, len(raw)))
    return cls.from_buffer_copy(raw[:ctypes.sizeof(cls)])


def decode_record(raw):
    """Decode one ring-buffer record into a namedtuple; ValueError when the
    record is short or of an unknown type."""
    if len(raw) < ctypes.sizeof(RecHdr):
        raise ValueError("short record: %d bytes" % len(raw))
    t = _TYPE.unpack_from(raw)[0]
    if t in DATA_RECORDS:
        if len(raw) < _DATA_HEAD:
            raise ValueError("short RecDataHead record: %d bytes" % len(raw))
        t, pid, sess, n, ts, fd, lost = _DATA_HDR.unpack_from(raw)
        if _DATA_HEAD + n > len(raw):
            raise ValueError("data record longer than its buffer")
        return Data(t, ts, pid, sess, fd, bytes(raw[_DATA_HEAD:_DATA_HEAD + n]), lost)
    if t == REC_EXEC:
        if len(raw) < _EXEC_HEAD:
            raise ValueError("short RecExecHead record: %d bytes" % len(raw))
        _t, pid, sess, n, ts, ppid, uid, argc, cut, _n = _EXEC_HDR.unpack_from(raw)
        # decoded whole, then split: a NUL byte is a character of its own in
        # UTF-8, so no invalid sequence escaped here spans two strings
        parts = decode_bytes(raw[_EXEC_HEAD:_EXEC_HEAD + n]).split("\0")
        # after the last NUL: nothing, or a string the cap cut (kept, flagged truncated)
        if not (cut and parts[-1]):
            del parts[-1]
        argv = tuple(parts[:argc])
        end = raw.find(b"\0", _EXEC_HDR.size, _EXEC_HEAD)
        fname = decode_bytes(raw[_EXEC_HDR.size:end if end >= 0 else _EXEC_HEAD])
        return Exec(ts, pid, sess, ppid, uid, fname, argv, bool(cut) or len(argv) < argc)
    if t == REC_EXIT:
        if len(raw) < _EXIT_REC.size:
            raise ValueError("short RecExit record: %d bytes" % len(raw))
        _t, pid, sess, _n, ts, status, flags = _EXIT_REC.unpack_from(raw)
        return Exit(ts, pid, sess, status, flags)
    h = RecHdr.from_buffer_copy(raw[:ctypes.sizeof(RecHdr)])
    if t == REC_CONNECT:
        r = _need(raw, RecConnect)
        server_ip = _ip_text(r.family, r.server_addr) if r.server_port else ""
        return Connect(h.ts, h.pid, h.sess, r.listener, _ip_text(r.family, r.addr), r.port,
                       server_ip, r.server_port)
    if t in (REC_SETUID, REC_PTY, REC_TTY_LOSS):
        r = _need(raw, RecU32)
        return Value(t, h.ts, h.pid, h.sess, r.value, r.fd)
    if t == REC_WINSZ:
        r = _need(raw, RecWinsz)
        return Winsz(h.ts, h.pid, h.sess, r.rows, r.cols, r.fd)
    if t == REC_UPLOAD_OPEN:
        r = _need(raw, RecUploadOpen)
        path = bytes(raw[RecUploadOpen.path.offset:RecUploadOpen.path.offset + PATH_CAP])
        return UploadOpen(h.ts, h.pid, h.sess, r.fd, r.flags, r.mode,
                          decode_bytes(path.split(b"\0", 1)[0]))
    if t == REC_UPLOAD_CLOSE:
        r = _need(raw, RecUploadClose)
        return UploadClose(h.ts, h.pid, h.sess, r.fd, r.bytes)
    raise ValueError("unknown record type %d" % t)


TERMINAL_RECORDS = (REC_TTY_OUT, REC_TTY_IN)
COALESCE_LIMIT = 256 * 1024      # bytes of terminal data merged into one record


def merge_terminal(buf, spans, breaks=None, limit=COALESCE_LIMIT):
    """Decode the terminal ring's records (`spans`: start and length of each
    in `buf`), merging each session's consecutive reads of one direction:
    a flood then costs one record per drain instead of one per pty read
    (~21,000 of them).  A new group starts at the other direction, at a
    record that reports lost bytes (so the loss marker stays where the loss
    was), past `limit` bytes, and where a control record of the session
    falls between two reads (`breaks`: sess -> times of its control records
    in this batch), so a command's start stays between the output before
    and after it.  Returns the records in ring order, each group with the
    time of its first read, and a ValueError for each undecodable record."""
    out, errors, groups = [], [], {}     # sess -> [type, chunks, size, last ts, index in out]
    unpack, head = _DATA_HDR.unpack_from, _DATA_HEAD

    def close(group):
        if len(group[1]) > 1:
            out[group[4]] = out[group[4]]._replace(data=b"".join(group[1]))

    for start, length in spans:
        if length >= head:
            t, pid, sess, n, ts, fd, lost = unpack(buf, start)
        if length < head or t not in TERMINAL_RECORDS or head + n > length:
            try:
                rec = decode_record(bytes(buf[start:start + length]))
            except ValueError as e:
                errors.append(e)
                continue
            if rec.sess in groups:
                close(groups.pop(rec.sess))
            out.append(rec)
            continue
        data = buf[start + head:start + head + n]
        group = groups.get(sess)
        if group is not None:
            if group[0] == t and not lost and group[2] + n <= limit and not (
                    breaks and sess in breaks and any(group[3] < b <= ts for b in breaks[sess])):
                group[1].append(data)
                group[2] += n
                group[3] = ts
                continue
            close(group)
        groups[sess] = [t, [data], n, ts, len(out)]
        out.append(Data(t, ts, pid, sess, fd, data, lost))
    for group in groups.values():
        close(group)
    return out, errors


###############################################################################
# Probe loader (bcc) ##########################################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """What this kernel offers, decided once before compiling."""

    cflags: tuple
    exit_code_offset: int = None
    group_dead: bool = False


def btf_member_offset(struct_name, member, path=BTF_VMLINUX):
    """Byte offset of `struct_name.member` from the kernel's BTF, or None.
    A small reader of the BTF format (kernel Documentation/bpf/btf.rst)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
    except struct.error:
        return None
    if magic != 0xEB9F:
        return None
    types = hdr_len + type_off
    strings = hdr_len + str_off
    want_struct, want_member = struct_name.encode(), member.encode()

    def name_at(off):
        end = data.index(b"\0", strings + off)
        return data[strings + off:end]

    # extra bytes after the 12-byte btf_type, by kind: fixed, or per member
    fixed = {1: 4, 3: 12, 14: 4, 17: 4}
    per_item = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind == 4 and name_off and name_at(name_off) == want_struct:
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                if name_at(m_name) == want_member:
                    bits = m_off & 0xFFFFFF if kflag else m_off
                    return bits // 8
            return None
        pos += fixed.get(kind, 0) + per_item.get(kind, 0) * vlen
    return None


def probe_plan(tracefs=TRACEFS, btf=BTF_VMLINUX, argv_cap=ARGV_CAP,
               stdout_cap=STDOUT_CAP, capture_input=False):
    """Check what the kernel offers and build the -D flags (integers only)."""
    if not os.path.isdir(os.path.join(tracefs, "events", "syscalls")):
        raise SshlogError("tracefs is not mounted at %s: run `mount -t tracefs tracefs %s`"
                          % (tracefs, tracefs))
    exit_fmt = read_text(os.path.join(tracefs, "events/sched/sched_process_exit/format"), "")
    group_dead = "group_dead" in exit_fmt
    offset = btf_member_offset("task_struct", "exit_code", btf)
    if argv_cap & (argv_cap - 1) or not 256 <= argv_cap <= 65536:
        raise ConfigError(["argv_cap must be a power of two between 256 and 65536"])
    flags = ["-DCTL_PAGES=%d" % CTL_PAGES, "-DTTY_PAGES=%d" % TTY_PAGES,
             "-DARGV_CAP=%d" % argv_cap, "-DSTDOUT_CAP=%d" % int(stdout_cap),
             "-DCAPTURE_INPUT=%d" % int(bool(capture_input)), "-DTRACK_MAX=%d" % TRACK_MAX,
             "-DMERGE_SPAN_NS=%d" % MERGE_SPAN_NS]
    if group_dead:
        flags.append("-DHAVE_GROUP_DEAD=1")
    if offset is not None:
        flags.append("-DOFF_EXIT_CODE=%d" % offset)
    return ProbePlan(tuple(flags), offset, group_dead)


def probe_source():
    """The C text, read from beside this file or from inside the zipapp."""
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        try:   # the loader knows its archive by the path it was given (may be relative)
            return loader.get_data(os.path.join(os.path.dirname(__file__),
                                                "bpf_probes.c")).decode()
        except OSError:
            pass
    with open(os.path.join(HERE, "bpf_probes.c")) as f:
        return f.read()


def release_free_heap():
    """Give the C heap's free pages back (glibc's malloc_trim): compiling the
    programs leaves ~29 MB that LLVM freed in the daemon's resident set."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to do
        pass


def import_bcc():
    """bcc is a distro package seen only by the distro's python3; when another
    interpreter runs us (pyenv, a venv), look in the distro's site dirs."""
    try:
        import bcc
        return bcc
    except ImportError:
        pass
    for pattern in DISTRO_SITE_DIRS:
        for d in sorted(glob.glob(pattern)):
            if os.path.isdir(os.path.join(d, "bcc")) and d not in sys.path:
                sys.path.append(d)
                try:
                    import bcc
                    return bcc
                except ImportError:
                    sys.path.remove(d)
    raise SshlogError("bcc's Python bindings are missing: install python3-bpfcc "
                      "(Debian/Ubuntu) or python3-bcc (RHEL/Fedora)")


def kernel_headers_present():
    release = os.uname().release
    return os.path.isdir("/lib/modules/%s/build/include" % release) or \
        os.path.isdir("/lib/modules/%s/source/include" % release)


class RingReader:
    """One BPF ring buffer read in place through mmap, as libbpf does: a page
    holding the consumer position (ours to write), a page holding the
    producer position, then the data pages mapped twice, so a record that
    wraps around the end reads as one slice.  Each record starts with an
    8-byte header: its length, with a BUSY bit while the producer writes it
    and a DISCARD bit for one it gave up.  bcc's reader calls a ctypes
    callback per record (~3 us; a flood is ~21,000 records); this reads a
    drain tick's records in one loop."""

    BUSY, DISCARD = 1 << 31, 1 << 30
    # Native formats ("@"): struct reads and writes them with one memcpy, a
    # single load or store on x86.  Standard ones ("<Q", "=Q") go byte by
    # byte, and a consumer position half written at a carry reads 16 MiB
    # short to the producer, which then finds the ring full.
    _LEN = struct.Struct("@I")
    _POS = struct.Struct("@Q")

    def __init__(self, fd, size, page=mmap.PAGESIZE):
        if size & (size - 1):
            raise ValueError("ring size %d is not a power of two" % size)
        self.size, self.mask = size, size - 1
        self.released = 0                 # bytes the last release() gave back
        self.page = page
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.data = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=page)       # the producer's page, then the records

    def spans(self, until=None):
        """Where the records committed so far are: (start, length) of each
        in `self.data`, and the position after them, for release().  Stops
        at the first record still being written, and at the first stamped at
        or after `until` (Probes.HOLD_NS): it stays in the ring."""
        pos = self._POS.unpack_from(self.consumer, 0)[0]
        end = self._POS.unpack_from(self.data, 0)[0]
        data, page, mask, unpack = self.data, self.page, self.mask, self._LEN.unpack_from
        busy, flags = self.BUSY, self.BUSY | self.DISCARD
        stamp, stamp_at = _STAMP.unpack_from, 8 + _STAMP_AT
        found = []
        while pos < end:
            at = page + (pos & mask)
            length = unpack(data, at)[0]
            if length & flags:
                if length & busy:
                    break                 # still being written: the next drain gets it
                pos += ((length & ~flags) + 15) & ~7      # discarded: skipped
                continue
            if until is not None and length >= _STAMP_END and \
                    stamp(data, at + stamp_at)[0] >= until:
                break
            found.append((at + 8, length))
            pos += (length + 15) & ~7     # 8-byte header, record padded to 8
        return found, pos

    def release(self, pos):
        """Give the space of the records before `pos` back to the producer."""
        self.released = pos - self._POS.unpack_from(self.consumer, 0)[0]
        self._POS.pack_into(self.consumer, 0, pos)

    def read(self, out):
        """Append a copy of each record committed so far to `out`, and free them."""
        found, pos = self.spans()
        data = self.data
        out.extend(data[start:start + length] for start, length in found)
        self.release(pos)

    def close(self):
        self.consumer.close()
        self.data.close()


# The rings are read through mmap where loads are not reordered (x86's TSO
# makes libbpf's acquire loads plain loads, and Python has no barriers);
# elsewhere through bcc's per-record callback.
RING_MMAP = platform.machine() == "x86_64"


class Probes:
    """The loaded BPF programs and their two ring buffers.  The rings are
    drained on a short timer, not polled (the kernel signals only the first
    record after each drain, and nobody waits on the signal), so a busy
    session costs us one batch per tick instead of one wake-up per record."""

    # A record is stamped before its ring takes it, and one that a ring first
    # refused reaches the other ring a little later: a drain may read records
    # stamped after one still on its way.  The newest HOLD_NS of each drain
    # wait for the next, so records leave in time order across drains too:
    # decoded control records in `held`, terminal records in their ring (a
    # session's reads are merged, and must not be merged across a read that
    # is still on its way through the control ring).
    HOLD_NS = 5_000_000

    def __init__(self, plan, debug=False, ring_mmap=None):
        bcc = import_bcc()
        if not kernel_headers_present():
            raise SshlogError("kernel headers not found under /lib/modules/%s: install "
                              "linux-headers-amd64 and link it there (`sshlog doctor`)"
                              % os.uname().release)
        self.raw = ([], [])               # bcc's reader: records of ctl, of tty
        self.held = []                    # decoded, kept for the next drain (HOLD_NS)
        self.callback_errors = 0
        self.fill = 0.0                   # the largest share of a ring the last drain freed
        self.decode_errors = 0
        # our read() of this fd has the kernel send the terminal output it
        # holds in its merge slots (bpf_probes.c, merge_flush_all)
        self.flush_fd = os.open(DEV_ZERO, os.O_RDONLY | os.O_CLOEXEC)
        flush = ("-DFLUSH_TGID=%d" % os.getpid(), "-DFLUSH_FD=%d" % self.flush_fd)
        try:
            self.bpf = bcc.BPF(text=probe_source(), cflags=list(plan.cflags + flush))
        except Exception as e:            # bcc raises bare Exception
            os.close(self.flush_fd)
            if debug:
                log.exception("BPF load failed")
            raise SshlogError("loading the BPF programs failed (%s); run `sshlog doctor`"
                              % str(e).splitlines()[-1][:200])
        self.readers = None
        if RING_MMAP if ring_mmap is None else ring_mmap:
            self.readers = tuple(RingReader(self.bpf[name].map_fd, pages * mmap.PAGESIZE)
                                 for name, pages in (("ctl", CTL_PAGES), ("tty", TTY_PAGES)))
        else:
            for ring, raw in zip(("ctl", "tty"), self.raw):
                self.bpf[ring].open_ring_buffer(self._collector(raw))
        release_free_heap()

    def _collector(self, raw):
        def on_record(_ctx, data, size):
            try:
                raw.append(ctypes.string_at(data, size))
            except Exception:             # a ctypes callback must never raise
                self.callback_errors += 1
            return 0
        return on_record

    def drain(self, final=False):
        """The records submitted so far, decoded, in time order, each
        session's consecutive terminal reads merged (merge_terminal).  A
        ring holds records in the order they were committed, which on
        several CPUs is not quite the order of their times, and the terminal
        ring is read after the control ring (a session's last output would
        follow its close): a stable sort on the time puts all in order.
        Records younger than HOLD_NS wait for the next drain, unless `final`."""
        cutoff = time.monotonic_ns() - self.HOLD_NS    # bpf_ktime_get_ns's clock
        os.read(self.flush_fd, 1)         # the merge slots into the terminal ring
        ctl, tty = self.raw
        if self.readers:
            ctl_reader, tty_reader = self.readers
            ctl_reader.read(ctl)
            spans, end = tty_reader.spans(None if final else cutoff)
            buf = tty_reader.data
        else:
            self.bpf.ring_buffer_consume()
            ready = len(tty)              # those before the first young one
            if not final:
                ready = next((i for i, raw in enumerate(tty) if len(raw) >= _STAMP_END and
                              _STAMP.unpack_from(raw, _STAMP_AT)[0] >= cutoff), ready)
            buf, spans, at = b"".join(tty[:ready]), [], 0
            for raw in tty[:ready]:
                spans.append((at, len(raw)))
                at += len(raw)
            del tty[:ready]
            # each record had an 8-byte header in its ring
            self.fill = max((sum(map(len, ctl)) + 8 * len(ctl)) / (CTL_PAGES * mmap.PAGESIZE),
                            (at + 8 * len(spans)) / (TTY_PAGES * mmap.PAGESIZE))
        records, errors = [], []
        for raw in ctl:
            try:
                records.append(decode_record(raw))
            except ValueError as e:
                errors.append(e)
        ctl.clear()
        records += self.held
        if spans:                         # the terminal ring's young records stay in it
            breaks = {}                   # sess -> times of its control (and held) records
            for rec in records:
                breaks.setdefault(rec.sess, []).append(rec.ts)
            merged, bad = merge_terminal(buf, spans, breaks)
            errors += bad
            records += merged
        if len(records) > 1:
            records.sort(key=_TS_OF)
        young = len(records)
        if not final:
            while young and records[young - 1].ts >= cutoff:
                young -= 1
        self.held = records[young:]
        del records[young:]
        if self.readers:
            tty_reader.release(end)
            self.fill = max(ctl_reader.released / ctl_reader.size,
                            tty_reader.released / tty_reader.size)
        for e in errors:
            self.decode_errors += 1
            if self.decode_errors in (1, 100) or self.decode_errors % 10000 == 0:
                log.error("undecodable record (%d so far): %s", self.decode_errors, e)
        return records

    def drops(self):
        return self._per_ring("drops")

    def rerouted(self):
        """Records each ring refused that the other one took (bpf_probes.c,
        ring_output): none lost, counted to show the kernel refusing."""
        return self._per_ring("rerouted")

    def merge_counts(self):
        """Pty reads merged into larger records in the kernel, and waits for a
        merge slot given up (that read or record went out on its own, perhaps
        ahead of the slot's bytes; nothing lost)."""
        d = self.bpf["merge_counts"]
        return {"merged": int(d[ctypes.c_int(0)].value),
                "waits_given_up": int(d[ctypes.c_int(1)].value)}

    def _per_ring(self, table):
        d = self.bpf[table]
        return {"ctl": int(d[ctypes.c_int(0)].value), "tty": int(d[ctypes.c_int(1)].value)}

    def track(self, pid, sess, ppid, flags, ptmx_fds=()):
        """Track a process found in /proc, with the pty masters it holds.  The
        fd masks keep the bits BPF has set meanwhile (their fds are in the map)."""
        key, marked, ptmx = ctypes.c_uint32(pid), 0, 0
        for fd in ptmx_fds:
            self.bpf["fds"][FdKey(pid, fd)] = FdVal(FD_PTMX, 0, 0)
            if fd < 64:
                marked |= 1 << fd
                ptmx |= 1 << fd
        old = self.bpf["tracked"].get(key)
        if old is not None:
            marked |= old.fds_marked
            ptmx |= old.fds_ptmx
        self.bpf["tracked"][key] = ProcEntry(sess, ppid, flags, 0, -1, 0, marked, ptmx)

    def close(self):
        for reader in self.readers or ():
            reader.close()
        self.bpf.cleanup()
        os.close(self.flush_fd)


###############################################################################
# Session tracker #############################################################
###############################################################################

@dataclasses.dataclass
class Command:
    start: float
    pid: int
    ppid: int
    filename: str
    argv: tuple
    truncated: bool
    uid: int
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stdout_size: int = 0


@dataclasses.dataclass
class Session:
    ptm_pid: int
    session_id: str
    start: float
    listener: int = 0
    root: str = "/"               # the sshd's root directory (chroots, containers)
    client_ip: str = ""
    client_port: int = 0
    server_ip: str = ""
    server_port: int = 0
    uid: int = -1
    username: str = ""
    tty: int = -1
    rows: int = 0
    cols: int = 0
    established: bool = False
    existing: bool = False
    last_activity: float = 0.0
    last_command: str = ""
    auth_acct: str = ""           # account named by PAM/btmp before a failure
    auth_method: str = ""
    invalid_pending: bool = False # sshd named an unknown user; no attempt reported yet
    tty_bytes: int = 0            # terminal output captured
    tty_in_bytes: int = 0         # keystrokes captured (input capture on)
    tty_lost: int = 0             # terminal bytes lost in BPF (ring full)
    tty_pid: int = 0              # the sshd reading the pty master, and its fd
    tty_fd: int = -1
    commands: dict = dataclasses.field(default_factory=dict)
    uploads: dict = dataclasses.field(default_factory=dict)

    def summary(self):
        return {"ptm_pid": self.ptm_pid, "session_id": self.session_id,
                "username": self.username, "user_id": self.uid, "tty_id": self.tty,
                "client_ip": self.client_ip, "client_port": self.client_port,
                "server_ip": self.server_ip, "server_port": self.server_port,
                "sshd_pid": self.listener, "sshd_root": self.root,
                "start_time": rfc3339(self.start),
                "last_activity_time": rfc3339(self.last_activity or self.start),
                "last_command": self.last_command, "rows": self.rows, "cols": self.cols,
                "terminal_bytes": self.tty_bytes}


def _socket_fds(pid, proc=PROC):
    """{socket inode: fd number} of the sockets `pid` holds."""
    found = {}
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in names:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            found[target[8:-1]] = int(fd)
    return found


def tcp_sockets(pid, state, proc=PROC):
    """(local, remote) address pairs of the TCP sockets in `state` ("01"
    established, "0A" listening) that `pid` holds, as its own network
    namespace sees them.  On the real /proc each socket is asked itself,
    through a duplicate (pidfd_getfd): a read of /proc/PID/net/tcp walks every
    bucket of the host's connection table, ~10 ms here, twice per login.  The
    files are the fallback (and what a test's /proc tree holds)."""
    sockets = _socket_fds(pid, proc)
    if sockets and proc == PROC:
        try:
            return _ask_sockets(pid, sockets, listening=state == "0A")
        except OSError:
            pass
    found = []
    for name in ("tcp", "tcp6") if sockets else ():
        for line in (read_text("%s/%d/net/%s" % (proc, pid, name)) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] in sockets and parts[3] == state:
                found.append((_proc_net_addr(parts[1]), _proc_net_addr(parts[2])))
    return found


def _sockaddr(addr):
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip), addr[1]


def _ask_sockets(pid, sockets, listening):
    """tcp_sockets() by getsockname/getpeername on duplicates of `pid`'s
    sockets ({inode: fd}); OSError when `pid` cannot be reached that way
    (gone, no pidfd_getfd)."""
    found = []
    for inode, fd in sorted(sockets.items(), key=lambda item: item[1]):
        try:
            dup = pidfd_getfd(pid, fd)
        except OSError as e:
            if e.errno == errno.EBADF:    # closed meanwhile
                continue
            raise
        try:
            if str(os.fstat(dup).st_ino) != inode:
                raise OSError(errno.ESTALE, "fd reused")   # sshd moved its fds meanwhile
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if sock.type != socket.SOCK_STREAM or \
                    sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                    bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) != listening:
                continue
            local = _sockaddr(sock.getsockname())
            remote = ("", 0) if listening else _sockaddr(sock.getpeername())
        except (OSError, ValueError):     # not connected (any more)
            continue
        finally:
            sock.close()
        found.append((local, remote))
    return found


def _proc_net_addr(text):
    hexip, hexport = text.split(":")
    raw = bytes.fromhex(hexip)
    # /proc/net/tcp prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return _ip_text(fam, raw), int(hexport, 16)


def socket_addresses(pid, proc=PROC):
    return tcp_sockets(pid, "01", proc)


def listening_ports(pid, proc=PROC):
    return sorted({local[1] for local, _remote in tcp_sockets(pid, "0A", proc)})


class Tracker:
    """Turns decoded BPF records into events and keeps the live sessions.
    Runs on the daemon's single capture thread; `sessions()` may be called
    from API threads and returns copies under the lock."""

    def __init__(self, hostname=None, proc=PROC, clock=None, stdout_cap=STDOUT_CAP):
        self.hostname = hostname or socket.gethostname()
        self.proc = proc
        self.clock = clock or Clock()
        self.stdout_cap = stdout_cap
        self.boot_id = boot_id()
        self.boot_time = boot_time(proc)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.lock = threading.Lock()
        self.live = {}                    # ptm_pid -> Session
        self.tty_lost_bytes = 0           # terminal bytes BPF could not deliver
        self.roots = {}                   # listener pid -> root dir

    # -- identity helpers --

    def session_id(self, ptm_pid, fallback_ts):
        start = proc_starttime(ptm_pid, self.proc)
        basis = "%s:%d:%s" % (self.boot_id, ptm_pid,
                              start if start is not None else "t%d" % fallback_ts)
        return hashlib.sha1(basis.encode()).hexdigest()[:16]

    def root_of(self, pid):
        try:
            return os.readlink("%s/%d/root" % (self.proc, pid))
        except OSError:
            return "/"

    def _base(self, s, ts):
        return dict(timestamp=ts, hostname=self.hostname, ptm_pid=s.ptm_pid,
                    session_id=s.session_id, username=s.username, user_id=s.uid,
                    tty_id=s.tty, client_ip=s.client_ip, client_port=s.client_port,
                    server_ip=s.server_ip, server_port=s.server_port, sshd_pid=s.listener,
                    sshd_root=s.root,
                    start_time=s.start, existing=s.existing)

    def sessions(self):
        with self.lock:
            return [s.summary() for s in self.live.values() if s.established]

    def session_by_tty(self, tty):
        with self.lock:
            for s in self.live.values():
                if s.established and s.tty == tty:
                    return s
        return None

    # -- records to events --

    def handle(self, rec):
        """Events (a list) caused by one decoded record."""
        kind = type(rec)
        if kind is Data:
            return self._data(rec)
        if kind is Exec:
            return self._exec(rec)
        if kind is Exit:
            return self._exit(rec)
        if kind is Connect:
            return self._connect(rec)
        s = self.live.get(rec.sess)
        if s is None:
            return []
        if kind is Value:
            if rec.type == REC_PTY and s.tty < 0:
                s.tty = rec.value
            elif rec.type == REC_TTY_LOSS:
                return self._tty_loss(s, rec)
            return []
        if kind is Winsz:
            changed = (rec.rows, rec.cols) != (s.rows, s.cols)
            s.rows, s.cols = rec.rows, rec.cols
            if changed and s.established and rec.rows and rec.cols:
                return [TerminalResize.of(self._base(s, self.clock.wall(rec.ts)),
                                          rows=rec.rows, cols=rec.cols)]
            return []
        if kind is UploadOpen:
            if not rec.path.startswith("/dev/"):
                s.uploads[(rec.pid, rec.fd)] = (self._absolute(rec.pid, rec.path, s), rec.mode)
            return []
        if kind is UploadClose:
            found = s.uploads.pop((rec.pid, rec.fd), None)
            if found is None:
                return []
            path, mode = found
            return [FileUpload.of(self._base(s, self.clock.wall(rec.ts)), pid=rec.pid,
                                  target_path=path, file_mode="%03o" % (mode & 0o777),
                                  bytes=rec.bytes)]
        return []

    def _absolute(self, pid, path, s):
        if path.startswith("/"):
            return path
        try:
            cwd = os.readlink("%s/%d/cwd" % (self.proc, pid))
        except OSError:
            # gone already: scp -t and sftp-server start in the user's home
            cwd = passwd_entry(s.uid, s.root)[1] or "/"
        if s.root != "/" and cwd.startswith(s.root):
            cwd = cwd[len(s.root):] or "/"
        return os.path.normpath(os.path.join(cwd, path))

    def _connect(self, rec):
        ts = self.clock.wall(rec.ts)
        root = self.roots.get(rec.listener)
        if root is None:
            root = self.roots[rec.listener] = self.root_of(rec.listener)
        s = Session(ptm_pid=rec.pid, session_id=self.session_id(rec.pid, rec.ts), start=ts,
                    listener=rec.listener, root=root, client_ip=rec.ip, client_port=rec.port,
                    server_ip=rec.server_ip, server_port=rec.server_port)
        if not s.server_port:
            self._find_server_address(s)
        with self.lock:
            self.live[rec.pid] = s
        return []

    def _find_server_address(self, s):
        """Our end of the connection, from the monitor's socket, when the
        connection record lacks it.  Looked up at the connection and again at
        login: OpenSSH >= 9.8 re-execs the monitor, and during that exec its
        fds cannot be read."""
        for local, remote in socket_addresses(s.ptm_pid, self.proc):
            if remote == (s.client_ip, s.client_port):
                s.server_ip, s.server_port = local

    def _establish(self, s, uid, ts):
        if not s.server_port:
            self._find_server_address(s)
        s.uid = uid
        # the name PAM saw wins when it maps to this uid (several names may share one)
        acct_ok = s.auth_acct and passwd_uid(s.auth_acct, s.root) == uid
        s.username = s.auth_acct if acct_ok else passwd_name(uid, s.root)
        s.established = True
        s.last_activity = ts
        return ConnectionEstablished.of(self._base(s, ts), rows=s.rows, cols=s.cols)

    def _exec(self, rec):
        s = self.live.get(rec.sess)
        if s is None:
            return []
        ts = self.clock.wall(rec.ts)
        events = []
        if not s.established:
            events.append(self._establish(s, rec.uid, ts))
        cmd = Command(ts, rec.pid, rec.ppid, rec.filename, rec.argv or (rec.filename,),
                      rec.truncated, rec.uid)
        s.commands[rec.pid] = cmd
        s.last_activity = ts
        ev = CommandStart.of(self._base(s, ts), pid=rec.pid, parent_pid=rec.ppid,
                             filename=cmd.filename, argv=cmd.argv,
                             argv_truncated=cmd.truncated, command_uid=rec.uid)
        s.last_command = ev.args
        events.append(ev)
        return events

    def _exit(self, rec):
        s = self.live.get(rec.sess)
        if s is None:
            return []
        ts = self.clock.wall(rec.ts)
        events = []
        cmd = s.commands.pop(rec.pid, None)
        if cmd is not None:
            status = rec.status
            sig = status & 0x7F if status >= 0 else 0
            code = 128 + sig if sig else (status >> 8) & 0xFF if status >= 0 else -1
            events.append(CommandFinish.of(
                self._base(s, ts), pid=cmd.pid, parent_pid=cmd.ppid, filename=cmd.filename,
                argv=cmd.argv, argv_truncated=cmd.truncated, command_uid=cmd.uid,
                command_start=cmd.start, duration_ms=int((ts - cmd.start) * 1000), exit_code=code,
                signal=signal_name(sig) if sig else None,
                stdout=decode_bytes(cmd.stdout),
                stdout_size=cmd.stdout_size))
            s.last_activity = ts
        if rec.pid == s.ptm_pid:
            if s.invalid_pending and not s.established:
                events.append(self._auth_failed(s, ts, s.auth_acct, True))
            events.append(ConnectionClose.of(self._base(s, ts), end_time=ts,
                                             duration_ms=int((ts - s.start) * 1000)))
            with self.lock:
                self.live.pop(s.ptm_pid, None)
        return events

    def _data(self, rec):
        s = self.live.get(rec.sess)
        if s is None:
            return []
        if rec.type == REC_TTY_OUT:
            ts = self.clock.wall(rec.ts)
            s.last_activity = ts
            s.tty_pid, s.tty_fd = rec.pid, rec.fd
            offset = s.tty_bytes
            s.tty_bytes += len(rec.data)
            if rec.lost:
                s.tty_lost += rec.lost
                self.tty_lost_bytes += rec.lost
            return [TerminalUpdate.of(self._base(s, ts), data_len=len(rec.data), raw=rec.data,
                                      offset=offset, lost_bytes=rec.lost)]
        if rec.type == REC_TTY_IN:
            ts = self.clock.wall(rec.ts)
            offset = s.tty_in_bytes
            s.tty_in_bytes += len(rec.data)
            if rec.lost:
                s.tty_lost += rec.lost
                self.tty_lost_bytes += rec.lost
            return [TerminalInput.of(self._base(s, ts), data_len=len(rec.data), raw=rec.data,
                                     offset=offset, lost_bytes=rec.lost)]
        if rec.type == REC_STDOUT:
            cmd = s.commands.get(rec.pid)
            if cmd is not None:
                room = self.stdout_cap - len(cmd.stdout)
                cmd.stdout += rec.data[:max(room, 0)]
                cmd.stdout_size += len(rec.data)
            return []
        if rec.type == REC_AUDIT:
            return self._audit(s, rec)
        if rec.type == REC_BTMP and len(rec.data) >= 76:
            user = rec.data[44:76].split(b"\0", 1)[0]
            if user:
                s.auth_acct = decode_bytes(user)
        return []

    def _tty_loss(self, s, rec):
        """Terminal bytes lost after the last record of a stream, reported
        as the connection ends: an empty update that carries the count."""
        s.tty_lost += rec.value
        self.tty_lost_bytes += rec.value
        cls, offset = (TerminalInput, s.tty_in_bytes) if rec.fd == 1 else \
            (TerminalUpdate, s.tty_bytes)
        return [cls.of(self._base(s, self.clock.wall(rec.ts)), offset=offset,
                       lost_bytes=rec.value)]

    def _audit(self, s, rec):
        """sshd's NETLINK_AUDIT messages: the one channel that reports every
        failed method (public key included) and every success."""
        if len(rec.data) < 16:
            return []
        msg_type = struct.unpack_from("<H", rec.data, 4)[0]
        f = parse_audit_fields(decode_bytes(rec.data[16:].split(b"\0", 1)[0]))
        ts = self.clock.wall(rec.ts)
        op, res = f.get("op", ""), f.get("res", "")
        if op.startswith("PAM:"):         # 1100-1106: PAM names the account
            acct = f.get("acct", "")
            if acct and acct != "?":
                s.auth_acct = acct
            if msg_type == 1100 and res == "failed":        # AUDIT_USER_AUTH
                s.auth_method = "password"
            return []
        if msg_type != 1112 or op != "login":                  # AUDIT_USER_LOGIN
            return []
        if res == "success":
            if s.established:
                return []
            uid = f.get("id", "")
            if not uid.isdigit():
                return []
            return [self._establish(s, int(uid), ts)]
        acct = f.get("acct", "")
        invalid = acct == "(invalid user)"
        if invalid and not s.auth_method:
            # sshd audits an unknown name as soon as it is looked up, before
            # any credential: report it once, at a failure or at the close
            s.invalid_pending = True
            return []
        return [self._auth_failed(s, ts, s.auth_acct if (invalid or acct in ("", "?")) else acct,
                                  invalid)]

    def _auth_failed(self, s, ts, name, invalid):
        method = s.auth_method or "publickey"
        s.auth_method, s.invalid_pending = "", False
        base = self._base(s, ts)
        base["username"] = name
        base["user_id"] = -1
        return ConnectionAuthFailed.of(base, auth_method=method, reason="invalid user"
                                       if invalid else "authentication failed")

    # -- sessions open before we started --

    def discover(self, probes=None, now=None):
        """Find sshd sessions already open from /proc, seed the BPF tables so
        they are followed from now on, and return their established events."""
        now = now or time.time()
        procs = {}
        for name in os.listdir(self.proc):
            if name.isdigit():
                ppid, comm = proc_ppid_comm(int(name), self.proc)
                if comm is not None:
                    procs[int(name)] = (ppid, comm)
        children = collections.defaultdict(list)
        for pid, (ppid, _comm) in procs.items():
            children[ppid].append(pid)
        is_sshd = {pid: comm.startswith("sshd") for pid, (_p, comm) in procs.items()}
        events = []
        for pid, (ppid, comm) in sorted(procs.items()):
            if not is_sshd[pid] or is_sshd.get(ppid, False):
                continue
            if not listening_ports(pid, self.proc):
                continue
            listener = pid
            self.roots[listener] = self.root_of(listener)
            if probes:
                probes.track(listener, 0, ppid, F_LISTENER | F_SSHD)
            for ptm in children.get(listener, []):
                ev = self._discover_session(ptm, listener, procs, children, is_sshd, probes, now)
                if ev:
                    events.append(ev)
        return events

    def _discover_session(self, ptm, listener, procs, children, is_sshd, probes, now):
        start_ticks = proc_starttime(ptm, self.proc) or 0
        start = self.boot_time + start_ticks / self.ticks
        s = Session(ptm_pid=ptm, session_id=self.session_id(ptm, 0), start=start,
                    listener=listener, root=self.roots[listener], existing=True)
        for local, remote in socket_addresses(ptm, self.proc):
            (s.server_ip, s.server_port), (s.client_ip, s.client_port) = local, remote
            break
        user_uid = None
        stack = [(ptm, F_SSHD | F_MONITOR, 0)]
        while stack:
            pid, flags, ppid = stack.pop()
            sshd = is_sshd.get(pid, False)
            uid = proc_uid(pid, self.proc)
            if pid != ptm:
                if not sshd:
                    flags = F_USER | F_CMD
                    if user_uid is None:
                        user_uid = uid
                    cmdline = (read_text("%s/%d/cmdline" % (self.proc, pid)) or "").split("\0")
                    argv = tuple(a for a in cmdline[:-1]) or (procs[pid][1],)
                    s.commands[pid] = Command(now, pid, ppid, argv[0], argv, False, uid)
                elif uid not in (None, 0) and passwd_name(uid, s.root) != "sshd":
                    flags = F_SSHD | F_USER
                    user_uid = uid
            ptmx_fds = self._discover_ptys(pid, s) if sshd else ()
            if sshd:
                # sshd titles itself "sshd: NAME@pts/N" / "sshd-session: NAME [priv]"
                title = (read_text("%s/%d/cmdline" % (self.proc, pid)) or "").split("\0")[0]
                m = re.match(r"sshd[\w-]*: ([^\s@\[]+)(?:@| \[priv\])", title)
                if m:
                    s.auth_acct = m.group(1)
            if probes:
                probes.track(pid, ptm, ppid, flags, ptmx_fds)
            for child in children.get(pid, []):
                stack.append((child, flags & (F_SSHD | F_USER), pid))
        with self.lock:
            self.live[ptm] = s
        if user_uid is None:
            return None
        return self._establish(s, user_uid, now)

    def _discover_ptys(self, pid, s):
        """The pty masters sshd `pid` holds (fds); the first one's index is the
        session's tty."""
        fd_dir, found = "%s/%d/fdinfo" % (self.proc, pid), []
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return found
        for fd in fds:
            m = re.search(r"^tty-index:\s*(\d+)", read_text(os.path.join(fd_dir, fd), ""), re.M)
            if m:
                if s.tty < 0:
                    s.tty = int(m.group(1))
                found.append(int(fd))
        return found


###############################################################################
# Config schema & loading #####################################################
###############################################################################

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of an action (or the argument of a filter)."""

    name: str
    kind: str                     # str int float number bool strlist str_or_list regex any
    default: object = REQUIRED
    help: str = ""


_KIND_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "number": "a number",
               "bool": "true or false", "strlist": "a list of strings",
               "str_or_list": "a string or a list of strings", "regex": "a regular expression",
               "any": "a value"}


def coerce(kind, value):
    """Check a YAML value against `kind`; returns it normalised or raises
    ValueError naming what was expected."""
    bad = ValueError("expected %s, got %r" % (_KIND_WORDS.get(kind, kind), value))
    if kind == "any":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if kind == "str":
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return value
        raise bad
    if kind in ("float", "number"):
        if isinstance(value, (int, float)):
            return value
        raise bad
    if kind in ("strlist", "str_or_list"):
        if isinstance(value, (str, int, float)) and kind == "str_or_list":
            return str(value)
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and
                                           not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        raise bad
    if kind == "regex":
        if not isinstance(value, str):
            raise bad
        try:
            return re.compile(value)
        except re.error as e:
            raise ValueError("invalid regular expression %r: %s" % (value, e))
    raise ValueError("unknown parameter kind %r" % kind)


def did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return " (did you mean %r?)" % close[0] if close else ""


@dataclasses.dataclass
class Rule:
    """One `events:` entry: triggers, filters (all must match), actions."""

    name: str
    triggers: frozenset
    filters: list
    actions: list
    source: str


@dataclasses.dataclass
class Config:
    rules: list
    actions: dict                 # name -> (plugin, params dict, source file)
    files: list
    warnings: list


def embedded_config_files(subdir="conf.d"):
    """(name, bytes) of the configuration shipped inside the zipapp (or
    beside sshlog.py when run from a checkout)."""
    if os.path.isfile(HERE):          # HERE is the zipapp itself
        import zipfile
        with zipfile.ZipFile(HERE) as z:
            return sorted((os.path.basename(n), z.read(n)) for n in z.namelist()
                          if n.startswith(subdir + "/") and n.endswith((".yaml", ".yml")))
    folder = os.path.join(HERE, subdir)
    return [(n, open(os.path.join(folder, n), "rb").read())
            for n in sorted(os.listdir(folder)) if n.endswith((".yaml", ".yml"))]


def config_files(conf_dir):
    """(path, bytes) of sshlog.yaml and conf.d/*.y*ml, in load order."""
    files = []
    main_file = os.path.join(conf_dir, "sshlog.yaml")
    if os.path.isfile(main_file):
        files.append(main_file)
    d = os.path.join(conf_dir, "conf.d")
    if os.path.isdir(d):
        files += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith((".yaml", ".yml"))]
    out = []
    for path in files:
        with open(path, "rb") as f:
            out.append((path, f.read()))
    return out


def load_config(conf_dir=None, default_dir=CONF_DIR):
    """Load and validate a configuration.  `conf_dir` None means the default
    directory if it exists, else the embedded conf.d.  Raises ConfigError
    with every problem of every file."""
    if conf_dir is not None and not os.path.isdir(conf_dir):
        raise UsageError("configuration directory %s does not exist" % conf_dir)
    directory = conf_dir or (default_dir if os.path.isdir(default_dir) else None)
    sources = config_files(directory) if directory else \
        [("<embedded>/conf.d/" + n, data) for n, data in embedded_config_files()]
    return parse_config(sources)


def parse_config(sources):
    import yaml                     # vendored in the zipapp; imported only here
    problems, warnings = [], []
    documents = []
    for path, data in sources:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append("%s: not UTF-8 text (byte %d)" % (path, e.start))
            continue
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = " line %d" % (mark.line + 1) if mark else ""
            problems.append("%s:%s YAML syntax error: %s" % (
                path, where, getattr(e, "problem", None) or str(e).splitlines()[0]))
            continue
        if doc is None:
            warnings.append("%s: file has no content" % path)
            continue
        if not isinstance(doc, dict):
            problems.append("%s: top level must be a mapping with `events` and `actions`" % path)
            continue
        for key in doc:
            if key not in ("events", "actions"):
                problems.append("%s: %s: unknown top-level key%s" % (
                    path, key, did_you_mean(key, ("events", "actions"))))
        documents.append((path, doc))

    actions = {}                  # name -> (plugin, params, path)
    action_where = {}

    def define_action(path, keypath, entry):
        name = entry.get("action")
        plugin = entry.get("plugin")
        if not isinstance(name, str) or not name:
            problems.append("%s: %s.action: missing action name" % (path, keypath))
            return None
        if not isinstance(plugin, str):
            problems.append("%s: %s.plugin: expected a plugin name, got %r" % (
                path, keypath, plugin))
            return None
        if plugin not in ACTIONS:
            problems.append("%s: %s.plugin: unknown plugin %r%s" % (
                path, keypath, plugin, did_you_mean(plugin, ACTIONS)))
            return None
        params = {k: v for k, v in entry.items() if k not in ("action", "plugin")}
        errs = validate_params(ACTIONS[plugin].PARAMS, params)
        if not errs:                # rules across parameters, once each one is right
            try:
                errs = list(ACTIONS[plugin].check(dict(params)))
            except Exception as e:  # a plugin's check() must not take the daemon down
                errs = ["plugin: %s.check() raised %s: %s" % (plugin, type(e).__name__, e)]
        problems.extend("%s: %s.%s" % (path, keypath, e) for e in errs)
        if name in actions:
            problems.append("%s: %s.action: duplicate action name %r (also defined in %s)"
                            % (path, keypath, name, action_where[name]))
            return None
        actions[name] = (plugin, params, path)
        action_where[name] = "%s %s" % (path, keypath)
        return name

    for path, doc in documents:
        top = doc.get("actions") or []
        if not isinstance(top, list):
            problems.append("%s: actions: must be a list" % path)
            continue
        for i, entry in enumerate(top):
            if not isinstance(entry, dict):
                problems.append("%s: actions[%d]: must be a mapping" % (path, i))
                continue
            define_action(path, "actions[%d]" % i, entry)

    rules, rule_where, references = [], {}, []
    for path, doc in documents:
        events = doc.get("events") or []
        if not isinstance(events, list):
            problems.append("%s: events: must be a list" % path)
            continue
        for i, entry in enumerate(events):
            kp = "events[%d]" % i
            if not isinstance(entry, dict):
                problems.append("%s: %s: must be a mapping" % (path, kp))
                continue
            for key in entry:
                if key not in ("event", "triggers", "filters", "actions"):
                    problems.append("%s: %s.%s: unknown key%s" % (
                        path, kp, key, did_you_mean(key, ("event", "triggers", "filters",
                                                          "actions"))))
            name = entry.get("event")
            if not isinstance(name, str) or not name:
                problems.append("%s: %s.event: missing event name" % (path, kp))
                name = kp
            elif name in rule_where:
                problems.append("%s: %s.event: duplicate event name %r (also in %s)"
                                % (path, kp, name, rule_where[name]))
            rule_where.setdefault(name, "%s %s" % (path, kp))
            triggers = entry.get("triggers")
            if isinstance(triggers, str):
                triggers = [triggers]
            if not triggers or not isinstance(triggers, list):
                problems.append("%s: %s.triggers: an event needs a list of triggers" % (path, kp))
                triggers = []
            for j, t in enumerate(triggers):
                if not isinstance(t, str):
                    problems.append("%s: %s.triggers[%d]: expected a trigger name, got %r"
                                    % (path, kp, j, t))
                elif t not in EVENT_TYPES:
                    problems.append("%s: %s.triggers[%d]: unknown trigger %r%s" % (
                        path, kp, j, t, did_you_mean(t, EVENT_TYPES)))
            triggers = frozenset(t for t in triggers if isinstance(t, str) and t in EVENT_TYPES)
            filters = []
            raw_filters = entry.get("filters") or {}
            if not isinstance(raw_filters, dict):
                problems.append("%s: %s.filters: must be a mapping of filter: value" % (path, kp))
                raw_filters = {}
            for fname, arg in raw_filters.items():
                fkp = "%s.filters.%s" % (kp, fname)
                try:
                    flt = make_filter(fname, arg)
                except ValueError as e:
                    problems.append("%s: %s: %s" % (path, fkp, e))
                    continue
                except Exception as e:  # a plugin's filter rejecting its value its own way
                    problems.append("%s: %s: %s: %s" % (path, fkp, type(e).__name__, e))
                    continue
                if triggers and not (flt.triggers & triggers):
                    problems.append("%s: %s: filter applies to %s, none of this event's triggers"
                                    % (path, fkp, ", ".join(sorted(flt.triggers))))
                filters.append(flt)
            names = []
            acts = entry.get("actions")
            if not isinstance(acts, list) or not acts:
                problems.append("%s: %s.actions: an event needs a list of actions" % (path, kp))
                acts = []
            for j, a in enumerate(acts):
                akp = "%s.actions[%d]" % (kp, j)
                if not isinstance(a, dict):
                    problems.append("%s: %s: must be a mapping" % (path, akp))
                elif "plugin" in a:
                    n = define_action(path, akp, a)
                    if n:
                        names.append(n)
                elif isinstance(a.get("action"), str):
                    references.append((path, akp, a["action"]))
                    names.append(a["action"])
                else:
                    problems.append("%s: %s.action: missing action name" % (path, akp))
            rules.append(Rule(name, triggers, filters, names, path))
    for path, kp, name in references:
        if name not in actions:
            problems.append("%s: %s.action: undefined action %r%s" % (
                path, kp, name, did_you_mean(name, actions)))
    if problems:
        raise ConfigError(problems)
    return Config(rules, actions, [p for p, _ in sources], warnings)


def validate_params(schema, params):
    """Problems with `params` (dict, changed in place to normalised values)
    against a tuple of Param; each problem reads `key: what is wrong`."""
    problems = []
    known = {p.name: p for p in schema}
    for key in list(params):
        if key not in known:
            problems.append("%s: unknown parameter%s" % (key, did_you_mean(key, known)))
    for p in schema:
        if p.name not in params or params[p.name] is None:
            if p.default is REQUIRED:
                problems.append("%s: missing required parameter" % p.name)
            else:
                params[p.name] = p.default
            continue
        try:
            params[p.name] = coerce(p.kind, params[p.name])
        except ValueError as e:
            problems.append("%s: %s" % (p.name, e))
    return problems


###############################################################################
# Filters #####################################################################
###############################################################################
# A filter decides whether an event goes on to the rule's actions.  Filters
# fail closed: an exception or a non-bool result counts as "no match".

FILTERS = {}
CONNECTION_TYPES = frozenset(("connection_established", "connection_auth_failed",
                              "connection_close"))
COMMAND_TYPES = frozenset(("command_start", "command_finish"))
SESSION_TYPES = frozenset(EVENT_TYPES)


def register_filter(name, triggers, kind, help=""):
    def wrap(cls):
        cls.name, cls.triggers, cls.kind, cls.help = name, frozenset(triggers), kind, help
        FILTERS[name] = cls
        return cls
    return wrap


class Filter:
    name = kind = help = ""
    triggers = frozenset()

    def __init__(self, arg):
        self.arg = arg

    def match(self, event):
        raise NotImplementedError


class Not(Filter):
    """`not_<filter>`: the opposite of any filter (still failing closed)."""

    def __init__(self, inner):
        super().__init__(inner.arg)
        self.inner = inner
        self.name, self.triggers = "not_" + inner.name, inner.triggers

    def match(self, event):
        result = self.inner.match(event)
        if not isinstance(result, bool):
            raise TypeError("filter %s returned %r" % (self.inner.name, result))
        return not result


def make_filter(name, arg):
    """Build a filter from its YAML key and value (ValueError when wrong)."""
    if name not in FILTERS and isinstance(name, str) and name.startswith("not_") \
            and name[4:] in FILTERS:
        return Not(make_filter(name[4:], arg))
    if name not in FILTERS:
        raise ValueError("unknown filter%s" % did_you_mean(name, FILTERS))
    cls = FILTERS[name]
    return cls(coerce(cls.kind, arg))


def _members(arg):
    return set(arg) if isinstance(arg, list) else {arg}


@register_filter("command_name", COMMAND_TYPES, "str_or_list",
                 "argv[0]'s basename or the full path executed equals (one of) the value(s)")
class CommandName(Filter):
    def match(self, event):
        names = _members(self.arg)
        return bool({event.filename, os.path.basename(event.filename),
                     event.argv[0] if event.argv else ""} & names)


@register_filter("command_name_regex", COMMAND_TYPES, "regex",
                 "regular expression searched in the path executed")
class CommandNameRegex(Filter):
    def match(self, event):
        return self.arg.search(event.filename) is not None


_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "=": lambda a, b: a == b, "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b}


def parse_exit_code_expr(arg):
    """`3`, `[0, 1]`, `'> 1'` (exit code greater than 1) -> predicate."""
    if isinstance(arg, bool):
        raise ValueError("expected a number, a list of numbers or '<op> N'")
    if isinstance(arg, int):
        return lambda code: code == arg
    if isinstance(arg, list):
        try:
            codes = {int(v) for v in arg}
        except (TypeError, ValueError):
            raise ValueError("a list of exit codes must hold integers, got %r" % (arg,))
        return lambda code: code in codes
    m = re.fullmatch(r"\s*(<=|>=|==|!=|<|>|=)?\s*(-?\d+)\s*", str(arg))
    if not m:
        raise ValueError("invalid exit-code expression %r (use e.g. '> 1', '!= 0', 2, [1, 2])"
                         % (arg,))
    op, num = _OPS[m.group(1) or "="], int(m.group(2))
    return lambda code: op(code, num)


@register_filter("command_exit_code", ("command_finish",), "any",
                 "exit code: a number, a list, or '<op> N' with op in < <= > >= = !=")
class CommandExitCode(Filter):
    def __init__(self, arg):
        super().__init__(arg)
        self.test = parse_exit_code_expr(arg)

    def match(self, event):
        return self.test(event.exit_code)


@register_filter("command_output_contains", ("command_finish",), "str",
                 "text found in the command's first output bytes")
class CommandOutputContains(Filter):
    def match(self, event):
        return self.arg in event.stdout


@register_filter("command_output_contains_regex", ("command_finish",), "regex",
                 "regular expression searched in the command's first output bytes")
class CommandOutputContainsRegex(Filter):
    def match(self, event):
        return self.arg.search(event.stdout) is not None


@register_filter("username", SESSION_TYPES, "str_or_list",
                 "user name equals (one of) the value(s); '*' matches any")
class Username(Filter):
    def match(self, event):
        names = _members(self.arg)
        return "*" in names or event.username in names


@register_filter("username_regex", SESSION_TYPES, "regex",
                 "regular expression searched in the user name")
class UsernameRegex(Filter):
    def match(self, event):
        return self.arg.search(event.username) is not None


@register_filter("require_tty", SESSION_TYPES, "bool",
                 "true: only sessions with a terminal; false: no condition")
class RequireTty(Filter):
    def match(self, event):
        return event.tty_id >= 0 if self.arg else True


@register_filter("ignore_existing_logins", SESSION_TYPES, "bool",
                 "true: drop sessions that were open before the daemon started")
class IgnoreExistingLogins(Filter):
    def match(self, event):
        return not event.existing if self.arg else True


@register_filter("upload_file_path", ("file_upload",), "str_or_list",
                 "uploaded file's absolute path equals (one of) the value(s)")
class UploadFilePath(Filter):
    def match(self, event):
        return os.path.normpath(event.target_path) in {os.path.normpath(p)
                                                        for p in _members(self.arg)}


@register_filter("upload_file_path_regex", ("file_upload",), "regex",
                 "regular expression searched in the uploaded file's path")
class UploadFilePathRegex(Filter):
    def match(self, event):
        return self.arg.search(event.target_path) is not None


@register_filter("client_ip", SESSION_TYPES, "str_or_list",
                 "client address in (one of) the address(es) or CIDR network(s)")
class ClientIp(Filter):
    def __init__(self, arg):
        super().__init__(arg)
        try:
            self.networks = [ipaddress.ip_network(a, strict=False) for a in _members(arg)]
        except ValueError as e:
            raise ValueError("invalid address or network: %s" % e)

    def match(self, event):
        addr = ipaddress.ip_address(event.client_ip)
        return any(addr in n for n in self.networks)


###############################################################################
# Actions #####################################################################
###############################################################################
# An action does something with the events its rules pass on.  Each runs
# behind its own bounded queue and worker thread (ActionRunner), so a slow or
# dead sink never delays capture or another action; what is dropped is counted.

ACTIONS = {}


def register_action(name, help=""):
    def wrap(cls):
        cls.plugin, cls.help = name, help
        ACTIONS[name] = cls
        return cls
    return wrap


class DeliveryError(Exception):
    """One delivery attempt failed.  `retry`: whether trying again may help;
    `delay`: seconds the receiver asked us to wait (Retry-After); `logged`:
    the action has already said what happened."""

    def __init__(self, message, retry=True, delay=None, logged=False):
        super().__init__(message)
        self.retry, self.delay, self.logged = retry, delay, logged


MAX_RETRY_DELAY = 60.0            # cap on backoff and on a receiver's Retry-After


class Action:
    """Base of every action.  A subclass declares PARAMS (Param tuple), may
    add `check(params)` for rules across parameters, and implements
    handle(event), which runs in the action's own worker thread."""

    PARAMS = ()
    plugin = help = ""
    nice = 0                      # niceness of the worker thread (os.setpriority)

    def __init__(self, name, params):
        self.name = name
        self.params = params
        self.abandon = threading.Event()  # set by the runner when it gives up at shutdown
        self.retried = 0

    @classmethod
    def check(cls, params):
        """Problems (`key: what is wrong`) the types alone do not catch;
        `params` already hold their normalised values and defaults."""
        return []

    def handle(self, event):
        raise NotImplementedError

    def deliver(self, attempt, retries, backoff=0.5):
        """Call attempt() until it succeeds: after a retryable DeliveryError
        or OSError wait (0.5 s, 1 s, 2 s ..., or the receiver's Retry-After,
        at most MAX_RETRY_DELAY) and try again, `retries` times at most."""
        for n in range(retries + 1):
            try:
                return attempt()
            except (DeliveryError, OSError) as e:
                if not getattr(e, "retry", True) or n == retries or self.abandon.is_set():
                    raise
                delay = getattr(e, "delay", None)
                delay = min(backoff * 2 ** n if delay is None else delay, MAX_RETRY_DELAY)
                self.retried += 1
                if self.abandon.wait(delay):
                    raise

    def close(self):
        pass


class ActionRunner:
    """One action's bounded queue and worker thread.  The capture thread
    hands over each drain tick's matching events at once and wakes the worker
    at most once per tick: a thread wake-up per event cost more than most
    actions' work.  The queue is bounded in events and in terminal bytes (a
    flood comes in events of up to COALESCE_LIMIT bytes).  `dropped`: events
    that found the queue full (or were abandoned at shutdown); `failed`:
    events whose delivery failed for good (after the action's retries)."""

    QUEUE_SIZE = 10000
    QUEUE_BYTES = 64 << 20        # terminal bytes queued; past it terminal events are dropped
    LOG_EVERY = 10.0              # seconds between two failure reports of one action

    def __init__(self, action):
        self.action = action
        self.handle_many = getattr(action, "handle_many", None)
        self.limit = self.QUEUE_SIZE
        self.byte_limit = self.QUEUE_BYTES
        self.pending = collections.deque()
        # terminal bytes queued = queued_bytes - taken_bytes: each counter has one writer thread
        self.queued_bytes = self.taken_bytes = 0
        self.wake = threading.Event()
        self.closing = False
        self.delivered = self.dropped = self.failed = 0
        self.abandon = getattr(action, "abandon", None) or threading.Event()
        action.abandon = self.abandon
        self._logged_at, self._logged_failures = None, 0
        self.thread = threading.Thread(target=self._work, name="action-" + action.name,
                                       daemon=True)
        self.thread.start()

    def submit(self, event):
        self.submit_many((event,))

    def submit_many(self, events):
        room = self.limit - len(self.pending)
        if room < len(events):
            self.dropped += len(events) - max(room, 0)
            events = events[:max(room, 0)]
        if any(type(e) in TERMINAL_EVENTS for e in events):
            events = self._within_bytes(events)
        self.pending.extend(events)
        if not self.wake.is_set():
            self.wake.set()

    def _within_bytes(self, events):
        """Terminal events past the byte bound are dropped (a recording marks
        the gap: its stream offsets jump); the others are small and keep the
        session's story whole."""
        room = self.byte_limit - (self.queued_bytes - self.taken_bytes)
        kept = []
        for e in events:
            if type(e) in TERMINAL_EVENTS:
                if len(e.raw) > room:
                    self.dropped += 1
                    continue
                room -= len(e.raw)
                self.queued_bytes += len(e.raw)
            kept.append(e)
        return kept

    def _work(self):
        if self.action.nice:
            lower_thread_priority(self.action.nice, "action %s" % self.action.name)
        pending = self.pending
        while True:
            self.wake.clear()
            batch = [pending.popleft() for _ in range(len(pending))]
            if self.queued_bytes != self.taken_bytes:     # terminal bytes were queued
                self.taken_bytes += sum(len(e.raw) for e in batch if type(e) in TERMINAL_EVENTS)
            if not batch:
                if self.closing or self.abandon.is_set():
                    break
                self.wake.wait(0.5)
                continue
            if self.abandon.is_set():
                self.dropped += len(batch)
                continue
            self._deliver(batch)

    def _deliver(self, batch):
        """The action's handle_many() when it has one (one write for a batch),
        else handle() event by event."""
        many = self.handle_many
        if many is not None:
            try:
                many(batch)
                self.delivered += len(batch)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as e:
                self.failed += len(batch)
                self._report(e)
            return
        for i, event in enumerate(batch):
            if self.abandon.is_set():
                self.dropped += len(batch) - i
                return
            try:
                self.action.handle(event)
                self.delivered += 1
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as e:
                self.failed += 1
                self._report(e)

    def _report(self, error):
        """Log a failure, at most once every LOG_EVERY seconds per action."""
        if getattr(error, "logged", False):
            return
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.LOG_EVERY:
            return
        more = self.failed - self._logged_failures - 1
        self._logged_at, self._logged_failures = now, self.failed
        logging.getLogger("sshlog.action").error(
            "action %s (%s): event lost: %s%s", self.action.name, self.action.plugin,
            error or type(error).__name__,
            " (and %d more since the last report)" % more if more > 0 else "")

    def begin_stop(self):
        """No more events: the worker delivers what is queued, then ends."""
        self.closing = True
        self.wake.set()

    def finish_stop(self, deadline):
        """Wait for the worker until `deadline` (time.monotonic()); then make
        it give up (what is left is counted as dropped) and close the action."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self.abandon.set()
            self.thread.join(1.0)
        self.action.close()

    def stop(self, timeout=5.0):
        """Deliver what is queued (bounded by `timeout`), then close."""
        self.begin_stop()
        self.finish_stop(time.monotonic() + timeout)

    def stats(self):
        stats = {"plugin": self.action.plugin, "queued": len(self.pending),
                 "delivered": self.delivered, "dropped": self.dropped, "failed": self.failed,
                 "retried": getattr(self.action, "retried", 0)}
        if hasattr(self.action, "backlog_bytes"):    # recordings convert after a burst
            stats["unconverted_bytes"] = self.action.backlog_bytes
        return stats


_C1_CONTROLS = re.compile("[\x7f-\x9f\u2028\u2029]")


def json_text(obj):
    """JSON as UTF-8-friendly text that is safe on a terminal: json escapes
    C0 controls itself; DEL, the C1 controls (U+009B is a CSI to many
    terminals) and the Unicode line separators are escaped here too."""
    text = json.dumps(obj, ensure_ascii=False)
    return _C1_CONTROLS.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def event_line(event, as_json):
    """The event log's line for an event: text with a local-time prefix, or
    one JSON object alone (JSON Lines)."""
    if as_json:
        return json_text(event.to_dict())
    return "%s %s" % (local_time(event.timestamp), event.text())


@register_action("eventlogfile_action", "append each event to a size-rotated log file")
class EventLogFile(Action):
    """The event log: one line per event, appended with one write(2) on an
    O_APPEND file, so a line is never split by a crash or interleaved, and
    nothing sits in a buffer.  (logging's RotatingFileHandler cost ~40 us per
    event -- two stat() per record to decide on rollover, a lock, a flush --
    and printed its write errors on stderr instead of raising them.)
    Rotation as the original's: past max_size_mb the file becomes .1, .1
    becomes .2, ... up to number_of_log_files (0: never rotate).
    At run time the file is checked before each event: removed or replaced
    (its directory deleted, a rotation by another tool) it is reopened, the
    directory recreated; when that or a write fails (read-only or full file
    system) the event is counted as failed by the runner, which reports once
    per interval, and the next event tries again."""

    PARAMS = (Param("log_file_path", "str", help="file to write"),
              Param("max_size_mb", "number", 20, "rotate when the file reaches this size"),
              Param("number_of_log_files", "int", 2, "rotated files kept"),
              Param("output_json", "bool", False, "one JSON object per line instead of text"))

    def __init__(self, name, params):
        super().__init__(name, params)
        self.path = params["log_file_path"]
        self.as_json = params["output_json"]
        self.max_bytes = int(params["max_size_mb"] * 1024 * 1024)
        self.backups = params["number_of_log_files"]
        self.fd = None
        self.size = 0
        self.failing = False
        self._open()                      # at start-up a log that cannot open is fatal

    def _open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a line cut short (a crash, a full disk) must not swallow the next one
                self._write(fd, b"\n")
                size += 1
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.size = fd, size

    @staticmethod
    def _write(fd, data):
        while data:
            n = os.write(fd, data)
            data = data[n:]

    def _close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def _in_place(self):
        try:
            st, fst = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def _rotate(self):
        self._close()
        for i in range(self.backups - 1, 0, -1):
            src = "%s.%d" % (self.path, i)
            if os.path.lexists(src):
                os.replace(src, "%s.%d" % (self.path, i + 1))
        os.replace(self.path, self.path + ".1")
        self._open()

    def handle(self, event):
        self.handle_many((event,))

    def handle_many(self, events):
        """A batch of lines in one write(2) -- split only where a rotation falls."""
        lines = [(event_line(ev, self.as_json) + "\n").encode("utf-8", "backslashreplace")
                 for ev in events]
        if self.fd is not None and not self._in_place():
            logging.getLogger("sshlog.action").warning(
                "event log %s was removed or replaced: reopening it", self.path)
            self._close()
        try:
            if self.fd is None:
                self._open()
            start = 0
            if self.max_bytes > 0 and self.backups > 0:
                size = self.size
                for i, line in enumerate(lines):
                    if size and size + len(line) > self.max_bytes:
                        self._write_lines(lines[start:i])
                        self._rotate()
                        start, size = i, self.size
                    size += len(line)
            self._write_lines(lines[start:])
        except OSError:
            self.failing = True
            self._close()                 # reopened, and a partial line ended, next time
            raise
        if self.failing:
            self.failing = False
            logging.getLogger("sshlog.action").warning("event log %s: writing again", self.path)

    def _write_lines(self, lines):
        data = b"".join(lines)
        self._write(self.fd, data)
        self.size += len(data)

    def close(self):
        self._close()


# -- session recordings: sessionlog_action --
#
# Per session two files side by side, written by one worker (the action's)
# under an exclusive flock, mode 0600 in a 0700 directory:
#   NAME.log   the original agent's plain text: header, output with escape
#              sequences removed and control keys readable, [[ sshlog ... ]]
#              marker lines (time, loss, size cap), close footer;
#   NAME.cast  asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/):
#              header (window size, timestamp, env TERM/SHELL, title, the
#              session in "sshlog"), "o" output, "r" window changes, "m"
#              markers (each command's start, losses, size cap, close), and
#              "i" keystrokes when capture_input is on (never while the pty
#              has ECHO off: the BPF side drops those).
# Output is decoded incrementally, so a character split across two reads
# stays whole; bytes that are not UTF-8 are backslash-escaped, never dropped.

# (each starts with a lookahead, so the engine skips to the next ESC instead of trying
# every branch at every character)
_ESC_SEQ = re.compile(
    # complete sequences: CSI, 8-bit CSI, OSC to BEL/ST (titles), DCS/PM/APC/SOS to ST,
    # two-byte and charset escapes (any final but those that open the kinds above)
    r"(?=[\x1b\x9b])(?:\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[P^_X][^\x1b]*\x1b\\|\x1b[ -/]*[0-OQ-WYZ\\`-~])")
_ESC_CUT = re.compile(
    # the start of one, cut at the end of the chunk
    r"(?=[\x1b\x9b])(?:\x1b\[[0-?]*[ -/]*|\x9b[0-?]*[ -/]*|\x1b\][^\x07\x1b]*\x1b?"
    r"|\x1b[P^_X][^\x1b]*\x1b?|\x1b[ -/]*)\Z")
_CONTROL_KEYS = {c: "[Ctrl+%s]" % chr(c + 64) for c in
                 list(range(0x01, 0x07)) + [0x0B, 0x0C] + list(range(0x0E, 0x1B))}
_CONTROL_KEYS.update({0x1C: "[Ctrl+\\]", 0x1D: "[Ctrl+]]", 0x1E: "[Ctrl+^]", 0x1F: "[Ctrl+/]",
                      0x08: "[\u2190]", 0x7F: "[<--]"})
_CONTROL_KEYS.update({c: None for c in (0x00, 0x07, 0x0D, 0x1B)})
_CONTROL_KEYS.update({c: None for c in range(0x80, 0xA0)})


class TerminalText:
    """Terminal output to readable text (the original's session log form):
    escape sequences removed, even when split across chunks, control keys
    shown as [Ctrl+X], CR and BEL dropped, TAB and LF kept."""

    CARRY_MAX = 4096              # an unterminated string sequence longer than this is dropped

    def __init__(self):
        self.carry = ""

    def feed(self, text, final=False):
        text, self.carry = self.carry + text, ""
        if "\x1b" in text or "\x9b" in text:
            text = _ESC_SEQ.sub("", text)
            cut = _ESC_CUT.search(text)
            if cut:
                text = text[:cut.start()]
                if not final and len(cut.group()) <= self.CARRY_MAX:
                    self.carry = cut.group()
        return text.translate(_CONTROL_KEYS)


FILE_NAME_FIELDS = ("ptm_pid", "session_id", "username", "tty_id", "hostname", "date", "time")


def recording_name(template, event):
    """File name (no extension) of a session's recording from `template`;
    each field is reduced to [A-Za-z0-9._@-] so no name can leave the
    directory.  ValueError/KeyError/IndexError for a bad template."""
    start = event.start_time or event.timestamp
    fields = {"ptm_pid": event.ptm_pid, "session_id": event.session_id,
              "username": event.username, "tty_id": event.tty_id, "hostname": event.hostname,
              "date": time.strftime("%Y%m%d", time.gmtime(start)),
              "time": time.strftime("%H%M%S", time.gmtime(start))}
    safe = {k: re.sub(r"[^A-Za-z0-9._@-]", "_", str(v)) for k, v in fields.items()}
    name = template.format(**safe)
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError("%r is not a file name" % name)
    return name


def process_environ(pid, name, proc=PROC):
    """Value of environment variable `name` of process `pid`, or None."""
    try:
        with open("%s/%d/environ" % (proc, pid), "rb") as f:
            data = f.read(65536)
    except OSError:
        return None
    for item in data.split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return decode_bytes(item[len(name) + 1:])
    return None


def passwd_shell(uid, root="/"):
    for line in (read_text(os.path.join(root, "etc/passwd")) or "").splitlines():
        parts = line.split(":")
        if len(parts) > 6 and parts[2] == str(uid):
            return parts[6]
    return ""


def pty_window_size(tty, dev=DEV_PTS):
    """(rows, cols) of /dev/pts/N, asked of the slave without reading from
    it (so no byte is taken from the session), or (0, 0)."""
    try:
        fd = os.open("%s/%d" % (dev, tty), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return 0, 0
    try:
        import termios
        rows, cols = struct.unpack("HH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)[:4])
        return rows, cols
    except OSError:
        return 0, 0
    finally:
        os.close(fd)


def read_cast_header(fd):
    """The JSON header of an asciicast file open at `fd`, or None."""
    data = os.pread(fd, 65536, 0)
    line = data.split(b"\n", 1)[0]
    try:
        header = json.loads(line)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def last_cast_time(fd):
    """Time of the last complete event line of an asciicast file, or 0."""
    size = os.fstat(fd).st_size
    start = max(0, size - 65536)
    lines = os.pread(fd, size - start, start).split(b"\n")
    for line in reversed(lines[1:]):           # [0]: the header, or a cut line
        try:
            ev = json.loads(line)
            if isinstance(ev, list) and ev and isinstance(ev[0], (int, float)):
                return float(ev[0])
        except ValueError:
            continue
    return 0.0


DeferredOutput = collections.namedtuple("DeferredOutput",
                                        "timestamp raw offset data_len lost_bytes")


class SessionRecording:
    """The two files of one session and what is needed to keep appending to
    them: decoders, clocks, sizes, pending output before the cast header,
    and the output not converted yet (the backlog: see SessionLog)."""

    LOG, CAST = 0, 1

    def __init__(self, owner, event, stem, log_fd, cast_fd, header):
        self.owner = owner
        self.stem = stem
        self.session_id = event.session_id
        self.ptm_pid = event.ptm_pid
        self.fds = [log_fd, cast_fd]
        self.sizes = [os.fstat(log_fd).st_size, os.fstat(cast_fd).st_size]
        self.bufs = [bytearray(), bytearray()]
        self.dirty_since = None
        self.backlog = []                     # DeferredOutput, in order
        self.last_output = 0.0                # monotonic time the last one arrived
        self.out_dec = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        self.in_dec = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        self.text = TerminalText()
        self.next_out = self.next_in = None   # expected stream offsets (queue-loss check)
        self.capped = False
        self.broken = False
        self.admin_typing = False             # an admin's typing is marked once per attach
        self.log_at_line_start = True
        self.last_mark = event.timestamp     # last [[ sshlog time ]] line
        self.username = event.username
        self.opened = time.monotonic()
        if header is not None:                # appending to this session's own recording
            self.t0 = float(header.get("timestamp", event.timestamp))
            start = header.get("sshlog", {}).get("start")
            if isinstance(start, (int, float)):
                self.t0 = float(start)
            self.last_t = last_cast_time(cast_fd)
            self.header_done = True
            self.pending = None
        else:
            self.t0 = event.timestamp
            self.last_t = 0.0
            self.header_done = False
            self.pending = []                 # cast lines waiting for the header
            self.pending_bytes = 0
        self.rows = getattr(event, "rows", 0)
        self.cols = getattr(event, "cols", 0)
        self.event = event                    # the session's identity for the header

    # -- low level --

    def _put(self, which, text):
        data = text.encode("utf-8")
        self.bufs[which] += data
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        if len(self.bufs[which]) >= 65536:
            self.flush()

    def flush(self):
        for which in (self.LOG, self.CAST):
            buf = self.bufs[which]
            view, done = memoryview(buf), 0
            try:
                while done < len(buf):
                    done += os.write(self.fds[which], view[done:])
            finally:
                view.release()
                self.sizes[which] += done
                del buf[:done]
        self.dirty_since = None

    def size(self, which):
        return self.sizes[which] + len(self.bufs[which])

    def when(self, ts):
        """Seconds since the recording's start: never before the previous event."""
        self.last_t = max(self.last_t, ts - self.t0)
        return self.last_t

    def log(self, text):
        if text:
            self._put(self.LOG, text)
            self.log_at_line_start = text.endswith("\n")

    def log_line(self, text):
        self.log(("" if self.log_at_line_start else "\n") + text + "\n")

    def cast(self, ts, code, data, encoded=None):
        """One event line.  JSON strings are written ASCII-only (\\uXXXX):
        json's ASCII encoder is 2.5x faster on a flood, and the file is then
        safe to cat (no raw C1 controls or line separators)."""
        line = '[%.6f, "%s", %s]\n' % (self.when(ts), code, encoded or json.dumps(data))
        if self.header_done:
            self._put(self.CAST, line)
        else:
            self.pending.append(line)
            self.pending_bytes += len(line)
            if self.pending_bytes > self.owner.PENDING_MAX:
                self.write_header(None)

    def marker(self, ts, text):
        """A [[ sshlog ... ]] line in the text log and an `m` marker."""
        self.log_line("[[ sshlog %s ]]" % text)
        self.cast(ts, "m", "sshlog: " + text)

    # -- the cast header --

    def write_header(self, term):
        if self.header_done:
            return
        ev = self.event
        rows, cols = self.rows, self.cols
        if not (rows and cols) and ev.tty_id >= 0:
            rows, cols = pty_window_size(ev.tty_id)
        rows, cols = rows or 24, cols or 80
        self.rows, self.cols = rows, cols
        client = ("[%s]:%d" if ":" in ev.client_ip else "%s:%d") % (ev.client_ip, ev.client_port)
        header = {
            "version": 2, "width": cols, "height": rows, "timestamp": int(self.t0),
            "env": {"TERM": term or "xterm",
                    "SHELL": passwd_shell(ev.user_id, getattr(ev, "sshd_root", "/")) or ""},
            "title": "%s@%s /dev/pts/%d from %s" % (ev.username, ev.hostname, ev.tty_id, client),
            "sshlog": {"version": __version__, "user": ev.username, "uid": ev.user_id,
                       "client_ip": ev.client_ip, "client_port": ev.client_port,
                       "server_ip": ev.server_ip, "server_port": ev.server_port,
                       "tty": "/dev/pts/%d" % ev.tty_id, "tty_id": ev.tty_id,
                       "session_id": ev.session_id, "ptm_pid": ev.ptm_pid,
                       "host": ev.hostname, "start": self.t0,
                       "session_start": rfc3339(ev.start_time) if ev.start_time else None}}
        self.header_done = True
        self._put(self.CAST, json.dumps(header) + "\n")
        for line in self.pending:
            self._put(self.CAST, line)
        self.pending = None

    # -- events --

    def begin(self, event, continuing):
        if continuing:
            if event.existing:
                self.marker(event.timestamp, "recording resumed at %s after sshlog restarted; "
                            "output in between was not recorded" % rfc3339(event.timestamp))
            return
        self.log_line("[[ sshlog connection_established user: %s at %s ]]"
                      % (event.username, rfc3339(event.timestamp)))
        if event.existing:
            self.marker(event.timestamp, "recording starts at %s: the session was open "
                        "before sshlog started (at %s)" % (
                            rfc3339(event.timestamp), rfc3339(event.start_time or 0)))

    def over_cap(self, ts, more):
        cap = self.owner.cap
        if self.capped:
            return True
        if cap and max(self.size(self.LOG), self.size(self.CAST) + self.pending_size()) \
                + more > cap:
            self.capped = True
            self.marker(ts, "recording stopped at %s: size limit of %d bytes reached"
                        % (rfc3339(ts), cap))
            return True
        return False

    def pending_size(self):
        return self.pending_bytes if self.pending is not None else 0

    def defer(self, ev):
        """Keep what output() needs of a terminal_update: not the event,
        whose decoded text would double the memory held."""
        self.backlog.append(DeferredOutput(ev.timestamp, ev.raw, ev.offset, ev.data_len,
                                           ev.lost_bytes))
        self.owner.backlog_bytes += len(ev.raw)
        self.last_output = time.monotonic()

    def catch_up(self):
        """Convert and buffer the deferred output, in order."""
        events, self.backlog = self.backlog, []
        self.owner.backlog_bytes -= sum(len(ev.raw) for ev in events)
        for ev in events:
            self.output(ev)

    def output(self, ev):
        self._gap(ev, "next_out", "terminal output")
        if not ev.raw or self.capped:
            return
        text = self.out_dec.decode(ev.raw)
        if not text:
            return
        encoded = json.dumps(text)
        if self.over_cap(ev.timestamp, len(encoded) + 24):
            return
        freq = self.owner.freq
        if freq > 0 and ev.timestamp - self.last_mark > freq:
            self.last_mark = ev.timestamp
            self.log_line("[[ sshlog time: %s ]]" % rfc3339(ev.timestamp))
        self.cast(ev.timestamp, "o", text, encoded)
        self.log(self.text.feed(text))

    def input(self, ev):
        self._gap(ev, "next_in", "keystrokes")
        if not ev.raw or not self.owner.capture_input or self.capped:
            return
        text = self.in_dec.decode(ev.raw)
        if not text:
            return
        encoded = json.dumps(text)
        if not self.over_cap(ev.timestamp, len(encoded) + 24):
            self.cast(ev.timestamp, "i", text, encoded)

    def _gap(self, ev, attr, what):
        """Markers where bytes are missing: lost in the kernel (the record
        says how many) or dropped from this action's queue (offsets jump)."""
        expected = getattr(self, attr)
        queued_loss = ev.offset - expected if expected is not None else 0
        setattr(self, attr, ev.offset + ev.data_len)
        for lost, where in ((ev.lost_bytes, "kernel ring buffer full"),
                            (queued_loss, "sshlog action queue full")):
            if lost > 0 and not self.capped:
                if what == "terminal output":     # a character cut by the gap stays escaped
                    self.log(self.text.feed(self.out_dec.decode(b"", True)))
                    self.out_dec.reset()
                self.marker(ev.timestamp, "%d bytes of %s lost here (%s)" % (lost, what, where))

    def resize(self, ev):
        if (ev.rows, ev.cols) == (self.rows, self.cols) or not ev.rows or not ev.cols:
            return
        self.rows, self.cols = ev.rows, ev.cols
        if self.header_done and not self.capped:
            self.cast(ev.timestamp, "r", "%dx%d" % (ev.cols, ev.rows))

    def command(self, ev):
        if not self.header_done:
            self.write_header(process_environ(ev.pid, "TERM"))
        if not self.capped:
            label = printable(ev.args)
            self.cast(ev.timestamp, "m", label[:256] + ("..." if len(label) > 256 else ""))

    def admin(self, ev):
        """An admin attached, typed or killed: said in both files (what was
        typed shows in the output anyway: one marker where typing starts)."""
        if ev.action == "input":
            if self.admin_typing:
                return
            self.admin_typing = True
        elif ev.action in ("attach", "detach"):
            self.admin_typing = False
        if not self.capped:
            self.marker(ev.timestamp, printable("%s by %s (uid %d, pid %d)%s" % (
                {"attach": "attached", "detach": "detached", "input": "typing",
                 "kill": "killed"}.get(ev.action, ev.action), ev.admin_name or "?",
                ev.admin_uid, ev.admin_pid, ", read-only" if ev.action == "attach" and
                ev.readonly else "")))

    def finish(self, ts, why=None):
        """The connection ended (or is no longer there): footer, flush, close."""
        try:
            self.catch_up()
            self.write_header(None)
            tail = self.out_dec.decode(b"", True)
            if tail and not self.capped:
                self.cast(ts, "o", tail)
            if not self.capped:
                self.log(self.text.feed(tail, final=True))
            if why:
                self.marker(ts, why)
            self.cast(ts, "m", "sshlog: connection closed")
            self.log_line("[[ sshlog connection_close user: %s at %s ]]"
                          % (self.username, rfc3339(ts)))
            self.flush()
        finally:
            self.close()

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)                  # also drops the flock
            except OSError:
                pass
        self.fds = [-1, -1]


@register_action("sessionlog_action", "record each terminal session: the original's plain-text "
                 "log NAME.log and an asciicast v2 NAME.cast beside it (`sshlog replay`, "
                 "`asciinema play`)")
class SessionLog(Action):
    """Recordings are bulk work with no reader waiting: ~0.15 s of CPU per
    17 MB of output (JSON for the .cast, escape stripping for the .log),
    which a flood on two busy CPUs feels (~10 %, at any nice level or
    SCHED_IDLE: the CPUs are never idle long enough to hide it).  So a
    session's output is kept as it came and converted once its terminal
    has been quiet for QUIET seconds -- after the burst, not during it --
    or when anything else happens in the session (a command, a resize, the
    close: the files keep the order), or when the deferred output of all
    sessions passes BACKLOG_MAX bytes.  The worker and flusher also run at
    `nice` RECORDING_NICE; the capture thread and the other actions keep
    the daemon's priority."""

    nice = RECORDING_NICE
    PARAMS = (
        Param("log_directory", "str", help="directory of the recordings (created 0700)"),
        Param("timestamp_frequency_seconds", "number", -1,
              "write [[ sshlog time: ... ]] into a session's text log when this many seconds "
              "passed since the last one; -1: never"),
        Param("max_session_size_mb", "number", 100,
              "stop recording a session, with a marker, when one of its files would pass this "
              "size; 0: no limit"),
        Param("capture_input", "bool", False,
              "add keystrokes to the .cast as `i` events (not while the terminal has ECHO off: "
              "passwords are dropped in the kernel); needs the trigger terminal_input and a "
              "daemon restart"),
        Param("file_name", "str", "ssh_{ptm_pid}",
              "file name without extension; fields: {%s}" % "} {".join(FILE_NAME_FIELDS)))

    PENDING_MAX = 256 * 1024      # output kept while the cast header waits for TERM
    HEADER_WAIT = 2.0             # seconds the header waits for the session's first command
    FLUSH_EVERY = 0.5             # seconds buffered output may wait before it is written
    QUIET = 0.25                  # seconds without output before a session's is converted
    BACKLOG_MAX = 32 * 1024 * 1024   # bytes of output kept unconverted, all sessions
    CHECK_GONE_EVERY = 60.0       # seconds between checks for sessions whose close was missed
    LOCK_WAIT = 10.0              # seconds to wait for another writer (a reload) to let go
    CLOSED_KEPT = 4096            # closed session ids remembered (late events are ignored)
    WRITERS = {"terminal_input": SessionRecording.input,     # event type -> what records it
               "terminal_resize": SessionRecording.resize,
               "command_start": SessionRecording.command,
               "session_attach": SessionRecording.admin}
    proc = PROC

    @classmethod
    def check(cls, params):
        problems = []
        sample = ConnectionEstablished(timestamp=0.0, hostname="h", ptm_pid=1, session_id="s",
                                       username="u", tty_id=0)
        try:
            recording_name(params["file_name"], sample)
        except (KeyError, IndexError, ValueError) as e:
            problems.append("file_name: invalid template %r (%s; fields: %s)" % (
                params["file_name"], e, ", ".join(FILE_NAME_FIELDS)))
        if params["max_session_size_mb"] < 0:
            problems.append("max_session_size_mb: must be 0 (no limit) or more")
        return problems

    def __init__(self, name, params):
        super().__init__(name, params)
        problems = self.check(params)
        if problems:
            raise ConfigError(problems)
        self.directory = params["log_directory"]
        self.freq = params["timestamp_frequency_seconds"]
        self.cap = int(params["max_session_size_mb"] * 1024 * 1024)
        self.capture_input = params["capture_input"]
        self.template = params["file_name"]
        self.log = logging.getLogger("sshlog.recording")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(self.directory).st_mode)
        if mode & 0o077:
            self.log.warning("recordings directory %s is mode %04o: others can list the "
                             "recordings (the files themselves are 0600)", self.directory, mode)
        _raise_fd_limit()
        self.lock = threading.Lock()
        self.sessions = {}                    # ptm_pid -> SessionRecording
        self.backlog_bytes = 0                # output deferred, all sessions
        self.closed = collections.OrderedDict()
        self.errors = 0
        self.stopping = threading.Event()
        self.wake = threading.Event()         # set when a recording has something pending
        self.checked_gone = time.monotonic()
        self.flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                        name="recordings-" + name)
        self.flusher.start()

    def handle(self, event):
        with self.lock:
            rec = self.sessions.get(event.ptm_pid)
            if rec is not None and rec.session_id != event.session_id:
                self._drop(rec)               # a close we never saw; the pid is reused
                rec = None
            if event.type == "connection_close":
                self.closed[event.session_id] = True
                while len(self.closed) > self.CLOSED_KEPT:
                    self.closed.popitem(last=False)
                if rec is not None:
                    del self.sessions[event.ptm_pid]
                    self._guard(rec, rec.finish, event.timestamp)
                return
            if rec is None:
                rec = self._start(event)
                if rec is None:
                    return
            if rec.broken:
                return
            kind = event.type
            if kind == "terminal_update":
                rec.defer(event)
                if self.backlog_bytes > self.BACKLOG_MAX:
                    for r in list(self.sessions.values()):
                        self._guard(r, r.catch_up)
            else:
                if rec.backlog:                # what came before goes first
                    self._guard(rec, rec.catch_up)
                write = self.WRITERS.get(kind)
                if write is not None and not rec.broken:
                    self._guard(rec, write, rec, event)
            if (rec.dirty_since is not None or not rec.header_done or rec.backlog) and \
                    not self.wake.is_set():
                self.wake.set()

    def _start(self, event):
        """Open the files of a session seen for the first time: authenticated
        (a user name) and with a terminal; None when it gets none."""
        if event.session_id in self.closed or not event.username or event.tty_id < 0 or \
                event.type not in ("connection_established", "terminal_update", "command_start",
                                   "terminal_resize", "terminal_input"):
            return None
        try:
            rec = self._open(event)
        except OSError as e:
            self._error("cannot open the recording of session %s (ptm %d) in %s: %s" % (
                event.session_id, event.ptm_pid, self.directory, e))
            return None
        self.sessions[event.ptm_pid] = rec
        return rec

    def _open(self, event):
        base = recording_name(self.template, event)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        for n in range(100):
            stem = os.path.join(self.directory, base if n == 0 else "%s.%d" % (base, n))
            cast_fd = os.open(stem + ".cast", flags, 0o600)
            try:
                header = self._lock(cast_fd, event)
            except BlockingIOError:
                os.close(cast_fd)             # another writer's, not this session's
                continue
            except BaseException:
                os.close(cast_fd)
                raise
            if header is False:
                os.close(cast_fd)             # another session's file (a reused pid)
                continue
            try:
                log_fd = os.open(stem + ".log", flags & ~os.O_RDWR | os.O_WRONLY, 0o600)
            except BaseException:
                os.close(cast_fd)
                raise
            for fd in (cast_fd, log_fd):
                os.fchmod(fd, 0o600)
            rec = SessionRecording(self, event, stem, log_fd, cast_fd, header)
            rec.begin(event, header is not None)
            if getattr(event, "rows", 0):
                rec.rows, rec.cols = event.rows, event.cols
            return rec
        raise OSError(errno.EEXIST, "no free file name for %s" % base)

    def _lock(self, fd, event):
        """Take the writer's lock on a cast file.  Returns None (empty: a new
        recording), the header (this session's own recording: append), or
        False (another session's); BlockingIOError when someone else writes
        another session there.  A reload has the old action still finishing
        this very session: wait for it."""
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                header = read_cast_header(fd)
                mine = header and header.get("sshlog", {}).get("session_id") == event.session_id
                if not mine or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if os.fstat(fd).st_size == 0:
            return None
        header = read_cast_header(fd)
        if header and header.get("sshlog", {}).get("session_id") == event.session_id:
            return header
        return False

    def _guard(self, rec, method, *args):
        try:
            method(*args)
        except OSError as e:
            rec.broken = True
            self._error("recording %s stopped: %s" % (rec.stem, e))

    def _error(self, message):
        self.errors += 1
        if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
            self.log.error("%s (%d recording error(s) so far)", message, self.errors)

    def _drop(self, rec, why="sshlog did not see this connection close"):
        self.sessions.pop(rec.ptm_pid, None)
        self._guard(rec, rec.finish, time.time(), why)

    def _flush_loop(self):
        """Wakes only while some recording has buffered output or a pending
        header (and once a CHECK_GONE_EVERY otherwise): an idle daemon sleeps."""
        lower_thread_priority(self.nice, "recordings of action %s" % self.name)
        while not self.stopping.is_set():
            with self.lock:
                busy = any(r.dirty_since is not None or not r.header_done or r.backlog
                           for r in self.sessions.values() if not r.broken)
                self.wake.clear()
            if not busy:
                self.wake.wait(self.CHECK_GONE_EVERY)
            if self.stopping.wait(self.FLUSH_EVERY / 2):
                break
            with self.lock:
                self.tick(time.monotonic())

    def tick(self, now):
        """Output converted once quiet, buffered output out after
        FLUSH_EVERY, headers that waited too long for a command, and (now
        and then) sessions that are gone."""
        check_gone = now - self.checked_gone > self.CHECK_GONE_EVERY
        if check_gone:
            self.checked_gone = now
        for rec in list(self.sessions.values()):
            if rec.broken:
                continue
            # each step only while the recording still works: a failed one stops it
            if rec.backlog and now - rec.last_output >= self.QUIET:
                self._guard(rec, rec.catch_up)
            if not rec.broken and not rec.header_done and now - rec.opened > self.HEADER_WAIT:
                self._guard(rec, rec.write_header, None)
            if not rec.broken and rec.dirty_since is not None and \
                    now - rec.dirty_since >= self.FLUSH_EVERY:
                self._guard(rec, rec.flush)
            if check_gone and not os.path.exists("%s/%d" % (self.proc, rec.ptm_pid)):
                self._drop(rec)

    def close(self):
        self.stopping.set()
        self.wake.set()
        self.flusher.join(2.0)
        with self.lock:
            for rec in list(self.sessions.values()):
                try:
                    rec.catch_up()
                    rec.write_header(None)
                    rec.flush()
                except OSError as e:
                    self._error("recording %s: %s" % (rec.stem, e))
                rec.close()
            self.sessions.clear()


def _raise_fd_limit(want=65536):
    """Two files per live session: lift the soft RLIMIT_NOFILE toward the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


# -- shared by the actions below: templates, retries, transports --

_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def field_text(value):
    """An event field as template or environment text: strings as they are,
    null as empty, booleans as true/false, lists and mappings as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render(template, fields, value=field_text):
    """Replace each `{{field}}` with the event's value; unknown names stay as
    written.  The result is plain text: nothing in it is ever interpreted."""
    return _TEMPLATE.sub(lambda m: value(fields[m.group(1)]) if m.group(1) in fields
                         else m.group(0), template)


def one_line(text):
    """Safe in a mail or HTTP header: CR, LF and other control characters
    become spaces, so a value can never start a new header."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def redact_url(url):
    """scheme://host[:port]/... only: webhook paths and queries are secrets."""
    import urllib.parse
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = ":%d" % parts.port if parts.port else ""
    except ValueError:
        return "<url>"
    host = "[%s]" % host if ":" in host else host
    return "%s://%s%s/..." % (parts.scheme, host, port)


def tls_context(ca_file=None, verify=True, cert_file=None, key_file=None):
    import ssl
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def http_request(url, body=None, headers=None, method="POST", timeout=10.0, context=None):
    """One HTTP(S) request with a timeout; returns the status.  A 408, 429 or
    5xx answer and network errors raise a retryable DeliveryError (with the
    receiver's Retry-After), other 4xx a final one."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    where = redact_url(url)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            resp.read(65536)
            return resp.status
    except urllib.error.HTTPError as e:
        status, delay = e.code, parse_retry_after(e.headers.get("Retry-After") if e.headers
                                                  else None)
        e.close()
        raise DeliveryError("HTTP %d from %s" % (status, where),
                            retry=status in (408, 429) or status >= 500, delay=delay)
    except urllib.error.URLError as e:
        raise DeliveryError("%s: %s" % (where, e.reason))
    except OSError as e:                # timeouts, resets while reading the answer
        raise DeliveryError("%s: %s" % (where, e))


class DatagramSender:
    """A UDP client for one host:port; the name is resolved once and again
    after an error."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.sock = self.addr = None

    def send(self, data):
        if self.sock is None:
            family, _, _, _, self.addr = socket.getaddrinfo(self.host, self.port,
                                                            type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.settimeout(1.0)
        try:
            try:
                self.sock.sendto(data[:65000], self.addr)
            except ConnectionRefusedError:
                # an earlier datagram's ICMP error reported now: this one was not sent yet
                self.sock.sendto(data[:65000], self.addr)
        except OSError:
            self.close()
            raise

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = None


class StreamSender:
    """A TCP or TLS client that keeps its connection between messages and
    reconnects when the server has gone (checked before each send)."""

    def __init__(self, host, port, timeout, context=None):
        self.host, self.port, self.timeout, self.context = host, port, timeout, context
        self.sock = None

    def _peer_closed(self):
        """A syslog server never talks back: anything readable means it has
        closed (b"") or reset the connection.  TLS records that carry no data
        (session tickets) are read and ignored."""
        import ssl
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            self.sock.setblocking(False)
            try:
                return not self.sock.recv(1024)      # b"" = orderly close
            except (BlockingIOError, ssl.SSLWantReadError):
                return False
            finally:
                self.sock.settimeout(self.timeout)
        except (OSError, ValueError):
            return True

    def send(self, data):
        if self.sock is not None and self._peer_closed():
            self.close()
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            try:
                if self.context is not None:
                    sock = self.context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()
            raise

    def close(self):
        if self.sock is not None:
            try:
                if self.context is not None:
                    self.sock.settimeout(1.0)
                    self.sock = self.sock.unwrap()      # close_notify, as TLS wants
            except (OSError, ValueError):
                pass
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


def event_summary(event):
    """One sentence a person reads in a chat message or a mail subject."""
    user = event.username or "?"
    host = event.hostname
    if event.type == "connection_established":
        where = "on pts/%d" % event.tty_id if event.tty_id >= 0 else "without a terminal"
        text = "%s logged in to %s from %s, %s" % (user, host, event.peer(), where)
    elif event.type == "connection_auth_failed":
        how = " (%s)" % event.auth_method if getattr(event, "auth_method", "") else ""
        text = "failed login to %s as %s from %s%s" % (host, user, event.peer(), how)
    elif event.type == "connection_close":
        text = "%s logged out of %s (from %s) after %ds" % (
            user, host, event.peer(), getattr(event, "duration_ms", 0) // 1000)
    elif event.type == "command_start":
        text = "%s ran on %s: %s" % (user, host, event.args)
    elif event.type == "command_finish":
        how = "killed by %s" % event.signal if event.signal else "exit code %d" % event.exit_code
        text = "%s's command on %s ended (%s): %s" % (user, host, how, event.args)
    elif event.type == "file_upload":
        text = "%s uploaded %s to %s (%d bytes)" % (user, event.target_path, host, event.bytes)
    else:
        text = "%s on %s" % (event.text(), host)
    return printable(text)


def _positive(params, *names):
    return ["%s: must be greater than 0" % n for n in names
            if params.get(n) is not None and params[n] <= 0]


def _not_negative(params, *names):
    return ["%s: must not be negative" % n for n in names
            if params.get(n) is not None and params[n] < 0]


def _one_of(params, name, choices):
    value = params.get(name)
    if value is not None and value not in choices:
        return ["%s: %r is not one of %s%s" % (name, value, ", ".join(choices),
                                              did_you_mean(value, choices))]
    return []


_RETRY_PARAMS = (Param("timeout", "number", 10, "seconds allowed for each attempt"),
                 Param("retries", "int", 3, "attempts after the first failure, with backoff "
                       "0.5 s, 1 s, 2 s ... (a receiver's Retry-After is honoured)"))
_TLS_PARAMS = (Param("tls_ca_file", "str", None, "CA certificates (PEM) to verify the server "
                     "with instead of the system's"),
               Param("tls_verify", "bool", True, "verify the server's certificate and name"))


@register_action("syslog_action", "send each event to a syslog server as RFC 5424 "
                 "(UDP; TCP or TLS with octet counting, RFC 6587/5425)")
class Syslog(Action):
    PARAMS = (Param("server_address", "str", help="syslog server's name or address"),
              Param("port", "int", 514, "server port (6514 is usual for TLS)"),
              Param("udp", "bool", True, "false: TCP (kept from the original; see transport)"),
              Param("transport", "str", None, "udp, tcp or tls; unset: udp, or tcp when "
                    "udp is false"),
              Param("output_json", "bool", False, "message body: the event as JSON instead of "
                    "the text form"),
              Param("program_name", "str", "sshlog", "APP-NAME field"),
              Param("facility", "str", "daemon", "name (auth, authpriv, daemon, local0 ...) "
                    "or number 0-23"),
              Param("severity", "str", "info", "name (emerg ... debug) or number 0-7"),
              Param("hostname", "str", None, "HOSTNAME field; unset: the event's host name"),
              Param("timeout", "number", 5, "seconds allowed to connect and to send"),
              Param("retries", "int", 2, "TCP/TLS: attempts after a failed send (reconnecting)"),
              ) + _TLS_PARAMS + (
              Param("tls_cert_file", "str", None, "client certificate (PEM) for mutual TLS"),
              Param("tls_key_file", "str", None, "its private key"))

    @staticmethod
    def code(names, value, top):
        value = str(value).strip().lower()
        if value.isdigit() and int(value) <= top:
            return int(value)
        return names.get(value)

    @classmethod
    def check(cls, params):
        problems = _positive(params, "timeout") + _not_negative(params, "retries")
        problems += _one_of(params, "transport", ("udp", "tcp", "tls"))
        handler = logging.handlers.SysLogHandler
        if cls.code(handler.facility_names, params["facility"], 23) is None:
            problems.append("facility: unknown facility %r%s" % (
                params["facility"], did_you_mean(params["facility"], handler.facility_names)))
        if cls.code(handler.priority_names, params["severity"], 7) is None:
            problems.append("severity: unknown severity %r%s" % (
                params["severity"], did_you_mean(params["severity"], handler.priority_names)))
        if params["tls_key_file"] and not params["tls_cert_file"]:
            problems.append("tls_key_file: needs tls_cert_file")
        return problems

    def __init__(self, name, params):
        super().__init__(name, params)
        handler = logging.handlers.SysLogHandler
        self.pri = (self.code(handler.facility_names, params["facility"], 23) * 8 +
                    self.code(handler.priority_names, params["severity"], 7))
        self.transport = params["transport"] or ("udp" if params["udp"] else "tcp")
        host, port = params["server_address"], params["port"]
        if self.transport == "udp":
            self.sender = DatagramSender(host, port)
        else:
            context = tls_context(params["tls_ca_file"], params["tls_verify"],
                                  params["tls_cert_file"], params["tls_key_file"]) \
                if self.transport == "tls" else None
            self.sender = StreamSender(host, port, params["timeout"], context)

    @staticmethod
    def token(text, size):
        """A header field: printable US-ASCII without spaces, or `-`."""
        text = re.sub(r"[^\x21-\x7e]", "_", text or "")[:size]
        return text or "-"

    def message(self, event):
        p = self.params
        body = json.dumps(event.to_dict(), ensure_ascii=False) if p["output_json"] \
            else event.text()
        return "<%d>1 %s %s %s %d %s - %s" % (
            self.pri, rfc3339(event.timestamp), self.token(p["hostname"] or event.hostname, 255),
            self.token(p["program_name"], 48), event.ptm_pid, self.token(event.type, 32), body)

    def handle(self, event):
        data = self.message(event).encode("utf-8")
        if self.transport == "udp":                     # fire and forget, never a backoff
            self.sender.send(data)
            return
        data = b"%d %s" % (len(data), data)             # octet counting
        self.deliver(lambda: self.sender.send(data), self.params["retries"])

    def close(self):
        self.sender.close()


STATSD_TAG_FIELDS = ("client_ip", "server_ip", "server_port", "tty_id", "command", "filename",
                     "exit_code", "signal", "auth_method", "reason", "ptm_pid", "session_id",
                     "target_path", "user_id")


@register_action("statsd_action", "count events in statsd: <prefix>.<event_type>, tagged "
                 "with host and user (DogStatsD, InfluxDB/Telegraf or no tags)")
class Statsd(Action):
    PARAMS = (Param("server_address", "str", help="statsd server's name or address"),
              Param("port", "int", 8125, "server UDP port"),
              Param("statsd_prefix", "str", "sshlog", "metric name prefix"),
              Param("tags", "str", "dogstatsd", "tag style: dogstatsd (`|#host:h,user:u`), "
                    "influx (`name,host=h,user=u`) or none (plain statsd)"),
              Param("extra_tags", "strlist", [], "more tags, from: " +
                    ", ".join(STATSD_TAG_FIELDS) + " (may have many values)"))

    @classmethod
    def check(cls, params):
        problems = _one_of(params, "tags", ("dogstatsd", "influx", "none", "plain"))
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", params["statsd_prefix"]):
            problems.append("statsd_prefix: use letters, digits, '_', '-' and '.' only")
        for tag in params["extra_tags"]:
            if tag not in STATSD_TAG_FIELDS:
                problems.append("extra_tags: unknown tag %r%s" % (
                    tag, did_you_mean(tag, STATSD_TAG_FIELDS)))
        return problems

    def __init__(self, name, params):
        super().__init__(name, params)
        self.sender = DatagramSender(params["server_address"], params["port"])

    @staticmethod
    def clean(text):
        return re.sub(r"[^A-Za-z0-9_.\-/@]", "_", str(text))[:200] or "_"

    def tags(self, event):
        """Low-cardinality tags: host, user, and the outcome of a command or
        the method of a failed login; `extra_tags` adds chosen fields."""
        tags = [("host", event.hostname), ("user", event.username or "-")]
        if event.type == "command_finish":
            tags.append(("outcome", "signal" if event.signal else
                         "success" if event.exit_code == 0 else "failure"))
        elif event.type == "connection_auth_failed":
            tags.append(("method", event.auth_method or "unknown"))
        fields = event.to_dict()
        for name in self.params["extra_tags"]:
            if name == "command":
                value = os.path.basename(getattr(event, "filename", "") or "") or None
            else:
                value = fields.get(name)
            if value is not None and value != "":
                tags.append((name, value))
        return [(k, self.clean(v)) for k, v in tags]

    def line(self, event):
        name = "%s.%s" % (self.params["statsd_prefix"], event.type)
        style = self.params["tags"]
        if style == "dogstatsd":
            return "%s:1|c|#%s" % (name, ",".join("%s:%s" % kv for kv in self.tags(event)))
        if style == "influx":
            return "%s,%s:1|c" % (name, ",".join("%s=%s" % kv for kv in self.tags(event)))
        return "%s:1|c" % name

    def handle(self, event):
        self.sender.send(self.line(event).encode("ascii"))

    def close(self):
        self.sender.close()


def slack_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@register_action("slack_action", "post a message for each event to a Slack incoming webhook")
class Slack(Action):
    PARAMS = (Param("slack_webhook_url", "str", help="https://hooks.slack.com/services/..."),
              Param("text", "str", None, "message template with {{field}}s; unset: a sentence "
                    "describing the event"),
              ) + _RETRY_PARAMS

    @classmethod
    def check(cls, params):
        problems = _positive(params, "timeout") + _not_negative(params, "retries")
        if not re.match(r"https?://", params["slack_webhook_url"]):
            problems.append("slack_webhook_url: must be an http:// or https:// URL")
        return problems

    def message(self, event):
        if self.params["text"] is None:
            return slack_escape(event_summary(event))
        return render(self.params["text"], event.to_dict(),
                      lambda v: slack_escape(printable(field_text(v))))

    def handle(self, event):
        body = json.dumps({"text": self.message(event)}).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "sshlog/" + __version__}
        self.deliver(lambda: http_request(self.params["slack_webhook_url"], body, headers,
                                          timeout=self.params["timeout"]),
                     self.params["retries"])


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@register_action("webhook_action", "send each event to a URL: JSON POST (default) or GET "
                 "with the fields as query parameters; optional HMAC-SHA256 signature")
class Webhook(Action):
    PARAMS = (Param("webhook_url", "str", help="http:// or https:// URL"),
              Param("do_get_request", "bool", False, "GET with the fields in the query string "
                    "instead of a JSON POST"),
              Param("hmac_secret", "str", None, "when set, sign the body (GET: the query "
                    "string) with HMAC-SHA256"),
              Param("hmac_header", "str", "X-Sshlog-Signature", "header carrying "
                    "`sha256=<hex digest>`"),
              Param("headers", "any", {}, "extra headers (a mapping of name: value)"),
              ) + _RETRY_PARAMS + _TLS_PARAMS

    @classmethod
    def check(cls, params):
        problems = _positive(params, "timeout") + _not_negative(params, "retries")
        if not re.match(r"https?://", params["webhook_url"]):
            problems.append("webhook_url: must be an http:// or https:// URL")
        headers = params["headers"]
        if not isinstance(headers, dict):
            problems.append("headers: expected a mapping of header name: value")
        else:
            for k, v in headers.items():
                if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
                    problems.append("headers.%s: not a valid header name" % (k,))
                elif not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    problems.append("headers.%s: expected a string" % k)
                elif re.search(r"[\r\n\x00]", str(v)):
                    problems.append("headers.%s: a header value cannot hold a line break" % k)
        if not _HEADER_NAME.fullmatch(params["hmac_header"]):
            problems.append("hmac_header: not a valid header name")
        return problems

    def __init__(self, name, params):
        super().__init__(name, params)
        self.context = tls_context(params["tls_ca_file"], params["tls_verify"]) \
            if params["webhook_url"].startswith("https:") else None

    def request(self, event):
        """(url, body or None, headers) for an event."""
        import hmac
        import urllib.parse
        p = self.params
        fields = event.to_dict()
        headers = {"User-Agent": "sshlog/" + __version__, "X-Sshlog-Event": event.type}
        headers.update((k, one_line(str(v))) for k, v in p["headers"].items())
        url, body = p["webhook_url"], None
        if p["do_get_request"]:
            query = urllib.parse.urlencode([(k, field_text(v)) for k, v in fields.items()])
            url += ("&" if "?" in url else "?") + query
            signed = query.encode()
        else:
            body = signed = json.dumps(fields, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if p["hmac_secret"]:
            digest = hmac.new(p["hmac_secret"].encode(), signed, hashlib.sha256).hexdigest()
            headers[p["hmac_header"]] = "sha256=" + digest
        return url, body, headers

    def handle(self, event):
        url, body, headers = self.request(event)
        method = "GET" if self.params["do_get_request"] else "POST"
        self.deliver(lambda: http_request(url, body, headers, method, self.params["timeout"],
                                          self.context), self.params["retries"])


DEFAULT_MAIL_SUBJECT = "sshlog: {{event_type}} {{username}} on {{hostname}}"


@register_action("email_action", "send an e-mail for each event (SMTP with STARTTLS, implicit "
                 "TLS or plain; optional login)")
class Email(Action):
    PARAMS = (Param("sender", "str", help="From address"),
              Param("recipient", "str_or_list", help="To address(es)"),
              Param("subject", "str", DEFAULT_MAIL_SUBJECT, "subject template ({{field}}s)"),
              Param("body", "str", "", "body template; empty: a sentence and the event as JSON"),
              Param("smtp_server", "str", "localhost", "SMTP server"),
              Param("smtp_port", "int", None, "unset: 587 for starttls, 465 for tls, 25 for "
                    "none"),
              Param("security", "str", "starttls", "starttls, tls (implicit, SMTPS) or none"),
              Param("username", "str", None, "log in with this user (with password)"),
              Param("password", "str", None, "password for username"),
              ) + _RETRY_PARAMS + _TLS_PARAMS
    PORTS = {"starttls": 587, "tls": 465, "none": 25}

    @classmethod
    def check(cls, params):
        problems = _positive(params, "timeout") + _not_negative(params, "retries")
        problems += _one_of(params, "security", tuple(cls.PORTS))
        for key, value in [("sender", params["sender"])] + [
                ("recipient", r) for r in cls.recipients(params)]:
            if not value or re.search(r"[\x00-\x1f\x7f,]", value):
                problems.append("%s: %r is not an address" % (key, value))
        if bool(params["username"]) != bool(params["password"]):
            problems.append("username: username and password go together")
        return problems

    @staticmethod
    def recipients(params):
        """A list, or a string with addresses separated by commas."""
        value = params["recipient"]
        if isinstance(value, list):
            return value
        return [a.strip() for a in value.split(",")] if "," in value else [value]

    def __init__(self, name, params):
        super().__init__(name, params)
        self.port = params["smtp_port"] or self.PORTS[params["security"]]
        self.context = tls_context(params["tls_ca_file"], params["tls_verify"]) \
            if params["security"] != "none" else None

    def message(self, event):
        from email.message import EmailMessage
        import email.utils
        p = self.params
        fields = event.to_dict()
        msg = EmailMessage()
        msg["From"] = p["sender"]
        rcpt = self.recipients(p)
        msg["To"] = ", ".join(rcpt)
        msg["Subject"] = one_line(render(p["subject"], fields))[:900]
        msg["Date"] = email.utils.formatdate(event.timestamp, localtime=False)
        msg["Message-ID"] = email.utils.make_msgid("sshlog")
        body = render(p["body"], fields) if p["body"] else "%s\n\n%s\n" % (
            event_summary(event), json.dumps(fields, indent=2, ensure_ascii=False))
        msg.set_content(body)
        return msg, rcpt

    def send(self, msg, rcpt):
        import smtplib
        p = self.params
        try:
            if p["security"] == "tls":
                smtp = smtplib.SMTP_SSL(p["smtp_server"], self.port, timeout=p["timeout"],
                                        context=self.context)
            else:
                smtp = smtplib.SMTP(p["smtp_server"], self.port, timeout=p["timeout"])
            with smtp:
                smtp.ehlo()
                if p["security"] == "starttls":
                    smtp.starttls(context=self.context)
                    smtp.ehlo()
                if p["username"]:
                    smtp.login(p["username"], p["password"])
                smtp.send_message(msg, p["sender"], rcpt)
        except smtplib.SMTPNotSupportedError as e:
            raise DeliveryError("%s:%d: %s" % (p["smtp_server"], self.port, e), retry=False)
        except smtplib.SMTPRecipientsRefused as e:
            raise DeliveryError("recipients refused: %s" % ", ".join(e.recipients), retry=False)
        except smtplib.SMTPResponseException as e:
            raise DeliveryError("%s:%d answered %d %s" % (
                p["smtp_server"], self.port, e.smtp_code,
                e.smtp_error.decode(errors="replace") if isinstance(e.smtp_error, bytes)
                else e.smtp_error), retry=not 500 <= e.smtp_code < 600)

    def handle(self, event):
        msg, rcpt = self.message(event)
        self.deliver(lambda: self.send(msg, rcpt), self.params["retries"])


SHELLS = frozenset(("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "fish",
                    "csh", "tcsh", "busybox"))
_CODE_INTERPRETER = re.compile(r"(python|perl|ruby|node|nodejs|php|lua|tclsh|pwsh)[0-9.]*$")
_CODE_FLAGS = frozenset(("-c", "-e", "-E", "-r", "--eval", "-Command"))


def script_positions(argv):
    """Indexes of the argv elements a shell runs as code: the one after a
    `-c` option cluster (`-c`, `-ec`, `-lc` ...) that follows a shell."""
    positions, in_shell = set(), False
    for i, arg in enumerate(argv):
        if os.path.basename(arg) in SHELLS:
            in_shell = True
        elif in_shell and re.fullmatch(r"-[a-zA-Z]*c[a-zA-Z]*", arg) and i + 1 < len(argv):
            positions.add(i + 1)
            in_shell = False
    return positions


def shell_template(script, fields):
    """A shell script with each {{field}} replaced by a reference to its
    SSHLOG_ variable, written for the quoting it appears in: unquoted
    `"$V"`, inside "..." `""$V""`, inside '...' `'"$V"'`.  The value itself
    never enters the script, so the shell cannot parse it as code; a wrong
    guess about the quoting could only change word splitting."""
    out, quote, i = [], None, 0
    while i < len(script):
        m = _TEMPLATE.match(script, i)
        if m and m.group(1) in fields:
            ref = '"$%s"' % environment_name(m.group(1))
            out.append({None: ref, '"': '"%s"' % ref, "'": "'%s'" % ref}[quote])
            i = m.end()
            continue
        c = script[i]
        if c == "\\" and quote != "'":
            out.append(script[i:i + 2])
            i += 2
            continue
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        out.append(c)
        i += 1
    return "".join(out)


def environment_name(field):
    return "SSHLOG_" + re.sub(r"[^A-Z0-9_]", "_", field.upper())


EXEC_STRING_MAX = 100000          # bytes; Linux refuses one argv/env string over 128 KiB


def exec_string(text):
    """Text fit for argv or the environment: NUL (which neither can hold)
    shown as \\x00, cut at EXEC_STRING_MAX bytes (a big terminal_update)."""
    text = text.replace("\0", "\\x00")
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > EXEC_STRING_MAX:
        text = data[:EXEC_STRING_MAX].decode("utf-8", "ignore") + "...[truncated]"
    return text


def event_environment(fields):
    """SSHLOG_<FIELD> variables for every field of an event, plus
    SSHLOG_EVENT_JSON with the whole event."""
    env = {environment_name(k): exec_string(field_text(v)) for k, v in fields.items()}
    env["SSHLOG_EVENT_JSON"] = exec_string(json.dumps(fields, ensure_ascii=False))
    return env


@register_action("run_command_action", "run a program for each event: argv as a list, no "
                 "shell; {{field}}s inside args; fields also in SSHLOG_<FIELD> variables")
class RunCommand(Action):
    PARAMS = (Param("command", "str", help="program to run (absolute path or found in PATH); "
                    "not templated"),
              Param("args", "strlist", [], "its arguments; {{field}}s are replaced inside each "
                    "argument; in a shell's -c script they become references to "
                    "$SSHLOG_FIELD"),
              Param("timeout", "number", 60, "seconds before the program (its process group) "
                    "is killed"))

    @classmethod
    def check(cls, params):
        problems = _positive(params, "timeout")
        argv = [params["command"]] + params["args"]
        for i, arg in enumerate(argv[:-1]):
            if _CODE_INTERPRETER.match(os.path.basename(arg)) and \
                    any(a in _CODE_FLAGS and _TEMPLATE.search(argv[j + 1])
                        for j, a in enumerate(argv[i + 1:-1], i + 1)):
                problems.append("args: a {{field}} inside %s code could run what a user typed; "
                                "read the SSHLOG_<FIELD> environment variables instead"
                                % os.path.basename(arg))
        return problems

    def argv(self, fields):
        """The command line for an event: each {{field}} becomes the field's
        text inside its argument, except in a shell script, where it becomes a
        quoted reference to its environment variable, so no value is ever
        parsed as shell code."""
        argv = [self.params["command"]] + list(self.params["args"])
        scripts = script_positions(argv)
        out = [argv[0]]
        for i, arg in enumerate(argv[1:], 1):
            if i in scripts:
                arg = shell_template(arg, fields)
            else:
                arg = render(arg, fields)
            out.append(exec_string(arg))
        return out

    def handle(self, event):
        import subprocess
        import tempfile
        fields = event.to_dict()
        argv = self.argv(fields)
        env = dict(os.environ)
        env.update(event_environment(fields))
        alog = logging.getLogger("sshlog.action")
        with tempfile.TemporaryFile() as output:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                        stderr=subprocess.STDOUT, env=env, cwd="/",
                                        close_fds=True, start_new_session=True)
            except OSError as e:
                raise DeliveryError("cannot run %s: %s" % (argv[0], e.strerror or e),
                                    retry=False)
            try:
                status = proc.wait(self.params["timeout"])
            except subprocess.TimeoutExpired:
                status = None
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            output.seek(0)
            said = printable(decode_bytes(output.read(400)).strip())
        if status is None:
            how = "ran longer than %ss and was killed" % self.params["timeout"]
        elif status < 0:
            how = "was killed by %s" % signal_name(-status)
        else:
            how = "exited with status %d" % status
        if status == 0:
            alog.info("action %s: %s %s", self.name, argv[0], how)
            return
        alog.warning("action %s: %s %s%s", self.name, argv[0], how, ": " + said if said else "")
        raise DeliveryError("%s %s" % (argv[0], how), retry=False, logged=True)


###############################################################################
# Plugin loader ###############################################################
###############################################################################
# A plugin is a Python file that imports sshlog and registers filters and
# actions with the decorators the built-ins use (register_filter,
# register_action), into the same registries, with the same schemas: the
# configuration validator treats them exactly like built-ins.  It declares
# SSHLOG_PLUGIN_API = "1.0" (same major, minor <= ours).  A plugin that fails
# to import, declares no or another API, or registers something invalid is
# reported in one line naming the file, its registrations are undone, and the
# rest keeps working.

PLUGIN_DIR = os.path.join(CONF_DIR, "plugins")
PLUGIN_API = "1.0"
PLUGIN_SOURCES = {}               # ("filter" | "action", name) -> plugin file


def plugin_dirs(config_dir=None, extra=()):
    """The plugins directory of the configuration in use (`<config-dir>/
    plugins`, else PLUGIN_DIR), then each --plugin-dir."""
    base = os.path.join(config_dir, "plugins") if config_dir else PLUGIN_DIR
    return [base] + [d for d in (extra or ()) if d != base]


def plugin_files(dirs):
    files = []
    for d in dirs:
        if os.path.isdir(d):
            files += [os.path.join(d, n) for n in sorted(os.listdir(d))
                      if n.endswith(".py") and not n.startswith(("_", "."))]
    return files


def load_plugins(dirs):
    """Import the plugins of `dirs` (sorted file names, directories in
    order).  Returns (files loaded, problems); each problem is one line."""
    # a plugin's `import sshlog` must find this module, also when it runs as
    # __main__ (python3 sshlog.py), or it would register into a second copy
    sys.modules.setdefault("sshlog", sys.modules[__name__])
    loaded, problems = [], []
    for path in plugin_files(dirs):
        problem = load_plugin(path)
        if problem:
            problems.append("plugin %s skipped: %s" % (path, problem))
        else:
            loaded.append(path)
    return loaded, problems


def load_plugin(path):
    """Import one plugin file; None when it is in, else what is wrong."""
    import importlib.util
    import traceback
    saved = dict(FILTERS), dict(ACTIONS)
    modname = "sshlog_plugin_" + re.sub(r"\W", "_", os.path.basename(path)[:-3])
    try:
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        spec.loader.exec_module(module)
        problem = _plugin_api_problem(getattr(module, "SSHLOG_PLUGIN_API", None)) or \
            _registration_problem(saved, path)
    except SyntaxError as e:
        problem = "SyntaxError: %s (line %s)" % (e.msg, e.lineno)
    except (Exception, SystemExit) as e:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == os.path.abspath(path)]
        problem = "%s: %s%s" % (type(e).__name__, e, " (line %d)" % lines[-1] if lines else "")
    if problem:
        FILTERS.clear()
        FILTERS.update(saved[0])
        ACTIONS.clear()
        ACTIONS.update(saved[1])
        sys.modules.pop(modname, None)
        return problem
    for kind, registry, before in (("filter", FILTERS, saved[0]), ("action", ACTIONS, saved[1])):
        for name, cls in registry.items():
            if before.get(name) is not cls:
                PLUGIN_SOURCES[(kind, name)] = path
    return None


def _plugin_api_problem(api):
    if api is None:
        return "it does not declare SSHLOG_PLUGIN_API (this sshlog offers %r)" % PLUGIN_API
    m = re.fullmatch(r"(\d+)\.(\d+)", str(api))
    mine = [int(x) for x in PLUGIN_API.split(".")]
    if not m or int(m.group(1)) != mine[0] or int(m.group(2)) > mine[1]:
        return "it needs plugin API %r, this sshlog offers %r" % (api, PLUGIN_API)
    return None


def _registration_problem(saved, path):
    """What is wrong with the filters and actions a plugin registered."""
    for kind, registry, before in (("filter", FILTERS, saved[0]), ("action", ACTIONS, saved[1])):
        for name, cls in registry.items():
            if before.get(name) is cls:
                continue
            if name in before and PLUGIN_SOURCES.get((kind, name)) != path:
                return "it redefines the %s %r" % (kind, name)
            problem = (_filter_problem if kind == "filter" else _action_problem)(name, cls)
            if problem:
                return "%s %r: %s" % (kind, name, problem)
    return None


def _filter_problem(name, cls):
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        return "not a subclass of sshlog.Filter"
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or \
            name.startswith("not_"):
        return "a filter name is lower_case and does not start with not_"
    if cls.kind not in _KIND_WORDS:
        return "unknown value kind %r (one of %s)" % (cls.kind, ", ".join(_KIND_WORDS))
    unknown = [t for t in cls.triggers if t not in EVENT_TYPES]
    if not cls.triggers or unknown:
        return "triggers must be a list of event types (unknown: %s)" % ", ".join(
            map(repr, unknown or ["none given"]))
    return None


def _action_problem(name, cls):
    if not (isinstance(cls, type) and issubclass(cls, Action)):
        return "not a subclass of sshlog.Action"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        return "an action plugin name is letters, digits and _"
    if not isinstance(cls.PARAMS, (tuple, list)):
        return "PARAMS must be a tuple of sshlog.Param"
    seen = set()
    for p in cls.PARAMS:
        if not isinstance(p, Param):
            return "PARAMS must hold sshlog.Param, not %r" % (p,)
        if p.name in seen or p.name in ("action", "plugin") or \
                not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p.name):
            return "parameter %r: duplicate or reserved name" % p.name
        seen.add(p.name)
        if p.kind not in _KIND_WORDS:
            return "parameter %r: unknown kind %r (one of %s)" % (
                p.name, p.kind, ", ".join(_KIND_WORDS))
        if p.default is not REQUIRED and p.default is not None:
            try:
                coerce(p.kind, p.default)
            except ValueError as e:
                return "parameter %r: default %s" % (p.name, e)
    return None


# -- the configuration reference (`check-config --explain`, README) --

TRIGGER_HELP = {
    "connection_established": "a user has logged in (password, key, keyboard-interactive)",
    "connection_auth_failed": "a login attempt failed (wrong password or key, unknown user)",
    "connection_close": "a logged-in connection ended",
    "command_start": "a program started in a session (every exec, with its argv)",
    "command_finish": "that program ended (exit code or signal, first output bytes)",
    "file_upload": "a file was written by scp or sftp",
    "terminal_update": "the session's terminal showed output",
    "terminal_input": "keystrokes sent to the session (only with a sessionlog_action that has "
                      "capture_input; never while the terminal has ECHO off)",
    "terminal_resize": "the client's window changed size",
    "session_attach": "an admin attached to, detached from, typed into or killed a session "
                      "(`action`, `admin_uid`)",
}
_KIND_SHORT = {"str": "string", "int": "integer", "float": "number", "number": "number",
               "bool": "boolean", "strlist": "list of strings",
               "str_or_list": "string or list of strings", "regex": "regular expression",
               "any": "any"}


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default_text(value):
    if value is REQUIRED:
        return "**required**"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`%s`" % ("true" if value else "false")
    if isinstance(value, str):
        return "`%s`" % json.dumps(value)
    return "`%s`" % json.dumps(value, separators=(", ", ": "))


def config_reference(include_plugins=False):
    """Every trigger, filter and action with its parameters and defaults, as
    Markdown, from the registries and schemas the validator uses."""
    def shown(kind, name):
        return include_plugins or (kind, name) not in PLUGIN_SOURCES

    def origin(kind, name):
        src = PLUGIN_SOURCES.get((kind, name))
        return " (plugin %s)" % src if src else ""

    out = ["### Triggers", "", "| trigger | when |", "|---|---|"]
    for name, cls in EVENT_TYPES.items():
        out.append("| `%s` | %s |" % (name, _cell(TRIGGER_HELP.get(name) or
                                                   getattr(cls, "help", "") or "")))
    out += ["", "### Filters", "",
            "All filters of an event must match.  Each filter also exists with a `not_` prefix "
            "(`not_username: root`), which matches when the filter does not.  A filter only "
            "looks at the triggers it applies to; on other triggers of the same event it is "
            "not consulted.", "",
            "| filter | value | applies to | matches when |", "|---|---|---|---|"]
    for name in sorted(FILTERS):
        cls = FILTERS[name]
        if not shown("filter", name):
            continue
        applies = "all" if cls.triggers >= frozenset(EVENT_TYPES) else \
            ", ".join(t for t in EVENT_TYPES if t in cls.triggers)
        out.append("| `%s`%s | %s | %s | %s |" % (name, _cell(origin("filter", name)),
                                                  _KIND_SHORT.get(cls.kind, cls.kind), applies,
                                                  _cell(cls.help)))
    out += ["", "### Actions", "",
            "`plugin:` names the action type; the other keys are its parameters.  "
            "`{{field}}` in a template is replaced by that event field (see the event "
            "format).", ""]
    for name in sorted(ACTIONS):
        cls = ACTIONS[name]
        if not shown("action", name):
            continue
        out += ["#### `%s`%s" % (name, _cell(origin("action", name))), "",
                (cls.help or "").strip().rstrip(".") + ".", ""]
        if cls.PARAMS:
            out += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
            out += ["| `%s` | %s | %s | %s |" % (p.name, _KIND_SHORT.get(p.kind, p.kind),
                                                 _default_text(p.default), _cell(p.help))
                    for p in cls.PARAMS]
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


###############################################################################
# Pipeline / dispatcher #######################################################
###############################################################################

class Pipeline:
    """Routes events to the rules whose triggers name them, runs filters, and
    hands matches to the action runners."""

    def __init__(self, config):
        self.config = config
        self.runners = {}
        for name, (plugin, params, src) in config.actions.items():
            try:
                self.runners[name] = ActionRunner(ACTIONS[plugin](name, dict(params)))
            except Exception as e:          # unwritable log directory, unreadable CA file ...
                self.stop(timeout=1)
                raise SshlogError("action %s (%s, %s) cannot start: %s" % (
                    name, plugin, src, e)) from e
        # event type -> [(the rule's filters that judge this type, its actions)]
        self.routes = collections.defaultdict(list)
        for rule in config.rules:
            for t in rule.triggers:
                self.routes[t].append((tuple(f for f in rule.filters if t in f.triggers),
                                       rule.actions))
        self.filter_errors = 0
        self._reported = set()

    @property
    def wanted(self):
        return set(self.routes)

    def dispatch(self, event):
        self.dispatch_many((event,))

    def dispatch_many(self, events):
        """Route a drain tick's events: each action gets its share in one hand-over."""
        shares = collections.defaultdict(list)
        routes, passes = self.routes, self._passes
        for event in events:
            for filters, actions in routes.get(event.type, ()):
                if not filters or all(passes(f, event) for f in filters):
                    for name in actions:
                        shares[name].append(event)
        for name, share in shares.items():
            self.runners[name].submit_many(share)

    def _passes(self, flt, event):
        try:
            result = flt.match(event)
            if isinstance(result, bool):
                return result
            problem = "returned %r, not a bool" % (result,)
        except Exception as e:
            problem = "raised %s: %s" % (type(e).__name__, e)
        self.filter_errors += 1
        if flt.name not in self._reported:
            self._reported.add(flt.name)
            log.error("filter %s %s; counting it as no match", flt.name, problem)
        return False

    def stop(self, timeout=5.0):
        """Stop every action in parallel, all within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for runner in self.runners.values():
            runner.begin_stop()
        for runner in self.runners.values():
            runner.finish_stop(deadline)

    def stats(self):
        return {name: r.stats() for name, r in self.runners.items()}


###############################################################################
# Daemon & socket API #########################################################
###############################################################################
# Protocol: the client sends one JSON object on a line ({"cmd": "sessions"});
# the daemon answers with JSON lines ({"ok": true, "data": ...}); `watch`
# keeps streaming {"event": {...}, "text": "..."} lines until the client goes.

class Watcher:
    """One `watch` client: a bounded queue the capture thread never waits on."""

    def __init__(self, types):
        self.types = frozenset(types)
        self.queue = queue.Queue(10000)
        self.dropped = 0

    def offer(self, event):
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1


def peer_allowed(sock, group=SOCKET_GROUP, proc=PROC):
    """Root, or a member of the `sshlog` group (SO_PEERCRED, then the peer's
    supplementary groups from /proc)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    if uid == 0:
        return True
    try:
        allowed = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    if gid == allowed:
        return True
    for line in (read_text("%s/%d/status" % (proc, pid)) or "").splitlines():
        if line.startswith("Groups:"):
            return str(allowed) in line.split()[1:]
    return False


def peer_creds(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


# -- attach: the screen at once, then the live stream --
#
# The daemon keeps the last ATTACH_TAIL bytes of each live session's output.
# Only when someone attaches (or a watcher fell behind) is that tail rendered
# through pyte into the current screen; nobody pays for terminal emulation
# while no one is attached.  Messages to the client (JSON lines): the reply
# {"ok": true, "data": {... "screen": b64}}, then {"o": b64} output,
# {"r": [rows, cols]} session resizes, {"screen": b64, "rows", "cols"} a
# fresh screen (after a redraw request or when the client fell behind),
# {"notice": text}, {"end": reason}.  From the client: {"i": b64} input,
# {"redraw": true}, {"detach": true}.

ATTACH_TAIL = 256 * 1024
ATTACH_CLIENT_BYTES = 1 << 20     # output queued for a slow watcher before it gets a fresh screen
ATTACH_INPUT_LOG = 4096           # characters of injected input kept in the audit event

_PYTE_COLORS = {name: i for i, name in enumerate(
    ("black", "red", "green", "brown", "blue", "magenta", "cyan", "white"))}


def _sgr_color(name, base):
    """SGR parameters for a pyte colour (a name or "rrggbb"); base 30 or 40."""
    if name == "default":
        return ""
    bright = name.startswith("bright")
    idx = _PYTE_COLORS.get(name[6:] if bright else name)
    if idx is not None:
        return ";%d" % (base + 60 + idx if bright else base + idx)
    if len(name) == 6:
        try:
            r, g, b = bytes.fromhex(name)
            return ";%d;2;%d;%d;%d" % (base + 8, r, g, b)
        except ValueError:
            pass
    return ""


def _sgr(ch):
    return "\x1b[0%s%s%s%s%s%s%sm" % (
        ";1" if ch.bold else "", ";3" if ch.italics else "", ";4" if ch.underscore else "",
        ";5" if ch.blink else "", ";7" if ch.reverse else "",
        _sgr_color(ch.fg, 30), _sgr_color(ch.bg, 40))


def screen_lines(screen, top=0, left=0, rows=None, cols=None, buffer=None):
    """ANSI text of each line of a pyte screen's viewport (no positioning):
    characters with their colours and attributes, trailing blanks dropped.
    `buffer`: another set of lines of that screen (the saved main screen)."""
    rows = screen.lines if rows is None else rows
    cols = screen.columns if cols is None else cols
    buffer = screen.buffer if buffer is None else buffer
    default = _sgr(screen.default_char)
    blank = {}
    out = []
    for y in range(top, min(top + rows, screen.lines)):
        line = buffer.get(y, blank)
        if line is blank:
            out.append("")
            continue
        end = min(left + cols, screen.columns)
        while end > left and line[end - 1].data in (" ", "") and \
                _sgr(line[end - 1]) == default:
            end -= 1
        parts, cur = [], default
        for x in range(left, end):
            ch = line[x]
            sgr = _sgr(ch)
            if sgr != cur:
                parts.append(sgr)
                cur = sgr
            parts.append(ch.data)
        if cur != default:
            parts.append("\x1b[0m")
        out.append("".join(parts))
    return out


_pyte_classes = {}


def pyte_screen(cols, rows):
    """A pyte Screen that also keeps xterm's alternate screen (modes 47, 1047,
    1049: vim, less, top): entering saves the main screen and clears,
    leaving brings it back, as the session's own terminal does.
    `saved` holds (main lines, cursor x, y) while the alternate one is up."""
    import pyte
    from pyte.screens import StaticDefaultDict
    cls = _pyte_classes.get("screen")
    if cls is None:
        alt = frozenset(m << 5 for m in (47, 1047, 1049))

        class AltScreen(pyte.Screen):
            saved = None

            def set_mode(self, *modes, **kwargs):
                if kwargs.get("private") and alt & {m << 5 for m in modes}:
                    if self.saved is None:
                        lines = {}
                        for y, line in self.buffer.items():
                            lines[y] = StaticDefaultDict(line.default)
                            lines[y].update(line)
                        self.saved = (lines, self.cursor.x, self.cursor.y)
                        self.buffer.clear()
                        self.dirty.update(range(self.lines))
                    modes = [m for m in modes if m << 5 not in alt]
                super().set_mode(*modes, **kwargs)

            def reset_mode(self, *modes, **kwargs):
                if kwargs.get("private") and alt & {m << 5 for m in modes}:
                    if self.saved is not None:
                        lines, x, y = self.saved
                        self.saved = None
                        self.buffer.clear()
                        self.buffer.update((k, v) for k, v in lines.items() if k < self.lines)
                        self.cursor.x, self.cursor.y = min(x, self.columns - 1), \
                            min(y, self.lines - 1)
                        self.dirty.update(range(self.lines))
                    modes = [m for m in modes if m << 5 not in alt]
                super().reset_mode(*modes, **kwargs)

            def reset(self):
                self.saved = None
                super().reset()
        cls = _pyte_classes["screen"] = AltScreen
    return cls(max(cols, 1), max(rows, 1))


_tolerant_streams = {}
# CSI sequences with a `<`, `=` or `>` marker (xterm's modifyOtherKeys `CSI > 4;2 m`,
# secondary device attributes): pyte 0.8 skips the marker and would run them as the
# plain sequence (underline everything)
_MARKED_CSI = {False: re.compile("\x1b\\[[<=>][0-?]*[ -/]*[@-~]"),
               True: re.compile(b"\x1b\\[[<=>][0-?]*[ -/]*[@-~]")}


def pyte_stream(screen, byte=False):
    """A pyte stream (ByteStream for bytes) feeding `screen` that survives
    what pyte 0.8 gets wrong: sequences with a `<=>` marker are dropped
    before it sees them, and a handler that raises (`CSI ? 4 m` reaches
    select_graphic_rendition with private=True, a TypeError) only loses
    that sequence (pyte has reset its parser already)."""
    import pyte
    if byte not in _tolerant_streams:
        marked = _MARKED_CSI[byte]

        class Tolerant(pyte.ByteStream if byte else pyte.Stream):
            def feed(self, data):
                super().feed(marked.sub(data[:0], data))

            def _send_to_parser(self, data):
                try:
                    return super()._send_to_parser(data)
                except Exception:
                    return self._taking_plain_text
        _tolerant_streams[byte] = Tolerant
    return _tolerant_streams[byte](screen)


def render_screen(data, rows, cols):
    """The screen `data` (a session's recent output) leaves on a terminal of
    rows x cols, as ANSI text that redraws it on a terminal of that size:
    clear, every line, then the cursor where the session has it."""
    screen = pyte_screen(cols, rows)        # pyte: vendored, imported only now
    stream = pyte_stream(screen, byte=True)
    stream.feed(data)
    out = ["\x1b[0m\x1b[H\x1b[2J"]
    if screen.saved is not None:      # a full-screen program is up: the main screen first
        lines, x, y = screen.saved
        for n, line in enumerate(screen_lines(screen, buffer=lines)):
            if line:
                out.append("\x1b[%d;1H%s" % (n + 1, line))
        out.append("\x1b[%d;%dH\x1b[?1049h\x1b[H\x1b[2J" % (y + 1, x + 1))
    for y, line in enumerate(screen_lines(screen)):
        if line:
            out.append("\x1b[%d;1H%s" % (y + 1, line))
    out.append("\x1b[%d;%dH" % (screen.cursor.y + 1, screen.cursor.x + 1))
    if screen.cursor.hidden:
        out.append("\x1b[?25l")
    return "".join(out)


class OutputTail:
    """The last ATTACH_TAIL bytes of a session's output, as whole chunks."""

    def __init__(self, cap=ATTACH_TAIL):
        self.cap = cap
        self.chunks = collections.deque()
        self.size = 0
        self.cut = False

    def add(self, data):
        self.chunks.append(data)
        self.size += len(data)
        while self.size - len(self.chunks[0]) >= self.cap:
            self.size -= len(self.chunks.popleft())
            self.cut = True

    def snapshot(self):
        data = b"".join(self.chunks)
        if self.cut:              # start at a line, not inside a sequence or a character
            nl = data.find(b"\n")
            data = data[nl + 1:] if 0 <= nl < len(data) // 2 else data
        return data


class AttachClient:
    """What goes to one attached watcher: a bounded queue filled by the
    capture thread (never blocking it); past ATTACH_CLIENT_BYTES of output
    the queue is dropped and the watcher gets a fresh screen instead."""

    def __init__(self, limit=ATTACH_CLIENT_BYTES):
        self.cond = threading.Condition()
        self.items = collections.deque()
        self.bytes = 0
        self.limit = limit
        self.resync = False
        self.done = False

    def put(self, item):
        with self.cond:
            if item[0] == "o":
                if self.resync:
                    return
                if self.bytes + len(item[1]) > self.limit:
                    self.resync = True
                    self.items = collections.deque(i for i in self.items if i[0] != "o")
                    self.bytes = 0
                    self.cond.notify()
                    return
                self.bytes += len(item[1])
            self.items.append(item)
            self.cond.notify()

    def take(self, timeout):
        """Queued items (output coalesced into one), or [] after `timeout`."""
        with self.cond:
            if not self.items and not self.resync and not self.done:
                self.cond.wait(timeout)
            items, self.items, self.bytes = list(self.items), collections.deque(), 0
            return items

    def finish(self):
        with self.cond:
            self.done = True
            self.cond.notify()


class AttachHub:
    """Tails of live sessions and the watchers attached to them.  on_event
    runs on the capture thread; the rest on API threads."""

    def __init__(self, tail=ATTACH_TAIL):
        self.tail_cap = tail
        self.lock = threading.Lock()
        self.tails = {}               # ptm_pid -> OutputTail
        self.sizes = {}               # ptm_pid -> (rows, cols)
        self.clients = {}             # ptm_pid -> [AttachClient]

    def on_event(self, ev):
        t = ev.type
        if t == "terminal_update":
            if not ev.raw:
                return
            with self.lock:
                tail = self.tails.get(ev.ptm_pid)
                if tail is None:
                    tail = self.tails[ev.ptm_pid] = OutputTail(self.tail_cap)
                tail.add(ev.raw)
                for c in self.clients.get(ev.ptm_pid, ()):
                    c.put(("o", ev.raw))
        elif t == "terminal_resize" or (t == "connection_established" and ev.rows):
            with self.lock:
                self.sizes[ev.ptm_pid] = (ev.rows, ev.cols)
                if t == "terminal_resize":
                    for c in self.clients.get(ev.ptm_pid, ()):
                        c.put(("r", ev.rows, ev.cols))
        elif t == "connection_close":
            with self.lock:
                self.tails.pop(ev.ptm_pid, None)
                self.sizes.pop(ev.ptm_pid, None)
                for c in self.clients.pop(ev.ptm_pid, ()):
                    c.put(("end", "the session ended"))

    def subscribe(self, ptm, client, rows, cols):
        """Register `client` and return (output so far, rows, cols), taken
        together so that no byte is missed or shown twice."""
        with self.lock:
            self.clients.setdefault(ptm, []).append(client)
            return self._snapshot(ptm, rows, cols)

    def _snapshot(self, ptm, rows, cols):
        tail = self.tails.get(ptm)
        rows, cols = self.sizes.get(ptm, (rows, cols))
        return (tail.snapshot() if tail else b""), rows or 24, cols or 80

    def resync(self, ptm, client, rows, cols):
        """A fresh snapshot for a client that fell behind or asked to redraw:
        queued output is in the snapshot already and is dropped."""
        with self.lock:
            with client.cond:
                client.items = collections.deque(i for i in client.items if i[0] == "end")
                client.bytes = 0
                client.resync = False
            return self._snapshot(ptm, rows, cols)

    def count(self):
        with self.lock:
            return sum(len(c) for c in self.clients.values())

    def unsubscribe(self, ptm, client):
        with self.lock:
            left = [c for c in self.clients.get(ptm, ()) if c is not client]
            if left:
                self.clients[ptm] = left
            else:
                self.clients.pop(ptm, None)

    def close(self):
        with self.lock:
            for clients in self.clients.values():
                for c in clients:
                    c.put(("end", "the sshlog daemon is stopping"))
            self.clients.clear()


# -- the session's pty master, from outside: input and kill --

TIOCSTI = 0x5412


def proc_tty_nr(pid, proc=PROC):
    """Controlling tty of `pid` as N of /dev/pts/N, or -1."""
    text = read_text("%s/%d/stat" % (proc, pid))
    try:
        nr = int(text[text.rindex(")") + 2:].split()[4])
    except (AttributeError, ValueError, IndexError):
        return -1
    major, minor = (nr >> 8) & 0xFFF, (nr & 0xFF) | ((nr >> 12) & 0xFFF00)
    return (major - 136) * 256 + minor if 136 <= major <= 143 else -1


def in_session(pid, s, proc=PROC):
    """True when process `pid` runs inside session `s`: a descendant of its
    sshd, or with its terminal as controlling tty."""
    if s.tty >= 0 and proc_tty_nr(pid, proc) == s.tty:
        return True
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == s.ptm_pid:
            return True
        pid = proc_ppid_comm(pid, proc)[0] or 0
        seen += 1
    return False


def session_sshd_children(s, proc=PROC):
    """Live sshd processes whose parent is the session's monitor."""
    found = []
    for name in os.listdir(proc):
        if name.isdigit():
            ppid, comm = proc_ppid_comm(int(name), proc)
            if ppid == s.ptm_pid and comm and comm.startswith("sshd"):
                found.append(int(name))
    return sorted(found)


def find_pty_master(s, proc=PROC):
    """(pid, fd) of a pty master of session `s` held by its sshd: the fd the
    post-auth sshd reads (known from the capture), else any sshd of the
    session whose fdinfo says `tty-index: N`.  None when there is none."""
    candidates = []
    if s.tty_pid > 1 and s.tty_fd >= 0:
        candidates.append((s.tty_pid, [str(s.tty_fd)]))
    for pid in session_sshd_children(s, proc) + [s.ptm_pid]:
        try:
            candidates.append((pid, os.listdir("%s/%d/fdinfo" % (proc, pid))))
        except OSError:
            continue
    for pid, fds in candidates:
        ppid, comm = proc_ppid_comm(pid, proc)
        if not comm or not comm.startswith("sshd") or (pid != s.ptm_pid and ppid != s.ptm_pid):
            continue
        for fd in fds:
            info = read_text("%s/%d/fdinfo/%s" % (proc, pid, fd), "")
            m = re.search(r"^tty-index:\s*(\d+)", info, re.M)
            if m and int(m.group(1)) == s.tty:
                return pid, int(fd)
    return None


class SessionInput:
    """Typing into a session as if at its keyboard: writes to the pty master
    sshd holds (a copy of its fd through pidfd_getfd), so any byte, UTF-8
    included, arrives whole and the tty's own echo shows it; TIOCSTI on the
    slave, one byte at a time, only when that is impossible."""

    WRITE_WAIT = 5.0              # seconds a full pty input queue may hold us

    def __init__(self, s, proc=PROC, dev=DEV_PTS):
        self.s, self.proc, self.dev = s, proc, dev
        self.fd = None
        self.how = None

    def open(self):
        if self.fd is not None:
            return
        found = find_pty_master(self.s, self.proc)
        if found:
            try:
                self.fd, self.how = pidfd_getfd(*found), "pty master of sshd %d" % found[0]
                return
            except OSError as e:
                log.warning("attach: %s; falling back to TIOCSTI", e)
        self.fd = os.open("%s/%d" % (self.dev, self.s.tty),
                          os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.how = "TIOCSTI"

    def secret_prompt(self):
        """Whether the session's terminal is at a password-style prompt: ECHO
        off in canonical mode (sudo, su, passwd, read -s).  Line editors
        (readline) and full-screen programs turn ECHO off too, but also
        ICANON, and echo what is typed themselves.  TCGETS on a pty master
        reports the slave's settings."""
        import termios
        try:
            lflag = termios.tcgetattr(self.fd)[3]
        except (termios.error, OSError, TypeError):
            return True
        return not lflag & termios.ECHO and bool(lflag & termios.ICANON)

    def write(self, data):
        self.open()
        if self.how == "TIOCSTI":
            for i in range(len(data)):
                fcntl.ioctl(self.fd, TIOCSTI, data[i:i + 1])
            return
        # the master is sshd's, non-blocking: wait while the pty's input queue is full
        deadline = time.monotonic() + self.WRITE_WAIT
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EAGAIN, "the session does not read its input")
                select.select([], [self.fd], [], 0.1)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def proc_alive(pid, proc=PROC):
    """True while `pid` exists and is not a zombie."""
    text = read_text("%s/%d/stat" % (proc, pid))
    try:
        return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")
    except (AttributeError, ValueError, IndexError):
        return False


def kill_session(s, tracker, proc=PROC, wait=3.0, before=None):
    """End session `s`: SIGTERM to its post-auth sshd (the connection then
    closes and the shell gets SIGHUP from its terminal), then to the
    monitor if it is still there.  Every pid is checked first (> 1, an sshd,
    the monitor's start time matches the session id, the child's parent is
    the monitor): an unknown pid is never signalled.  `before()` runs once
    the checks pass, before any signal.  Returns what was done."""
    ptm = s.ptm_pid
    if ptm <= 1 or tracker.session_id(ptm, -1) != s.session_id or \
            not (proc_ppid_comm(ptm, proc)[1] or "").startswith("sshd"):
        raise SshlogError("session %s: its sshd (pid %d) cannot be verified; nothing signalled"
                          % (s.session_id, ptm))
    children = [pid for pid in session_sshd_children(s, proc) if pid > 1]
    if before is not None:
        before("SIGTERM to sshd %s" % ", ".join(map(str, children or [ptm])))
    done = []
    for pid in children:
        os.kill(pid, signal.SIGTERM)
        done.append("SIGTERM to sshd %d" % pid)
    deadline = time.monotonic() + (wait if done else 0)
    while time.monotonic() < deadline and proc_alive(ptm, proc):
        time.sleep(0.05)
    if proc_alive(ptm, proc) and tracker.session_id(ptm, -1) == s.session_id:
        os.kill(ptm, signal.SIGTERM)
        done.append("SIGTERM to the monitor %d" % ptm)
    return done


class ApiHandler(socketserver.StreamRequestHandler):
    def handle(self):
        daemon = self.server.daemon_ref
        try:
            line = self.rfile.readline(65536)   # read first: the client then sees our answer
            if not peer_allowed(self.connection):
                self._send({"ok": False, "error": "permission denied: root or group %s only"
                            % SOCKET_GROUP})
                return
            try:
                req = json.loads(line)
                cmd = req["cmd"]
            except (ValueError, KeyError, TypeError):
                self._send({"ok": False, "error": "bad request"})
                return
            if cmd == "sessions":
                self._send({"ok": True, "data": {"sessions": daemon.tracker.sessions()}})
            elif cmd == "status":
                self._send({"ok": True, "data": daemon.status()})
            elif cmd == "watch":
                types = req.get("types") or WATCH_DEFAULT_TYPES
                if not isinstance(types, (list, tuple)) or \
                        not all(isinstance(t, str) for t in types):
                    self._send({"ok": False, "error": "bad request: types must be a list of "
                                                      "event type names"})
                    return
                self._watch(daemon, [t for t in types if t in EVENT_TYPES])
            elif cmd == "attach":
                self._attach(daemon, req)
            elif cmd == "kill":
                self._kill(daemon, req)
            else:
                self._send({"ok": False, "error": "unknown command %r" % cmd})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, obj):
        self.wfile.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
        self.wfile.flush()

    def _watch(self, daemon, types):
        watcher = Watcher(types)
        daemon.add_watcher(watcher)
        try:
            self._send({"ok": True, "data": {"watching": sorted(watcher.types)}})
            reported = 0
            while not daemon.stopping.is_set():
                try:
                    ev = watcher.queue.get(timeout=0.5)
                except queue.Empty:
                    # find out whether the client has gone away
                    r, _, _ = select.select([self.connection], [], [], 0)
                    if r and not self.connection.recv(1, socket.MSG_PEEK):
                        break
                    continue
                msg = {"event": ev.to_dict(), "text": ev.text()}
                if watcher.dropped != reported:
                    msg["dropped"], reported = watcher.dropped, watcher.dropped
                self._send(msg)
        finally:
            daemon.remove_watcher(watcher)

    # -- attach and kill --

    def _session_for(self, daemon, req):
        try:
            tty = int(req.get("tty"))
        except (TypeError, ValueError):
            self._send({"ok": False, "error": "bad request: `tty` must be a number"})
            return None
        s = daemon.tracker.session_by_tty(tty)
        if s is None:
            self._send({"ok": False, "error": "no session on tty %d" % tty})
        return s

    def _audit(self, daemon, s, action, creds, **fields):
        pid, uid, _gid = creds
        daemon.audit(SessionAttach(action=action, admin_uid=uid, admin_pid=pid,
                                   admin_name=passwd_name(uid), **dict(
                                       daemon.tracker._base(s, time.time()), **fields)))

    def _kill(self, daemon, req):
        creds = peer_creds(self.connection)
        if creds[1] != 0:
            self._send({"ok": False, "error": "permission denied: only root may kill a session"})
            return
        s = self._session_for(daemon, req)
        if s is None:
            return
        try:
            done = kill_session(s, daemon.tracker, daemon.proc,
                                before=lambda what: self._audit(daemon, s, "kill", creds,
                                                                detail_text=what))
        except (SshlogError, OSError) as e:
            self._audit(daemon, s, "kill", creds, detail_text="failed: %s" % e)
            self._send({"ok": False, "error": "kill failed: %s" % e})
            return
        self._send({"ok": True, "data": {"tty": s.tty, "ptm_pid": s.ptm_pid,
                                         "username": s.username, "done": done}})

    def _attach(self, daemon, req):
        creds = peer_creds(self.connection)
        peer_pid, uid, _gid = creds
        s = self._session_for(daemon, req)
        if s is None:
            return
        if in_session(peer_pid, s, daemon.proc):
            self._send({"ok": False, "error": "refusing to attach to your own session "
                                              "(tty %d)" % s.tty})
            return
        why = None
        if not req.get("readonly"):
            if not daemon.inject:
                why = "the daemon runs without --enable-session-injection"
            elif uid != 0:
                why = "only root may type into a session"
        readonly = bool(req.get("readonly")) or why is not None
        hub, client, typing = daemon.attach_hub, AttachClient(), None
        # a session found in /proc at start-up has no size on record: ask its pty
        size = (s.rows, s.cols) if s.rows and s.cols else pty_window_size(s.tty)
        data, rows, cols = hub.subscribe(s.ptm_pid, client, *size)
        try:
            screen = render_screen(data, rows, cols)
            self._send({"ok": True, "data": {
                "tty": s.tty, "ptm_pid": s.ptm_pid, "session_id": s.session_id,
                "username": s.username, "client_ip": s.client_ip, "client_port": s.client_port,
                "rows": rows, "cols": cols, "readonly": readonly, "why_readonly": why,
                "screen": base64.b64encode(screen.encode()).decode()}})
            self._audit(daemon, s, "attach", creds, readonly=readonly)
            if not readonly:
                typing = SessionInput(s, daemon.proc)
            threading.Thread(target=self._attach_input, name="attach-input", daemon=True,
                             args=(daemon, s, client, typing, creds)).start()
            self._attach_output(daemon, s, client, rows, cols)
        finally:
            hub.unsubscribe(s.ptm_pid, client)
            client.finish()
            if typing is not None:
                typing.close()
            self._audit(daemon, s, "detach", creds, readonly=readonly)

    def _attach_output(self, daemon, s, client, rows, cols):
        while not daemon.stopping.is_set():
            items = client.take(0.5)
            out = []
            for item in items:
                if item[0] == "o":
                    out.append(item[1])
                    continue
                if out:
                    self._send({"o": base64.b64encode(b"".join(out)).decode()})
                    out = []
                if item[0] == "r":
                    rows, cols = item[1], item[2]
                    self._send({"r": [rows, cols]})
                elif item[0] == "notice":
                    self._send({"notice": item[1]})
                elif item[0] == "end":
                    self._send({"end": item[1]})
                    return
            if out:
                self._send({"o": base64.b64encode(b"".join(out)).decode()})
            if client.resync:
                data, rows, cols = daemon.attach_hub.resync(s.ptm_pid, client, rows, cols)
                self._send({"screen": base64.b64encode(render_screen(data, rows, cols)
                                                       .encode()).decode(),
                            "rows": rows, "cols": cols})
            if client.done:
                return
        self._send({"end": "the sshlog daemon is stopping"})

    def _attach_input(self, daemon, s, client, typing, creds):
        """The watcher's messages: keys to type, redraw, detach (or EOF)."""
        told = False
        try:
            while not client.done:
                line = self.rfile.readline(1 << 20)
                if not line:
                    break
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        continue
                    keys = base64.b64decode(msg["i"], validate=True) if "i" in msg else b""
                except (ValueError, TypeError, binascii.Error):
                    continue
                if msg.get("detach"):
                    break
                if msg.get("redraw"):
                    with client.cond:
                        client.resync = True
                        client.cond.notify()
                if not keys:
                    continue
                if typing is None:
                    if not told:
                        client.put(("notice", "read-only: what you type is not sent"))
                        told = True
                    continue
                try:
                    typing.open()
                    hidden = typing.secret_prompt()
                    typing.write(keys)
                except OSError as e:
                    client.put(("notice", "input not delivered: %s" % e))
                    continue
                self._audit(daemon, s, "input", creds, readonly=False, data_len=len(keys),
                            input_data="" if hidden else decode_bytes(keys)[:ATTACH_INPUT_LOG],
                            detail_text="via %s%s" % (typing.how, ", at a password prompt "
                                                      "(echo off): not logged" if hidden else ""))
        except (OSError, ValueError):
            pass
        finally:
            client.finish()


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def config_wants_input(config):
    """Whether a sessionlog action of `config` records keystrokes (which
    compiles the input capture into the BPF programs)."""
    return any(plugin == "sessionlog_action" and params.get("capture_input")
               for plugin, params, _src in config.actions.values())


class Daemon:
    """The capture loop: drain BPF records, decode, track, dispatch."""

    # Seconds between ring-buffer drains.  Every wake-up of the daemon's
    # threads takes a CPU that a busy session may want (an exec storm waits
    # ~15 us more per command at 0.02 s than at 0.1 s, measured as wall time
    # minus CPU time), and a bigger batch costs less per record (the daemon's
    # CPU per command, 0.1 s -> 0.25 s: -15 %); but output must reach live
    # viewers promptly, and a ring must not fill between two drains:
    # FAST_TICK while someone watches or attaches, or when the last drain
    # freed more than RING_PRESSURE of a ring (a flood, ~3 MB in 0.25 s of
    # the 8 MiB terminal ring, is above it; an exec storm's ~0.1 MB is far
    # below).
    TICK = 0.25
    FAST_TICK = 0.02
    RING_PRESSURE = 1 / 8

    def __init__(self, config_dir=None, socket_path=SOCKET_PATH, debug=False,
                 default_config_dir=CONF_DIR, proc=PROC, plugin_dirs=None,
                 argv_cap=ARGV_CAP, stdout_cap=STDOUT_CAP, inject=False):
        self.config_dir = config_dir
        self.inject = inject                # attach may type into sessions
        self.capture_input = False          # compiled in: a sessionlog action wants keystrokes
        self.attach_hub = AttachHub()
        self.api_events = collections.deque(maxlen=10000)   # audit events from API threads
        self.argv_cap, self.stdout_cap = argv_cap, stdout_cap
        self.plugin_dirs = plugin_dirs      # None: plugin_dirs(config_dir)
        self.default_config_dir = default_config_dir
        self.socket_path = socket_path
        self.debug = debug
        self.proc = proc
        self.stopping = threading.Event()
        self.reload_requested = False
        self.counts = collections.Counter()
        self.watchers = []
        self.watch_lock = threading.Lock()
        self.started = time.time()
        self.lock_file = None
        self.server = None
        self.probes = None
        self.pipeline = None
        self.tracker = Tracker(proc=proc, stdout_cap=stdout_cap)

    # -- set-up --

    def acquire_lock(self):
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        path = self.socket_path + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise SshlogError("another sshlog daemon (pid %s) is using %s"
                              % (other or "?", self.socket_path))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.lock_file = fd

    def start_api(self):
        if os.path.exists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                raise SshlogError("%s exists and is not a socket" % self.socket_path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                raise SshlogError("socket path %s is in use by another program"
                                  % self.socket_path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.socket_path)     # stale: nobody answers and we hold the lock
            finally:
                probe.close()
        old = os.umask(0o117)
        try:
            self.server = ApiServer(self.socket_path, ApiHandler)
        finally:
            os.umask(old)
        try:
            os.chown(self.socket_path, 0, grp.getgrnam(SOCKET_GROUP).gr_gid)
        except (KeyError, OSError):
            pass                            # no sshlog group: root only
        self.server.daemon_ref = self
        threading.Thread(target=self.server.serve_forever, name="api", daemon=True).start()

    def add_watcher(self, w):
        with self.watch_lock:
            self.watchers = self.watchers + [w]

    def remove_watcher(self, w):
        with self.watch_lock:
            self.watchers = [x for x in self.watchers if x is not w]

    def status(self):
        return {"version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "events": dict(self.counts),
                "bpf_drops": self.probes.drops() if self.probes else {},
                "bpf_rerouted": self.probes.rerouted() if self.probes else {},
                "bpf_merged": self.probes.merge_counts() if self.probes else {},
                "decode_errors": self.probes.decode_errors if self.probes else 0,
                "callback_errors": self.probes.callback_errors if self.probes else 0,
                "filter_errors": self.pipeline.filter_errors if self.pipeline else 0,
                "actions": self.pipeline.stats() if self.pipeline else {},
                "watchers": len(self.watchers),
                "watch_dropped": sum(w.dropped for w in self.watchers),
                "sessions": len(self.tracker.sessions()),
                "config_files": self.pipeline.config.files if self.pipeline else [],
                "terminal_lost_bytes": self.tracker.tty_lost_bytes,
                "attached": self.attach_hub.count(),
                "session_injection": self.inject, "input_capture": self.capture_input}

    # -- the loop --

    def run(self):
        if os.geteuid() != 0:
            raise SshlogError("the daemon needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")
        os.umask(0o077)
        self.acquire_lock()
        self.load_plugins()
        config = load_config(self.config_dir, self.default_config_dir)
        for w in config.warnings:
            log.warning("%s", w)
        self.capture_input = config_wants_input(config)
        plan = probe_plan(argv_cap=self.argv_cap, stdout_cap=self.stdout_cap,
                          capture_input=self.capture_input)
        self.probes = Probes(plan, debug=self.debug)
        self.pipeline = Pipeline(config)
        self.start_api()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, self._on_hup)
        found = self.tracker.discover(self.probes)
        log.info("sshlog %s watching (%d existing session(s), config: %s)", __version__,
                 len(found), ", ".join(config.files))
        for ev in found:
            self.publish(ev)
        try:
            self.loop()
        finally:
            self.shutdown()
        return 0

    def load_plugins(self):
        """Plugins register before the configuration that uses them is read;
        a broken one is reported and skipped."""
        dirs = self.plugin_dirs if self.plugin_dirs is not None else plugin_dirs(self.config_dir)
        loaded, problems = load_plugins(dirs)
        for problem in problems:
            log.error("%s", problem)
        if loaded:
            log.info("plugins loaded: %s", ", ".join(loaded))

    def _on_hup(self, *_):
        self.reload_requested = True

    def reload(self):
        self.reload_requested = False
        try:
            config = load_config(self.config_dir, self.default_config_dir)
            new = Pipeline(config)
        except ConfigError as e:
            for p in e.problems:
                log.error("reload refused: %s", p)
            return
        except Exception as e:              # includes an action that cannot start
            log.error("reload refused: %s", e)
            return
        if config_wants_input(config) != self.capture_input:
            log.warning("keystroke capture (sessionlog_action capture_input) is compiled into "
                        "the BPF programs at start: restart the daemon to turn it %s",
                        "off" if self.capture_input else "on")
        old, self.pipeline = self.pipeline, new
        # the old actions finish their queues aside: a slow sink never holds up capture
        threading.Thread(target=old.stop, name="old-pipeline", daemon=True).start()
        log.info("configuration reloaded: %s", ", ".join(config.files))

    def loop(self):
        handle = self.tracker.handle
        while not self.stopping.is_set():
            events = []
            while self.api_events:          # attach/kill audit events, before new records
                events.append(self.api_events.popleft())
            records = self.probes.drain()
            for rec in records:
                events.extend(handle(rec))
            if events:
                self.publish_many(events)
            if self.reload_requested:
                self.reload()
            self.stopping.wait(self.next_drain())

    def next_drain(self):
        """Seconds until the next drain (see TICK)."""
        hurry = (self.probes.fill > self.RING_PRESSURE or self.watchers
                 or self.attach_hub.clients)
        return self.FAST_TICK if hurry else self.TICK

    def publish(self, event):
        self.publish_many((event,))

    def publish_many(self, events):
        counts, hub, watchers = self.counts, self.attach_hub, self.watchers
        for event in events:
            counts[event.type] += 1
            hub.on_event(event)
            for w in watchers:
                if event.type in w.types:
                    w.offer(event)
        self.pipeline.dispatch_many(events)

    def audit(self, event):
        """An event from an API thread (attach, input, kill): published by
        the capture thread, in order with the rest."""
        self.api_events.append(event)

    def shutdown(self):
        self.stopping.set()
        if self.probes:
            try:   # records already in the rings still reach the logs
                for rec in self.probes.drain(final=True):
                    for ev in self.tracker.handle(rec):
                        self.publish(ev)
            finally:
                self.probes.close()
        self.attach_hub.close()
        if self.pipeline:
            while self.api_events:
                self.publish(self.api_events.popleft())
            self.pipeline.stop()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self.lock_file is not None:
            os.close(self.lock_file)


###############################################################################
# Reports #####################################################################
###############################################################################
# `sshlog report` summarises event logs without the daemon: the text form or
# JSON Lines, rotations (.1, .2.gz, ...) read oldest first, one line at a
# time.  Memory stays bounded: a line longer than REPORT_MAX_LINE is skipped
# as corrupt, a table keeps at most REPORT_MAX_KEYS keys (the rarest are
# folded away and the report says so) and a listing its latest
# REPORT_MAX_ROWS rows.  Values are shown as the text form shows them:
# control characters escaped, so a report cannot drive the reader's terminal.

REPORT_MAX_LINE = 4 << 20
REPORT_MAX_KEYS = 50000
REPORT_MAX_ROWS = 5000
REPORT_TOP = 10
REPORT_FORMATS = ("text", "json", "csv", "markdown")
REPORT_TYPES = frozenset(("connection_established", "connection_auth_failed",
                          "connection_close", "command_start", "command_finish", "file_upload"))
PRIVILEGE_COMMANDS = frozenset(("sudo", "sudoedit", "su", "doas", "pkexec", "runuser"))
REPORT_CSV_COLUMNS = ("section", "time", "end", "user", "source", "count", "duration_s",
                      "commands", "uploads", "exit_codes", "bytes", "item")

ReportRecord = collections.namedtuple(
    "ReportRecord", "type ts session user ip port pid filename args exit_code signal path "
    "nbytes start existing host")
_record = tuple.__new__           # ReportRecord from a tuple, without the namedtuple's wrapper

_TEXT_DETAIL = {
    "connection_established": r"(?:(.*) )?from ip (\S*) tty (-?\d+)",
    "connection_auth_failed": r"(?:(.*) )?from ip (\S*)",
    "connection_close": r"(?:(.*) )?from ip (\S*)",
    "command_start": r"(?:(\S+) )?executed (.*)",
    "command_finish": r"(?:(\S+) )?execute complete \(exit code: (-?\d+)"
                      r"(?:, killed by (\w+))?\) (.*)",
    "file_upload": r"(?:(\S+) )?uploaded file (.*)",
}
_TEXT_TIME = r"(\d{4}-\d\d-\d\d [0-2]\d):([0-5]\d):([0-5]\d|60) "
# one pattern per event type, chosen by the word after the time
_TEXT_LINES = {t: re.compile(_TEXT_TIME + t + r" \((\d+)\) " + d + r"\Z", re.S)
               for t, d in _TEXT_DETAIL.items()}
_TEXT_OTHER = re.compile(_TEXT_TIME + r"([a-z][a-z0-9_]*) \((\d+)\) ", re.S)
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ]([0-2]\d):([0-5]\d):([0-5]\d|60)(\.\d{1,9})?"
                      r"(Z|z|[+-]\d\d:\d\d)?\Z")
_hour_epochs = ({}, {})           # 'YYYY-MM-DD HH' -> epoch: local, UTC


def _hour_epoch(day_hour, utc):
    """Epoch of 'YYYY-MM-DD HH' (local time, or UTC), cached: logs repeat hours."""
    cache = _hour_epochs[utc]
    t = cache.get(day_hour)
    if t is None:
        y, mo, d, h = int(day_hour[0:4]), int(day_hour[5:7]), int(day_hour[8:10]), \
            int(day_hour[11:13])
        if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and y >= 1970):
            raise ValueError("bad date %r" % day_hour)
        try:
            t = calendar.timegm((y, mo, d, h, 0, 0)) if utc else \
                time.mktime((y, mo, d, h, 0, 0, 0, 0, -1))
        except (OverflowError, OSError) as e:
            raise ValueError("bad date %r: %s" % (day_hour, e))
        if len(cache) > 100000:
            cache.clear()
        cache[day_hour] = t
    return t


def rfc3339_epoch(text):
    """Epoch seconds of an RFC 3339 time ('2024-05-01T10:57:16.123456Z');
    ValueError when it is not one.  No offset means UTC (what we write)."""
    m = _RFC3339.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("bad timestamp %r" % (text,))
    day, hh, mm, ss, frac, zone = m.groups()
    t = _hour_epoch(day + " " + hh, True) + int(mm) * 60 + int(ss) + float(frac or 0)
    if zone and zone not in "Zz":
        sign = -1 if zone[0] == "+" else 1
        t += sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return t


def _peer(text):
    ip, _, port = text.rpartition(":")
    ip = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip
    return ("" if ip == "?" else ip), (int(port) if port.isdigit() else 0)


def _jtext(obj, key):
    v = obj.get(key)
    if type(v) is str:
        return v if v.isprintable() else printable(v)
    if v is None or isinstance(v, (dict, list)):
        return ""
    return str(v)


def _jint(obj, key):
    v = obj.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_report_line(line, since=None, until=None):
    """One event-log line (bytes or str, text form or JSON) to a ReportRecord.
    None: nothing to report (blank, another event type, outside
    [since, until)).  ValueError: the line is corrupt.  Nothing else."""
    text = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else line
    text = text.rstrip("\r\n")
    if not text or text[0] == "{":
        return _report_json(text, since, until) if text else None
    # our writer escapes control characters; a line from elsewhere is escaped
    # here as the JSON form's fields are (_jtext), never printed raw
    text = printable(text)
    sp = text.find(" ", 20)
    pattern = _TEXT_LINES.get(text[20:sp])
    m = pattern.match(text) if pattern is not None else None
    if m is None:
        other = _TEXT_OTHER.match(text)
        if other is None or other.group(4) in _TEXT_LINES:
            if not text.strip():
                return None
            raise ValueError("not an event line")
        _hour_epoch(other.group(1), False)
        return None                   # terminal updates, event types of the future
    g = m.groups()
    ts = _hour_epoch(g[0], False) + int(g[1]) * 60 + int(g[2])
    if (since is not None and ts < since) or (until is not None and ts >= until):
        return None
    etype = text[20:sp]
    ip = port = filename = args = path = sig = code = None
    if etype == "command_finish":
        code, sig, args = int(g[5]), g[6], g[7]
        filename = args.split(" ", 1)[0]
    elif etype == "command_start":
        args = g[5]
        filename = args.split(" ", 1)[0]
    elif etype == "file_upload":
        path = g[5]
    else:
        ip, port = _peer(g[5])
    return _record(ReportRecord, (etype, ts, "p" + g[3], g[4] or "", ip or "", port or 0, None,
                                  filename, args, code, sig, path, None, None, False, ""))


_raw_json = json.JSONDecoder().raw_decode


def _report_json(text, since, until):
    if since is not None or until is not None:
        # skip an event outside the period without decoding all of it
        i = text.find('"timestamp": "', 0, 100)
        if i >= 0:
            j = text.find('"', i + 14, i + 60)
            try:
                ts = rfc3339_epoch(text[i + 14:j]) if j > 0 else None
            except ValueError:
                ts = None
            if ts is not None and ((since is not None and ts < since) or
                                   (until is not None and ts >= until)):
                return None
    if text.startswith('{"event_type": "terminal_update"'):
        return None
    try:
        obj, end = _raw_json(text)       # json.loads without its two whitespace scans
    except RecursionError:
        raise ValueError("JSON nested too deeply")
    if end != len(text) and text[end:].strip():
        raise ValueError("extra data after the JSON object")
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    etype = obj.get("event_type")
    if not isinstance(etype, str):
        raise ValueError("no event_type")
    ts = rfc3339_epoch(obj.get("timestamp"))
    if etype not in REPORT_TYPES or (since is not None and ts < since) or \
            (until is not None and ts >= until):
        return None
    get = obj.get
    sid, ptm, user, ip = get("session_id"), get("ptm_pid"), get("username"), get("client_ip")
    port, pid, code, host = get("client_port"), get("pid"), get("exit_code"), get("hostname")
    session = "s" + sid if type(sid) is str and sid else \
        "p%d" % (ptm if type(ptm) is int else 0)
    user = user if type(user) is str and user.isprintable() else _jtext(obj, "username")
    ip = ip if type(ip) is str and ip.isprintable() else _jtext(obj, "client_ip")
    host = host if type(host) is str and host.isprintable() else _jtext(obj, "hostname")
    filename = args = path = sig = None
    command = etype.startswith("command_")
    if command:
        filename = _jtext(obj, "filename")
        args = get("args")
        if type(args) is not str:
            argv = get("argv")
            args = " ".join(a for a in argv if isinstance(a, str)) \
                if isinstance(argv, list) else ""
        if not args.isprintable():
            args = printable(args)
        sig = _jtext(obj, "signal") or None
        start = get("session_start", get("start_time"))
    else:
        if etype == "file_upload":
            path = _jtext(obj, "target_path")
        start = get("start_time")
    return _record(ReportRecord, (
        etype, ts, session, user, ip, port if type(port) is int else 0,
        pid if type(pid) is int else None, filename, args, code if type(code) is int else None,
        sig, path, _jint(obj, "bytes"), start if type(start) is str else None,
        get("existing") is True, host))


def parse_report_time(text, now, option="--since"):
    """`24h`, `7d`, `30m`, `2w`, `90s`, `today`, `now`, a DATE (local
    midnight) or a DATETIME (local unless it ends in Z or an offset) to epoch
    seconds; None for `all`.  UsageError when unreadable."""
    t = (text or "").strip()
    if t == "all":
        return None
    if t == "now":
        return now
    if t == "today":
        return time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
    m = re.fullmatch(r"(\d+)\s*([smhdw])", t)
    if m:
        return now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400,
                                         "w": 604800}[m.group(2)]
    try:
        if re.fullmatch(r"\d{4}-\d\d-\d\d", t):
            return datetime.datetime.strptime(t, "%Y-%m-%d").timestamp()
        if re.fullmatch(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]\d\d:\d\d)?", t):
            t = t[:-1] + "+00:00" if t[-1] in "Zz" else t
            return datetime.datetime.fromisoformat(t).timestamp()
    except (ValueError, OverflowError, OSError):
        pass
    raise UsageError("%s %r: use 24h, 7d, a date (2024-05-01) or a date and time "
                     "('2024-05-01 13:00', 2024-05-01T13:00:00Z)" % (option, text))


def event_log_rotations(path):
    """`path` and its rotations (path.1, path.2.gz, ...), oldest first,
    those that exist.  SshlogError when there is none."""
    found = []
    pattern = re.compile(re.escape(path) + r"\.(\d+)(\.gz)?\Z")
    for p in glob.glob(glob.escape(path) + ".*"):
        m = pattern.match(p)
        if m:
            found.append((-int(m.group(1)), bool(m.group(2)) is False, p))
    files = [p for _, _, p in sorted(found)]
    if os.path.lexists(path):
        files.append(path)
    if not files:
        raise SshlogError("event log %s does not exist (has the daemon run? name the "
                          "log files on the command line)" % path)
    return files


def order_log_files(paths):
    """Named log files in reading order: per base name, rotations oldest
    first (x.3.gz, x.2, x.1, x), bases in the order given."""
    bases = {}

    def key(p):
        m = re.fullmatch(r"(.*?)(?:\.(\d+))?(\.gz)?", p, re.S)
        base, n = m.group(1), int(m.group(2) or 0)
        bases.setdefault(base, len(bases))
        return bases[base], -n, p
    keys = [key(p) for p in paths]
    seen, out = set(), []
    for k in sorted(keys):
        if k[2] not in seen:
            seen.add(k[2])
            out.append(k[2])
    return out


def configured_event_logs(conf_dir=None, default_dir=CONF_DIR):
    """Paths of the event logs a configuration writes: the JSON ones when
    there are any (they carry more), else the text ones.  Read from the YAML
    directly, without validation or plugins, so that a report still works
    when the configuration does not."""
    import yaml
    if conf_dir is not None and not os.path.isdir(conf_dir):
        raise SshlogError("configuration directory %s does not exist" % conf_dir)
    directory = conf_dir or (default_dir if os.path.isdir(default_dir) else None)
    try:
        sources = config_files(directory) if directory else \
            [("<embedded>/conf.d/" + n, data) for n, data in embedded_config_files()]
    except OSError as e:
        raise SshlogError("cannot read the configuration: %s: %s" % (e.filename, e.strerror))
    logs = []
    for _path, data in sources:
        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError:
            continue
        if not isinstance(doc, dict):
            continue
        entries = list(doc.get("actions") or []) if isinstance(doc.get("actions"), list) else []
        for ev in doc.get("events") or [] if isinstance(doc.get("events"), list) else []:
            if isinstance(ev, dict) and isinstance(ev.get("actions"), list):
                entries += ev["actions"]
        for a in entries:
            if isinstance(a, dict) and a.get("plugin") == "eventlogfile_action" and \
                    isinstance(a.get("log_file_path"), str):
                entry = (a["log_file_path"], a.get("output_json") is True)
                if entry not in logs:
                    logs.append(entry)
    if not logs:
        raise SshlogError("the configuration (%s) writes no event log: name the log files "
                          "on the command line" % (directory or "embedded"))
    json_logs = [p for p, as_json in logs if as_json]
    return json_logs or [p for p, _ in logs]


class _Tally:
    """Counts per key, keeping at most `cap` keys: when full, the rarer half
    is folded away (counted in `folded`, so totals stay exact)."""

    __slots__ = ("counts", "cap", "total", "folded")

    def __init__(self, cap=REPORT_MAX_KEYS):
        self.counts, self.cap, self.total, self.folded = {}, cap, 0, 0

    def add(self, key):
        self.total += 1
        c = self.counts
        if key in c:
            c[key] += 1
            return
        if len(c) >= self.cap:
            keep = sorted(c.items(), key=lambda kv: -kv[1])[:self.cap // 2]
            self.folded += sum(c.values()) - sum(v for _, v in keep)
            c = self.counts = dict(keep)
        c[key] = 1

    def top(self, n=None):
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


class _SessionRow:
    __slots__ = ("key", "user", "ip", "port", "start", "first", "end", "commands", "uploads",
                 "codes")

    def __init__(self, key, rec, start):
        self.key, self.user, self.ip, self.port = key, rec.user, rec.ip, rec.port
        self.start, self.first, self.end = start, rec.ts, None
        self.commands = self.uploads = 0
        self.codes = {}

    def result(self):
        start, end = self.start, self.end
        return {"session": self.key[1:], "user": self.user, "client_ip": self.ip,
                "client_port": self.port, "start": start, "first_seen": self.first, "end": end,
                "duration_s": round(end - start, 3) if None not in (start, end) else None,
                "commands": self.commands, "uploads": self.uploads,
                "failed_commands": sum(self.codes.values()),
                "exit_codes": {str(k): v for k, v in sorted(self.codes.items())}}


class EventReport:
    """Streams event records in and builds the report (`result()`)."""

    def __init__(self, since=None, until=None, users=None, top=REPORT_TOP):
        self.since, self.until, self.top = since, until, top
        self.users = frozenset(users) if users else None
        self.files = []
        self.lines = self.corrupt = self.events = 0
        self.first, self.last = float("inf"), float("-inf")
        self.hosts = set()
        self.logins = _Tally()
        self.failed_by_source = _Tally()
        self.failed_by_account = _Tally()
        self.commands = _Tally()
        self.open = {}                        # session key -> _SessionRow
        self.sessions = collections.deque(maxlen=REPORT_MAX_ROWS)
        self.sessions_total = 0
        self.privilege = collections.deque(maxlen=REPORT_MAX_ROWS)
        self.privilege_total = 0
        self.pending = {}                     # (session, pid) -> privilege row
        self.uploads = collections.deque(maxlen=REPORT_MAX_ROWS)
        self.uploads_total = 0

    # -- input --

    def read(self, path):
        """Add every event of one log file (plain or gzip).  SshlogError
        naming the file when it cannot be read."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise SshlogError("cannot read %s: %s" % (path, e.strerror or e))
        lines_before, corrupt_before = self.lines, self.corrupt
        try:
            with f:
                gz = f.read(2) == b"\x1f\x8b"
                f.seek(0)
                if gz:
                    with gzip.GzipFile(fileobj=f, mode="rb") as z:
                        self._scan(z)
                else:
                    self._scan(f)
        except (OSError, EOFError, zlib.error) as e:
            raise SshlogError("cannot read %s: %s" % (path, getattr(e, "strerror", None) or e))
        self.files.append({"path": path, "lines": self.lines - lines_before,
                           "corrupt_lines": self.corrupt - corrupt_before})

    def _scan(self, stream, block_size=1 << 20):
        """Blocks split into lines (much cheaper than a readline per line);
        a line longer than REPORT_MAX_LINE is counted corrupt and skipped."""
        add, since, until, limit = self.add, self.since, self.until, REPORT_MAX_LINE
        parse = parse_report_line
        tail, skipping = b"", False
        while True:
            block = stream.read(block_size)
            if not block:
                break
            if skipping:                      # inside an over-long line: to its end
                nl = block.find(b"\n")
                if nl < 0:
                    continue
                block, skipping = block[nl + 1:], False
            cut = block.rfind(b"\n")
            if cut < 0:
                tail += block
            else:
                data, tail = tail + block[:cut], block[cut + 1:]
                if len(data) <= limit:        # no line in it can be too long
                    lines = data.decode("utf-8", "replace").split("\n")
                else:
                    lines = [b.decode("utf-8", "replace") if len(b) <= limit else None
                             for b in data.split(b"\n")]
                self.lines += len(lines)
                for line in lines:
                    if line is None:
                        self.corrupt += 1
                        continue
                    try:
                        rec = parse(line, since, until)
                    except ValueError:
                        self.corrupt += 1
                        continue
                    if rec is not None:
                        add(rec)
            if len(tail) > limit:
                self.lines += 1
                self.corrupt += 1
                tail, skipping = b"", True
        if tail:                              # a last line without its newline
            self.lines += 1
            try:
                rec = parse(tail.decode("utf-8", "replace"), since, until)
            except ValueError:
                self.corrupt += 1
                rec = None
            if rec is not None:
                add(rec)

    def add(self, rec):
        if self.users is not None and rec.user not in self.users:
            return
        self.events += 1
        ts = rec.ts
        if ts > self.last:
            self.last = ts
        if ts < self.first:
            self.first = ts
        if rec.host and len(self.hosts) < 100:
            self.hosts.add(rec.host)
        t = rec.type
        if t == "command_start" or t == "command_finish":
            row = self.open.get(rec.session) or self._new_row(rec)
            filename = rec.filename or "?"
            priv = filename.rpartition("/")[2] in PRIVILEGE_COMMANDS
            if t == "command_start":
                row.commands += 1
                self.commands.add(filename)
                if priv:
                    self._privileged(rec, row, None)
            else:
                code = rec.exit_code
                if code:
                    row.codes[code] = row.codes.get(code, 0) + 1
                if priv:
                    self._privileged(rec, row, code)
        elif t == "connection_established":
            row = self.open.get(rec.session)
            if row is None:
                row = self._new_row(rec)
                if not rec.existing:
                    self.logins.add((rec.user, rec.ip))
            elif not row.user:
                row.user = rec.user
        elif t == "connection_auth_failed":
            self.failed_by_source.add(rec.ip)
            self.failed_by_account.add(rec.user)
        elif t == "file_upload":
            row = self.open.get(rec.session) or self._new_row(rec)
            row.uploads += 1
            self.uploads_total += 1
            self.uploads.append((ts, rec.user, row.ip, rec.path, rec.nbytes))
        elif t == "connection_close":
            row = self.open.pop(rec.session, None)
            if row is None and rec.user:
                row = self._new_row(rec)          # began before the period
                self.open.pop(rec.session, None)
            if row is not None:
                row.end = ts
                if not row.ip:                    # the text form names it here
                    row.ip, row.port = rec.ip, rec.port
                self._done(row)

    def _privileged(self, rec, row, code):
        """sudo/su & co: a row at the start, its exit code at the finish
        (paired on the pid, or on the command line in the text form)."""
        key = (rec.session, rec.pid if rec.pid is not None else rec.args)
        if rec.type == "command_start":
            entry = [rec.ts, rec.user, row.ip, rec.args, None]
            if len(self.pending) >= REPORT_MAX_KEYS:
                self.pending.clear()
            self.pending[key] = entry
        else:
            entry = self.pending.pop(key, None)
            if entry is not None:
                entry[4] = code
                return
            entry = [rec.ts, rec.user, row.ip, rec.args, code]    # started before
        self.privilege_total += 1
        self.privilege.append(entry)

    def _start_of(self, rec):
        if rec.type == "connection_established" and not rec.existing:
            return rec.ts
        try:
            return rfc3339_epoch(rec.start) if rec.start else None
        except ValueError:
            return None

    def _new_row(self, rec):
        if len(self.open) >= REPORT_MAX_KEYS:      # sessions that never closed
            self._done(self.open.pop(next(iter(self.open))))
        row = self.open[rec.session] = _SessionRow(rec.session, rec, self._start_of(rec))
        return row

    def _row(self, rec):
        row = self.open.get(rec.session)
        return row if row is not None else self._new_row(rec)

    def _done(self, row):
        self.sessions_total += 1
        self.sessions.append(row.result())

    # -- output --

    def result(self):
        """The report as plain data (times as epoch seconds)."""
        for row in list(self.open.values()):
            self._done(row)
        self.open.clear()
        top = self.top
        sessions = sorted(self.sessions, key=lambda s: (
            s["first_seen"] if s["start"] is None else s["start"], s["session"]))
        return {
            "since": self.since, "until": self.until,
            "first_event": self.first if self.events else None,
            "last_event": self.last if self.events else None,
            "hostnames": sorted(self.hosts), "files": self.files,
            "lines": sum(f["lines"] for f in self.files), "corrupt_lines": self.corrupt,
            "events": self.events, "activity": self.events > 0,
            "users": sorted(self.users) if self.users else None,
            "logins": {"total": self.logins.total, "folded": self.logins.folded,
                       "by_user_source": [{"user": u, "client_ip": ip, "count": n}
                                          for (u, ip), n in self.logins.top()]},
            "failed_logins": {
                "total": self.failed_by_source.total,
                "sources": len(self.failed_by_source.counts),
                "accounts": len(self.failed_by_account.counts),
                "folded": self.failed_by_source.folded + self.failed_by_account.folded,
                "by_source": [{"client_ip": ip, "count": n}
                              for ip, n in self.failed_by_source.top(top)],
                "by_account": [{"username": u, "count": n}
                               for u, n in self.failed_by_account.top(top)]},
            "sessions": sessions,
            "sessions_total": self.sessions_total,
            "top_commands": {"total": self.commands.total, "distinct": len(self.commands.counts),
                             "folded": self.commands.folded,
                             "commands": [{"command": c, "count": n}
                                          for c, n in self.commands.top(top)]},
            "privilege": [{"time": ts, "user": u, "client_ip": ip, "command": a, "exit_code": c}
                          for ts, u, ip, a, c in self.privilege],
            "privilege_total": self.privilege_total,
            "uploads": [{"time": ts, "user": u, "client_ip": ip, "path": p, "bytes": b}
                        for ts, u, ip, p, b in self.uploads],
            "uploads_total": self.uploads_total,
        }


def _rfc(ts):
    return rfc3339(ts) if ts is not None else None


def _duration(seconds):
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    return "%dh%02dm%02ds" % (s // 3600, s % 3600 // 60, s % 60)


def _codes_text(codes):
    return ", ".join(k if v == 1 else "%s x%d" % (k, v) for k, v in codes.items()) or "-"


def _session_table(r):
    rows = []
    for s in r["sessions"]:
        rows.append((s["user"] or "?", s["client_ip"] or "?",
                     local_time(s["start"]) if s["start"] is not None else "before period",
                     local_time(s["end"]) if s["end"] is not None else "open",
                     _duration(s["duration_s"]), s["commands"], s["uploads"],
                     _codes_text(s["exit_codes"])))
    return ("User", "Source", "Start", "End", "Duration", "Commands", "Uploads",
            "Exit codes != 0"), rows


def _report_sections(r):
    """(title, note, headers, rows) for the text and Markdown forms."""
    out = []
    lg = r["logins"]
    out.append(("Logins: %d" % lg["total"], None, ("User", "Source", "Logins"),
                [(x["user"] or "?", x["client_ip"] or "?", x["count"])
                 for x in lg["by_user_source"]]))
    fl = r["failed_logins"]
    out.append(("Failed logins: %d from %d source(s), %d account(s)" % (
        fl["total"], fl["sources"], fl["accounts"]), None, ("Source", "Failed"),
        [(x["client_ip"] or "?", x["count"]) for x in fl["by_source"]]))
    out.append(("Failed logins by attempted account", None, ("Account", "Failed"),
                [(x["username"] or "?", x["count"]) for x in fl["by_account"]]))
    headers, rows = _session_table(r)
    out.append(("Sessions: %d" % r["sessions_total"],
                "latest %d shown" % len(rows) if len(rows) < r["sessions_total"] else None,
                headers, rows))
    tc = r["top_commands"]
    out.append(("Top commands (%d run, %d distinct)" % (tc["total"], tc["distinct"]), None,
                ("Count", "Command"), [(x["count"], x["command"]) for x in tc["commands"]]))
    out.append(("sudo/su use: %d" % r["privilege_total"],
                "latest %d shown" % len(r["privilege"])
                if len(r["privilege"]) < r["privilege_total"] else None,
                ("Time", "User", "Source", "Exit", "Command"),
                [(local_time(x["time"]), x["user"] or "?", x["client_ip"] or "?",
                  "-" if x["exit_code"] is None else x["exit_code"], x["command"])
                 for x in r["privilege"]]))
    out.append(("Uploads: %d" % r["uploads_total"],
                "latest %d shown" % len(r["uploads"])
                if len(r["uploads"]) < r["uploads_total"] else None,
                ("Time", "User", "Source", "Bytes", "Path"),
                [(local_time(x["time"]), x["user"] or "?", x["client_ip"] or "?",
                  "-" if x["bytes"] is None else x["bytes"], x["path"])
                 for x in r["uploads"]]))
    return out


def _report_header(r):
    period = "%s to %s" % (local_time(r["since"]) if r["since"] is not None else
                           "the start of the logs",
                           local_time(r["until"]) if r["until"] is not None else "now")
    hosts = " on %s" % ", ".join(r["hostnames"]) if r["hostnames"] else ""
    lines = ["sshlog report%s, %s" % (hosts, period),
             "read %d line(s) from %d file(s): %s" % (
                 r["lines"], len(r["files"]), ", ".join(f["path"] for f in r["files"]))]
    if r["corrupt_lines"]:
        lines.append("warning: %d corrupt line(s) skipped" % r["corrupt_lines"])
    if r["users"]:
        lines.append("users: %s" % ", ".join(r["users"]))
    folded = r["logins"]["folded"] + r["failed_logins"]["folded"] + \
        r["top_commands"]["folded"]
    if folded:
        lines.append("note: tables too large to keep whole; %d rare entries left out "
                     "(totals are exact)" % folded)
    return lines


def render_report(r, fmt):
    """The report as text, Markdown, JSON or CSV (a string)."""
    if fmt == "json":
        data = dict(r)
        for k in ("since", "until", "first_event", "last_event"):
            data[k] = _rfc(data[k])
        data["sessions"] = [dict(s, start=_rfc(s["start"]), end=_rfc(s["end"]),
                                 first_seen=_rfc(s["first_seen"]))
                            for s in r["sessions"]]
        data["privilege"] = [dict(x, time=_rfc(x["time"])) for x in r["privilege"]]
        data["uploads"] = [dict(x, time=_rfc(x["time"])) for x in r["uploads"]]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    if fmt == "csv":
        return _report_csv(r)
    md = fmt == "markdown"
    head = _report_header(r)
    if md:
        out = ["# " + head[0], ""] + ["- " + line for line in head[1:]]
    else:
        out = head[:]
    if not r["activity"]:
        out += ["", "No activity in this period."]
        return "\n".join(out) + "\n"
    for title, note, headers, rows in _report_sections(r):
        out.append("")
        if md:
            out += ["## " + title, ""]
            if note:
                out += ["(%s)" % note, ""]
            if rows:
                def cell(v):
                    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            else:
                out.append("none")
        else:
            out.append(title + (" (%s)" % note if note else ""))
            out += ["  " + line for line in format_table(headers, rows).splitlines()] \
                if rows else ["  none"]
    return "\n".join(out) + "\n"


def _report_csv(r):
    buf = []

    class _Sink:
        def write(self, s):
            buf.append(s)
    w = csv.writer(_Sink(), lineterminator="\n")
    w.writerow(REPORT_CSV_COLUMNS)

    def row(section, **kw):
        w.writerow([section] + ["" if kw.get(c) is None else kw[c]
                                for c in REPORT_CSV_COLUMNS[1:]])
    for key in ("since", "until", "first_event", "last_event"):
        row("summary", item=key, time=_rfc(r[key]))
    for key in ("lines", "corrupt_lines", "events"):
        row("summary", item=key, count=r[key])
    for f in r["files"]:
        row("file", item=f["path"], count=f["lines"])
    for x in r["logins"]["by_user_source"]:
        row("login", user=x["user"], source=x["client_ip"], count=x["count"])
    for x in r["failed_logins"]["by_source"]:
        row("failed_login_source", source=x["client_ip"], count=x["count"])
    for x in r["failed_logins"]["by_account"]:
        row("failed_login_account", user=x["username"], count=x["count"])
    for s in r["sessions"]:
        row("session", time=_rfc(s["start"]), end=_rfc(s["end"]), user=s["user"],
            source=s["client_ip"], duration_s=s["duration_s"], commands=s["commands"],
            uploads=s["uploads"], exit_codes=" ".join("%s:%d" % kv
                                                      for kv in s["exit_codes"].items()),
            item=s["session"])
    for x in r["top_commands"]["commands"]:
        row("command", item=x["command"], count=x["count"])
    for x in r["privilege"]:
        row("privilege", time=_rfc(x["time"]), user=x["user"], source=x["client_ip"],
            exit_codes=x["exit_code"], item=x["command"])
    for x in r["uploads"]:
        row("upload", time=_rfc(x["time"]), user=x["user"], source=x["client_ip"],
            bytes=x["bytes"], item=x["path"])
    return "".join(buf)


###############################################################################
# CLI commands ################################################################
###############################################################################

def default_socket():
    return os.environ.get("SSHLOG_SOCKET") or SOCKET_PATH


def api_request(socket_path, request, timeout=5.0):
    """Connect, send one request, return the socket file for reading replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(socket_path)
    except FileNotFoundError:
        raise SshlogError("no daemon at %s (start it with `sshlog daemon`)" % socket_path)
    except PermissionError:
        raise SshlogError("permission denied on %s: run as root or join group %s"
                          % (socket_path, SOCKET_GROUP))
    except OSError as e:
        raise SshlogError("cannot reach the daemon at %s: %s" % (socket_path, e.strerror))
    try:
        s.sendall((json.dumps(request) + "\n").encode())
    except (BrokenPipeError, ConnectionResetError):
        pass                      # the daemon answered and closed: read its reply
    return s


def api_call(socket_path, request):
    s = api_request(socket_path, request)
    with s, s.makefile("rb") as f:
        line = f.readline()
    if not line:
        raise SshlogError("the daemon closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise SshlogError(reply.get("error", "request failed"))
    return reply["data"]


def cmd_daemon(args):
    setup_logging(args.debug, args.log_file)
    daemon = Daemon(config_dir=args.config_dir, socket_path=args.socket, debug=args.debug,
                    plugin_dirs=plugin_dirs(args.config_dir, args.plugin_dir),
                    argv_cap=args.argv_cap, stdout_cap=args.stdout_cap,
                    inject=args.enable_session_injection)
    return daemon.run()


def cmd_sessions(args):
    data = api_call(args.socket, {"cmd": "sessions"})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    now = time.time()
    rows = []
    for s in sorted(data["sessions"], key=lambda s: (s["username"], s["start_time"])):
        last = datetime.datetime.strptime(s["last_activity_time"], "%Y-%m-%dT%H:%M:%S.%fZ") \
            .replace(tzinfo=datetime.timezone.utc).timestamp()
        start = datetime.datetime.strptime(s["start_time"], "%Y-%m-%dT%H:%M:%S.%fZ") \
            .replace(tzinfo=datetime.timezone.utc).timestamp()
        ip = "[%s]" % s["client_ip"] if ":" in s["client_ip"] else s["client_ip"]
        sshd = "%d:%d" % (s["sshd_pid"], s["server_port"])
        if s["sshd_root"] != "/":
            sshd += " " + printable(s["sshd_root"])
        rows.append((printable(s["username"]), humanize_age(now - last),
                     printable(s["last_command"])[:60], local_time(start),
                     "%s:%d" % (ip, s["client_port"]), s["tty_id"], sshd))
    print(format_table(("User", "Last Activity", "Last Command", "Session Start",
                        "Client IP", "TTY", "SSHD"), rows))
    return 0


def cmd_status(args):
    data = api_call(args.socket, {"cmd": "status"})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("sshlog %s, pid %d, up %ss, %d session(s), %d watcher(s)" % (
        data["version"], data["pid"], data["uptime_s"], data["sessions"], data["watchers"]))
    print("events: " + (", ".join("%s %d" % kv for kv in sorted(data["events"].items()))
                        or "none"))
    print("losses: bpf ctl %(ctl)d, bpf tty %(tty)d" % data["bpf_drops"] +
          " (terminal bytes %d)" % data.get("terminal_lost_bytes", 0) +
          ", undecodable %d, watch %d, filter errors %d" % (
              data["decode_errors"], data["watch_dropped"], data["filter_errors"]))
    rerouted = data.get("bpf_rerouted") or {}
    if any(rerouted.values()):
        print("refused by their ring, taken by the other: ctl %d, tty %d"
              % (rerouted.get("ctl", 0), rerouted.get("tty", 0)))
    merged = data.get("bpf_merged") or {}
    if any(merged.values()):
        print("terminal reads merged in the kernel: %d (waits for a merge slot given up %d)"
              % (merged.get("merged", 0), merged.get("waits_given_up", 0)))
    for name, a in sorted(data["actions"].items()):
        waiting = ""
        if "unconverted_bytes" in a:                 # recordings: converted after a burst
            waiting = ", output not yet converted %d bytes" % a["unconverted_bytes"]
        print("action %s (%s): delivered %d, queued %d, dropped %d, failed %d, retried %d%s" % (
            name, a["plugin"], a["delivered"], a["queued"], a["dropped"], a["failed"],
            a.get("retried", 0), waiting))
    print("config: " + ", ".join(data["config_files"]))
    return 0


def cmd_watch(args):
    types = list(EVENT_TYPES) if args.all else list(WATCH_DEFAULT_TYPES)
    s = api_request(args.socket, {"cmd": "watch", "types": types})
    s.settimeout(None)
    out = sys.stdout
    with s, s.makefile("rb") as f:
        first = f.readline()
        if not first:
            raise SshlogError("the daemon closed the connection")
        reply = json.loads(first)
        if not reply.get("ok"):
            raise SshlogError(reply.get("error", "watch refused"))
        for line in f:
            msg = json.loads(line)
            if "dropped" in msg:
                sys.stderr.write("sshlog: %d event(s) dropped: this terminal is too slow\n"
                                 % msg["dropped"])
            if args.json:
                out.write(json_text(msg["event"]) + "\n")
            else:
                ts = datetime.datetime.strptime(msg["event"]["timestamp"],
                                                "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
                out.write("%s %s\n" % (time.strftime("%H:%M:%S", time.localtime(ts)), msg["text"]))
            out.flush()
    return 0


# -- replay: play a .cast in the terminal, or print its text --

CAST_LINE_MAX = 16 << 20          # longer event lines are reported and skipped


def read_cast(f, name, warn):
    """(header, events) of an asciicast v2 file open in binary mode; events
    yields (time, code, data); a malformed line is reported through
    warn(text) and skipped.  SshlogError when the header is not v2."""
    first = f.readline(CAST_LINE_MAX)
    try:
        header = json.loads(first.decode("utf-8"))
        ok = isinstance(header, dict) and header.get("version") == 2 and \
            all(isinstance(header.get(k), int) and header[k] > 0 for k in ("width", "height"))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SshlogError("%s: not an asciicast v2 recording (bad header line)" % name)

    def events():
        n = 1
        while True:
            line = f.readline(CAST_LINE_MAX)
            n += 1
            if not line:
                return
            if len(line) >= CAST_LINE_MAX and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = f.readline(CAST_LINE_MAX)
                warn("%s:%d: line longer than %d bytes skipped" % (name, n, CAST_LINE_MAX))
                continue
            if not line.strip():
                continue
            try:
                ev = json.loads(line.decode("utf-8"))
                if not (isinstance(ev, list) and len(ev) == 3 and
                        isinstance(ev[0], (int, float)) and not isinstance(ev[0], bool) and
                        ev[0] >= 0 and isinstance(ev[1], str) and isinstance(ev[2], str)):
                    raise ValueError("not [time, code, data]")
            except (ValueError, UnicodeDecodeError) as e:
                warn("%s:%d: malformed event line skipped (%s)" % (name, n, str(e)[:80]))
                continue
            yield float(ev[0]), ev[1], ev[2]
    return header, events()


def cast_text(header, events, write):
    """The text a recording's output leaves, through a terminal emulator
    (pyte) of the recorded size: every line that scrolls off or is cleared
    away, then the final screen; resizes followed.  What full-screen
    programs show on the alternate screen (vim, less) is left out."""
    alt_screen = type(pyte_screen(1, 1))

    class Transcript(alt_screen):
        def line_text(self, y):
            return "".join(self.buffer[y][x].data for x in range(self.columns)).rstrip()

        def index(self):
            top, bottom = self.margins or (0, self.lines - 1)
            if self.cursor.y == bottom and top == 0 and self.saved is None:
                write(self.line_text(0) + "\n")
            super().index()

        def resize(self, lines=None, columns=None):
            if lines is not None and lines < self.lines and self.saved is None:
                for y in range(self.lines - lines):             # the top lines go
                    write(self.line_text(y) + "\n")
            super().resize(lines, columns)

        def erase_in_display(self, how=0, *args, **kwargs):
            if how in (2, 3) and self.saved is None:
                lines = [self.line_text(y) for y in range(self.lines)]
                while lines and not lines[-1]:
                    lines.pop()
                for line in lines:
                    write(line + "\n")
            super().erase_in_display(how, *args, **kwargs)

    screen = Transcript(max(header["width"], 1), max(header["height"], 1))
    stream = pyte_stream(screen)
    for _t, code, data in events:
        if code == "o":
            stream.feed(data)
        elif code == "r":
            m = re.fullmatch(r"(\d+)x(\d+)", data)
            if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
                screen.resize(int(m.group(2)), int(m.group(1)))
    lines = [screen.line_text(y) for y in range(screen.lines)]
    while lines and not lines[-1]:
        lines.pop()
    for line in lines:
        write(line + "\n")


def cmd_replay(args):
    if args.speed <= 0 or (args.idle_limit is not None and args.idle_limit <= 0):
        raise UsageError("--speed and --idle-limit must be greater than 0")
    try:
        f = open(args.file, "rb")
    except OSError as e:
        raise SshlogError("cannot read %s: %s" % (args.file, e.strerror))

    def warn(text):
        sys.stderr.write("sshlog: %s\n" % text)
        sys.stderr.flush()
    with f:
        header, events = read_cast(f, args.file, warn)
        if args.text:
            cast_text(header, events, sys.stdout.write)
            sys.stdout.flush()
            return 0
        idle = args.idle_limit if args.idle_limit is not None else header.get("idle_time_limit")
        idle = idle if isinstance(idle, (int, float)) and idle > 0 else None
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
            if size.columns < header["width"] or size.lines < header["height"]:
                warn("the recording is %dx%d, this terminal %dx%d: lines may wrap" % (
                    header["width"], header["height"], size.columns, size.lines))
        except OSError:
            pass
        out = sys.stdout.buffer
        prev, due = 0.0, time.monotonic()
        for t, code, data in events:
            if code != "o":
                continue
            delay = max(0.0, t - prev)
            prev = max(prev, t)
            due += (min(delay, idle) if idle else delay) / args.speed
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            out.write(data.encode("utf-8", "replace"))
            out.flush()
    return 0


# -- attach and kill --

DETACH_KEY = b"\x11"              # Ctrl+Q
# output after which the status line below a mirrored session is drawn again
_STATUS_WIPERS = ("\x1b[2J", "\x1b[J", "\x1b[0J", "\x1b[?1049", "\x1b[?1047", "\x1b[?47")


class AttachView:
    """Draws an attached session in this terminal.  When the terminal is at
    least as large as the session's (plus a status line), the session's
    output is written as it comes, inside a scroll region of the session's
    height; when it is smaller, a terminal emulator (pyte) of the session's
    size runs here and the part of its screen around the cursor is drawn."""

    def __init__(self, info, rows, cols, write):
        self.info = info
        self.srows, self.scols = info["rows"], info["cols"]
        self.wrows, self.wcols = rows, cols
        self.write = write
        self.screen = self.stream = None
        self.top = self.left = 0
        self.notice = info.get("why_readonly") and "read-only: %s" % info["why_readonly"] or \
            ("read-only" if info["readonly"] else "typing goes to the session")
        self.dirty = False

    def status(self):
        s = self.info
        text = " Ctrl+Q detaches | "
        if self.screen is not None:         # the window shows a part of the session's screen
            text += "rows %d-%d" % (self.top + 1, min(self.top + self.wrows - 1, self.srows))
            if self.left:
                text += " cols %d-%d" % (self.left + 1, min(self.left + self.wcols, self.scols))
            text += " of %dx%d | " % (self.scols, self.srows)
        text += "%s | TTY %d %s from %s " % (self.notice, s["tty"], s["username"],
                                             s["client_ip"])
        return text[:max(self.wcols, 1)]

    def passthrough(self):
        return self.wrows > self.srows and self.wcols >= self.scols

    def set_screen(self, ansi):
        """A whole screen of the session (rendered by the daemon)."""
        if self.passthrough():
            self.screen = self.stream = None
            self.write("\x1b[r\x1b[0m\x1b[H\x1b[2J\x1b[1;%dr" % self.srows + ansi +
                       "\x1b7" + self._status_at() + "\x1b8")
        else:
            self.screen = pyte_screen(self.scols, self.srows)
            self.stream = pyte_stream(self.screen)
            self.stream.feed(ansi)
            self.write("\x1b[r\x1b[0m\x1b[H\x1b[2J")
            self.redraw(full=True)

    def _status_at(self):
        return "\x1b[%d;1H\x1b[0;7m%s\x1b[0m\x1b[K" % (self.wrows, self.status())

    def output(self, text):
        if self.screen is None:
            self.write(text)
            if any(seq in text for seq in _STATUS_WIPERS):     # cleared, or another screen
                self.write("\x1b7" + self._status_at() + "\x1b8")
        else:
            self.stream.feed(text)
            self.dirty = True

    def set_notice(self, text):
        self.notice = text
        if self.screen is None:
            self.write("\x1b7" + self._status_at() + "\x1b8")
        else:
            self.dirty = True

    def redraw(self, full=False):
        sc = self.screen
        if sc is None:
            return
        vrows, vcols = max(self.wrows - 1, 1), max(self.wcols, 1)
        y, x = sc.cursor.y, sc.cursor.x
        top, left = self.top, self.left
        if y < top:
            top = y
        elif y >= top + vrows:
            top = y - vrows + 1
        if x < left:
            left = x
        elif x >= left + vcols:
            left = x - vcols + 1
        top = max(0, min(top, max(0, sc.lines - vrows)))
        left = max(0, min(left, max(0, sc.columns - vcols)))
        full = full or (top, left) != (self.top, self.left)
        self.top, self.left = top, left
        rows = range(top, min(top + vrows, sc.lines)) if full else \
            sorted(r for r in sc.dirty if top <= r < top + vrows)
        out = []
        for r in rows:
            out.append("\x1b[%d;1H\x1b[0m%s\x1b[0m\x1b[K" % (
                r - top + 1, screen_lines(sc, r, left, 1, vcols)[0]))
        if full:
            for r in range(sc.lines - top, vrows):
                out.append("\x1b[%d;1H\x1b[0m\x1b[K" % (r + 1))
        sc.dirty.clear()
        out.append(self._status_at())
        out.append("\x1b[%d;%dH" % (y - top + 1, x - left + 1))
        self.write("".join(out))
        self.dirty = False

    def finish(self):
        self.write("\x1b[r\x1b[0m\x1b[?25h\x1b[%d;1H\r\n" % self.wrows)


def _terminal_size():
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def _write_all(fd, text):
    data = text.encode("utf-8", "replace")
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def cmd_attach(args):
    tty = args.tty
    for fd in (0, 1, 2):
        try:
            if os.ttyname(fd) == "/dev/pts/%d" % tty:
                raise SshlogError("refusing to attach to your own session (tty %d)" % tty)
        except OSError:
            pass
    if not (os.isatty(0) and os.isatty(1)):
        raise SshlogError("attach needs a terminal on stdin and stdout")
    rows, cols = _terminal_size()
    sock = api_request(args.socket, {"cmd": "attach", "tty": tty, "readonly": args.readonly,
                                     "rows": rows, "cols": cols}, timeout=30.0)
    buf = bytearray()

    def lines():
        while b"\n" in buf:
            i = buf.index(b"\n")
            line = bytes(buf[:i])
            del buf[:i + 1]
            if line.strip():
                yield json.loads(line)

    def send(obj):
        sock.sendall((json.dumps(obj) + "\n").encode())

    with sock:
        while b"\n" not in buf:
            data = sock.recv(1 << 20)
            if not data:
                raise SshlogError("the daemon closed the connection")
            buf += data
        reply = next(lines())
        if not reply.get("ok"):
            raise SshlogError(reply.get("error", "attach refused"))
        info = reply["data"]
        sock.settimeout(None)
        resized = []
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: resized.append(1))
        import termios
        import tty as tty_mod
        saved = termios.tcgetattr(0)
        view = AttachView(info, rows, cols, lambda text: _write_all(1, text))
        reason = "detached"
        try:
            tty_mod.setraw(0)
            view.set_screen(base64.b64decode(info["screen"]).decode("utf-8", "replace"))
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            done = False
            while not done:
                if resized:
                    del resized[:]
                    view.wrows, view.wcols = _terminal_size()
                    send({"redraw": True})
                try:
                    ready = select.select([sock, 0], [], [], 0.2)[0]
                except InterruptedError:
                    continue
                if sock in ready:
                    data = sock.recv(1 << 20)
                    if not data:
                        reason = "the daemon closed the connection"
                        break
                    buf += data
                    for msg in lines():
                        if "o" in msg:
                            view.output(decoder.decode(base64.b64decode(msg["o"])))
                        elif "screen" in msg:
                            view.srows, view.scols = msg["rows"], msg["cols"]
                            decoder.reset()
                            view.set_screen(base64.b64decode(msg["screen"]).decode("utf-8",
                                                                                   "replace"))
                        elif "r" in msg:
                            view.srows, view.scols = msg["r"]
                            send({"redraw": True})
                        elif "notice" in msg:
                            view.set_notice(msg["notice"])
                        elif "end" in msg:
                            reason, done = msg["end"], True
                            break
                    if view.dirty:
                        view.redraw()
                if 0 in ready and not done:
                    keys = os.read(0, 65536)
                    if not keys:
                        break
                    if DETACH_KEY in keys:
                        keys, done = keys[:keys.index(DETACH_KEY)], True
                    if keys:
                        send({"i": base64.b64encode(keys).decode()})
            if reason == "detached":
                try:
                    send({"detach": True})
                except OSError:
                    pass
        finally:
            view.finish()
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
            signal.signal(signal.SIGWINCH, old_winch)
    print("Detached from TTY %d (%s)." % (tty, reason))
    return 0


def cmd_kill(args):
    data = api_call(args.socket, {"cmd": "kill", "tty": args.tty})
    print("Ended the session on TTY %d (user %s, sshd %d): %s" % (
        data["tty"], printable(data["username"]), data["ptm_pid"],
        "; ".join(data["done"]) or "nothing left to signal"))
    return 0


def cmd_check_config(args):
    loaded, problems = load_plugins(plugin_dirs(args.config_dir, args.plugin_dir))
    for problem in problems:
        sys.stderr.write("warning: %s\n" % problem)
    if args.explain:
        sys.stdout.write(config_reference(include_plugins=True))
        return 0
    for path in loaded:
        print("plugin loaded: %s" % path)
    config = load_config(args.config_dir)
    for w in config.warnings:
        print("warning: %s" % w)
    for rule in config.rules:
        print("%s (%s): %s -> %s%s" % (
            rule.name, rule.source, ", ".join(sorted(rule.triggers)),
            ", ".join("%s [%s]" % (a, config.actions[a][0]) for a in rule.actions),
            "; filters: " + ", ".join(f.name for f in rule.filters) if rule.filters else ""))
    print("configuration OK: %d file(s), %d event(s), %d action(s)" % (
        len(config.files), len(config.rules), len(config.actions)))
    return 0


def doctor_checks():
    """(name, ok, what was found, how to fix it) for each run-time requirement."""
    checks = []
    rel = os.uname().release
    m = re.match(r"(\d+)\.(\d+)", rel)
    checks.append(("kernel >= 5.8", bool(m) and (int(m.group(1)), int(m.group(2))) >= (5, 8),
                   rel, "a kernel with the BPF ring buffer (5.8 or newer)"))
    checks.append(("root", os.geteuid() == 0, "euid %d" % os.geteuid(),
                   "run the daemon as root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)"))
    checks.append(("tracefs", os.path.isdir(os.path.join(TRACEFS, "events", "syscalls")),
                   TRACEFS, "mount -t tracefs tracefs %s" % TRACEFS))
    checks.append(("BTF", os.path.exists(BTF_VMLINUX), BTF_VMLINUX,
                   "a kernel with CONFIG_DEBUG_INFO_BTF (without it, signal deaths are "
                   "reported less exactly)"))
    try:
        bcc = import_bcc()
        checks.append(("bcc", True, os.path.dirname(bcc.__file__), ""))
    except SshlogError as e:
        checks.append(("bcc", False, "not found", str(e).split(": ", 1)[-1]))
    checks.append(("kernel headers", kernel_headers_present(), "/lib/modules/%s/build" % rel,
                   "apt-get install linux-headers-$(uname -r), or linux-headers-amd64 linked as "
                   "/lib/modules/%s/{build,source} (`make deps` does it)" % rel))
    sshd = next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                None)
    checks.append(("OpenSSH server", sshd is not None, sshd or "not found",
                   "apt-get install openssh-server"))
    return checks


def cmd_doctor(args):
    ok = True
    for name, good, found, fix in doctor_checks():
        print("%-15s %-7s %s" % (name, "ok" if good else "PROBLEM",
                                 found if good else "%s; fix: %s" % (found, fix)))
        ok = ok and good
    for problem in load_plugins(plugin_dirs(args.config_dir))[1]:   # the config may use them
        print("%-15s %-7s %s" % ("plugin", "PROBLEM", problem))
    try:
        config = load_config(args.config_dir)
        print("%-15s %-7s %s" % ("configuration", "ok", ", ".join(config.files)))
    except ConfigError as e:
        ok = False
        print("%-15s %-7s %s" % ("configuration", "PROBLEM", e.problems[0]))
    return 0 if ok else 1


def cmd_dump_probes(args):
    print("// cflags: " + " ".join(probe_plan().cflags))
    sys.stdout.write(probe_source())
    return 0


def cmd_version(_args):
    print("sshlog %s" % __version__)
    return 0


def cmd_report(args):
    now = time.time()
    since = parse_report_time(args.since, now, "--since")
    until = parse_report_time(args.until, now, "--until") if args.until else None
    if since is not None and until is not None and since >= until:
        raise UsageError("--since must be before --until")
    if args.top < 1:
        raise UsageError("--top must be at least 1")
    if args.logfiles:
        files = order_log_files(args.logfiles)
    else:
        files = []
        for path in configured_event_logs(args.config_dir, CONF_DIR):
            files += event_log_rotations(path)
    report = EventReport(since, until, users=args.user, top=args.top)
    for path in files:
        report.read(path)
    sys.stdout.write(render_report(report.result(), args.format))
    sys.stdout.flush()
    return 0


SYSTEMD_UNIT_TEXT = """\
# Written by `sshlog install`; `sshlog uninstall` removes it.  Local changes:
# `systemctl edit sshlog` (a drop-in survives reinstalls).
[Unit]
Description=sshlog: record and watch OpenSSH sessions through eBPF
After=network.target ssh.service sshd.service

[Service]
Type=simple
ExecStart={bin} daemon
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
LimitMEMLOCK=infinity

[Install]
WantedBy=multi-user.target
"""


def running_zipapp(here=HERE):
    """The zipapp this program runs from (what `install` copies)."""
    import zipfile
    if os.path.isfile(here) and zipfile.is_zipfile(here):
        return here
    raise SshlogError("install copies the sshlog.pyz zipapp: build it with `make` and run "
                      "`sudo ./sshlog.pyz install`")


def _write_file(path, data, mode):
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_manifest(path):
    try:
        with open(path) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def install(source, bin_path=INSTALL_BIN, conf_dir=CONF_DIR, unit_path=SYSTEMD_UNIT,
            systemd_dir=SYSTEMD_RUNNING, manifest=INSTALL_MANIFEST, group=SOCKET_GROUP,
            log_dir=LOG_DIR, run=subprocess.run, say=print):
    """Install the program at `source` as a service; never overwrite the
    administrator's configuration.  Returns the manifest (what was created,
    which `uninstall` removes)."""
    m = _read_manifest(manifest)
    m.setdefault("dirs", [])
    m.setdefault("files", [])
    m["bin"], m["unit"] = bin_path, unit_path
    try:
        with open(source, "rb") as f:
            program = f.read()
        old = None
        if os.path.exists(bin_path):
            with open(bin_path, "rb") as f:
                old = f.read()
        if old == program:
            say("%s: already this version" % bin_path)
        else:
            os.makedirs(os.path.dirname(bin_path), mode=0o755, exist_ok=True)
            _write_file(bin_path, program, 0o755)
            say("%s: %s" % (bin_path, "updated" if old is not None else "installed"))
        for d in (conf_dir, os.path.join(conf_dir, "conf.d"), os.path.join(conf_dir, "plugins"),
                  os.path.join(conf_dir, "samples")):
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755)
                m["dirs"].append(d)
                say("%s/: created" % d)
        confd = os.path.join(conf_dir, "conf.d")
        if any(n.endswith((".yaml", ".yml")) for n in os.listdir(confd)) or \
                os.path.exists(os.path.join(conf_dir, "sshlog.yaml")):
            say("%s: has a configuration already, kept as it is" % conf_dir)
        else:
            for name, data in embedded_config_files("conf.d"):
                path = os.path.join(confd, name)
                _write_file(path, data, 0o644)
                m["files"].append(path)
                say("%s: default configuration" % path)
        try:
            samples = embedded_config_files("samples")
        except OSError:
            samples = []
        added = 0
        for name, data in samples:
            path = os.path.join(conf_dir, "samples", name)
            if os.path.exists(path):
                continue                      # the administrator's copy wins
            _write_file(path, data, 0o644)
            m["files"].append(path)
            added += 1
        if samples:
            say("%s/: %d sample(s) added, %d kept" % (os.path.join(conf_dir, "samples"), added,
                                                     len(samples) - added))
        try:
            grp.getgrnam(group)
        except KeyError:
            r = run(["groupadd", "--system", group], stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise SshlogError("groupadd %s failed: %s" % (
                    group, (r.stdout or b"").decode(errors="replace").strip()))
            m["group_created"] = group
            say("group %s: created (its members may use `sshlog watch`, `sessions`)" % group)
        unit = SYSTEMD_UNIT_TEXT.format(bin=bin_path).encode()
        os.makedirs(os.path.dirname(unit_path), mode=0o755, exist_ok=True)
        if not os.path.exists(unit_path) or open(unit_path, "rb").read() != unit:
            _write_file(unit_path, unit, 0o644)
            say("%s: written" % unit_path)
        os.makedirs(os.path.dirname(manifest), mode=0o755, exist_ok=True)
        m["dirs"] = sorted(set(m["dirs"]))
        m["files"] = sorted(set(m["files"]))
        _write_file(manifest, (json.dumps(m, indent=2, sort_keys=True) + "\n").encode(), 0o644)
    except OSError as e:
        raise SshlogError("install: %s: %s" % (e.filename or bin_path, e.strerror or e))
    if os.path.isdir(systemd_dir):
        unit_name = os.path.basename(unit_path)
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", unit_name],
                     ["systemctl", "restart", unit_name]):
            r = run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise SshlogError("%s failed: %s" % (" ".join(argv), (
                    r.stdout or b"").decode(errors="replace").strip()))
        say("service %s: enabled and started (`systemctl status %s`)" % (unit_name, unit_name))
    else:
        say("systemd is not running here (no %s): the unit is in place for when it is.\n"
            "Start the daemon by hand:\n"
            "  sudo %s daemon --log-file %s/daemon.log &"
            % (systemd_dir, bin_path, log_dir))
    return m


def uninstall(bin_path=INSTALL_BIN, conf_dir=CONF_DIR, unit_path=SYSTEMD_UNIT,
              systemd_dir=SYSTEMD_RUNNING, manifest=INSTALL_MANIFEST, log_dir=LOG_DIR,
              purge=False, run=subprocess.run, say=print):
    """Remove what `install` created; the configuration and the logs stay
    unless `purge`."""
    m = _read_manifest(manifest)
    bin_path, unit_path = m.get("bin", bin_path), m.get("unit", unit_path)
    unit_name = os.path.basename(unit_path)
    if os.path.isdir(systemd_dir):
        run(["systemctl", "disable", "--now", unit_name], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
    try:
        for path in (unit_path, bin_path):
            if os.path.lexists(path):
                os.unlink(path)
                say("%s: removed" % path)
        if os.path.isdir(systemd_dir):
            run(["systemctl", "daemon-reload"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        group = m.get("group_created")
        if group:
            r = run(["groupdel", group], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            say("group %s: %s" % (group, "removed" if r.returncode == 0 else "kept (%s)" % (
                (r.stdout or b"").decode(errors="replace").strip())))
        if purge:
            for d in (conf_dir, log_dir):
                if os.path.isdir(d):
                    shutil.rmtree(d)
                    say("%s/: removed" % d)
        else:
            kept = [d for d in (conf_dir, log_dir) if os.path.isdir(d)]
            if kept:
                say("kept %s (`uninstall --purge` removes them)" % " and ".join(kept))
        if os.path.exists(manifest):
            os.unlink(manifest)
            try:
                os.rmdir(os.path.dirname(manifest))
            except OSError:
                pass
    except OSError as e:
        raise SshlogError("uninstall: %s: %s" % (e.filename or bin_path, e.strerror or e))
    if not os.path.isdir(systemd_dir):
        say("a daemon started by hand keeps running: stop it with SIGTERM")
    return m


def cmd_install(args):
    if os.geteuid() != 0:
        raise SshlogError("install needs root: sudo ./sshlog.pyz install")
    bin_path = os.path.join(args.prefix, "bin", "sshlog") if args.prefix else INSTALL_BIN
    install(running_zipapp(), bin_path, CONF_DIR, SYSTEMD_UNIT, SYSTEMD_RUNNING,
            INSTALL_MANIFEST, SOCKET_GROUP, LOG_DIR)
    return 0


def cmd_uninstall(args):
    if os.geteuid() != 0:
        raise SshlogError("uninstall needs root: sudo sshlog uninstall")
    bin_path = os.path.join(args.prefix, "bin", "sshlog") if args.prefix else INSTALL_BIN
    uninstall(bin_path, CONF_DIR, SYSTEMD_UNIT, SYSTEMD_RUNNING, INSTALL_MANIFEST, LOG_DIR,
              purge=args.purge)
    return 0


def setup_logging(debug=False, log_file=None):
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s sshlog[%(process)d] %(levelname)s "
                                           "%(message)s"))
    root = logging.getLogger("sshlog")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


###############################################################################
# main() ######################################################################
###############################################################################

EPILOG = """examples:
  sudo ./sshlog.pyz daemon                     run with /etc/sshlog (or the embedded default)
  sudo ./sshlog.pyz daemon --config-dir ./cfg  run with another configuration
  ./sshlog.pyz watch                           follow logins, commands and uploads
  ./sshlog.pyz sessions --json                 live sessions for scripts
  ./sshlog.pyz check-config --config-dir /etc/sshlog
  ./sshlog.pyz report --since 7d --format markdown   weekly summary of the event logs
  ./sshlog.pyz attach 3                        see /dev/pts/3's screen and follow it
  ./sshlog.pyz replay /var/log/sshlog/sessions/ssh_2062.cast --speed 2 --idle-limit 1
"""


def build_parser():
    p = argparse.ArgumentParser(prog="sshlog", description="Watch OpenSSH sessions through eBPF.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def client(name, help):
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", default=default_socket(),
                       help="daemon socket (default: $SSHLOG_SOCKET or %s)" % SOCKET_PATH)
        return c

    d = client("daemon", "run the agent (root)")
    d.add_argument("--config-dir", help="configuration directory (default %s, else the "
                                        "embedded default)" % CONF_DIR)
    d.add_argument("--log-file", help="write the daemon's own log here instead of stderr")
    d.add_argument("--plugin-dir", action="append", metavar="DIR",
                   help="load plugins from DIR too (repeatable; always: the configuration "
                        "directory's plugins/, default %s)" % PLUGIN_DIR)
    d.add_argument("--argv-cap", type=int, default=ARGV_CAP, metavar="BYTES",
                   help="argv bytes kept per command, a power of two (default %d)" % ARGV_CAP)
    d.add_argument("--stdout-cap", type=int, default=STDOUT_CAP, metavar="BYTES",
                   help="first output bytes kept per command (default %d)" % STDOUT_CAP)
    d.add_argument("--enable-session-injection", action="store_true",
                   default=os.environ.get("SSHLOG_ENABLE_SESSION_INJECTION", "").lower()
                   in ("1", "true", "yes"),
                   help="let root type into sessions through `attach` (default off; env "
                        "SSHLOG_ENABLE_SESSION_INJECTION=1)")
    d.add_argument("--debug", action="store_true")
    d.set_defaults(func=cmd_daemon)
    w = client("watch", "print events as they happen")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--all", action="store_true", help="terminal updates too")
    w.set_defaults(func=cmd_watch)
    s = client("sessions", "list live sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sessions)
    st = client("status", "daemon counters: events, losses, action queues")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    at = client("attach", "show a live session and follow it (Ctrl+Q detaches)")
    at.add_argument("tty", type=int, metavar="TTY", help="N of /dev/pts/N (see `sessions`)")
    at.add_argument("--readonly", "-r", action="store_true",
                    help="never send what you type (it is sent only when you are root and "
                         "the daemon runs with --enable-session-injection)")
    at.set_defaults(func=cmd_attach)
    kl = client("kill", "end a live session (root)")
    kl.add_argument("tty", type=int, metavar="TTY", help="N of /dev/pts/N (see `sessions`)")
    kl.set_defaults(func=cmd_kill)
    rpl = sub.add_parser("replay", help="play a session recording (.cast) in this terminal")
    rpl.add_argument("file", metavar="FILE", help="an asciicast v2 file written by sshlog")
    rpl.add_argument("--speed", type=float, default=1.0, metavar="X",
                     help="play X times as fast (default 1)")
    rpl.add_argument("--idle-limit", type=float, metavar="S",
                     help="shorten every pause to at most S seconds")
    rpl.add_argument("--text", action="store_true",
                     help="print the text the session showed, without timing")
    rpl.set_defaults(func=cmd_replay)
    c = sub.add_parser("check-config", help="validate a configuration")
    c.add_argument("--config-dir")
    c.add_argument("--plugin-dir", action="append", metavar="DIR",
                   help="load plugins from DIR too (repeatable)")
    c.add_argument("--explain", action="store_true",
                   help="print every trigger, filter and action with its parameters")
    c.set_defaults(func=cmd_check_config)
    dr = sub.add_parser("doctor", help="check what the daemon needs")
    dr.add_argument("--config-dir")
    dr.set_defaults(func=cmd_doctor)
    rp = sub.add_parser("report", help="summarise the event logs (no daemon needed)",
                        description="Logins, failed logins, sessions, top commands, sudo/su "
                        "use and uploads from event logs (text or JSON Lines, rotations and "
                        ".gz included) over a period [--since, --until).")
    rp.add_argument("logfiles", nargs="*", metavar="LOGFILE",
                    help="event logs to read (default: the configured event log(s) and "
                    "their rotations)")
    rp.add_argument("--since", default="24h",
                    help="start: 24h, 7d, 30m, a date, a date and time, or `all` (default 24h)")
    rp.add_argument("--until", help="end, not included (default: now)")
    rp.add_argument("--format", choices=REPORT_FORMATS, default="text")
    rp.add_argument("--user", action="append", metavar="USER",
                    help="only this user (repeat for several)")
    rp.add_argument("--top", type=int, default=REPORT_TOP,
                    help="rows in the top tables (default %d)" % REPORT_TOP)
    rp.add_argument("--config-dir", help="configuration naming the event logs")
    rp.set_defaults(func=cmd_report)
    ins = sub.add_parser("install", help="install as a service (root)",
                         description="Copy this zipapp to %s (or PREFIX/bin/sshlog), create "
                         "%s/{conf.d,plugins,samples} (existing files are kept), the group %s "
                         "and a systemd unit, enabled where systemd runs."
                         % (INSTALL_BIN, CONF_DIR, SOCKET_GROUP))
    ins.add_argument("--prefix", help="install the program as PREFIX/bin/sshlog")
    ins.set_defaults(func=cmd_install)
    uni = sub.add_parser("uninstall", help="remove what install created (root)")
    uni.add_argument("--prefix", help="as given to install")
    uni.add_argument("--purge", action="store_true",
                     help="also remove %s and %s" % (CONF_DIR, LOG_DIR))
    uni.set_defaults(func=cmd_uninstall)
    sub.add_parser("dump-probes", help="print the BPF C text and flags").set_defaults(
        func=cmd_dump_probes)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write("%s\n" % problem)
        sys.stderr.write("sshlog: error: configuration rejected (%d problem(s))\n"
                         % len(e.problems))
        return 2
    except SshlogError as e:
        sys.stderr.write("sshlog: error: %s\n" % e)
        return e.exit_status
    except BrokenPipeError:
        # `sshlog watch | head`: the reader left; leave quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
