#!/usr/bin/python3
"""sshlog: record and watch OpenSSH sessions through eBPF, with no change to sshd.

Watches a stock OpenSSH server with tracepoint-only BPF programs (bcc) and
records who logged in from where, failed logins, every command with its argv
and exit status, uploads, and the terminal output of every session; runs
actions (event log, syslog, statsd, Slack, webhooks, e-mail, commands) chosen
by YAML configuration compatible with the original sshlog agent.

USAGE:
    sshlog daemon [--config-dir DIR] [--socket PATH] [--log-file PATH] [--debug]
    sshlog watch [--json] [--all]         print events as they happen
    sshlog sessions [--json]              list live sessions
    sshlog status [--json]                daemon counters (events, drops, queues)
    sshlog check-config [--config-dir DIR]
    sshlog doctor                         check what the daemon needs
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
#   Pipeline / dispatcher
#   Daemon & socket API
#   CLI commands
#   main()

###############################################################################
# Imports, version, paths #####################################################
###############################################################################

import argparse
import collections
import ctypes
import dataclasses
import datetime
import difflib
import errno
import fcntl
import glob
import grp
import hashlib
import ipaddress
import json
import logging
import logging.handlers
import os
import queue
import re
import select
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time

__version__ = "0.2.0"

CONF_DIR = "/etc/sshlog"
SOCKET_PATH = "/run/sshlog/sshlog.sock"
LOG_DIR = "/var/log/sshlog"
SOCKET_GROUP = "sshlog"
PROC = "/proc"
TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# Where the distro's bcc bindings live when another python3 runs us.
DISTRO_SITE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib/python3*/site-packages",
                    "/usr/lib64/python3*/site-packages")
HERE = os.path.dirname(os.path.abspath(__file__))

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
    one line and cannot be driven by escape sequences from a session."""
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


def local_time(ts, fmt="%Y-%m-%d %H:%M:%S"):
    return time.strftime(fmt, time.localtime(ts))


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
        elif key in ("acct", "exe", "hostname") and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", raw):
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
        return " ".join((self.filename,) + tuple(self.argv[1:]))

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
    type = "terminal_update"

    def to_dict(self):
        d = super().to_dict()
        del d["raw"]
        return d

    def detail(self):
        return "terminal update (%d bytes)" % self.data_len


EVENT_TYPES = {cls.type: cls for cls in (
    ConnectionEstablished, ConnectionAuthFailed, ConnectionClose, CommandStart,
    CommandFinish, FileUpload, TerminalUpdate)}
WATCH_DEFAULT_TYPES = tuple(t for t in EVENT_TYPES if t != "terminal_update")

###############################################################################
# BPF wire format (ctypes) ####################################################
###############################################################################
# One ctypes.Structure per C struct of bpf_probes.c; tests check the sizes.

REC_CONNECT, REC_EXEC, REC_EXIT, REC_SETUID, REC_PTY, REC_WINSZ, REC_AUDIT, \
    REC_TTY_OUT, REC_TTY_IN, REC_STDOUT, REC_UPLOAD_OPEN, REC_UPLOAD_CLOSE, \
    REC_BTMP = range(1, 14)

F_LISTENER, F_SSHD, F_USER, F_CMD, F_XFER, F_MONITOR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
FD_PTMX, FD_AUDIT, FD_BTMP, FD_UPLOAD = 1, 2, 3, 4

ARGV_CAP = 8192          # bytes of argv kept per exec (power of two)
STDOUT_CAP = 4096        # bytes of a command's first output kept
FNAME_CAP = 256
LAST_ARG_CAP = 256
SMALL_CAP = 256
BIG_CAP = 16384
PATH_CAP = 4096
CTL_PAGES = 1024         # 4 MiB: control records
TTY_PAGES = 2048         # 8 MiB: terminal bytes
TRACK_MAX = 65536


class RecHdr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("sess", ctypes.c_uint32), ("len", ctypes.c_uint32),
                ("ts", ctypes.c_uint64)]


class RecConnect(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("listener", ctypes.c_uint32), ("family", ctypes.c_uint16),
                ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16)]


def make_rec_exec(argv_cap=ARGV_CAP):
    class RecExec(ctypes.Structure):
        _fields_ = [("h", RecHdr), ("ppid", ctypes.c_uint32), ("uid", ctypes.c_uint32),
                    ("argc", ctypes.c_uint16), ("truncated", ctypes.c_uint16),
                    ("fname_len", ctypes.c_uint32), ("fname", ctypes.c_char * FNAME_CAP),
                    ("argv", ctypes.c_char * (argv_cap + LAST_ARG_CAP))]
    return RecExec


RecExec = make_rec_exec()


class RecExit(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("status", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class RecU32(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("value", ctypes.c_uint32), ("fd", ctypes.c_uint32)]


class RecWinsz(ctypes.Structure):
    _fields_ = [("h", RecHdr), ("rows", ctypes.c_uint16), ("cols", ctypes.c_uint16),
                ("fd", ctypes.c_uint32)]


class RecDataHead(ctypes.Structure):
    """Fixed part of rec_data_small / rec_data_big; `h.len` bytes follow."""
    _fields_ = [("h", RecHdr), ("fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


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
                ("status", ctypes.c_int32), ("pad", ctypes.c_uint32)]


class FdKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class FdVal(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bytes", ctypes.c_uint64)]


# Decoded records: plain tuples, built by decode_record().
Connect = collections.namedtuple("Connect", "ts pid sess listener ip port")
Exec = collections.namedtuple("Exec", "ts pid sess ppid uid filename argv truncated")
Exit = collections.namedtuple("Exit", "ts pid sess status flags")
Value = collections.namedtuple("Value", "type ts pid sess value fd")
Winsz = collections.namedtuple("Winsz", "ts pid sess rows cols fd")
Data = collections.namedtuple("Data", "type ts pid sess fd data")
UploadOpen = collections.namedtuple("UploadOpen", "ts pid sess fd flags mode path")
UploadClose = collections.namedtuple("UploadClose", "ts pid sess fd bytes")

_DATA_HEAD = ctypes.sizeof(RecDataHead)


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


def decode_record(raw, rec_exec=RecExec):
    """Decode one ring-buffer record into a namedtuple; ValueError when the
    record is short or of an unknown type."""
    if len(raw) < ctypes.sizeof(RecHdr):
        raise ValueError("short record: %d bytes" % len(raw))
    h = RecHdr.from_buffer_copy(raw[:ctypes.sizeof(RecHdr)])
    t = h.type
    if t in (REC_TTY_OUT, REC_TTY_IN, REC_STDOUT, REC_AUDIT, REC_BTMP):
        d = _need(raw, RecDataHead)
        if _DATA_HEAD + h.len > len(raw):
            raise ValueError("data record longer than its buffer")
        return Data(t, h.ts, h.pid, h.sess, d.fd, bytes(raw[_DATA_HEAD:_DATA_HEAD + h.len]))
    if t == REC_EXEC:
        r = _need(raw, rec_exec)
        off = rec_exec.argv.offset
        blob = bytes(raw[off:off + min(h.len, rec_exec.argv.size)])
        parts = blob.split(b"\0")
        argv = tuple(decode_bytes(a) for a in parts[:r.argc])
        truncated = bool(r.truncated) or len(argv) < r.argc
        fname = decode_bytes(bytes(raw[rec_exec.fname.offset:rec_exec.fname.offset + FNAME_CAP])
                             .split(b"\0", 1)[0])
        return Exec(h.ts, h.pid, h.sess, r.ppid, r.uid, fname, argv, truncated)
    if t == REC_CONNECT:
        r = _need(raw, RecConnect)
        return Connect(h.ts, h.pid, h.sess, r.listener, _ip_text(r.family, r.addr), r.port)
    if t == REC_EXIT:
        r = _need(raw, RecExit)
        return Exit(h.ts, h.pid, h.sess, r.status, r.flags)
    if t in (REC_SETUID, REC_PTY):
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
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", data, 0)
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
             "-DCAPTURE_INPUT=%d" % int(bool(capture_input)), "-DTRACK_MAX=%d" % TRACK_MAX]
    if group_dead:
        flags.append("-DHAVE_GROUP_DEAD=1")
    if offset is not None:
        flags.append("-DOFF_EXIT_CODE=%d" % offset)
    return ProbePlan(tuple(flags), offset, group_dead)


def probe_source():
    """The C text, read from beside this file or from inside the zipapp."""
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        try:
            return loader.get_data(os.path.join(HERE, "bpf_probes.c")).decode()
        except OSError:
            pass
    with open(os.path.join(HERE, "bpf_probes.c")) as f:
        return f.read()


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


class Probes:
    """The loaded BPF programs and their two ring buffers.  Records are
    submitted without wake-ups and drained on a short timer, so a busy session
    costs us one batch per tick instead of one wake-up per record."""

    def __init__(self, plan, debug=False):
        bcc = import_bcc()
        if not kernel_headers_present():
            raise SshlogError("kernel headers not found under /lib/modules/%s: install "
                              "linux-headers-amd64 and link it there (`sshlog doctor`)"
                              % os.uname().release)
        self.raw = []                     # records waiting for decode
        self.callback_errors = 0
        try:
            self.bpf = bcc.BPF(text=probe_source(), cflags=list(plan.cflags))
        except Exception as e:            # bcc raises bare Exception
            if debug:
                log.exception("BPF load failed")
            raise SshlogError("loading the BPF programs failed (%s); run `sshlog doctor`"
                              % str(e).splitlines()[-1][:200])
        self.bpf["ctl"].open_ring_buffer(self._on_record)
        self.bpf["tty"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx, data, size):
        try:
            self.raw.append(ctypes.string_at(data, size))
        except Exception:                 # a ctypes callback must never raise
            self.callback_errors += 1
        return 0

    def drain(self):
        """All records submitted so far, in arrival order."""
        self.bpf.ring_buffer_consume()
        out, self.raw = self.raw, []
        return out

    def drops(self):
        d = self.bpf["drops"]
        return {"ctl": int(d[ctypes.c_int(0)].value), "tty": int(d[ctypes.c_int(1)].value)}

    def track(self, pid, sess, ppid, flags):
        self.bpf["tracked"][ctypes.c_uint32(pid)] = ProcEntry(sess, ppid, flags, 0, -1, 0)

    def mark_fd(self, pid, fd, kind):
        self.bpf["fds"][FdKey(pid, fd)] = FdVal(kind, 0, 0)

    def close(self):
        self.bpf.cleanup()


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


def socket_addresses(pid, proc=PROC):
    """(local, remote) address pairs of the TCP sockets `pid` holds, from the
    process's own network namespace view."""
    inodes = set()
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    found = []
    for name in ("tcp", "tcp6"):
        text = read_text("%s/%d/net/%s" % (proc, pid, name)) or ""
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes and parts[3] == "01":  # ESTABLISHED
                found.append((_proc_net_addr(parts[1]), _proc_net_addr(parts[2])))
    return found


def _proc_net_addr(text):
    hexip, hexport = text.split(":")
    raw = bytes.fromhex(hexip)
    # /proc/net/tcp prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return _ip_text(fam, raw), int(hexport, 16)


def listening_ports(pid, proc=PROC):
    inodes = set()
    fd_dir = "%s/%d/fd" % (proc, pid)
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    for name in ("tcp", "tcp6"):
        for line in (read_text("%s/%d/net/%s" % (proc, pid, name)) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes and parts[3] == "0A":  # LISTEN
                ports.append(_proc_net_addr(parts[1])[1])
    return sorted(set(ports))


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
            return []
        if kind is Winsz:
            s.rows, s.cols = rec.rows, rec.cols
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
            return [FileUpload(pid=rec.pid, target_path=path, file_mode="%03o" % (mode & 0o777),
                               bytes=rec.bytes, **self._base(s, self.clock.wall(rec.ts)))]
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
                    listener=rec.listener, root=root, client_ip=rec.ip, client_port=rec.port)
        for local, remote in socket_addresses(rec.pid, self.proc):
            if remote == (rec.ip, rec.port):
                s.server_ip, s.server_port = local
        with self.lock:
            self.live[rec.pid] = s
        return []

    def _establish(self, s, uid, ts):
        s.uid = uid
        # the name PAM saw wins when it maps to this uid (several names may share one)
        acct_ok = s.auth_acct and passwd_uid(s.auth_acct, s.root) == uid
        s.username = s.auth_acct if acct_ok else passwd_name(uid, s.root)
        s.established = True
        s.last_activity = ts
        return ConnectionEstablished(**self._base(s, ts))

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
        ev = CommandStart(pid=rec.pid, parent_pid=rec.ppid, filename=cmd.filename,
                          argv=cmd.argv, argv_truncated=cmd.truncated, command_uid=rec.uid,
                          **self._base(s, ts))
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
            events.append(CommandFinish(
                pid=cmd.pid, parent_pid=cmd.ppid, filename=cmd.filename, argv=cmd.argv,
                argv_truncated=cmd.truncated, command_uid=cmd.uid, command_start=cmd.start,
                duration_ms=int((ts - cmd.start) * 1000), exit_code=code,
                signal=signal_name(sig) if sig else None, stdout=decode_bytes(bytes(cmd.stdout)),
                stdout_size=cmd.stdout_size, **self._base(s, ts)))
            s.last_activity = ts
        if rec.pid == s.ptm_pid:
            if s.invalid_pending and not s.established:
                events.append(self._auth_failed(s, ts, s.auth_acct, True))
            events.append(ConnectionClose(end_time=ts, duration_ms=int((ts - s.start) * 1000),
                                          **self._base(s, ts)))
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
            s.tty_bytes += len(rec.data)
            return [TerminalUpdate(terminal_data=decode_bytes(rec.data), data_len=len(rec.data),
                                   raw=rec.data, **self._base(s, ts))]
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
        return ConnectionAuthFailed(auth_method=method, reason="invalid user" if invalid
                                    else "authentication failed", **base)

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
            if sshd:
                self._discover_ptys(pid, s, probes)
                # sshd titles itself "sshd: NAME@pts/N" / "sshd-session: NAME [priv]"
                title = (read_text("%s/%d/cmdline" % (self.proc, pid)) or "").split("\0")[0]
                m = re.match(r"sshd[\w-]*: ([^\s@\[]+)(?:@| \[priv\])", title)
                if m:
                    s.auth_acct = m.group(1)
            if probes:
                probes.track(pid, ptm, ppid, flags)
            for child in children.get(pid, []):
                stack.append((child, flags & (F_SSHD | F_USER), pid))
        with self.lock:
            self.live[ptm] = s
        if user_uid is None:
            return None
        return self._establish(s, user_uid, now)

    def _discover_ptys(self, pid, s, probes):
        fd_dir = "%s/%d/fdinfo" % (self.proc, pid)
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return
        for fd in fds:
            m = re.search(r"^tty-index:\s*(\d+)", read_text(os.path.join(fd_dir, fd), ""), re.M)
            if m:
                if s.tty < 0:
                    s.tty = int(m.group(1))
                if probes:
                    probes.mark_fd(pid, int(fd), FD_PTMX)


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
    archive = os.path.dirname(HERE) if not os.path.isdir(HERE) else None
    base = HERE
    while archive and not os.path.isfile(archive):
        archive = os.path.dirname(archive)
    if archive:
        import zipfile
        with zipfile.ZipFile(archive) as z:
            return sorted((os.path.basename(n), z.read(n)) for n in z.namelist()
                          if n.startswith(subdir + "/") and n.endswith((".yaml", ".yml")))
    folder = os.path.join(base, subdir)
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
        raise ConfigError(["%s: configuration directory does not exist" % conf_dir])
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
        if plugin not in ACTIONS:
            problems.append("%s: %s.plugin: unknown plugin %r%s" % (
                path, keypath, plugin, did_you_mean(plugin, ACTIONS)))
            return None
        params = {k: v for k, v in entry.items() if k not in ("action", "plugin")}
        errs = validate_params(ACTIONS[plugin].PARAMS, params)
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
                if t not in EVENT_TYPES:
                    problems.append("%s: %s.triggers[%d]: unknown trigger %r%s" % (
                        path, kp, j, t, did_you_mean(t, EVENT_TYPES)))
            triggers = frozenset(t for t in triggers if t in EVENT_TYPES)
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


class Action:
    PARAMS = ()
    plugin = help = ""

    def __init__(self, name, params):
        self.name = name
        self.params = params

    def handle(self, event):
        raise NotImplementedError

    def close(self):
        pass


class ActionRunner:
    QUEUE_SIZE = 10000

    def __init__(self, action):
        self.action = action
        self.queue = queue.Queue(self.QUEUE_SIZE)
        self.delivered = self.dropped = self.failed = 0
        self.thread = threading.Thread(target=self._work, name="action-" + action.name,
                                       daemon=True)
        self.thread.start()

    def submit(self, event):
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def _work(self):
        alog = logging.getLogger("sshlog.action")
        while True:
            event = self.queue.get()
            if event is None:
                break
            try:
                self.action.handle(event)
                self.delivered += 1
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as e:
                self.failed += 1
                if self.failed in (1, 10, 100) or self.failed % 1000 == 0:
                    alog.error("action %s failed (%d times): %s", self.action.name,
                               self.failed, e)

    def stop(self, timeout=5.0):
        """Deliver what is queued (bounded by `timeout`), then close."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
        self.action.close()

    def stats(self):
        return {"plugin": self.action.plugin, "queued": self.queue.qsize(),
                "delivered": self.delivered, "dropped": self.dropped, "failed": self.failed}


def event_line(event, as_json):
    """The event log's line for an event: text with a local-time prefix, or
    one JSON object alone (JSON Lines)."""
    if as_json:
        return json.dumps(event.to_dict(), ensure_ascii=False)
    return "%s %s" % (local_time(event.timestamp), event.text())


@register_action("eventlogfile_action", "append each event to a size-rotated log file")
class EventLogFile(Action):
    PARAMS = (Param("log_file_path", "str", help="file to write"),
              Param("max_size_mb", "number", 20, "rotate when the file reaches this size"),
              Param("number_of_log_files", "int", 2, "rotated files kept"),
              Param("output_json", "bool", False, "one JSON object per line instead of text"))

    def __init__(self, name, params):
        super().__init__(name, params)
        path = params["log_file_path"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=int(params["max_size_mb"] * 1024 * 1024),
            backupCount=params["number_of_log_files"], encoding="utf-8")
        os.chmod(path, 0o600)
        self.as_json = params["output_json"]

    def handle(self, event):
        record = logging.makeLogRecord({"msg": event_line(event, self.as_json)})
        self.handler.handle(record)
        self.handler.flush()

    def close(self):
        self.handler.close()


###############################################################################
# Pipeline / dispatcher #######################################################
###############################################################################

class Pipeline:
    """Routes events to the rules whose triggers name them, runs filters, and
    hands matches to the action runners."""

    def __init__(self, config):
        self.config = config
        self.runners = {}
        try:
            for name, (plugin, params, _src) in config.actions.items():
                self.runners[name] = ActionRunner(ACTIONS[plugin](name, dict(params)))
        except Exception:
            self.stop(timeout=1)
            raise
        self.by_type = collections.defaultdict(list)
        for rule in config.rules:
            for t in rule.triggers:
                self.by_type[t].append(rule)
        self.filter_errors = 0
        self._reported = set()

    @property
    def wanted(self):
        return set(self.by_type)

    def dispatch(self, event):
        for rule in self.by_type.get(event.type, ()):
            if all(self._passes(f, event) for f in rule.filters if event.type in f.triggers):
                for name in rule.actions:
                    self.runners[name].submit(event)

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
        for runner in self.runners.values():
            runner.stop(timeout)

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


class ApiHandler(socketserver.StreamRequestHandler):
    def handle(self):
        daemon = self.server.daemon_ref
        try:
            if not peer_allowed(self.connection):
                self._send({"ok": False, "error": "permission denied: root or group %s only"
                            % SOCKET_GROUP})
                return
            line = self.rfile.readline(65536)
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
                self._watch(daemon, [t for t in types if t in EVENT_TYPES])
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


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class Daemon:
    """The capture loop: drain BPF records, decode, track, dispatch."""

    TICK = 0.02                   # seconds between ring-buffer drains when busy
    IDLE_TICK = 0.1

    def __init__(self, config_dir=None, socket_path=SOCKET_PATH, debug=False,
                 default_config_dir=CONF_DIR, proc=PROC):
        self.config_dir = config_dir
        self.default_config_dir = default_config_dir
        self.socket_path = socket_path
        self.debug = debug
        self.proc = proc
        self.stopping = threading.Event()
        self.reload_requested = False
        self.counts = collections.Counter()
        self.decode_errors = 0
        self.watchers = []
        self.watch_lock = threading.Lock()
        self.started = time.time()
        self.lock_file = None
        self.server = None
        self.probes = None
        self.pipeline = None
        self.tracker = Tracker(proc=proc)

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
            os.unlink(self.socket_path)     # stale: we hold the lock
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
                "decode_errors": self.decode_errors,
                "callback_errors": self.probes.callback_errors if self.probes else 0,
                "filter_errors": self.pipeline.filter_errors if self.pipeline else 0,
                "actions": self.pipeline.stats() if self.pipeline else {},
                "watchers": len(self.watchers),
                "watch_dropped": sum(w.dropped for w in self.watchers),
                "sessions": len(self.tracker.sessions()),
                "config_files": self.pipeline.config.files if self.pipeline else []}

    # -- the loop --

    def run(self):
        if os.geteuid() != 0:
            raise SshlogError("the daemon needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")
        os.umask(0o077)
        self.acquire_lock()
        config = load_config(self.config_dir, self.default_config_dir)
        for w in config.warnings:
            log.warning("%s", w)
        plan = probe_plan()
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

    def _on_hup(self, *_):
        self.reload_requested = True

    def reload(self):
        self.reload_requested = False
        try:
            config = load_config(self.config_dir, self.default_config_dir)
        except ConfigError as e:
            for p in e.problems:
                log.error("reload refused: %s", p)
            return
        except Exception as e:
            log.error("reload refused: %s", e)
            return
        old, self.pipeline = self.pipeline, Pipeline(config)
        old.stop()
        log.info("configuration reloaded: %s", ", ".join(config.files))

    def loop(self):
        handle, decode = self.tracker.handle, decode_record
        while not self.stopping.is_set():
            batch = self.probes.drain()
            for raw in batch:
                try:
                    rec = decode(raw)
                except ValueError as e:
                    self.decode_errors += 1
                    if self.decode_errors in (1, 100) or self.decode_errors % 10000 == 0:
                        log.error("undecodable record (%d so far): %s", self.decode_errors, e)
                    continue
                for ev in handle(rec):
                    self.publish(ev)
            if self.reload_requested:
                self.reload()
            self.stopping.wait(self.TICK if batch else self.IDLE_TICK)

    def publish(self, event):
        self.counts[event.type] += 1
        self.pipeline.dispatch(event)
        for w in self.watchers:
            if event.type in w.types:
                w.offer(event)

    def shutdown(self):
        self.stopping.set()
        if self.probes:
            try:   # records already in the rings still reach the logs
                for raw in self.probes.drain():
                    try:
                        for ev in self.tracker.handle(decode_record(raw)):
                            self.publish(ev)
                    except ValueError:
                        self.decode_errors += 1
            finally:
                self.probes.close()
        if self.pipeline:
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
    s.sendall((json.dumps(request) + "\n").encode())
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
    daemon = Daemon(config_dir=args.config_dir, socket_path=args.socket, debug=args.debug)
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
          ", undecodable %d, watch %d, filter errors %d" % (
              data["decode_errors"], data["watch_dropped"], data["filter_errors"]))
    for name, a in sorted(data["actions"].items()):
        print("action %s (%s): delivered %d, queued %d, dropped %d, failed %d" % (
            name, a["plugin"], a["delivered"], a["queued"], a["dropped"], a["failed"]))
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
                out.write(json.dumps(msg["event"], ensure_ascii=False) + "\n")
            else:
                ts = datetime.datetime.strptime(msg["event"]["timestamp"],
                                                "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
                out.write("%s %s\n" % (local_time(ts, "%H:%M:%S"), msg["text"]))
            out.flush()
    return 0


def cmd_check_config(args):
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
    """(name, ok, detail) for each run-time requirement."""
    checks = []
    rel = os.uname().release
    try:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", rel).groups())
        checks.append(("kernel >= 5.8", (major, minor) >= (5, 8), rel))
    except (AttributeError, ValueError):
        checks.append(("kernel >= 5.8", False, "cannot parse %r" % rel))
    checks.append(("root", os.geteuid() == 0, "the daemon must run as root"
                   if os.geteuid() else "euid 0"))
    checks.append(("tracefs", os.path.isdir(os.path.join(TRACEFS, "events", "syscalls")),
                   "%s (fix: mount -t tracefs tracefs %s)" % (TRACEFS, TRACEFS)))
    checks.append(("BTF", os.path.exists(BTF_VMLINUX),
                   "%s (exit status of signalled commands)" % BTF_VMLINUX))
    try:
        bcc = import_bcc()
        checks.append(("bcc", True, os.path.dirname(bcc.__file__)))
    except SshlogError as e:
        checks.append(("bcc", False, str(e)))
    checks.append(("kernel headers", kernel_headers_present(),
                   "/lib/modules/%s/build (fix: apt-get install linux-headers-amd64 and link "
                   "/usr/src/linux-headers-*-amd64 there; `make deps` does it)" % rel))
    sshd = next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                None)
    checks.append(("OpenSSH server", sshd is not None,
                   sshd or "not found (fix: apt-get install openssh-server)"))
    return checks


def cmd_doctor(args):
    ok = True
    for name, good, detail in doctor_checks():
        print("%-15s %-7s %s" % (name, "ok" if good else "PROBLEM", detail))
        ok = ok and good
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
    c = sub.add_parser("check-config", help="validate a configuration")
    c.add_argument("--config-dir")
    c.set_defaults(func=cmd_check_config)
    dr = sub.add_parser("doctor", help="check what the daemon needs")
    dr.add_argument("--config-dir")
    dr.set_defaults(func=cmd_doctor)
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
