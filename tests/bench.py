#!/usr/bin/python3
"""make bench: what the agent costs the sessions it watches, measured in one run.

Real sshd and real clients; the daemon off and on in pairs of blocks, side by side (their
order alternating from pair to pair, fresh sessions and a fresh daemon per block), the daemon
running the embedded default configuration (text event log + session recordings) with its
paths moved into a scratch directory.  Each block takes one sample of each timed part.
Medians and on/off ratios of:

  exec storm      N x /bin/true in a pty session (timed inside it),      budget: ratio <= 1.05
                  twice a block: the daemon's first burst (paying for   (the second storm)
                  its fresh heap) reported, the second budgeted; and
                  wall minus CPU time (waiting for a CPU)               wait: reported
  terminal flood  seq 1 L through the pty, twice a block, as above;     budget: ratio <= 1.05
                  bytes the daemon recorded vs bytes the client got             0 bytes lost
  scp upload      one file of S MB (throughput), the median of 3 a block budget: ratio <= 1.05
  parallel        P sessions logged in at once, their loops of C        budget: ratio <= 1.05,
                  commands started together once all are in;                    0 events lost
                  command_finish lines in the event log vs run;
                  the mean login time (launch to first command)         (reported)
  syscall cost    a process outside any ssh session: getppid(), 1-byte  (reported: ns per call)
                  write() to /dev/null, in C (gcc at bench time), every 4th pair
  daemon          start time (until the socket answers), RSS after start and at the end of a
                  block, idle CPU over I seconds with no session       budget: < 0.5 % of a core
  report          `sshlog report` over a generated event log of E events (no root needed)
  own cost        per part, what the daemon itself spent: its BPF programs' run time (from
                  kernel.bpf_stats_enabled, on during the unbudgeted first storm and flood
                  and one more upload and parallel run, untimed, at the end of each on
                  block) and its CPU time during and after the part

Each timed part is short (2-4 s), this VM's timings swing ~10 % from one sample to the next,
and its speed drifts over minutes: the off and on samples are taken in pairs, a minute
apart, 20 pairs (--pairs), and the medians are taken over all samples.  Each ratio is shown
with its 90 % interval, the pairs resampled (a bootstrap): a ratio whose interval straddles
the budget is not decided by the run.

Foreign BPF programs (anything not loaded by our daemon) distort timings: they are counted
at every block and reported.  Run as root: `sudo make bench` (~30 minutes), or
`tests/bench.py --quick` (~4 minutes), `--only exec,flood` for a part, `--on eventlog` for
the daemon with the text event log alone; `--pool A.json B.json` pools the samples of runs
of one build (their `--json` files) into one ratio and interval.  Other load on the machine
is reported too (load average before and after): measure on a quiet machine.
"""
import argparse
import collections
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # noqa: E402
from sshlog_daemon import SshlogDaemon, sshlog_argv  # noqa: E402

PARTS = ("exec", "flood", "scp", "parallel", "syscall", "idle", "report")
BUDGET = 1.05
SCP_UPLOADS = 3               # uploads per block; the block's sample is their median
SYSCALL_EVERY = 4             # pairs: the syscall loops take ~10 s a block

SYSCALL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000, i;
    int fd = open("/dev/null", O_WRONLY);
    char c = 'x';
    double t0 = now();
    for (i = 0; i < n; i++) syscall(SYS_getppid);
    double t1 = now();
    for (i = 0; i < n; i++) if (write(fd, &c, 1) != 1) return 1;
    double t2 = now();
    printf("%.1f %.1f\n", (t1 - t0) / n * 1e9, (t2 - t1) / n * 1e9);
    return 0;
}
"""


# -- measuring helpers ------------------------------------------------------------------------

def bpf_programs():
    out = subprocess.run(["bpftool", "prog", "list", "--json"], capture_output=True)
    try:
        return {p["id"] for p in json.loads(out.stdout or b"[]")}
    except ValueError:
        return set()


def program_fdinfo(pid):
    """{program id: the text of its fdinfo} for each BPF program fd process `pid` holds."""
    progs, d = {}, "/proc/%d/fdinfo" % pid
    try:
        fds = os.listdir(d)
    except OSError:
        return progs
    for fd in fds:
        try:
            with open(os.path.join(d, fd)) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^prog_id:\s*(\d+)", text, re.M)
        if m:
            progs[int(m.group(1))] = text
    return progs


def own_programs(pid):
    return set(program_fdinfo(pid))


class Foreign:
    """Counts BPF programs not loaded by our daemon, sample by sample."""

    def __init__(self):
        self.samples = []

    def sample(self, daemon=None):
        ours = own_programs(daemon.proc.pid) if daemon is not None else set()
        self.samples.append(len(bpf_programs() - ours))

    def summary(self):
        return (min(self.samples), max(self.samples)) if self.samples else (0, 0)


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def bpf_stats(on):
    """Turn the kernel's per-program run time accounting on or off.  It costs two clock
    reads per program run, so it is on only for the parts that are not budgeted."""
    with open(BPF_STATS, "w") as f:
        f.write("1" if on else "0")


def bpf_run_ns(pid):
    """Nanoseconds our daemon's BPF programs have run (with bpf_stats on)."""
    return sum(int(m.group(1)) for m in (re.search(r"^run_time_ns:\s*(\d+)", text, re.M)
                                         for text in program_fdinfo(pid).values()) if m)


class OwnCost:
    """What the daemon itself spends on one timed part: its CPU seconds while the part
    runs and until it is idle again (a flood's tail is drained, and its recording
    converted, after the part), and, on the parts with bpf_stats on, its BPF programs'
    run time, which is spent in the sessions' own processes."""

    def __init__(self, daemon, with_bpf=False):
        self.daemon, self.with_bpf = daemon, with_bpf and daemon is not None

    def __enter__(self):
        if self.daemon is not None:
            if self.with_bpf:         # the counters keep their value while stats are off
                self.bpf0 = bpf_run_ns(self.daemon.proc.pid)
                bpf_stats(True)
            self.cpu0 = thread_cpu_seconds(self.daemon.proc.pid)
        return self

    def __exit__(self, exc_type, *exc):
        if self.daemon is None:
            return
        try:
            self.during = thread_cpu_seconds(self.daemon.proc.pid) - self.cpu0
            if self.with_bpf:
                self.bpf = (bpf_run_ns(self.daemon.proc.pid) - self.bpf0) / 1e9
        except OSError:
            if exc_type is None:            # the daemon is gone, unless the part's own
                raise                       # error says more
        finally:
            if self.with_bpf:
                bpf_stats(False)            # never left on for the next part

    def record(self, res, key):
        """After the part: wait for the daemon to be idle, then file its cost under key."""
        if self.daemon is None:
            return
        settle_daemon(self.daemon)
        on = res["on"]
        on[key + "_daemon_cpu"].append(self.during)
        on[key + "_daemon_cpu_all"].append(thread_cpu_seconds(self.daemon.proc.pid) - self.cpu0)
        if self.with_bpf:
            on[key + "_bpf"].append(self.bpf)


def thread_cpu_seconds(pid):
    """A process's CPU time to the nanosecond (its threads' schedstat), where /proc/PID/stat
    counts 10 ms ticks."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue                        # a thread that ended meanwhile
    return total / 1e9


def status_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def wait_tail(session, pattern, timeout):
    """PtySession.expect() copies the whole output at every wake-up, which on a
    15 MB flood costs the machine as much as what we measure: look at the tail."""
    deadline = time.monotonic() + timeout
    with session._cond:
        while True:
            m = pattern.search(bytes(session._buf[-16384:]))
            if m:
                session._pos = len(session._buf)
                return m
            left = deadline - time.monotonic()
            if session._eof or left <= 0:
                raise AssertionError("bench: no %r in the session within %ss: %r" % (
                    pattern.pattern, timeout, bytes(session._buf[-300:])))
            session._cond.wait(min(left, 0.5))


def timed(session, command, timeout=600):
    """Run `command` in the session; (seconds measured inside it, bytes the client got)."""
    with session._cond:
        start = len(session._buf)
    n = uuid.uuid4().hex[:8]
    session.sendline("s=$EPOCHREALTIME; %s; e=$EPOCHREALTIME; echo \"RES%s $s $e\"" % (command, n))
    m = wait_tail(session, re.compile(rb"RES%s (\d+\.\d+) (\d+\.\d+)" % n.encode()), timeout)
    wait_tail(session, harness.PtySession.PROMPT, 30)
    with session._cond:
        shown = len(session._buf) - start
    return float(m.group(2)) - float(m.group(1)), shown


def timed_cpu(session, command, timeout=600):
    """Run `command` in the session under bash's `time`: (wall seconds, CPU seconds of the
    command and its children).  Wall minus CPU is the time its processes waited for a CPU:
    steadier from sample to sample than the wall time, which swings with the host."""
    n = uuid.uuid4().hex[:8]
    session.sendline("TIMEFORMAT='TIME%s %%R %%U %%S'; time (%s)" % (n, command))
    m = wait_tail(session, re.compile(rb"TIME%s (\d+\.\d+) (\d+\.\d+) (\d+\.\d+)"
                                      % n.encode()), timeout)
    wait_tail(session, harness.PtySession.PROMPT, 30)
    return float(m.group(1)), float(m.group(2)) + float(m.group(3))


def settle_daemon(daemon, timeout=20.0):
    """Until the daemon is done with the previous part: its recordings converted and its
    CPU idle (or `timeout`)."""
    deadline = time.monotonic() + timeout
    # the conversion starts once the session has been quiet a while (QUIET, then the
    # flusher's next tick): an idle CPU before then says nothing, so wait for it first
    while time.monotonic() < deadline and any(
            a.get("unconverted_bytes") for a in daemon.api("status")["actions"].values()):
        time.sleep(0.1)
    used = cpu_seconds(daemon.proc.pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_seconds(daemon.proc.pid)
        if now - used < 0.01:            # less than a tick in 0.3 s: idle
            break
        used = now


def settle(daemon=None, timeout=20.0):
    """Before each timed part, in both conditions: the previous part's dirty pages
    (a flood's recordings are ~35 MB) written out, and the daemon done with the
    previous part (it converts a burst's recording once the burst is over), so
    neither is charged to the next part."""
    if daemon is not None:
        settle_daemon(daemon, timeout)
    os.sync()
    time.sleep(0.3)


def captured_bytes(daemon, user):
    time.sleep(0.5)
    rows = daemon.api("sessions")["sessions"]
    return sum(r["terminal_bytes"] for r in rows if r["username"] == user.name)


def losses(daemon):
    """(terminal bytes the daemon counted lost, BPF tty records it counted dropped).  Bytes
    lost after a stream's last record are counted at the session's close, later than a
    flood's check: the prompt's output after the flood carries a flood's loss in time."""
    st = daemon.api("status")
    return st.get("terminal_lost_bytes", 0), st["bpf_drops"].get("tty", 0)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pooled_ratio(runs, higher_better):
    """The on/off ratio of medians over the (off samples, on samples) of one run or more,
    each run's samples scaled by its off median first: runs taken hours apart sit at
    different speeds, and their raw samples pooled would mix those levels into the ratio
    (it could even fall outside every run's own).  One run's ratio is unchanged."""
    off_all, on_all = [], []
    for off, on in runs:
        scale = median(off)
        off_all += [x / scale for x in off]
        on_all += [x / scale for x in on]
    off, on = median(off_all), median(on_all)
    return off / on if higher_better else on / off


def ratio_interval(runs, higher_better, rounds=2000, seed=5):
    """The 90 % interval of pooled_ratio(), each run's pairs resampled with replacement (a
    bootstrap, seeded: the same samples give the same interval): how much of a ratio the
    runs' noise leaves undecided.  None below 4 pairs."""
    runs = [(off, on, min(len(off), len(on))) for off, on in runs]
    if sum(n for _, _, n in runs) < 4:
        return None
    rng, ratios = random.Random(seed), []
    for _ in range(rounds):
        picked = []
        for off, on, n in runs:
            picks = [rng.randrange(n) for _ in range(n)]
            picked.append(([off[i] for i in picks], [on[i] for i in picks]))
        ratios.append(pooled_ratio(picked, higher_better))
    ratios.sort()
    return ratios[int(0.05 * rounds)], ratios[int(0.95 * rounds) - 1]


def pool(paths):
    """The budgeted ratios over the samples of several runs' --json files (pooled_ratio):
    runs of one build, pooled, narrow an interval that one run leaves across the budget."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit("bench: %s: %s" % (path, e))
    out = ["pooled: %d run(s), %s pairs" % (len(runs), "+".join(
        str(r.get("args", {}).get("pairs", "?")) for r in runs))]
    for key, higher_better in (("exec", False), ("flood", False), ("scp", True),
                               ("parallel", False)):
        with_part = [r[key] for r in runs if "samples" in r.get(key, {})]
        if not with_part:
            continue
        have = [(part["samples"]["off"], part["samples"]["on"]) for part in with_part]
        ratio = pooled_ratio(have, higher_better)
        each = " ".join("%.3f" % part["ratio"] for part in with_part)
        interval = ratio_interval(have, higher_better)
        out.append("%-10s ratio %.3f %s %s  (each run: %s)" % (
            key, ratio, "[%.3f-%.3f]" % interval if interval else "",
            "ok" if ratio <= BUDGET else "OVER BUDGET", each))
    return out


# -- the daemon under test --------------------------------------------------------------------

def default_like_config(workdir):
    """The embedded default's session recordings, moved under `workdir`; SshlogDaemon adds
    the default's text event log (same triggers) itself."""
    text = []
    for name in sorted(os.listdir(os.path.join(TOP, "conf.d"))):
        if name.endswith((".yaml", ".yml")) and name != "log_events.yaml":
            with open(os.path.join(TOP, "conf.d", name)) as f:
                text.append(f.read().replace("/var/log/sshlog", workdir))
    return "\n".join(text) or None


def start_daemon(workdir, recordings=True):
    d = SshlogDaemon(workdir, json_log=False,
                     config_text=default_like_config(workdir) if recordings else None)
    t0 = time.monotonic()
    d.start(timeout=120)
    return d, time.monotonic() - t0


# -- workloads --------------------------------------------------------------------------------

def run_parallel(sshd, user, sessions, commands, tag):
    """P sessions logged in at once, their command loops started together once all are
    in (at a time set ahead, slept to by each): (seconds from the first loop's start to the
    last one's end, mean seconds from launching ssh to the session's first command).  The
    loops' span leaves out the logins, which would otherwise stagger the starts and make
    the span the first and last logins' luck."""
    lead = 1.0 + 0.1 * sessions           # 20 logins at once take ~2.3 s here
    t0 = time.time() + lead
    results, errors = [], []

    def one(i):
        cmd = ("login=$EPOCHREALTIME; w=$(( %d - ${EPOCHREALTIME/./} )); "
               "if [ $w -gt 0 ]; then sleep $((w / 1000000)).$(printf %%06d $((w %% 1000000)));"
               " fi; s=$EPOCHREALTIME; for i in $(seq %d); do /bin/true %s-%d; done; "
               "e=$EPOCHREALTIME; echo \"T $login $s $e\"" % (int(t0 * 1e6), commands, tag, i))
        try:
            launched = time.time()
            r = harness.ssh_run(sshd, user, cmd, timeout=600)
            m = re.search(r"T (\d+\.\d+) (\d+\.\d+) (\d+\.\d+)", r.stdout)
            if not m:
                raise RuntimeError("no timing from session %d: %r %r" % (i, r.stdout, r.stderr))
            results.append((float(m.group(1)) - launched, float(m.group(2)),
                            float(m.group(3))))
        except Exception as e:      # collected and re-raised below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    first, last = min(s for _, s, _ in results), max(s for _, s, _ in results)
    if last - first > 0.25:
        raise RuntimeError("bench: a loop started %.2f s after the first: the logins took "
                           "longer than the %.1f s allowed" % (last - first, lead))
    return (max(e for _, _, e in results) - first,
            statistics.mean(login for login, _, _ in results))


def count_finished(daemon, tag, expected, timeout=120, settle=5.0):
    """(command_finish lines of /bin/true TAG-... in the text event log, how many of them
    say an exit code other than 0), once all are there or the count has not moved for
    `settle` seconds (the daemon may lag behind)."""
    pattern = re.compile(r" command_finish \(\d+\) \S+ execute complete \(exit code: (-?\d+)"
                         r"[^)]*\) /bin/true %s-" % tag)
    last, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while True:
        n = bad = 0
        with open(daemon.text_log, errors="replace") as f:
            for line in f:
                m = pattern.search(line)
                if m:
                    n += 1
                    bad += m.group(1) != "0"
        now = time.monotonic()
        if n != last:
            last, since = n, now
        if n >= expected or now - since >= settle or now >= deadline:
            return n, bad
        time.sleep(0.5)


def build_syscall_loop(work):
    if shutil.which("gcc") is None:
        return None
    src, exe = os.path.join(work, "loop.c"), os.path.join(work, "loop")
    with open(src, "w") as f:
        f.write(SYSCALL_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def syscall_cost(exe, n, repeat=5):
    """Median ns per getppid() and per write() of `repeat` runs."""
    g, w = [], []
    for _ in range(repeat):
        out = subprocess.run([exe, str(n)], capture_output=True, check=True).stdout.split()
        g.append(float(out[0]))
        w.append(float(out[1]))
    return median(g), median(w)


def block(args, parts, cond, daemon, sshd, user, payload, loop, res, line):
    """One sample of each timed part, daemon `cond` ("off", or "on" with `daemon`); the
    figures go to res[cond] (with the daemon: what it lost too), a word on each to `line`."""
    if "exec" in parts or "flood" in parts:
        with harness.PtySession(sshd, user) as s:
            # the first burst after the daemon starts also pays for its fresh heap (a
            # flood: ~9,000 page faults): reported; the second one is budgeted
            if "exec" in parts:
                for key in ("exec_first", "exec"):
                    settle(daemon)
                    with OwnCost(daemon, with_bpf=key == "exec_first") as cost:
                        t, cpu = timed_cpu(s, "for i in $(seq %d); do /bin/true; done"
                                           % args.execs)
                    cost.record(res, key)
                    res[cond][key].append(t)
                    res[cond][key + "_wait"].append(t - cpu)
                    line.append("%s %.3fs" % (key.replace("_", " "), t))
            if "flood" in parts:
                for key in ("flood_first", "flood"):
                    if daemon:
                        before, lost_before = captured_bytes(daemon, user), losses(daemon)
                    settle(daemon)
                    with OwnCost(daemon, with_bpf=key == "flood_first") as cost:
                        t, shown = timed(s, "seq 1 %d" % args.lines)
                    res[cond][key].append(t)
                    line.append("%s %.3fs" % (key.replace("_", " "), t))
                    if daemon:
                        cost.record(res, key)
                        got = captured_bytes(daemon, user) - before
                        counted = [b - a for a, b in zip(lost_before, losses(daemon))]
                        res["on"]["lost_bytes"].append(max(shown - got, 0))
                        res["on"]["counted_loss"].append(counted)
                        said = ""
                        if any(counted):
                            said = ("; the daemon counted %d byte(s) lost, %d tty record(s) "
                                    "dropped" % tuple(counted))
                        line.append("(%d/%d bytes recorded%s)" % (min(got, shown), shown, said))
    if "scp" in parts:
        # an upload's throughput swings 10-25 % from one to the next here, with or without
        # the daemon (its BPF programs take ~1 % of one): the block's sample is the median
        # of SCP_UPLOADS uploads
        speeds = []
        for _ in range(SCP_UPLOADS):
            settle(daemon)
            with OwnCost(daemon) as cost:
                t = upload(sshd, user, payload)
            cost.record(res, "scp")
            speeds.append(args.scp_mb / t)
        res[cond]["scp"].append(median(speeds))
        line.append("scp %s MB/s" % "/".join("%.0f" % v for v in speeds))
    if "parallel" in parts:
        tag = "b%s" % uuid.uuid4().hex[:8]
        settle(daemon)
        with OwnCost(daemon) as cost:
            t, login = run_parallel(sshd, user, args.parallel, args.commands, tag)
        res[cond]["parallel"].append(t)
        res[cond]["login"].append(login)
        line.append("parallel %.2fs (logins %.2fs)" % (t, login))
        if daemon:
            line.append(logged(args, daemon, tag, res))
            cost.record(res, "parallel")
    if loop:
        g, w = syscall_cost(loop, args.syscalls)
        res[cond]["getppid"].append(g)
        res[cond]["write"].append(w)
        line.append("getppid %.0fns write %.0fns" % (g, w))
    if daemon is not None:
        bpf_share_samples(args, parts, daemon, sshd, user, payload, res, line)


def upload(sshd, user, payload):
    """One scp upload of `payload` to a fresh file, removed after: its seconds."""
    remote = "/tmp/sshlog-bench-%s.bin" % uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    cp = harness.scp_upload(sshd, user, payload, remote, timeout=600)
    t = time.monotonic() - t0
    if cp.returncode != 0:
        raise RuntimeError("scp failed: %s" % cp.stderr)
    os.unlink(remote)
    return t


def logged(args, daemon, tag, res):
    """Count the parallel run `tag`'s command_finish lines in the event log (waiting
    longer when some are late), file the missing ones as lost; a word on it for the line."""
    want = args.parallel * args.commands
    got, bad = count_finished(daemon, tag, want)
    words = "(%d with a wrong exit code)" % bad if bad else ""
    if got < want:          # late, or lost? wait longer and say which
        st = daemon.api("status")
        later, _ = count_finished(daemon, tag, want, timeout=30, settle=15)
        words += "(only %d/%d logged at first, %d after 15 s more; daemon: bpf drops %s, " \
                 "decode errors %s, actions %s)" % (
                     got, want, later, st["bpf_drops"], st["decode_errors"],
                     {k: (v["queued"], v["dropped"], v["failed"])
                      for k, v in st["actions"].items()})
        got = later
    res["on"]["lost_events"].append(want - got)
    return words + "(%d/%d logged)" % (got, want)


def bpf_share_samples(args, parts, daemon, sshd, user, payload, res, line):
    """The BPF programs' run time in an upload and in the parallel part, which have no
    unbudgeted first sample: one more of each at the end of an on block, with bpf_stats
    on, not timed (the parallel one's completions are counted all the same)."""
    if "scp" in parts:
        settle(daemon)
        with OwnCost(daemon, with_bpf=True) as cost:
            upload(sshd, user, payload)
        cost.record(res, "scp_accounted")
    if "parallel" in parts:
        tag = "b%s" % uuid.uuid4().hex[:8]
        settle(daemon)
        with OwnCost(daemon, with_bpf=True) as cost:
            run_parallel(sshd, user, args.parallel, args.commands, tag)
        line.append("accounted run " + logged(args, daemon, tag, res))
        cost.record(res, "parallel_accounted")


def own_cost_lines(args, res, figures):
    """The summary's account of what the daemon itself spent on each part (medians of the
    on samples): its BPF programs' run time, spent inside the sessions' processes (measured
    on the daemon's first storm and flood, which are not budgeted, and on one more upload
    and parallel run at the end of each on block, since the accounting has a cost of its
    own), and its CPU time while the part ran, spent beside them (and, apart, after it:
    a flood's tail drained, its recording converted).  Their sum as a share of the
    part's off time is the most of it the sessions could feel directly."""
    out = []
    parts = (("exec", "exec storm", "exec_first", args.execs, "command"),
             ("flood", "terminal flood", "flood_first", None, None),
             ("scp", "scp upload", "scp_accounted", None, None),
             ("parallel", "parallel sessions", "parallel_accounted",
              args.parallel * args.commands, "command"))
    for key, label, bpf_key, per, unit in parts:
        cpu = res["on"][key + "_daemon_cpu"]
        if not cpu or not res["off"][key]:
            continue
        off_s = median(res["off"][key])
        if key == "scp":
            off_s = args.scp_mb / off_s             # throughput to seconds
        bpf = median(res["on"][bpf_key + "_bpf"]) if bpf_key and res["on"][bpf_key + "_bpf"] \
            else None
        after = median(res["on"][key + "_daemon_cpu_all"]) - median(cpu)
        own = median(cpu) + (bpf or 0.0)
        figures["own_cost_" + key] = {"daemon_cpu_s": median(cpu), "daemon_cpu_after_s": after,
                                      "bpf_s": bpf, "share_of_off": own / off_s}
        words = ["daemon CPU %.1f ms (%.1f ms after it)" % (median(cpu) * 1e3, after * 1e3)]
        if bpf is not None:
            words.insert(0, "BPF programs %.1f ms" % (bpf * 1e3))
        if per:
            words.append("%.1f us a %s" % (own / per * 1e6, unit))
        out.append("%-40s %s: %.1f %% of the off time" % (
            "own cost, " + label, ", ".join(words), own / off_s * 100))
    return out


def bench_report(work, events, as_json):
    """Seconds and peak RSS of `sshlog report` over a generated log of `events` events."""
    sys.path.insert(0, TOP)
    import eventlog_gen
    path = os.path.join(work, "report-%s.log" % ("json" if as_json else "text"))
    t0 = time.monotonic()
    with open(path, "w", encoding="utf-8") as f:
        eventlog_gen.generate(f, events, as_json)
    gen = time.monotonic() - t0
    size = os.path.getsize(path)
    # GNU time measures the report alone (a child's ru_maxrss would count the pages it
    # shared with this big process between fork and exec)
    timer = ["/usr/bin/time", "-f", "TIME %e %U %S %M", "-o", path + ".time"] \
        if os.path.exists("/usr/bin/time") else []
    t0 = time.monotonic()
    r = subprocess.run(timer + sshlog_argv() + ["report", "--since", "all", "--format", "json",
                                                path], stdout=subprocess.PIPE)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError("report failed (%s)" % r.returncode)
    data = json.loads(r.stdout)
    cpu = rss = float("nan")
    if timer:
        with open(path + ".time") as f:
            m = re.search(r"TIME ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", f.read())
        took, cpu, rss = float(m.group(1)), float(m.group(2)) + float(m.group(3)), \
            int(m.group(4)) / 1024.0
        os.unlink(path + ".time")
    os.unlink(path)
    return {"events": data["events"], "seconds": took, "cpu": cpu, "rss_mb": rss,
            "size_mb": size / 1e6, "generated_in": gen, "corrupt": data["corrupt_lines"]}


# -- main -------------------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small sizes, 4 pairs (~4 minutes)")
    ap.add_argument("--only", default=",".join(PARTS),
                    help="comma-separated parts: %s" % ",".join(PARTS))
    ap.add_argument("--pairs", type=int, help="off/on pairs of blocks, each block one "
                    "sample of each timed part")
    ap.add_argument("--execs", type=int)
    ap.add_argument("--lines", type=int)
    ap.add_argument("--scp-mb", type=int)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument("--commands", type=int, help="commands per parallel session")
    ap.add_argument("--syscalls", type=int)
    ap.add_argument("--idle-seconds", type=int)
    ap.add_argument("--report-events", type=int)
    ap.add_argument("--report-json", action="store_true",
                    help="also time the report over a JSON Lines log of as many events")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--pool", nargs="+", metavar="JSON", help="print the budgeted ratios over "
                    "the samples of these runs' --json files (runs of one build), and exit")
    ap.add_argument("--on", choices=("default", "eventlog"), default="default",
                    help="what the daemon runs: the embedded default (event log and session "
                    "recordings) or the event log alone")
    args = ap.parse_args()
    quick = dict(pairs=4, execs=500, lines=200000, scp_mb=50, commands=50,
                 syscalls=500000, idle_seconds=15, report_events=200000)
    full = dict(pairs=20, execs=2000, lines=2000000, scp_mb=200, commands=200,
                syscalls=2000000, idle_seconds=60, report_events=1000000)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = set(args.parts) - set(PARTS)
    if bad:
        ap.error("unknown part(s): %s" % ", ".join(sorted(bad)))
    return args


def main():
    args = parse_args()
    if args.pool:
        print("\n".join(pool(args.pool)))
        return 0
    parts = set(args.parts)
    session_parts = parts & {"exec", "flood", "scp", "parallel", "syscall"}
    if (session_parts or "idle" in parts) and os.geteuid() != 0:
        sys.exit("bench: run as root (sudo make bench), or --only report")
    work = tempfile.mkdtemp(prefix="sshlog-bench-")
    os.chmod(work, 0o755)
    figures = {"kernel": os.uname().release, "cpus": os.cpu_count(), "load_before": load(),
               "args": {k: v for k, v in vars(args).items() if k != "parts"}}
    res = {c: collections.defaultdict(list) for c in ("off", "on")}
    starts, rss_start, rss_end, drops, rerouted = [], [], [], [], []
    anon_start = []
    foreign = Foreign()
    pytests = subprocess.run(["pgrep", "-c", "-f", "pytest"], capture_output=True).stdout
    print("sshlog bench: %s, %d CPUs, load %s, %s pytest process(es) running, parts: %s, "
          "daemon: %s" % (os.uname().release, os.cpu_count(), figures["load_before"],
                          pytests.decode().strip() or "0", ",".join(args.parts),
                          "event log and recordings" if args.on == "default" else
                          "event log only"), flush=True)
    sshd = None
    try:
        if session_parts:
            user = harness.create_user("sshlogbench", "Pw-bench-9",
                                       key_dir=os.path.join(work, "keys"))
            # 20 connections at once: above sshd's default MaxStartups (10)
            sshd = harness.Sshd(os.path.join(work, "sshd"), listen=("127.0.0.1",),
                                extra_config={"MaxStartups": "100"}).start()
            loop = build_syscall_loop(work) if "syscall" in parts else None
            if "syscall" in parts and loop is None:
                print("syscall cost: skipped (no gcc)")
            payload = None
            if "scp" in parts:
                payload = os.path.join(work, "payload.bin")
                with open(payload, "wb") as f:
                    for _ in range(args.scp_mb):
                        f.write(os.urandom(1 << 20))
            for i in range(args.pairs):
                # an off and an on block side by side, their order alternating: this VM's
                # speed drifts over minutes, and a pair's two blocks see the same host
                for cond in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    line = ["pair %d %-3s" % (i + 1, cond)]
                    daemon = None
                    if cond == "on":
                        daemon, took = start_daemon(os.path.join(work, "d%d" % i),
                                                    recordings=args.on == "default")
                        starts.append(took)
                        rss_start.append(status_kb(daemon.proc.pid, "VmRSS") / 1024.0)
                        anon_start.append(status_kb(daemon.proc.pid, "RssAnon") / 1024.0)
                    foreign.sample(daemon)
                    block(args, parts, cond, daemon, sshd, user, payload,
                          loop if i % SYSCALL_EVERY == 0 else None, res, line)
                    foreign.sample(daemon)
                    if daemon:
                        rss_end.append(status_kb(daemon.proc.pid, "VmHWM") / 1024.0)
                        st = daemon.api("status")
                        drops.append(st["bpf_drops"])
                        rerouted.append(st.get("bpf_rerouted", {}))
                        line.append("peak RSS %.0f MB" % rss_end[-1])
                        rc = daemon.stop()
                        if rc != 0:
                            raise RuntimeError("daemon exit %s: %s" % (
                                rc, daemon.stderr_text()[-2000:]))
                    print("  ".join(line), flush=True)
        idle = None
        if "idle" in parts:
            daemon, took = start_daemon(os.path.join(work, "idle"))
            starts.append(took)
            rss_start.append(status_kb(daemon.proc.pid, "VmRSS") / 1024.0)
            anon_start.append(status_kb(daemon.proc.pid, "RssAnon") / 1024.0)
            time.sleep(2)
            foreign.sample(daemon)
            c0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            idle = (cpu_seconds(daemon.proc.pid) - c0) / (time.monotonic() - t0) * 100
            foreign.sample(daemon)
            daemon.stop()
        report = []
        if "report" in parts:
            report.append(("text", bench_report(work, args.report_events, False)))
            if args.report_json:
                report.append(("JSON", bench_report(work, args.report_events, True)))
    finally:
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)

    # -- summary --
    figures["load_after"] = load()
    out = []
    fmin, fmax = foreign.summary()
    out.append("")
    out.append("sshlog bench on %s (%d CPUs), load %s -> %s; %d off/on pair(s) of blocks, "
               "medians" % (figures["kernel"], figures["cpus"], figures["load_before"],
                            figures["load_after"], args.pairs))
    if fmax:
        out.append("NOTE: %d-%d foreign BPF program(s) were loaded during the run: timings "
                   "include their cost" % (fmin, fmax))
    figures["foreign_bpf_programs"] = [fmin, fmax]
    rows = [("exec_first", "exec storm, the daemon's first", "s", False),
            ("exec", "exec storm (%d x /bin/true)" % args.execs, "s", False),
            ("flood_first", "terminal flood, the daemon's first", "s", False),
            ("flood", "terminal flood (seq 1 %d)" % args.lines, "s", False),
            ("scp", "scp upload (%d MB)" % args.scp_mb, "MB/s", True),
            ("parallel", "parallel (%d x %d commands)" % (args.parallel, args.commands), "s",
             False),
            ("login", "%d logins at once, mean" % args.parallel, "s", False)]
    for key, label, unit, higher_better in rows:
        off, on = median(res["off"][key]), median(res["on"][key])
        if not res["on"][key]:
            continue
        run = [(res["off"][key], res["on"][key])]
        ratio, interval = pooled_ratio(run, higher_better), ratio_interval(run, higher_better)
        figures[key] = {"off": off, "on": on, "ratio": ratio, "ratio_90": interval,
                        "samples": {"off": res["off"][key], "on": res["on"][key]}}
        verdict = "ok" if ratio <= BUDGET else "OVER BUDGET"
        if key in ("exec_first", "flood_first"):
            verdict = "(start-up: not budgeted)"
        elif key == "login":
            verdict = "(reported)"
        out.append("%-40s off %8.3f %-4s on %8.3f %-4s ratio %.3f %s %s" % (
            label, off, unit, on, unit, ratio,
            "[%.3f-%.3f]" % interval if interval else "", verdict))
    out.extend(own_cost_lines(args, res, figures))
    lost_bytes, lost_events = res["on"]["lost_bytes"], res["on"]["lost_events"]
    if lost_bytes:
        counted = [sum(c) for c in zip(*res["on"]["counted_loss"])]
        figures["terminal_bytes_lost"] = sum(lost_bytes)
        figures["terminal_loss_counted"] = {"bytes": counted[0], "tty_records": counted[1]}
        out.append("%-40s %d over %d flood(s)  %s" % (
            "terminal bytes lost", sum(lost_bytes), len(lost_bytes), "ok" if not sum(lost_bytes)
            else "LOST (the daemon counted %d byte(s) lost, %d tty record(s) dropped)"
            % tuple(counted)))
    if lost_events:
        figures["events_lost"] = sum(lost_events)
        out.append("%-40s %d of %d  %s" % ("command_finish events lost", sum(lost_events),
                                          len(lost_events) * args.parallel * args.commands,
                                          "ok" if not sum(lost_events) else "LOST"))
    if drops:
        figures["bpf_drops"] = {ring: sum(d.get(ring, 0) for d in drops)
                                for ring in ("ctl", "tty")}
        out.append("%-40s %s (all %d on blocks)" % ("BPF ring drops", figures["bpf_drops"],
                                                    len(drops)))
        figures["bpf_rerouted"] = {ring: sum(d.get(ring, 0) for d in rerouted)
                                   for ring in ("ctl", "tty")}
        out.append("%-40s %s" % ("refused by their ring, taken by the other",
                                 figures["bpf_rerouted"]))
    for key, label in (("exec_first_wait", "the daemon's first storm: waiting"),
                       ("exec_wait", "exec storm: waiting for a CPU")):
        if res["on"][key]:
            off, on = median(res["off"][key]), median(res["on"][key])
            figures[key] = {"off": off, "on": on}
            out.append("%-40s off %6.3f s  on %6.3f s  %+.0f us per command" % (
                label, off, on, (on - off) / args.execs * 1e6))
    if res["on"]["getppid"]:
        for key in ("getppid", "write"):
            off, on = median(res["off"][key]), median(res["on"][key])
            figures["syscall_" + key] = {"off_ns": off, "on_ns": on}
            out.append("%-40s off %6.0f ns  on %6.0f ns  +%.0f ns per call" % (
                "%s() outside ssh sessions" % key, off, on, on - off))
    if idle is not None:
        figures["idle_cpu_percent"] = idle
        out.append("%-40s %.2f %% of a core over %d s  %s" % (
            "idle daemon CPU", idle, args.idle_seconds, "ok" if idle < 0.5 else "OVER BUDGET"))
    if starts:
        figures["start_s"] = median(starts)
        figures["rss_start_mb"] = median(rss_start)
        figures["rss_anon_start_mb"] = median(anon_start)
        out.append("%-40s %.2f s (median of %d)" % ("daemon start", median(starts), len(starts)))
        out.append("%-40s %.0f MB after start (%.0f MB private, the rest libbcc/LLVM pages)%s"
                   % ("daemon RSS", median(rss_start), median(anon_start),
                      "; peak %.0f MB in a block" % max(rss_end) if rss_end else ""))
        if rss_end:
            figures["rss_peak_mb"] = max(rss_end)
    for kind, rep in report:
        figures["report_" + kind.lower()] = rep
        out.append("%-40s %.1f s wall, %.1f s CPU, peak RSS %.0f MB, %.0f MB of log%s" % (
            "report, %d %s events" % (rep["events"], kind), rep["seconds"], rep["cpu"],
            rep["rss_mb"], rep["size_mb"], "" if not rep["corrupt"] else
            " (%d CORRUPT)" % rep["corrupt"]))
    print("\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
