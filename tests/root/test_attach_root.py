"""Root tier: `attach` and `kill` on real ssh sessions, the watcher driven in tmux.

tmux runs on a private server socket (-L) per test, killed by that socket at the end.
The module daemon runs with --enable-session-injection; one test starts a second daemon
without it.
"""
import json
import os
import re
import shlex
import subprocess
import time
import uuid

import pytest

import harness
from sshlog_daemon import ALL_TRIGGERS, SshlogDaemon, sshlog_argv

pytestmark = pytest.mark.root

SUDOERS = "/etc/sudoers.d/sshlog-tests-attach"
TRIGGERS = ALL_TRIGGERS + ["session_attach"]


def token():
    return "tok%s" % uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def adaemon(tmp_path_factory, sshd, users):
    d = SshlogDaemon(tmp_path_factory.mktemp("attach"), triggers=TRIGGERS,
                     extra_args=["--enable-session-injection"]).start()
    yield d
    assert d.stop() == 0, d.stderr_text()


class Tmux:
    """A private tmux server running one watcher command in a window of a given size."""

    def __init__(self, argv, rows, cols):
        self.name = "sshlog-test-%s" % uuid.uuid4().hex[:8]
        command = " ".join(shlex.quote(a) for a in argv) + "; sleep 600"
        self.tmux("new-session", "-d", "-s", "w", "-x", str(cols), "-y", str(rows), command)

    def tmux(self, *args):
        r = subprocess.run(["tmux", "-L", self.name] + list(args), capture_output=True,
                           timeout=20)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode("utf-8", "replace")

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "w")

    def wait(self, pred, timeout=15, desc=None):
        seen = []

        def check():
            seen[:] = [self.screen()]
            return pred(seen[0])
        try:
            harness.wait_for(check, timeout, interval=0.1, desc=desc)
            return seen[0]
        except AssertionError:
            raise AssertionError("%s; the watcher's screen:\n%s" % (desc, seen[0] if seen
                                                                     else "?"))

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "w", *keys)

    def close(self):
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True,
                       timeout=20)


@pytest.fixture
def watchers():
    made = []

    def make(daemon, tty, rows=50, cols=150, readonly=False):
        argv = sshlog_argv() + ["attach", str(tty), "--socket", daemon.socket]
        t = Tmux(argv + (["--readonly"] if readonly else []), rows, cols)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


def session_ready(daemon, s):
    """The session's tty, once the daemon lists it (attach needs it established)."""
    tty = s.tty_name()
    harness.wait_for(lambda: any(x["tty_id"] == tty for x in json.loads(
        daemon.cli("sessions", "--json").stdout)["sessions"]), 15, desc="session listed")
    daemon.wait_events(lambda e: e["event_type"] == "command_finish" and e["tty_id"] == tty
                       and e["filename"] == "/usr/bin/tty")
    return tty


def audit(daemon, ptm, action, count=1, timeout=15):
    return daemon.wait_events(lambda e: e["event_type"] == "session_attach"
                              and e["ptm_pid"] == ptm and e["action"] == action,
                              count=count, timeout=timeout)


def test_attach_shows_the_screen_at_once_then_follows(adaemon, sshd, users, watchers):
    u = users["sshlogt1"]
    tok, later = token(), token()
    with harness.PtySession(sshd, u) as s:
        tty = session_ready(adaemon, s)
        assert s.run("for i in $(seq 1 60); do echo %s-$i; done" % tok) == 0
        t0 = time.monotonic()
        w = watchers(adaemon, tty)
        screen = w.wait(lambda t: "%s-60" % tok in t and "PROMPT$" in t, 10,
                        "the current screen")
        took = time.monotonic() - t0
        lines = screen.splitlines()
        # the session's 40 rows as they are: the loop's last 38 lines, the marker and the
        # prompt at the bottom; below them, the status line at the window's last row
        assert lines[0] == "%s-23" % tok and lines[37] == "%s-60" % tok
        assert re.fullmatch(r"__done_\d+_0__", lines[38]) and lines[39].startswith("PROMPT$")
        assert len(lines) == 50 and "Ctrl+Q detaches" in lines[-1]
        assert "typing goes to the session" in lines[-1]
        assert took < 8, took
        s.run("echo %s" % later)
        w.wait(lambda t: re.search(r"^%s$" % later, t, re.M), 10, "live output")
        w.keys("C-q")
        w.wait(lambda t: "Detached from TTY %d (detached)." % tty in t, 10, "detach")
    est = adaemon.wait_events(lambda e: e["event_type"] == "connection_established"
                              and e["tty_id"] == tty)[-1]
    att = audit(adaemon, est["ptm_pid"], "attach")[0]
    assert att["admin_uid"] == 0 and att["admin_name"] == "root" and att["readonly"] is False
    assert att["username"] == u.name and att["tty_id"] == tty
    audit(adaemon, est["ptm_pid"], "detach")
    print("attach: current screen shown %.2f s after the command started" % took)


def test_watcher_smaller_than_the_session_sees_the_cursor_part(adaemon, sshd, users,
                                                               watchers):
    u = users["sshlogt2"]
    tok = token()
    with harness.PtySession(sshd, u) as s:
        tty = session_ready(adaemon, s)
        assert s.run("for i in $(seq 1 60); do echo %s-$i; done" % tok) == 0
        w = watchers(adaemon, tty, rows=20, cols=60)
        screen = w.wait(lambda t: "%s-60" % tok in t, 10, "the current screen")
        lines = screen.splitlines()
        assert len(lines) <= 20 and all(len(x) <= 60 for x in lines)
        assert lines[-2].startswith("PROMPT$") and lines[-1].startswith(" Ctrl+Q detaches")
        assert "rows 22-40" in lines[-1]
        s.run("echo wide-%s-%s" % ("x" * 70, tok))    # longer than the watcher's window
        w.wait(lambda t: "__done_" in t.splitlines()[-3], 10, "follows")
        w.keys("C-q")
        w.wait(lambda t: "Detached from TTY %d" % tty in t, 10, "detach")


def test_injection_types_into_the_session(adaemon, target, watchers):
    sshd, u = target.sshd, target.users["sshlogt1"]
    with harness.PtySession(sshd, u) as s:
        tty = session_ready(adaemon, s)
        w = watchers(adaemon, tty)
        w.wait(lambda t: "Ctrl+Q detaches" in t, 10, "attached")
        marker = "/tmp/sshlog-injected-%s" % uuid.uuid4().hex[:8]
        w.keys("-l", "echo Injected-\u20ac-$((6*7)) | tee %s" % marker)
        w.keys("Enter")
        s.expect("Injected-\u20ac-42\r\n", timeout=10)
        w.wait(lambda t: re.search(r"^Injected-\u20ac-42$", t, re.M), 10, "the echo mirrored")
        on_host = sshd.host_path(marker)
        assert harness.wait_for(lambda: os.path.exists(on_host), 5)
        with open(on_host, encoding="utf-8") as f:
            assert f.read() == "Injected-\u20ac-42\n", "UTF-8 intact, run by the session's shell"
        assert os.stat(on_host).st_uid == u.uid
        os.unlink(on_host)
        w.keys("C-q")
        w.wait(lambda t: "Detached from TTY %d" % tty in t, 10, "detach")
    est = adaemon.wait_events(lambda e: e["event_type"] == "connection_established"
                              and e["tty_id"] == tty)[-1]
    inputs = audit(adaemon, est["ptm_pid"], "input")
    typed = "".join(e["input_data"] for e in inputs)
    assert "echo Injected-\u20ac-$((6*7))" in typed and "pty master of sshd" in \
        inputs[0]["detail_text"]
    assert all(e["admin_uid"] == 0 for e in inputs)


def test_readonly_attach_never_types(adaemon, sshd, users, watchers):
    u = users["sshlogt2"]
    tok = token()
    with harness.PtySession(sshd, u) as s:
        tty = session_ready(adaemon, s)
        w = watchers(adaemon, tty, readonly=True)
        w.wait(lambda t: "| read-only |" in t, 10, "attached read-only")
        w.keys("-l", "echo %s" % tok)
        w.keys("Enter")
        w.wait(lambda t: "what you type is not sent" in t, 10, "the refusal")
        time.sleep(1)
        assert tok.encode() not in s.output
        assert s.run("true") == 0, "the session is untouched"
        w.keys("C-q")
        w.wait(lambda t: "Detached from TTY %d" % tty in t, 10, "detach")
    est = adaemon.wait_events(lambda e: e["event_type"] == "connection_established"
                              and e["tty_id"] == tty)[-1]
    assert audit(adaemon, est["ptm_pid"], "attach")[0]["readonly"] is True
    time.sleep(0.5)
    assert not [e for e in adaemon.session_events(est["ptm_pid"])
                if e["event_type"] == "session_attach" and e["action"] == "input"]


def test_without_the_injection_flag_attach_is_read_only(tmp_path, sshd, users, watchers):
    d = SshlogDaemon(tmp_path / "noinject", triggers=TRIGGERS).start()
    try:
        u = users["sshlogt1"]
        tok = token()
        with harness.PtySession(sshd, u) as s:
            tty = session_ready(d, s)
            w = watchers(d, tty)
            w.wait(lambda t: "read-only: the daemon runs without --enable-session-injection"
                   in t, 10, "says it is read-only")
            w.keys("-l", "echo %s" % tok)
            w.keys("Enter")
            time.sleep(1.5)
            assert tok.encode() not in s.output
            w.keys("C-q")
            w.wait(lambda t: "Detached from TTY" in t, 10, "detach")
        st = d.status()
        assert st["session_injection"] is False
    finally:
        assert d.stop() == 0


def test_attach_refuses_your_own_session(adaemon, sshd, users):
    """Run from inside the session (as root through sudo): the CLI sees its terminal is
    the session's, and the daemon sees the peer is the session's descendant."""
    u = users["sshlogt1"]
    with open(SUDOERS, "w") as f:
        f.write("%s ALL=(ALL) NOPASSWD: ALL\n" % u.name)
    os.chmod(SUDOERS, 0o440)
    probe = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "s.sendall(json.dumps({'cmd':'attach','tty':int(sys.argv[2])}).encode()+b'\\n'); "
             "print(s.makefile().readline())")
    try:
        with harness.PtySession(sshd, u, cols=400) as s:     # long command lines stay whole
            tty = session_ready(adaemon, s)
            cli = " ".join(shlex.quote(a) for a in sshlog_argv() + [
                "attach", str(tty), "--socket", adaemon.socket])
            assert s.run("sudo %s" % cli, timeout=20) == 1
            assert "refusing to attach to your own session (tty %d)" % tty in s.last_output
            assert s.run("sudo /usr/bin/python3 -c %s %s %d </dev/null" % (
                shlex.quote(probe), shlex.quote(adaemon.socket), tty), timeout=20) == 0
            reply = json.loads(s.last_output.strip().splitlines()[-1])
            assert reply == {"ok": False, "error": "refusing to attach to your own session "
                                                   "(tty %d)" % tty}
    finally:
        os.unlink(SUDOERS)


def test_kill_ends_the_session(adaemon, target, watchers):
    sshd, u = target.sshd, target.users["sshlogt2"]
    with harness.PtySession(sshd, u) as s:
        tty = session_ready(adaemon, s)
        w = watchers(adaemon, tty, readonly=True)
        w.wait(lambda t: "Ctrl+Q detaches" in t, 10, "attached")
        r = adaemon.cli("kill", str(tty))
        assert re.match(r"Ended the session on TTY %d \(user %s, sshd \d+\): SIGTERM to sshd "
                        r"\d+" % (tty, u.name), r.stdout.decode()), r.stdout
        assert s.wait(15) == 255, "the client saw its connection closed"
        w.wait(lambda t: "Detached from TTY %d (the session ended)." % tty in t, 15,
               "the watcher is told")
    est = adaemon.wait_events(lambda e: e["event_type"] == "connection_established"
                              and e["tty_id"] == tty)[-1]
    close = adaemon.wait_events(lambda e: e["event_type"] == "connection_close"
                                and e["ptm_pid"] == est["ptm_pid"])[0]
    kill = audit(adaemon, est["ptm_pid"], "kill")[0]
    assert kill["admin_uid"] == 0 and kill["detail_text"].startswith("SIGTERM to sshd ")
    events = adaemon.session_events(est["ptm_pid"])
    assert events.index(kill) < events.index(close), "the kill is logged before the close"
    r = adaemon.cli("kill", str(tty), check=False)
    assert r.returncode == 1 and b"no session on tty %d" % tty in r.stderr
