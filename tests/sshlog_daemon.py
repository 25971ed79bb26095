"""Start a private sshlog daemon for the root tier and read what it logged.

The daemon is the real artifact: ./sshlog.pyz when it has been built (make
test builds it first), else sshlog.py under the distro's python3.  Each
daemon gets its own config directory, socket and event logs in a temp dir.
"""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import harness

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TRIGGERS = ["connection_established", "connection_auth_failed", "connection_close",
                "command_start", "command_finish", "file_upload", "terminal_update"]


def epoch_seconds(rfc3339):
    """An event's "timestamp" (2026-11-28T16:03:24.123456Z) in seconds since the epoch."""
    t = datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ")
    return t.replace(tzinfo=datetime.timezone.utc).timestamp()


def sshlog_argv():
    pyz = os.environ.get("SSHLOG_PYZ") or os.path.join(TOP, "sshlog.pyz")
    if os.path.exists(pyz):
        return [pyz]
    return ["/usr/bin/python3", os.path.join(TOP, "sshlog.py")]


JSON_RULE = """\
  - event: everything_as_json
    triggers: %s
    actions:
      - action: json_log
        plugin: eventlogfile_action
        log_file_path: %s
        output_json: true
        max_size_mb: 200
"""
TEXT_RULE = """\
  - event: text_log
    triggers: [connection_established, connection_auth_failed, connection_close,
               command_start, command_finish, file_upload]
    actions:
      - action: text_log
        plugin: eventlogfile_action
        log_file_path: %s
"""


class SshlogDaemon:
    def __init__(self, workdir, triggers=ALL_TRIGGERS, extra_args=(), json_log=True,
                 config_text=None):
        """`config_text`: YAML added as conf.d/extra.yaml (its own events and
        actions) beside the JSON/text event logs the tests read."""
        self.dir = str(workdir)
        self.config_dir = os.path.join(self.dir, "cfg")
        self.socket = os.path.join(self.dir, "sshlog.sock")
        self.json_log = os.path.join(self.dir, "events.jsonl")
        self.text_log = os.path.join(self.dir, "event.log")
        self.stderr_path = os.path.join(self.dir, "daemon.stderr")
        self.extra_args = list(extra_args)
        os.makedirs(os.path.join(self.config_dir, "conf.d"), exist_ok=True)
        with open(os.path.join(self.config_dir, "conf.d", "test.yaml"), "w") as f:
            f.write("events:\n")
            if json_log:
                f.write(JSON_RULE % (json.dumps(list(triggers)), self.json_log))
            f.write(TEXT_RULE % self.text_log)
        if config_text:
            with open(os.path.join(self.config_dir, "conf.d", "extra.yaml"), "w") as f:
                f.write(config_text)
        self.proc = None
        self._seen = 0
        self._events = []

    def start(self, timeout=60):
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            sshlog_argv() + ["daemon", "--config-dir", self.config_dir, "--socket", self.socket]
            + self.extra_args, stdout=self._stderr, stderr=self._stderr,
            stdin=subprocess.DEVNULL, start_new_session=True)
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited %s:\n%s" % (self.proc.returncode,
                                                               self.stderr_text()))
            return self.cli("status", check=False).returncode == 0
        harness.wait_for(ready, timeout, interval=0.2)
        return self

    def stderr_text(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def cli(self, *args, check=True, timeout=20, input=None):
        r = subprocess.run(sshlog_argv() + list(args) + ["--socket", self.socket],
                           capture_output=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError("sshlog %s failed (%d): %s" % (
                " ".join(args), r.returncode, r.stderr.decode(errors="replace")))
        return r

    def status(self):
        return json.loads(self.cli("status", "--json").stdout)

    def api(self, cmd, timeout=20):
        """The daemon's answer to {"cmd": cmd} (what `sshlog CMD --json` prints), asked
        over its socket from this process: no client process started.  The bench asks
        between timed parts, and a Python process started and ended just before a part
        slowed that part in the daemon's blocks only."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket)
            sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            with sock.makefile("rb") as f:
                reply = json.loads(f.readline())
        if not reply.get("ok"):
            raise AssertionError("sshlog API %s: %s" % (cmd, reply))
        return reply["data"]

    def events(self):
        """Every event logged so far (JSON log), parsed; each line must parse."""
        if not os.path.exists(self.json_log):
            return []
        with open(self.json_log, "rb") as f:
            f.seek(self._seen)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self._events.append(json.loads(line))
        self._seen += end
        return list(self._events)

    def established(self, session, tty, timeout=15):
        """The connection_established event of PtySession `session` (on pty `tty`): the
        first for its user and pty stamped after its client was launched.  An earlier
        session may have had the same user and pty number, and its event is in the log
        already while this one's may not be yet."""
        def ours(e):
            return (e["event_type"] == "connection_established" and e["tty_id"] == tty
                    and e["username"] == session.user.name
                    and epoch_seconds(e["timestamp"]) >= session.launched - 0.1)
        return self.wait_events(ours, timeout=timeout)[0]

    def wait_events(self, pred, count=1, timeout=15):
        """Wait until at least `count` events satisfy `pred`; return them."""
        found = []
        def enough():
            found[:] = [e for e in self.events() if pred(e)]
            return len(found) >= count
        try:
            harness.wait_for(enough, timeout, interval=0.1)
        except Exception:
            raise AssertionError("expected %d event(s), got %d: %r\n--- daemon stderr:\n%s" % (
                count, len(found), found[-5:], self.stderr_text()[-2000:]))
        return found

    def session_events(self, ptm_pid):
        return [e for e in self.events() if e["ptm_pid"] == ptm_pid]

    def stop(self, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        return self.proc.returncode
