"""Actions end to end against real receivers on loopback (tests/receivers.py).

rsyslogd (UDP, TCP with octet counting, TLS), an SMTP server (plain, STARTTLS with login,
implicit TLS), HTTP servers (Slack's side, webhooks with HMAC), a UDP socket (statsd),
real programs for run_command_action -- and the faults: a sink that accepts and never
answers, one that refuses, one that answers 500, while the other actions keep delivering.
Events go through the real configuration parser and Pipeline.
"""
import hashlib
import hmac
import json
import logging
import os
import sys
import textwrap
import time
import urllib.parse

import pytest

import sshlog

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import receivers  # noqa: E402

NOW = time.time()
COMMON = dict(timestamp=NOW, hostname="web1", ptm_pid=2062, session_id="0123456789abcdef",
              username="alice", user_id=1001, tty_id=3, client_ip="203.0.113.7",
              client_port=52566, server_ip="10.0.0.5", server_port=22, start_time=NOW - 60)


def event(cls=sshlog.CommandFinish, **fields):
    if cls in (sshlog.CommandStart, sshlog.CommandFinish):
        fields = dict(dict(pid=3001, parent_pid=3000, filename="/usr/bin/id",
                           argv=("id", "-un")), **fields)
    if cls is sshlog.CommandFinish:
        fields = dict(dict(command_start=NOW - 1, exit_code=0, stdout="alice\n"), **fields)
    return cls(**dict(COMMON, **fields))


def pipeline(yaml_text):
    """A running Pipeline for a configuration given as YAML text."""
    config = sshlog.parse_config([("test.yaml", textwrap.dedent(yaml_text).encode())])
    return sshlog.Pipeline(config)


def one_action(plugin, triggers=None, **params):
    """YAML for one event rule with one inline action."""
    doc = {"events": [{"event": "e", "triggers": triggers or list(sshlog.EVENT_TYPES),
                       "actions": [dict({"action": "a", "plugin": plugin}, **params)]}]}
    return json.dumps(doc)          # JSON is YAML


def run(plugin, events, wait=10, **params):
    """Dispatch events through a one-action pipeline, wait until they are handled."""
    p = pipeline(one_action(plugin, **params))
    try:
        for ev in events:
            p.dispatch(ev)
        runner = p.runners["a"]
        receivers.wait_for(lambda: runner.delivered + runner.failed + runner.dropped
                           >= len(events), wait)
    finally:
        p.stop(timeout=wait)
    return p.stats()["a"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return receivers.make_cert(str(tmp_path_factory.mktemp("certs")))


# -------------------------------------------------------------------------- syslog

@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    if not os.path.exists(receivers.RSYSLOGD):
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog)")
    r = receivers.Rsyslog(tmp_path_factory.mktemp("rsyslog")).start()
    yield r
    r.stop()


def syslog_port(r, transport):
    return {"udp": r.udp_port, "tcp": r.tcp_port, "tls": r.tls_port}[transport]


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_syslog_rfc5424_text_body(rsyslog, transport):
    if transport == "tls" and not rsyslog.tls_port:
        pytest.skip("rsyslog's gtls driver is not installed (apt-get install rsyslog-gnutls)")
    tok = "tok-%s-%d" % (transport, os.getpid())
    evs = [event(argv=("echo", tok, str(i)), filename="/bin/echo") for i in range(3)]
    stats = run("syslog_action", evs, server_address="127.0.0.1",
                port=syslog_port(rsyslog, transport), transport=transport,
                tls_ca_file=getattr(rsyslog, "cert", None))
    assert stats["delivered"] == 3 and stats["failed"] == 0
    recs = rsyslog.wait_records(lambda r: tok in r["msg"], count=3)
    for i, r in enumerate(sorted(recs, key=lambda r: r["msg"])):
        assert r["pri"] == "30"                          # daemon.info
        assert r["hostname"] == "web1" and r["app"] == "sshlog" and r["procid"] == "2062"
        assert r["msgid"] == "command_finish"
        assert r["input"] == {"udp": "imudp", "tcp": "tcp", "tls": "tls"}[transport]
        assert r["msg"] == ("command_finish (2062) alice execute complete (exit code: 0) "
                            "/bin/echo %s %d" % (tok, i))
        assert r["timestamp"].startswith(sshlog.rfc3339(NOW)[:19])
    # octet counting was understood: what rsyslog received starts with the PRI, not a length
    raws = [line for line in rsyslog.raw_lines() if tok in line]
    assert raws and all(line.startswith("<30>1 ") for line in raws)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_syslog_json_body_facility_severity(rsyslog, transport):
    tok = "json-%s-%d" % (transport, os.getpid())
    ev = event(sshlog.CommandStart, argv=("printf", tok), filename="/usr/bin/printf")
    run("syslog_action", [ev], server_address="127.0.0.1",
        port=syslog_port(rsyslog, transport), udp=transport == "udp",
        output_json=True, facility="authpriv", severity="warning", program_name="audit-ssh")
    rec = rsyslog.wait_records(lambda r: tok in r["msg"])[0]
    assert rec["pri"] == str(10 * 8 + 4) and rec["app"] == "audit-ssh"
    body = json.loads(rec["msg"])
    assert body["event_type"] == "command_start" and body["argv"] == ["printf", tok]
    assert body["tcp_info"]["client_ip"] == "203.0.113.7"
    tok2 = tok + "-num"
    run("syslog_action", [event(argv=("x", tok2))], server_address="127.0.0.1",
        port=syslog_port(rsyslog, transport), transport=transport, facility=16, severity=3)
    assert rsyslog.wait_records(lambda r: tok2 in r["msg"])[0]["pri"] == str(16 * 8 + 3)


def test_syslog_hostile_text_stays_one_record(rsyslog):
    tok = "hostile-%d" % os.getpid()
    ev = event(argv=("x", tok + "\n<13>1 - forged - - - - injected"), filename="/tmp/$(id)")
    run("syslog_action", [ev], server_address="127.0.0.1", port=rsyslog.tcp_port,
        transport="tcp")
    time.sleep(0.3)
    recs = rsyslog.wait_records(lambda r: tok in r["msg"])
    assert len(recs) == 1 and "\\x0a<13>1 - forged" in recs[0]["msg"]
    assert not [r for r in rsyslog.records() if r["app"] == "forged"]


def test_syslog_tcp_reconnects_after_server_restart(tmp_path):
    if not os.path.exists(receivers.RSYSLOGD):
        pytest.skip("rsyslogd is not installed")
    r = receivers.Rsyslog(tmp_path).start()
    try:
        p = pipeline(one_action("syslog_action", server_address="127.0.0.1", port=r.tcp_port,
                                transport="tcp"))
        try:
            p.dispatch(event(argv=("x", "before-restart")))
            r.wait_records(lambda rec: "before-restart" in rec["msg"])
            r.stop()
            r.start()                   # same ports, new process: the old connection is dead
            p.dispatch(event(argv=("x", "after-restart")))
            r.wait_records(lambda rec: "after-restart" in rec["msg"])
        finally:
            p.stop()
        assert p.stats()["a"]["failed"] == 0
    finally:
        r.stop()


def test_fleet_recipe_rsyslog_parses_the_json_body(tmp_path):
    """README's fleet recipe: JSON bodies over TLS (or TCP), mmjsonparse with cookie="",
    the event's fields as rsyslog's $! tree -- ready for omelasticsearch or Loki."""
    if not os.path.exists(receivers.RSYSLOGD):
        pytest.skip("rsyslogd is not installed")
    r = receivers.Rsyslog(tmp_path, json_parse=True).start()
    try:
        transport = "tls" if r.tls_port else "tcp"
        ev = event(sshlog.FileUpload, target_path="/home/alice/\u00e9t\u00e9 \"q\".tgz",
                   bytes=1234, file_mode="0644")
        run("syslog_action", [ev], server_address="127.0.0.1",
            port=syslog_port(r, transport), transport=transport, output_json=True,
            tls_ca_file=getattr(r, "cert", None))
        assert receivers.wait_for(r.parsed_objects, 10), r.stderr()
        obj = r.parsed_objects()[0]
        assert obj["event_type"] == "file_upload" and obj["hostname"] == "web1"
        assert obj["target_path"] == "/home/alice/\u00e9t\u00e9 \"q\".tgz"
        assert obj["bytes"] == 1234 and obj["session_id"] == "0123456789abcdef"
        assert obj["tcp_info"]["client_ip"] == "203.0.113.7"
    finally:
        r.stop()


# -------------------------------------------------------------------------- statsd

@pytest.mark.parametrize("style,expected", [
    ("dogstatsd", "sshlog.servers.command_finish:1|c|#host:web1,user:alice,outcome:failure"),
    ("influx", "sshlog.servers.command_finish,host=web1,user=alice,outcome=failure:1|c"),
    ("none", "sshlog.servers.command_finish:1|c"),
])
def test_statsd_tag_styles(style, expected):
    with receivers.UdpReceiver() as udp:
        run("statsd_action", [event(exit_code=2)], server_address="127.0.0.1", port=udp.port,
            statsd_prefix="sshlog.servers", tags=style)
        assert udp.wait() == [expected]


def test_statsd_default_tags_are_low_cardinality_extra_tags_opt_in():
    with receivers.UdpReceiver() as udp:
        evs = [event(sshlog.ConnectionEstablished, username="bob,evil|x:1|c"),
               event(sshlog.ConnectionAuthFailed, username="mallory", auth_method="password"),
               event(sshlog.CommandFinish, signal="SIGKILL", exit_code=137)]
        run("statsd_action", evs, server_address="127.0.0.1", port=udp.port)
        got = udp.wait(3)
        assert got[0] == "sshlog.connection_established:1|c|#host:web1,user:bob_evil_x_1_c"
        assert got[1] == ("sshlog.connection_auth_failed:1|c|#host:web1,user:mallory,"
                          "method:password")
        assert got[2] == "sshlog.command_finish:1|c|#host:web1,user:alice,outcome:signal"
        assert not any("203.0.113.7" in g or "2062" in g for g in got)
        run("statsd_action", [event()], server_address="127.0.0.1", port=udp.port,
            extra_tags=["client_ip", "command"])
        assert udp.wait(4)[3] == ("sshlog.command_finish:1|c|#host:web1,user:alice,"
                                  "outcome:success,client_ip:203.0.113.7,command:id")


# -------------------------------------------------------------------------- slack

def test_slack_json_text_with_escaping():
    with receivers.HttpServer() as srv:
        ev = event(sshlog.CommandStart, username="eve", filename="/bin/echo",
                   argv=("echo", "<!channel> & <http://evil|click>"))
        stats = run("slack_action", [ev, event(sshlog.ConnectionEstablished)],
                    slack_webhook_url=srv.url)
        assert stats["delivered"] == 2
        reqs = srv.wait(2)
        assert reqs[0]["path"] == "/hook/secret-token" and reqs[0]["method"] == "POST"
        assert reqs[0]["headers"]["Content-Type"] == "application/json"
        body = json.loads(reqs[0]["body"])
        assert list(body) == ["text"]
        assert body["text"] == ("eve ran on web1: /bin/echo &lt;!channel&gt; &amp; "
                                "&lt;http://evil|click&gt;")
        assert "<" not in body["text"] and ">" not in body["text"]
        assert json.loads(reqs[1]["body"])["text"] == \
            "alice logged in to web1 from 203.0.113.7:52566, on pts/3"


def test_slack_text_template_is_escaped():
    with receivers.HttpServer() as srv:
        run("slack_action", [event(username="<@U123>")], slack_webhook_url=srv.url,
            text=":warning: {{username}} ran `{{args}}` on {{hostname}}")
        assert json.loads(srv.wait()[0]["body"])["text"] == \
            ":warning: &lt;@U123&gt; ran `/usr/bin/id -un` on web1"


def test_slack_honours_429_retry_after():
    with receivers.HttpServer([(429, {"Retry-After": "1"}), (200, {})]) as srv:
        stats = run("slack_action", [event()], slack_webhook_url=srv.url)
        reqs = srv.wait(2)
        assert len(reqs) == 2 and reqs[0]["body"] == reqs[1]["body"]
        assert reqs[1]["time"] - reqs[0]["time"] >= 0.95, "Retry-After: 1 not honoured"
        assert stats["delivered"] == 1 and stats["retried"] == 1 and stats["failed"] == 0


# -------------------------------------------------------------------------- webhook

def test_webhook_json_post_hmac_and_headers():
    secret = "s3cr3t-\u00e9"
    with receivers.HttpServer() as srv:
        run("webhook_action", [event(), event(sshlog.FileUpload, target_path="/tmp/a b")],
            webhook_url=srv.url, hmac_secret=secret,
            headers={"Authorization": "Bearer abc", "X-Team": "ops"})
        reqs = srv.wait(2)
        for req in reqs:
            assert req["method"] == "POST"
            assert req["headers"]["Content-Type"] == "application/json"
            assert req["headers"]["Authorization"] == "Bearer abc"
            assert req["headers"]["X-Team"] == "ops"
            want = hmac.new(secret.encode(), req["body"], hashlib.sha256).hexdigest()
            assert req["headers"]["X-Sshlog-Signature"] == "sha256=" + want
        first, second = (json.loads(r["body"]) for r in reqs)
        assert first["event_type"] == "command_finish" and first["argv"] == ["id", "-un"]
        assert first["tcp_info"] == {"client_ip": "203.0.113.7", "client_port": 52566,
                                     "server_ip": "10.0.0.5", "server_port": 22}
        assert second["event_type"] == "file_upload" and second["target_path"] == "/tmp/a b"
        assert reqs[1]["headers"]["X-Sshlog-Event"] == "file_upload"


def test_webhook_get_request_query():
    with receivers.HttpServer() as srv:
        run("webhook_action", [event()], webhook_url=srv.url + "?source=sshlog",
            do_get_request=True, hmac_secret="k")
        req = srv.wait()[0]
        assert req["method"] == "GET" and not req["body"]
        path, query = req["path"].split("?", 1)
        q = urllib.parse.parse_qs(query)
        assert q["source"] == ["sshlog"] and q["username"] == ["alice"]
        assert json.loads(q["argv"][0]) == ["id", "-un"]
        assert json.loads(q["tcp_info"][0])["client_port"] == 52566
        signed = query.split("&", 1)[1].encode()
        assert req["headers"]["X-Sshlog-Signature"] == \
            "sha256=" + hmac.new(b"k", signed, hashlib.sha256).hexdigest()


def test_webhook_500_then_success_is_retried():
    with receivers.HttpServer([(500, {}), (503, {}), (200, {})]) as srv:
        stats = run("webhook_action", [event()], webhook_url=srv.url, retries=3)
        assert len(srv.wait(3)) == 3
        assert stats["delivered"] == 1 and stats["retried"] == 2 and stats["failed"] == 0


def test_webhook_4xx_is_not_retried_and_counted(caplog):
    with receivers.HttpServer([(404, {})]) as srv:
        with caplog.at_level(logging.ERROR, logger="sshlog.action"):
            stats = run("webhook_action", [event()], webhook_url=srv.url, retries=3)
        assert len(srv.requests) == 1
        assert stats["failed"] == 1 and stats["retried"] == 0
        assert "HTTP 404 from http://127.0.0.1:%d/..." % srv.port in caplog.text
        assert "secret-token" not in caplog.text, "the webhook URL's path is a secret"


# -------------------------------------------------------------------------- e-mail

def parse_mail(data):
    import email
    import email.policy
    return email.message_from_bytes(data, policy=email.policy.default)


@pytest.fixture
def smtp_module():
    return pytest.importorskip("aiosmtpd", reason="aiosmtpd is not installed "
                               "(apt-get install python3-aiosmtpd / make deps)")


def test_email_plain_with_templates(smtp_module):
    with receivers.SmtpServer("plain") as smtp:
        stats = run("email_action", [event(sshlog.ConnectionEstablished)],
                    sender="sshlog@web1.example", recipient=["a@example.org", "b@example.org"],
                    smtp_server="127.0.0.1", smtp_port=smtp.port, security="none",
                    subject="login: {{username}} from {{client_ip}}",
                    body="User {{username}} on {{hostname}} (tty {{tty_id}})\n")
        assert stats["delivered"] == 1
        env = smtp.wait()[0]
        assert env.mail_from == "sshlog@web1.example"
        assert env.rcpt_tos == ["a@example.org", "b@example.org"]
        msg = parse_mail(env.original_content)
        assert msg["Subject"] == "login: alice from 203.0.113.7"
        assert msg["To"] == "a@example.org, b@example.org"
        assert msg.get_payload(decode=True).decode().replace("\r\n", "\n") == \
            "User alice on web1 (tty 3)\n"


def test_email_header_injection_is_impossible(smtp_module):
    with receivers.SmtpServer("plain") as smtp:
        hostile = "x\r\nBcc: victim@evil.example\r\n\r\nforged body"
        run("email_action", [event(username=hostile)], sender="sshlog@web1",
            recipient="root@example.org", smtp_server="127.0.0.1", smtp_port=smtp.port,
            security="none")
        env = smtp.wait()[0]
        assert env.rcpt_tos == ["root@example.org"]
        msg = parse_mail(env.original_content)
        assert msg["Bcc"] is None
        assert "\n" not in msg["Subject"] and "victim@evil.example" in msg["Subject"]
        body = msg.get_payload(decode=True).decode().replace("\r\n", "\n")
        assert json.loads(body.split("\n\n", 1)[1])["username"] == hostile   # default body


def test_email_starttls_with_login(smtp_module, certs):
    with receivers.SmtpServer("starttls", cert=certs, login=("mailer", "pw")) as smtp:
        stats = run("email_action", [event()], sender="s@web1", recipient="r@example.org",
                    smtp_server="127.0.0.1", smtp_port=smtp.port, security="starttls",
                    username="mailer", password="pw", tls_ca_file=certs[0])
        assert stats["delivered"] == 1 and smtp.wait()[0].rcpt_tos == ["r@example.org"]
        # a wrong password is final (535), not retried
        stats = run("email_action", [event()], sender="s@web1", recipient="r@example.org",
                    smtp_server="127.0.0.1", smtp_port=smtp.port, username="mailer",
                    password="bad", tls_ca_file=certs[0], retries=3)
        assert stats["failed"] == 1 and stats["retried"] == 0 and len(smtp.messages) == 1


def test_email_implicit_tls_and_certificate_check(smtp_module, certs):
    with receivers.SmtpServer("tls", cert=certs) as smtp:
        stats = run("email_action", [event()], sender="s@web1", recipient="r@example.org",
                    smtp_server="127.0.0.1", smtp_port=smtp.port, security="tls",
                    tls_ca_file=certs[0])
        assert stats["delivered"] == 1 and len(smtp.wait()) == 1
        # without the CA the self-signed certificate is refused: nothing is sent in clear
        stats = run("email_action", [event()], sender="s@web1", recipient="r@example.org",
                    smtp_server="127.0.0.1", smtp_port=smtp.port, security="tls", retries=0)
        assert stats["failed"] == 1 and len(smtp.messages) == 1


# -------------------------------------------------------------------------- run_command

DUMP = textwrap.dedent("""\
    import json, os, sys
    out = sys.argv[1]
    with open(out, "w") as f:
        json.dump({"argv": sys.argv[2:], "cwd": os.getcwd(),
                   "env": {k: v for k, v in os.environ.items() if k.startswith("SSHLOG_")}}, f)
    """)


@pytest.fixture
def dump_script(tmp_path):
    path = tmp_path / "dump.py"
    path.write_text(DUMP)
    return str(path)


def hostile_event(tmp_path):
    pwned = str(tmp_path / "pwned")
    return event(filename="/tmp/it's \"quoted\"\nand; touch %s" % pwned,
                 argv=("$(touch %s)" % pwned, "`touch %s`" % pwned, "; touch %s #" % pwned,
                       "' \" \\ $HOME\n\x00end"),
                 username="u$(touch %s)" % pwned), pwned


def test_run_command_hostile_input_is_never_executed(tmp_path, dump_script):
    pre_existing = os.path.exists("/tmp/pwned")
    ev, pwned = hostile_event(tmp_path)
    out = str(tmp_path / "out.json")
    stats = run("run_command_action", [ev], command=sys.executable,
                args=[dump_script, out, "{{args}}", "{{username}}", "{{filename}}",
                      "user={{username}};", "{{argv}}", "{{no_such_field}}"])
    assert stats["delivered"] == 1, stats
    got = json.load(open(out))
    assert got["argv"] == [ev.args.replace("\0", "\\x00"), ev.username, ev.filename,
                           "user=%s;" % ev.username,
                           json.dumps(list(ev.argv), ensure_ascii=False),
                           "{{no_such_field}}"]
    assert not os.path.exists(pwned)
    assert pre_existing or not os.path.exists("/tmp/pwned")
    env = got["env"]
    assert env["SSHLOG_USERNAME"] == ev.username and env["SSHLOG_FILENAME"] == ev.filename
    assert env["SSHLOG_ARGS"] == ev.args.replace("\0", "\\x00")
    assert json.loads(env["SSHLOG_ARGV"]) == list(ev.argv)       # JSON escapes the NUL
    assert env["SSHLOG_EXIT_CODE"] == "0" and env["SSHLOG_TTY_ID"] == "3"
    assert env["SSHLOG_EVENT_TYPE"] == "command_finish"
    assert json.loads(env["SSHLOG_TCP_INFO"])["client_port"] == 52566
    assert json.loads(env["SSHLOG_EVENT_JSON"])["username"] == ev.username
    assert got["cwd"] == "/"


def test_run_command_shell_script_templates_become_variables(tmp_path):
    """The original's motd sample pastes {{username}} into `bash -c`: here a template in
    a shell script becomes "$SSHLOG_FIELD", which the shell never parses as code."""
    ev, pwned = hostile_event(tmp_path)
    out = tmp_path / "said.txt"
    stats = run("run_command_action", [ev], command="/bin/bash",
                args=["-c", "printf '%%s|' Hello {{username}} \"{{args}}\" '{{tty_id}}' > %s"
                      % out])
    assert stats["delivered"] == 1
    said = out.read_text()
    assert said == "Hello|%s|%s|3|" % (ev.username, ev.args.replace("\0", "\\x00"))
    assert not os.path.exists(pwned)


def test_run_command_exit_status_logged_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sshlog.action"):
        stats = run("run_command_action", [event(), event()], command="/bin/sh",
                    args=["-c", "echo oops >&2; exit 3"])
        ok = run("run_command_action", [event()], command="/bin/true")
    assert stats["failed"] == 2 and stats["retried"] == 0
    assert caplog.text.count("/bin/sh exited with status 3: oops") == 2
    assert ok["delivered"] == 1 and "/bin/true exited with status 0" in caplog.text
    missing = run("run_command_action", [event()], command=str(tmp_path / "missing"))
    assert missing["failed"] == 1


def test_run_command_timeout_kills_the_process_group(tmp_path, caplog):
    marker = tmp_path / "child.pid"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="sshlog.action"):
        stats = run("run_command_action", [event()], command="/bin/sh",
                    args=["-c", "sleep 30 & echo $! > %s; wait" % marker], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert stats["failed"] == 1 and "ran longer than 0.5s and was killed" in caplog.text
    child = int(marker.read_text())
    assert receivers.wait_for(lambda: not os.path.exists("/proc/%d" % child) or
                              open("/proc/%d/stat" % child).read().split()[2] == "Z", 5)


# -------------------------------------------------------------------------- faults

def test_dead_sinks_never_delay_the_others(tmp_path, monkeypatch):
    """Sinks that hang (accept, never answer), refuse, or answer 500 sit beside an event
    log, a good webhook and statsd; those still get every event within a second, and
    what the bad ones could not deliver is counted (failed after retries, or dropped when
    their queue is full -- the hung ones get small queues to show it)."""
    refused = receivers.refused_port()
    log_path = tmp_path / "events.jsonl"
    with receivers.HangServer() as hang, receivers.HttpServer([(500, {})]) as err500, \
            receivers.HttpServer() as good, receivers.UdpReceiver() as udp:
        main = pipeline("""
            events:
              - event: all
                triggers: [command_finish]
                actions:
                  - {action: refused, plugin: webhook_action,
                     webhook_url: "http://127.0.0.1:%d/x", timeout: 2, retries: 1}
                  - {action: refused_mail, plugin: email_action, sender: a@b, recipient: c@d,
                     smtp_server: 127.0.0.1, smtp_port: %d, retries: 1}
                  - {action: err500, plugin: slack_action, slack_webhook_url: "%s", retries: 1}
                  - {action: log, plugin: eventlogfile_action, log_file_path: "%s",
                     output_json: true}
                  - {action: good, plugin: webhook_action, webhook_url: "%s"}
                  - {action: stats, plugin: statsd_action, server_address: 127.0.0.1,
                     port: %d}
            """ % (refused, refused, err500.url, log_path, good.url, udp.port))
        monkeypatch.setattr(sshlog.ActionRunner, "QUEUE_SIZE", 4)
        hung = pipeline("""
            events:
              - event: all
                triggers: [command_finish]
                actions:
                  - {action: hang, plugin: webhook_action, webhook_url: "%s", timeout: 2,
                     retries: 1}
                  - {action: hang_syslog, plugin: syslog_action, server_address: 127.0.0.1,
                     port: %d, transport: tls, timeout: 2, retries: 1}
                  - {action: hang_mail, plugin: email_action, sender: a@b, recipient: c@d,
                     smtp_server: 127.0.0.1, smtp_port: %d, timeout: 2, retries: 1}
            """ % (hang.url, hang.port, hang.port))
        n = 12
        t0 = time.monotonic()
        for i in range(n):
            ev = event(argv=("id", str(i)))
            hung.dispatch(ev)
            main.dispatch(ev)
        dispatch_s = time.monotonic() - t0
        assert dispatch_s < 0.2, "dispatch waited on a sink (%.3fs)" % dispatch_s
        good.wait(n, timeout=1.0)
        udp.wait(n, timeout=1.0)
        assert receivers.wait_for(lambda: log_path.exists() and
                                  len(log_path.read_text().splitlines()) == n, 1.0)
        assert time.monotonic() - t0 < 1.0 + 0.1
        # the refused and 500 sinks fail after one retry each; the hung ones are still busy
        assert receivers.wait_for(lambda: main.runners["refused"].failed >= 1, 5)
        assert receivers.wait_for(lambda: main.runners["err500"].failed >= 1, 5)
        t_stop = time.monotonic()
        hung.stop(timeout=1)
        main.stop(timeout=1)
        assert time.monotonic() - t_stop < 2 * (1 + 1) + 2 + 1, "stop is bounded"
        stats = dict(main.stats(), **hung.stats())
    for name in ("hang", "hang_syslog", "hang_mail", "refused", "refused_mail", "err500"):
        s = stats[name]
        assert s["delivered"] == 0 and s["failed"] + s["dropped"] >= 1, (name, s)
        assert s["failed"] + s["dropped"] + s["queued"] == n, (name, s)
    for name in ("hang", "hang_syslog", "hang_mail"):
        assert stats[name]["dropped"] >= n - 4 - 1, "a full queue drops and counts"
    assert stats["err500"]["retried"] >= 1 and len(err500.requests) >= 2
    for name in ("log", "good", "stats"):
        assert stats[name]["delivered"] == n and stats[name]["failed"] == 0


def test_runner_status_line_counts_retries(capsys, monkeypatch):
    monkeypatch.setattr(sshlog, "api_call", lambda sock, req: {
        "version": "x", "pid": 1, "uptime_s": 1, "sessions": 0, "watchers": 0,
        "events": {}, "bpf_drops": {"ctl": 0, "tty": 0}, "decode_errors": 0,
        "watch_dropped": 0, "filter_errors": 0, "config_files": ["a.yaml"],
        "actions": {"slack": {"plugin": "slack_action", "delivered": 5, "queued": 0,
                              "dropped": 1, "failed": 2, "retried": 7},
                    "rec": {"plugin": "sessionlog_action", "delivered": 9, "queued": 0,
                            "dropped": 0, "failed": 0, "retried": 0,
                            "unconverted_bytes": 4096}}})
    assert sshlog.main(["status", "--socket", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "action slack (slack_action): delivered 5, queued 0, dropped 1, failed 2, " \
           "retried 7\n" in out
    assert "action rec (sessionlog_action): delivered 9, queued 0, dropped 0, failed 0, " \
           "retried 0, output not yet converted 4096 bytes\n" in out


# -------------------------------------------------------------------------- helpers

def test_retry_after_parsing():
    assert sshlog.parse_retry_after("3") == 3.0
    assert sshlog.parse_retry_after(None) is None
    assert sshlog.parse_retry_after("soon") is None
    assert 9 <= sshlog.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT",
                                         now=1445412480) <= 11


def test_redact_url():
    assert sshlog.redact_url("https://hooks.slack.com/services/T0/B0/XXXX") == \
        "https://hooks.slack.com/..."
    assert sshlog.redact_url("http://user:pw@[::1]:8080/a?b") == "http://[::1]:8080/..."


def test_template_rendering():
    fields = {"username": "bob", "tty_id": -1, "argv": ["a", "b"], "signal": None,
              "existing": True}
    assert sshlog.render("{{username}}/{{ tty_id }}/{{argv}}/{{signal}}/{{existing}}/{{x}}",
                         fields) == 'bob/-1/["a", "b"]//true/{{x}}'
    assert sshlog.one_line("a\r\nb\x00c") == "a  b c"


@pytest.mark.parametrize("script,expected", [
    ("write {{username}} /dev/pts/{{tty_id}}",
     'write "$SSHLOG_USERNAME" /dev/pts/"$SSHLOG_TTY_ID"'),
    ('echo "Hi {{username}}!"', 'echo "Hi ""$SSHLOG_USERNAME""!"'),
    ("echo 'Hi {{username}}'", "echo 'Hi '\"$SSHLOG_USERNAME\"''"),
    ("echo \"it's {{username}}\" \\\"{{username}}", 'echo "it\'s ""$SSHLOG_USERNAME"""'
     ' \\""$SSHLOG_USERNAME"'),
    ("echo {{unknown}}", "echo {{unknown}}"),
])
def test_shell_template_quoting(script, expected):
    assert sshlog.shell_template(script, {"username": "x", "tty_id": 1}) == expected


def test_script_positions():
    assert sshlog.script_positions(["/bin/sh", "-c", "s", "a"]) == {2}
    assert sshlog.script_positions(["/usr/bin/env", "bash", "-ec", "s"]) == {3}
    assert sshlog.script_positions(["/usr/bin/sudo", "-u", "x", "sh", "-c", "s"]) == {5}
    assert sshlog.script_positions(["/usr/bin/printf", "-c", "s"]) == set()


def test_udp_sinks_to_a_dead_port_never_slow_down():
    """UDP has no answer to wait for: ICMP 'port unreachable' errors surface on the next
    send and are absorbed; no backoff, no retries."""
    port = receivers.free_port(receivers.socket.SOCK_DGRAM)
    t0 = time.monotonic()
    for plugin, params in (("syslog_action", {}), ("statsd_action", {})):
        stats = run(plugin, [event() for _ in range(50)], wait=5, server_address="127.0.0.1",
                    port=port, **params)
        assert stats["delivered"] + stats["failed"] == 50 and stats["retried"] == 0
    assert time.monotonic() - t0 < 2


def test_run_command_big_terminal_update_still_runs(tmp_path, dump_script):
    """One argv or environment string may not exceed 128 KiB on Linux: a 64 KiB terminal
    chunk (JSON-escaped in SSHLOG_EVENT_JSON, far bigger) is cut, not a failure."""
    data = "\x1b[0m\u00e9" * 30000
    ev = event(sshlog.TerminalUpdate, terminal_data=data, data_len=len(data.encode()))
    out = str(tmp_path / "out.json")
    stats = run("run_command_action", [ev], command=sys.executable,
                args=[dump_script, out, "{{terminal_data}}"])
    assert stats["delivered"] == 1, stats
    got = json.load(open(out))
    assert got["argv"][0].endswith("...[truncated]")
    assert len(got["argv"][0].encode()) <= sshlog.EXEC_STRING_MAX + 20
    assert got["env"]["SSHLOG_TERMINAL_DATA"].startswith(data[:1000])
    assert got["env"]["SSHLOG_EVENT_JSON"].endswith("...[truncated]")


# -------------------------------------------------------------------------- queue bounds

class GatedAction(sshlog.Action):
    """Holds its worker until `gate` opens, then remembers what it was given."""
    plugin = "gated"
    nice = 5

    def __init__(self):
        super().__init__("gated", {})
        self.gate = sshlog.threading.Event()
        self.seen = []

    def handle(self, event):
        self.gate.wait(10)
        self.seen.append(event)

    def close(self):
        pass


def test_queue_is_bounded_in_terminal_bytes_and_keeps_the_other_events(monkeypatch):
    monkeypatch.setattr(sshlog.ActionRunner, "QUEUE_BYTES", 1000)
    action = GatedAction()
    runner = sshlog.ActionRunner(action)
    try:
        def update(n, offset):
            return event(sshlog.TerminalUpdate, raw=b"x" * n, data_len=n, offset=offset)
        runner.submit_many([update(1, 0)])          # the worker takes it and waits at the gate
        assert receivers.wait_for(lambda: not runner.pending, 5)
        batch = [update(400, 1), event(sshlog.CommandStart), update(400, 401),
                 update(400, 801), event(sshlog.CommandFinish), update(200, 1201)]
        runner.submit_many(batch)
        # 400 + 400 fit in 1000 (the first byte is taken already), 400 does not, 200 does
        assert runner.dropped == 1
        assert [e.offset if e.type == "terminal_update" else e.type for e in runner.pending] == \
            [1, "command_start", 401, "command_finish", 1201]
        action.gate.set()
        assert receivers.wait_for(lambda: runner.delivered == 6, 5)
        runner.submit_many([update(900, 1401)])     # the room came back with the deliveries
        assert receivers.wait_for(lambda: runner.delivered == 7, 5) and runner.dropped == 1
    finally:
        action.gate.set()
        runner.stop(timeout=2)


def test_worker_runs_at_the_actions_niceness():
    action = GatedAction()
    runner = sshlog.ActionRunner(action)
    try:
        runner.submit(event())
        assert receivers.wait_for(lambda: not runner.pending, 5)
        with open("/proc/self/task/%d/stat" % runner.thread.native_id) as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])
        assert nice == os.getpriority(os.PRIO_PROCESS, 0) + 5 or nice == 19
    finally:
        action.gate.set()
        runner.stop(timeout=2)
    assert sshlog.SessionLog.nice == sshlog.RECORDING_NICE > 0
