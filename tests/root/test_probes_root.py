"""The BPF programs loaded in-process: records of a tracked process tree arrive
whole and in order, across the rings' wrap-around, with nothing dropped."""
import subprocess
import time

import pytest

import sshlog

pytestmark = pytest.mark.root


def test_tracked_tree_records_arrive_whole_and_in_order():
    commands = 6000
    probes = sshlog.Probes(sshlog.probe_plan())
    try:
        child = subprocess.Popen(
            ["/bin/sh", "-c", "read go; i=0; while [ $i -lt %d ]; do "
             "/bin/echo ring-test-$i; i=$((i+1)); done" % commands],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        probes.track(child.pid, child.pid, 0, sshlog.F_USER)
        child.stdin.write(b"go\n")
        child.stdin.close()
        records = []
        while child.poll() is None:          # drained as the daemon does: 6000 execs
            records += probes.drain()        # write ~8 MB through the 4 MiB ring
            time.sleep(0.02)
        time.sleep(0.1)
        records += probes.drain()
        drops = probes.drops()
    finally:
        probes.close()
    decoded = [sshlog.decode_record(r) for r in records]
    execs = [d for d in decoded if isinstance(d, sshlog.Exec) and d.sess == child.pid]
    assert [d.argv for d in execs] == [("/bin/echo", "ring-test-%d" % i)
                                       for i in range(commands)]
    out = [d.data for d in decoded if isinstance(d, sshlog.Data)
           and d.type == sshlog.REC_STDOUT and d.sess == child.pid]
    assert out == [b"ring-test-%d\n" % i for i in range(commands)]
    exits = [d for d in decoded if isinstance(d, sshlog.Exit) and d.sess == child.pid]
    assert [(d.pid, d.status) for d in exits] == [(d.pid, 0) for d in execs]
    assert [sshlog._record_ts(r) for r in records] == sorted(sshlog._record_ts(r)
                                                              for r in records)
    assert drops == {"ctl": 0, "tty": 0}
