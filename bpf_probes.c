/*
 * bpf_probes.c - kernel side of sshlog (loaded by bcc from sshlog.py).
 *
 * Tracepoints only (syscalls:*, sched:*, sock:*): kprobes and fentry are not
 * available everywhere.  No kernel struct is read through header offsets;
 * the one struct field used (task_struct.exit_code) arrives as -DOFF_EXIT_CODE
 * taken from /sys/kernel/btf/vmlinux at start-up.
 *
 * Every process of interest is in `tracked` (key: tgid).  Listening sshd's
 * enter it at accept(); per-connection processes inherit it at fork.  Every
 * handler starts with one lookup there, so the rest of the system pays a
 * single hash miss per traced syscall.
 *
 * Records go to two ring buffers: `ctl` (connections, exec, exit, auth,
 * uploads) and `tty` (terminal bytes), so a terminal flood can never push out
 * a security event.  Fixed-size records are reserved in the ring; exec and
 * data records are built in a per-CPU scratch record and copied into the ring
 * at their used size (the kernel runs these programs with preemption off and
 * never nests two tracing programs on one CPU, so a scratch record is never
 * shared); a session's terminal output is gathered in a merge slot and sent
 * a few KiB at a time.  A record its ring refuses goes into the other one (see
 * ring_output); one neither takes is counted in `drops`.
 *
 * Parameters (all integers, from sshlog.py):
 *   CTL_PAGES, TTY_PAGES   ring sizes in pages (powers of two)
 *   ARGV_CAP               bytes of argv kept per exec (power of two)
 *   STDOUT_CAP             bytes of a command's fd 1/2 output kept
 *   CAPTURE_INPUT          1 = also send sshd's writes to the pty master
 *                          (keystrokes), except while the pty has ECHO off
 *   HAVE_GROUP_DEAD        sched_process_exit has group_dead (kernel >= 6.x)
 *   OFF_EXIT_CODE          offset of task_struct.exit_code (optional)
 *   TRACK_MAX              capacity of the tracked-process table
 *   MERGE_SPAN_NS          longest time one terminal record's reads span
 *   FLUSH_TGID, FLUSH_FD   the daemon's pid and the fd whose read() flushes
 *                          the merge slots before it drains the rings
 *   REFUSE_EVERY           tests only: every Nth first try at each ring fails,
 *                          to exercise the reroute (0 = never; the default)
 */
#include <uapi/linux/ptrace.h>

/* ---- record layout: keep in sync with the ctypes classes in sshlog.py ---- */
enum rec_type {
    REC_CONNECT = 1,   /* a listener forked a connection's monitor      */
    REC_EXEC = 2,      /* a user command started                        */
    REC_EXIT = 3,      /* a command, transfer or monitor ended          */
    REC_SETUID = 4,    /* an sshd process switched uid for good         */
    REC_PTY = 5,       /* a session got pty N (TIOCGPTN)                */
    REC_WINSZ = 6,     /* window size set on a pty master               */
    REC_AUDIT = 7,     /* sshd sent a NETLINK_AUDIT message             */
    REC_TTY_OUT = 8,   /* sshd read from a pty master: what the screen shows */
    REC_TTY_IN = 9,    /* sshd wrote to a pty master: keystrokes        */
    REC_STDOUT = 10,   /* first bytes a command wrote to fd 1/2         */
    REC_UPLOAD_OPEN = 11,  /* scp/sftp-server opened a file for writing */
    REC_UPLOAD_CLOSE = 12, /* ...and closed it (byte count)             */
    REC_BTMP = 13,     /* sshd wrote a failed-login utmp record         */
    REC_TTY_LOSS = 14, /* a connection ended with terminal bytes lost since its last record */
};

struct rec_hdr {          /* 24 bytes, first in every record */
    u32 type;
    u32 pid;              /* tgid of the process concerned */
    u32 sess;             /* tgid of the connection's monitor (ptm_pid) */
    u32 len;              /* bytes of variable data after the fixed part */
    u64 ts;               /* bpf_ktime_get_ns() */
};

struct rec_connect {      /* 72 bytes */
    struct rec_hdr h;
    u32 listener;
    u16 family;
    u16 port;             /* host order: the client's */
    u8 addr[16];
    u8 server_addr[16];   /* our end, of the client's family */
    u16 server_port;      /* host order; 0 when not seen */
    u16 pad[3];
};

#define FNAME_CAP 256
#define LAST_ARG_CAP 256   /* without an environment the last argument is read alone */
struct rec_exec {
    struct rec_hdr h;     /* len = bytes in argv */
    u32 ppid;
    u32 uid;
    u16 argc;
    u16 truncated;
    u32 fname_len;
    char fname[FNAME_CAP];
    char argv[ARGV_CAP + LAST_ARG_CAP];  /* argc NUL-terminated strings */
};

struct rec_exit {
    struct rec_hdr h;
    s32 status;           /* wait(2) status; -1 when unknown */
    u32 flags;            /* the process's F_* flags */
};

struct rec_u32 {          /* REC_SETUID (uid), REC_PTY (tty index) */
    struct rec_hdr h;
    u32 value;
    u32 fd;
};

struct rec_winsz {
    struct rec_hdr h;
    u16 rows;
    u16 cols;
    u32 fd;
};

#define BIG_CAP 16384
struct rec_data_head {    /* the head of a data record */
    struct rec_hdr h;
    u32 fd;
    u32 lost;
};
struct rec_data_big {     /* REC_TTY_*, REC_STDOUT, REC_AUDIT, REC_BTMP: in the ring
                           * only up to h.len bytes of data */
    struct rec_hdr h;
    u32 fd;
    u32 lost;             /* REC_TTY_*: bytes of this session and direction lost
                           * (ring full) since its previous record; else 0 */
    u8 data[BIG_CAP];
};

#define PATH_CAP 4096
struct rec_upload_open {
    struct rec_hdr h;     /* len = bytes of path incl. NUL */
    s32 fd;
    u32 flags;
    u32 mode;
    u32 pad;
    char path[PATH_CAP];
};

struct rec_upload_close {
    struct rec_hdr h;
    s32 fd;
    u32 pad;
    u64 bytes;
};

/* ---- process and fd state ---- */
#define F_LISTENER  0x01   /* a listening sshd (marked at accept) */
#define F_SSHD      0x02   /* running an sshd image (sshd, sshd-session, sshd-auth) */
#define F_USER      0x04   /* inside the authenticated user's part of the tree */
#define F_CMD       0x08   /* exec'd a user command: report its exit */
#define F_XFER      0x10   /* scp / sftp-server: report uploads */
#define F_MONITOR   0x20   /* the per-connection monitor (the session key) */

struct proc {
    u32 sess;
    u32 ppid;
    u32 flags;
    u32 out_left;          /* STDOUT_CAP budget of the current command */
    s32 status;            /* exit_group() code when no BTF offset */
    u32 pad;
    u64 fds_marked;        /* bit N: fds may hold (tgid, N), N < 64; see fd_mark() */
    u64 fds_ptmx;          /* bit N: fd N is a pty master */
};

enum fd_kind { FD_PTMX = 1, FD_AUDIT = 2, FD_BTMP = 3, FD_UPLOAD = 4 };
struct fd_key { u32 tgid; s32 fd; };
struct fd_val { u32 kind; u32 pad; u64 bytes; };

struct peer { u16 family; u16 port; u8 addr[16]; };

/* a syscall's arguments kept from enter to exit, per thread; `what` says
 * which syscall left it, so a stale stash (a failed accept) is never misread */
enum stash_what { ST_ACCEPT = 1, ST_DUP, ST_SOCKET };
struct stash { u64 ptr; u64 arg; u32 what; u32 fd; };

BPF_HASH(tracked, u32, struct proc, TRACK_MAX);
BPF_HASH(fds, struct fd_key, struct fd_val, 16384);
BPF_TABLE("lru_hash", u32, struct peer, peers, 1024);      /* listener -> last accepted peer */
BPF_TABLE("lru_hash", struct peer, struct peer, servers, 1024); /* client -> our end */
BPF_TABLE("lru_hash", u64, struct stash, stashes, 16384);  /* pid_tgid -> syscall args */
BPF_ARRAY(drops, u64, 2);                          /* [0] ctl, [1] tty */
BPF_ARRAY(rerouted, u64, 2);       /* records of [0] ctl, [1] tty the other ring took */
BPF_ARRAY(tty_refusing, u32, 1);                   /* see ring_output() */
/* Terminal bytes lost to a full tty ring, per session and direction (key
 * sess * 2, + 1 for input): the stream's next record carries the count in
 * `lost`; what is left when the connection ends goes out as REC_TTY_LOSS. */
BPF_TABLE("lru_hash", u32, u64, tty_lost, 4096);
/* Keys tty_lost has gained and not given back: while 0, as it is unless the
 * tty ring has been full, a pty read takes no lookup there.  An entry the LRU
 * evicts leaves it above 0, which costs lookups, never a count. */
BPF_ARRAY(tty_lost_keys, s64, 1);
BPF_RINGBUF_OUTPUT(ctl, CTL_PAGES);
BPF_RINGBUF_OUTPUT(tty, TTY_PAGES);

#define CLONE_THREAD 0x00010000
#define TIOCSWINSZ 0x5414
#define TIOCGPTN 0x80045430
#define F_DUPFD 0
#define F_DUPFD_CLOEXEC 1030
#define AF_INET 2
#define AF_INET6 10
#define AF_NETLINK 16
#define PROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_RECV 3
#define NETLINK_AUDIT 9

/* ---- helpers ---- */

static __always_inline void count_drop(int ring)
{
    u64 *n = drops.lookup(&ring);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* A ring may refuse a record with room to spare: this kernel's (6.18)
 * reservation now and then fails with the ring nearly empty, and an
 * immediate retry in the same ring fails too.  Such a record goes into the
 * other ring; the reader takes both rings and orders their records by time.
 * A terminal record goes to the control ring only after its own ring last
 * took one, so a terminal flood that fills its ring cannot fill the control
 * ring as well: `tty_refusing` says the terminal ring refused the last one. */
static __always_inline void count_rerouted(int ring)
{
    u64 *n = rerouted.lookup(&ring);
    if (n)
        __sync_fetch_and_add(n, 1);
}

#ifndef REFUSE_EVERY
#define REFUSE_EVERY 0
#endif
#if REFUSE_EVERY
/* counted per ring: with one count for both, a terminal record's refusal could
 * fall on the next terminal record too whenever REFUSE_EVERY - 1 control records
 * came between them, and that one is lost by design (see above) */
BPF_ARRAY(refuse_tick, u64, 2);
static __always_inline int refuse_now(u32 ring)
{
    u64 *t = refuse_tick.lookup(&ring);
    return t && __sync_fetch_and_add(t, 1) % REFUSE_EVERY == REFUSE_EVERY - 1;
}
#else
#define refuse_now(ring) 0
#endif

/* Space for a control record of constant `size`: in the control ring, or
 * when it refuses, in the terminal ring (its reader passes such records on). */
static __always_inline void *ctl_reserve(u64 size)
{
    void *r = refuse_now(0) ? NULL : ctl.ringbuf_reserve(size);
    if (!r) {
        r = tty.ringbuf_reserve(size);
        if (r)
            count_rerouted(0);
    }
    return r;
}

/* Copy `size` bytes of `r` into ring `which` (0 control, 1 terminal), or
 * into the other one when it refuses (see above).  Nonzero: lost. */
static __always_inline long ring_output(u32 which, void *r, u64 size)
{
    if (which) {
        u32 zero = 0;
        u32 *refusing = tty_refusing.lookup(&zero);
        if (!refusing)
            return -1;
        if (!refuse_now(1) && !tty.ringbuf_output(r, size, 0)) {
            if (*refusing)
                *refusing = 0;
            return 0;
        }
        if (*refusing)
            return -1;
        *refusing = 1;
        if (ctl.ringbuf_output(r, size, 0))
            return -1;
    } else {
        if (!refuse_now(0) && !ctl.ringbuf_output(r, size, 0))
            return 0;
        if (tty.ringbuf_output(r, size, 0))
            return -1;
    }
    count_rerouted(which);
    return 0;
}

static __always_inline void fill_hdr(struct rec_hdr *h, u32 type, u32 pid, u32 sess)
{
    h->type = type;
    h->pid = pid;
    h->sess = sess;
    h->len = 0;
    h->ts = bpf_ktime_get_ns();
}

static __always_inline u32 current_tgid(void)
{
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline struct proc *current_proc(u32 *tgid)
{
    *tgid = current_tgid();
    return tracked.lookup(tgid);
}

/* The fds map is looked up only for an fd whose bit in the process's
 * fds_marked is set (or that is 64 or more): sshd's socket writes, one per
 * pty read in a flood, then cost no hash lookup, nor does a pty read, whose
 * kind fds_ptmx gives.  A bit is set before its entry is written and cleared
 * after it is deleted: an entry always has its bit. */
#define FD_BIT(fd) (1ULL << ((fd) & 63))

static __always_inline int fd_may_be_marked(struct proc *p, s32 fd)
{
    return fd < 0 || fd >= 64 || (p->fds_marked & FD_BIT(fd));
}

static __always_inline struct fd_val *fd_lookup(struct proc *p, u32 tgid, s32 fd)
{
    if (!fd_may_be_marked(p, fd))
        return 0;
    struct fd_key k = {.tgid = tgid, .fd = fd};
    return fds.lookup(&k);
}

static __always_inline int fd_is_ptmx(struct proc *p, u32 tgid, s32 fd)
{
    if (fd >= 0 && fd < 64)
        return (p->fds_ptmx & FD_BIT(fd)) != 0;
    struct fd_val *v = fd_lookup(p, tgid, fd);
    return v && v->kind == FD_PTMX;
}

static __always_inline void fd_mark(struct proc *p, u32 tgid, s32 fd, u32 kind)
{
    if (fd >= 0 && fd < 64) {
        __sync_fetch_and_or(&p->fds_marked, FD_BIT(fd));
        if (kind == FD_PTMX)
            __sync_fetch_and_or(&p->fds_ptmx, FD_BIT(fd));
        else
            __sync_fetch_and_and(&p->fds_ptmx, ~FD_BIT(fd));
    }
    struct fd_key k = {.tgid = tgid, .fd = fd};
    struct fd_val v = {.kind = kind};
    fds.update(&k, &v);
}

static __always_inline void fd_forget(struct proc *p, u32 tgid, s32 fd)
{
    struct fd_key k = {.tgid = tgid, .fd = fd};
    fds.delete(&k);
    if (fd >= 0 && fd < 64) {
        __sync_fetch_and_and(&p->fds_ptmx, ~FD_BIT(fd));
        __sync_fetch_and_and(&p->fds_marked, ~FD_BIT(fd));
    }
}

static __always_inline void stash_put(u32 what, u64 ptr, u64 arg, u32 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    struct stash s = {.ptr = ptr, .arg = arg, .what = what, .fd = fd};
    stashes.update(&id, &s);
}

/* Fetch and forget this thread's stash left by syscall `what`. */
static __always_inline int stash_take(u32 what, struct stash *out)
{
    u64 id = bpf_get_current_pid_tgid();
    struct stash *s = stashes.lookup(&id);
    if (!s)
        return 0;
    if (s->what != what) {
        stashes.delete(&id);
        return 0;
    }
    *out = *s;
    stashes.delete(&id);
    return 1;
}

/* A syscall's arguments at its exit tracepoint, from the user registers the
 * kernel saved at entry and leaves as the caller passed them (x86_64 pt_regs:
 * dx at 96, si at 104, di at 112, r10 at 56).  One program at exit instead of
 * an entry/exit pair: an entry hook on read() ran for every read on the host. */
struct sys_args { u64 a2, a1, a0; };     /* dx, si, di: contiguous in pt_regs */

static __always_inline u64 user_regs(void)
{
    return (u64)bpf_task_pt_regs(bpf_get_current_task_btf());
}

static __always_inline void syscall_args(struct sys_args *a)
{
    bpf_probe_read_kernel(a, sizeof(*a), (void *)(user_regs() + 96));
}

static __always_inline u32 tty_loss_key(u32 type, u32 sess)
{
    return sess * 2 + (type == REC_TTY_IN);
}

static __always_inline void tty_loss_add(u32 type, u32 sess, u32 n)
{
    u32 k = tty_loss_key(type, sess), zero = 0;
    u64 *v = tty_lost.lookup(&k);
    if (v) {
        __sync_fetch_and_add(v, n);
    } else {
        s64 *keys = tty_lost_keys.lookup(&zero);
        if (keys)                 /* counted first: never 0 while a key is there */
            __sync_fetch_and_add(keys, 1);
        u64 first = n;
        tty_lost.update(&k, &first);
    }
}

static __always_inline void tty_loss_forget(u32 k)
{
    u32 zero = 0;
    tty_lost.delete(&k);
    s64 *keys = tty_lost_keys.lookup(&zero);
    if (keys)
        __sync_fetch_and_add(keys, -1);
}

/* Bytes lost since the stream's previous record (one sshd thread per
 * session reads and writes the master, so there is no race on a key). */
static __always_inline u32 tty_loss_take(u32 type, u32 sess)
{
    u32 k = tty_loss_key(type, sess), zero = 0;
    s64 *keys = tty_lost_keys.lookup(&zero);
    if (keys && *keys == 0)
        return 0;
    u64 *v = tty_lost.lookup(&k);
    if (!v)
        return 0;
    u64 n = *v;
    tty_loss_forget(k);
    return n > 0xffffffff ? 0xffffffff : n;
}

#if CAPTURE_INPUT
/* Keystrokes are never sent while the session's terminal has ECHO off
 * (passwords at sudo, su, ssh and `read -s` prompts).  The programs of a
 * session set termios on its pty with TCSETS* (0x5402-0x5404, and the
 * termios2 forms); a process whose last setting cleared ECHO is in
 * `echo_off`, and echo_state[sess] counts those processes and keeps the
 * session's last setting.  Input is dropped here, in the kernel, while
 * either says "off", and until the session's first setting is seen.
 * Compiled only with CAPTURE_INPUT=1: nothing of this runs otherwise. */
#define TCSETS 0x5402
#define TCSETSF 0x5404
#define TCSETS2 0x402C542B
#define TCSETSF2 0x402C542D
#define ECHO_FLAG 0x8          /* termios c_lflag ECHO; c_lflag is at offset 12 */
struct echo { u32 off_procs; u32 last_off; };
BPF_HASH(echo_off, u32, u32, TRACK_MAX);                    /* tgid -> sess */
BPF_TABLE("lru_hash", u32, struct echo, echo_state, 4096);  /* sess -> state */

static __always_inline void termios_set(u32 tgid, u32 sess, u64 arg)
{
    u32 lflag = 0;
    u32 off = 1;               /* unreadable: assume a password prompt */
    if (bpf_probe_read_user(&lflag, sizeof(lflag), (void *)(arg + 12)) == 0)
        off = !(lflag & ECHO_FLAG);
    struct echo zero = {};
    struct echo *st = echo_state.lookup_or_try_init(&sess, &zero);
    if (!st)
        return;
    st->last_off = off;
    u32 *was = echo_off.lookup(&tgid);
    if (off && !was) {
        echo_off.update(&tgid, &sess);
        __sync_fetch_and_add(&st->off_procs, 1);
    } else if (!off && was) {
        echo_off.delete(&tgid);
        __sync_fetch_and_add(&st->off_procs, -1);
    }
}

static __always_inline void termios_forget(u32 tgid)
{
    u32 *sess = echo_off.lookup(&tgid);
    if (!sess)
        return;
    u32 key = *sess;
    struct echo *st = echo_state.lookup(&key);
    if (st && st->off_procs)
        __sync_fetch_and_add(&st->off_procs, -1);
    echo_off.delete(&tgid);
}

static __always_inline int echo_is_off(u32 sess)
{
    struct echo *st = echo_state.lookup(&sess);
    return !st || st->off_procs || st->last_off;
}
#endif

/* A connection's end: report terminal bytes lost after its last record. */
static __always_inline void tty_session_end(u32 sess)
{
#pragma unroll
    for (u32 dir = 0; dir < 2; dir++) {
        u32 k = sess * 2 + dir;
        u64 *v = tty_lost.lookup(&k);
        if (!v)
            continue;
        struct rec_u32 *r = ctl_reserve(sizeof(*r));
        if (r) {
            fill_hdr(&r->h, REC_TTY_LOSS, sess, sess);
            r->value = *v > 0xffffffff ? 0xffffffff : *v;
            r->fd = dir;
            ctl.ringbuf_submit(r, 0);
        } else {
            count_drop(0);
        }
        tty_loss_forget(k);
    }
#if CAPTURE_INPUT
    echo_state.delete(&sess);
#endif
}

/* A data record is built in a per-CPU scratch record and copied into the ring
 * at its exact size (bpf_ringbuf_output): a reservation must be of constant
 * size, and a 4 KiB reservation for a typical 800-byte pty read let an 8 MiB
 * ring hold only ~2 MB of a flood. */
BPF_PERCPU_ARRAY(data_scratch, struct rec_data_big, 1);

/* Send a filled data record (h.len bytes of data) into ring `which`; a
 * terminal one carries the bytes its stream lost since its last record. */
static __always_inline void send_data(u32 which, struct rec_data_big *r)
{
    u32 n = r->h.len;
    r->lost = which ? tty_loss_take(r->h.type, r->h.sess) : 0;
    u64 size = sizeof(struct rec_data_head) + n;
    asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(size) : "i"(sizeof(*r)));
    if (ring_output(which, r, size)) {
        count_drop(which);
        if (which)            /* the loss it carried, and its own bytes, go to the next */
            tty_loss_add(r->h.type, r->h.sess, r->lost + n);
    }
}

static __always_inline void emit_chunk(u32 which, u32 type, u32 tgid, u32 sess, s32 fd,
                                       const u8 *src, u32 n)
{
    u32 zero = 0;
    struct rec_data_big *r = data_scratch.lookup(&zero);
    if (!r)
        return;
    /* the clamp sits in the register the helper receives (LLVM 14 may
     * otherwise bound a copy, and the verifier then sees an unbounded size) */
    asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(n) : "i"(BIG_CAP));
    bpf_probe_read_user(r->data, n, src);
    fill_hdr(&r->h, type, tgid, sess);
    r->h.len = n;
    r->fd = fd;
    send_data(which, r);
}

/* Send `total` bytes of user memory as one or more data records.  Up to
 * four 16 KiB chunks: sshd reads up to 32 KiB from the pty master at once. */
static __always_inline void emit_data(u32 which, u32 type, u32 tgid, u32 sess,
                                      s32 fd, const u8 *src, u64 total)
{
    for (int i = 0; i < 4; i++) {      /* bounded loop: up to 64 KiB per read */
        if (total == 0)
            return;
        u32 n = total > BIG_CAP ? BIG_CAP : total;
        emit_chunk(which, type, tgid, sess, fd, src, n);
        src += n;
        total -= n;
    }
}

/* ---- merging a session's terminal output ---- */

/* A flood of 17 MB is 13,000-29,000 pty reads of a few hundred bytes; a
 * record each cost a ring copy here and a walk in the daemon.  A session's
 * reads are instead gathered in a merge slot and sent as one record (the
 * time of its first read) when the next read would not fit, is of another
 * fd, or comes MERGE_SPAN_NS after the first (a replay's timing stays that
 * faithful); before a record of the session that must follow the output
 * read so far (a command's start or end, a window size, keystrokes); and
 * whenever the daemon drains the rings (merge_flush_all, at its read of
 * FLUSH_FD), so a quiet tail waits no longer than the daemon would anyway,
 * and a record is rarely older than the drain before it (the reader's
 * HOLD_NS keeps order).
 * A session hashes to a slot (sess % MERGE_SLOTS); while another session's
 * bytes fill it, its reads go out on their own, as they do above MERGE_CAP.
 * The reader, a record's emitter in another process, and the daemon's flush
 * may meet on a slot: each takes its lock word (compare-and-swap, at most
 * MERGE_SPIN tries: a holder runs a BPF program, never sleeps, and holds it
 * for one copy of at most MERGE_CAP bytes).  A wait given up is counted in
 * merge_counts[1]: that read, or that record, then goes out on its own,
 * possibly ahead of the bytes the slot holds. */
#ifndef MERGE_SPAN_NS
#define MERGE_SPAN_NS 10000000
#endif
#ifndef FLUSH_TGID
#define FLUSH_TGID 0           /* the daemon, whose read of FLUSH_FD flushes every slot */
#define FLUSH_FD -1
#endif
#define MERGE_SLOTS 64
#define MERGE_CAP (BIG_CAP / 2)    /* an offset and a read each <= MERGE_CAP fit BIG_CAP */
#define MERGE_SPIN 256
struct merge_slot {
    u64 lock;                  /* 1 while held */
    u32 sess;                  /* whose bytes rec holds, when rec.h.len > 0 */
    u32 reads;                 /* pty reads in rec: counted at its send */
    struct rec_data_big rec;   /* REC_TTY_OUT; h.ts: the first read's time */
};
BPF_ARRAY(merge_slots, struct merge_slot, MERGE_SLOTS);
BPF_ARRAY(merge_counts, u64, 2);   /* [0] reads merged, [1] lock waits given up */

static __always_inline void merge_count(u32 which, u64 n)
{
    u64 *c = merge_counts.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, n);
}

static __always_inline int merge_trylock(struct merge_slot *s)
{
    return __sync_val_compare_and_swap(&s->lock, 0, 1) == 0;
}

static __always_inline int merge_lock(struct merge_slot *s)
{
    for (int i = 0; i < MERGE_SPIN; i++)
        if (merge_trylock(s))
            return 1;
    merge_count(1, 1);
    return 0;
}

static __always_inline void merge_unlock(struct merge_slot *s)
{
    __sync_lock_test_and_set(&s->lock, 0);   /* an exchange: a full barrier */
}

/* Send what the slot holds (its lock held). */
static __always_inline void merge_send(struct merge_slot *s)
{
    if (!s->rec.h.len)
        return;
    send_data(1, &s->rec);
    s->rec.h.len = 0;
    merge_count(0, s->reads);
    s->reads = 0;
}

static __always_inline struct merge_slot *merge_slot_of(u32 sess)
{
    u32 i = sess % MERGE_SLOTS;
    return merge_slots.lookup(&i);
}

/* Before a record of session `sess` that must follow its output so far.
 * The slot is looked at under its lock only: a reader may be filling it. */
static __always_inline void merge_flush(u32 sess)
{
    struct merge_slot *s = merge_slot_of(sess);
    if (!s || !merge_lock(s))
        return;
    if (s->sess == sess)
        merge_send(s);
    merge_unlock(s);
}

/* The daemon is about to drain the rings.  A slot whose reader holds it
 * right now waits for the next drain (no wait here: 64 slots of MERGE_SPIN
 * tries pass the verifier's limit on one program's jumps); its bytes stay in
 * order with their session's, since every record of the session first
 * empties the slot. */
static __always_inline void merge_flush_all(void)
{
    for (int i = 0; i < MERGE_SLOTS; i++) {
        u32 k = i;             /* the counter stays in a register the verifier follows */
        struct merge_slot *s = merge_slots.lookup(&k);
        if (!s || !s->rec.h.len || !merge_trylock(s))
            continue;
        merge_send(s);
        merge_unlock(s);
    }
}

/* A pty read of `total` bytes by sshd: into the session's slot, or out on
 * its own (after what the slot holds) when it is large or the slot is busy. */
static __always_inline void tty_out(u32 tgid, u32 sess, s32 fd, const u8 *src, u64 total)
{
    struct merge_slot *s = merge_slot_of(sess);
    if (!s || !merge_lock(s)) {
        emit_data(1, REC_TTY_OUT, tgid, sess, fd, src, total);
        return;
    }
    u32 len = s->rec.h.len;
    if (len && s->sess != sess) {          /* another session's bytes */
        merge_unlock(s);
        emit_data(1, REC_TTY_OUT, tgid, sess, fd, src, total);
        return;
    }
    u64 now = bpf_ktime_get_ns();
    if (len && (s->rec.fd != fd || len + total > MERGE_CAP ||
                now - s->rec.h.ts > MERGE_SPAN_NS)) {
        merge_send(s);
        len = 0;
    }
    if (total > MERGE_CAP) {               /* sent under the lock: in order */
        emit_data(1, REC_TTY_OUT, tgid, sess, fd, src, total);
    } else {
        if (!len) {
            s->sess = sess;
            s->rec.h.type = REC_TTY_OUT;
            s->rec.h.pid = tgid;
            s->rec.h.sess = sess;
            s->rec.h.ts = now;
            s->rec.fd = fd;
        }
        u32 n = total;
        asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(len) : "i"(MERGE_CAP));
        asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(n) : "i"(MERGE_CAP));
        bpf_probe_read_user(s->rec.data + len, n, src);
        s->rec.h.len = len + n;
        s->reads++;
    }
    merge_unlock(s);
}

static __always_inline void emit_u32(u32 type, u32 tgid, u32 sess, u32 value, u32 fd)
{
    struct rec_u32 *r = ctl_reserve(sizeof(*r));
    if (!r) {
        count_drop(0);
        return;
    }
    fill_hdr(&r->h, type, tgid, sess);
    r->value = value;
    r->fd = fd;
    ctl.ringbuf_submit(r, 0);
}

static __always_inline int starts_with_sshd(const char *s)
{
    return s[0] == 's' && s[1] == 's' && s[2] == 'h' && s[3] == 'd';
}

/* ---- connections ---- */

static __always_inline int accept_enter(void *sockaddr)
{
    char comm[16];
    bpf_get_current_comm(comm, sizeof(comm));
    if (!starts_with_sshd(comm) || !sockaddr)
        return 0;
    stash_put(ST_ACCEPT, (u64)sockaddr, 0, 0);
    return 0;
}

static __always_inline int accept_exit(long ret)
{
    struct stash s = {};
    if (!stash_take(ST_ACCEPT, &s) || ret < 0)
        return 0;
    u32 tgid = current_tgid();
    struct peer p = {};
    u8 raw[24] = {};
    bpf_probe_read_user(raw, sizeof(raw), (void *)s.ptr);
    p.family = raw[0] | (raw[1] << 8);
    p.port = (raw[2] << 8) | raw[3];
    if (p.family == AF_INET)
        __builtin_memcpy(p.addr, raw + 4, 4);
    else if (p.family == AF_INET6)
        __builtin_memcpy(p.addr, raw + 8, 16);
    else
        return 0;
    peers.update(&tgid, &p);
    struct proc *pr = tracked.lookup(&tgid);
    if (!pr) {
        struct proc np = {.sess = 0, .flags = F_LISTENER | F_SSHD, .status = -1};
        tracked.update(&tgid, &np);
    } else {
        pr->flags |= F_LISTENER;
    }
    return 0;
}

/* Our end of a connection is not in accept()'s result, and a short session's
 * sockets are gone before the daemon could read them from /proc: a passive
 * TCP open reaching ESTABLISHED (before accept() can return it) leaves its
 * local address under the client's, for the connection record.  Other
 * services' connections age out of the LRU. */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->newstate != TCP_ESTABLISHED || args->oldstate != TCP_SYN_RECV
        || args->protocol != PROTO_TCP)
        return 0;
    struct peer client = {.family = args->family, .port = args->dport};
    struct peer server = {.family = args->family, .port = args->sport};
    if (args->family == AF_INET) {
        __builtin_memcpy(client.addr, args->daddr, 4);
        __builtin_memcpy(server.addr, args->saddr, 4);
    } else if (args->family == AF_INET6) {
        __builtin_memcpy(client.addr, args->daddr_v6, 16);
        __builtin_memcpy(server.addr, args->saddr_v6, 16);
    } else {
        return 0;
    }
    servers.update(&client, &server);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter(args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter(args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }

/* ---- process tree ---- */

/* The clone flags, read at sched_process_fork from the parent's saved user
 * registers (x86_64 pt_regs: orig_ax at 120, di at 112): clone() passes them
 * in di, clone3() the address of its clone_args, whose first u64 they are
 * (the kernel has just copied it, so it is resident).  No entry program on
 * clone and no stash: fork(), vfork() and the kernel's own (io_uring) threads
 * read as 0, a new process, as before. */
#define NR_CLONE 56
#define NR_CLONE3 435
static __always_inline u64 clone_flags(void)
{
    u64 regs = user_regs(), nr = 0, arg0 = 0, flags = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), (void *)(regs + 120));
    bpf_probe_read_kernel(&arg0, sizeof(arg0), (void *)(regs + 112));
    if (nr == NR_CLONE)
        return arg0;
    if (nr == NR_CLONE3)
        bpf_probe_read_user(&flags, sizeof(flags), (void *)arg0);
    return flags;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent;
    struct proc *pp = current_proc(&parent);
    if (!pp)
        return 0;
    if (clone_flags() & CLONE_THREAD)
        return 0;              /* a thread: its tgid is tracked already */
    u32 child = args->child_pid;
    struct proc c = {.ppid = parent, .status = -1};
    if (pp->flags & F_LISTENER) {
        c.sess = child;
        c.flags = F_SSHD | F_MONITOR;
        tracked.update(&child, &c);
        struct rec_connect *r = ctl_reserve(sizeof(*r));
        if (!r) {
            count_drop(0);
            return 0;
        }
        __builtin_memset(r, 0, sizeof(*r));   /* no peer seen: no addresses */
        fill_hdr(&r->h, REC_CONNECT, child, child);
        r->listener = parent;
        struct peer *p = peers.lookup(&parent);
        if (p) {
            r->family = p->family;
            r->port = p->port;
            __builtin_memcpy(r->addr, p->addr, 16);
            struct peer *srv = servers.lookup(p);
            if (srv) {
                r->server_port = srv->port;
                __builtin_memcpy(r->server_addr, srv->addr, 16);
                servers.delete(p);
            }
            peers.delete(&parent);
        }
        ctl.ringbuf_submit(r, 0);
        return 0;
    }
    c.sess = pp->sess;
    c.flags = pp->flags & (F_SSHD | F_USER);
    tracked.update(&child, &c);
    return 0;
}

/* Where argv lies on the new process's stack: at sched_process_exec the
 * kernel has just copied the strings there, so they are resident (reading the
 * execve() argument pointers at syscall entry can fault and come back empty).
 * The strings are contiguous from argv[0] up to envp[0]; without an
 * environment (env -i) the last argument is read on its own. */
struct argv_span { u64 argc; u64 a0; u64 alast; u64 total; };
BPF_PERCPU_ARRAY(exec_scratch, struct rec_exec, 1);   /* built here, sent at its size */

static __always_inline void argv_locate(struct argv_span *v)
{
    u64 sp = 0, e0 = 0;
    bpf_probe_read_kernel(&sp, sizeof(sp), (void *)(user_regs() + 152)); /* pt_regs.sp */
    bpf_probe_read_user(&v->argc, sizeof(v->argc), (void *)sp);
    if (v->argc == 0 || v->argc > 0x100000) {
        v->argc = 0;
        return;
    }
    bpf_probe_read_user(&v->a0, sizeof(v->a0), (void *)(sp + 8));
    bpf_probe_read_user(&e0, sizeof(e0), (void *)(sp + 16 + 8 * v->argc));
    v->total = e0 > v->a0 ? e0 - v->a0 : 0;
    if (v->total == 0 || v->total > (1 << 24)) {
        v->total = 0;
        bpf_probe_read_user(&v->alast, sizeof(v->alast), (void *)(sp + 8 * v->argc));
    }
}

/* Copy the argv strings into the record (argv holds ARGV_CAP + LAST_ARG_CAP). */
static __always_inline void argv_copy(struct rec_exec *r, struct argv_span *v)
{
    u64 total = v->total;
    r->truncated = 0;
    r->h.len = 0;
    if (v->argc == 0)
        return;
    if (total == 0) {
        u64 head = v->alast > v->a0 ? v->alast - v->a0 : 0;
        if (head < ARGV_CAP) {
            bpf_probe_read_user(r->argv, head & (ARGV_CAP - 1), (void *)v->a0);
            long n = bpf_probe_read_user_str(r->argv + (head & (ARGV_CAP - 1)), LAST_ARG_CAP,
                                             (void *)v->alast);
            r->h.len = head + (n > 0 ? n : 0);
            r->truncated = n == LAST_ARG_CAP;
            return;
        }
        total = ARGV_CAP + 1;
    }
    if (total > ARGV_CAP) {
        r->truncated = 1;
        total = ARGV_CAP;
    }
    u32 n = total;
    asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(n) : "i"(ARGV_CAP));
    bpf_probe_read_user(r->argv, n, (void *)v->a0);
    r->h.len = n;
}

/* Everything of an exec record but argv. */
static __always_inline void exec_head(struct rec_exec *r, u32 tgid, struct proc *p,
                                      struct argv_span *v, const void *fname)
{
    fill_hdr(&r->h, REC_EXEC, tgid, p->sess);
    r->ppid = p->ppid;
    r->uid = bpf_get_current_uid_gid();
    r->argc = v->argc > 0xffff ? 0xffff : v->argc;
    long n = bpf_probe_read_kernel_str(r->fname, FNAME_CAP, fname);
    r->fname_len = n > 0 ? n : 0;
}

/* comm after exec is the image's basename: "sftp-server" or "scp" */
static __always_inline int is_xfer(const char *c)
{
    return (c[0] == 's' && c[1] == 'c' && c[2] == 'p' && c[3] == 0) ||
           (c[0] == 's' && c[1] == 'f' && c[2] == 't' && c[3] == 'p' && c[4] == '-' &&
            c[5] == 's' && c[6] == 'e' && c[7] == 'r' && c[8] == 'v' && c[9] == 'e' &&
            c[10] == 'r' && c[11] == 0);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p)
        return 0;
    char comm[16];
    bpf_get_current_comm(comm, sizeof(comm));
    p->flags &= ~(F_XFER | F_CMD);
    if (starts_with_sshd(comm)) {
        p->flags |= F_SSHD;     /* a verdict taken at fork is revised here */
        return 0;
    }
    p->flags &= ~F_SSHD;
    if (!(p->flags & F_USER))
        return 0;               /* sshd's own helpers (PAM, motd) are not user commands */
    p->flags |= F_CMD;
    if (is_xfer(comm))
        p->flags |= F_XFER;
    p->out_left = STDOUT_CAP;

    merge_flush(p->sess);
    struct argv_span v = {};
    argv_locate(&v);
    const void *fname = (void *)args + (args->data_loc_filename & 0xffff);
    u32 zero = 0;
    struct rec_exec *r = exec_scratch.lookup(&zero);
    if (!r)
        return 0;
    exec_head(r, tgid, p, &v, fname);
    argv_copy(r, &v);
    /* into the ring at its size: most command lines are a few dozen bytes */
    u64 size = __builtin_offsetof(struct rec_exec, argv) + r->h.len;
    asm volatile("if %0 <= %1 goto +1\n\t%0 = %1" : "+r"(size) : "i"(sizeof(*r)));
    if (ring_output(0, r, size))
        count_drop(0);
    return 0;
}

/* An upload's file was closed (or its process ended): report its bytes. */
static __always_inline void emit_upload_close(u32 tgid, u32 sess, s32 fd, u64 bytes)
{
    struct rec_upload_close *r = ctl_reserve(sizeof(*r));
    if (!r) {
        count_drop(0);
        return;
    }
    fill_hdr(&r->h, REC_UPLOAD_CLOSE, tgid, sess);
    r->fd = fd;
    r->pad = 0;
    r->bytes = bytes;
    ctl.ringbuf_submit(r, 0);
}

static __always_inline void forget_fds(u32 tgid, struct proc *p)
{
    /* The exit of a process closes its fds without close() calls.  A bounded
     * loop (kernel >= 5.3), not unrolled: 64 copies would bloat the program. */
    for (int fd = 0; fd < 64; fd++) {
        if (!(p->fds_marked & FD_BIT(fd)))
            continue;
        struct fd_key k = {.tgid = tgid, .fd = fd};
        struct fd_val *v = fds.lookup(&k);
        if (!v)
            continue;
        if (v->kind == FD_UPLOAD)
            emit_upload_close(tgid, p->sess, fd, v->bytes);
        fds.delete(&k);
    }
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct proc *p = tracked.lookup(&tgid);
    if (!p)
        return 0;
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != tgid)
        return 0;
#endif
    if (p->flags & (F_SSHD | F_XFER))
        forget_fds(tgid, p);
#if CAPTURE_INPUT
    termios_forget(tgid);
#endif
    if (p->flags & (F_CMD | F_MONITOR | F_XFER))
        merge_flush(p->sess);  /* the output read so far goes before the end */
    if (p->flags & F_MONITOR)
        tty_session_end(tgid);
    if (p->flags & (F_CMD | F_MONITOR | F_XFER)) {
        struct rec_exit *r = ctl_reserve(sizeof(*r));
        if (r) {
            fill_hdr(&r->h, REC_EXIT, tgid, p->sess);
#ifdef OFF_EXIT_CODE
            int code = -1;
            struct task_struct *task = (struct task_struct *)bpf_get_current_task();
            bpf_probe_read_kernel(&code, sizeof(code), (void *)task + OFF_EXIT_CODE);
            r->status = code;
#else
            r->status = p->status;
#endif
            r->flags = p->flags;
            ctl.ringbuf_submit(r, 0);
        } else {
            count_drop(0);
        }
    }
    tracked.delete(&tgid);
    return 0;
}

#ifndef OFF_EXIT_CODE
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (p)
        p->status = (args->error_code & 0xff) << 8;
    return 0;
}
#endif

/* ---- identity ---- */

TRACEPOINT_PROBE(syscalls, sys_enter_setresuid)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !(p->flags & F_SSHD))
        return 0;
    if (args->ruid != args->euid || args->euid != args->suid || (int)args->ruid == -1)
        return 0;              /* temporary switches (authorized_keys reads) */
    p->flags |= F_USER;
    emit_u32(REC_SETUID, tgid, p->sess, args->ruid, 0);
    return 0;
}

/* ---- pty masters: opened by the monitor, used by the post-auth sshd ---- */

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    if (args->ret != 0)
        return 0;              /* only settings that took effect */
    u32 tgid;
    struct proc *p = current_proc(&tgid);
#if CAPTURE_INPUT
    if (!p || !(p->flags & (F_SSHD | F_USER)))
        return 0;
#else
    if (!p || !(p->flags & F_SSHD))
        return 0;              /* a shell's own ioctls (a dozen per command) stop here */
#endif
    struct sys_args a;         /* fd, cmd, arg */
    syscall_args(&a);
    u32 cmd = a.a1;
#if CAPTURE_INPUT
    if ((p->flags & F_USER) && ((cmd >= TCSETS && cmd <= TCSETSF) ||
                                (cmd >= TCSETS2 && cmd <= TCSETSF2))) {
        termios_set(tgid, p->sess, a.a2);
        return 0;
    }
#endif
    if (!(p->flags & F_SSHD))
        return 0;
    if (cmd == TIOCSWINSZ) {
        /* sshd sets the window size on the master it reads from */
        u16 ws[2] = {};
        bpf_probe_read_user(ws, sizeof(ws), (void *)a.a2);
        fd_mark(p, tgid, a.a0, FD_PTMX);
        merge_flush(p->sess);
        struct rec_winsz *r = ctl_reserve(sizeof(*r));
        if (!r) {
            count_drop(0);
            return 0;
        }
        fill_hdr(&r->h, REC_WINSZ, tgid, p->sess);
        r->rows = ws[0];
        r->cols = ws[1];
        r->fd = a.a0;
        ctl.ringbuf_submit(r, 0);
    } else if (cmd == TIOCGPTN) {
        u32 n = 0;
        bpf_probe_read_user(&n, sizeof(n), (void *)a.a2);
        fd_mark(p, tgid, a.a0, FD_PTMX);
        emit_u32(REC_PTY, tgid, p->sess, n, a.a0);
    }
    return 0;
}

static __always_inline int dup_enter(u32 oldfd, s32 newfd)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !(p->flags & F_SSHD))
        return 0;
    struct fd_val *v = fd_lookup(p, tgid, oldfd);
    if (newfd >= 0) {                    /* dup2/dup3: target known now */
        if (v)
            fd_mark(p, tgid, newfd, v->kind);
        else if (fd_may_be_marked(p, newfd))
            fd_forget(p, tgid, newfd);
    } else if (v) {
        stash_put(ST_DUP, 0, v->kind, oldfd);
    }
    return 0;
}

static __always_inline int dup_exit(long ret)
{
    struct stash s = {};
    u32 tgid;
    if (!stash_take(ST_DUP, &s) || ret < 0)
        return 0;
    struct proc *p = current_proc(&tgid);
    if (p)
        fd_mark(p, tgid, ret, s.arg);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup) { return dup_enter(args->fildes, -1); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup) { return dup_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return dup_enter(args->oldfd, args->newfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return dup_enter(args->oldfd, args->newfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_fcntl)
{
    if (args->cmd != F_DUPFD && args->cmd != F_DUPFD_CLOEXEC)
        return 0;
    return dup_enter(args->fd, -1);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fcntl) { return dup_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !(p->flags & (F_SSHD | F_XFER)))
        return 0;
    struct fd_val *v = fd_lookup(p, tgid, args->fd);
    if (!v)
        return 0;
    if (v->kind == FD_UPLOAD)
        emit_upload_close(tgid, p->sess, args->fd, v->bytes);
    fd_forget(p, tgid, args->fd);
    return 0;
}

/* ---- terminal bytes ---- */

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    if (args->ret <= 0)
        return 0;
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    struct sys_args a;
    if (!p) {
        if (tgid == FLUSH_TGID) {
            syscall_args(&a);
            if (a.a0 == FLUSH_FD)
                merge_flush_all();
        }
        return 0;
    }
    if (!(p->flags & F_SSHD))
        return 0;
    syscall_args(&a);
    if (fd_is_ptmx(p, tgid, a.a0))
        tty_out(tgid, p->sess, a.a0, (const u8 *)a.a1, args->ret);
    return 0;
}

/* Writes: keystrokes into a master, failed-login records into btmp, a
 * command's first output bytes, upload byte counts. */
static __always_inline int on_write(u32 fd, const u8 *buf, u64 count)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p)
        return 0;
    if ((p->flags & F_CMD) && (fd == 1 || fd == 2) && p->out_left > 0) {
        u32 n = count < p->out_left ? count : p->out_left;
        p->out_left -= n;
        emit_data(0, REC_STDOUT, tgid, p->sess, fd, buf, n);
    }
    if (!(p->flags & (F_SSHD | F_XFER)))
        return 0;
    struct fd_val *v = fd_lookup(p, tgid, fd);
    if (!v)
        return 0;
    if (v->kind == FD_UPLOAD)
        __sync_fetch_and_add(&v->bytes, count);
#if CAPTURE_INPUT
    else if (v->kind == FD_PTMX) {
        if (!echo_is_off(p->sess)) {
            merge_flush(p->sess);
            emit_data(1, REC_TTY_IN, tgid, p->sess, fd, buf, count);
        }
    }
#endif
    else if (v->kind == FD_BTMP && count == 384)
        emit_data(0, REC_BTMP, tgid, p->sess, fd, buf, count);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return on_write(args->fd, (const u8 *)args->buf, args->count); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64) { return on_write(args->fd, (const u8 *)args->buf, args->count); }

/* ---- failed logins: sshd's NETLINK_AUDIT messages ---- */

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (p && (p->flags & F_SSHD) && args->family == AF_NETLINK && args->protocol == NETLINK_AUDIT)
        stash_put(ST_SOCKET, 0, 0, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    struct stash s = {};
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !stash_take(ST_SOCKET, &s))
        return 0;
    if (args->ret >= 0)
        fd_mark(p, tgid, args->ret, FD_AUDIT);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !(p->flags & F_SSHD))
        return 0;
    struct fd_val *v = fd_lookup(p, tgid, args->fd);
    if (v && v->kind == FD_AUDIT)
        emit_data(0, REC_AUDIT, tgid, p->sess, args->fd, args->buff,
                  args->len > 1024 ? 1024 : args->len);
    return 0;
}

/* ---- opens: pty masters, btmp, uploads (paths read at exit: resident) ---- */

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    if (args->ret < 0)
        return 0;
    u32 tgid;
    struct proc *p = current_proc(&tgid);
    if (!p || !(p->flags & (F_SSHD | F_XFER)))
        return 0;
    struct sys_args a;         /* dirfd, filename, flags; mode in r10 */
    syscall_args(&a);
    s32 fd = args->ret;
    if ((p->flags & F_XFER) && (a.a2 & 3)) {
        u64 mode = 0;
        bpf_probe_read_kernel(&mode, sizeof(mode), (void *)(user_regs() + 56));
        fd_mark(p, tgid, fd, FD_UPLOAD);
        struct rec_upload_open *r = ctl_reserve(sizeof(*r));
        if (!r) {
            count_drop(0);
            return 0;
        }
        fill_hdr(&r->h, REC_UPLOAD_OPEN, tgid, p->sess);
        r->fd = fd;
        r->flags = a.a2;
        r->mode = mode;
        r->pad = 0;
        long n = bpf_probe_read_user_str(r->path, PATH_CAP, (void *)a.a1);
        r->h.len = n > 0 ? n : 0;
        ctl.ringbuf_submit(r, 0);
        return 0;
    }
    if (!(p->flags & F_SSHD))
        return 0;
    char path[16] = {};
    bpf_probe_read_user_str(path, sizeof(path), (void *)a.a1);
    if (path[0] == '/' && path[1] == 'd' && path[2] == 'e' && path[3] == 'v' && path[4] == '/' &&
        path[5] == 'p' && path[6] == 't' && path[7] == 'm' && path[8] == 'x' && path[9] == 0)
        fd_mark(p, tgid, fd, FD_PTMX);
    else if (path[0] == '/' && path[1] == 'v' && path[2] == 'a' && path[3] == 'r' && path[4] == '/' &&
             path[5] == 'l' && path[6] == 'o' && path[7] == 'g' && path[8] == '/' && path[9] == 'b' &&
             path[10] == 't' && path[11] == 'm' && path[12] == 'p' && path[13] == 0)
        fd_mark(p, tgid, fd, FD_BTMP);
    return 0;
}
