"""Local API: the real ApiServer/ApiHandler on a socket in tmp_path, the JSON-lines protocol,
and the CLI client side (sessions, status, watch)."""
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
import types

import pytest

import sshlog
from factories import FakeClock, FakeProc, make_event
from sshlog import Connect, Exec, Value

STATUS = {"version": sshlog.__version__, "pid": 4321, "uptime_s": 12.5,
          "events": {"command_start": 3, "connection_established": 1},
          "bpf_drops": {"ctl": 0, "tty": 2}, "bpf_rerouted": {"ctl": 3, "tty": 1},
          "bpf_merged": {"merged": 20517, "waits_given_up": 0},
          "decode_errors": 0, "callback_errors": 0, "filter_errors": 1,
          "actions": {"log_events": {"plugin": "eventlogfile_action", "queued": 0,
                                     "delivered": 4, "dropped": 0, "failed": 0}},
          "watchers": 0, "watch_dropped": 0, "sessions": 1,
          "config_files": ["/etc/sshlog/conf.d/log_events.yaml"]}


class StandIn:
    """What ApiHandler uses of the daemon: tracker.sessions(), status(), add_watcher /
    remove_watcher, stopping; publish() offers events as Daemon.publish does."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.stopping = threading.Event()
        self.watchers = []
        self.lock = threading.Lock()

    def status(self):
        return dict(STATUS, watchers=len(self.watchers))

    def add_watcher(self, w):
        with self.lock:
            self.watchers = self.watchers + [w]

    def remove_watcher(self, w):
        with self.lock:
            self.watchers = [x for x in self.watchers if x is not w]

    def publish(self, event):
        for w in self.watchers:
            if event.type in w.types:
                w.offer(event)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def login(tracker, ptm=2062, ip="211.249.71.117", port=52566, tty=4, uid=1001):
    for rec in (Connect(10 ** 9, ptm, ptm, 700, ip, port),
                Value(sshlog.REC_PTY, 10 ** 9, ptm + 1, ptm, tty, 9),
                Exec(2 * 10 ** 9, ptm + 8, ptm, ptm + 1, uid, "/bin/bash", ("-bash",), False),
                Exec(3 * 10 ** 9, ptm + 9, ptm, ptm + 8, uid, "/usr/bin/top", ("top",), False)):
        tracker.handle(rec)


@pytest.fixture
def allow_peer(monkeypatch):
    """Without root, accept this test's own uid through the group check of peer_allowed
    (the function still runs for real)."""
    if os.geteuid() != 0:
        monkeypatch.setattr(sshlog.grp, "getgrnam",
                            lambda name: types.SimpleNamespace(gr_gid=os.getgid()))


@pytest.fixture
def api(tmp_path, allow_peer):
    root = tmp_path / "root" / "etc"
    root.mkdir(parents=True)
    (root / "passwd").write_text("mapoo:x:1001:1001::/home/mapoo:/bin/bash\n")
    proc = FakeProc(tmp_path / "proc")
    proc.process(700, comm="sshd", root=tmp_path / "root")
    tracker = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
    daemon = StandIn(tracker)
    path = str(tmp_path / "api.sock")
    server = sshlog.ApiServer(path, sshlog.ApiHandler)
    server.daemon_ref = daemon
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield types.SimpleNamespace(path=path, daemon=daemon, tracker=tracker)
    daemon.stopping.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def ask(path, payload, timeout=5.0):
    """Send one request line (a dict, or raw bytes) and return (socket, reader)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode())
    return s, s.makefile("rb")


def one_reply(path, payload):
    s, f = ask(path, payload)
    with s, f:
        line = f.readline()
        rest = f.read()                   # the server closes after one reply
    assert line.endswith(b"\n") and rest == b""
    return json.loads(line)


# ---------------------------------------------------------------------------------------
# The protocol on the socket.

def test_sessions(api):
    assert one_reply(api.path, {"cmd": "sessions"}) == {"ok": True, "data": {"sessions": []}}
    login(api.tracker)
    reply = one_reply(api.path, {"cmd": "sessions"})
    (s,) = reply["data"]["sessions"]
    assert s == api.tracker.sessions()[0]
    assert (s["username"], s["tty_id"], s["client_ip"], s["last_command"]) == (
        "mapoo", 4, "211.249.71.117", "/usr/bin/top")


def test_status(api):
    assert one_reply(api.path, {"cmd": "status"}) == {"ok": True, "data": STATUS}


def test_unknown_command(api):
    assert one_reply(api.path, {"cmd": "frobnicate"}) == {
        "ok": False, "error": "unknown command 'frobnicate'"}


@pytest.mark.parametrize("payload", [b"not json\n", b"\n", b"{}\n", b'{"command": "x"}\n',
                                     b"[1, 2]\n", b"null\n", b'"sessions"\n', b"\xff\xfe\n"],
                         ids=["text", "empty", "no-cmd", "other-key", "list", "null",
                              "string", "binary"])
def test_bad_requests(api, payload):
    assert one_reply(api.path, payload) == {"ok": False, "error": "bad request"}


def test_watch_streams_events(api):
    s, f = ask(api.path, {"cmd": "watch", "types": ["command_start", "no_such_type"]})
    with s, f:
        assert json.loads(f.readline()) == {"ok": True, "data": {"watching": ["command_start"]}}
        assert wait_for(lambda: len(api.daemon.watchers) == 1)
        first = make_event(sshlog.CommandStart, filename="/usr/bin/id", argv=("id", "-un"))
        ignored = make_event(sshlog.ConnectionEstablished)
        second = make_event(sshlog.CommandStart, filename="/bin/ls", argv=("ls", "\x1b[2J"))
        for ev in (first, ignored, second):
            api.daemon.publish(ev)
        got = [json.loads(f.readline()) for _ in range(2)]
    assert got == [{"event": first.to_dict(), "text": first.text()},
                   {"event": second.to_dict(), "text": second.text()}]
    assert got[1]["text"] == "command_start (2062) root executed /bin/ls \\x1b[2J"
    # the client went away: its watcher is dropped
    assert wait_for(lambda: api.daemon.watchers == [])


def test_watch_default_types_leave_out_terminal_updates(api):
    s, f = ask(api.path, {"cmd": "watch"})
    with s, f:
        watching = json.loads(f.readline())["data"]["watching"]
    assert watching == sorted(sshlog.WATCH_DEFAULT_TYPES)
    assert "terminal_update" not in watching and "connection_auth_failed" in watching


def test_watch_reports_drops_once(api):
    s, f = ask(api.path, {"cmd": "watch", "types": ["file_upload"]})
    with s, f:
        f.readline()
        assert wait_for(lambda: len(api.daemon.watchers) == 1)
        (watcher,) = api.daemon.watchers
        watcher.dropped = 3
        ev = make_event(sshlog.FileUpload, target_path="/tmp/a", file_mode="644", bytes=1)
        api.daemon.publish(ev)
        api.daemon.publish(ev)
        first, second = json.loads(f.readline()), json.loads(f.readline())
    assert first["dropped"] == 3 and "dropped" not in second


def test_watcher_queue_is_bounded():
    w = sshlog.Watcher(["command_start"])
    assert w.queue.maxsize > 0
    w.queue.maxsize = 2
    ev = make_event(sshlog.CommandStart)
    for _ in range(5):
        w.offer(ev)
    assert (w.queue.qsize(), w.dropped) == (2, 3)


def test_watch_ends_when_the_daemon_stops(api):
    s, f = ask(api.path, {"cmd": "watch"})
    with s, f:
        f.readline()
        assert wait_for(lambda: len(api.daemon.watchers) == 1)
        api.daemon.stopping.set()
        assert f.readline() == b""               # closed by the server
    assert wait_for(lambda: api.daemon.watchers == [])


def test_watch_with_malformed_types_is_a_bad_request(api):
    assert one_reply(api.path, {"cmd": "watch", "types": 5})["ok"] is False


def test_permission_denied_reply(api, monkeypatch):
    monkeypatch.setattr(sshlog, "peer_allowed", lambda sock: False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(api.path)
    s.sendall(b'{"cmd": "sessions"}\n')
    with s, s.makefile("rb") as f:      # refused: the request is read, then answered no
        reply = json.loads(f.readline())
        assert f.readline() == b""
    assert reply == {"ok": False, "error": "permission denied: root or group sshlog only"}


class SlowConnect(socket.socket):
    """A client socket that pauses after connect(), so the daemon answers and hangs up
    before the request is sent (what a busy client machine sometimes does)."""

    def connect(self, address):
        super().connect(address)
        time.sleep(0.3)


def test_cli_permission_denied_when_the_daemon_hangs_up_first(api, monkeypatch, capsys,
                                                               tmp_path):
    monkeypatch.setattr(sshlog, "peer_allowed", lambda sock: False)
    monkeypatch.setattr(sshlog, "socket", types.SimpleNamespace(
        **dict(vars(socket), socket=SlowConnect)))
    out_file = open(str(tmp_path / "stdout"), "w")        # a real fd, as in a terminal
    monkeypatch.setattr(sys, "stdout", out_file)
    with out_file:
        rc = sshlog.main(["sessions", "--socket", api.path])
    assert (rc, capsys.readouterr().err) == (
        1, "sshlog: error: permission denied: root or group sshlog only\n")


# ---------------------------------------------------------------------------------------
# The CLI client against the server.

def test_cli_sessions_json(api, capsys):
    login(api.tracker)
    assert sshlog.main(["sessions", "--json", "--socket", api.path]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"sessions": api.tracker.sessions()}
    assert err == ""


def test_cli_sessions_table(api, capsys):
    login(api.tracker)
    login(api.tracker, ptm=3062, ip="2001:db8::7", port=40022, tty=5)
    assert sshlog.main(["sessions", "--socket", api.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["User", "Last", "Activity"]
    assert len(lines) == 3
    assert any("211.249.71.117:52566" in l and "/usr/bin/top" in l for l in lines[1:])
    assert any("[2001:db8::7]:40022" in l and l.startswith("mapoo") for l in lines[1:])


def test_cli_status_text(api, capsys):
    assert sshlog.main(["status", "--socket", api.path]) == 0
    out = capsys.readouterr().out
    assert "sshlog %s, pid 4321" % sshlog.__version__ in out
    assert "events: command_start 3, connection_established 1" in out
    assert "bpf ctl 0, bpf tty 2" in out and "filter errors 1" in out
    assert "refused by their ring, taken by the other: ctl 3, tty 1" in out
    assert "terminal reads merged in the kernel: 20517 (waits for a merge slot given up 0)" in out
    assert "action log_events (eventlogfile_action): delivered 4" in out
    assert "config: /etc/sshlog/conf.d/log_events.yaml" in out


def test_cli_status_json(api, capsys):
    assert sshlog.main(["status", "--json", "--socket", api.path]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def run_watch(api, argv, events):
    """main(argv) in this thread; another publishes `events` once the watcher is in, waits
    until they are taken, then stops the stand-in daemon so the stream ends."""
    def feeder():
        try:
            if wait_for(lambda: len(api.daemon.watchers) == 1):
                for ev in events:
                    api.daemon.publish(ev)
                wait_for(lambda: all(w.queue.empty() for w in api.daemon.watchers))
        finally:
            api.daemon.stopping.set()
    t = threading.Thread(target=feeder, daemon=True)
    t.start()
    rc = sshlog.main(argv)
    t.join(5)
    return rc


WATCHED = [
    make_event(sshlog.ConnectionEstablished),
    make_event(sshlog.CommandStart, filename="/usr/bin/id", argv=("id", "-un"), pid=7,
               parent_pid=6),
    make_event(sshlog.TerminalUpdate, terminal_data="hi", data_len=2, raw=b"hi"),
]


def test_cli_watch_json(api, capsys):
    assert run_watch(api, ["watch", "--json", "--socket", api.path], WATCHED) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [json.loads(l) for l in lines] == [e.to_dict() for e in WATCHED[:2]]
    assert all(l.startswith("{") for l in lines)
    assert err == ""


def test_cli_watch_all_includes_terminal_updates(api, capsys):
    assert run_watch(api, ["watch", "--all", "--json", "--socket", api.path], WATCHED) == 0
    types_seen = [json.loads(l)["event_type"] for l in capsys.readouterr().out.splitlines()]
    assert types_seen == ["connection_established", "command_start", "terminal_update"]


def test_cli_watch_text(api, capsys, utc):
    assert run_watch(api, ["watch", "--socket", api.path], WATCHED[:2]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "10:57:16 connection_established (2062) root from ip 211.249.71.117:52566 tty 4",
        "10:57:16 command_start (2062) root executed /usr/bin/id -un"]


@pytest.mark.parametrize("command", [["sessions"], ["sessions", "--json"], ["status"],
                                     ["watch"], ["watch", "--json"]])
def test_cli_without_a_daemon(tmp_path, capsys, command):
    missing = str(tmp_path / "nothing.sock")
    assert sshlog.main(command + ["--socket", missing]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "sshlog: error: no daemon at %s (start it with `sshlog daemon`)\n" % missing


def test_cli_with_a_stale_socket(tmp_path, capsys):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                   # the file stays, nobody listens
    assert sshlog.main(["sessions", "--socket", path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sshlog: error: cannot reach the daemon at %s" % path)
    assert len(err.splitlines()) == 1


def test_socket_path_from_the_environment(api, capsys, monkeypatch):
    monkeypatch.setenv("SSHLOG_SOCKET", api.path)
    assert sshlog.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == 4321


# ---------------------------------------------------------------------------------------
# The real Daemon object (not run): start_api, status() and publish() behind the socket.

class NoProbes:
    callback_errors = decode_errors = 0

    def drops(self):
        return {"ctl": 1, "tty": 0}

    def rerouted(self):
        return {"ctl": 2, "tty": 0}

    def merge_counts(self):
        return {"merged": 7, "waits_given_up": 0}

    def drain(self, final=False):
        return []

    def close(self):
        pass


def test_real_daemon_api(tmp_path, allow_peer, capsys):
    path = str(tmp_path / "run" / "sshlog.sock")
    daemon = sshlog.Daemon(socket_path=path, proc=str(tmp_path / "proc"))
    daemon.probes = NoProbes()
    daemon.pipeline = sshlog.Pipeline(sshlog.Config([], {}, ["a.yaml"], []))
    os.makedirs(os.path.dirname(path))
    daemon.start_api()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        status = one_reply(path, {"cmd": "status"})["data"]
        for key in ("version", "uptime_s", "events", "bpf_drops", "bpf_rerouted", "bpf_merged",
                    "actions", "config_files",
                    "watchers", "sessions", "decode_errors", "filter_errors"):
            assert key in status
        assert (status["bpf_drops"], status["bpf_rerouted"], status["bpf_merged"],
                status["config_files"]) == ({"ctl": 1, "tty": 0}, {"ctl": 2, "tty": 0},
                                            {"merged": 7, "waits_given_up": 0}, ["a.yaml"])
        s, f = ask(path, {"cmd": "watch"})
        with s, f:
            f.readline()
            assert wait_for(lambda: len(daemon.watchers) == 1)
            ev = make_event(sshlog.ConnectionEstablished)
            daemon.publish(ev)
            assert json.loads(f.readline())["text"] == ev.text()
        assert daemon.status()["events"] == {"connection_established": 1}
        assert sshlog.main(["status", "--socket", path]) == 0
        assert "bpf ctl 1, bpf tty 0" in capsys.readouterr().out
    finally:
        daemon.shutdown()
    assert not os.path.exists(path)


# ---------------------------------------------------------------------------------------
# peer_allowed

@pytest.mark.skipif(os.geteuid() != 0, reason="needs euid 0")
def test_peer_allowed_as_root():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert sshlog.peer_allowed(a) is True


class FakePeer:
    def __init__(self, pid, uid, gid):
        self.creds = struct.pack("3i", pid, uid, gid)

    def getsockopt(self, level, option, size):
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return self.creds


@pytest.mark.parametrize("uid,gid,groups,group_exists,allowed", [
    (0, 0, "", False, True),              # root
    (1000, 4242, "", True, True),         # primary group sshlog
    (1000, 1000, "27 4242 100", True, True),   # supplementary group sshlog
    (1000, 1000, "27 100", True, False),
    (1000, 1000, "42420", True, False),   # not a prefix match
    (1000, 4242, "4242", False, False),   # no sshlog group on this host: root only
])
def test_peer_allowed_rules(tmp_path, monkeypatch, uid, gid, groups, group_exists, allowed):
    proc = FakeProc(tmp_path / "proc")
    proc.process(5555, uid=uid, groups=groups)

    def getgrnam(name):
        assert name == "sshlog"
        if not group_exists:
            raise KeyError(name)
        return types.SimpleNamespace(gr_gid=4242)
    monkeypatch.setattr(sshlog.grp, "getgrnam", getgrnam)
    assert sshlog.peer_allowed(FakePeer(5555, uid, gid), proc=proc.base) is allowed
