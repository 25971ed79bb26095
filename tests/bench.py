#!/usr/bin/python3
"""make bench: what the agent costs the sessions it watches, measured in one run.

Real sshd, real ssh client under a pty, daemon off and on interleaved (order
rotated each round, a fresh session per sample), timings taken inside the
session with $EPOCHREALTIME.  Prints medians and on/off ratios:

  exec storm      a loop of N /bin/true                  budget: ratio <= 1.05
  terminal flood  seq 1 L through the pty                budget: ratio <= 1.05, 0 bytes lost
  idle daemon     CPU over S seconds with no session     budget: < 0.5 % of a core
  daemon start    until the socket answers; RSS after start

Run as root: `sudo make bench` (or /usr/bin/python3 tests/bench.py --help).
Foreign BPF programs distort timings: they are counted and reported.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from sshlog_daemon import SshlogDaemon  # noqa: E402

DEFAULT_LIKE = ["connection_established", "connection_auth_failed", "connection_close",
                "command_start", "command_finish", "file_upload"]


def bpf_program_ids():
    out = subprocess.run(["bpftool", "prog", "list", "--json"], capture_output=True)
    try:
        return {p["id"] for p in json.loads(out.stdout or b"[]")}
    except ValueError:
        return set()


def timed(session, command, timeout=300):
    """Run `command` in the session; return (seconds inside the session, bytes shown)."""
    start = len(session.output)
    n = int(time.time() * 1000) % 1000000
    session.sendline("s=$EPOCHREALTIME; %s; e=$EPOCHREALTIME; echo \"RES%d $s $e\"" % (command, n))
    m = session.expect(re.compile(rb"RES%d (\d+\.\d+) (\d+\.\d+)" % n), timeout=timeout)
    return float(m.group(2)) - float(m.group(1)), len(session.output) - start


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def captured(daemon, user):
    """Terminal bytes the daemon has captured for the user's session, once quiet."""
    time.sleep(0.5)
    mine = [x for x in json.loads(daemon.cli("sessions", "--json").stdout)["sessions"]
            if x["username"] == user.name]
    return mine[0]["terminal_bytes"] if mine else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--execs", type=int, default=2000)
    ap.add_argument("--lines", type=int, default=1000000)
    ap.add_argument("--idle-seconds", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (sudo make bench)")

    work = tempfile.mkdtemp(prefix="sshlog-bench-")
    user = harness.create_user("sshlogbench", "Pw-bench-9", key_dir=os.path.join(work, "keys"))
    sshd = harness.Sshd(os.path.join(work, "sshd"), listen=("127.0.0.1",)).start()
    foreign_before = bpf_program_ids()
    results = {"off": {"exec": [], "flood": []}, "on": {"exec": [], "flood": []}}
    lost, starts, rss, drops = [], [], [], []
    try:
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for cond in order:
                daemon = None
                if cond == "on":
                    daemon = SshlogDaemon(os.path.join(work, "d%d" % r), triggers=DEFAULT_LIKE,
                                          json_log=False)
                    t0 = time.monotonic()
                    daemon.start()
                    starts.append(time.monotonic() - t0)
                    rss.append(rss_mb(daemon.proc.pid))
                with harness.PtySession(sshd, user) as s:
                    t_exec, _ = timed(s, "for i in $(seq %d); do /bin/true; done" % args.execs)
                    before = captured(daemon, user) if daemon else 0
                    t_flood, shown = timed(s, "seq 1 %d" % args.lines)
                    results[cond]["exec"].append(t_exec)
                    results[cond]["flood"].append(t_flood)
                    if daemon:
                        # the daemon's count also holds the next prompt: never less if whole
                        lost.append(max(shown - (captured(daemon, user) - before), 0))
                if daemon:
                    drops.append(daemon.status()["bpf_drops"])
                    daemon.stop()
                print("round %d %-3s exec %.3f s  flood %.3f s" % (
                    r + 1, cond, results[cond]["exec"][-1], results[cond]["flood"][-1]), flush=True)

        daemon = SshlogDaemon(os.path.join(work, "idle"), triggers=DEFAULT_LIKE, json_log=False)
        daemon.start()
        time.sleep(2)
        c0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle = (cpu_seconds(daemon.proc.pid) - c0) / (time.monotonic() - t0) * 100
        daemon.stop()
    finally:
        sshd.stop()
        foreign = bpf_program_ids() - foreign_before
        shutil.rmtree(work, ignore_errors=True)

    med = {c: {k: statistics.median(v) for k, v in results[c].items()} for c in results}
    print()
    print("sshlog bench: %d rounds, %d execs, seq 1 %d, on %s" % (
        args.rounds, args.execs, args.lines, os.uname().release))
    if foreign_before:
        print("NOTE: %d BPF program(s) were loaded before the run (foreign tracers distort "
              "timings)" % len(foreign_before))
    for k, label in (("exec", "exec storm (%d x /bin/true)" % args.execs),
                     ("flood", "terminal flood (seq 1 %d)" % args.lines)):
        ratio = med["on"][k] / med["off"][k]
        print("%-34s off %.3f s  on %.3f s  ratio %.3f  %s" % (
            label, med["off"][k], med["on"][k], ratio, "ok" if ratio <= 1.05 else "OVER BUDGET"))
    print("%-34s %d bytes over %d runs; BPF drops %s" % ("terminal bytes lost", sum(lost),
                                                          len(lost), drops[-1] if drops else "-"))
    print("%-34s %.2f %% of a core over %d s  %s" % ("idle daemon CPU", idle, args.idle_seconds,
                                                    "ok" if idle < 0.5 else "OVER BUDGET"))
    print("%-34s median %.2f s; RSS %.0f MB" % ("daemon start", statistics.median(starts),
                                               statistics.median(rss)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
