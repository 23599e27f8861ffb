/* The long wait of a task executor, compiled so that a running task costs well under 1 MiB.
 *
 * executor.py starts the task, reports its pid and then execve()s this program in its own
 * process:  _supervise <task pid> <exit path>
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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define N_FORWARDED (sizeof(forwarded) / sizeof(forwarded[0]))
#define LEFTOVER_DEADLINE_NS (5LL * 1000000000LL)

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

/* Wait for the task (without reaping first, so its group can be killed while its zombie
 * still holds the pid), reaping every other child on the way. Its wait status, or -1. */
static int wait_task(const sigset_t *mask, int *wstatus) {
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof(info));
        if (waitid(P_ALL, 0, &info, WEXITED | WNOWAIT) != 0) {
            if (errno == EINTR)
                continue;
            fail("waitid");
            return -1;
        }
        if (sigprocmask(SIG_BLOCK, mask, NULL) != 0) {
            fail("sigprocmask");
            return -1;
        }
        if (info.si_pid == task_pid && kill(-task_pid, SIGKILL) != 0 && errno != ESRCH)
            fail("kill the task's group");
        int status = 0;
        pid_t pid;
        do {
            pid = waitpid(info.si_pid, &status, 0);
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
        if (task_reaped)
            return 0;
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

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <task pid> <exit path>\n", argc > 0 ? argv[0] : "supervise");
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

    int wstatus = 0;
    if (wait_task(&mask, &wstatus) != 0)
        return 1; /* no record: the agent reports "executor died" */
    kill_leftovers();
    return write_exit(argv[2], wstatus) == 0 ? 0 : 1;
}
