"""Root tier: real sshd, real clients, real BPF — one test per event kind and edge."""
import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

import harness
from sshlog_daemon import SshlogDaemon

pytestmark = pytest.mark.root


def token():
    return "tok%s" % uuid.uuid4().hex[:10]


def ptm_of(daemon, pred, timeout=15):
    return daemon.wait_events(pred, timeout=timeout)[0]["ptm_pid"]


def finish_of(daemon, tok, timeout=15):
    return daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and tok in e["args"], timeout=timeout)[0]


def test_pty_login_established_commands_and_close(daemon, target):
    sshd, users = target.sshd, target.users
    u = users["sshlogt1"]
    tok = token()
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        assert s.run("/bin/echo %s" % tok) == 0
        est = daemon.established(s, tty)
    ptm = est["ptm_pid"]
    close = daemon.wait_events(lambda e: e["event_type"] == "connection_close"
                               and e["ptm_pid"] == ptm)[0]
    assert est["user_id"] == u.uid
    assert est["client_ip"] == "127.0.0.1" and est["client_port"] > 0
    assert est["server_ip"] == "127.0.0.1" and est["server_port"] == sshd.port
    assert est["tcp_info"] == {"client_ip": "127.0.0.1", "client_port": est["client_port"],
                               "server_ip": "127.0.0.1", "server_port": sshd.port}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", est["timestamp"])
    assert close["session_id"] == est["session_id"] and close["duration_ms"] >= 0
    events = daemon.session_events(ptm)
    starts = [e for e in events if e["event_type"] == "command_start"]
    assert starts[0]["argv"] == ["-bash"], "the login shell is the first command"
    echo = [e for e in events if e["event_type"] == "command_finish" and tok in e["args"]]
    assert echo and echo[0]["exit_code"] == 0 and echo[0]["stdout"] == tok + "\n"
    assert echo[0]["args"] == "/bin/echo %s" % tok and echo[0]["filename"] == "/bin/echo"
    # the text log carries the same story in the original's words
    with open(daemon.text_log) as f:
        text = f.read()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d connection_established \(%d\) %s from ip "
                     r"127\.0\.0\.1:%d tty %d$" % (ptm, u.name, est["client_port"], tty), text, re.M)
    assert re.search(r"command_finish \(%d\) %s execute complete \(exit code: 0\) /bin/echo %s$"
                     % (ptm, u.name, tok), text, re.M)
    assert re.search(r"connection_close \(%d\) %s from ip 127\.0\.0\.1:%d$"
                     % (ptm, u.name, est["client_port"]), text, re.M)


def test_non_pty_command_exit_code_and_many_args(daemon, target):
    sshd, users = target.sshd, target.users
    tok = token()
    args = " ".join("a%d" % i for i in range(40))
    r = harness.ssh_run(sshd, users["sshlogt2"], "/bin/echo %s %s; exit 5" % (tok, args))
    assert r.returncode == 5
    fin = finish_of(daemon, tok)
    assert fin["tty_id"] == -1 and fin["username"] == "sshlogt2"
    assert fin["argv"] == ["/bin/echo", tok] + args.split(), "full argv, no 7-argument limit"
    assert not fin["argv_truncated"]
    shell = daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                               and e["ptm_pid"] == fin["ptm_pid"] and e["argv"][:2] == ["bash", "-c"])
    assert shell[0]["exit_code"] == 5


def test_signal_death_reports_the_signal(daemon, target):
    sshd, users = target.sshd, target.users
    tok = token()
    harness.ssh_run(sshd, users["sshlogt1"],
                    "sh -c 'kill -TERM $$' %s; sh -c 'kill -KILL $$' %s; true" % (tok, tok))
    fins = daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and e["argv"][:1] == ["sh"] and tok in e["args"], count=2)
    by_sig = {e["signal"]: e["exit_code"] for e in fins}
    assert by_sig == {"SIGTERM": 143, "SIGKILL": 137}


def test_pipeline_nested_shell_and_parent_pids(daemon, target):
    sshd, users = target.sshd, target.users
    tok = token()
    harness.ssh_run(sshd, users["sshlogt1"],
                    "bash -c \"echo %s | tr a-z A-Z | cat\"; sh -c 'sh -c \"exit 4\"' %s" % (tok, tok))
    nested = daemon.wait_events(lambda e: e["event_type"] == "command_start"
                                and e["argv"] == ["bash", "-c", "echo %s | tr a-z A-Z | cat" % tok])[0]
    ptm = nested["ptm_pid"]
    fins = daemon.wait_events(lambda e: e["event_type"] == "command_finish" and e["ptm_pid"] == ptm
                              and e["filename"] in ("/usr/bin/tr", "/usr/bin/cat"), count=2)
    for fin in fins:
        assert fin["parent_pid"] == nested["pid"], "pipeline members are children of the nested bash"
        assert fin["exit_code"] == 0
    inner = daemon.wait_events(lambda e: e["event_type"] == "command_finish" and e["ptm_pid"] == ptm
                               and e["argv"] == ["sh", "-c", "exit 4"])
    assert inner[0]["exit_code"] == 4


def test_invalid_utf8_and_escape_sequences_are_kept(daemon, target):
    sshd, users = target.sshd, target.users
    tok = token()
    harness.ssh_run(sshd, users["sshlogt1"], "/bin/echo %s $'\\xff\\xfe' $'\\e[2J'" % tok)
    fin = finish_of(daemon, tok)
    assert fin["argv"][2] == "\\xff\\xfe", "invalid UTF-8 is escaped, not dropped"
    assert fin["argv"][3] == "\x1b[2J"
    with open(daemon.text_log, "rb") as f:
        line = [l for l in f.read().splitlines() if tok.encode() in l and b"finish" in l][0]
    assert b"\x1b" not in line and b"\\x1b[2J" in line, "text log lines cannot carry escapes"


def test_uploads_scp_both_protocols_and_sftp(daemon, target, tmp_path):
    sshd, users = target.sshd, target.users
    u = users["sshlogt2"]
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(123457))
    tok = token()
    harness.scp_upload(sshd, u, str(src), "/tmp/%s-sftp.bin" % tok)
    harness.scp_upload(sshd, u, str(src), "/tmp/%s-legacy.bin" % tok, legacy=True)
    harness.sftp_put(sshd, u, [(str(src), "/tmp/%s-put.bin" % tok), (str(src), "%s-rel.bin" % tok)])
    ups = daemon.wait_events(lambda e: e["event_type"] == "file_upload" and tok in e["target_path"],
                             count=4)
    paths = {e["target_path"]: e for e in ups}
    assert set(paths) == {"/tmp/%s-sftp.bin" % tok, "/tmp/%s-legacy.bin" % tok,
                          "/tmp/%s-put.bin" % tok, "%s/%s-rel.bin" % (u.home, tok)}
    for e in ups:
        assert e["bytes"] == 123457 and e["username"] == u.name and e["file_mode"]
    for p in paths:
        os.unlink(sshd.host_path(p))


def test_auth_failures_key_password_unknown_user(daemon, target):
    sshd, users = target.sshd, target.users
    u = users["sshlogt1"]
    assert harness.ssh_bad_key(sshd, u).returncode != 0
    assert harness.ssh_password(sshd, u.name, "wrong-password", "true").returncode != 0
    name = "nouser%s" % uuid.uuid4().hex[:6]
    assert harness.ssh_unknown_user(sshd, name, "whatever").returncode != 0
    key = daemon.wait_events(lambda e: e["event_type"] == "connection_auth_failed"
                             and e["username"] == u.name and e["auth_method"] == "publickey")
    pw = daemon.wait_events(lambda e: e["event_type"] == "connection_auth_failed"
                            and e["username"] == u.name and e["auth_method"] == "password")
    unknown = daemon.wait_events(lambda e: e["event_type"] == "connection_auth_failed"
                                 and e["username"] == name, timeout=20)
    assert len(unknown) == 1 and unknown[0]["reason"] == "invalid user"
    for ev in (key[-1], pw[-1], unknown[0]):
        assert ev["client_ip"] == "127.0.0.1"
        # a connection that never authenticated: failure and close only
        evs = daemon.session_events(ev["ptm_pid"])
        kinds = {e["event_type"] for e in daemon.wait_events(
            lambda e: e["ptm_pid"] == ev["ptm_pid"] and e["event_type"] == "connection_close")}
        kinds |= {e["event_type"] for e in evs}
        assert kinds <= {"connection_auth_failed", "connection_close"}, kinds


def test_ipv6_client(daemon, target):
    sshd, users = target.sshd, target.users
    tok = token()
    harness.ssh_run(sshd, users["sshlogt1"], "/bin/echo %s" % tok, host="::1")
    fin = finish_of(daemon, tok)
    assert fin["client_ip"] == "::1" and fin["server_ip"] == "::1"
    assert fin["server_port"] == sshd.port


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_session_read_after_it_ended_keeps_the_server_address(daemon, target, host):
    # the daemon stopped while the whole session runs: its sockets are gone from
    # /proc when the records are read, so our end must come from the kernel
    sshd, users = target.sshd, target.users
    tok = token()
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        harness.ssh_run(sshd, users["sshlogt1"], "/bin/echo %s" % tok, host=host)
        time.sleep(0.5)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    fin = finish_of(daemon, tok)
    assert (fin["client_ip"], fin["server_ip"], fin["server_port"]) == (host, host, sshd.port)


def test_sudo_in_session(daemon, sshd, users):
    if not os.path.exists("/usr/bin/sudo"):
        pytest.fail("sudo is not installed: `make deps` installs it")
    u = users["sshlogt1"]
    with open("/etc/sudoers.d/sshlog-tests", "w") as f:
        f.write("%s ALL=(ALL) ALL\n" % u.name)
    os.chmod("/etc/sudoers.d/sshlog-tests", 0o440)
    tok = token()
    try:
        with harness.PtySession(sshd, u) as s:
            s.sendline("sudo -k; sudo /bin/echo %s" % tok)
            s.expect(re.compile(rb"password for"), timeout=15)
            s.sendline(u.password)
            s.expect(tok.encode() + b"\r\n")
    finally:
        os.unlink("/etc/sudoers.d/sshlog-tests")
    fin = finish_of(daemon, tok)
    assert fin["username"] == u.name and fin["command_uid"] == 0
    sudo = daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and e["ptm_pid"] == fin["ptm_pid"] and e["filename"] == "/usr/bin/sudo"
                              and tok in e["args"])
    assert sudo[0]["exit_code"] == 0


def test_terminal_stream_is_complete(daemon, target):
    sshd, users = target.sshd, target.users
    u = users["sshlogt2"]
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        start = len(s.output)
        assert s.run("seq 1 30000", timeout=30) == 0
        time.sleep(0.5)
        shown = s.output[start:]
    est = daemon.established(s, tty)
    daemon.wait_events(lambda e: e["event_type"] == "connection_close"
                       and e["ptm_pid"] == est["ptm_pid"])
    stream = "".join(e["terminal_data"] for e in daemon.session_events(est["ptm_pid"])
                     if e["event_type"] == "terminal_update").encode()
    assert shown.decode() in stream.decode(), "every byte the client saw was captured"
    assert "\r\n29999\r\n30000\r\n" in stream.decode()
    st = daemon.status()
    assert st["bpf_drops"] == {"ctl": 0, "tty": 0}


def test_concurrent_sessions_sessions_and_watch_cli(daemon, target):
    sshd, users = target.sshd, target.users
    watch = subprocess.Popen(["timeout", "-s", "INT", "20"] + __import__("sshlog_daemon").sshlog_argv()
                             + ["watch", "--socket", daemon.socket], stdout=subprocess.PIPE)
    watch_json = subprocess.Popen(["timeout", "-s", "INT", "20"] + __import__("sshlog_daemon").sshlog_argv()
                                  + ["watch", "--json", "--socket", daemon.socket], stdout=subprocess.PIPE)
    time.sleep(1)
    tok = token()
    with harness.PtySession(sshd, users["sshlogt1"]) as a, \
            harness.PtySession(sshd, users["sshlogt2"]) as b:
        ta, tb = a.tty_name(), b.tty_name()
        assert ta != tb
        a.run("/bin/echo %s" % tok)
        daemon.wait_events(lambda e: e["event_type"] == "command_finish" and tok in e["args"])
        listing = json.loads(daemon.cli("sessions", "--json").stdout)["sessions"]
        mine = {(s["username"], s["tty_id"]) for s in listing}
        assert {("sshlogt1", ta), ("sshlogt2", tb)} <= mine
        row = [s for s in listing if s["tty_id"] == ta][0]
        assert row["last_command"] == "/bin/echo %s" % tok and row["client_ip"] == "127.0.0.1"
        table = daemon.cli("sessions").stdout.decode()
        assert table.splitlines()[0].split() == ["User", "Last", "Activity", "Last", "Command",
                                                 "Session", "Start", "Client", "IP", "TTY", "SSHD"]
        assert re.search(r"^sshlogt1\s+just now\s+/bin/echo %s\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+"
                         r"127\.0\.0\.1:\d+\s+%d\s+%d:%d" % (tok, ta, sshd.pid, sshd.port), table, re.M)
    watch.send_signal(2)
    watch_json.send_signal(2)
    out = watch.communicate(timeout=10)[0].decode()
    out_json = watch_json.communicate(timeout=10)[0].decode()
    assert re.search(r"^\d\d:\d\d:\d\d command_start \(\d+\) sshlogt1 executed /bin/echo %s$" % tok,
                     out, re.M), out[-2000:]
    objs = [json.loads(l) for l in out_json.splitlines()]
    assert any(o["event_type"] == "command_finish" and tok in o["args"] for o in objs)
    assert not any(o["event_type"] == "terminal_update" for o in objs)


def test_watch_into_head_exits_quietly(daemon, sshd, users):
    cmd = " ".join(__import__("sshlog_daemon").sshlog_argv()) + \
        " watch --socket %s | head -2" % daemon.socket
    p = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1)
    for _ in range(3):
        harness.ssh_run(sshd, users["sshlogt1"], "true")
    out, err = p.communicate(timeout=20)
    assert len(out.splitlines()) == 2 and err == b"", err


def test_status_counts_events(daemon):
    st = daemon.status()
    assert st["events"]["connection_established"] >= 1
    assert st["decode_errors"] == 0 and st["callback_errors"] == 0
    assert "json_log" in st["actions"] and st["actions"]["json_log"]["dropped"] == 0


def test_daemon_started_after_the_session(target, tmp_path):
    sshd, users = target.sshd, target.users
    u = users["sshlogt2"]
    tok = token()
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        late = SshlogDaemon(tmp_path / "late").start()
        try:
            listing = json.loads(late.cli("sessions", "--json").stdout)["sessions"]
            row = [r for r in listing if r["tty_id"] == tty]
            assert row and row[0]["username"] == u.name and row[0]["client_ip"] == "127.0.0.1"
            est = late.wait_events(lambda e: e["event_type"] == "connection_established"
                                   and e["tty_id"] == tty)[0]
            assert est["existing"] is True and est["user_id"] == u.uid
            s.run("/bin/echo %s" % tok)
            fin = finish_of(late, tok)
            assert fin["ptm_pid"] == est["ptm_pid"] and fin["username"] == u.name
            assert fin["tty_id"] == tty and fin["stdout"] == tok + "\n"
        finally:
            s.close()
            late.wait_events(lambda e: e["event_type"] == "connection_close"
                             and e["tty_id"] == tty)
            assert late.stop() == 0


def test_second_sshd_listener_is_observed(daemon, tmp_path, users):
    other = harness.Sshd(str(tmp_path / "sshd2"), listen=("127.0.0.1",)).start()
    try:
        tok = token()
        harness.ssh_run(other, users["sshlogt1"], "/bin/echo %s" % tok)
        fin = finish_of(daemon, tok)
        assert fin["server_port"] == other.port and fin["sshd_pid"] == other.pid
    finally:
        other.stop()


def test_second_daemon_on_same_socket_is_refused(daemon):
    r = subprocess.run(__import__("sshlog_daemon").sshlog_argv() + [
        "daemon", "--config-dir", daemon.config_dir, "--socket", daemon.socket],
        capture_output=True, timeout=30)
    assert r.returncode == 1
    assert b"another sshlog daemon" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.chroot
def test_same_uid_different_names_host_and_chroot(daemon, sshd, chroot_sshd, users):
    """Names come from each sshd's own passwd: one uid, two names."""
    host_user = users["sshlogt1"]
    other = harness.TestUser(name="sshlogc1", uid=host_user.uid, password="Pw-sshlogc1-9",
                             key=host_user.key, wrong_key=host_user.wrong_key, home="")
    chroot_user = chroot_sshd.add_user(other, uid=host_user.uid)
    tok = token()
    harness.ssh_run(chroot_sshd, chroot_user, "/bin/echo %s chroot" % tok)
    harness.ssh_run(sshd, host_user, "/bin/echo %s host" % tok)
    fins = daemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and e["argv"][:2] == ["/bin/echo", tok], count=2)
    names = {e["argv"][2]: (e["username"], e["user_id"], e["sshd_pid"], e["sshd_root"])
             for e in fins}
    assert names["chroot"] == ("sshlogc1", host_user.uid, chroot_sshd.pid, chroot_sshd.root)
    assert names["host"] == ("sshlogt1", host_user.uid, sshd.pid, "/")
