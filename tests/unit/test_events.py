"""Event model: SPEC §5 text forms, to_dict fields, JSON, event_line()."""
import dataclasses
import json
import re

import pytest

import sshlog
import factories
from factories import SPEC_TS, command_finish, make_event

RFC3339_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

COMMON_FIELDS = ("event_type", "timestamp", "hostname", "ptm_pid", "session_id", "username",
                 "user_id", "tty_id", "client_ip", "client_port", "server_ip", "server_port",
                 "tcp_info")
COMMAND_FIELDS = ("pid", "parent_pid", "filename", "argv", "args", "start_time")
FINISH_FIELDS = COMMAND_FIELDS + ("end_time", "duration_ms", "exit_code", "signal", "stdout",
                                  "stdout_size")


def spec_events():
    """The six samples of SPEC §5, built as the tracker builds them."""
    return [
        (make_event(sshlog.ConnectionEstablished, ptm_pid=2062, username="root", tty_id=4),
         "connection_established (2062) root from ip 211.249.71.117:52566 tty 4"),
        (make_event(sshlog.CommandStart, ptm_pid=1805, username="mapoo", pid=3001,
                    parent_pid=3000, filename="/usr/bin/id", argv=("id", "-un")),
         "command_start (1805) mapoo executed /usr/bin/id -un"),
        (command_finish(),
         "command_finish (1805) mapoo execute complete (exit code: 0) /usr/bin/id -un"),
        (make_event(sshlog.ConnectionAuthFailed, ptm_pid=2101, username="mallory", user_id=-1,
                    tty_id=-1, client_ip="203.0.113.9", client_port=40022,
                    auth_method="password", reason="authentication failed"),
         "connection_auth_failed (2101) mallory from ip 203.0.113.9:40022"),
        (make_event(sshlog.FileUpload, ptm_pid=1805, username="mapoo", pid=3005,
                    target_path="/home/mapoo/a.tgz", file_mode="644", bytes=1024),
         "file_upload (1805) mapoo uploaded file /home/mapoo/a.tgz"),
        (make_event(sshlog.ConnectionClose, ptm_pid=2062, username="root",
                    end_time=SPEC_TS, duration_ms=60000),
         "connection_close (2062) root from ip 211.249.71.117:52566"),
    ]


@pytest.mark.parametrize("event,text", spec_events(), ids=lambda x: getattr(x, "type", ""))
def test_text_form_as_in_spec(event, text):
    assert event.text() == text


@pytest.mark.parametrize("event,text", spec_events(), ids=lambda x: getattr(x, "type", ""))
def test_event_line_text_has_local_time_prefix(utc, event, text):
    assert sshlog.event_line(event, as_json=False) == "2023-11-28 10:57:16 " + text


def test_event_line_text_uses_local_time():
    event = spec_events()[0][0]
    line = sshlog.event_line(event, as_json=False)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d connection_established ", line)
    assert line == "%s %s" % (sshlog.local_time(event.timestamp), event.text())


@pytest.mark.parametrize("event,_text", spec_events(), ids=lambda x: getattr(x, "type", ""))
def test_event_line_json_is_pure_json(event, _text):
    line = sshlog.event_line(event, as_json=True)
    assert line.startswith("{") and line.endswith("}") and "\n" not in line
    assert json.loads(line) == event.to_dict()


def test_ipv6_peer_in_brackets():
    ev = make_event(sshlog.ConnectionEstablished, client_ip="2001:db8::7", client_port=40022)
    assert ev.text() == "connection_established (2062) root from ip [2001:db8::7]:40022 tty 4"


def test_unknown_peer_and_no_user():
    ev = make_event(sshlog.ConnectionAuthFailed, username="", client_ip="", client_port=0)
    assert ev.text() == "connection_auth_failed (2062) from ip ?:0"


def test_signal_in_finish_text():
    ev = command_finish(filename="/usr/bin/sleep", argv=("sleep", "100"), exit_code=143,
                        signal="SIGTERM")
    assert ev.text() == ("command_finish (1805) mapoo execute complete "
                         "(exit code: 143, killed by SIGTERM) /usr/bin/sleep 100")


def test_args_is_executed_path_followed_by_argv_tail():
    # argv[0] as the program chose it ("-bash", "vi" for vim) is not what `args` shows
    ev = make_event(sshlog.CommandStart, filename="/usr/bin/vim.basic", argv=("vi", "a b", "c"))
    assert ev.args == "/usr/bin/vim.basic a b c"
    assert ev.to_dict()["argv"] == ["vi", "a b", "c"]


@pytest.mark.parametrize("field,value,escaped", [
    ("argv", ("printf", "\x1b[2J\x1b]0;owned\x07"), "\\x1b[2J\\x1b]0;owned\\x07"),
    ("argv", ("echo", "two\nlines\r"), "two\\x0alines\\x0d"),
    ("argv", ("echo", "c1\x9bcsi\x7f"), "c1\\x9bcsi\\x7f"),
    ("filename", "/tmp/\ttab", "/tmp/\\x09tab"),
    ("username", "ev\x1bil", "ev\\x1bil"),
])
def test_control_characters_escaped_in_text(field, value, escaped):
    ev = make_event(sshlog.CommandStart, **{field: value})
    text = ev.text()
    assert escaped in text
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", text)


def test_text_keeps_printable_unicode():
    ev = make_event(sshlog.CommandStart, filename="/bin/echo", argv=("echo", "héllo ✓"))
    assert ev.text().endswith("executed /bin/echo héllo ✓")


# ---------------------------------------------------------------------------------------
# to_dict

ALL_EVENTS = [
    (make_event(sshlog.ConnectionEstablished), ()),
    (make_event(sshlog.ConnectionAuthFailed, auth_method="publickey",
                reason="authentication failed"), ("auth_method", "reason")),
    (make_event(sshlog.ConnectionClose, end_time=SPEC_TS, duration_ms=5), ("end_time",)),
    (make_event(sshlog.CommandStart, pid=1, parent_pid=2, filename="/bin/true",
                argv=("true",)), COMMAND_FIELDS),
    (command_finish(signal="SIGKILL", exit_code=137), FINISH_FIELDS),
    (make_event(sshlog.FileUpload, target_path="/tmp/x", file_mode="600", bytes=3),
     ("target_path", "file_mode", "bytes")),
    (make_event(sshlog.TerminalUpdate, terminal_data="$ ", data_len=2, raw=b"$ "),
     ("terminal_data", "data_len")),
    (make_event(sshlog.TerminalInput, terminal_data="ls\r", data_len=3, raw=b"ls\r"),
     ("terminal_data", "data_len")),
    (make_event(sshlog.TerminalResize, rows=50, cols=132), ("rows", "cols")),
    (make_event(sshlog.SessionAttach, action="attach", admin_uid=0, admin_pid=9,
                admin_name="root"), ("action", "admin_uid", "admin_pid", "readonly")),
]


@pytest.mark.parametrize("event,extra", ALL_EVENTS, ids=lambda x: getattr(x, "type", ""))
def test_to_dict_has_every_spec_field_and_is_json(event, extra):
    d = event.to_dict()
    missing = [k for k in COMMON_FIELDS + tuple(extra) if k not in d]
    assert not missing
    assert d["event_type"] == event.type
    assert RFC3339_US.match(d["timestamp"])
    assert d["tcp_info"] == {"client_ip": d["client_ip"], "client_port": d["client_port"],
                             "server_ip": d["server_ip"], "server_port": d["server_port"]}
    for key in ("start_time", "end_time"):
        if key in extra:
            assert RFC3339_US.match(d[key]), key
    assert json.loads(json.dumps(d)) == d


def test_every_event_type_is_covered():
    assert {e.type for e, _ in ALL_EVENTS} == set(sshlog.EVENT_TYPES)


def test_timestamp_is_utc_with_microseconds():
    ev = make_event(sshlog.ConnectionEstablished, timestamp=SPEC_TS + 0.000001)
    assert ev.to_dict()["timestamp"] == "2023-11-28T10:57:16.250001Z"


def test_common_field_values():
    d = make_event(sshlog.ConnectionEstablished).to_dict()
    assert {k: d[k] for k in ("hostname", "ptm_pid", "session_id", "username", "user_id",
                              "tty_id", "client_ip", "client_port", "server_ip",
                              "server_port")} == {
        "hostname": "web1", "ptm_pid": 2062, "session_id": "0123456789abcdef",
        "username": "root", "user_id": 0, "tty_id": 4, "client_ip": "211.249.71.117",
        "client_port": 52566, "server_ip": "10.0.0.5", "server_port": 22}


def test_command_finish_times_and_status():
    d = command_finish(command_start=SPEC_TS - 1.5, duration_ms=1500, exit_code=2,
                       stdout="err\n", stdout_size=4000).to_dict()
    assert d["start_time"] == "2023-11-28T10:57:14.750000Z"
    assert d["end_time"] == "2023-11-28T10:57:16.250000Z"
    assert (d["duration_ms"], d["exit_code"], d["signal"]) == (1500, 2, None)
    assert (d["stdout"], d["stdout_size"]) == ("err\n", 4000)
    assert d["argv"] == ["id", "-un"] and d["args"] == "/usr/bin/id -un"
    assert "command_start" not in d


def test_command_start_time_is_the_command_start():
    d = make_event(sshlog.CommandStart, filename="/bin/ls", argv=("ls",)).to_dict()
    assert d["start_time"] == "2023-11-28T10:57:16.250000Z"


def test_terminal_update_has_no_raw_bytes():
    ev = make_event(sshlog.TerminalUpdate, terminal_data="\\xff ok", data_len=4,
                    raw=b"\xff ok")
    d = ev.to_dict()
    assert "raw" not in d
    assert (d["terminal_data"], d["data_len"]) == ("\\xff ok", 4)
    assert ev.raw == b"\xff ok"             # still on the event, for recordings


@pytest.mark.parametrize("cls", [sshlog.TerminalUpdate, sshlog.TerminalInput])
def test_a_captured_terminal_event_decodes_its_text_when_first_read(cls):
    """The tracker builds terminal events from raw bytes alone; their
    `terminal_data` is the bytes decoded (invalid UTF-8 escaped) on first use,
    in the same place of the JSON form as a constructed event's.  The
    constructor given no text does the same."""
    raw = b"\xff ok\r\n"
    built = cls.of(dict(factories.BASE), raw=raw, data_len=len(raw))
    assert "terminal_data" not in built.__dict__             # nothing decoded yet
    given = cls(**dict(factories.BASE, raw=raw, data_len=len(raw),
                       terminal_data=sshlog.decode_bytes(raw)))
    assert built.terminal_data == "\\xff ok\r\n"
    assert built == given and list(built.to_dict()) == list(given.to_dict())
    assert cls(**dict(factories.BASE, raw=raw)).terminal_data == built.terminal_data
    assert cls.of(dict(factories.BASE)).terminal_data == ""   # a loss marker has no bytes


def test_json_line_escapes_control_characters():
    ev = make_event(sshlog.CommandStart, filename="/bin/echo", argv=("echo", "a\nb\x1b"))
    line = sshlog.event_line(ev, as_json=True)
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["argv"] == ["echo", "a\nb\x1b"]


def test_events_are_frozen():
    ev = make_event(sshlog.ConnectionEstablished)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.username = "someone-else"


@pytest.mark.parametrize("cls", list(sshlog.EVENT_TYPES.values()), ids=list(sshlog.EVENT_TYPES))
def test_of_builds_the_same_event_as_the_constructor(cls):
    """Event.of (the tracker's cheap constructor) fills defaults and fields
    exactly as __init__ does: equal, same repr, frozen, same dict."""
    assert not any(f.default_factory is not dataclasses.MISSING for f in dataclasses.fields(cls))
    mandatory = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    base = dict(factories.BASE)
    assert mandatory <= set(base)
    assert cls.of(base) == cls(**base)
    sample = {int: 7, float: 1.5, str: "x", bytes: b"x", bool: True, tuple: ("a",)}
    given = {f.name: sample[f.type] for f in dataclasses.fields(cls)[-3:]}
    assert all(given[k] != getattr(cls.of(base), k) for k in given)
    built = cls.of(base, **given)
    assert built == cls(**dict(base, **given)) and repr(built) == repr(cls(**dict(base, **given)))
    assert built.to_dict() == cls(**dict(base, **given)).to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.username = "x"
