"""Shared builders for the unit tier: events, fake clocks, audit/btmp payloads, a fake /proc.

Not a test module (pytest collects test_*.py only); imported by the tests in this folder.
"""
import calendar
import os
import socket
import struct

import sshlog

# 2023-11-28 10:57:16 UTC, the time of SPEC §5's text samples (plus microseconds).
SPEC_TS = calendar.timegm((2023, 11, 28, 10, 57, 16)) + 0.25

BASE = dict(timestamp=SPEC_TS, hostname="web1", ptm_pid=2062, session_id="0123456789abcdef",
            username="root", user_id=0, tty_id=4, client_ip="211.249.71.117",
            client_port=52566, server_ip="10.0.0.5", server_port=22, sshd_pid=700,
            start_time=SPEC_TS - 60)


def make_event(cls, **fields):
    """An event of class `cls` with realistic defaults for the common fields."""
    return cls(**dict(BASE, **fields))


def command_finish(**fields):
    defaults = dict(ptm_pid=1805, username="mapoo", user_id=1001, pid=3001, parent_pid=3000,
                    filename="/usr/bin/id", argv=("id", "-un"), command_start=SPEC_TS - 1.5,
                    duration_ms=1500, exit_code=0, stdout="mapoo\n", stdout_size=6)
    return make_event(sshlog.CommandFinish, **dict(defaults, **fields))


class FakeClock:
    """Tracker clock: ktime nanoseconds -> wall seconds from a fixed base."""

    BASE = 1700000000.0

    def wall(self, ktime_ns):
        return self.BASE + ktime_ns / 1e9


def nlmsg(msg_type, text, seq=1):
    """A NETLINK_AUDIT message as sshd sends it: 16-byte nlmsghdr (len, type at offset 4,
    flags, seq, pid), then the text and its NUL."""
    body = text.encode() + b"\0"
    return struct.pack("<IHHII", 16 + len(body), msg_type, 5, seq, 0) + body


def utmp_record(user, line=b"ssh:notty", host=b"203.0.113.9", pid=4242):
    """A 384-byte struct utmp as sshd writes it to /var/log/btmp (ut_user at offset 44)."""
    rec = struct.pack("<hhi32s4s32s256s", 6, 0, pid, line, b"", user, host)
    return rec.ljust(384, b"\0")


def hex_le_ip(ip):
    """An address as /proc/net/tcp{,6} prints it (32-bit words in host byte order)."""
    if ":" in ip:
        raw = socket.inet_pton(socket.AF_INET6, ip)
    else:
        raw = socket.inet_aton(ip)
    return "".join("%08X" % struct.unpack("<I", raw[i:i + 4])[0] for i in range(0, len(raw), 4))


class FakeProc:
    """A directory shaped like the parts of /proc the tracker reads."""

    TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
                  "retrnsmt   uid  timeout inode\n")

    def __init__(self, base):
        self.base = str(base)
        os.makedirs(self.base, exist_ok=True)
        self._sl = 0

    def _dir(self, pid, *sub):
        d = os.path.join(self.base, str(pid), *sub)
        os.makedirs(d, exist_ok=True)
        return d

    def process(self, pid, comm="bash", ppid=1, uid=0, starttime=5000, cmdline=None,
                root=None, cwd=None, groups=""):
        d = self._dir(pid)
        fields = ["S", str(ppid)] + ["0"] * 17 + [str(starttime)] + ["0"] * 10
        with open(os.path.join(d, "stat"), "w") as f:
            f.write("%d (%s) %s\n" % (pid, comm, " ".join(fields)))
        with open(os.path.join(d, "status"), "w") as f:
            f.write("Name:\t%s\nPPid:\t%d\nUid:\t%d\t%d\t%d\t%d\nGroups:\t%s\n"
                    % (comm, ppid, uid, uid, uid, uid, groups))
        with open(os.path.join(d, "cmdline"), "wb") as f:
            f.write(b"".join(a.encode() + b"\0" for a in (cmdline or [comm])))
        if root is not None:
            os.symlink(str(root), os.path.join(d, "root"))
        if cwd is not None:
            os.symlink(str(cwd), os.path.join(d, "cwd"))
        return d

    def socket_fd(self, pid, fd, inode):
        os.symlink("socket:[%d]" % inode, os.path.join(self._dir(pid, "fd"), str(fd)))

    def tcp(self, pid, local, remote, state, inode):
        """One line of /proc/PID/net/tcp (or tcp6 for IPv6); state "01" ESTABLISHED, "0A" LISTEN."""
        name = "tcp6" if ":" in local[0] else "tcp"
        path = os.path.join(self._dir(pid, "net"), name)
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write(self.TCP_HEADER)
            f.write("%4d: %s:%04X %s:%04X %s 00000000:00000000 00:00000000 00000000     0"
                    "        0 %d 1 0000000000000000 20 4 30 10 -1\n"
                    % (self._sl, hex_le_ip(local[0]), local[1], hex_le_ip(remote[0]),
                       remote[1], state, inode))
        self._sl += 1

    def ptmx_fd(self, pid, fd, index):
        os.symlink("/dev/ptmx", os.path.join(self._dir(pid, "fd"), str(fd)))
        with open(os.path.join(self._dir(pid, "fdinfo"), str(fd)), "w") as f:
            f.write("pos:\t0\nflags:\t0100002\nmnt_id:\t25\nino:\t2\ntty-index:\t%d\n" % index)


def write_passwd(root, *entries):
    """root/etc/passwd with (name, uid, home) entries; returns root."""
    etc = os.path.join(str(root), "etc")
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\n")
        f.write("sshd:x:105:65534::/run/sshd:/usr/sbin/nologin\n")
        for name, uid, home in entries:
            f.write("%s:x:%d:%d::%s:/bin/bash\n" % (name, uid, uid, home))
    return root
