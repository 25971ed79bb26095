"""Property tests (hypothesis): arbitrary input raises only the documented errors.

- parse_config: anything YAML-ish -> a Config or ConfigError (never another exception);
- parse_report_line / EventReport: any line -> a record, None, or ValueError (a counted
  corrupt line); whole files of junk -> a report, never an exception;
- decode_record: any bytes -> a record or ValueError.
"""
import io
import json
import string

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import sshlog  # noqa: E402
from factories import command_finish, make_event  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- the configuration loader -----------------------------------------------------------------

WORDS = sorted(set(["events", "actions", "event", "triggers", "filters", "action", "plugin"]
                   + list(sshlog.EVENT_TYPES) + list(sshlog.FILTERS) + list(sshlog.ACTIONS)
                   + [p.name for cls in sshlog.ACTIONS.values() for p in cls.PARAMS]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True), st.sampled_from(WORDS),
                    st.text(max_size=12), st.sampled_from(["> 1", "!= 0", "a{99999}", "(", "*",
                                                           "/tmp/x.log", "-1", "1e400"]))
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=8), st.integers(), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


documents = st.one_of(
    values,
    st.fixed_dictionaries({"events": st.lists(st.dictionaries(
        st.sampled_from(["event", "triggers", "filters", "actions", "x"]), values, max_size=5),
        max_size=3)}, optional={"actions": st.lists(st.dictionaries(keys, values, max_size=6),
                                                    max_size=3)}))


def _check_config(sources):
    try:
        cfg = sshlog.parse_config(sources)
    except sshlog.ConfigError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)
        return
    assert isinstance(cfg, sshlog.Config)


@SETTINGS
@given(st.lists(documents, min_size=1, max_size=3))
def test_parse_config_structures_raise_only_config_error(docs):
    import yaml
    sources = []
    for i, doc in enumerate(docs):
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except (yaml.YAMLError, ValueError, OverflowError):
            continue
        sources.append(("f%d.yaml" % i, text.encode("utf-8", "surrogatepass")))
    _check_config(sources)


yamlish = st.lists(st.one_of(
    st.sampled_from(["events:", "actions:", "  - event: e", "    triggers: [command_start]",
                     "    filters: {username: [a, b]}", "    actions:", "      - action: a",
                     "        plugin: eventlogfile_action", "        log_file_path: /x",
                     "- ", ": ", "{", "[", "&a", "*a", "!!python/name:os.system", "'", '"',
                     "\t", "---", "...", "? ", "%YAML 1.1", "<<: *a", "~", "0x1F", "1e400"]),
    st.text(alphabet=string.printable, max_size=20)), max_size=12).map("\n".join)


@SETTINGS
@given(yamlish, st.binary(max_size=30))
def test_parse_config_text_raises_only_config_error(text, junk):
    _check_config([("a.yaml", text.encode()), ("b.yaml", junk)])


# -- the report parser ------------------------------------------------------------------------

def _sample_lines():
    evs = [make_event(sshlog.ConnectionEstablished), make_event(sshlog.ConnectionClose),
           make_event(sshlog.ConnectionAuthFailed, username="x y"),
           make_event(sshlog.FileUpload, target_path="/a b"), command_finish(signal="SIGKILL",
                                                                             exit_code=137)]
    return [sshlog.event_line(e, j) for e in evs for j in (False, True)]


SAMPLES = _sample_lines()


def _mutate(data):
    line = data.draw(st.sampled_from(SAMPLES))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(line)))
        op = data.draw(st.sampled_from(["cut", "insert", "delete", "replace"]))
        piece = data.draw(st.text(max_size=6))
        if op == "cut":
            line = line[:i]
        elif op == "insert":
            line = line[:i] + piece + line[i:]
        elif op == "delete":
            line = line[:i] + line[i + len(piece):]
        else:
            line = line[:i] + piece + line[i + len(piece):]
    return line


def _json_junk():
    return st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                  st.text(max_size=10)),
                        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                st.dictionaries(st.sampled_from(
                                                    ["event_type", "timestamp", "session_id",
                                                     "ptm_pid", "username", "args", "argv",
                                                     "exit_code", "start_time", "pid",
                                                     "client_ip", "bytes", "existing"]),
                                                    inner, max_size=8)), max_leaves=15)


@st.composite
def report_lines(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        obj = draw(_json_junk())
        if isinstance(obj, dict) and draw(st.booleans()):
            obj["event_type"] = draw(st.sampled_from(sorted(sshlog.REPORT_TYPES)))
            obj["timestamp"] = draw(st.sampled_from(["2024-05-01T10:00:00.5Z", "2024-05-01",
                                                     "9999-99-99T99:99:99Z", "", 5]))
        return json.dumps(obj)
    return _mutate(draw(st.data()))


@SETTINGS
@given(report_lines(), st.sampled_from([None, 0.0, 1714557600.0]),
       st.sampled_from([None, 1714557600.0, 4e9]))
def test_report_line_is_a_record_none_or_value_error(line, since, until):
    try:
        rec = sshlog.parse_report_line(line, since, until)
    except ValueError:
        return
    assert rec is None or isinstance(rec, sshlog.ReportRecord)
    if rec is not None:
        r = sshlog.EventReport()
        r.add(rec)
        sshlog.render_report(r.result(), "text")


@SETTINGS
@given(st.lists(report_lines(), max_size=30), st.sampled_from(sshlog.REPORT_FORMATS))
def test_report_over_junk_files_never_raises(lines, fmt):
    data = b"".join((x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass"))
                    + b"\n" for x in lines)
    r = sshlog.EventReport()
    r._scan(io.BytesIO(data))
    assert r.lines >= len(lines) and r.corrupt <= r.lines
    out = sshlog.render_report(r.result(), fmt)
    assert "\x1b" not in out


@SETTINGS
@given(st.lists(st.one_of(report_lines(), st.text(alphabet="x\u00e9\u20ac", min_size=20,
                                                          max_size=300)),
                max_size=20),
       st.integers(1, 200), st.booleans())
def test_report_does_not_depend_on_how_the_file_is_read(lines, block, final_newline):
    """Lines split across read blocks, over-long lines (limit lowered to 80 here), a last
    line without its newline: the same counts and the same report, whatever the block."""
    data = b"\n".join((x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass"))
                      .replace(b"\n", b" ") for x in lines) + (b"\n" if final_newline else b"")
    results = []
    old = sshlog.REPORT_MAX_LINE
    sshlog.REPORT_MAX_LINE = 80
    try:
        for size in (block, 1 << 20):
            r = sshlog.EventReport()
            r._scan(io.BytesIO(data), block_size=size)
            results.append((r.lines, r.corrupt, json.dumps(r.result(), sort_keys=True)))
    finally:
        sshlog.REPORT_MAX_LINE = old
    assert results[0] == results[1]
    assert results[0][0] == data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# -- the BPF record decoder -------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 20), st.integers(0, 2 ** 32 - 1),
       st.binary(max_size=20000))
def test_decode_record_raises_only_value_error(head, rtype, length, tail):
    hdr = bytes(sshlog.RecHdr(rtype, 1, 2, length, 3))
    for raw in (head, hdr + tail, hdr + head):
        try:
            sshlog.decode_record(raw)
        except ValueError:
            pass
