/* The long wait of a task executor, compiled so that a running task costs well under 1 MiB.
 *
 * executor.py starts the task, reports its pid and then execve()s this program in its own
 * process:  _supervise <task pid> <exit path> [--logs <dir fd> <max files> <max file size>
 *           <out pipe> <out file> <out index> <out prefix> <err pipe> <err file> <err index>
 *           <err prefix>]
 * execve keeps what the agent and the task rely on: the pid and start time (the agent's
 * identity of the executor), the task as our child, the child-subreaper flag, and the signal
 * mask. The executor blocks the forwarded signals before the handoff, so one that arrives in
 * between stays pending and is forwarded as soon as the handlers below are installed.
 *
 * What it does is executor.py's own loop, unchanged: forward SIGINT, SIGTERM, SIGHUP,
 * SIGQUIT, SIGUSR1 and SIGUSR2 to the task's process group while the task is unreaped; wait
 * for the task, killing its group the moment it exits and reaping any other child; then
 * SIGKILL and reap the leftovers (bounded, 5 s) and write the exit record atomically.
 * Diagnostics go to stderr, which is the task's executor.log. Only libc.
 *
 * With --logs (Nomad's logs { max_files, max_file_size }), the task's stdout and stderr are
 * pipes whose read ends we hold, and we copy them into rotated files in the logs dir, by
 * executor.py's rules (LogLimits there; it also picked each stream's starting index and
 * opened its current file): a file never grows past max file size, what does not fit goes
 * to <prefix>.<index + 1>, and <prefix>.<N - max files> is deleted before N opens. The wait
 * is a poll() over a signalfd for SIGCHLD and (with --logs) the pipes. A failed write
 * (disk full) is said once per stream and its data dropped: the task never waits on the
 * disk for long.
 * Once the task and its leftovers are gone, the pipes are copied up to EOF (bounded, 5 s)
 * before the exit record is written. One buffer of CHUNK bytes is all we hold.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define N_FORWARDED (sizeof(forwarded) / sizeof(forwarded[0]))
#define LEFTOVER_DEADLINE_NS (5LL * 1000000000LL)
#define DRAIN_DEADLINE_NS (5LL * 1000000000LL)
/* What one read takes from a task's pipe; written out before the next read. */
#define CHUNK (16 * 1024)
/* Without a signalfd, how often the wait looks for exited children. */
#define SIGCHLD_POLL_MS 100

/* One captured stream: the pipe from the task and the log file it is copied into. */
struct stream {
    int pipe; /* -1 after EOF */
    int file;
    long long index;
    long long size;
    const char *prefix;
    int complained;
};

static struct {
    int dir;
    long long max_files;
    long long max_file_size;
    size_t n_streams; /* 0 without --logs */
    struct stream streams[2];
} logs = {-1, 0, 0, 0, {{-1, -1, 0, 0, NULL, 0}, {-1, -1, 0, 0, NULL, 0}}};

static char chunk[CHUNK];

static pid_t task_pid;
/* Set with the forwarded signals blocked, so a handler never targets a released pid. */
static volatile sig_atomic_t task_reaped;

static void forward(int signum) {
    int saved = errno;
    if (!task_reaped)
        kill(-task_pid, signum); /* an unreaped task's pid still names its group */
    errno = saved;
}

static void fail(const char *what) {
    fprintf(stderr, "supervise: %s: %s\n", what, strerror(errno));
}

static int forwarded_set(sigset_t *set) {
    if (sigemptyset(set) != 0)
        return -1;
    for (size_t i = 0; i < N_FORWARDED; i++)
        if (sigaddset(set, forwarded[i]) != 0)
            return -1;
    return 0;
}

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0)
        return 0;
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Reap child pid with the forwarded signals blocked, killing the task's group first while
 * its zombie still holds the pid. 0, or -1 when the signal mask cannot be set. */
static int reap(const sigset_t *mask, pid_t child, int *wstatus) {
    if (sigprocmask(SIG_BLOCK, mask, NULL) != 0) {
        fail("sigprocmask");
        return -1;
    }
    if (child == task_pid && kill(-task_pid, SIGKILL) != 0 && errno != ESRCH)
        fail("kill the task's group");
    int status = 0;
    pid_t pid;
    do {
        pid = waitpid(child, &status, 0);
    } while (pid < 0 && errno == EINTR);
    if (pid == task_pid) {
        *wstatus = status;
        task_reaped = 1;
    } else if (pid < 0) {
        fail("waitpid");
    }
    if (sigprocmask(SIG_UNBLOCK, mask, NULL) != 0) {
        fail("sigprocmask");
        return -1;
    }
    return 0;
}

static int log_name(char *name, size_t size, const struct stream *s, long long index) {
    int n = snprintf(name, size, "%s.%lld", s->prefix, index);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* Say once per stream why its output is being dropped; the task goes on regardless. */
static void complain(struct stream *s, const char *what, long long index, const char *why) {
    if (s->complained)
        return;
    s->complained = 1;
    fprintf(stderr, "supervise: %s %s.%lld: %s; dropping the task's output that does not fit\n",
            what, s->prefix, index, why);
}

/* Open a log file for appending as executor.py does: no symlink, FIFO or device, a single
 * link, ours. Its descriptor and size, or -1 with *why set. */
static int open_log(const char *name, long long *size, const char **why) {
    int fd;
    do {
        fd = openat(logs.dir, name,
                    O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC,
                    0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    struct stat st;
    int flags;
    *why = NULL;
    if (fstat(fd, &st) != 0)
        *why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        *why = "not a regular file";
    else if (st.st_nlink != 1)
        *why = "more than one hard link";
    else if (st.st_uid != geteuid())
        *why = "not owned by the agent";
    else if ((flags = fcntl(fd, F_GETFL)) < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
        *why = strerror(errno);
    if (*why != NULL) {
        close(fd);
        return -1;
    }
    *size = (long long)st.st_size;
    return fd;
}

/* Move a stream to its next file, deleting first the one that falls off the end (so that
 * there are never more than max_files). 0 or -1. */
static int rotate(struct stream *s) {
    char name[NAME_MAX + 1];
    long long index = s->index + 1, size = 0, expired = index - logs.max_files;
    if (expired >= 0 && log_name(name, sizeof(name), s, expired) == 0 &&
        unlinkat(logs.dir, name, 0) != 0 && errno != ENOENT)
        complain(s, "cannot delete", expired, strerror(errno));
    const char *why = "name too long";
    int fd = log_name(name, sizeof(name), s, index) == 0 ? open_log(name, &size, &why) : -1;
    if (fd < 0) {
        complain(s, "cannot open", index, why);
        return -1;
    }
    close(s->file);
    s->file = fd;
    s->index = index;
    s->size = size;
    return 0;
}

/* Append data to the stream's files, never one past max_file_size; what cannot be
 * written is dropped. */
static void store(struct stream *s, const char *data, size_t len) {
    while (len > 0) {
        if (s->size >= logs.max_file_size && rotate(s) != 0)
            return;
        long long room = logs.max_file_size - s->size;
        ssize_t n = write(s->file, data, (long long)len < room ? len : (size_t)room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            complain(s, "cannot write", s->index, n < 0 ? strerror(errno) : "nothing written");
            return;
        }
        s->size += n;
        data += n;
        len -= (size_t)n;
    }
}

/* Copy one read's worth from the stream's pipe; the pipe is closed at EOF. */
static void copy_once(struct stream *s) {
    ssize_t n = read(s->pipe, chunk, sizeof(chunk));
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (n <= 0) {
        if (n < 0)
            fail("read the task's output");
        close(s->pipe);
        s->pipe = -1;
        return;
    }
    store(s, chunk, (size_t)n);
}

static size_t open_pipes(void) {
    size_t n = 0;
    for (size_t i = 0; i < logs.n_streams; i++)
        n += logs.streams[i].pipe >= 0;
    return n;
}

/* Wait up to timeout_ms (-1: no limit) for output or, with sigfd >= 0, a SIGCHLD, and copy
 * what came. */
static void pump(int sigfd, int timeout_ms) {
    struct pollfd fds[3];
    struct stream *owners[3];
    nfds_t n = 0;
    if (sigfd >= 0) {
        fds[n] = (struct pollfd){.fd = sigfd, .events = POLLIN};
        owners[n++] = NULL;
    }
    for (size_t i = 0; i < logs.n_streams; i++) {
        if (logs.streams[i].pipe >= 0) {
            fds[n] = (struct pollfd){.fd = logs.streams[i].pipe, .events = POLLIN};
            owners[n++] = &logs.streams[i];
        }
    }
    if (poll(fds, n, timeout_ms) < 0 && errno != EINTR)
        fail("poll");
    for (nfds_t i = 0; i < n; i++) {
        if (owners[i] == NULL) {
            struct signalfd_siginfo info;
            if (fds[i].revents != 0)
                while (read(sigfd, &info, sizeof(info)) > 0)
                    ; /* only a wakeup: waitid says which children exited */
            continue;
        }
        if (fds[i].revents != 0)
            copy_once(owners[i]);
    }
}

/* A descriptor that is readable on SIGCHLD (which stays blocked), or -1: then the wait
 * looks for exited children every SIGCHLD_POLL_MS. */
static int sigchld_fd(void) {
    sigset_t set;
    if (sigemptyset(&set) != 0 || sigaddset(&set, SIGCHLD) != 0 ||
        sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        fail("block SIGCHLD");
        return -1;
    }
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0)
        fail("signalfd");
    return fd;
}

/* Wait for the task (without reaping first, so its group can be killed while its zombie
 * still holds the pid), reaping every other child and copying the task's output on the
 * way. Its wait status, or -1. */
static int wait_task(const sigset_t *mask, int sigfd, int *wstatus) {
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof(info));
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0) {
            if (errno == EINTR)
                continue;
            fail("waitid");
            return -1;
        }
        if (info.si_pid == 0) {
            pump(sigfd, sigfd >= 0 ? -1 : SIGCHLD_POLL_MS);
            continue;
        }
        if (reap(mask, info.si_pid, wstatus) != 0)
            return -1;
        if (task_reaped)
            return 0;
    }
}

/* Copy what the pipes still hold up to EOF, for at most DRAIN_DEADLINE_NS (a leftover that
 * could not be killed may hold a write end). */
static void drain(void) {
    long long deadline = now_ns(CLOCK_MONOTONIC) + DRAIN_DEADLINE_NS;
    while (open_pipes() > 0) {
        long long left = deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0) {
            fprintf(stderr, "supervise: the task's output still open after 5s\n");
            return;
        }
        pump(-1, (int)(left / 1000000LL) + 1);
    }
}

/* SIGKILL the children listed in /proc/self/task/<tid>/children; as a subreaper, every
 * descendant the task left becomes one. Returns how many were signalled, or -1 if the list
 * cannot be read (the executor checked it exists before the handoff). */
static int kill_children(void) {
    char path[64], buf[4096];
    int n = snprintf(path, sizeof(path), "/proc/self/task/%ld/children", (long)getpid());
    if (n < 0 || (size_t)n >= sizeof(path))
        return 0;
    int fd;
    do {
        fd = open(path, O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        fail("open children");
        return -1;
    }
    int killed = 0;
    size_t used = 0;
    for (;;) {
        ssize_t got = read(fd, buf + used, sizeof(buf) - 1 - used);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        used += (size_t)got;
        buf[used] = '\0';
        /* Kill every complete number; keep a partial one for the next read. */
        char *p = buf, *end;
        for (;;) {
            errno = 0;
            long pid = strtol(p, &end, 10);
            if (end == p || *end == '\0' || errno != 0)
                break;
            if (pid > 0 && kill((pid_t)pid, SIGKILL) == 0)
                killed++;
            p = end;
        }
        used = strlen(p);
        memmove(buf, p, used);
        if (used >= sizeof(buf) - 1)
            used = 0; /* cannot be a pid; drop it */
    }
    if (used > 0) {
        buf[used] = '\0';
        long pid = strtol(buf, NULL, 10);
        if (pid > 0 && kill((pid_t)pid, SIGKILL) == 0)
            killed++;
    }
    close(fd);
    return killed;
}

static void kill_leftovers(void) {
    long long deadline = now_ns(CLOCK_MONOTONIC) + LEFTOVER_DEADLINE_NS;
    const struct timespec pause = {0, 20 * 1000000L};
    int can_list = 1;
    while (now_ns(CLOCK_MONOTONIC) < deadline) {
        if (can_list && kill_children() < 0)
            can_list = 0; /* reap what ends on its own; say so once, not every round */
        for (;;) {
            pid_t pid = waitpid(-1, NULL, WNOHANG);
            if (pid > 0 || (pid < 0 && errno == EINTR))
                continue;
            if (pid < 0) {
                if (errno != ECHILD)
                    fail("waitpid leftovers");
                return; /* ECHILD: nothing is left */
            }
            break;
        }
        nanosleep(&pause, NULL);
    }
    fprintf(stderr, "supervise: leftovers still running after 5s\n");
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Write the exit record as executor.py does: a temp file in the same directory, fsync,
 * rename over the exit path, fsync the directory. */
static int write_exit(const char *path, int wstatus) {
    int sig = WIFSIGNALED(wstatus) ? WTERMSIG(wstatus) : 0;
    int code = sig ? 128 + sig : WEXITSTATUS(wstatus);
    long long finished = now_ns(CLOCK_REALTIME);
    char record[256], tmp[4096], dir[4096];
    int n = snprintf(record, sizeof(record),
                     "{\"executor_pid\": %ld, \"task_pid\": %ld, \"exit_code\": %d, "
                     "\"signal\": %d, \"finished_at\": %lld.%06lld}",
                     (long)getpid(), (long)task_pid, code, sig, finished / 1000000000LL,
                     (finished % 1000000000LL) / 1000LL);
    int t = snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof(record) || t < 0 || (size_t)t >= sizeof(tmp)) {
        fprintf(stderr, "supervise: exit path too long\n");
        return -1;
    }
    int fd;
    do {
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        fail("open exit record");
        return -1;
    }
    if (write_all(fd, record, (size_t)n) != 0 || fsync(fd) != 0) {
        fail("write exit record");
        close(fd);
        unlink(tmp);
        return -1;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        fail("rename exit record");
        unlink(tmp);
        return -1;
    }
    strcpy(dir, tmp); /* fits: tmp is longer than the path */
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        strcpy(dir, ".");
    else
        slash[slash == dir ? 1 : 0] = '\0';
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd); /* best effort, as in executor.py */
        close(dfd);
    }
    return 0;
}

static int parse_number(const char *text, long long min, long long *out) {
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min)
        return -1;
    *out = value;
    return 0;
}

static int parse_fd(const char *text, int *fd) {
    long long value;
    if (parse_number(text, 0, &value) != 0 || value > INT_MAX || fcntl((int)value, F_GETFD) < 0)
        return -1;
    *fd = (int)value;
    return 0;
}

static int parse_stream(char **args, struct stream *s) {
    struct stat st;
    const char *prefix = args[3];
    if (parse_fd(args[0], &s->pipe) != 0 || parse_fd(args[1], &s->file) != 0 ||
        parse_number(args[2], 0, &s->index) != 0 || fstat(s->file, &st) != 0)
        return -1;
    if (prefix[0] == '\0' || strchr(prefix, '/') != NULL || strcmp(prefix, ".") == 0 ||
        strcmp(prefix, "..") == 0)
        return -1;
    s->prefix = prefix;
    s->size = (long long)st.st_size;
    return 0;
}

/* --logs <dir fd> <max files> <max file size>, then per stream <pipe> <file> <index>
 * <prefix> (see the top). 0, or -1 if anything is off. */
static int parse_logs(int argc, char **argv) {
    if (argc == 3)
        return 0;
    if (argc != 15 || strcmp(argv[3], "--logs") != 0 || parse_fd(argv[4], &logs.dir) != 0 ||
        parse_number(argv[5], 1, &logs.max_files) != 0 ||
        parse_number(argv[6], 1, &logs.max_file_size) != 0 ||
        parse_stream(argv + 7, &logs.streams[0]) != 0 ||
        parse_stream(argv + 11, &logs.streams[1]) != 0)
        return -1;
    logs.n_streams = 2;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || parse_logs(argc, argv) != 0) {
        fprintf(stderr,
                "usage: %s <task pid> <exit path> [--logs <dir fd> <max files> <max file size>"
                " <out pipe> <out file> <out index> <out prefix> <err pipe> <err file>"
                " <err index> <err prefix>]\n",
                argc > 0 ? argv[0] : "supervise");
        return 2;
    }
    char *end;
    errno = 0;
    long pid = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || pid <= 1 || (pid_t)pid != pid) {
        fprintf(stderr, "supervise: bad task pid %s\n", argv[1]);
        return 2;
    }
    task_pid = (pid_t)pid;

    sigset_t mask;
    if (forwarded_set(&mask) != 0) {
        fail("sigset");
        return 1;
    }
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = forward;
    action.sa_mask = mask; /* one forward at a time */
    for (size_t i = 0; i < N_FORWARDED; i++) {
        if (sigaction(forwarded[i], &action, NULL) != 0) {
            fail("sigaction");
            return 1;
        }
    }
    /* Signals that arrived during the handoff were pending: they are forwarded now. */
    if (sigprocmask(SIG_UNBLOCK, &mask, NULL) != 0) {
        fail("sigprocmask");
        return 1;
    }

    /* A file size limit must fail a log write (EFBIG), not kill us. */
    signal(SIGXFSZ, SIG_IGN);
    int sigfd = sigchld_fd();
    int wstatus = 0;
    if (wait_task(&mask, sigfd, &wstatus) != 0)
        return 1; /* no record: the agent reports "executor died" */
    kill_leftovers();
    drain();
    return write_exit(argv[2], wstatus) == 0 ? 0 : 1;
}
