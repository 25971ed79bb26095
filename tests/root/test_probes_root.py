"""The BPF programs loaded in-process, read by both ring readers: records of a
tracked process tree arrive whole and in order, across the ring's wrap-around
(mmap reader), with nothing dropped."""
import subprocess
import time

import pytest

import sshlog

pytestmark = pytest.mark.root


PAD = "p" * 1000                    # ~2.4 KB of ring per command: 6000 wrap the 4 MiB ring 3x


@pytest.mark.parametrize("ring_mmap,commands", [(True, 6000), (False, 300)],
                         ids=["mmap", "bcc-callback"])
def test_tracked_tree_records_arrive_whole_and_in_order(ring_mmap, commands):
    probes = sshlog.Probes(sshlog.probe_plan(), ring_mmap=ring_mmap)
    try:
        child = subprocess.Popen(
            ["/bin/sh", "-c", "read go; i=0; while [ $i -lt %d ]; do "
             "/bin/echo ring-test-$i %s; i=$((i+1)); done" % (commands, PAD)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        probes.track(child.pid, child.pid, 0, sshlog.F_USER)
        child.stdin.write(b"go\n")
        child.stdin.close()
        records = []
        while child.poll() is None:          # drained as the daemon does
            records += probes.drain()
            time.sleep(0.02)
        time.sleep(0.1)
        records += probes.drain()
        drops = probes.drops()
        ctl_read = probes.readers[0].spans()[1] if ring_mmap else 0   # bytes consumed
    finally:
        probes.close()
    execs = [d for d in records if isinstance(d, sshlog.Exec) and d.sess == child.pid]
    assert [d.argv for d in execs] == [("/bin/echo", "ring-test-%d" % i, PAD)
                                       for i in range(commands)]
    assert ctl_read > (2 * sshlog.CTL_PAGES * 4096 if ring_mmap else -1)
    out = [d.data for d in records if isinstance(d, sshlog.Data)
           and d.type == sshlog.REC_STDOUT and d.sess == child.pid]
    assert out == [(b"ring-test-%d %s\n" % (i, PAD.encode()))[:sshlog.STDOUT_CAP]
                   for i in range(commands)]
    exits = [d for d in records if isinstance(d, sshlog.Exit) and d.sess == child.pid]
    assert [(d.pid, d.status) for d in exits] == [(d.pid, 0) for d in execs]
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    assert drops == {"ctl": 0, "tty": 0}
