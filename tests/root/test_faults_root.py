"""Root tier, fault suite: the daemon killed and restarted, stopped mid-flood, its log
directories removed, read-only or full, unprivileged clients, hostile session data.

Every test runs real sshd sessions against the built sshlog.pyz; logs are checked line
by line (JSON Lines parse, text lines follow the text grammar: sshlog.parse_report_line).
"""
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import harness
from sshlog_daemon import SshlogDaemon, sshlog_argv

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if TOP not in sys.path:
    sys.path.insert(0, TOP)
import sshlog  # noqa: E402

pytestmark = pytest.mark.root

GROUP = "sshlog"
MEMBER, OUTSIDER = "sshlogt3", "sshlogt4"


def token():
    return "tok%s" % uuid.uuid4().hex[:10]


def finish_of(daemon, tok, timeout=20):
    return daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and tok in e["args"], timeout=timeout)[0]


def check_logs(*paths):
    """Every line of every log parses: one event per line, nothing cut."""
    counts = {}
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert not data or data.endswith(b"\n"), "%s ends mid-line" % path
        n = 0
        for i, line in enumerate(data.splitlines()):
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                assert isinstance(obj, dict) and obj["event_type"], (path, i)
            else:
                try:
                    sshlog.parse_report_line(line)
                except ValueError as e:
                    raise AssertionError("%s line %d does not parse (%s): %r"
                                         % (path, i + 1, e, line[:300]))
            n += 1
        counts[path] = n
    return counts


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)


def umount(path):
    if mounted(path):
        subprocess.run(["umount", "-l", path], check=True)


def finish(daemon):
    rc = daemon.stop()
    assert rc == 0, "daemon exit status %s\n%s" % (rc, daemon.stderr_text()[-3000:])
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()[-3000:]


# -- SIGKILL and restart ----------------------------------------------------------------------

def test_sigkill_mid_session_then_restart(tmp_path, sshd, users):
    u = users["sshlogt1"]
    workdir = tmp_path / "d"
    first = SshlogDaemon(workdir).start()
    tok1, tok2, tok3 = token(), token(), token()
    second = None
    try:
        with harness.PtySession(sshd, u) as s:
            tty = s.tty_name()
            assert s.run("/bin/echo %s" % tok1) == 0
            fin1 = finish_of(first, tok1)
            s.sendline("/bin/echo %s; sleep 2" % tok2)         # busy while the daemon dies
            time.sleep(0.5)
            first.proc.kill()
            first.proc.wait(10)
            first._stderr.close()
            s.expect(re.compile(rb"PROMPT\$ "), timeout=20)
            second = SshlogDaemon(workdir).start()            # same logs, same socket path
            listing = json.loads(second.cli("sessions", "--json").stdout)["sessions"]
            assert any(r["tty_id"] == tty and r["username"] == u.name for r in listing), listing
            assert s.run("/bin/echo %s" % tok3) == 0
            fin3 = finish_of(second, tok3)
            assert (fin3["ptm_pid"], fin3["session_id"], fin3["username"], fin3["tty_id"]) == (
                fin1["ptm_pid"], fin1["session_id"], u.name, tty)
            est = second.wait_events(lambda e: e["event_type"] == "connection_established"
                                     and e["ptm_pid"] == fin1["ptm_pid"] and e["existing"])
            assert est[0]["session_id"] == fin1["session_id"]
            # the pty master found in /proc is read from: the screen is still recorded
            second.wait_events(lambda e: e["event_type"] == "terminal_update"
                               and e["ptm_pid"] == fin1["ptm_pid"]
                               and tok3 in e["terminal_data"])
        second.wait_events(lambda e: e["event_type"] == "connection_close"
                           and e["ptm_pid"] == fin1["ptm_pid"])
    finally:
        if first.proc.poll() is None:
            first.stop()
        if second is not None:
            finish(second)
    counts = check_logs(second.json_log, second.text_log)
    assert all(counts.values())
    # a report over both daemons' logs sees one session, one login
    for path in (second.json_log, second.text_log):
        r = sshlog.EventReport(users=[u.name])
        r.read(path)
        rep = r.result()
        assert rep["corrupt_lines"] == 0
        mine = [x for x in rep["sessions"] if x["client_port"] == fin1["client_port"]
                or (x["session"] == "p%d" % fin1["ptm_pid"])]
        assert len(mine) == 1 and mine[0]["end"] is not None, mine


# -- SIGTERM during a flood -------------------------------------------------------------------

def test_sigterm_during_a_flood_exits_cleanly_with_logs_flushed(tmp_path, sshd, users):
    u = users["sshlogt2"]
    d = SshlogDaemon(tmp_path / "d").start()          # the JSON log takes terminal updates too
    tok = token()
    try:
        with harness.PtySession(sshd, u) as s:
            s.sendline("/bin/echo %s; seq 1 3000000" % tok)
            d.wait_events(lambda e: e["event_type"] == "command_start"
                          and e["argv"] == ["seq", "1", "3000000"], timeout=30)
            time.sleep(1.0)
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            rc = d.proc.wait(60)
            took = time.monotonic() - t0
            s.expect(re.compile(rb"\r\n3000000\r\n"), timeout=300)   # the session never noticed
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        d._stderr.close()
    assert rc == 0, d.stderr_text()[-3000:]
    assert took < 30, "SIGTERM took %.1f s" % took
    assert "Traceback" not in d.stderr_text()
    counts = check_logs(d.json_log, d.text_log)
    events = d.events()
    assert any(e["event_type"] == "command_finish" and tok in e["args"] for e in events)
    assert sum(e["event_type"] == "terminal_update" for e in events) > 10
    assert counts[d.json_log] == len(events)


# -- the event log's directory removed or made read-only ---------------------------------------

FAULT_LOG = """\
events:
  - event: fault_log
    triggers: [command_finish]
    actions:
      - action: fault_log
        plugin: eventlogfile_action
        log_file_path: %s/event.log
        output_json: true
"""


def test_event_log_directory_removed_or_read_only(tmp_path, sshd, users):
    u = users["sshlogt1"]
    logdir = str(tmp_path / "logdir")
    d = SshlogDaemon(tmp_path / "d", config_text=FAULT_LOG % logdir).start()
    fault_log = os.path.join(logdir, "event.log")
    toks = [token() for _ in range(6)]

    def logged(path):
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""
    try:
        harness.ssh_run(sshd, u, "/bin/echo %s" % toks[0])
        harness.wait_for(lambda: toks[0] in logged(fault_log), 15)
        # removed: recreated at the next event
        shutil.rmtree(logdir)
        harness.ssh_run(sshd, u, "/bin/echo %s" % toks[1])
        harness.wait_for(lambda: toks[1] in logged(fault_log), 15)
        assert os.stat(logdir).st_mode & 0o777 == 0o700
        # read-only: reported (once per interval), retried, the other log keeps going
        shutil.rmtree(logdir)
        mount_tmpfs(logdir, "ro,size=1m")
        try:
            t0 = time.monotonic()
            for tok in toks[2:5]:
                harness.ssh_run(sshd, u, "/bin/echo %s" % tok)
                finish_of(d, tok)                      # the JSON test log has it
            harness.wait_for(lambda: d.status()["actions"]["fault_log"]["failed"] >= 3, 15)
            ro_time = time.monotonic() - t0
            assert d.proc.poll() is None
        finally:
            umount(logdir)
        reports = [line for line in d.stderr_text().splitlines()
                   if "fault_log" in line and "event lost" in line]
        assert reports and "Read-only file system" in reports[0]
        assert len(reports) <= 1 + int(ro_time // sshlog.ActionRunner.LOG_EVERY), reports
        # back: writing resumes by itself
        harness.ssh_run(sshd, u, "/bin/echo %s" % toks[5])
        harness.wait_for(lambda: toks[5] in logged(fault_log), 15)
        assert "writing again" in d.stderr_text()
    finally:
        umount(logdir)
        finish(d)
    check_logs(fault_log, d.json_log, d.text_log)
    assert all(any(t in e.get("args", "") for e in d.events()) for t in toks)


# -- the session recordings on a full file system ----------------------------------------------

RECORDINGS = """\
events:
  - event: recordings
    triggers: [connection_established, connection_close, terminal_update]
    actions:
      - action: recordings
        plugin: sessionlog_action
        log_directory: %s
"""


def test_session_log_directory_on_a_full_file_system(tmp_path, sshd, users):
    if "sessionlog_action" not in sshlog.ACTIONS:
        pytest.skip("sessionlog_action is not registered yet")
    u = users["sshlogt2"]
    mnt = str(tmp_path / "small")
    mount_tmpfs(mnt, "size=256k,mode=0700")
    d = None
    try:
        d = SshlogDaemon(tmp_path / "d", config_text=RECORDINGS % mnt).start()
        tok, tok2 = token(), token()
        with harness.PtySession(sshd, u) as s:
            assert s.run("seq 1 200000 >/dev/tty; /bin/echo %s" % tok, timeout=120) == 0
            finish_of(d, tok)                          # the event log kept going
            # sessionlog_action handles its own write errors (the runner's `failed` stays 0):
            # the problem shows on stderr
            harness.wait_for(lambda: "No space left" in d.stderr_text(), 20,
                             desc="the full file system reported")
            assert d.proc.poll() is None
        reports = [line for line in d.stderr_text().splitlines() if "No space left" in line]
        assert 1 <= len(reports) <= 3, reports         # not once per event
        # space returns: a new session is recorded again
        subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        with harness.PtySession(sshd, u) as s:
            assert s.run("/bin/echo %s" % tok2) == 0
            ptm = finish_of(d, tok2)["ptm_pid"]

        def recorded():
            for name in os.listdir(mnt):
                if str(ptm) in name and name.endswith(".log"):
                    with open(os.path.join(mnt, name), "rb") as f:
                        if tok2.encode() in f.read():
                            return True
            return False
        harness.wait_for(recorded, 20, desc="the new session's recording")
        st = d.status()["actions"]
        assert st["json_log"]["failed"] == 0 and st["text_log"]["failed"] == 0
    finally:
        if d is not None:
            finish(d)
        umount(mnt)
    check_logs(d.json_log, d.text_log)


# -- who may use the socket ---------------------------------------------------------------------

def _as_user(name, argv, timeout=30, **kw):
    pw = pwd.getpwnam(name)

    def drop():
        os.initgroups(name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "LANG": "C.UTF-8"}
    return subprocess.run(argv, preexec_fn=drop, env=env, capture_output=True,
                          timeout=timeout, cwd="/", **kw)


RAW_REQUEST = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall((sys.argv[2] + "\n").encode())
f = s.makefile("rb")
print(f.readline().decode().strip())
"""


@pytest.fixture(scope="module")
def socket_users(users):
    """Group sshlog (created if missing, left in place), a member and an outsider."""
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    key_dir = tempfile.mkdtemp(prefix="sshlog-faults-keys-")
    member = harness.create_user(MEMBER, "Pw-%s-9" % MEMBER, key_dir=key_dir)
    outsider = harness.create_user(OUTSIDER, "Pw-%s-9" % OUTSIDER, key_dir=key_dir)
    subprocess.run(["usermod", "-aG", GROUP, MEMBER], check=True)
    if OUTSIDER in grp.getgrnam(GROUP).gr_mem:
        subprocess.run(["gpasswd", "-d", OUTSIDER, GROUP], check=True, capture_output=True)
    yield member, outsider
    shutil.rmtree(key_dir, ignore_errors=True)


def test_socket_permissions(sshd, users, socket_users):
    # a directory everyone may traverse, so that only the socket's own checks decide
    work = tempfile.mkdtemp(prefix="sshlog-perm-")
    os.chmod(work, 0o755)
    d = SshlogDaemon(os.path.join(work, "d"), extra_args=["--enable-session-injection"])
    os.chmod(d.dir, 0o755)
    d.start()
    cli = sshlog_argv()
    try:
        st = os.stat(d.socket)
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam(GROUP).gr_gid
        tok = token()
        with harness.PtySession(sshd, users["sshlogt1"]) as s:
            tty = s.tty_name()
            # outside the group: refused by the socket's mode, with a clear message
            for cmd in ("sessions", "watch", "status"):
                r = _as_user(OUTSIDER, cli + [cmd, "--socket", d.socket])
                assert r.returncode == 1, (cmd, r)
                assert b"permission denied" in r.stderr and b"Traceback" not in r.stderr
            # ... and by the daemon itself (SO_PEERCRED) when the mode would let it in
            os.chmod(d.socket, 0o666)
            try:
                r = _as_user(OUTSIDER, ["/usr/bin/python3", "-c", RAW_REQUEST, d.socket,
                                        '{"cmd": "sessions"}'])
                reply = json.loads(r.stdout)
                assert reply["ok"] is False and "permission denied" in reply["error"], reply
                r = _as_user(OUTSIDER, cli + ["sessions", "--socket", d.socket])
                assert r.returncode == 1 and b"permission denied" in r.stderr, r
            finally:
                os.chmod(d.socket, 0o660)
            # a member lists and watches
            r = _as_user(MEMBER, cli + ["sessions", "--json", "--socket", d.socket])
            assert r.returncode == 0, r.stderr
            assert any(x["tty_id"] == tty for x in json.loads(r.stdout)["sessions"])
            pw = pwd.getpwnam(MEMBER)

            def drop():
                os.initgroups(MEMBER, pw.pw_gid)
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
            watch = subprocess.Popen(cli + ["watch", "--socket", d.socket], preexec_fn=drop,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
            try:
                time.sleep(1.5)
                s.run("/bin/echo %s" % tok)
                finish_of(d, tok)
                time.sleep(0.5)
            finally:
                watch.send_signal(signal.SIGINT)
                out, err = watch.communicate(timeout=10)
            assert tok.encode() in out, (out[-500:], err)
            # a member may not kill, nor type into a session
            r = _as_user(MEMBER, cli + ["kill", str(tty), "--socket", d.socket])
            assert r.returncode == 1 and b"only root may kill" in r.stderr, r
            r = _as_user(MEMBER, ["/usr/bin/python3", "-c", RAW_REQUEST, d.socket, json.dumps(
                {"cmd": "attach", "tty": tty, "readonly": False, "rows": 24, "cols": 80})])
            reply = json.loads(r.stdout)
            assert reply["ok"] is True and reply["data"]["readonly"] is True, reply
            assert "only root" in reply["data"]["why_readonly"]
            assert s.run("true") == 0                  # the session is untouched
    finally:
        finish(d)
        shutil.rmtree(work, ignore_errors=True)


# -- hostile data from sessions ----------------------------------------------------------------

FAKE = "%s from ip 6.6.6.6"        # short, no ":" (see the report notes)
ESCAPES = "$'\\e]0;pwned\\a' $'\\e[2J\\e[H' $'\\e[?1049h' $'\\x9b31m' $'\\xc2\\x9b6n' $'\\eP+q\\e\\\\'"


def test_hostile_session_data_stays_one_event_per_line(daemon, sshd, users, tmp_path):
    u = users["sshlogt2"]
    tok = token()
    watchers = [subprocess.Popen(sshlog_argv() + ["watch"] + extra + ["--socket", daemon.socket],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for extra in ([], ["--json"])]
    time.sleep(1.5)
    try:
        # argv full of escape sequences, invalid UTF-8, a 100 KB argument
        harness.ssh_run(sshd, u, "/bin/echo %s-esc %s" % (tok, ESCAPES))
        harness.ssh_run(sshd, u, "/bin/echo %s-utf $'\\xff\\xfe\\xc3' $'\\xed\\xa0\\x80'" % tok)
        harness.ssh_run(sshd, u, "/bin/echo %s-big $(head -c 100000 /dev/zero | tr '\\0' a) "
                                 ">/dev/null" % tok, timeout=60)
        # a file name with a newline and escapes, uploaded; an account name that imitates
        # the text form (OpenSSH's client refuses control characters in user names)
        src = tmp_path / "payload"
        src.write_bytes(b"x" * 1000)
        remote = "/tmp/%s-up\nname\x1b[31m.bin" % tok
        assert harness.scp_upload(sshd, u, str(src), remote).returncode == 0
        assert harness.ssh_unknown_user(sshd, FAKE % tok[:8], "pw").returncode != 0
        for suffix in ("-esc", "-utf", "-big"):
            finish_of(daemon, tok + suffix)
        up = daemon.wait_events(lambda e: e["event_type"] == "file_upload"
                                and tok in e["target_path"])[0]
        failed = daemon.wait_events(lambda e: e["event_type"] == "connection_auth_failed"
                                    and e["username"].startswith(tok[:8]), timeout=30)[0]
        time.sleep(1)
    finally:
        for w in watchers:
            w.send_signal(signal.SIGINT)
        outs = [w.communicate(timeout=10)[0] for w in watchers]
    try:
        os.unlink(remote)
    except OSError:
        pass
    assert up["target_path"] == remote and failed["username"] == FAKE % tok[:8]
    esc = finish_of(daemon, tok + "-esc")
    assert "\x1b]0;pwned\x07" in esc["argv"], "kept exactly in JSON"
    big = finish_of(daemon, tok + "-big")
    assert big["argv_truncated"] is True and len(big["args"]) <= 70000
    utf = finish_of(daemon, tok + "-utf")
    assert "\\xff\\xfe\\xc3" in utf["argv"], "invalid UTF-8 escaped, not dropped"
    # logs: one event per line, both forms, nothing raw
    check_logs(daemon.json_log, daemon.text_log)
    with open(daemon.text_log, "rb") as f:
        text = f.read()
    mine = [line for line in text.splitlines() if tok.encode() in line or tok[:8].encode() in line]
    assert len(mine) >= 8, mine
    for line in mine:
        assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", line), line[:200]
    assert any(b"/tmp/%s-up\\x0aname\\x1b[31m.bin" % tok.encode() in line for line in mine)
    # the watchers' terminals get no raw control sequence
    for out in outs:
        assert tok.encode() in out
        assert b"\x1b" not in out and b"\x07" not in out and b"\xc2\x9b" not in out, out[-800:]
    # and the report over these logs reads them all, the fake account in its place
    for path in (daemon.json_log, daemon.text_log):
        r = sshlog.EventReport()
        r.read(path)
        rep = r.result()
        assert rep["corrupt_lines"] == 0
        assert {"client_ip": "127.0.0.1", "count": 1} in rep["failed_logins"]["by_source"] or \
            any(x["client_ip"] == "127.0.0.1" for x in rep["failed_logins"]["by_source"])
        assert {"username": FAKE % tok[:8], "count": 1} in rep["failed_logins"]["by_account"]
        out = sshlog.render_report(rep, "text")
        assert "\x1b" not in out and tok in out
