"""Session recordings (sessionlog_action), replay, and the pieces of attach that need
no root: the tail and its rendering, the watcher queue, the terminal view.

Events are built by hand (factories.make_event); the recordings land in tmp_path.
"""
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

import sshlog
from factories import FakeClock, FakeProc, SPEC_TS, make_event

T0 = SPEC_TS
ALICE = dict(ptm_pid=4242, session_id="aaaa1111bbbb2222", username="alice", user_id=0,
             tty_id=7, client_ip="203.0.113.7", client_port=40022, start_time=T0 - 1)


def ev(cls, dt=0.0, **fields):
    return make_event(cls, **dict(ALICE, timestamp=T0 + dt, **fields))


class Out:
    """A terminal_update stream of one session: offsets follow the bytes."""

    def __init__(self, **who):
        self.offset, self.who = 0, who

    def __call__(self, dt, data, lost=0, skip=0):
        self.offset += skip
        e = ev(sshlog.TerminalUpdate, dt, raw=data, data_len=len(data), offset=self.offset,
               lost_bytes=lost, terminal_data=sshlog.decode_bytes(data), **self.who)
        self.offset += len(data)
        return e


def action(tmp_path, **params):
    params = dict({"log_directory": str(tmp_path / "rec")}, **params)
    assert sshlog.validate_params(sshlog.SessionLog.PARAMS, params) == []
    return sshlog.SessionLog("rec", params)


def run(act, *events):
    for e in events:
        act.handle(e)
    act.close()


def files(tmp_path):
    d = tmp_path / "rec"
    return sorted(os.listdir(str(d))) if d.exists() else []


def read_cast(path):
    with open(str(path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def output_of(events, code="o"):
    return "".join(e[2] for e in events if e[1] == code)


# ---------------------------------------------------------------------------------------
# The text form

@pytest.mark.parametrize("chunks,text", [
    ([b"\x1b[01;32mgreen\x1b[0m plain\r\n"], "green plain\n"),
    ([b"\x1b]0;alice@web1: ~\x07alice@web1:~$ "], "alice@web1:~$ "),     # the title goes
    ([b"\x1b]0;ti", b"tle\x1b\\$ "], "$ "),                               # OSC split, ST end
    ([b"ab\x1b", b"[K", b"cd"], "abcd"),                                  # ESC at a chunk end
    ([b"x\x1b[3", b"8;5;208m", b"y"], "xy"),                              # CSI split in params
    ([b"\x1b(Bok\x1b=\x1b>"], "ok"),                                      # charset, keypad
    ([b"a\x08\x7f\x03\x04\x1a\x1d\x1f\x07\tb"],
     "a[\u2190][<--][Ctrl+C][Ctrl+D][Ctrl+Z][Ctrl+]][Ctrl+/]\tb"),
])
def test_terminal_text_strips_escapes_and_names_control_keys(chunks, text):
    tt = sshlog.TerminalText()
    got = "".join(tt.feed(c.decode()) for c in chunks) + tt.feed("", final=True)
    assert got == text


def test_terminal_text_drops_an_unterminated_string_at_the_bound():
    tt = sshlog.TerminalText()
    assert tt.feed("\x1b]0;" + "t" * 5000) == ""
    assert tt.carry == ""
    assert tt.feed("visible") == "visible"


def test_output_after_a_half_read_sequence_or_character(tmp_path):
    out = Out()
    run(action(tmp_path), ev(sshlog.ConnectionEstablished),
        out(0.1, b"ab\x1b"), out(0.2, b"[Kcd\r\n"),          # an escape cut by the read
        out(0.3, b"caf\xc3"), out(0.4, b" ok\r\n"),           # a character never finished
        ev(sshlog.ConnectionClose, 1))
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert output_of(events) == "ab\x1b[Kcd\r\ncaf\\xc3 ok\r\n"
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert "abcd\ncaf\\xc3 ok\n" in log


# ---------------------------------------------------------------------------------------
# A whole session

def test_session_recording_plain_text_and_asciicast(tmp_path, utc):
    out = Out()
    act = action(tmp_path)
    run(act,
        ev(sshlog.ConnectionEstablished, 0, rows=40, cols=120),
        out(0.1, b"Linux web1\r\n"),
        ev(sshlog.CommandStart, 0.2, pid=os.getpid(), filename="/bin/bash", argv=("-bash",)),
        out(0.3, b"\x1b]0;alice@web1\x07alice@web1:~$ "),
        out(0.5, b"id -un\r\n"),
        ev(sshlog.CommandStart, 0.6, pid=9, filename="/usr/bin/id", argv=("id", "-un")),
        out(0.7, b"alice\r\n\x1b[01;34mdone\x1b[0m\r\n"),
        ev(sshlog.TerminalResize, 0.8, rows=50, cols=132),
        out(0.9, b"bye\r\n"),
        ev(sshlog.ConnectionClose, 1.5, end_time=T0 + 1.5))
    assert files(tmp_path) == ["ssh_4242.cast", "ssh_4242.log"]
    d = tmp_path / "rec"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in files(tmp_path):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert (d / "ssh_4242.log").read_text() == (
        "[[ sshlog connection_established user: alice at 2023-11-28T10:57:16.250000Z ]]\n"
        "Linux web1\n"
        "alice@web1:~$ id -un\n"
        "alice\ndone\n"
        "bye\n"
        "[[ sshlog connection_close user: alice at 2023-11-28T10:57:17.750000Z ]]\n")
    header, events = read_cast(d / "ssh_4242.cast")
    assert header["version"] == 2 and (header["width"], header["height"]) == (120, 40)
    assert header["timestamp"] == int(T0)
    assert header["env"]["SHELL"] == "/bin/bash" and header["env"]["TERM"]
    assert "alice@web1" in header["title"] and "/dev/pts/7" in header["title"]
    meta = header["sshlog"]
    assert (meta["user"], meta["session_id"], meta["tty_id"], meta["ptm_pid"], meta["host"]) == \
        ("alice", "aaaa1111bbbb2222", 7, 4242, "web1")
    assert (meta["client_ip"], meta["client_port"]) == ("203.0.113.7", 40022)
    assert output_of(events) == ("Linux web1\r\n\x1b]0;alice@web1\x07alice@web1:~$ id -un\r\n"
                                 "alice\r\n\x1b[01;34mdone\x1b[0m\r\nbye\r\n")
    assert [e[2] for e in events if e[1] == "m"] == ["/bin/bash", "/usr/bin/id -un",
                                                     "sshlog: connection closed"]
    assert [e for e in events if e[1] == "r"] == [[0.8, "r", "132x50"]]
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] == pytest.approx(0.1)
    assert not [e for e in events if e[1] == "i"]


def test_utf8_split_across_reads_and_invalid_bytes(tmp_path):
    out = Out()
    run(action(tmp_path), ev(sshlog.ConnectionEstablished),
        out(0.1, b"h\xc3"), out(0.2, b"\xa9 \xe2"), out(0.3, b"\x82\xac \xff\xfe end\r\n"),
        ev(sshlog.ConnectionClose, 1))
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert output_of(events) == "h\u00e9 \u20ac \\xff\\xfe end\r\n"
    assert all("\ufffd" not in e[2] for e in events)
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert "h\u00e9 \u20ac \\xff\\xfe end\n" in log


def test_output_is_converted_once_the_terminal_is_quiet(tmp_path):
    out = Out()
    act = action(tmp_path)
    act.QUIET = 3600.0                    # the flusher thread leaves it to the ticks below
    runner = sshlog.ActionRunner(act)     # for `status`; events are handed over directly
    try:
        act.handle(ev(sshlog.ConnectionEstablished, 0))
        for i in range(3):
            act.handle(out(0.1 * (i + 1), b"line %d\r\n" % i))
        rec = act.sessions[4242]
        assert act.backlog_bytes == sum(len(d.raw) for d in rec.backlog) == 24
        assert runner.stats()["unconverted_bytes"] == 24
        assert b"line" not in bytes(rec.bufs[rec.LOG]) + bytes(rec.bufs[rec.CAST])
        with act.lock:
            act.tick(time.monotonic())    # output came just now: still a burst
        assert len(rec.backlog) == 3
        with act.lock:
            act.tick(time.monotonic() + 7200)
        assert rec.backlog == [] and runner.stats()["unconverted_bytes"] == 0
        assert "line 0\nline 1\nline 2\n" in (tmp_path / "rec" / "ssh_4242.log").read_text()
    finally:
        runner.stop()


def test_deferred_output_keeps_its_place_and_its_bound(tmp_path):
    out, other = Out(), Out(ptm_pid=5151, session_id="cccc3333dddd4444")
    act = action(tmp_path)
    act.QUIET, act.BACKLOG_MAX = 3600.0, 20
    act.handle(ev(sshlog.ConnectionEstablished, 0))
    act.handle(ev(sshlog.ConnectionEstablished, 0, ptm_pid=5151,
                  session_id="cccc3333dddd4444"))
    act.handle(out(0.1, b"before\r\n"))
    act.handle(ev(sshlog.CommandStart, 0.2, pid=9, filename="/usr/bin/id", argv=("id",)))
    assert act.sessions[4242].backlog == []          # converted ahead of the command
    act.handle(out(0.3, b"after\r\n"))
    act.handle(other(0.4, b"0123456789"))
    assert act.backlog_bytes == 17
    act.handle(other(0.5, b"0123456789"))            # 27 > 20: every session converted
    assert act.backlog_bytes == 0
    assert [r.backlog for r in act.sessions.values()] == [[], []]
    act.handle(ev(sshlog.ConnectionClose, 1))
    act.close()
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert [(e[1], e[2]) for e in events if e[1] != "m" or "id" in e[2]] == [
        ("o", "before\r\n"), ("m", "/usr/bin/id"), ("o", "after\r\n")]
    _, events = read_cast(tmp_path / "rec" / "ssh_5151.cast")
    assert output_of(events) == "0123456789" * 2


def test_times_never_go_back(tmp_path):
    out = Out()
    run(action(tmp_path), ev(sshlog.ConnectionEstablished, 0),
        out(0.5, b"a"), out(0.2, b"b"), out(-3, b"c"), out(0.9, b"d"),
        ev(sshlog.ConnectionClose, 0.1))
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    times = [e[0] for e in events]
    assert times == sorted(times) and min(times) >= 0


def test_losses_are_marked_in_both_files(tmp_path):
    out = Out()
    run(action(tmp_path), ev(sshlog.ConnectionEstablished),
        out(0.1, b"before\r\n"),
        out(0.2, b"after kernel loss\r\n", lost=4096),
        out(0.3, b"after queue loss\r\n", skip=300),
        ev(sshlog.TerminalUpdate, 0.4, offset=out.offset, lost_bytes=77),  # lost at the end
        ev(sshlog.ConnectionClose, 1))
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert ("before\n[[ sshlog 4096 bytes of terminal output lost here (kernel ring buffer "
            "full) ]]\nafter kernel loss\n[[ sshlog 300 bytes of terminal output lost here "
            "(sshlog action queue full) ]]\nafter queue loss\n[[ sshlog 77 bytes") in log
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    marks = [e[2] for e in events if e[1] == "m"]
    assert marks[:3] == [
        "sshlog: 4096 bytes of terminal output lost here (kernel ring buffer full)",
        "sshlog: 300 bytes of terminal output lost here (sshlog action queue full)",
        "sshlog: 77 bytes of terminal output lost here (kernel ring buffer full)"]


def test_size_cap_stops_the_recording_with_a_marker(tmp_path):
    out = Out()
    act = action(tmp_path, max_session_size_mb=0.01)         # 10485 bytes
    events = [ev(sshlog.ConnectionEstablished)]
    events += [out(0.01 * i, b"%05d " % i + b"x" * 90 + b"\r\n") for i in range(300)]
    run(act, *events, ev(sshlog.ConnectionClose, 5))
    d = tmp_path / "rec"
    for name in ("ssh_4242.cast", "ssh_4242.log"):
        assert (d / name).stat().st_size < 10485 + 1024      # markers and header only
    log = (d / "ssh_4242.log").read_text()
    assert "[[ sshlog recording stopped at " in log and "size limit of 10485 bytes" in log
    assert log.rstrip().endswith("connection_close user: alice at 2023-11-28T10:57:21.250000Z ]]")
    header, cast = read_cast(d / "ssh_4242.cast")
    stop = [i for i, e in enumerate(cast) if e[1] == "m" and "size limit" in e[2]]
    assert len(stop) == 1 and not [e for e in cast[stop[0]:] if e[1] == "o"]
    assert output_of(cast).startswith("00000 ")


def test_timestamp_lines_are_per_session(tmp_path):
    other = dict(ptm_pid=5151, session_id="ffff", tty_id=8, username="bob")
    a, b = Out(), Out(**other)
    run(action(tmp_path, timestamp_frequency_seconds=10),
        ev(sshlog.ConnectionEstablished, 0), ev(sshlog.ConnectionEstablished, 0, **other),
        a(1, b"a1\r\n"), b(5, b"b1\r\n"), a(12, b"a2\r\n"), b(13, b"b2\r\n"),
        b(14, b"b3\r\n"), a(25, b"a3\r\n"),
        ev(sshlog.ConnectionClose, 30), ev(sshlog.ConnectionClose, 30, **other))
    la = (tmp_path / "rec" / "ssh_4242.log").read_text()
    lb = (tmp_path / "rec" / "ssh_5151.log").read_text()
    assert la.count("[[ sshlog time: ") == 2 and lb.count("[[ sshlog time: ") == 1
    assert "a1\n[[ sshlog time: 2023-11-28T10:57:28.250000Z ]]\na2\n" in la
    assert "b2\nb3\n" in lb


@pytest.mark.parametrize("who", [dict(username=""), dict(tty_id=-1)],
                         ids=["not-authenticated", "no-pty"])
def test_no_files_without_a_user_or_a_terminal(tmp_path, who):
    out = Out(**who)
    run(action(tmp_path), ev(sshlog.ConnectionEstablished, **who), out(0.1, b"x"),
        ev(sshlog.ConnectionClose, 1, **who))
    assert files(tmp_path) == []


def test_late_events_after_the_close_open_nothing(tmp_path):
    out = Out()
    run(action(tmp_path), ev(sshlog.ConnectionEstablished), ev(sshlog.ConnectionClose, 1),
        out(2, b"late"))
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert "late" not in log and log.count("connection_established") == 1


def test_a_reused_pid_gets_its_own_files(tmp_path):
    second = dict(session_id="cccc3333dddd4444")
    run(action(tmp_path), ev(sshlog.ConnectionEstablished), Out()(0.1, b"one"),
        ev(sshlog.ConnectionClose, 1),
        ev(sshlog.ConnectionEstablished, 2, **second), Out(**second)(2.1, b"two"),
        ev(sshlog.ConnectionClose, 3, **second))
    assert files(tmp_path) == ["ssh_4242.1.cast", "ssh_4242.1.log", "ssh_4242.cast",
                               "ssh_4242.log"]
    assert output_of(read_cast(tmp_path / "rec" / "ssh_4242.1.cast")[1]) == "two"
    assert read_cast(tmp_path / "rec" / "ssh_4242.1.cast")[0]["sshlog"]["session_id"] == \
        second["session_id"]


def test_a_restarted_daemon_appends_to_the_session_it_was_recording(tmp_path):
    first = action(tmp_path)
    out = Out()
    run(first, ev(sshlog.ConnectionEstablished), out(1, b"before restart\r\n"))
    again = action(tmp_path)
    run(again, ev(sshlog.ConnectionEstablished, 10, existing=True),
        ev(sshlog.TerminalUpdate, 11, raw=b"after\r\n", data_len=7, existing=True),
        ev(sshlog.ConnectionClose, 12, existing=True))
    assert files(tmp_path) == ["ssh_4242.cast", "ssh_4242.log"]
    header, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert output_of(events) == "before restart\r\nafter\r\n"
    resumed = [e for e in events if e[1] == "m" and "resumed" in e[2]]
    assert len(resumed) == 1 and resumed[0][0] == pytest.approx(10)
    times = [e[0] for e in events]
    assert times == sorted(times)
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert log.count("connection_established") == 1 and "recording resumed" in log


def test_a_second_writer_never_shares_a_session_file(tmp_path):
    one, two = action(tmp_path), action(tmp_path)
    try:
        one.handle(ev(sshlog.ConnectionEstablished))
        one.handle(Out()(0.1, b"mine"))
        two.LOCK_WAIT = 0.2
        other = dict(session_id="eeee")
        two.handle(ev(sshlog.ConnectionEstablished, **other))
    finally:
        one.close()
        two.close()
    assert files(tmp_path) == ["ssh_4242.1.cast", "ssh_4242.1.log", "ssh_4242.cast",
                               "ssh_4242.log"]


def test_input_events_only_when_asked(tmp_path):
    def session(tmp, **params):
        run(action(tmp, **params), ev(sshlog.ConnectionEstablished),
            ev(sshlog.TerminalInput, 0.1, raw=b"l", data_len=1),
            ev(sshlog.TerminalInput, 0.2, raw="s \u20ac\r".encode(), data_len=6, offset=1),
            ev(sshlog.ConnectionClose, 1))
        return read_cast(tmp / "rec" / "ssh_4242.cast")[1]
    assert output_of(session(tmp_path / "on", capture_input=True), "i") == "ls \u20ac\r"
    assert output_of(session(tmp_path / "off"), "i") == ""


def test_header_waits_for_the_shell_then_gives_up(tmp_path, monkeypatch):
    act = action(tmp_path)
    try:
        act.handle(ev(sshlog.ConnectionEstablished, rows=30, cols=100))
        act.handle(Out()(0.1, b"motd\r\n"))
        cast = tmp_path / "rec" / "ssh_4242.cast"
        act.tick(time.monotonic())
        rec = act.sessions[4242]
        assert not rec.header_done and cast.stat().st_size == 0
        act.tick(time.monotonic() + act.HEADER_WAIT + act.FLUSH_EVERY + 1)
        header, events = read_cast(cast)
        assert (header["width"], header["height"]) == (100, 30)
        assert output_of(events) == "motd\r\n"
    finally:
        act.close()


def test_header_takes_term_from_the_first_command(tmp_path):
    monkey_env = tmp_path / "proc" / "99"
    monkey_env.mkdir(parents=True)
    (monkey_env / "environ").write_bytes(b"HOME=/root\0TERM=screen-256color\0SHELL=/bin/zsh\0")
    old = sshlog.PROC
    try:
        sshlog.process_environ.__defaults__ = (str(tmp_path / "proc"),)
        run(action(tmp_path), ev(sshlog.ConnectionEstablished),
            ev(sshlog.CommandStart, 0.1, pid=99, filename="/bin/bash", argv=("-bash",)),
            ev(sshlog.ConnectionClose, 1))
    finally:
        sshlog.process_environ.__defaults__ = (old,)
    header, _ = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert header["env"]["TERM"] == "screen-256color"


@pytest.mark.parametrize("template,name", [
    ("ssh_{ptm_pid}", "ssh_4242"),
    ("{date}-{time}_{username}_{session_id}", "20231128-105715_alice_aaaa1111bbbb2222"),
    ("{username}", "ev_l_.._x"),
])
def test_file_names_from_templates_stay_in_the_directory(template, name):
    who = dict(ALICE)
    if template == "{username}":
        who["username"] = "ev/l/../x"
    e = make_event(sshlog.ConnectionEstablished, **dict(who, timestamp=T0))
    assert sshlog.recording_name(template, e) == name


@pytest.mark.parametrize("params,problem", [
    ({"file_name": "{nope}"}, "file_name: invalid template"),
    ({"file_name": "{ptm_pid"}, "file_name: invalid template"),
    ({"file_name": ".."}, "file_name: invalid template"),
    ({"max_session_size_mb": -1}, "max_session_size_mb"),
    ({"max_sesion_size_mb": 1}, "did you mean 'max_session_size_mb'"),
])
def test_bad_parameters_are_configuration_errors(params, problem):
    entry = dict({"action": "rec", "plugin": "sessionlog_action", "log_directory": "/x"}, **params)
    doc = {"events": [{"event": "e", "triggers": ["terminal_update"], "actions": [entry]}]}
    with pytest.raises(sshlog.ConfigError) as err:
        sshlog.parse_config([("c.yaml", json.dumps(doc).encode())])
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_the_embedded_default_records_every_session():
    config = sshlog.parse_config([("<embedded>/conf.d/" + n, data)
                                  for n, data in sshlog.embedded_config_files()])
    plugins = {name: (plugin, params) for name, (plugin, params, _) in config.actions.items()}
    recs = [params for plugin, params in plugins.values() if plugin == "sessionlog_action"]
    assert recs and recs[0]["log_directory"] == "/var/log/sshlog/sessions"
    rule = [r for r in config.rules if any(plugins[a][0] == "sessionlog_action"
                                           for a in r.actions)][0]
    assert {"connection_established", "connection_close", "terminal_update",
            "terminal_resize", "command_start", "session_attach"} <= rule.triggers
    assert not sshlog.config_wants_input(config)


# ---------------------------------------------------------------------------------------
# Tracker: window changes, losses, keystrokes

def test_tracker_terminal_events(tmp_path):
    from factories import write_passwd
    root = write_passwd(tmp_path / "root", ("alice", 1001, "/home/alice"))
    proc = FakeProc(tmp_path / "proc")
    proc.process(700, comm="sshd", root=root)
    tr = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
    S, P = 10 ** 9, 2062
    evs = []
    for rec in (sshlog.Connect(1 * S, P, P, 700, "127.0.0.1", 5000),
                sshlog.Value(sshlog.REC_PTY, int(1.1 * S), 2063, P, 4, 9),
                sshlog.Winsz(int(1.2 * S), 2063, P, 40, 120, 9),
                sshlog.Exec(2 * S, 2070, P, 2063, 1001, "/bin/bash", ("-bash",), False),
                sshlog.Winsz(int(2.1 * S), 2063, P, 40, 120, 9),        # unchanged: nothing
                sshlog.Winsz(int(2.2 * S), 2063, P, 50, 132, 9),
                sshlog.Data(sshlog.REC_TTY_OUT, 3 * S, 2063, P, 9, b"abc", 0),
                sshlog.Data(sshlog.REC_TTY_OUT, 4 * S, 2063, P, 9, b"de", 500),
                sshlog.Data(sshlog.REC_TTY_IN, 5 * S, 2063, P, 9, b"ls\r", 0),
                sshlog.Value(sshlog.REC_TTY_LOSS, 6 * S, P, P, 123, 0),
                sshlog.Exit(7 * S, P, P, 0, sshlog.F_MONITOR)):
        evs += tr.handle(rec)
    kinds = [e.type for e in evs]
    assert kinds == ["connection_established", "command_start", "terminal_resize",
                     "terminal_update", "terminal_update", "terminal_input", "terminal_update",
                     "connection_close"]
    est, resize = evs[0], evs[2]
    assert (est.rows, est.cols, resize.rows, resize.cols) == (40, 120, 50, 132)
    outs = [e for e in evs if e.type == "terminal_update"]
    assert [(e.offset, e.data_len, e.lost_bytes) for e in outs] == [(0, 3, 0), (3, 2, 500),
                                                                     (5, 0, 123)]
    assert tr.tty_lost_bytes == 623
    assert evs[5].raw == b"ls\r" and evs[5].text().endswith("terminal input (3 bytes)")


# ---------------------------------------------------------------------------------------
# replay

def write_cast(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_cli(*argv):
    """sshlog.main(argv) with stdout (bytes, as replay writes them) and stderr captured."""
    err, buf = io.StringIO(), io.BytesIO()
    wrapper = io.TextIOWrapper(buf, encoding="utf-8")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = wrapper, err
    try:
        rc = sshlog.main(list(argv))
        wrapper.flush()
        out = buf.getvalue().decode("utf-8")
    finally:
        sys.stdout, sys.stderr = old
        wrapper.detach()
    return rc, out, err.getvalue()


HEADER = '{"version": 2, "width": 20, "height": 3}'


def test_replay_text_reports_and_skips_malformed_lines(tmp_path):
    path = write_cast(tmp_path / "a.cast", [
        HEADER, '[0.1, "o", "one\\r\\n"]', 'not json', '[0.2, "o"]', '[0.3, "m", "marker"]',
        '["x", "o", "bad time"]', '[0.4, "o", "two\\r\\nthree\\r\\nfour\\r\\nfive"]',
        '[0.5, "r", "10x2"]', ''])
    rc, out, err = run_cli("replay", "--text", path)
    assert rc == 0
    assert out.splitlines() == ["one", "two", "three", "four", "five"]
    assert re.findall(r"a\.cast:(\d+): malformed", err) == ["3", "4", "6"]


def test_replay_text_keeps_what_a_clear_wipes(tmp_path):
    path = write_cast(tmp_path / "c.cast", [
        HEADER, '[0.1, "o", "kept\\r\\n"]', '[0.2, "o", "\\u001b[H\\u001b[2Jnew"]'])
    assert run_cli("replay", "--text", path)[1].splitlines() == ["kept", "new"]


def test_replay_plays_with_speed_and_idle_limit(tmp_path):
    path = write_cast(tmp_path / "p.cast", [
        HEADER, '[0.5, "o", "a"]', '[30.0, "o", "b"]', '[30.5, "i", "typed"]',
        '[31.0, "o", "\\u20ac"]'])
    t = time.monotonic()
    rc, out, err = run_cli("replay", path, "--speed", "4", "--idle-limit", "1")
    took = time.monotonic() - t
    assert rc == 0 and out == "ab\u20ac" and err == ""
    assert 0.4 < took < 2.0, took                  # (0.5 + 1 + 0.5) / 4 = 0.5 s


@pytest.mark.parametrize("first", ['{"version": 1, "width": 80, "height": 24}', 'garbage', ''])
def test_replay_refuses_what_is_not_asciicast_v2(tmp_path, first):
    path = write_cast(tmp_path / "x.cast", [first, '[0.1, "o", "x"]'])
    rc, out, err = run_cli("replay", path)
    assert rc == 1 and "not an asciicast v2 recording" in err


def test_replay_of_a_missing_file(tmp_path):
    rc, _, err = run_cli("replay", str(tmp_path / "none.cast"))
    assert rc == 1 and "cannot read" in err


@pytest.mark.skipif(shutil.which("asciinema") is None, reason="asciinema is not installed")
def test_asciinema_accepts_a_recording(tmp_path):
    out = Out()
    run(action(tmp_path, capture_input=True), ev(sshlog.ConnectionEstablished),
        out(0.1, b"\x1b[1mhello\x1b[0m \xe2\x82"), out(0.2, b"\xac\r\n\xff"),
        ev(sshlog.TerminalResize, 0.3, rows=30, cols=90),
        ev(sshlog.TerminalInput, 0.4, raw=b"x", data_len=1),
        ev(sshlog.CommandStart, 0.5, pid=1, filename="/bin/true", argv=("true",)),
        out(0.6, b"", lost=10), ev(sshlog.ConnectionClose, 1))
    cast = tmp_path / "rec" / "ssh_4242.cast"
    got = asciinema_cat(str(cast))
    assert got.replace(b"\r\n", b"\n").endswith("\x1b[1mhello\x1b[0m \u20ac\r\n\\xff"
                                                .replace("\r\n", "\n").encode())


def asciinema_cat(path, timeout=30):
    """`asciinema cat FILE` needs a terminal (it opens /dev/tty): run it on a pty."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("asciinema", ["asciinema", "cat", path])
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, bytes(data[-500:])
    return bytes(data)


# ---------------------------------------------------------------------------------------
# attach: the tail, its rendering, the watcher queue, the view

def test_render_screen_reproduces_the_screen():
    pyte = pytest.importorskip("pyte")
    data = b"".join(b"line %d\r\n" % i for i in range(30)) + \
        b"\x1b[1;31mred\x1b[0m \x1b[38;5;208mo\x1b[48;2;1;2;3mrgb\x1b[0m \xe2\x82\xac$ "
    ansi = sshlog.render_screen(data, 10, 40)
    a, b = pyte.Screen(40, 10), pyte.Screen(40, 10)
    pyte.ByteStream(a).feed(data)
    pyte.Stream(b).feed(ansi)
    assert a.display == b.display
    assert (a.cursor.x, a.cursor.y) == (b.cursor.x, b.cursor.y)
    for y in range(10):
        for x in range(40):
            ca, cb = a.buffer[y][x], b.buffer[y][x]
            assert (ca.fg, ca.bg, ca.bold) == (cb.fg, cb.bg, cb.bold), (y, x)
    assert a.display[0].startswith("line 21") and a.display[9].startswith("red orgb \u20ac$")


def test_tail_is_bounded_and_starts_at_a_line():
    tail = sshlog.OutputTail(cap=1000)
    for i in range(500):
        tail.add(b"%04d\r\n" % i)
    assert tail.size < 1000 + 6
    snap = tail.snapshot()
    assert snap.endswith(b"0499\r\n") and re.match(rb"\d{4}\r\n", snap)


def test_attach_client_falls_back_to_a_fresh_screen_when_behind():
    c = sshlog.AttachClient(limit=100)
    c.put(("o", b"x" * 60))
    c.put(("r", 50, 132))
    c.put(("o", b"y" * 60))                       # over the limit: queued output dropped
    c.put(("o", b"z"))
    assert c.resync and c.take(0) == [("r", 50, 132)]
    hub = sshlog.AttachHub(tail=4096)
    hub.on_event(make_event(sshlog.TerminalUpdate, raw=b"abc", ptm_pid=1))
    data, rows, cols = hub.resync(1, c, 24, 80)
    assert (data, rows, cols, c.resync) == (b"abc", 24, 80, False)


def test_hub_routes_output_resizes_and_the_end():
    hub = sshlog.AttachHub()
    c = sshlog.AttachClient()
    hub.on_event(make_event(sshlog.ConnectionEstablished, ptm_pid=3, rows=30, cols=90))
    hub.on_event(make_event(sshlog.TerminalUpdate, ptm_pid=3, raw=b"before"))
    assert hub.subscribe(3, c, 0, 0) == (b"before", 30, 90)
    hub.on_event(make_event(sshlog.TerminalUpdate, ptm_pid=4, raw=b"other session"))
    hub.on_event(make_event(sshlog.TerminalUpdate, ptm_pid=3, raw=b"after"))
    hub.on_event(make_event(sshlog.TerminalResize, ptm_pid=3, rows=20, cols=70))
    hub.on_event(make_event(sshlog.ConnectionClose, ptm_pid=3))
    assert c.take(0) == [("o", b"after"), ("r", 20, 70), ("end", "the session ended")]
    assert 3 not in hub.tails and 3 not in hub.clients


@pytest.mark.parametrize("wsize,mode", [((50, 150), "passthrough"), ((20, 60), "viewport"),
                                        ((40, 120), "viewport")])
def test_attach_view_modes(wsize, mode):
    pytest.importorskip("pyte")
    written = []
    info = {"tty": 3, "username": "alice", "client_ip": "127.0.0.1", "rows": 40, "cols": 120,
            "readonly": True, "why_readonly": "no injection"}
    view = sshlog.AttachView(info, wsize[0], wsize[1], written.append)
    screen = sshlog.render_screen(b"".join(b"row %d\r\n" % i for i in range(39)) + b"$ ", 40, 120)
    view.set_screen(screen)
    assert (view.screen is None) == (mode == "passthrough")
    view.output("typed\r\n")
    if view.dirty:
        view.redraw()
    text = "".join(written)
    assert "| read-only: no inj" in text and "Ctrl+Q detaches" in text
    if mode == "viewport":
        assert view.top == 40 - (wsize[0] - 1)       # the cursor's part of the screen
        assert "typed" in text and "row 38" in text and "row 0\x1b" not in text


def test_proc_tty_nr_and_in_session(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.process(500, comm="sshd", ppid=1)
    proc.process(501, comm="bash", ppid=500)
    proc.process(600, comm="python3", ppid=501)
    proc.process(700, comm="tmux", ppid=1)
    # tty_nr is field 7: rewrite 600's stat with /dev/pts/3 (major 136, minor 3)
    stat_path = os.path.join(proc.base, "700", "stat")
    fields = open(stat_path).read().split()
    fields[6] = str((136 << 8) | 3)
    open(stat_path, "w").write(" ".join(fields) + "\n")
    s = sshlog.Session(ptm_pid=500, session_id="x", start=0, tty=3)
    assert sshlog.proc_tty_nr(700, proc.base) == 3
    assert sshlog.in_session(600, s, proc.base)        # a descendant of the session's sshd
    assert sshlog.in_session(700, s, proc.base)        # its terminal is the session's
    other = sshlog.Session(ptm_pid=999, session_id="y", start=0, tty=4)
    assert not sshlog.in_session(600, other, proc.base)


# ---------------------------------------------------------------------------------------
# attach and kill over the socket: who may do what (peer credentials stubbed)

class AttachDaemon:
    """What ApiHandler's attach/kill use of the daemon."""

    def __init__(self, tracker, proc, inject):
        import threading
        self.tracker, self.proc, self.inject = tracker, proc, inject
        self.stopping = threading.Event()
        self.attach_hub = sshlog.AttachHub()
        self.audited = []

    def audit(self, event):
        self.audited.append(event)


@pytest.fixture
def api(tmp_path, monkeypatch):
    """(connect(request) -> socket file, daemon-builder, creds setter) on a real ApiServer."""
    import socket
    import threading
    from factories import write_passwd
    root = write_passwd(tmp_path / "root", ("alice", 1001, "/home/alice"))
    proc = FakeProc(tmp_path / "proc")
    proc.process(700, comm="sshd", root=root)
    tracker = sshlog.Tracker(hostname="web1", proc=proc.base, clock=FakeClock())
    S, P = 10 ** 9, 2062
    for rec in (sshlog.Connect(S, P, P, 700, "127.0.0.1", 5000),
                sshlog.Value(sshlog.REC_PTY, S, P + 1, P, 4, 9),
                sshlog.Winsz(S, P + 1, P, 24, 80, 9),
                sshlog.Exec(2 * S, P + 8, P, P + 1, 1001, "/bin/bash", ("-bash",), False)):
        tracker.handle(rec)
    creds = {"value": (999999, 0, 0)}
    monkeypatch.setattr(sshlog, "peer_allowed", lambda sock, *a, **k: True)
    monkeypatch.setattr(sshlog, "peer_creds", lambda sock: creds["value"])
    servers = []

    def start(inject):
        daemon = AttachDaemon(tracker, proc.base, inject)
        path = str(tmp_path / ("api%d.sock" % len(servers)))
        server = sshlog.ApiServer(path, sshlog.ApiHandler)
        server.daemon_ref = daemon
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

        def request(obj):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            s.sendall(json.dumps(obj).encode() + b"\n")
            return s, s.makefile("rb")
        return daemon, request
    yield start, creds
    for server in servers:
        server.shutdown()
        server.server_close()


def test_non_root_attaches_read_only_and_may_not_kill(api):
    start, creds = api
    daemon, request = start(inject=True)
    creds["value"] = (999999, 54321, 54321)
    s, f = request({"cmd": "kill", "tty": 4})
    assert json.loads(f.readline()) == {"ok": False, "error": "permission denied: only root "
                                                             "may kill a session"}
    s.close()
    s, f = request({"cmd": "attach", "tty": 4})
    reply = json.loads(f.readline())
    assert reply["ok"] and reply["data"]["readonly"] is True
    assert reply["data"]["why_readonly"] == "only root may type into a session"
    assert (reply["data"]["rows"], reply["data"]["cols"]) == (24, 80)
    s.sendall(b'{"i": "ZWNobyBoaQ0="}\n')
    assert json.loads(f.readline()) == {"notice": "read-only: what you type is not sent"}
    s.sendall(b'{"detach": true}\n')
    deadline = time.monotonic() + 5
    while len(daemon.audited) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.close()
    assert [(e.action, e.admin_uid, e.readonly) for e in daemon.audited] == [
        ("attach", 54321, True), ("detach", 54321, True)]
    assert daemon.audited[0].text() == ("session_attach (2062) alice attached by 54321 "
                                        "(uid 54321, pid 999999), read-only")


def test_root_without_the_flag_is_read_only_and_unknown_ttys_are_refused(api):
    start, creds = api
    daemon, request = start(inject=False)
    s, f = request({"cmd": "attach", "tty": 4, "readonly": False})
    data = json.loads(f.readline())["data"]
    assert data["readonly"] and "without --enable-session-injection" in data["why_readonly"]
    s.close()
    for tty in (5, "x"):
        s, f = request({"cmd": "attach", "tty": tty})
        reply = json.loads(f.readline())
        assert not reply["ok"] and ("no session on tty 5" == reply["error"] or
                                    "must be a number" in reply["error"])
        s.close()


def test_attach_from_inside_the_session_is_refused(api):
    start, creds = api
    daemon, request = start(inject=True)
    creds["value"] = (2070, 0, 0)
    proc = FakeProc(daemon.proc)
    proc.process(2063, comm="sshd", ppid=2062)
    proc.process(2070, comm="sudo", ppid=2063)
    proc.process(2062, comm="sshd", ppid=700)
    s, f = request({"cmd": "attach", "tty": 4})
    assert json.loads(f.readline()) == {"ok": False, "error": "refusing to attach to your own "
                                                              "session (tty 4)"}
    s.close()
    assert daemon.audited == []


def test_kill_never_signals_an_unverified_pid(api, monkeypatch):
    start, creds = api
    daemon, request = start(inject=True)
    signalled = []
    monkeypatch.setattr(sshlog.os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    # the monitor 2062 is not in the fake /proc: its start time cannot match the session
    s, f = request({"cmd": "kill", "tty": 4})
    reply = json.loads(f.readline())
    assert not reply["ok"] and "cannot be verified; nothing signalled" in reply["error"]
    assert signalled == []
    assert [(e.action, e.detail_text[:7]) for e in daemon.audited] == [("kill", "failed:")]


def test_admin_actions_are_marked_in_the_recording(tmp_path):
    admin = dict(admin_uid=0, admin_pid=777, admin_name="root")
    run(action(tmp_path), ev(sshlog.ConnectionEstablished),
        ev(sshlog.SessionAttach, 0.1, action="attach", readonly=False, **admin),
        ev(sshlog.SessionAttach, 0.2, action="input", data_len=1, **admin),
        ev(sshlog.SessionAttach, 0.3, action="input", data_len=1, **admin),
        ev(sshlog.SessionAttach, 0.4, action="detach", **admin),
        ev(sshlog.SessionAttach, 0.5, action="kill", **admin),
        ev(sshlog.ConnectionClose, 1))
    _, events = read_cast(tmp_path / "rec" / "ssh_4242.cast")
    assert [e[2] for e in events if e[1] == "m"] == [
        "sshlog: attached by root (uid 0, pid 777)", "sshlog: typing by root (uid 0, pid 777)",
        "sshlog: detached by root (uid 0, pid 777)", "sshlog: killed by root (uid 0, pid 777)",
        "sshlog: connection closed"]
    log = (tmp_path / "rec" / "ssh_4242.log").read_text()
    assert "[[ sshlog killed by root (uid 0, pid 777) ]]\n" in log


@pytest.mark.parametrize("data", [
    b"\x1b[>4;2mvim\x1b[?4m text",            # modifyOtherKeys; a private SGR pyte rejects
    b"\x1b[?1049h\x1b[22;0;0t\x1b[>c\x1b[?u\x1b]11;?\x07vim text",
])
def test_pyte_never_breaks_on_what_full_screen_programs_send(data):
    pyte = pytest.importorskip("pyte")
    ansi = sshlog.render_screen(data, 5, 30)
    screen = pyte.Screen(30, 5)
    sshlog.pyte_stream(screen).feed(ansi)
    assert "text" in screen.display[0]
    assert not any(screen.buffer[0][x].underscore for x in range(30))


def test_the_alternate_screen_of_full_screen_programs():
    pyte = pytest.importorskip("pyte")
    before = b"line one\r\n$ vim x\r\n\x1b[?1049h\x1b[H\x1b[2J\x1b[1;1Hvim buffer\x1b[5;1H:"
    # attached while vim runs: the main screen first, then the alternate one over it
    ansi = sshlog.render_screen(before, 5, 20)
    main_part, alt_part = ansi.split("\x1b[?1049h")
    assert "line one" in main_part and "$ vim x" in main_part and "vim buffer" not in main_part
    assert "vim buffer" in alt_part
    screen = sshlog.pyte_screen(20, 5)
    stream = sshlog.pyte_stream(screen)
    stream.feed(ansi)
    assert screen.display[0].startswith("vim buffer")
    stream.feed("\x1b[?1049l")                     # vim exits: the shell's screen is back
    assert screen.display[:2] == ["line one".ljust(20), "$ vim x".ljust(20)]
    # after vim: the render is the shell's screen again
    after = sshlog.render_screen(before + b"\x1b[?1049l$ ", 5, 20)
    assert "vim buffer" not in after and "\x1b[?1049h" not in after and "line one" in after


def test_replay_text_leaves_out_the_alternate_screen(tmp_path):
    path = write_cast(tmp_path / "v.cast", [
        HEADER, '[0.1, "o", "before\\r\\n"]',
        '[0.2, "o", "\\u001b[?1049h\\u001b[2Jin vim\\r\\nmore\\r\\nand more\\r\\nscrolls"]',
        '[0.3, "o", "\\u001b[?1049lafter\\r\\n"]'])
    assert run_cli("replay", "--text", path)[1].splitlines() == ["before", "after"]


# ---------------------------------------------------------------------------------------
# typing into a terminal from outside: pidfd_getfd on a master, TIOCSTI as the fallback

def _pty_index(fd):
    return int(os.ttyname(fd).rsplit("/", 1)[1])


def test_pidfd_getfd_takes_a_copy_of_another_process_fd(tmp_path):
    import subprocess
    master, slave = os.openpty()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             pass_fds=(master,))
    try:
        try:
            fd = sshlog.pidfd_getfd(child.pid, master)
        except OSError as e:
            pytest.skip("pidfd_getfd not allowed here: %s" % e)
        try:
            os.write(fd, "h\u00e9\u20ac\n".encode())
            assert os.read(slave, 100) == "h\u00e9\u20ac\n".encode()
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
        os.close(master)
        os.close(slave)


def test_session_input_falls_back_to_tiocsti(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("TIOCSTI into a terminal that is not ours needs root")
    master, slave = os.openpty()
    try:
        s = sshlog.Session(ptm_pid=999999, session_id="x", start=0, tty=_pty_index(slave))
        typing = sshlog.SessionInput(s)
        try:
            typing.write("ls \u20ac\n".encode())
        except OSError as e:
            pytest.skip("TIOCSTI refused here (dev.tty.legacy_tiocsti=0?): %s" % e)
        finally:
            typing.close()
        assert typing.how == "TIOCSTI"
        assert os.read(slave, 100) == "ls \u20ac\n".encode()
    finally:
        os.close(master)
        os.close(slave)


def test_secret_prompt_is_echo_off_in_canonical_mode():
    import termios
    master, slave = os.openpty()
    try:
        s = sshlog.Session(ptm_pid=1, session_id="x", start=0, tty=_pty_index(slave))
        typing = sshlog.SessionInput(s)
        typing.fd, typing.how = os.dup(master), "test"
        attrs = termios.tcgetattr(slave)
        for lflag, secret in ((attrs[3] | termios.ECHO | termios.ICANON, False),
                              (attrs[3] & ~termios.ECHO | termios.ICANON, True),   # sudo
                              (attrs[3] & ~(termios.ECHO | termios.ICANON), False)):  # readline
            attrs[3] = lflag
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            assert typing.secret_prompt() is secret
        typing.close()
    finally:
        os.close(master)
        os.close(slave)


def test_a_recording_whose_header_fails_in_a_tick_is_not_flushed_after(tmp_path):
    act = action(tmp_path)
    act.handle(ev(sshlog.ConnectionEstablished, 0))
    rec = act.sessions[4242]
    flushed = []

    def full_disk(_command):
        raise OSError(28, "No space left on device")
    with act.lock:                        # the flusher thread waits meanwhile
        rec.write_header, rec.flush = full_disk, lambda: flushed.append(True)
        rec.header_done, rec.opened, rec.dirty_since = False, 0.0, 0.0
        act.tick(time.monotonic())
        assert rec.broken and act.errors == 1 and flushed == []
        del rec.write_header, rec.flush
    act.close()
