"""Real receivers on loopback for the action tests (unit and root tiers).

Everything here is a genuine counterpart of what sshlog talks to in production,
started by the test and stopped by pid or by its own shutdown call:

  Rsyslog      a private rsyslogd (Debian package) with imudp, imtcp and imtcp over
               TLS (gtls driver) on free ports, writing what it parsed to a file
  SmtpServer   aiosmtpd's Controller in this process: plain, STARTTLS (+ login) or
               implicit TLS
  HttpServer   http.server on 127.0.0.1:0 with scripted answers (200, 429 + Retry-After,
               500 ...), recording every request (Slack's side is the only stand-in)
  UdpReceiver  a UDP socket (statsd)
  HangServer   accepts TCP connections and never answers
  refused_port a port where nothing listens
  make_cert    a self-signed certificate for 127.0.0.1/localhost made by `openssl req`

Standard library only (plus aiosmtpd for SmtpServer, imported when used).
"""
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
RSYSLOG_MODULES = "/usr/lib/x86_64-linux-gnu/rsyslog"


def wait_for(pred, timeout, interval=0.02):
    """Poll `pred` until it returns something true (returned) or time runs out (None)."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= end:
            return None
        time.sleep(interval)


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def refused_port():
    """A TCP port on 127.0.0.1 where nothing listens (connections are refused)."""
    return free_port()


def make_cert(directory):
    """(cert, key) PEM files: self-signed, for localhost and 127.0.0.1, made by openssl."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
    return cert, key


def gtls_available():
    return os.path.exists(os.path.join(RSYSLOG_MODULES, "lmnsd_gtls.so"))


class Rsyslog:
    """A private rsyslogd: UDP, TCP and (when the gtls driver is installed) TLS inputs
    on free loopback ports.  Each message it parsed becomes one line of `out` with the
    RFC 5424 fields separated by `|`; `raw` holds what it received, unparsed."""

    FIELDS = ["pri", "timestamp", "hostname", "app", "procid", "msgid", "input", "msg"]

    def __init__(self, workdir, json_parse=False):
        """`json_parse`: also run README's fleet recipe -- mmjsonparse on sshlog's JSON
        bodies, the parsed tree written to `parsed` (one JSON object per line)."""
        self.dir = str(workdir)
        self.json_parse = json_parse
        self.parsed = os.path.join(self.dir, "rsyslog.parsed")
        self.out = os.path.join(self.dir, "rsyslog.out")
        self.raw = os.path.join(self.dir, "rsyslog.raw")
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port()
        self.tls_port = free_port() if gtls_available() else None
        self.proc = None

    def config(self):
        lines = [
            'global(workDirectory="%s" maxMessageSize="64k")' % self.dir,
            'module(load="imudp")',
            'module(load="imtcp" maxSessions="50")',
            'template(name="fields" type="string" string="%pri%|%timereported:::date-rfc3339%|'
            '%hostname%|%app-name%|%procid%|%msgid%|%inputname%|%msg%\\n")',
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            'ruleset(name="in") {',
            '  action(type="omfile" file="%s" template="fields")' % self.out,
            '  action(type="omfile" file="%s" template="raw")' % self.raw,
        ]
        if self.json_parse:
            lines[3:3] = ['module(load="mmjsonparse")',
                          'template(name="sshlog_json" type="list") '
                          '{ property(name="$!all-json") constant(value="\\n") }']
            lines += ['  if $app-name == "sshlog" then {',
                      '    action(type="mmjsonparse" cookie="")',
                      '    action(type="omfile" file="%s" template="sshlog_json")' % self.parsed,
                      '  }']
        lines += [
            '}',
            'input(type="imudp" address="127.0.0.1" port="%d" ruleset="in")' % self.udp_port,
            'input(type="imtcp" address="127.0.0.1" port="%d" ruleset="in" name="tcp")'
            % self.tcp_port,
        ]
        if self.tls_port:
            self.cert, self.key = make_cert(self.dir)
            lines.append(
                'input(type="imtcp" address="127.0.0.1" port="%d" ruleset="in" name="tls" '
                'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon" '
                'streamDriver.CAFile="%s" streamDriver.certFile="%s" streamDriver.keyFile="%s")'
                % (self.tls_port, self.cert, self.cert, self.key))
        return "\n".join(lines) + "\n"

    def start(self):
        conf = os.path.join(self.dir, "rsyslog.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        self.log = open(os.path.join(self.dir, "rsyslogd.stderr"), "wb")
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", conf, "-i",
                                      os.path.join(self.dir, "rsyslogd.pid")],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        ports = [self.tcp_port] + ([self.tls_port] if self.tls_port else [])

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError("rsyslogd exited %s: %s" % (self.proc.returncode,
                                                              self.stderr()))
            for port in ports:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                except OSError:
                    return False
            return True
        if not wait_for(listening, 20, 0.05):
            self.stop()
            raise RuntimeError("rsyslogd did not listen: %s" % self.stderr())
        # imudp has no handshake: wait until a probe datagram comes out
        def probe():
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                b"<14>1 - - probe - - - ready", ("127.0.0.1", self.udp_port))
            return any(r["app"] == "probe" for r in self.records())
        if not wait_for(probe, 20, 0.2):
            self.stop()
            raise RuntimeError("rsyslogd's UDP input stays silent: %s" % self.stderr())
        return self

    def stderr(self):
        with open(os.path.join(self.dir, "rsyslogd.stderr"), "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def records(self):
        try:
            with open(self.out, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        return [dict(zip(self.FIELDS, line.split("|", 7))) for line in lines
                if line.count("|") >= 7]

    def parsed_objects(self):
        try:
            with open(self.parsed, encoding="utf-8") as f:
                return [json.loads(line) for line in f.read().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def raw_lines(self):
        try:
            with open(self.raw, encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def wait_records(self, pred, count=1, timeout=10):
        found = wait_for(lambda: [r for r in self.records() if pred(r)]
                         if len([r for r in self.records() if pred(r)]) >= count else None,
                         timeout, 0.05)
        assert found, "rsyslog got %d matching record(s), wanted %d; all: %r\n%s" % (
            len([r for r in self.records() if pred(r)]), count, self.records()[-5:],
            self.stderr())
        return found

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


class SmtpServer:
    """aiosmtpd on a free loopback port.  mode: "plain", "starttls" (required before
    MAIL) or "tls" (implicit).  `login`: (user, password) to require AUTH."""

    def __init__(self, mode="plain", cert=None, login=None):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult
        import ssl
        self.messages = []
        self.port = free_port()
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(envelope)
                return "250 OK"

        kwargs = {}
        if mode in ("starttls", "tls"):
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*cert)
            if mode == "starttls":
                kwargs.update(tls_context=ctx, require_starttls=True)
            else:
                kwargs.update(ssl_context=ctx)
        if login:
            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = (auth_data.login.decode(), auth_data.password.decode()) == tuple(login)
                return AuthResult(success=ok, handled=False)
            kwargs.update(authenticator=authenticator, auth_required=True,
                          auth_require_tls=mode != "plain")
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()

    def wait(self, count=1, timeout=10):
        assert wait_for(lambda: len(self.messages) >= count, timeout), \
            "SMTP server got %d message(s), wanted %d" % (len(self.messages), count)
        return self.messages


class HttpServer:
    """http.server on 127.0.0.1:0.  `script`: answers given in turn as (status,
    headers dict) -- the last one repeats -- or a callable(request) -> (status, headers).
    Every request is recorded as {"method", "path", "headers", "body", "time"}."""

    def __init__(self, script=((200, {}),)):
        self.script = script
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                req = {"method": self.command, "path": self.path,
                       "headers": dict(self.headers.items()),
                       "body": self.rfile.read(length) if length else b"",
                       "time": time.monotonic()}
                with outer.lock:
                    outer.requests.append(req)
                    n = len(outer.requests) - 1
                if callable(outer.script):
                    status, headers = outer.script(req)
                else:
                    status, headers = outer.script[min(n, len(outer.script) - 1)]
                body = b"ok" if status < 300 else b"no"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d/hook/secret-token" % self.port

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count=1, timeout=10):
        assert wait_for(lambda: len(self.requests) >= count, timeout), \
            "HTTP server got %d request(s), wanted %d" % (len(self.requests), count)
        return self.requests

    def json_bodies(self):
        return [json.loads(r["body"]) for r in self.requests if r["body"]]


class UdpReceiver:
    """A UDP socket on 127.0.0.1:0 collecting datagrams (statsd)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.datagrams = []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self.running:
            try:
                self.datagrams.append(self.sock.recv(65535).decode())
            except socket.timeout:
                continue
            except OSError:
                break

    def wait(self, count=1, timeout=10):
        assert wait_for(lambda: len(self.datagrams) >= count, timeout), \
            "UDP receiver got %d datagram(s), wanted %d" % (len(self.datagrams), count)
        return self.datagrams

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HangServer:
    """Accepts TCP connections, reads nothing and never answers."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d/hook" % self.port
        self.conns = []
        self.running = True
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except socket.timeout:
                continue
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()
