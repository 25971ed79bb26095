"""Session tracker: decoded records in, events out (Tracker.handle / Tracker.discover).

The tracker reads /proc (session ids, server address, cwd, the sshd's root) and the
sshd root's etc/passwd; every test gives it a fake /proc and a root of its own.
"""
import os
import socket

import pytest

import sshlog
from factories import FakeClock, FakeProc, nlmsg, utmp_record, write_passwd
from sshlog import (REC_AUDIT, REC_BTMP, REC_PTY, REC_SETUID, REC_STDOUT, REC_TTY_IN,
                    REC_TTY_OUT, Connect, Data, Exec, Exit, UploadClose, UploadOpen, Value,
                    Winsz)

LISTENER, PTM, USER_SSHD = 700, 2062, 2063
SEC = 10 ** 9                                   # record timestamps are ktime nanoseconds
BASE = FakeClock.BASE
USERS = (("mapoo", 1001, "/home/mapoo"), ("alice", 1002, "/home/alice"),
         ("mallory", 1003, "/home/mallory"), ("ops", 1001, "/home/ops"))  # ops shares a uid

LOGIN_FAILED = ('op=login acct="%s" exe="/usr/sbin/sshd" hostname=? addr=127.0.0.1 '
                'terminal=sshd res=failed')
INVALID_USER = ('op=login acct=28696E76616C6964207573657229 exe="/usr/sbin/sshd" hostname=? '
                'addr=127.0.0.1 terminal=sshd res=failed')
PAM_FAILED = ('op=PAM:authentication grantors=? acct="%s" exe="/usr/sbin/sshd" '
              'hostname=127.0.0.1 addr=127.0.0.1 terminal=ssh res=failed')
PAM_OK = ('op=PAM:authentication grantors=pam_unix acct="%s" exe="/usr/sbin/sshd" '
          'hostname=127.0.0.1 addr=127.0.0.1 terminal=ssh res=success')
LOGIN_OK = 'op=login id=%d exe="/usr/sbin/sshd" hostname=? addr=? terminal=/dev/pts/4 res=success'


@pytest.fixture
def world(tmp_path):
    """(tracker, fake proc, sshd root): listener 700 runs with `root` as its root dir."""
    root = write_passwd(tmp_path / "root", *USERS)
    proc = FakeProc(tmp_path / "proc")
    proc.process(LISTENER, comm="sshd", root=root)
    tracker = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
    return tracker, proc, str(root)


@pytest.fixture
def tracker(world):
    return world[0]


def feed(tracker, *records):
    events = []
    for rec in records:
        events.extend(tracker.handle(rec))
    return events


def connect(ts=1, ip="211.249.71.117", port=52566, ptm=PTM):
    return Connect(ts * SEC, ptm, ptm, LISTENER, ip, port)


def exec_(ts, pid, argv, filename=None, ppid=2070, uid=1001, truncated=False, sess=PTM):
    return Exec(int(ts * SEC), pid, sess, ppid, uid, filename or "/usr/bin/" + argv[0],
                tuple(argv), truncated)


def exit_(ts, pid, status=0, sess=PTM):
    return Exit(int(ts * SEC), pid, sess, status, 0)


def audit(ts, text, msg_type=1112, sess=PTM):
    return Data(REC_AUDIT, int(ts * SEC), sess, sess, 5, nlmsg(msg_type, text))


def btmp(ts, user, sess=PTM):
    return Data(REC_BTMP, int(ts * SEC), sess, sess, 6, utmp_record(user))


def types(events):
    return [e.type for e in events]


# ---------------------------------------------------------------------------------------
# A pty login from start to end.

def test_pty_login_session(tracker):
    assert feed(tracker, connect(1),
                Value(REC_SETUID, int(1.1 * SEC), USER_SSHD, PTM, 1001, 0),
                Value(REC_PTY, int(1.2 * SEC), USER_SSHD, PTM, 4, 9),
                Winsz(int(1.3 * SEC), USER_SSHD, PTM, 50, 132, 9)) == []
    events = feed(
        tracker,
        exec_(2, 2070, ["-bash"], filename="/bin/bash", ppid=USER_SSHD),
        Data(REC_TTY_OUT, int(2.1 * SEC), USER_SSHD, PTM, 9, b"mapoo@web1:~$ "),
        Data(REC_TTY_IN, int(2.2 * SEC), USER_SSHD, PTM, 9, b"id -un\r"),
        exec_(3, 2071, ["id", "-un"]),
        Data(REC_STDOUT, int(3.1 * SEC), 2071, PTM, 1, b"mapoo\n"),
        exit_(3.5, 2071, 0),
        exec_(4, 2072, ["false"]),
        exit_(4.25, 2072, 1 << 8),
        exec_(5, 2073, ["sleep", "100"]),
        exit_(7, 2073, 15),                      # killed by SIGTERM
        exit_(8, 2070, 0),                       # the shell
        exit_(9, USER_SSHD, 0),                  # sshd's user child: not a command
        exit_(10, PTM, 0))                       # the monitor: the connection is over
    assert types(events) == [
        "connection_established", "command_start", "terminal_update", "terminal_input",
        "command_start", "command_finish", "command_start", "command_finish",
        "command_start", "command_finish", "command_finish", "connection_close"]
    events = [e for e in events if e.type != "terminal_input"]
    texts = [e.text() for e in events if e.type != "terminal_update"]
    assert texts == [
        "connection_established (2062) mapoo from ip 211.249.71.117:52566 tty 4",
        "command_start (2062) mapoo executed /bin/bash",
        "command_start (2062) mapoo executed /usr/bin/id -un",
        "command_finish (2062) mapoo execute complete (exit code: 0) /usr/bin/id -un",
        "command_start (2062) mapoo executed /usr/bin/false",
        "command_finish (2062) mapoo execute complete (exit code: 1) /usr/bin/false",
        "command_start (2062) mapoo executed /usr/bin/sleep 100",
        "command_finish (2062) mapoo execute complete (exit code: 143, killed by SIGTERM) "
        "/usr/bin/sleep 100",
        "command_finish (2062) mapoo execute complete (exit code: 0) /bin/bash",
        "connection_close (2062) mapoo from ip 211.249.71.117:52566"]
    for e in events:
        assert (e.username, e.user_id, e.tty_id, e.hostname, e.ptm_pid) == (
            "mapoo", 1001, 4, "web1", PTM)
        assert e.session_id == events[0].session_id
        assert e.start_time == BASE + 1
    id_finish = events[4]
    assert (id_finish.pid, id_finish.parent_pid, id_finish.argv) == (2071, 2070, ("id", "-un"))
    assert (id_finish.stdout, id_finish.stdout_size) == ("mapoo\n", 6)
    assert id_finish.duration_ms == 500 and id_finish.timestamp == BASE + 3.5
    assert id_finish.command_start == BASE + 3
    sleep_finish = events[8]
    assert (sleep_finish.exit_code, sleep_finish.signal) == (143, "SIGTERM")
    assert events[1].argv == ("-bash",) and events[1].parent_pid == USER_SSHD
    tty = events[2]
    assert (tty.raw, tty.terminal_data, tty.data_len) == (b"mapoo@web1:~$ ",
                                                           "mapoo@web1:~$ ", 14)
    close = events[-1]
    assert close.duration_ms == 9000 and close.end_time == BASE + 10
    assert tracker.sessions() == []


def test_live_session_summary(tracker):
    feed(tracker, connect(1), Value(REC_PTY, 2 * SEC, USER_SSHD, PTM, 4, 9),
         Winsz(2 * SEC, USER_SSHD, PTM, 50, 132, 9),
         exec_(3, 2070, ["-bash"], filename="/bin/bash", ppid=USER_SSHD),
         exec_(4, 2071, ["vim", "notes.txt"]),
         Data(REC_TTY_OUT, 5 * SEC, USER_SSHD, PTM, 9, b"x" * 100))
    (summary,) = tracker.sessions()
    assert {k: summary[k] for k in ("ptm_pid", "username", "user_id", "tty_id", "client_ip",
                                    "client_port", "sshd_pid", "rows", "cols",
                                    "last_command")} == {
        "ptm_pid": PTM, "username": "mapoo", "user_id": 1001, "tty_id": 4,
        "client_ip": "211.249.71.117", "client_port": 52566, "sshd_pid": LISTENER,
        "rows": 50, "cols": 132, "last_command": "/usr/bin/vim notes.txt"}
    assert summary["start_time"] == sshlog.rfc3339(BASE + 1)
    assert summary["last_activity_time"] == sshlog.rfc3339(BASE + 5)
    assert tracker.session_by_tty(4).ptm_pid == PTM
    assert tracker.session_by_tty(5) is None


def test_connection_without_login_is_not_listed(tracker):
    feed(tracker, connect(1))
    assert tracker.sessions() == []


def test_pty_number_is_kept_from_the_first_record(tracker):
    feed(tracker, connect(1), Value(REC_PTY, 2 * SEC, USER_SSHD, PTM, 4, 9),
         Value(REC_PTY, 3 * SEC, USER_SSHD, PTM, 7, 10))
    (ev,) = [e for e in feed(tracker, exec_(4, 2070, ["-bash"], filename="/bin/bash"))
             if e.type == "connection_established"]
    assert ev.tty_id == 4


def test_session_without_pty_has_tty_minus_one(tracker):
    events = feed(tracker, connect(1), exec_(2, 2070, ["uname", "-a"], filename="/bin/uname"))
    assert types(events) == ["connection_established", "command_start"]
    assert events[0].tty_id == -1
    assert events[0].text().endswith("tty -1")


@pytest.mark.parametrize("status,code,sig", [
    (0, 0, None), (1 << 8, 1, None), (255 << 8, 255, None), (127 << 8, 127, None),
    (15, 143, "SIGTERM"), (9, 137, "SIGKILL"), (2, 130, "SIGINT"),
    (0x80 | 11, 139, "SIGSEGV"),                 # core dumped
    (-1, -1, None),                              # status unknown
])
def test_exit_status_decoding(tracker, status, code, sig):
    feed(tracker, connect(1), exec_(2, 2071, ["prog"]))
    (finish,) = feed(tracker, exit_(3, 2071, status))
    assert (finish.exit_code, finish.signal) == (code, sig)


def test_exec_without_argv_uses_the_filename(tracker):
    events = feed(tracker, connect(1), Exec(2 * SEC, 2071, PTM, 2070, 1001, "/usr/bin/env",
                                            (), True))
    assert events[-1].argv == ("/usr/bin/env",)
    assert events[-1].argv_truncated is True


def test_stdout_capture_is_capped(world):
    _tracker, proc, _root = world
    tracker = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock(), stdout_cap=8)
    (finish,) = feed(tracker, connect(1), exec_(2, 2071, ["cat", "f"]),
                     Data(REC_STDOUT, 3 * SEC, 2071, PTM, 1, b"hello "),
                     Data(REC_STDOUT, 4 * SEC, 2071, PTM, 2, b"world\n"),
                     Data(REC_STDOUT, 5 * SEC, 2099, PTM, 1, b"other pid"),
                     exit_(6, 2071, 0))[-1:]
    assert (finish.stdout, finish.stdout_size) == ("hello wo", 12)


def test_stdout_invalid_utf8_is_escaped(tracker):
    (finish,) = feed(tracker, connect(1), exec_(2, 2071, ["head", "-c2", "/dev/urandom"]),
                     Data(REC_STDOUT, 3 * SEC, 2071, PTM, 1, b"\xff\xfe"),
                     exit_(4, 2071, 0))[-1:]
    assert finish.stdout == "\\xff\\xfe" and finish.stdout_size == 2


# ---------------------------------------------------------------------------------------
# Failed logins from sshd's audit messages.

def failures(events):
    return [(e.username, e.auth_method, e.reason) for e in events
            if e.type == "connection_auth_failed"]


AUTH_SCENARIOS = [
    ("publickey-rejected",
     [audit(2, LOGIN_FAILED % "alice")],
     [("alice", "publickey", "authentication failed")]),
    ("two-keys-rejected",
     [audit(2, LOGIN_FAILED % "alice"), audit(3, LOGIN_FAILED % "alice")],
     [("alice", "publickey", "authentication failed")] * 2),
    ("password-twice",
     [audit(2, PAM_FAILED % "mallory", 1100), audit(2.1, LOGIN_FAILED % "mallory"),
      audit(4, PAM_FAILED % "mallory", 1100), audit(4.1, LOGIN_FAILED % "mallory")],
     [("mallory", "password", "authentication failed")] * 2),
    ("key-then-password",
     [audit(2, LOGIN_FAILED % "mallory"),
      audit(3, PAM_FAILED % "mallory", 1100), audit(3.1, LOGIN_FAILED % "mallory")],
     [("mallory", "publickey", "authentication failed"),
      ("mallory", "password", "authentication failed")]),
    ("invalid-user-password",     # lookup audit, PAM hides the name, btmp names it
     [audit(2, INVALID_USER), audit(3, PAM_FAILED % "?", 1100), btmp(3.05, b"bob"),
      audit(3.1, INVALID_USER)],
     [("bob", "password", "invalid user")]),
    ("invalid-user-three-passwords",
     [audit(2, INVALID_USER)] + [r for i in range(3) for r in (
         audit(3 + i, PAM_FAILED % "?", 1100), btmp(3.05 + i, b"bob"),
         audit(3.1 + i, INVALID_USER))],
     [("bob", "password", "invalid user")] * 3),
    ("invalid-user-lookup-only",  # reported once, at the close
     [audit(2, INVALID_USER)],
     [("", "publickey", "invalid user")]),
    ("invalid-user-keys-only",    # keys offered for an unknown name: still one, at the close
     [audit(2, INVALID_USER), audit(3, INVALID_USER), audit(4, INVALID_USER)],
     [("", "publickey", "invalid user")]),
    ("unrelated-audit-records",
     [audit(2, 'op=PAM:accounting grantors=? acct="alice" exe="/usr/sbin/sshd" res=failed',
            1101),
      audit(3, 'op=PAM:session_close acct="alice" exe="/usr/sbin/sshd" res=success', 1106),
      audit(4, 'op=login acct="alice" res=failed', 1105)],
     []),
]


@pytest.mark.parametrize("records,expected", [s[1:] for s in AUTH_SCENARIOS],
                         ids=[s[0] for s in AUTH_SCENARIOS])
def test_auth_failures_one_per_attempt(tracker, records, expected):
    events = feed(tracker, connect(1, ip="203.0.113.9", port=40022), *records,
                  exit_(9, PTM, 0))
    assert failures(events) == expected
    assert types(events)[-1] == "connection_close"
    for e in events:
        if e.type == "connection_auth_failed":
            assert (e.user_id, e.tty_id, e.client_ip, e.client_port, e.ptm_pid) == (
                -1, -1, "203.0.113.9", 40022, PTM)
            assert e.text().startswith("connection_auth_failed (2062)")


def test_invalid_user_failure_comes_before_the_close(tracker):
    events = feed(tracker, connect(1), btmp(1.5, b"bob"), audit(2, INVALID_USER),
                  exit_(3, PTM, 0))
    assert types(events) == ["connection_auth_failed", "connection_close"]
    assert events[0].username == "bob" and events[0].timestamp == BASE + 3


def test_failure_then_success(tracker):
    events = feed(tracker, connect(1), Value(REC_PTY, int(1.5 * SEC), USER_SSHD, PTM, 4, 9),
                  audit(2, LOGIN_FAILED % "alice"), audit(3, LOGIN_OK % 1002),
                  exec_(4, 2070, ["-bash"], filename="/bin/bash", uid=1002),
                  exit_(5, 2070), exit_(6, PTM))
    assert types(events) == ["connection_auth_failed", "connection_established",
                             "command_start", "command_finish", "connection_close"]
    est = events[1]
    assert (est.username, est.user_id, est.tty_id, est.timestamp) == ("alice", 1002, 4, BASE + 3)
    assert events[-1].username == "alice"


def test_password_success_uses_the_pam_account_name(tracker):
    events = feed(tracker, connect(1), audit(2, PAM_OK % "mallory", 1100),
                  audit(3, LOGIN_OK % 1003))
    assert [(e.type, e.username, e.user_id) for e in events] == [
        ("connection_established", "mallory", 1003)]


@pytest.mark.parametrize("pam_acct,uid,shown", [
    ("ops", 1001, "ops"),          # two names for uid 1001: the one PAM saw wins
    ("mapoo", 1001, "mapoo"),
    ("alice", 1001, "mapoo"),      # a PAM name of another uid is not believed
])
def test_login_name_when_several_names_share_a_uid(tracker, pam_acct, uid, shown):
    events = feed(tracker, connect(1), audit(2, PAM_OK % pam_acct, 1100),
                  audit(3, LOGIN_OK % uid))
    assert [(e.username, e.user_id) for e in events] == [(shown, uid)]


def test_success_audit_with_unknown_uid_shows_the_number(tracker):
    (est,) = feed(tracker, connect(1), audit(2, LOGIN_OK % 4242))
    assert (est.username, est.user_id) == ("4242", 4242)


def test_success_audit_after_exec_is_not_a_second_login(tracker):
    events = feed(tracker, connect(1), exec_(2, 2070, ["-bash"], filename="/bin/bash"),
                  audit(3, LOGIN_OK % 1001))
    assert types(events) == ["connection_established", "command_start"]


@pytest.mark.parametrize("data", [b"", b"\x10\x00\x00\x00", b"\xff" * 15])
def test_short_audit_payloads_are_ignored(tracker, data):
    feed(tracker, connect(1))
    assert tracker.handle(Data(REC_AUDIT, 2 * SEC, PTM, PTM, 5, data)) == []


def test_short_btmp_record_is_ignored(tracker):
    events = feed(tracker, connect(1), Data(REC_BTMP, 2 * SEC, PTM, PTM, 6, b"\0" * 60),
                  audit(3, INVALID_USER), exit_(4, PTM))
    assert failures(events) == [("", "publickey", "invalid user")]


# ---------------------------------------------------------------------------------------
# Uploads (scp -t / sftp-server): paths made absolute.

def upload(pid, path, nbytes=1024, fd=3, mode=0o644, ts=3):
    return [UploadOpen(ts * SEC, pid, PTM, fd, os.O_WRONLY | os.O_CREAT, mode, path),
            UploadClose((ts + 1) * SEC, pid, PTM, fd, nbytes)]


def test_upload_relative_path_without_cwd_is_under_home(tracker):
    events = feed(tracker, connect(1), exec_(2, 3100, ["scp", "-t", "."], uid=1001),
                  *upload(3100, "a.tgz", 1024), exit_(5, 3100, 0), exit_(6, PTM))
    assert types(events) == ["connection_established", "command_start", "file_upload",
                             "command_finish", "connection_close"]
    up = events[2]
    assert (up.target_path, up.file_mode, up.bytes, up.pid) == ("/home/mapoo/a.tgz", "644",
                                                                1024, 3100)
    assert up.text() == "file_upload (2062) mapoo uploaded file /home/mapoo/a.tgz"
    assert up.timestamp == BASE + 4


def test_upload_relative_path_uses_the_process_cwd(world):
    tracker, proc, _root = world
    proc.process(3100, comm="scp", cwd="/srv/drop")
    events = feed(tracker, connect(1), exec_(2, 3100, ["scp", "-t", "/srv/drop"]),
                  *upload(3100, "sub/../b.bin", 7, mode=0o600))
    assert [(e.target_path, e.file_mode, e.bytes) for e in events
            if e.type == "file_upload"] == [("/srv/drop/b.bin", "600", 7)]


def test_upload_cwd_inside_the_sshd_root_is_shown_as_seen_there(world):
    tracker, proc, root = world
    proc.process(3100, comm="sftp-server", cwd=os.path.join(root, "home/mapoo"))
    events = feed(tracker, connect(1),
                  exec_(2, 3100, ["sftp-server"], filename="/usr/lib/openssh/sftp-server"),
                  *upload(3100, "c.txt"))
    assert [e.target_path for e in events if e.type == "file_upload"] == ["/home/mapoo/c.txt"]


def test_upload_absolute_path_devices_and_unknown_fds(tracker):
    events = feed(tracker, connect(1), exec_(2, 3100, ["scp", "-t", "/tmp"]),
                  *upload(3100, "/tmp/x.bin", 5, fd=3),
                  *upload(3100, "/dev/null", 9, fd=4),
                  UploadClose(9 * SEC, 3100, PTM, 77, 1))
    assert [(e.type, getattr(e, "target_path", None)) for e in events[2:]] == [
        ("file_upload", "/tmp/x.bin")]


# ---------------------------------------------------------------------------------------
# Records that belong to no session we know.

STRAY = [
    Exec(SEC, 5000, 9999, 1, 1001, "/bin/ls", ("ls",), False),
    Exit(SEC, 5000, 9999, 0, 0),
    Exit(SEC, 9999, 9999, 0, 0),
    Value(REC_PTY, SEC, 5000, 9999, 3, 9),
    Value(REC_SETUID, SEC, 5000, 9999, 1001, 0),
    Winsz(SEC, 5000, 9999, 24, 80, 9),
    Data(REC_TTY_OUT, SEC, 5000, 9999, 9, b"hello"),
    Data(REC_STDOUT, SEC, 5000, 9999, 1, b"hello"),
    Data(REC_AUDIT, SEC, 5000, 9999, 5, nlmsg(1112, LOGIN_FAILED % "alice")),
    Data(REC_BTMP, SEC, 5000, 9999, 6, utmp_record(b"bob")),
    UploadOpen(SEC, 5000, 9999, 3, 1, 0o644, "x"),
    UploadClose(SEC, 5000, 9999, 3, 10),
]


@pytest.mark.parametrize("rec", STRAY, ids=lambda r: "%s-%s" % (type(r).__name__,
                                                                  getattr(r, "type", "")))
def test_records_for_unknown_sessions_are_ignored(tracker, rec):
    feed(tracker, connect(1), exec_(2, 2070, ["-bash"], filename="/bin/bash"))
    before = tracker.sessions()
    assert tracker.handle(rec) == []
    assert tracker.sessions() == before
    assert set(tracker.live) == {PTM}


def test_exit_of_an_untracked_pid_in_a_known_session(tracker):
    feed(tracker, connect(1))
    assert tracker.handle(exit_(2, 4444, 0)) == []
    assert PTM in tracker.live


# ---------------------------------------------------------------------------------------
# Identity: session ids and the server side of the connection.

def test_session_id_is_stable_across_tracker_restarts(world):
    _tracker, proc, _root = world
    proc.process(PTM, comm="sshd", ppid=LISTENER, starttime=777)
    ids = []
    for _ in range(2):
        t = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
        feed(t, connect(1))
        ids.append(t.live[PTM].session_id)
    assert ids[0] == ids[1] and len(ids[0]) == 16


def test_session_id_differs_for_a_reused_pid(tmp_path):
    ids = []
    for start in (777, 778):
        proc = FakeProc(tmp_path / str(start))
        proc.process(PTM, comm="sshd", ppid=LISTENER, starttime=start)
        t = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
        feed(t, connect(1))
        ids.append(t.live[PTM].session_id)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("client,server", [
    (("211.249.71.117", 52566), ("10.0.0.5", 22)),
    (("2001:db8::7", 40022), ("2001:db8::1", 2222)),
    (("::ffff:211.249.71.117", 52566), ("::ffff:10.0.0.5", 22)),   # dual-stack listener
])
def test_server_address_from_the_monitors_socket(world, client, server):
    tracker, proc, _root = world
    shown = {"::ffff:211.249.71.117": "211.249.71.117", "::ffff:10.0.0.5": "10.0.0.5"}
    proc.process(PTM, comm="sshd", ppid=LISTENER)
    proc.socket_fd(PTM, 4, 5555)
    proc.tcp(PTM, ("127.0.0.1", 9), ("127.0.0.1", 10), "01", 1234)    # someone else's
    proc.tcp(PTM, server, client, "01", 5555)
    events = feed(tracker, connect(1, ip=shown.get(client[0], client[0]), port=client[1]),
                  exec_(2, 2070, ["-bash"], filename="/bin/bash"))
    est = events[0]
    assert (est.server_ip, est.server_port) == (shown.get(server[0], server[0]), server[1])
    assert (est.client_ip, est.client_port) == (shown.get(client[0], client[0]), client[1])


def test_server_address_from_the_connection_record_needs_no_proc(world):
    # a short session: its processes are gone when the daemon reads the records
    tracker, _proc, _root = world
    rec = connect(1, ip="2001:db8::7", port=40022)._replace(server_ip="2001:db8::1",
                                                             server_port=2222)
    est = feed(tracker, rec, exec_(2, 2070, ["-bash"], filename="/bin/bash"))[0]
    assert (est.server_ip, est.server_port, est.client_ip) == ("2001:db8::1", 2222, "2001:db8::7")


# ---------------------------------------------------------------------------------------
# Sessions open before the daemon started (/proc discovery).

class FakeProbes:
    def __init__(self):
        self.tracked, self.fds = {}, []

    def track(self, pid, sess, ppid, flags, ptmx_fds=()):
        self.tracked[pid] = (sess, flags)
        self.fds.extend((pid, fd, sshlog.FD_PTMX) for fd in ptmx_fds)


def test_discover_existing_sessions(world):
    tracker_unused, proc, root = world
    with open(os.path.join(proc.base, "stat"), "w") as f:
        f.write("cpu  1 2 3\nbtime 1700000000\n")
    # listener (already in the fixture) listens on :22
    proc.socket_fd(LISTENER, 3, 111)
    proc.tcp(LISTENER, ("0.0.0.0", 22), ("0.0.0.0", 0), "0A", 111)
    # a logged-in pty session: monitor -> user sshd (pty master) -> bash -> sleep
    proc.process(PTM, comm="sshd", ppid=LISTENER, starttime=500)
    proc.socket_fd(PTM, 4, 222)
    proc.tcp(PTM, ("10.0.0.5", 22), ("211.249.71.117", 52566), "01", 222)
    proc.process(USER_SSHD, comm="sshd", ppid=PTM, uid=1001)
    proc.ptmx_fd(USER_SSHD, 9, 4)
    proc.process(2070, comm="bash", ppid=USER_SSHD, uid=1001, cmdline=["-bash"])
    proc.process(2071, comm="sleep", ppid=2070, uid=1001, cmdline=["sleep", "100"])
    # a connection still authenticating: monitor -> privsep child running as `sshd`
    proc.process(2090, comm="sshd", ppid=LISTENER)
    proc.process(2091, comm="sshd", ppid=2090, uid=105)
    # unrelated processes
    proc.process(1, comm="init", ppid=0)
    proc.process(900, comm="cron", ppid=1)

    tracker = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
    probes = FakeProbes()
    (est,) = tracker.discover(probes, now=BASE + 100)
    assert est.text() == "connection_established (2062) mapoo from ip 211.249.71.117:52566 tty 4"
    assert (est.existing, est.user_id, est.server_ip, est.server_port) == (
        True, 1001, "10.0.0.5", 22)
    assert est.start_time == 1700000000 + 500 / os.sysconf("SC_CLK_TCK")
    assert probes.tracked == {
        LISTENER: (0, sshlog.F_LISTENER | sshlog.F_SSHD),
        PTM: (PTM, sshlog.F_SSHD | sshlog.F_MONITOR),
        USER_SSHD: (PTM, sshlog.F_SSHD | sshlog.F_USER),
        2070: (PTM, sshlog.F_USER | sshlog.F_CMD),
        2071: (PTM, sshlog.F_USER | sshlog.F_CMD),
        2090: (2090, sshlog.F_SSHD | sshlog.F_MONITOR),
        2091: (2090, sshlog.F_SSHD),
    }
    assert probes.fds == [(USER_SSHD, 9, sshlog.FD_PTMX)]
    assert [s["ptm_pid"] for s in tracker.sessions()] == [PTM]

    # from now on the discovered session is followed like any other
    events = feed(tracker, exit_(101, 2071, 9), exit_(102, PTM, 0))
    assert types(events) == ["command_finish", "connection_close"]
    assert events[0].text() == ("command_finish (2062) mapoo execute complete "
                                "(exit code: 137, killed by SIGKILL) sleep 100")
    assert all(e.existing for e in events)


def test_socket_addresses_asked_of_the_sockets_agree_with_proc_net_tcp():
    """On the real /proc the sockets are asked themselves (pidfd_getfd, no walk of the
    host's connection table); the /proc/PID/net/tcp{,6} reading says the same."""
    pairs = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        listener = socket.socket(family)
        listener.bind((host, 0))
        listener.listen()
        client = socket.create_connection((host, listener.getsockname()[1]))
        accepted, _ = listener.accept()
        pairs.append((listener, client, accepted))
    try:
        pid = os.getpid()
        asked = set(sshlog.tcp_sockets(pid, "01"))
        assert asked == set(sshlog._ask_sockets(pid, sshlog._socket_fds(pid),
                                                listening=False))     # no fallback
        from_files = set(sshlog.tcp_sockets(pid, "01", proc="/proc/."))   # not PROC: the files
        assert asked == from_files
        for listener, client, accepted in pairs:
            local, peer = client.getsockname()[:2], client.getpeername()[:2]
            assert (local, peer) in asked and (peer, local) in asked
        ports = sshlog.listening_ports(pid)
        assert ports == sshlog.listening_ports(pid, proc="/proc/.")
        assert {p[0].getsockname()[1] for p in pairs} <= set(ports)
    finally:
        for sockets in pairs:
            for s in sockets:
                s.close()
