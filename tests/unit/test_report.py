"""`sshlog report`: parsing both log forms, periods, rotations, formats, errors, bounds."""
import calendar
import csv
import gzip
import io
import json
import os
import sys
import tracemalloc

import pytest

import sshlog
from factories import SPEC_TS, command_finish, make_event

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import eventlog_gen  # noqa: E402

T0 = calendar.timegm((2024, 5, 1, 12, 0, 0))


def write_log(path, n=2000, as_json=False, start=T0, seed=1):
    with open(path, "w", encoding="utf-8") as f:
        return eventlog_gen.generate(f, n, as_json, start=start, seed=seed)


def report(*paths, **kw):
    r = sshlog.EventReport(**kw)
    for p in paths:
        r.read(str(p))
    return r.result()


def run_cli(capsys, *argv):
    rc = sshlog.main(["report"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- the text grammar, event by event ---------------------------------------------------------

def lines_for(ev):
    return [sshlog.event_line(ev, False), sshlog.event_line(ev, True)]


@pytest.mark.parametrize("as_json", [False, True])
def test_each_event_type_round_trips(utc, as_json):
    pick = (lambda ev: sshlog.event_line(ev, as_json))
    est = make_event(sshlog.ConnectionEstablished)
    r = sshlog.parse_report_line(pick(est))
    assert (r.type, r.user, r.ip, r.port, int(r.ts)) == (
        "connection_established", "root", "211.249.71.117", 52566, int(SPEC_TS))
    v6 = make_event(sshlog.ConnectionClose, client_ip="2001:db8::7", client_port=40022,
                    end_time=SPEC_TS)
    r = sshlog.parse_report_line(pick(v6))
    assert (r.type, r.ip, r.port) == ("connection_close", "2001:db8::7", 40022)
    fin = command_finish(exit_code=143, signal="SIGTERM", filename="/usr/bin/sleep",
                         argv=("sleep", "300"))
    r = sshlog.parse_report_line(pick(fin))
    assert (r.type, r.user, r.exit_code, r.signal, r.args, r.filename) == (
        "command_finish", "mapoo", 143, "SIGTERM", "/usr/bin/sleep 300", "/usr/bin/sleep")
    start = make_event(sshlog.CommandStart, username="mapoo", filename="/usr/bin/id",
                       argv=("id", "-un"))
    r = sshlog.parse_report_line(pick(start))
    assert (r.type, r.user, r.args, r.filename) == ("command_start", "mapoo", "/usr/bin/id -un",
                                                    "/usr/bin/id")
    up = make_event(sshlog.FileUpload, username="mapoo", target_path="/home/mapoo/a b.tgz",
                    bytes=77)
    r = sshlog.parse_report_line(pick(up))
    assert (r.type, r.user, r.path) == ("file_upload", "mapoo", "/home/mapoo/a b.tgz")
    assert r.nbytes == (77 if as_json else None)


@pytest.mark.parametrize("as_json", [False, True])
def test_hostile_names_stay_in_their_field(utc, as_json):
    # an attempted account is chosen by the client: spaces, "from ip", escapes
    name = "evil from ip 1.2.3.4:5 \x1b[2J"
    ev = make_event(sshlog.ConnectionAuthFailed, username=name, client_ip="203.0.113.9",
                    client_port=40022)
    r = sshlog.parse_report_line(sshlog.event_line(ev, as_json))
    assert r.user == "evil from ip 1.2.3.4:5 \\x1b[2J" and r.ip == "203.0.113.9"
    anon = make_event(sshlog.ConnectionAuthFailed, username="", client_ip="203.0.113.9")
    assert sshlog.parse_report_line(sshlog.event_line(anon, as_json)).user == ""
    fin = command_finish(argv=("echo", "\x1b]0;pwned\x07", "x\ny", "\udcff"),
                         filename="/bin/echo")
    r = sshlog.parse_report_line(sshlog.event_line(fin, as_json))
    assert "\x1b" not in r.args and "\n" not in r.args and r.args.startswith("/bin/echo ")


def test_other_lines(utc):
    tu = make_event(sshlog.TerminalUpdate, terminal_data="hi", data_len=2)
    for line in sshlog.event_line(tu, False), sshlog.event_line(tu, True):
        assert sshlog.parse_report_line(line) is None          # counted as read, not reported
    assert sshlog.parse_report_line(b"\n") is None
    assert sshlog.parse_report_line("2024-05-01 12:00:00 session_attach (12) root attached") \
        is None                                                 # event types of the future
    for bad in ("hello", "2024-05-01 12:00:00 command_finish (1) x what", "{}", "[1]", "{",
                '{"event_type": "command_start", "timestamp": "yesterday"}',
                "2024-13-01 12:00:00 command_start (1) u executed /x", "[" * 100000,
                b"\xff\xfe{"):
        with pytest.raises(ValueError):
            sshlog.parse_report_line(bad)


# -- whole reports ----------------------------------------------------------------------------

@pytest.mark.parametrize("as_json", [False, True])
def test_report_counts_match_what_was_written(tmp_path, utc, as_json):
    path = tmp_path / "event.log"
    exp = write_log(path, 3000, as_json)
    r = report(path)
    assert r["lines"] == exp["events"] and r["corrupt_lines"] == 0
    assert r["logins"]["total"] == exp["logins"]
    assert r["failed_logins"]["total"] == exp["failed"]
    assert r["sessions_total"] == exp["sessions"] == len(r["sessions"])
    assert r["top_commands"]["total"] == exp["commands"]
    assert r["privilege_total"] == exp["sudo"] == len(r["privilege"])
    assert all(p["exit_code"] == 0 for p in r["privilege"])
    assert r["uploads_total"] == exp["uploads"]
    assert sum(s["failed_commands"] for s in r["sessions"]) == exp["failed_commands"]
    assert sum(s["commands"] for s in r["sessions"]) == exp["commands"]
    assert all(s["end"] is not None and s["duration_s"] >= 0 for s in r["sessions"])
    assert all(s["exit_codes"] in ({}, {"1": s["failed_commands"]}) for s in r["sessions"])


def test_text_and_json_logs_give_the_same_report(tmp_path, utc):
    write_log(tmp_path / "a.log", 2000, False)
    write_log(tmp_path / "a.jsonl", 2000, True)
    t, j = report(tmp_path / "a.log"), report(tmp_path / "a.jsonl")
    for key in ("logins", "failed_logins", "top_commands", "sessions_total", "privilege_total",
                "uploads_total"):
        assert t[key] == j[key], key
    pick = [(s["user"], s["client_ip"], s["commands"], s["uploads"], s["exit_codes"])
            for s in t["sessions"]]
    assert pick == [(s["user"], s["client_ip"], s["commands"], s["uploads"], s["exit_codes"])
                    for s in j["sessions"]]


def test_period_and_user_filters(tmp_path, utc):
    path = tmp_path / "event.log"
    exp = write_log(path, 3000)
    mid = (T0 + exp["end"]) / 2
    first, second = report(path, until=mid), report(path, since=mid)
    assert first["events"] + second["events"] == exp["events"]
    assert first["last_event"] < mid <= second["first_event"]
    # a session cut by the period boundary appears in both halves, its start unknown in one
    cut = [s for s in second["sessions"] if s["start"] is None]
    assert len(cut) <= 1
    alice = report(path, users=["alice"])
    assert {x["user"] for x in alice["logins"]["by_user_source"]} == {"alice"}
    assert {s["user"] for s in alice["sessions"]} == {"alice"}


def test_rotations_gzip_and_reading_order(tmp_path, utc):
    """A session that starts in event.log.2.gz and ends in event.log is paired."""
    lines = []
    base = dict(ptm_pid=4000, session_id="rot", username="alice", client_ip="192.0.2.7")
    lines.append(sshlog.event_line(make_event(sshlog.ConnectionEstablished, timestamp=T0,
                                              **base), False))
    lines.append(sshlog.event_line(make_event(sshlog.CommandStart, timestamp=T0 + 60, pid=1,
                                              filename="/usr/bin/su", argv=("su", "-"),
                                              **base), False))
    lines.append(sshlog.event_line(command_finish(timestamp=T0 + 70, pid=1, filename="/usr/bin/su",
                                                  argv=("su", "-"), exit_code=1, **base), False))
    lines.append(sshlog.event_line(make_event(sshlog.ConnectionClose, timestamp=T0 + 3600,
                                              end_time=T0 + 3600, **base), False))
    log = tmp_path / "event.log"
    with gzip.open(str(log) + ".2.gz", "wt") as f:
        f.write(lines[0] + "\n")
    (tmp_path / "event.log.1").write_text(lines[1] + "\n" + lines[2] + "\n")
    log.write_text(lines[3] + "\n")
    (tmp_path / "event.log.old").write_text("not a rotation\n")
    files = sshlog.event_log_rotations(str(log))
    assert files == [str(log) + ".2.gz", str(log) + ".1", str(log)]
    r = report(*files)
    assert r["corrupt_lines"] == 0 and r["sessions_total"] == 1
    s = r["sessions"][0]
    assert (s["user"], s["client_ip"], s["duration_s"], s["commands"], s["exit_codes"]) == (
        "alice", "192.0.2.7", 3600, 1, {"1": 1})
    assert r["privilege"] == [{"time": T0 + 60, "user": "alice", "client_ip": "192.0.2.7",
                               "command": "/usr/bin/su -", "exit_code": 1}]
    # named on the command line in any order: read oldest first all the same
    assert sshlog.order_log_files([str(log), str(log) + ".1", str(log) + ".2.gz"]) == files


def test_corrupt_lines_are_counted_and_skipped(tmp_path, utc, monkeypatch):
    path = tmp_path / "event.log"
    exp = write_log(path, 500, True)
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1)
    monkeypatch.setattr(sshlog, "REPORT_MAX_LINE", 4096)
    path.write_bytes(b"garbage\n\x00\x01\x02\n" + b"x" * 10000 + b"\n" + data[:cut + 1]
                     + data[cut + 1:cut + 40])          # the last line cut short (a crash)
    r = report(path)
    assert r["corrupt_lines"] == 4
    assert r["lines"] == exp["events"] + 3
    rc_text = sshlog.render_report(r, "text")
    assert "warning: 4 corrupt line(s) skipped" in rc_text


def test_empty_period_says_no_activity(tmp_path, capsys, utc):
    path = tmp_path / "event.log"
    write_log(path, 300)
    for fmt in ("text", "markdown"):
        rc, out, err = run_cli(capsys, "--since", "2030-01-01", "--format", fmt, path)
        assert rc == 0 and err == ""
        assert "No activity in this period." in out and len(out.splitlines()) <= 6
    rc, out, _ = run_cli(capsys, "--since", "2030-01-01", "--format", "json", path)
    data = json.loads(out)
    assert rc == 0 and data["activity"] is False and data["lines"] > 0 and data["events"] == 0
    path.write_text("")
    rc, out, _ = run_cli(capsys, path)
    assert rc == 0 and "No activity" in out


def test_missing_unreadable_and_broken_logs_are_one_line_errors(tmp_path, capsys):
    rc, out, err = run_cli(capsys, tmp_path / "nope.log")
    assert rc == 1 and out == ""
    assert err == "sshlog: error: cannot read %s: No such file or directory\n" % (
        tmp_path / "nope.log")
    rc, _, err = run_cli(capsys, tmp_path)
    assert rc == 1 and str(tmp_path) in err and len(err.splitlines()) == 1
    bad = tmp_path / "event.log.1.gz"
    bad.write_bytes(gzip.compress(b"2024-05-01 12:00:00 x (1) y\n" * 100)[:60])
    rc, _, err = run_cli(capsys, bad)
    assert rc == 1 and str(bad) in err and len(err.splitlines()) == 1
    if os.geteuid() != 0:
        locked = tmp_path / "locked.log"
        locked.write_text("")
        locked.chmod(0)
        rc, _, err = run_cli(capsys, locked)
        assert rc == 1 and "Permission denied" in err


@pytest.mark.parametrize("arg,expect", [
    ("24h", T0 - 86400), ("7d", T0 - 7 * 86400), ("30m", T0 - 1800), ("2w", T0 - 14 * 86400),
    ("2024-04-30", calendar.timegm((2024, 4, 30, 0, 0, 0))),
    ("2024-04-30 13:05", calendar.timegm((2024, 4, 30, 13, 5, 0))),
    ("2024-04-30T13:05:06", calendar.timegm((2024, 4, 30, 13, 5, 6))),
    ("2024-04-30T13:05:06Z", calendar.timegm((2024, 4, 30, 13, 5, 6))),
    ("2024-04-30T15:05:06+02:00", calendar.timegm((2024, 4, 30, 13, 5, 6))),
    ("all", None), ("now", T0),
])
def test_period_arguments(utc, arg, expect):
    assert sshlog.parse_report_time(arg, T0) == expect


def test_bad_period_arguments_are_usage_errors(tmp_path, capsys):
    for argv in (["--since", "yesterdayish"], ["--until", "2024-02-30"],
                 ["--since", "2024-05-02", "--until", "2024-05-01"], ["--top", "0"],
                 ["--format", "xml"]):
        rc, out, err = run_cli(capsys, *(argv + [tmp_path / "x.log"]))
        assert rc == 2 and out == "", (argv, err)
        assert "error: " in err.splitlines()[-1] and "Traceback" not in err


def test_formats_are_stable_and_machine_readable(tmp_path, capsys, utc):
    path = tmp_path / "event.log"
    exp = write_log(path, 1500, True)
    rc, out, _ = run_cli(capsys, "--since", "all", "--format", "json", path)
    data = json.loads(out)
    assert rc == 0 and data["logins"]["total"] == exp["logins"]
    assert data["sessions"][0]["start"].endswith("Z") and data["since"] is None
    assert list(data) == sorted(data)
    rc, out, _ = run_cli(capsys, "--since", "all", "--format", "csv", path)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == sshlog.REPORT_CSV_COLUMNS[:]
    assert sum(int(r["count"]) for r in rows if r["section"] == "login") == exp["logins"]
    assert sum(1 for r in rows if r["section"] == "session") == exp["sessions"]
    assert sum(1 for r in rows if r["section"] == "privilege") == exp["sudo"]
    rc, out, _ = run_cli(capsys, "--since", "all", "--format", "markdown", "--top", "3", path)
    assert out.startswith("# sshlog report") and "## Sessions: %d" % exp["sessions"] in out
    assert "| Count | Command |" in out
    rc, text, _ = run_cli(capsys, "--since", "all", path)
    assert "Logins: %d" % exp["logins"] in text and "\x1b" not in text
    assert "Failed logins: %d from " % exp["failed"] in text


def test_no_escape_sequence_reaches_the_reader(tmp_path, capsys, utc):
    evil = "\x1b]0;pwned\x07\x1b[2J\u009b31m"
    lines = [sshlog.event_line(make_event(sshlog.ConnectionEstablished, username="u" + evil,
                                          timestamp=T0), True),
             sshlog.event_line(command_finish(timestamp=T0 + 1, filename="/bin/" + evil,
                                              argv=(evil, evil), exit_code=2), True),
             sshlog.event_line(make_event(sshlog.FileUpload, timestamp=T0 + 2,
                                          target_path="/tmp/a\nb" + evil), True)]
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for fmt in sshlog.REPORT_FORMATS:
        rc, out, _ = run_cli(capsys, "--since", "all", "--format", fmt, path)
        assert rc == 0 and "\x1b" not in out and "\x07" not in out and "\u009b" not in out
        if fmt in ("text", "markdown"):
            assert "\\x1b" in out


def test_default_logs_come_from_the_configuration(tmp_path, capsys, utc):
    conf = tmp_path / "cfg"
    (conf / "conf.d").mkdir(parents=True)
    text_log, json_log = tmp_path / "ev.log", tmp_path / "ev.jsonl"
    (conf / "conf.d" / "a.yaml").write_text(
        "events:\n  - event: e\n    triggers: [command_finish]\n    actions:\n"
        "      - action: t\n        plugin: eventlogfile_action\n        log_file_path: %s\n"
        "      - action: j\n        plugin: eventlogfile_action\n        log_file_path: %s\n"
        "        output_json: true\n      - action: p\n        plugin: not_loaded_plugin\n"
        % (text_log, json_log))
    assert sshlog.configured_event_logs(str(conf)) == [str(json_log)]
    rc, _, err = run_cli(capsys, "--config-dir", conf)
    assert rc == 1 and str(json_log) in err and "does not exist" in err
    write_log(json_log, 200, True)
    os.rename(json_log, str(json_log) + ".1")
    write_log(json_log, 200, True, start=T0 + 86400, seed=2)
    rc, out, err = run_cli(capsys, "--config-dir", conf, "--since", "all")
    assert rc == 0, err
    assert "from 2 file(s): %s.1, %s" % (json_log, json_log) in out
    # the embedded default writes a text log under /var/log/sshlog
    assert sshlog.configured_event_logs(None, str(tmp_path / "absent")) == [
        "/var/log/sshlog/event.log"]


def test_restarted_daemon_does_not_count_a_login_twice(tmp_path, utc):
    base = dict(ptm_pid=77, session_id="again", username="bob", client_ip="192.0.2.9",
                start_time=T0)
    evs = [make_event(sshlog.ConnectionEstablished, timestamp=T0, **base),
           make_event(sshlog.ConnectionEstablished, timestamp=T0 + 50, existing=True, **base),
           command_finish(timestamp=T0 + 60, pid=5, exit_code=3, **base),
           make_event(sshlog.ConnectionClose, timestamp=T0 + 100, end_time=T0 + 100, **base)]
    for as_json in (False, True):
        path = tmp_path / ("a.jsonl" if as_json else "a.log")
        path.write_text("".join(sshlog.event_line(e, as_json) + "\n" for e in evs))
        r = report(path)
        assert r["logins"]["total"] == 1 and r["sessions_total"] == 1
        assert r["sessions"][0]["exit_codes"] == {"3": 1}
        # a period that starts after the login: JSON still knows when the session began
        # and that the second established event is a rediscovery; the text form cannot
        late = report(path, since=T0 + 40)
        assert late["logins"]["total"] == (0 if as_json else 1)
        assert late["sessions"][0]["start"] == (T0 if as_json else T0 + 50)


def test_memory_is_bounded(tmp_path, utc, monkeypatch):
    monkeypatch.setattr(sshlog, "REPORT_MAX_ROWS", 50)
    monkeypatch.setattr(sshlog, "REPORT_MAX_KEYS", 64)
    small, big = tmp_path / "small.log", tmp_path / "big.log"
    write_log(small, 20000)                   # both longer than the blocks read
    exp = write_log(big, 60000)

    def peak(path):
        tracemalloc.start()
        try:
            r = report(path)
            return tracemalloc.get_traced_memory()[1], r
        finally:
            tracemalloc.stop()
    p_small, _ = peak(small)
    p_big, r = peak(big)
    assert p_big < p_small * 1.5 + 500000, (p_small, p_big)
    assert len(r["sessions"]) == 50 and r["sessions_total"] == exp["sessions"]
    assert "latest 50 shown" in sshlog.render_report(r, "text")


def test_tally_folds_rare_keys_but_keeps_totals():
    t = sshlog._Tally(cap=10)
    for i in range(1000):
        t.add("common")
        t.add("rare%d" % i)
    assert t.total == 2000 and len(t.counts) <= 10
    assert t.top(1) == [("common", 1000)] and t.folded > 0


def test_a_text_line_with_raw_control_characters_is_reported_escaped():
    """Our writer escapes control characters; a line written elsewhere
    (hypothesis found this one) must not reach a terminal raw."""
    line = ("2023-11-28 10:57:16 connection_established (2062) root from ip "
            "\x1b211.249.71.117:52566 tty 4")
    rec = sshlog.parse_report_line(line)
    assert rec.ip == "\\x1b211.249.71.117" and rec.port == 52566
    r = sshlog.EventReport()
    r._scan(io.BytesIO(line.encode() + b"\n"))
    out = sshlog.render_report(r.result(), "text")
    assert "\x1b" not in out and "\\x1b211.249.71.117" in out
