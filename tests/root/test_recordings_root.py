"""Root tier: session recordings of real ssh sessions (sessionlog_action), checked
against what the ssh client received; replay and `asciinema cat` on every file.

One daemon for the module records every session twice: in `rec/` (keystrokes on,
100 MB cap) and in `capped/` (a 256 KiB cap).  Sessions are told apart by ptm_pid.
"""
import glob
import json
import os
import re
import signal
import stat
import subprocess
import time
import uuid

import pytest

import harness
from sshlog_daemon import ALL_TRIGGERS, SshlogDaemon, sshlog_argv

pytestmark = pytest.mark.root

SUDOERS = "/etc/sudoers.d/sshlog-tests-recordings"
CAP = 256 * 1024
TRIGGERS = "[connection_established, connection_close, terminal_update, terminal_resize, " \
           "terminal_input, command_start]"
CONFIG = """\
events:
  - event: record
    triggers: %(triggers)s
    actions:
      - action: rec
        plugin: sessionlog_action
        log_directory: %(dir)s/rec
        capture_input: true
        timestamp_frequency_seconds: 1
  - event: record_capped
    triggers: %(triggers)s
    actions:
      - action: capped
        plugin: sessionlog_action
        log_directory: %(dir)s/capped
        max_session_size_mb: %(cap)s
"""


def token():
    return "tok%s" % uuid.uuid4().hex[:10]


def start_daemon(workdir):
    config = CONFIG % {"triggers": TRIGGERS, "dir": workdir, "cap": CAP / 1048576.0}
    # the JSON event log: everything but the output itself (the recordings have that)
    triggers = [t for t in ALL_TRIGGERS if t != "terminal_update"] + ["terminal_input",
                                                                      "terminal_resize"]
    return SshlogDaemon(workdir, triggers=triggers, config_text=config).start()


@pytest.fixture(scope="module")
def rdaemon(tmp_path_factory, sshd, users):
    d = start_daemon(str(tmp_path_factory.mktemp("recordings")))
    yield d
    assert d.stop() == 0, d.stderr_text()


def finished(daemon, session, tty, timeout=30):
    """(established, close) events of PtySession `session` (on `tty`), once it has closed."""
    est = daemon.established(session, tty)
    close = daemon.wait_events(lambda e: e["event_type"] == "connection_close"
                               and e["ptm_pid"] == est["ptm_pid"], timeout=timeout)[0]
    return est, close


def recording(daemon, ptm, kind="rec", timeout=30):
    """(header, events, text log) of a closed session's recording."""
    base = os.path.join(daemon.dir, kind, "ssh_%d" % ptm)

    def closed():
        try:
            with open(base + ".log", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return text if "[[ sshlog connection_close user:" in text else None
    text = harness.wait_for(closed, timeout, interval=0.2, desc="the close footer of " + base)
    with open(base + ".cast", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]], text


def output(events, code="o"):
    return "".join(e[2] for e in events if e[1] == code).encode("utf-8")


def server_part(client, recorded):
    """The client's output from the first byte the server sent: before it, the client's own
    pty echoed the type-ahead (the PS1 line) until ssh switched it to raw mode."""
    k = len(client) - len(recorded)
    assert 0 <= k < 400, (k, client[:200], recorded[:200])
    assert b"export PS1" in client[:k] or k == 0
    return client[k:]


def asciinema_cat(path, timeout=300):
    """`asciinema cat FILE` (it opens /dev/tty, so it runs on a pty); its output."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("asciinema", ["asciinema", "cat", path])
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, bytes(data[-800:])
    return bytes(data)


def test_interactive_session_recorded_byte_for_byte(rdaemon, target):
    sshd, u = target.sshd, target.users["sshlogt1"]
    tok = token()
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        assert s.run("/usr/bin/id -un; printf '\\033[1;31m%s\\033[0m\\n'" % tok) == 0
        s.resize(30, 100)
        assert s.run("stty size") == 0 and s.last_output.strip() == "30 100"
        assert s.run("/bin/ls -d / /tmp") == 0
        s.sendline("exit")
        s.wait(15)
        client = s.output
    est, close = finished(rdaemon, s, tty)
    header, events, text = recording(rdaemon, est["ptm_pid"])
    recorded = output(events)
    assert server_part(client, recorded) == recorded, "every byte, in order, nothing more"
    assert (header["width"], header["height"]) == (120, 40)
    assert header["env"]["TERM"] == "xterm" and header["env"]["SHELL"] == "/bin/bash"
    meta = header["sshlog"]
    assert (meta["user"], meta["tty_id"], meta["session_id"], meta["ptm_pid"]) == \
        (u.name, tty, est["session_id"], est["ptm_pid"])
    assert meta["client_ip"] == "127.0.0.1" and meta["client_port"] == est["client_port"]
    assert [e[2] for e in events if e[1] == "r"] == ["100x30"]
    resize_at = [i for i, e in enumerate(events) if e[1] == "r"][0]
    assert b"30 100" in output(events[resize_at:]) and b"30 100" not in output(events[:resize_at])
    marks = [e[2] for e in events if e[1] == "m"]
    assert "/usr/bin/id -un" in marks and "/usr/bin/stty size" in marks
    assert "/bin/ls -d / /tmp" in marks and marks[-1] == "sshlog: connection closed"
    times = [e[0] for e in events]
    assert times == sorted(times) and times[-1] <= close["duration_ms"] / 1000.0 + 1
    # the text log: header, readable output, footer
    assert text.startswith("[[ sshlog connection_established user: %s at " % u.name)
    assert "\n%s\n" % tok in text and "\x1b" not in text and "\r" not in text
    assert re.search(r"\[\[ sshlog connection_close user: %s at \S+Z \]\]\n\Z" % u.name, text)
    # private files
    d = os.path.join(rdaemon.dir, "rec")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for ext in ("log", "cast"):
        st = os.stat(os.path.join(d, "ssh_%d.%s" % (est["ptm_pid"], ext)))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    # the real player takes it, and shows the same bytes
    shown = asciinema_cat(os.path.join(d, "ssh_%d.cast" % est["ptm_pid"]))
    assert shown == recorded


def test_utf8_split_across_reads_stays_whole(rdaemon, sshd, users):
    u = users["sshlogt2"]
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        # the euro sign's three bytes in two writes, half a second apart: two reads
        assert s.run("printf 'A\\342\\202'; sleep 0.5; printf '\\254B\\n'; "
                     "printf 'bad \\377 byte\\n'") == 0
    est, _ = finished(rdaemon, s, tty)
    _, events, text = recording(rdaemon, est["ptm_pid"])
    outs = [e[2] for e in events if e[1] == "o"]
    assert "A\u20acB\r\n" in "".join(outs)
    assert not any(o.endswith("A") and "\\x" in o for o in outs)
    assert not any("\\xe2" in o or "\ufffd" in o for o in outs)
    assert "bad \\xff byte" in "".join(outs), "invalid UTF-8 is escaped, not dropped"
    assert "A\u20acB\n" in text


def test_sudo_password_is_never_recorded(rdaemon, sshd, users):
    """Keystroke capture is on: what is typed with ECHO on is recorded, the password typed
    at sudo's prompt (ECHO off) reaches neither a recording nor the event log."""
    if not os.path.exists("/usr/bin/sudo"):
        pytest.fail("sudo is not installed: `make deps` installs it")
    u = users["sshlogt1"]
    seen, tok = token(), token()
    with open(SUDOERS, "w") as f:
        f.write("%s ALL=(ALL) ALL\n" % u.name)
    os.chmod(SUDOERS, 0o440)
    try:
        with harness.PtySession(sshd, u) as s:
            tty = s.tty_name()
            s.sendline("cat")                      # canonical mode, ECHO on
            time.sleep(0.5)
            s.sendline(seen)
            s.expect(seen + "\r\n" + seen)       # the tty's echo, then cat's copy
            s.send(b"\x04")
            s.expect(s.PROMPT)
            s.sendline("sudo -k; sudo /bin/echo %s" % tok)
            s.expect(re.compile(rb"password for"), timeout=15)
            time.sleep(0.3)
            s.sendline(u.password)
            s.expect(tok.encode() + b"\r\n", timeout=15)
            s.expect(s.PROMPT)
    finally:
        os.unlink(SUDOERS)
    est, _ = finished(rdaemon, s, tty)
    _, events, _ = recording(rdaemon, est["ptm_pid"])
    typed = output(events, "i")
    assert seen.encode() in typed, "input typed with ECHO on is recorded"
    assert tok.encode() in output(events)
    secret = u.password.encode()
    files = glob.glob(os.path.join(rdaemon.dir, "*", "ssh_*")) + [rdaemon.json_log,
                                                                   rdaemon.text_log]
    assert len(files) > 4
    for path in files:
        with open(path, "rb") as f:
            assert secret not in f.read(), "the sudo password is in %s" % path
    inputs = [e for e in rdaemon.session_events(est["ptm_pid"])
              if e["event_type"] == "terminal_input"]
    assert inputs and not any(u.password in e["terminal_data"] for e in inputs)


def test_flood_is_recorded_whole(rdaemon, sshd, users):
    u = users["sshlogt2"]
    before = rdaemon.status()
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        t = time.monotonic()
        assert s.run("seq 1 2000000", timeout=180) == 0
        took = time.monotonic() - t
        s.sendline("exit")
        s.wait(30)
        client = s.output
    est, _ = finished(rdaemon, s, tty, timeout=120)
    _, events, text = recording(rdaemon, est["ptm_pid"], timeout=120)
    after = rdaemon.status()
    recorded = output(events)
    assert after["bpf_drops"]["tty"] == before["bpf_drops"]["tty"], "no terminal record lost"
    assert after["actions"]["rec"]["dropped"] == 0
    assert server_part(client, recorded) == recorded
    assert b"\r\n1999999\r\n2000000\r\n" in recorded and len(recorded) > 16800000
    assert "lost here" not in text and "\n1999999\n2000000\n" in text
    assert "[[ sshlog time: " in text, "one-second time lines during the flood"
    print("seq 1 2000000 through ssh: %.2f s; %d bytes recorded" % (took, len(recorded)))


def test_size_cap_stops_the_recording_with_a_marker(rdaemon, sshd, users):
    u = users["sshlogt1"]
    with harness.PtySession(sshd, u) as s:
        tty = s.tty_name()
        assert s.run("seq 1 200000", timeout=60) == 0       # 1.3 MB on the screen
    est, _ = finished(rdaemon, s, tty)
    _, events, text = recording(rdaemon, est["ptm_pid"], kind="capped")
    base = os.path.join(rdaemon.dir, "capped", "ssh_%d" % est["ptm_pid"])
    for ext in ("log", "cast"):
        assert os.path.getsize(base + "." + ext) < CAP + 2048
    stops = [i for i, e in enumerate(events) if e[1] == "m" and "size limit" in e[2]]
    assert len(stops) == 1 and not output(events[stops[0]:])
    assert "[[ sshlog recording stopped at " in text and "size limit of %d bytes" % CAP in text
    assert text.rstrip().endswith("]]") and "connection_close user: %s" % u.name in text
    # the uncapped recording of the same session has it all
    _, full, _ = recording(rdaemon, est["ptm_pid"])
    assert b"\r\n200000\r\n" in output(full)


def test_only_authenticated_terminal_sessions_get_files(rdaemon, sshd, users):
    u = users["sshlogt2"]
    assert harness.ssh_bad_key(sshd, u).returncode != 0
    tok = token()
    assert harness.ssh_run(sshd, u, "/bin/echo %s" % tok).returncode == 0
    failed = rdaemon.wait_events(lambda e: e["event_type"] == "connection_auth_failed"
                                 and e["username"] == u.name)[-1]
    fin = rdaemon.wait_events(lambda e: e["event_type"] == "command_finish"
                              and tok in e["args"])[0]
    for ptm in (failed["ptm_pid"], fin["ptm_pid"]):
        rdaemon.wait_events(lambda e: e["event_type"] == "connection_close"
                            and e["ptm_pid"] == ptm)
        time.sleep(1)
        assert not glob.glob(os.path.join(rdaemon.dir, "*", "ssh_%d.*" % ptm))


def test_terminal_loss_is_marked_where_it_happened(tmp_path, sshd, users):
    """With the daemon stopped (SIGSTOP) the 8 MiB terminal ring fills during a flood:
    the recording marks each gap with its size, and the markers, the status counters and
    the bytes the client saw all agree."""
    d = start_daemon(str(tmp_path / "lossy"))
    try:
        u = users["sshlogt1"]
        with harness.PtySession(sshd, u) as s:
            tty = s.tty_name()
            d.wait_events(lambda e: e["event_type"] == "command_finish" and e["tty_id"] == tty
                          and e["filename"] == "/usr/bin/tty")
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                assert s.run("seq 1 3000000", timeout=180) == 0      # 20.9 MB
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            # once the daemon has drained the ring, output is recorded again
            counts = []

            def drained():
                counts.append(d.status()["events"].get("terminal_update", 0))
                return len(counts) > 2 and counts[-1] == counts[-2] == counts[-3]
            harness.wait_for(drained, 120, interval=0.5, desc="the daemon to catch up")
            after = token()
            assert s.run("echo %s" % after) == 0
            s.sendline("exit")
            s.wait(30)
            client = s.output
        est, _ = finished(d, s, tty, timeout=120)
        _, events, text = recording(d, est["ptm_pid"], timeout=120)
        st = d.status()
    finally:
        assert d.stop() == 0
    marks = [e[2] for e in events if e[1] == "m" and "lost here" in e[2]]
    lost = sum(int(re.match(r"sshlog: (\d+) bytes of terminal output lost here "
                            r"\(kernel ring buffer full\)", m).group(1)) for m in marks)
    assert st["bpf_drops"]["tty"] > 0 and marks
    # other sessions on this machine may have lost bytes in the same window
    assert 0 < lost <= st["terminal_lost_bytes"]
    assert text.count("bytes of terminal output lost here (kernel ring buffer full) ]]") \
        == len(marks)
    recorded = output(events)
    k = len(client) - len(recorded) - lost
    assert 0 <= k < 400 and b"export PS1" in client[:k]
    assert len(client) - k == len(recorded) + lost, "recorded + lost = what the client saw"
    assert after.encode() + b"\r\n" in recorded and recorded.endswith(b"logout\r\n"), \
        "recording goes on after the gaps"


def test_replay_and_asciinema_take_every_recording(rdaemon):
    casts = glob.glob(os.path.join(rdaemon.dir, "*", "*.cast"))
    assert len(casts) >= 6
    for path in casts:
        with open(path, "rb") as f:
            assert f.read(1) == b"{"
        asciinema_cat(path)
        if os.path.getsize(path) < 2 << 20:          # pyte takes a minute for the flood
            r = subprocess.run(sshlog_argv() + ["replay", "--text", path], capture_output=True,
                               timeout=300)
            assert r.returncode == 0 and r.stderr == b"", r.stderr[-500:]
    small = min(casts, key=os.path.getsize)
    r = subprocess.run(sshlog_argv() + ["replay", "--speed", "50", "--idle-limit", "0.1",
                                        small], capture_output=True, timeout=120)
    assert r.returncode == 0 and b"PROMPT$ " in r.stdout
