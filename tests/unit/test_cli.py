"""Command line: version, usage errors, dump-probes, daemon as non-root, small helpers."""
import os

import pytest

import sshlog


def test_version(capsys):
    assert sshlog.main(["version"]) == 0
    out, err = capsys.readouterr()
    assert out == "sshlog %s\n" % sshlog.__version__
    assert err == ""


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["watch", "--bogus-flag"],
                                  ["sessions", "extra-argument"], ["check-config", "--config-dir"]],
                         ids=["unknown-command", "no-command", "unknown-flag", "extra-arg",
                              "missing-value"])
def test_usage_errors_exit_2(argv, capsys):
    assert sshlog.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: sshlog" in err and "error:" in err
    assert "Traceback" not in err


def test_unknown_command_names_the_choices(capsys):
    sshlog.main(["frobnicate"])
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    for name in ("daemon", "watch", "sessions", "check-config", "version"):
        assert name in err


def test_help_exits_0(capsys):
    assert sshlog.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sshlog") and "dump-probes" in out


@pytest.mark.skipif(not os.path.isdir(os.path.join(sshlog.TRACEFS, "events", "syscalls")),
                    reason="tracefs is not mounted at %s" % sshlog.TRACEFS)
def test_dump_probes(capsys):
    assert sshlog.main(["dump-probes"]) == 0
    out, err = capsys.readouterr()
    first, rest = out.split("\n", 1)
    assert first.startswith("// cflags: ")
    flags = first[len("// cflags: "):].split()
    for flag in ("-DCTL_PAGES=%d" % sshlog.CTL_PAGES, "-DTTY_PAGES=%d" % sshlog.TTY_PAGES,
                 "-DARGV_CAP=%d" % sshlog.ARGV_CAP, "-DSTDOUT_CAP=%d" % sshlog.STDOUT_CAP,
                 "-DCAPTURE_INPUT=0", "-DTRACK_MAX=%d" % sshlog.TRACK_MAX):
        assert flag in flags
    assert all(f.startswith("-D") and "=" in f for f in flags)
    if sshlog.btf_member_offset("task_struct", "exit_code") is not None:
        assert any(f.startswith("-DOFF_EXIT_CODE=") for f in flags)
    assert rest == sshlog.probe_source()
    assert "TRACEPOINT_PROBE(sched, sched_process_exec)" in rest
    assert err == ""


def test_probe_source_is_the_c_file():
    with open(os.path.join(os.path.dirname(sshlog.__file__), "bpf_probes.c")) as f:
        assert sshlog.probe_source() == f.read()


def test_daemon_as_non_root_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc = sshlog.main(["daemon", "--socket", str(tmp_path / "s.sock"),
                      "--config-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("sshlog: error: the daemon needs root")
    assert not os.path.exists(str(tmp_path / "s.sock.lock"))   # nothing created


@pytest.mark.parametrize("seconds,text", [
    (0, "just now"), (9, "just now"), (10, "10 sec ago"), (59, "59 sec ago"),
    (60, "1 min ago"), (150, "2 min ago"), (3600, "1 hour ago"), (7300, "2 hours ago"),
    (86400, "1 day ago"), (3 * 86400 + 5, "3 days ago"),
])
def test_humanize_age(seconds, text):
    assert sshlog.humanize_age(seconds) == text


def test_format_table_aligns_columns():
    table = sshlog.format_table(("User", "TTY"), [("mapoo", 4), ("a", 12)])
    assert table.splitlines() == ["User   TTY", "mapoo  4", "a      12"]
    assert sshlog.format_table(("User", "TTY"), []) == "User  TTY"


@pytest.mark.parametrize("text,shown", [
    ("plain", "plain"), ("tab\there", "tab\\x09here"), ("\x1b[31mred", "\\x1b[31mred"),
    ("nul\x00", "nul\\x00"), ("del\x7f", "del\\x7f"), ("csi\x9b", "csi\\x9b"),
    ("ünïcode ✓", "ünïcode ✓"),
])
def test_printable(text, shown):
    assert sshlog.printable(text) == shown


@pytest.mark.parametrize("data,text", [
    (b"ok", "ok"), (b"caf\xc3\xa9", "café"), (b"\xff\xfe", "\\xff\\xfe"),
    (b"half \xe2\x9c", "half \\xe2\\x9c"),
])
def test_decode_bytes_never_loses_data(data, text):
    assert sshlog.decode_bytes(data) == text


@pytest.mark.parametrize("num,name", [(15, "SIGTERM"), (9, "SIGKILL"), (2, "SIGINT"),
                                      (99, "SIG99")])
def test_signal_name(num, name):
    assert sshlog.signal_name(num) == name
