/*
 * The guest agent: managers/agent/PROTOCOL.md over a virtio-serial port, vsock, or (the
 * standalone build) a Unix socket.  One thread and one poll() loop; every descriptor is
 * non-blocking and every buffer bounded, so nothing the host sends can stop it: a bad
 * request gets ERROR, a bad frame sends the channel looking for the next HELLO.
 *
 * In the guest the init forks it once the program runs and restarts it should it die.
 * It never writes to the console, which is the program's output.
 *
 * Flow control, as the protocol counts it: a session may send DATA_OUT/STDERR while its
 * out_credit lasts, and the host may send DATA_IN while in_window lasts.  On top of that
 * the channel's output queue is bounded: session output is read only while the queue
 * is below DATA_WATER, and frames from the host are handled only while it is below
 * INPUT_WATER, so what can be queued is bounded by what one round adds; OUTQ_MAX sits
 * far above that and, reached anyway, costs the channel rather than memory.
 *
 * MOUNT and UMOUNT run in forked helpers, one at a time per mount point (see "mounts"
 * below); the standalone build keeps a table in memory instead and never mounts anything.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#ifndef AGENT_STANDALONE
#include <sys/mount.h>
#endif
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#include "agent.h"
#include "agent_proto.h"
#include "common.h"
#include "tar.h"

#define MAX_CHANNELS 16
#define DATA_WATER (256u << 10)
#define INPUT_WATER (512u << 10)
#define OUTQ_MAX (2u << 20)
/* An idle queue bigger than this gives its memory back. */
#define OUTQ_KEEP (256u << 10)
#define INBUF_SIZE (2 * AGENT_FRAME_MAX)
/* A session's unwritten stdin: at most the window, plus the two VEOF bytes of a TTY's end. */
#define STDIN_MAX (AGENT_WINDOW + 2)
#define EXIT_GRACE_MS 250
#define TRANSPORT_WAIT_MS 10000
#define RETRY_MS 100
/* A port that just lost its host is looked at every HUP_FAST_RETRY_MS for HUP_FAST_MS, then
 * every RETRY_MS: a host that reconnects at once (after a restore) is noticed within
 * milliseconds, and one that stays away costs ten wake-ups a second. */
#define HUP_FAST_RETRY_MS 2
#define HUP_FAST_MS 300
#define CREDIT_BATCH (32u << 10)
#define MESSAGE_MAX 512
#define MAX_POLL (2 + MAX_CHANNELS * (1 + AGENT_MAX_SESSIONS * 4))
#define DEFAULT_PORT_NAME "dataplane.agent"
#define DEFAULT_VSOCK_PORT 1024
#define VIRTIO_ID_VSOCK "0x0013"
#define LISTEN_BACKLOG 16
#define PORT_NAME_MAX 255
/* MOUNT: how long a disk that was just hot-plugged may take to show up, looked for every
 * DISK_POLL_MS. */
#define DISK_WAIT_MS 10000
#define DISK_POLL_MS 10
#define DEVICE_MAX 255
/* virtio-blk's serial is at most this long; the guest sees a longer one cut short. */
#define VIRTIO_SERIAL_MAX 20

enum session_kind { SESSION_EXEC = 1, SESSION_WRITE, SESSION_READ, SESSION_ONESHOT, SESSION_MOUNT };

struct session {
    uint64_t serial; /* 0: the slot is free; else unique for the agent's lifetime */
    uint32_t stream;
    enum session_kind kind;
    pid_t pid; /* the program, a directory read's tar child or a mount helper; 0: none */
    int reaped;
    int status;
    int started; /* output may flow: STARTED or STAT_RESULT was sent */
    int report_fd; /* the exec child's failure report (-1 once execve is known to have happened),
                    * or a mount helper's answer */
    int in_fd;     /* the program's stdin (a dup of the pty master with TTY) */
    int out_fd;    /* stdout (a dup of the pty master with TTY), the file or the tar pipe */
    int err_fd;
    /* The pty master itself, kept until the session ends: its last close hangs the
     * terminal up, which would SIGHUP a program that closed its stdio but has not
     * exited yet. */
    int tty_fd;
    /* Host input not yet written: in_len bytes at in_head, of which the last in_local are
     * ours (a TTY's VEOF) and count against no window. */
    unsigned char *in_buf;
    size_t in_head, in_len, in_local, in_cap;
    int in_eof;
    int any_in;
    unsigned char last_in;
    uint32_t in_window;  /* DATA_IN bytes the host may still send */
    uint32_t uncredited; /* consumed, not yet returned with CREDIT */
    uint64_t out_credit; /* DATA_OUT/STDERR bytes we may still send */
    /* After the reaping: how long the outputs have stayed open while we were free to read. */
    long grace_used;
    long grace_mark;
    /* WRITE_FILE: the temporary file, renamed over path at the end. */
    int file_fd;
    char *tmp_path;
    char *path;
    mode_t mode;
    /* MOUNT and UMOUNT: the disk's serial (path is the mount point), and whether the
     * request waits for the mount helper. */
    char *device;
    int unmount;
    int readonly;
    int queued;
};

enum channel_kind { CHANNEL_SOCKET, CHANNEL_PORT };

struct channel {
    uint64_t serial;
    enum channel_kind kind;
    int fd;       /* a port being looked for again: -1 */
    int synced;   /* a HELLO was answered; until then bytes are scanned for one */
    int broken;   /* to be torn down between poll rounds */
    int hung_up;  /* a port with no host: not polled, looked at again at retry_at */
    long hung_up_at;
    long retry_at;
    size_t in_len;
    unsigned char in[INBUF_SIZE];
    unsigned char *out;
    size_t out_head, out_len, out_cap;
    int nsessions;
    struct session sessions[AGENT_MAX_SESSIONS];
};

static struct {
    const struct agent_config *cfg;
    int sigfd;
    int listen_fd;
    long listen_resume_at;
    char port_name[PORT_NAME_MAX + 1];
    long port_deadline;
    struct channel *channels[MAX_CHANNELS];
    uint64_t next_serial;
    int stopping;
    int status;
    char *unix_path;
} agent = {.sigfd = -1, .listen_fd = -1};

enum ref_kind { REF_SIGNAL, REF_LISTEN, REF_CHANNEL, REF_REPORT, REF_STDIN, REF_STDOUT, REF_STDERR };

/* What a pollfd stands for.  Serials, not pointers: handling one event may end a session
 * or a channel that a later event of the same round names. */
struct poll_ref {
    enum ref_kind kind;
    int channel;
    int session;
    uint64_t serial;
};

static struct pollfd pfds[MAX_POLL];
static struct poll_ref refs[MAX_POLL];
static unsigned char scratch[AGENT_MAX_PAYLOAD];

/* Startup trouble is worth a word on a terminal only in the standalone build: in the
 * guest the console belongs to the program. */
static void __attribute__((format(printf, 1, 2))) startup_note(const char *fmt, ...)
{
#ifdef AGENT_STANDALONE
    va_list ap;
    va_start(ap, fmt);
    fputs("agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
#else
    (void)fmt;
#endif
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void set_nonblock(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* -------------------------------------------------------------- output */

static int outq_room(struct channel *ch, size_t n)
{
    if (ch->out_len + n > OUTQ_MAX)
        return -1;
    if (ch->out_head + ch->out_len + n <= ch->out_cap)
        return 0;
    if (ch->out_head > 0) {
        memmove(ch->out, ch->out + ch->out_head, ch->out_len);
        ch->out_head = 0;
        if (ch->out_len + n <= ch->out_cap)
            return 0;
    }
    size_t cap = ch->out_cap ? ch->out_cap : 64u << 10;
    while (cap < ch->out_len + n)
        cap *= 2;
    if (cap > OUTQ_MAX)
        cap = OUTQ_MAX;
    unsigned char *grown = realloc(ch->out, cap);
    if (!grown)
        return -1;
    ch->out = grown;
    ch->out_cap = cap;
    return 0;
}

static void send_frame(struct channel *ch, uint8_t type, uint32_t stream, const void *payload, size_t len)
{
    /* A port without a host takes nothing: what it would carry belongs to sessions that
     * ended with the connection. */
    if (ch->broken || ch->hung_up || ch->fd < 0)
        return;
    if (outq_room(ch, AGENT_HEADER_SIZE + len) < 0) {
        ch->broken = 1;
        return;
    }
    unsigned char *p = ch->out + ch->out_head + ch->out_len;
    agent_header_encode(p, type, stream, (uint32_t)len);
    if (len)
        memcpy(p + AGENT_HEADER_SIZE, payload, len);
    ch->out_len += AGENT_HEADER_SIZE + len;
}

static void send_records(struct channel *ch, uint8_t type, uint32_t stream, const struct agent_writer *w)
{
    send_frame(ch, type, stream, w->buf, w->len);
}

static void send_u32(struct channel *ch, uint8_t type, uint32_t stream, uint8_t tag, uint32_t value)
{
    unsigned char buf[16];
    struct agent_writer w = {buf, sizeof buf, 0, 0};
    agent_put_u32_record(&w, tag, value);
    send_records(ch, type, stream, &w);
}

static void send_error_v(struct channel *ch, uint32_t stream, int err, const char *fmt, va_list ap)
{
    char msg[MESSAGE_MAX];
    vsnprintf(msg, sizeof msg, fmt, ap);
    unsigned char buf[MESSAGE_MAX + 32];
    struct agent_writer w = {buf, sizeof buf, 0, 0};
    agent_put_u32_record(&w, AGENT_TAG_ERRNO, (uint32_t)err);
    agent_put_text_record(&w, AGENT_TAG_MESSAGE, msg);
    send_records(ch, AGENT_ERROR, stream, &w);
}

static void __attribute__((format(printf, 4, 5))) send_error(struct channel *ch, uint32_t stream, int err,
                                                             const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    send_error_v(ch, stream, err, fmt, ap);
    va_end(ap);
}

/* -------------------------------------------------------------- sessions */

static struct session *session_find(struct channel *ch, uint32_t stream)
{
    for (int i = 0; i < AGENT_MAX_SESSIONS; i++)
        if (ch->sessions[i].serial && ch->sessions[i].stream == stream)
            return &ch->sessions[i];
    return NULL;
}

/* Releases what the session holds; a file still being written is removed. */
static void session_free(struct channel *ch, struct session *s)
{
    close_fd(&s->report_fd);
    close_fd(&s->in_fd);
    close_fd(&s->out_fd);
    close_fd(&s->err_fd);
    close_fd(&s->tty_fd);
    close_fd(&s->file_fd);
    if (s->tmp_path)
        unlink(s->tmp_path);
    free(s->tmp_path);
    free(s->path);
    free(s->device);
    free(s->in_buf);
    memset(s, 0, sizeof *s);
    ch->nsessions--;
}

/* CLOSE: whatever the session started dies with it. */
static void session_kill(struct channel *ch, struct session *s)
{
    if (s->pid > 0) {
        /* The group outlives a reaped leader while anything it started runs; the leader
         * itself is signalled only while unreaped, when its pid cannot have been reused. */
        if (s->kind == SESSION_EXEC)
            kill(-s->pid, SIGKILL);
        if (!s->reaped)
            kill(s->pid, SIGKILL);
    }
    session_free(ch, s);
}

static void __attribute__((format(printf, 4, 5))) session_fail(struct channel *ch, struct session *s, int err,
                                                               const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    send_error_v(ch, s->stream, err, fmt, ap);
    va_end(ap);
    session_kill(ch, s);
}

static void channel_reset(struct channel *ch)
{
    for (int i = 0; i < AGENT_MAX_SESSIONS; i++)
        if (ch->sessions[i].serial)
            session_kill(ch, &ch->sessions[i]);
}

static struct session *session_open(struct channel *ch, uint32_t stream, enum session_kind kind)
{
    struct session *old = session_find(ch, stream);
    if (old) {
        /* The host believes the stream free; ending both keeps the two sides agreeing. */
        session_kill(ch, old);
        send_error(ch, stream, EBUSY, "stream %u was in use; that session is ended too", stream);
        return NULL;
    }
    if (ch->nsessions >= AGENT_MAX_SESSIONS) {
        send_error(ch, stream, EAGAIN, "at most %d sessions per channel", AGENT_MAX_SESSIONS);
        return NULL;
    }
    for (int i = 0; i < AGENT_MAX_SESSIONS; i++) {
        struct session *s = &ch->sessions[i];
        if (s->serial)
            continue;
        memset(s, 0, sizeof *s);
        s->serial = ++agent.next_serial;
        s->stream = stream;
        s->kind = kind;
        s->report_fd = s->in_fd = s->out_fd = s->err_fd = s->tty_fd = s->file_fd = -1;
        s->in_window = AGENT_WINDOW;
        s->out_credit = AGENT_WINDOW;
        s->grace_mark = -1;
        ch->nsessions++;
        return s;
    }
    return NULL;
}

static int session_can_send(const struct channel *ch, const struct session *s)
{
    return s->started && s->out_credit > 0 && ch->synced && !ch->broken && !ch->hung_up && ch->fd >= 0 &&
           ch->out_len + AGENT_FRAME_MAX <= DATA_WATER;
}

/* Returns consumed input to the host, in batches while more is waiting to be written. */
static void session_credit(struct channel *ch, struct session *s, size_t n)
{
    s->uncredited += (uint32_t)n;
    if (s->uncredited == 0 || (s->uncredited < CREDIT_BATCH && s->in_len > s->in_local))
        return;
    send_u32(ch, AGENT_CREDIT_OUT, s->stream, AGENT_TAG_CREDIT, s->uncredited);
    s->in_window += s->uncredited;
    s->uncredited = 0;
}

/* ------------------------------------------------------------- requests */

/* A text record as a string; NULL with errno EINVAL if it holds a NUL (no path or argv
 * item can), ENOMEM if out of memory. */
static char *record_text(const unsigned char *value, uint32_t len)
{
    if (memchr(value, '\0', len)) {
        errno = EINVAL;
        return NULL;
    }
    char *s = malloc((size_t)len + 1);
    if (!s) {
        errno = ENOMEM;
        return NULL;
    }
    memcpy(s, value, len);
    s[len] = '\0';
    return s;
}

static int text_error(const char *what, char *err, size_t errsize)
{
    int e = errno;
    snprintf(err, errsize, "%s %s", what, e == EINVAL ? "contains a NUL byte" : "is out of memory");
    return e;
}

/* The records of every request but EXEC; absent ones are zero. */
struct fields {
    const unsigned char *nonce;
    const unsigned char *time;
    const unsigned char *path;
    uint32_t path_len;
    const unsigned char *device;
    uint32_t device_len;
    int has_path, has_version, has_mode, has_signal, has_credit, has_tty, has_device;
    uint32_t version, mode, signal, credit;
    uint8_t readonly;
    struct winsize ws;
};

static int field_size(const struct agent_record *r, uint32_t want, const char *what, char *err, size_t errsize)
{
    if (r->length == want)
        return 0;
    snprintf(err, errsize, "%s record of %u bytes, not %u", what, r->length, want);
    return EINVAL;
}

static int parse_field(struct fields *f, const struct agent_record *r, char *err, size_t errsize)
{
    int e = 0;
    switch (r->tag) {
    case AGENT_TAG_NONCE:
        if (!(e = field_size(r, AGENT_NONCE_SIZE, "NONCE", err, errsize)))
            f->nonce = r->value;
        break;
    case AGENT_TAG_VERSION:
        if (!(e = field_size(r, 4, "VERSION", err, errsize))) {
            f->has_version = 1;
            f->version = agent_get32(r->value);
        }
        break;
    case AGENT_TAG_PATH:
        f->has_path = 1;
        f->path = r->value;
        f->path_len = r->length;
        break;
    case AGENT_TAG_MODE:
        if (!(e = field_size(r, 4, "MODE", err, errsize))) {
            f->has_mode = 1;
            f->mode = agent_get32(r->value);
        }
        break;
    case AGENT_TAG_SIGNAL:
        if (!(e = field_size(r, 4, "SIGNAL", err, errsize))) {
            f->has_signal = 1;
            f->signal = agent_get32(r->value);
        }
        break;
    case AGENT_TAG_CREDIT:
        if (!(e = field_size(r, 4, "CREDIT", err, errsize))) {
            f->has_credit = 1;
            f->credit = agent_get32(r->value);
        }
        break;
    case AGENT_TAG_TIME:
        if (!(e = field_size(r, AGENT_TIME_SIZE, "TIME", err, errsize)))
            f->time = r->value;
        break;
    case AGENT_TAG_TTY:
        if (!(e = field_size(r, AGENT_TTY_SIZE, "TTY", err, errsize))) {
            f->has_tty = 1;
            f->ws.ws_row = agent_get16(r->value);
            f->ws.ws_col = agent_get16(r->value + 2);
        }
        break;
    case AGENT_TAG_DEVICE:
        f->has_device = 1;
        f->device = r->value;
        f->device_len = r->length;
        break;
    case AGENT_TAG_READONLY:
        if (!(e = field_size(r, 1, "READONLY", err, errsize))) {
            f->readonly = r->value[0];
            if (f->readonly > 1) {
                snprintf(err, errsize, "READONLY is %u, not 0 or 1", f->readonly);
                e = EINVAL;
            }
        }
        break;
    default:
        break; /* a later version's field, or one this request does not use */
    }
    return e;
}

/* 0, or EINVAL with err saying what is wrong. */
static int parse_fields(const unsigned char *p, size_t len, struct fields *f, char *err, size_t errsize)
{
    memset(f, 0, sizeof *f);
    size_t off = 0;
    struct agent_record r;
    int more;
    while ((more = agent_record_next(p, len, &off, &r)) > 0) {
        int e = parse_field(f, &r, err, errsize);
        if (e)
            return e;
    }
    if (more < 0) {
        snprintf(err, errsize, "malformed record list");
        return EINVAL;
    }
    return 0;
}

static int fields_path(const struct fields *f, char **out, char *err, size_t errsize)
{
    if (!f->has_path) {
        snprintf(err, errsize, "no PATH record");
        return EINVAL;
    }
    char *path = record_text(f->path, f->path_len);
    if (!path)
        return text_error("PATH", err, errsize);
    if (path[0] != '/') {
        snprintf(err, errsize, "PATH %s is not absolute", path);
        free(path);
        return EINVAL;
    }
    *out = path;
    return 0;
}

/* ------------------------------------------------------------------ exec */

struct exec_request {
    char **argv;
    size_t argc;
    char **env;
    size_t envc;
    char *workdir;
    char *user;
    int tty;
    struct winsize ws;
};

/* The child's ends: stdin, stdout, stderr, and with TTY the terminal (all four the same). */
struct child_fds {
    int in, out, err, tty;
};

static void exec_request_free(struct exec_request *r)
{
    for (size_t i = 0; i < r->argc; i++)
        free(r->argv[i]);
    for (size_t i = 0; i < r->envc; i++)
        free(r->env[i]);
    free(r->argv);
    free(r->env);
    free(r->workdir);
    free(r->user);
    memset(r, 0, sizeof *r);
}

/* An empty WORKDIR or USER says nothing, as an empty one in the instance's config does. */
static int exec_text(char **slot, const struct agent_record *rec, const char *what, char *err, size_t errsize)
{
    free(*slot);
    *slot = NULL;
    if (rec->length == 0)
        return 0;
    if (!(*slot = record_text(rec->value, rec->length)))
        return text_error(what, err, errsize);
    return 0;
}

static int exec_record(struct exec_request *r, const struct agent_record *rec, char *err, size_t errsize)
{
    char *text;
    switch (rec->tag) {
    case AGENT_TAG_ARG:
        if (!(text = record_text(rec->value, rec->length)))
            return text_error("ARG", err, errsize);
        r->argv[r->argc++] = text;
        return 0;
    case AGENT_TAG_ENV:
        if (!(text = record_text(rec->value, rec->length)))
            return text_error("ENV", err, errsize);
        r->env[r->envc++] = text;
        if (text[0] == '=' || !strchr(text, '=')) {
            snprintf(err, errsize, "ENV %s is not NAME=value", text);
            return EINVAL;
        }
        return 0;
    case AGENT_TAG_WORKDIR: {
        int e = exec_text(&r->workdir, rec, "WORKDIR", err, errsize);
        if (!e && r->workdir && r->workdir[0] != '/') {
            snprintf(err, errsize, "WORKDIR %s is not absolute", r->workdir);
            return EINVAL;
        }
        return e;
    }
    case AGENT_TAG_USER:
        return exec_text(&r->user, rec, "USER", err, errsize);
    case AGENT_TAG_TTY:
        if (rec->length != AGENT_TTY_SIZE) {
            snprintf(err, errsize, "TTY record of %u bytes, not %d", rec->length, AGENT_TTY_SIZE);
            return EINVAL;
        }
        r->tty = 1;
        r->ws.ws_row = agent_get16(rec->value);
        r->ws.ws_col = agent_get16(rec->value + 2);
        return 0;
    default:
        return 0;
    }
}

static int exec_request_parse(const unsigned char *p, size_t len, struct exec_request *r, char *err, size_t errsize)
{
    memset(r, 0, sizeof *r);
    size_t off = 0, nargs = 0, nenv = 0;
    struct agent_record rec;
    int more;
    while ((more = agent_record_next(p, len, &off, &rec)) > 0) {
        nargs += rec.tag == AGENT_TAG_ARG;
        nenv += rec.tag == AGENT_TAG_ENV;
    }
    if (more < 0) {
        snprintf(err, errsize, "malformed record list");
        return EINVAL;
    }
    if (nargs == 0) {
        snprintf(err, errsize, "EXEC without an ARG record");
        return EINVAL;
    }
    r->argv = calloc(nargs + 1, sizeof *r->argv);
    r->env = calloc(nenv + 1, sizeof *r->env);
    if (!r->argv || !r->env) {
        snprintf(err, errsize, "out of memory");
        return ENOMEM;
    }
    off = 0;
    while (agent_record_next(p, len, &off, &rec) > 0) {
        int e = exec_record(r, &rec, err, errsize);
        if (e)
            return e;
    }
    return 0;
}

static int same_name(const char *a, const char *b)
{
    size_t la = strcspn(a, "="), lb = strcspn(b, "=");
    return la == lb && memcmp(a, b, la) == 0;
}

static int named_in(char *const *list, size_t n, const char *entry)
{
    for (size_t i = 0; i < n; i++)
        if (same_name(list[i], entry))
            return 1;
    return 0;
}

/* The program's environment overlaid by the request's ENV by name (the last of a name
 * wins), then PATH and HOME when absent, as the init does for the program. */
static char **exec_environment(const struct exec_request *req, const struct identity *id)
{
    char *const *base = agent.cfg->envp;
    size_t nbase = 0;
    while (base && base[nbase])
        nbase++;
    char **env = calloc(nbase + req->envc + 3, sizeof *env);
    if (!env)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < nbase; i++)
        if (!named_in(req->env, req->envc, base[i]))
            env[n++] = base[i];
    for (size_t i = 0; i < req->envc; i++)
        if (!named_in(req->env + i + 1, req->envc - i - 1, req->env[i]))
            env[n++] = req->env[i];
    if (!env_get(env, "PATH"))
        env[n++] = "PATH=" DEFAULT_PATH;
    if (!env_get(env, "HOME")) {
        char *home = malloc(strlen(id->home) + 6);
        if (!home)
            return NULL;
        sprintf(home, "HOME=%s", id->home);
        env[n++] = home;
    }
    env[n] = NULL;
    return env;
}

/* The child says why it could not exec through a close-on-exec pipe: u32 errno, then a
 * message.  Nothing arrives when execve succeeded. */
static void __attribute__((noreturn, format(printf, 3, 4))) child_report(int fd, int err, const char *fmt, ...)
{
    unsigned char buf[4 + MESSAGE_MAX];
    agent_put32(buf, (uint32_t)err);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf((char *)buf + 4, MESSAGE_MAX, fmt, ap);
    va_end(ap);
    write_all(fd, buf, 4 + strlen((char *)buf + 4));
    _exit(127);
}

/* A blocked signal stays blocked across execve and an ignored one stays ignored: a
 * child gets the defaults back. */
static void child_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
}

static void child_stdio(int report, const struct child_fds *c)
{
    if (setsid() < 0)
        child_report(report, errno, "setsid: %s", strerror(errno));
    if (c->tty >= 0 && ioctl(c->tty, TIOCSCTTY, 0) < 0)
        child_report(report, errno, "controlling terminal: %s", strerror(errno));
    if (dup2(c->in, STDIN_FILENO) < 0 || dup2(c->out, STDOUT_FILENO) < 0 || dup2(c->err, STDERR_FILENO) < 0)
        child_report(report, errno, "dup2: %s", strerror(errno));
    /* The agent's own descriptors are close-on-exec already; this covers any it inherited. */
    close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
}

static void __attribute__((noreturn)) exec_child(const struct exec_request *req, int report, const struct child_fds *c)
{
    child_signals();
    child_stdio(report, c);
    char err[MESSAGE_MAX];
    struct identity id;
    if (resolve_identity(req->user ? req->user : agent.cfg->user, &id, err, sizeof err) < 0)
        child_report(report, EINVAL, "%s", err);
    char **env = exec_environment(req, &id);
    if (!env)
        child_report(report, ENOMEM, "environment: out of memory");
    if (c->tty >= 0 && fchown(STDIN_FILENO, id.uid, (gid_t)-1) < 0) {
        /* Not fatal: the program has the terminal open whoever owns its node. */
    }
    if (setgroups((size_t)id.ngroups, id.groups) < 0 || setgid(id.gid) < 0 || setuid(id.uid) < 0) {
        int e = errno;
        child_report(report, e, "switch to %u:%u: %s", (unsigned)id.uid, (unsigned)id.gid, strerror(e));
    }
    const char *workdir = req->workdir ? req->workdir : agent.cfg->workdir;
    if (!workdir || !*workdir)
        workdir = "/";
    if (chdir(workdir) < 0) {
        int e = errno;
        child_report(report, e, "workdir %s: %s", workdir, strerror(e));
    }
    char path[4096];
    if (find_program(req->argv[0], env_get(env, "PATH"), path, sizeof path) < 0)
        child_report(report, ENOENT, "%s: not found", req->argv[0]);
    execve(path, req->argv, env);
    int e = errno;
    child_report(report, e, "%s: %s", path, strerror(e));
}

static int exec_open_pipes(struct session *s, struct child_fds *c)
{
    int p[3][2];
    for (int i = 0; i < 3; i++) {
        if (pipe2(p[i], O_CLOEXEC) < 0) {
            int e = errno;
            for (int j = 0; j < i; j++) {
                close(p[j][0]);
                close(p[j][1]);
            }
            return e;
        }
    }
    c->in = p[0][0];
    s->in_fd = p[0][1];
    s->out_fd = p[1][0];
    c->out = p[1][1];
    s->err_fd = p[2][0];
    c->err = p[2][1];
    c->tty = -1;
    /* Only our ends: a program handed a non-blocking stdout would fail its writes. */
    set_nonblock(s->in_fd);
    set_nonblock(s->out_fd);
    set_nonblock(s->err_fd);
    return 0;
}

static int open_master(void)
{
    int fd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    /* /dev/ptmx may be missing where devpts is mounted with newinstance only. */
    if (fd < 0)
        fd = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    return fd;
}

static int exec_open_pty(struct session *s, const struct winsize *ws, struct child_fds *c)
{
    char name[128];
    int master = open_master();
    if (master < 0)
        return errno;
    int e = grantpt(master) < 0 || unlockpt(master) < 0 ? errno : ptsname_r(master, name, sizeof name);
    int slave = e ? -1 : open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (!e && slave < 0)
        e = errno;
    int in = e ? -1 : fcntl(master, F_DUPFD_CLOEXEC, 3);
    int out = e || in < 0 ? -1 : fcntl(master, F_DUPFD_CLOEXEC, 3);
    if (!e && out < 0)
        e = errno;
    if (e) {
        close(master);
        if (slave >= 0)
            close(slave);
        if (in >= 0)
            close(in);
        return e;
    }
    ioctl(slave, TIOCSWINSZ, ws);
    set_nonblock(master); /* and its dups: they share the open file */
    s->tty_fd = master;
    s->out_fd = out;
    s->in_fd = in;
    c->in = c->out = c->err = c->tty = slave;
    return 0;
}

static void close_child_fds(const struct child_fds *c)
{
    close(c->in);
    if (c->out != c->in)
        close(c->out);
    if (c->err != c->in && c->err != c->out)
        close(c->err);
}

static void exec_start(struct channel *ch, struct session *s, const unsigned char *p, size_t len)
{
    struct exec_request req;
    char err[MESSAGE_MAX];
    int e = exec_request_parse(p, len, &req, err, sizeof err);
    if (e) {
        exec_request_free(&req);
        session_fail(ch, s, e, "%s", err);
        return;
    }
    struct child_fds c;
    e = req.tty ? exec_open_pty(s, &req.ws, &c) : exec_open_pipes(s, &c);
    if (e) {
        const char *what = req.tty ? "pseudo-terminal" : "pipes";
        exec_request_free(&req);
        session_fail(ch, s, e, "%s: %s", what, strerror(e));
        return;
    }
    int report[2];
    pid_t pid = -1;
    if (pipe2(report, O_CLOEXEC) == 0) {
        pid = fork();
        if (pid == 0)
            exec_child(&req, report[1], &c);
        e = errno;
        close(report[1]);
        if (pid < 0)
            close(report[0]);
    } else {
        e = errno;
    }
    close_child_fds(&c);
    exec_request_free(&req);
    if (pid < 0) {
        session_fail(ch, s, e, "starting the program: %s", strerror(e));
        return;
    }
    s->pid = pid;
    s->report_fd = report[0];
    set_nonblock(report[0]);
}

static void exec_send_exit(struct channel *ch, struct session *s)
{
    if (WIFEXITED(s->status))
        send_u32(ch, AGENT_EXIT, s->stream, AGENT_TAG_EXIT_CODE, (uint32_t)WEXITSTATUS(s->status));
    else
        send_u32(ch, AGENT_EXIT, s->stream, AGENT_TAG_EXIT_SIGNAL, (uint32_t)WTERMSIG(s->status));
    session_free(ch, s);
}

static void read_finish(struct channel *ch, struct session *s)
{
    if (s->pid > 0 && !(WIFEXITED(s->status) && WEXITSTATUS(s->status) == 0)) {
        if (WIFEXITED(s->status))
            session_fail(ch, s, WEXITSTATUS(s->status), "archiving %s: %s", s->path,
                         strerror(WEXITSTATUS(s->status)));
        else
            session_fail(ch, s, EIO, "archiving %s: killed by signal %d", s->path, WTERMSIG(s->status));
        return;
    }
    send_frame(ch, AGENT_DONE, s->stream, NULL, 0);
    session_free(ch, s);
}

/* Ends an exec or read session whose work is complete. */
static void session_progress(struct channel *ch, struct session *s)
{
    if (s->kind == SESSION_EXEC && s->report_fd < 0 && s->reaped && s->out_fd < 0 && s->err_fd < 0)
        exec_send_exit(ch, s);
    else if (s->kind == SESSION_READ && s->out_fd < 0 && (s->pid == 0 || s->reaped))
        read_finish(ch, s);
}

static void exec_report(struct channel *ch, struct session *s)
{
    /* The reaping may have read it earlier in the same round. */
    if (s->report_fd < 0)
        return;
    unsigned char buf[4 + MESSAGE_MAX];
    ssize_t n = read(s->report_fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    close_fd(&s->report_fd);
    if (n >= 4) {
        session_fail(ch, s, (int)agent_get32(buf), "%.*s", (int)(n - 4), (const char *)buf + 4);
        return;
    }
    s->started = 1;
    send_u32(ch, AGENT_STARTED, s->stream, AGENT_TAG_PID, (uint32_t)s->pid);
    session_progress(ch, s);
}

/* Output of the program or the file, as far as credit and the queue allow. */
static void session_read_output(struct channel *ch, struct session *s, int *fd, uint8_t type)
{
    if (*fd < 0 || !session_can_send(ch, s))
        return;
    size_t want = s->out_credit < sizeof scratch ? (size_t)s->out_credit : sizeof scratch;
    ssize_t n = read(*fd, scratch, want);
    if (n > 0) {
        send_frame(ch, type, s->stream, scratch, (size_t)n);
        s->out_credit -= (uint64_t)n;
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n < 0 && s->kind == SESSION_READ && s->pid == 0) {
        int e = errno;
        session_fail(ch, s, e, "reading %s: %s", s->path, strerror(e));
        return;
    }
    /* End of file; a pseudo-terminal says EIO once nothing holds its other side. */
    close_fd(fd);
    session_progress(ch, s);
}

static void input_consumed(struct channel *ch, struct session *s, size_t n)
{
    size_t host = s->in_len - s->in_local;
    size_t from_host = n < host ? n : host;
    s->in_head += n;
    s->in_len -= n;
    s->in_local -= n - from_host;
    if (s->in_len == 0)
        s->in_head = 0;
    session_credit(ch, s, from_host);
}

/* The program stopped reading its stdin: what the host sends for it is dropped, and
 * credited, so that the host is never left waiting for room. */
static void input_broken(struct channel *ch, struct session *s)
{
    size_t host = s->in_len - s->in_local;
    s->in_head = s->in_len = s->in_local = 0;
    close_fd(&s->in_fd);
    s->in_eof = 1;
    session_credit(ch, s, host);
}

static void session_write_input(struct channel *ch, struct session *s)
{
    while (s->in_len > 0 && s->in_fd >= 0) {
        ssize_t n = write(s->in_fd, s->in_buf + s->in_head, s->in_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            input_broken(ch, s);
            return;
        }
        input_consumed(ch, s, (size_t)n);
    }
    if (s->in_len == 0 && s->in_eof)
        close_fd(&s->in_fd);
}

static int input_room(struct session *s, size_t n)
{
    if (s->in_head + s->in_len + n <= s->in_cap)
        return 0;
    if (s->in_head) {
        memmove(s->in_buf, s->in_buf + s->in_head, s->in_len);
        s->in_head = 0;
        if (s->in_len + n <= s->in_cap)
            return 0;
    }
    size_t cap = s->in_cap ? s->in_cap : 16u << 10;
    while (cap < s->in_len + n)
        cap *= 2;
    if (cap > STDIN_MAX)
        cap = STDIN_MAX;
    if (cap < s->in_len + n)
        return -1;
    unsigned char *grown = realloc(s->in_buf, cap);
    if (!grown)
        return -1;
    s->in_buf = grown;
    s->in_cap = cap;
    return 0;
}

static void input_append(struct session *s, const unsigned char *p, size_t n, int local)
{
    memcpy(s->in_buf + s->in_head + s->in_len, p, n);
    s->in_len += n;
    if (local)
        s->in_local += n;
}

/* A terminal has no end of input to close: it is VEOF, which in canonical mode ends
 * input only at the start of a line, so a partial line gets a first one to send it. */
static size_t tty_eof_bytes(const struct session *s, unsigned char out[2])
{
    struct termios t;
    unsigned char eof = 4;
    int canonical = 1;
    if (tcgetattr(s->in_fd, &t) == 0) {
        if (t.c_cc[VEOF])
            eof = t.c_cc[VEOF];
        canonical = (t.c_lflag & ICANON) != 0;
    }
    size_t n = 0;
    if (canonical && s->any_in && s->last_in != '\n')
        out[n++] = eof;
    out[n++] = eof;
    return n;
}

static void exec_input(struct channel *ch, struct session *s, const unsigned char *p, size_t n)
{
    if (n == 0) {
        if (s->in_eof)
            return;
        s->in_eof = 1;
        unsigned char eof[2];
        size_t k = s->tty_fd >= 0 && s->in_fd >= 0 ? tty_eof_bytes(s, eof) : 0;
        if (k && input_room(s, k) == 0)
            input_append(s, eof, k, 1);
        session_write_input(ch, s);
        return;
    }
    if (s->in_eof || s->in_fd < 0) {
        session_credit(ch, s, n); /* nobody reads it any more */
        return;
    }
    if (input_room(s, n) < 0) {
        session_fail(ch, s, ENOMEM, "no memory for %zu bytes of input", n);
        return;
    }
    input_append(s, p, n, 0);
    s->any_in = 1;
    s->last_in = p[n - 1];
    session_write_input(ch, s);
}

static void exec_signal(struct channel *ch, struct session *s, const struct fields *f)
{
    if (!f->has_signal || f->signal == 0 || f->signal >= (uint32_t)NSIG) {
        session_fail(ch, s, EINVAL, "SIGNAL needs a signal number from 1 to %d", NSIG - 1);
        return;
    }
    if (s->kind != SESSION_EXEC || s->pid <= 0)
        return;
    kill(-s->pid, (int)f->signal);
    /* Until the child's setsid there is no group: reach the child itself. */
    if (!s->reaped)
        kill(s->pid, (int)f->signal);
}

static void exec_resize(struct channel *ch, struct session *s, const struct fields *f)
{
    if (!f->has_tty) {
        session_fail(ch, s, EINVAL, "RESIZE without a TTY record");
        return;
    }
    if (s->tty_fd >= 0)
        ioctl(s->tty_fd, TIOCSWINSZ, &f->ws);
}

/* After the reaping, outputs still open (something the program started holds them) get
 * EXIT_GRACE_MS more.  Time the host's credit or a full queue holds us back does not
 * count: what the program wrote before it exited reaches the host however slowly it
 * reads.  Returns how long until the grace ends, or -1. */
static long session_grace(struct channel *ch, struct session *s, long now)
{
    if (s->kind != SESSION_EXEC || !s->reaped || s->report_fd >= 0 || (s->out_fd < 0 && s->err_fd < 0))
        return -1;
    if (s->grace_mark >= 0)
        s->grace_used += now - s->grace_mark;
    s->grace_mark = session_can_send(ch, s) ? now : -1;
    if (s->grace_used >= EXIT_GRACE_MS) {
        exec_send_exit(ch, s);
        return -1;
    }
    return s->grace_mark < 0 ? -1 : EXIT_GRACE_MS - s->grace_used;
}

/* ----------------------------------------------------------------- files */

static uint8_t file_type(mode_t mode)
{
    if (S_ISREG(mode))
        return AGENT_FILE_REGULAR;
    if (S_ISDIR(mode))
        return AGENT_FILE_DIRECTORY;
    if (S_ISLNK(mode))
        return AGENT_FILE_SYMLINK;
    if (S_ISCHR(mode))
        return AGENT_FILE_CHAR;
    if (S_ISBLK(mode))
        return AGENT_FILE_BLOCK;
    if (S_ISFIFO(mode))
        return AGENT_FILE_FIFO;
    return AGENT_FILE_SOCKET;
}

static void put_stat(struct agent_writer *w, const struct stat *st)
{
    struct agent_stat a = {
        .type = file_type(st->st_mode),
        .mode = st->st_mode & 07777,
        .uid = st->st_uid,
        .gid = st->st_gid,
        .size = st->st_size > 0 ? (uint64_t)st->st_size : 0,
        .mtime_sec = st->st_mtim.tv_sec,
        .mtime_nsec = (uint32_t)st->st_mtim.tv_nsec,
    };
    agent_put_stat_record(w, &a);
}

/* The request's records and its PATH, or the session answered with ERROR and -1. */
static int path_request(struct channel *ch, struct session *s, const unsigned char *p, size_t len,
                        struct fields *f)
{
    char err[MESSAGE_MAX];
    int e = parse_fields(p, len, f, err, sizeof err);
    if (!e)
        e = fields_path(f, &s->path, err, sizeof err);
    if (e) {
        session_fail(ch, s, e, "%s", err);
        return -1;
    }
    return 0;
}

static char *temp_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t dir = (size_t)(slash - path);
    static const char suffix[] = "/.dataplane-write-XXXXXX";
    char *tmp = malloc(dir + sizeof suffix);
    if (tmp)
        snprintf(tmp, dir + sizeof suffix, "%.*s%s", (int)dir, path, suffix);
    return tmp;
}

static void write_start(struct channel *ch, struct session *s, const unsigned char *p, size_t len)
{
    struct fields f;
    int e = 0;
    if (path_request(ch, s, p, len, &f) < 0)
        return;
    s->mode = f.has_mode ? (mode_t)(f.mode & 07777) : 0644;
    char *tmp = temp_name(s->path);
    if (!tmp) {
        session_fail(ch, s, ENOMEM, "out of memory");
        return;
    }
    s->file_fd = mkostemp(tmp, O_CLOEXEC);
    if (s->file_fd < 0) {
        e = errno;
        free(tmp);
        session_fail(ch, s, e, "creating a file beside %s: %s", s->path, strerror(e));
        return;
    }
    s->tmp_path = tmp;
}

static void write_finish(struct channel *ch, struct session *s)
{
    int fd = s->file_fd;
    s->file_fd = -1;
    if (fchmod(fd, s->mode) < 0 || fsync(fd) < 0) {
        int e = errno;
        close(fd);
        session_fail(ch, s, e, "writing %s: %s", s->path, strerror(e));
        return;
    }
    if (close(fd) < 0 || rename(s->tmp_path, s->path) < 0) {
        int e = errno;
        session_fail(ch, s, e, "writing %s: %s", s->path, strerror(e));
        return;
    }
    free(s->tmp_path);
    s->tmp_path = NULL;
    send_frame(ch, AGENT_DONE, s->stream, NULL, 0);
    session_free(ch, s);
}

static void write_input(struct channel *ch, struct session *s, const unsigned char *p, size_t n)
{
    if (s->file_fd < 0)
        return;
    if (n == 0) {
        write_finish(ch, s);
        return;
    }
    if (write_all(s->file_fd, p, n) < 0) {
        int e = errno;
        session_fail(ch, s, e, "writing %s: %s", s->path, strerror(e));
        return;
    }
    session_credit(ch, s, n);
}

static void __attribute__((noreturn)) tar_child(int dirfd, int out)
{
    child_signals();
    /* The archive goes to stdout and the tree comes in as stdin; nothing else of the
     * agent's may stay open here, or a program's pipe would never see its end. */
    if (dup2(out, STDOUT_FILENO) < 0 || dup2(dirfd, STDIN_FILENO) < 0)
        _exit(errno);
    close_fds_from(3);
    _exit(tar_tree(STDIN_FILENO, STDOUT_FILENO));
}

static int read_start_tar(struct session *s, int dirfd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return errno;
    pid_t pid = fork();
    if (pid == 0)
        tar_child(dirfd, p[1]);
    int e = errno;
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        return e;
    }
    set_nonblock(p[0]);
    s->out_fd = p[0];
    s->pid = pid;
    return 0;
}

static void read_start(struct channel *ch, struct session *s, const unsigned char *p, size_t len)
{
    struct fields f;
    int e = 0;
    if (path_request(ch, s, p, len, &f) < 0)
        return;
    /* Looked at before opening: opening a device or a fifo may block or have effects. */
    struct stat st;
    if (stat(s->path, &st) < 0) {
        e = errno;
        session_fail(ch, s, e, "%s: %s", s->path, strerror(e));
        return;
    }
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
        session_fail(ch, s, EINVAL, "%s is not a regular file or a directory", s->path);
        return;
    }
    int fd = open(s->path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    e = fd < 0 || fstat(fd, &st) < 0 ? errno : 0;
    if (!e && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode))
        e = EINVAL; /* swapped since the stat */
    if (e) {
        if (fd >= 0)
            close(fd);
        session_fail(ch, s, e, "%s: %s", s->path, strerror(e));
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        e = read_start_tar(s, fd);
        close(fd);
        if (e) {
            session_fail(ch, s, e, "archiving %s: %s", s->path, strerror(e));
            return;
        }
    } else {
        s->out_fd = fd;
    }
    unsigned char buf[64];
    struct agent_writer w = {buf, sizeof buf, 0, 0};
    put_stat(&w, &st);
    send_records(ch, AGENT_STAT_RESULT, s->stream, &w);
    s->started = 1;
}

static void stat_run(struct channel *ch, struct session *s, const unsigned char *p, size_t len)
{
    struct fields f;
    int e = 0;
    if (path_request(ch, s, p, len, &f) < 0)
        return;
    struct stat st;
    if (lstat(s->path, &st) < 0) {
        e = errno;
        session_fail(ch, s, e, "%s: %s", s->path, strerror(e));
        return;
    }
    unsigned char buf[2 * AGENT_RECORD_HEADER + AGENT_STAT_SIZE + PATH_MAX];
    struct agent_writer w = {buf, sizeof buf, 0, 0};
    put_stat(&w, &st);
    if (S_ISLNK(st.st_mode)) {
        char target[PATH_MAX];
        ssize_t n = readlink(s->path, target, sizeof target);
        if (n < 0 || (size_t)n >= sizeof target) {
            e = n < 0 ? errno : ENAMETOOLONG;
            session_fail(ch, s, e, "%s: %s", s->path, strerror(e));
            return;
        }
        agent_put_record(&w, AGENT_TAG_LINK, target, (size_t)n);
    }
    send_records(ch, AGENT_STAT_RESULT, s->stream, &w);
    session_free(ch, s);
}

static void set_time_run(struct channel *ch, struct session *s, const unsigned char *p, size_t len)
{
    struct fields f;
    char err[MESSAGE_MAX];
    int e = parse_fields(p, len, &f, err, sizeof err);
    if (e || !f.time) {
        session_fail(ch, s, EINVAL, "%s", e ? err : "SET_TIME without a TIME record");
        return;
    }
    uint64_t sec = agent_get64(f.time);
    uint32_t nsec = agent_get32(f.time + 8);
    if (nsec >= 1000000000u || sec > (uint64_t)INT64_MAX) {
        session_fail(ch, s, EINVAL, "TIME %llu.%09u is out of range", (unsigned long long)sec, nsec);
        return;
    }
#ifdef AGENT_STANDALONE
    /* The standalone agent is the Cloud Hypervisor simulator's stand-in guest: it runs on
     * the host, whose clock is not the guest's to set. */
#else
    struct timespec ts = {(time_t)sec, (long)nsec};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
        e = errno;
        session_fail(ch, s, e, "setting the clock: %s", strerror(e));
        return;
    }
#endif
    send_frame(ch, AGENT_DONE, s->stream, NULL, 0);
    session_free(ch, s);
}

/* ---------------------------------------------------------------- mounts */

static int path_under(const char *path, const char *dir)
{
    size_t n = strlen(dir);
    return strncmp(path, dir, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* 0 if `path` may be a mount point: not / and outside /proc, /sys and /dev; else EINVAL
 * with err saying why. */
static int mount_point_allowed(const char *path, const char *as, char *err, size_t errsize)
{
    static const char *const kernel_dirs[] = {"/proc", "/sys", "/dev"};
    if (strcmp(path, "/") == 0) {
        snprintf(err, errsize, "PATH %s%s is the root; it cannot be a mount point", as, path);
        return EINVAL;
    }
    for (size_t i = 0; i < sizeof kernel_dirs / sizeof *kernel_dirs; i++) {
        if (path_under(path, kernel_dirs[i])) {
            snprintf(err, errsize, "PATH %s%s is under %s", as, path, kernel_dirs[i]);
            return EINVAL;
        }
    }
    return 0;
}

/* MOUNT's and UMOUNT's PATH, checked and spelt one way: absolute, no `..` component,
 * then with `.` components and repeated or trailing slashes dropped, not / and outside
 * /proc, /sys and /dev.  0, or EINVAL (ENAMETOOLONG) with err saying why. */
static int mount_target(const char *path, char **out, char *err, size_t errsize)
{
    size_t len = strlen(path);
    if (path[0] != '/') {
        snprintf(err, errsize, "PATH %s is not absolute", path);
        return EINVAL;
    }
    if (len >= PATH_MAX) {
        snprintf(err, errsize, "PATH of %zu bytes is too long", len);
        return ENAMETOOLONG;
    }
    char *norm = malloc(len + 2);
    if (!norm) {
        snprintf(err, errsize, "out of memory");
        return ENOMEM;
    }
    size_t n = 0;
    for (const char *p = path; *p;) {
        while (*p == '/')
            p++;
        size_t part = strcspn(p, "/");
        if (part == 2 && p[0] == '.' && p[1] == '.') {
            snprintf(err, errsize, "PATH %s has a .. component", path);
            free(norm);
            return EINVAL;
        }
        if (part > 0 && !(part == 1 && p[0] == '.')) {
            norm[n++] = '/';
            memcpy(norm + n, p, part);
            n += part;
        }
        p += part;
    }
    if (n == 0)
        norm[n++] = '/';
    norm[n] = '\0';
    int e = mount_point_allowed(norm, "", err, errsize);
    if (e) {
        free(norm);
        return e;
    }
    *out = norm;
    return 0;
}

/* The records of a MOUNT or UMOUNT into the session; 0, or an errno with err. */
static int mount_request(struct session *s, const unsigned char *p, size_t len, char *err, size_t errsize)
{
    struct fields f;
    int e = parse_fields(p, len, &f, err, errsize);
    if (e)
        return e;
    if (!f.has_device || f.device_len == 0) {
        snprintf(err, errsize, "no DEVICE record");
        return EINVAL;
    }
    if (f.device_len > DEVICE_MAX) {
        snprintf(err, errsize, "DEVICE of %u bytes is too long", f.device_len);
        return EINVAL;
    }
    if (!(s->device = record_text(f.device, f.device_len)))
        return text_error("DEVICE", err, errsize);
    char *path = NULL;
    e = fields_path(&f, &path, err, errsize);
    if (!e)
        e = mount_target(path, &s->path, err, errsize);
    free(path);
    s->readonly = f.readonly;
    return e;
}

#ifdef AGENT_STANDALONE
/* The standalone agent stands in for a guest on the host, whose mounts are not its to
 * change: it never mounts anything.  MOUNT and UMOUNT keep a table of (disk, path) in
 * memory instead, shared by every channel as a guest's mounts are, and answer as a guest
 * does: the same disk already at the path is DONE, another disk there is EBUSY; UMOUNT
 * of a path where the disk is not is DONE. */
#define MOUNT_TABLE_MAX 256

static struct {
    char *device;
    char *path;
} mount_table[MOUNT_TABLE_MAX];
static int mount_count;

static void mount_run(struct channel *ch, struct session *s)
{
    int i = 0;
    while (i < mount_count && strcmp(mount_table[i].path, s->path) != 0)
        i++;
    int same = i < mount_count && strcmp(mount_table[i].device, s->device) == 0;
    if (!s->unmount && i < mount_count && !same) {
        session_fail(ch, s, EBUSY, "%s is already a mount point (of disk %s)", s->path, mount_table[i].device);
        return;
    }
    if (!s->unmount && i == mount_count) {
        if (mount_count == MOUNT_TABLE_MAX) {
            session_fail(ch, s, ENOMEM, "at most %d mounts", MOUNT_TABLE_MAX);
            return;
        }
        mount_table[mount_count].device = s->device;
        mount_table[mount_count].path = s->path;
        mount_count++;
        s->device = s->path = NULL; /* the table's now */
    }
    if (s->unmount && same) {
        free(mount_table[i].device);
        free(mount_table[i].path);
        mount_table[i] = mount_table[--mount_count];
    }
    send_frame(ch, AGENT_DONE, s->stream, NULL, 0);
    session_free(ch, s);
}
#else
/* In the guest, MOUNT and UMOUNT run in a forked helper: waiting for a hot-plugged disk,
 * replaying a journal and syncing may each take seconds, and the loop goes on serving
 * every other session meanwhile.  The helper shares the agent's root and mount namespace,
 * which are the program's (nothing here or in the init unshares), so what it mounts the
 * program sees.  It answers on a pipe with u32 errno (0: done) and a message.
 *
 * Requests on one mount point run one at a time, in the order they came, so that two
 * never race (a MOUNT and its retry would both find the path free); a helper counts until
 * it is reaped, since one killed by CLOSE may still be inside mount(2).  Requests on other
 * paths run alongside, so a disk that never shows up delays nobody else. */
#define MOUNT_HELPERS_MAX 16

static struct {
    pid_t pid; /* 0: a free slot */
    char *path;
} mount_helpers[MOUNT_HELPERS_MAX];

static int make_dirs(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, mode) < 0 && errno != EEXIST)
            return -1;
        buf[i] = saved;
    }
    return 0;
}

/* The disk whose virtio serial is `serial`, as the init finds its disks: its /dev node in
 * devpath (made if devtmpfs has not yet) and its number; 0, or -1 while there is none. */
static int disk_by_serial(const char *serial, char *devpath, size_t size, dev_t *number)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        return -1;
    int found = -1;
    struct dirent *e;
    while (found < 0 && (e = readdir(d))) {
        char path[512], value[DEVICE_MAX + 2];
        unsigned major_no, minor_no;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        if (read_small_file(path, value, sizeof value) < 0 || strcmp(value, serial) != 0)
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/dev", e->d_name);
        if (read_small_file(path, value, sizeof value) < 0 || sscanf(value, "%u:%u", &major_no, &minor_no) != 2)
            continue;
        snprintf(devpath, size, "/dev/%s", e->d_name);
        *number = makedev(major_no, minor_no);
        if (access(devpath, F_OK) < 0)
            mknod(devpath, S_IFBLK | 0600, *number);
        found = 0;
    }
    closedir(d);
    return found;
}

/* "ext4" (the ext4 driver mounts ext2 and ext3 too) or "erofs" by the superblock's
 * magic, or NULL (errno 0: neither). */
static const char *disk_filesystem(const char *dev)
{
    unsigned char sb[2048];
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    ssize_t n = pread(fd, sb, sizeof sb, 0);
    int e = n < 0 ? errno : 0;
    close(fd);
    errno = e;
    if (n < (ssize_t)sizeof sb)
        return NULL;
    if (agent_get32(sb + 1024) == 0xE0F5E1E2u)
        return "erofs";
    if (agent_get16(sb + 1080) == 0xEF53)
        return "ext4";
    return NULL;
}

/* In the mount table's escaping, a space, tab, newline or backslash is \ooo. */
static void unescape_mount_path(char *s)
{
    char *out = s;
    for (char *p = s; *p; p++) {
        if (p[0] == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' && p[3] >= '0' &&
            p[3] <= '7') {
            *out++ = (char)((p[1] - '0') << 6 | (p[2] - '0') << 3 | (p[3] - '0'));
            p += 3;
        } else {
            *out++ = *p;
        }
    }
    *out = '\0';
}

/* 1 if `path` (resolved) is a mount point, with the number of what is mounted on top in
 * *number; 0 if it is not; -1 with errno when the mount table cannot be read. */
static int mounted_at(const char *path, dev_t *number)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (getline(&line, &cap, f) > 0) {
        /* "id parent major:minor root mount-point options..."; later lines are mounted later. */
        unsigned major_no, minor_no;
        int at = 0;
        if (sscanf(line, "%*u %*u %u:%u %*s %n", &major_no, &minor_no, &at) != 2 || at == 0)
            continue;
        char *point = line + at;
        point[strcspn(point, " \n")] = '\0';
        unescape_mount_path(point);
        if (strcmp(point, path) != 0)
            continue;
        found = 1;
        *number = makedev(major_no, minor_no);
    }
    free(line);
    fclose(f);
    return found;
}

/* The real path of an existing mount point, checked again: a symlink may lead anywhere.
 * 0, or an errno with msg. */
static int resolve_target(const char *target, char *resolved, char *msg, size_t size)
{
    if (!realpath(target, resolved)) {
        int e = errno;
        snprintf(msg, size, "%s: %s", target, strerror(e));
        return e;
    }
    if (strcmp(resolved, target) == 0)
        return 0;
    char as[PATH_MAX + 32];
    snprintf(as, sizeof as, "%s resolves to ", target);
    return mount_point_allowed(resolved, as, msg, size);
}

static int helper_mount(const char *serial, const char *target, int readonly, char *msg, size_t size)
{
    char dev[300], resolved[PATH_MAX];
    dev_t number, top;
    long deadline = now_ms() + DISK_WAIT_MS;
    while (disk_by_serial(serial, dev, sizeof dev, &number) < 0) {
        if (now_ms() >= deadline) {
            snprintf(msg, size, "no disk with serial %s appeared within %d s%s", serial, DISK_WAIT_MS / 1000,
                     strlen(serial) > VIRTIO_SERIAL_MAX ? " (a virtio serial has at most 20 bytes)" : "");
            return ENODEV;
        }
        sleep_ms(DISK_POLL_MS);
    }
    const char *fs = disk_filesystem(dev);
    if (!fs) {
        int e = errno;
        if (e)
            snprintf(msg, size, "reading %s (disk %s): %s", dev, serial, strerror(e));
        else
            snprintf(msg, size, "no ext4 filesystem on %s (disk %s)", dev, serial);
        return e ? e : EINVAL;
    }
    if (strcmp(fs, "erofs") == 0 && !readonly) {
        snprintf(msg, size, "disk %s holds erofs, which mounts read-only only", serial);
        return EROFS;
    }
    if (make_dirs(target, 0755) < 0) {
        int e = errno;
        snprintf(msg, size, "creating %s: %s", target, strerror(e));
        return e;
    }
    int e = resolve_target(target, resolved, msg, size);
    if (e)
        return e;
    int at = mounted_at(resolved, &top);
    if (at < 0) {
        e = errno;
        snprintf(msg, size, "reading /proc/self/mountinfo: %s", strerror(e));
        return e;
    }
    if (at && top == number)
        return 0; /* mounted already: a retry after a lost answer */
    if (at) {
        snprintf(msg, size, "%s is already a mount point (of device %u:%u)", target, major(top), minor(top));
        return EBUSY;
    }
    /* A read-only ext4 must not try to replay a journal on a read-only disk. */
    int ext4 = strcmp(fs, "ext4") == 0;
    unsigned long flags = MS_NODEV | (readonly ? MS_RDONLY : 0);
    if (mount(dev, resolved, fs, flags, readonly && ext4 ? "noload" : NULL) < 0) {
        e = errno;
        snprintf(msg, size, "mounting %s (disk %s, %s) on %s: %s", dev, serial, fs, target, strerror(e));
        return e;
    }
    return 0;
}

static int helper_umount(const char *serial, const char *target, char *msg, size_t size)
{
    char dev[300], resolved[PATH_MAX];
    dev_t number, top;
    int e = resolve_target(target, resolved, msg, size);
    if (e == ENOENT || e == ENOTDIR)
        return 0; /* no such directory, so nothing mounted there */
    if (e)
        return e;
    int at = mounted_at(resolved, &top);
    if (at < 0) {
        e = errno;
        snprintf(msg, size, "reading /proc/self/mountinfo: %s", strerror(e));
        return e;
    }
    /* Nothing there, or not this disk (or the disk is gone): nothing of ours to unmount. */
    if (!at || disk_by_serial(serial, dev, sizeof dev, &number) < 0 || top != number)
        return 0;
    int fd = open(resolved, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        syncfs(fd);
        close(fd);
    }
    /* Neither MNT_DETACH nor MNT_FORCE: a volume in use is refused, never pulled away. */
    if (umount2(resolved, 0) < 0) {
        e = errno;
        if (e == EBUSY)
            snprintf(msg, size, "files are open under %s", target);
        else
            snprintf(msg, size, "unmounting %s (disk %s): %s", target, serial, strerror(e));
        return e;
    }
    return 0;
}

static void __attribute__((noreturn)) mount_helper(const struct session *s, int report)
{
    /* Nothing of the agent's stays open here but the report: a program's pipe must see
     * its end when the program closes it, however long the disk takes. */
    if (report != 3 && dup2(report, 3) < 0)
        _exit(127);
    close_fds_from(4);
    char msg[MESSAGE_MAX] = "";
    int e = s->unmount ? helper_umount(s->device, s->path, msg, sizeof msg)
                       : helper_mount(s->device, s->path, s->readonly, msg, sizeof msg);
    child_report(3, e, "%s", msg);
}

static int mount_spawn(struct session *s)
{
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0)
        return errno;
    pid_t pid = fork();
    if (pid == 0)
        mount_helper(s, report[1]);
    int e = errno;
    close(report[1]);
    if (pid < 0) {
        close(report[0]);
        return e;
    }
    set_nonblock(report[0]);
    s->queued = 0;
    s->pid = pid;
    s->report_fd = report[0];
    return 0;
}

/* -1: a helper works on `path` (or no slot is free); else a free slot. */
static int mount_slot_for(const char *path)
{
    int free_slot = -1;
    for (int i = 0; i < MOUNT_HELPERS_MAX; i++) {
        if (mount_helpers[i].pid == 0)
            free_slot = free_slot < 0 ? i : free_slot;
        else if (strcmp(mount_helpers[i].path, path) == 0)
            return -1;
    }
    return free_slot;
}

/* Starts every waiting request whose path is free, oldest first. */
static void mount_next(void)
{
    for (;;) {
        struct channel *next_ch = NULL;
        struct session *next = NULL;
        int slot = -1;
        for (int c = 0; c < MAX_CHANNELS; c++) {
            struct channel *ch = agent.channels[c];
            for (int i = 0; ch && i < AGENT_MAX_SESSIONS; i++) {
                struct session *s = &ch->sessions[i];
                if (!s->serial || !s->queued || (next && s->serial > next->serial))
                    continue;
                int free_slot = mount_slot_for(s->path);
                if (free_slot >= 0) {
                    next = s;
                    next_ch = ch;
                    slot = free_slot;
                }
            }
        }
        if (!next)
            return;
        char *path = strdup(next->path);
        int e = path ? mount_spawn(next) : ENOMEM;
        if (e) {
            free(path);
            session_fail(next_ch, next, e, "starting the mount helper: %s", strerror(e));
            continue;
        }
        mount_helpers[slot].pid = next->pid;
        mount_helpers[slot].path = path;
    }
}

static void mount_run(struct channel *ch, struct session *s)
{
    (void)ch;
    s->queued = 1;
    mount_next();
}

/* The helper's answer, once it is there. */
static void mount_report(struct channel *ch, struct session *s)
{
    if (s->report_fd < 0)
        return;
    unsigned char buf[4 + MESSAGE_MAX];
    ssize_t n = read(s->report_fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    close_fd(&s->report_fd);
    const char *what = s->unmount ? "unmounting" : "mounting";
    if (n < 4) {
        session_fail(ch, s, EIO, "%s %s: the helper ended without an answer", what, s->path);
        return;
    }
    int e = (int)agent_get32(buf);
    if (e) {
        session_fail(ch, s, e, "%.*s", (int)(n - 4), (const char *)buf + 4);
        return;
    }
    send_frame(ch, AGENT_DONE, s->stream, NULL, 0);
    session_free(ch, s);
}

/* A reaped helper lets the next request on its path go (see mount_next). */
static void mount_reaped(pid_t pid)
{
    for (int i = 0; i < MOUNT_HELPERS_MAX; i++) {
        if (mount_helpers[i].pid == pid) {
            free(mount_helpers[i].path);
            mount_helpers[i].path = NULL;
            mount_helpers[i].pid = 0;
        }
    }
}
#endif

static void mount_start(struct channel *ch, struct session *s, const unsigned char *p, size_t len, int unmount)
{
    char err[MESSAGE_MAX];
    s->unmount = unmount;
    int e = mount_request(s, p, len, err, sizeof err);
    if (e) {
        session_fail(ch, s, e, "%s", err);
        return;
    }
    mount_run(ch, s);
}

/* --------------------------------------------------------------- frames */

static void start_request(struct channel *ch, const struct agent_header *h, const unsigned char *p)
{
    int mounting = h->type == AGENT_MOUNT || h->type == AGENT_UMOUNT;
    enum session_kind kind = h->type == AGENT_EXEC         ? SESSION_EXEC
                             : h->type == AGENT_WRITE_FILE ? SESSION_WRITE
                             : h->type == AGENT_READ_FILE  ? SESSION_READ
                             : mounting                    ? SESSION_MOUNT
                                                           : SESSION_ONESHOT;
    struct session *s = session_open(ch, h->stream, kind);
    if (!s)
        return;
    switch (h->type) {
    case AGENT_EXEC:
        exec_start(ch, s, p, h->length);
        break;
    case AGENT_WRITE_FILE:
        write_start(ch, s, p, h->length);
        break;
    case AGENT_READ_FILE:
        read_start(ch, s, p, h->length);
        break;
    case AGENT_STAT:
        stat_run(ch, s, p, h->length);
        break;
    case AGENT_MOUNT:
    case AGENT_UMOUNT:
        mount_start(ch, s, p, h->length, h->type == AGENT_UMOUNT);
        break;
    default:
        set_time_run(ch, s, p, h->length);
        break;
    }
}

static void session_input(struct channel *ch, struct session *s, const unsigned char *p, size_t n)
{
    if (s->kind != SESSION_EXEC && s->kind != SESSION_WRITE)
        return;
    if (n > s->in_window) {
        session_fail(ch, s, EPROTO, "%zu bytes of input exceed the %u bytes of window left", n, s->in_window);
        return;
    }
    s->in_window -= (uint32_t)n;
    if (s->kind == SESSION_WRITE)
        write_input(ch, s, p, n);
    else
        exec_input(ch, s, p, n);
}

/* SIGNAL, RESIZE and CREDIT: small requests on a running session. */
static void session_control(struct channel *ch, struct session *s, const struct agent_header *h,
                            const unsigned char *p)
{
    struct fields f;
    char err[MESSAGE_MAX];
    int e = parse_fields(p, h->length, &f, err, sizeof err);
    if (e) {
        session_fail(ch, s, e, "%s", err);
        return;
    }
    if (h->type == AGENT_SIGNAL) {
        exec_signal(ch, s, &f);
    } else if (h->type == AGENT_RESIZE) {
        exec_resize(ch, s, &f);
    } else if (!f.has_credit) {
        session_fail(ch, s, EINVAL, "CREDIT without a CREDIT record");
    } else {
        s->out_credit += f.credit;
        if (s->out_credit > (uint64_t)1 << 40)
            s->out_credit = (uint64_t)1 << 40;
    }
}

static void handle_hello(struct channel *ch, const unsigned char *p, size_t len)
{
    /* A new host, or the same one starting over: nothing of before goes on. */
    channel_reset(ch);
    ch->synced = 0;
    struct fields f;
    char err[MESSAGE_MAX];
    int e = parse_fields(p, len, &f, err, sizeof err);
    if (e || !f.nonce) {
        send_error(ch, 0, EINVAL, "HELLO: %s", e ? err : "no NONCE record");
        return;
    }
    if (!f.has_version || f.version != AGENT_VERSION) {
        send_error(ch, 0, EPROTONOSUPPORT, "protocol version %u is not supported; this agent speaks %d",
                   f.has_version ? f.version : 0, AGENT_VERSION);
        return;
    }
    unsigned char buf[64];
    struct agent_writer w = {buf, sizeof buf, 0, 0};
    agent_put_record(&w, AGENT_TAG_NONCE, f.nonce, AGENT_NONCE_SIZE);
    agent_put_u32_record(&w, AGENT_TAG_VERSION, AGENT_VERSION);
    agent_put_text_record(&w, AGENT_TAG_AGENT, AGENT_BUILD);
    send_records(ch, AGENT_HELLO_OK, 0, &w);
    ch->synced = 1;
}

static void handle_frame(struct channel *ch, const struct agent_header *h, const unsigned char *p)
{
    switch (h->type) {
    case AGENT_HELLO:
        handle_hello(ch, p, h->length);
        return;
    case AGENT_PING:
        send_frame(ch, AGENT_PONG, 0, p, h->length);
        return;
    case AGENT_EXEC:
    case AGENT_WRITE_FILE:
    case AGENT_READ_FILE:
    case AGENT_STAT:
    case AGENT_SET_TIME:
    case AGENT_MOUNT:
    case AGENT_UMOUNT:
        if (h->stream == 0)
            send_error(ch, 0, EINVAL, "message type 0x%02x needs a session's stream, not 0", h->type);
        else
            start_request(ch, h, p);
        return;
    default:
        break;
    }
    struct session *s = h->stream ? session_find(ch, h->stream) : NULL;
    switch (h->type) {
    case AGENT_DATA_IN:
    case AGENT_SIGNAL:
    case AGENT_RESIZE:
    case AGENT_CREDIT:
    case AGENT_CLOSE:
        /* A stream we do not know may have just ended: the frame is ignored. */
        if (!s)
            return;
        if (h->type == AGENT_DATA_IN)
            session_input(ch, s, p, h->length);
        else if (h->type == AGENT_CLOSE)
            session_kill(ch, s);
        else
            session_control(ch, s, h, p);
        return;
    default:
        /* On a running session a later version's message is ignored; a request nobody
         * can answer is refused, so the host does not wait for an answer. */
        if (!s)
            send_error(ch, h->stream, ENOSYS, "unknown message type 0x%02x", h->type);
        return;
    }
}

static int hello_header_at(const unsigned char *p)
{
    struct agent_header h;
    return agent_header_decode(p, &h) == 0 && h.type == AGENT_HELLO && h.stream == 0;
}

/* Unsynchronised: where a HELLO header may start in p[0..len), or len if nowhere. */
static size_t find_hello(const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] != AGENT_MAGIC[0])
            continue;
        size_t left = len - i;
        if (left < AGENT_HEADER_SIZE) {
            if (memcmp(p + i, AGENT_MAGIC, left < 4 ? left : 4) == 0)
                return i; /* maybe one, not complete yet */
            continue;
        }
        if (hello_header_at(p + i))
            return i;
    }
    return len;
}

/* A header that merely looks like HELLO (the tail of an old frame, say) is noise unless
 * its payload holds a nonce. */
static int hello_payload_ok(const unsigned char *p, size_t len)
{
    struct fields f;
    char err[8];
    return parse_fields(p, len, &f, err, sizeof err) == 0 && f.nonce;
}

static void channel_process_input(struct channel *ch)
{
    size_t off = 0;
    while (!ch->broken && !ch->hung_up && ch->fd >= 0 && ch->out_len <= INPUT_WATER) {
        if (!ch->synced)
            off += find_hello(ch->in + off, ch->in_len - off);
        size_t avail = ch->in_len - off;
        if (avail < AGENT_HEADER_SIZE)
            break;
        const unsigned char *p = ch->in + off;
        struct agent_header h;
        if (agent_header_decode(p, &h) < 0) {
            /* A framing error: nothing is to be trusted until the host's next HELLO. */
            channel_reset(ch);
            ch->synced = 0;
            off++;
            continue;
        }
        if (avail < AGENT_HEADER_SIZE + (size_t)h.length)
            break;
        if (!ch->synced && !hello_payload_ok(p + AGENT_HEADER_SIZE, h.length)) {
            off++;
            continue;
        }
        off += AGENT_HEADER_SIZE + (size_t)h.length;
        handle_frame(ch, &h, p + AGENT_HEADER_SIZE);
    }
    if (off > ch->in_len)
        off = ch->in_len;
    memmove(ch->in, ch->in + off, ch->in_len - off);
    ch->in_len -= off;
}

/* ------------------------------------------------------------- channels */

static struct channel *channel_new(int fd, enum channel_kind kind)
{
    for (int i = 0; i < MAX_CHANNELS; i++) {
        if (agent.channels[i])
            continue;
        struct channel *ch = calloc(1, sizeof *ch);
        if (!ch)
            return NULL;
        ch->serial = ++agent.next_serial;
        ch->fd = fd;
        ch->kind = kind;
        agent.channels[i] = ch;
        return ch;
    }
    return NULL;
}

static void channel_free(int index)
{
    struct channel *ch = agent.channels[index];
    channel_reset(ch);
    close_fd(&ch->fd);
    free(ch->out);
    free(ch);
    agent.channels[index] = NULL;
}

static void channel_clear(struct channel *ch)
{
    channel_reset(ch);
    ch->synced = 0;
    ch->in_len = 0;
    ch->out_head = ch->out_len = 0;
}

/* The port reports POLLHUP while no host is connected: whatever was going on ended with
 * the connection.  Polling it now would spin, so it is looked at again on a timer (see
 * HUP_FAST_MS). */
static void port_hang_up(struct channel *ch)
{
    channel_clear(ch);
    ch->hung_up = 1;
    ch->hung_up_at = now_ms();
    ch->retry_at = ch->hung_up_at + HUP_FAST_RETRY_MS;
}

static void port_lost(struct channel *ch)
{
    port_hang_up(ch);
    close_fd(&ch->fd);
    agent.port_deadline = now_ms() + TRANSPORT_WAIT_MS;
}

static void channel_lost(struct channel *ch, int eof)
{
    if (ch->kind == CHANNEL_SOCKET)
        ch->broken = 1;
    else if (eof)
        port_hang_up(ch);
    else
        port_lost(ch);
}

static void channel_flush(struct channel *ch)
{
    while (ch->out_len > 0 && !ch->broken && ch->fd >= 0 && !ch->hung_up) {
        ssize_t n = write(ch->fd, ch->out + ch->out_head, ch->out_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            channel_lost(ch, 0);
            return;
        }
        ch->out_head += (size_t)n;
        ch->out_len -= (size_t)n;
    }
    if (ch->out_len == 0) {
        ch->out_head = 0;
        if (ch->out_cap > OUTQ_KEEP) {
            free(ch->out);
            ch->out = NULL;
            ch->out_cap = 0;
        }
    }
}

static void channel_read(struct channel *ch)
{
    if (ch->in_len >= INBUF_SIZE)
        return;
    ssize_t n = read(ch->fd, ch->in + ch->in_len, INBUF_SIZE - ch->in_len);
    if (n > 0) {
        ch->in_len += (size_t)n;
        channel_process_input(ch);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    channel_lost(ch, n == 0);
}

static void channel_event(struct channel *ch, short revents)
{
    if (ch->kind == CHANNEL_PORT && (revents & POLLHUP)) {
        port_hang_up(ch);
        return;
    }
    if (revents & POLLNVAL) {
        channel_lost(ch, 0);
        return;
    }
    if (revents & POLLOUT)
        channel_flush(ch);
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        if (ch->in_len < INBUF_SIZE)
            channel_read(ch);
        else if (revents & (POLLHUP | POLLERR))
            channel_lost(ch, 1);
    }
}

/* ------------------------------------------------------------ transports */

/* The port whose sysfs name is `name`; -1 while there is none (the module loads late,
 * and the name arrives from the device after the port). */
static int open_port(const char *name)
{
    return open_virtio_port(name, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
}

static int virtio_device_present(const char *id)
{
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d)
        return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        char path[512], value[32];
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        found = read_small_file(path, value, sizeof value) >= 0 && strcmp(value, id) == 0;
    }
    closedir(d);
    return found;
}

static int use_port(const char *name, int fd)
{
    snprintf(agent.port_name, sizeof agent.port_name, "%s", name);
    struct channel *ch = channel_new(fd, CHANNEL_PORT);
    if (!ch) {
        close(fd);
        return -1;
    }
    return 0;
}

static int wait_port(const char *name)
{
    long deadline = now_ms() + TRANSPORT_WAIT_MS;
    for (;;) {
        int fd = open_port(name);
        if (fd >= 0)
            return use_port(name, fd);
        if (now_ms() >= deadline) {
            startup_note("no virtio-serial port named %s", name);
            return -1;
        }
        sleep_ms(RETRY_MS);
    }
}

static int listen_vsock(unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* socket() and bind() fail until the vsock module and its transport are loaded. */
static int wait_vsock(unsigned port)
{
    long deadline = now_ms() + TRANSPORT_WAIT_MS;
    for (;;) {
        agent.listen_fd = listen_vsock(port);
        if (agent.listen_fd >= 0)
            return 0;
        if (now_ms() >= deadline) {
            startup_note("vsock port %u: %s", port, strerror(errno));
            return -1;
        }
        sleep_ms(RETRY_MS);
    }
}

#ifdef AGENT_STANDALONE
static int listen_unix(const char *path)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) {
        startup_note("%s: path too long for a Unix socket", path);
        return -1;
    }
    memcpy(addr.sun_path, path, strlen(path) + 1);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path); /* a previous run's */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
        startup_note("%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    agent.listen_fd = fd;
    agent.unix_path = strdup(path);
    return 0;
}
#endif

/* Until the config disk names one: the port if it shows up, else vsock once its device
 * does (or the wait is over). */
static int open_default_transport(void)
{
    long deadline = now_ms() + TRANSPORT_WAIT_MS;
    for (;;) {
        int fd = open_port(DEFAULT_PORT_NAME);
        if (fd >= 0)
            return use_port(DEFAULT_PORT_NAME, fd);
        if (virtio_device_present(VIRTIO_ID_VSOCK) || now_ms() >= deadline)
            return wait_vsock(DEFAULT_VSOCK_PORT);
        sleep_ms(RETRY_MS);
    }
}

static int parse_port_number(const char *s, unsigned *port)
{
    size_t len = strlen(s);
    if (len == 0 || len > 10 || strspn(s, "0123456789") != len)
        return -1;
    unsigned long long v = strtoull(s, NULL, 10);
    if (v >= VMADDR_PORT_ANY)
        return -1;
    *port = (unsigned)v;
    return 0;
}

static int valid_port_name(const char *name)
{
    size_t len = strlen(name);
    return len > 0 && len <= PORT_NAME_MAX && !strchr(name, '/') && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0;
}

int agent_transport_valid(const char *spec)
{
    unsigned port;
    if (strncmp(spec, "virtio-serial:", 14) == 0)
        return valid_port_name(spec + 14);
    if (strncmp(spec, "vsock:", 6) == 0)
        return parse_port_number(spec + 6, &port) == 0;
#ifdef AGENT_STANDALONE
    if (strncmp(spec, "unix:", 5) == 0)
        return spec[5] != '\0';
#endif
    return 0;
}

static int open_transport(const char *spec)
{
    if (!spec || !*spec)
        return open_default_transport();
    if (!agent_transport_valid(spec)) {
        startup_note("unknown transport %s", spec);
        return -1;
    }
    unsigned port = 0;
    if (strncmp(spec, "virtio-serial:", 14) == 0)
        return wait_port(spec + 14);
#ifdef AGENT_STANDALONE
    if (strncmp(spec, "unix:", 5) == 0)
        return listen_unix(spec + 5);
#endif
    parse_port_number(spec + 6, &port);
    return wait_vsock(port);
}

static void on_accept(void)
{
    for (int i = 0; i < MAX_CHANNELS; i++) {
        int fd = accept4(agent.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                /* Out of descriptors or memory: look again later rather than spin on a
                 * listener that stays readable. */
                agent.listen_resume_at = now_ms() + RETRY_MS;
            return;
        }
        if (!channel_new(fd, CHANNEL_SOCKET))
            close(fd); /* over the limit: the host sees the connection close */
    }
}

/* ----------------------------------------------------------------- loop */

/* A child's report: an exec's failure to start, or a mount helper's answer. */
static void session_report(struct channel *ch, struct session *s)
{
#ifndef AGENT_STANDALONE
    if (s->kind == SESSION_MOUNT) {
        mount_report(ch, s);
        return;
    }
#endif
    exec_report(ch, s);
}

static void reap_children(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
#ifndef AGENT_STANDALONE
        mount_reaped(pid);
#endif
        for (int c = 0; c < MAX_CHANNELS; c++) {
            struct channel *ch = agent.channels[c];
            for (int i = 0; ch && i < AGENT_MAX_SESSIONS; i++) {
                struct session *s = &ch->sessions[i];
                if (!s->serial || s->pid != pid || s->reaped)
                    continue;
                s->reaped = 1;
                s->status = st;
                /* The child is gone, so its report is complete: read it now. */
                if (s->report_fd >= 0)
                    session_report(ch, s);
                else
                    session_progress(ch, s);
            }
        }
    }
#ifndef AGENT_STANDALONE
    mount_next(); /* a helper may have been among them */
#endif
}

static void on_signal(void)
{
    struct signalfd_siginfo info;
    while (read(agent.sigfd, &info, sizeof info) == (ssize_t)sizeof info)
        if (info.ssi_signo == SIGTERM || info.ssi_signo == SIGINT)
            agent.stopping = 1;
    reap_children();
}

static long min_wait(long a, long b)
{
    if (b < 0)
        return a;
    return a < 0 || b < a ? b : a;
}

static long port_check(struct channel *ch, long now)
{
    if (ch->kind != CHANNEL_PORT || (!ch->hung_up && ch->fd >= 0))
        return -1;
    if (now < ch->retry_at)
        return ch->retry_at - now;
    ch->retry_at = now + RETRY_MS;
    if (ch->fd < 0) {
        ch->fd = open_port(agent.port_name);
        if (ch->fd >= 0)
            ch->hung_up = 0; /* the main poll says whether a host is there */
        else if (now >= agent.port_deadline)
            agent.stopping = agent.status = 1;
        return RETRY_MS;
    }
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    if (poll(&p, 1, 0) < 0)
        return RETRY_MS;
    if (p.revents & (POLLERR | POLLNVAL)) {
        port_lost(ch); /* unplugged, say: find it again */
        return RETRY_MS;
    }
    if (!(p.revents & POLLHUP)) {
        ch->hung_up = 0;
        return RETRY_MS;
    }
    long step = now - ch->hung_up_at < HUP_FAST_MS ? HUP_FAST_RETRY_MS : RETRY_MS;
    ch->retry_at = now + step;
    return step;
}

/* Grace periods and ports looked at again; returns the poll timeout. */
static int run_timers(void)
{
    long now = now_ms(), wait = -1;
    for (int c = 0; c < MAX_CHANNELS; c++) {
        struct channel *ch = agent.channels[c];
        if (!ch)
            continue;
        wait = min_wait(wait, port_check(ch, now));
        for (int i = 0; i < AGENT_MAX_SESSIONS; i++)
            if (ch->sessions[i].serial)
                wait = min_wait(wait, session_grace(ch, &ch->sessions[i], now));
    }
    if (agent.listen_fd >= 0 && agent.listen_resume_at > now)
        wait = min_wait(wait, agent.listen_resume_at - now);
    return wait > INT_MAX ? INT_MAX : (int)wait;
}

static void poll_add(nfds_t *n, int fd, short events, enum ref_kind kind, int channel, int session, uint64_t serial)
{
    pfds[*n] = (struct pollfd){.fd = fd, .events = events};
    refs[*n] = (struct poll_ref){.kind = kind, .channel = channel, .session = session, .serial = serial};
    (*n)++;
}

static void poll_add_session(nfds_t *n, const struct channel *ch, int c, int i)
{
    const struct session *s = &ch->sessions[i];
    if (s->report_fd >= 0)
        poll_add(n, s->report_fd, POLLIN, REF_REPORT, c, i, s->serial);
    if (s->in_fd >= 0 && s->in_len > 0)
        poll_add(n, s->in_fd, POLLOUT, REF_STDIN, c, i, s->serial);
    if (!session_can_send(ch, s))
        return;
    if (s->out_fd >= 0)
        poll_add(n, s->out_fd, POLLIN, REF_STDOUT, c, i, s->serial);
    if (s->err_fd >= 0)
        poll_add(n, s->err_fd, POLLIN, REF_STDERR, c, i, s->serial);
}

static nfds_t build_poll(void)
{
    nfds_t n = 0;
    poll_add(&n, agent.sigfd, POLLIN, REF_SIGNAL, -1, -1, 0);
    if (agent.listen_fd >= 0 && agent.listen_resume_at <= now_ms())
        poll_add(&n, agent.listen_fd, POLLIN, REF_LISTEN, -1, -1, 0);
    for (int c = 0; c < MAX_CHANNELS; c++) {
        struct channel *ch = agent.channels[c];
        if (!ch || ch->broken)
            continue;
        if (ch->fd >= 0 && !ch->hung_up) {
            short events = 0;
            if (ch->in_len < INBUF_SIZE && ch->out_len <= INPUT_WATER)
                events |= POLLIN;
            if (ch->out_len)
                events |= POLLOUT;
            poll_add(&n, ch->fd, events, REF_CHANNEL, c, -1, ch->serial);
        }
        for (int i = 0; i < AGENT_MAX_SESSIONS; i++)
            if (ch->sessions[i].serial)
                poll_add_session(&n, ch, c, i);
    }
    return n;
}

static void dispatch_session(const struct poll_ref *r)
{
    struct channel *ch = agent.channels[r->channel];
    if (!ch)
        return;
    struct session *s = &ch->sessions[r->session];
    if (s->serial != r->serial)
        return;
    if (r->kind == REF_REPORT)
        session_report(ch, s);
    else if (r->kind == REF_STDIN)
        session_write_input(ch, s);
    else if (r->kind == REF_STDOUT)
        session_read_output(ch, s, &s->out_fd, AGENT_DATA_OUT);
    else if (r->kind == REF_STDERR)
        session_read_output(ch, s, &s->err_fd, AGENT_STDERR);
}

static void dispatch(nfds_t n)
{
    for (nfds_t i = 0; i < n; i++) {
        short revents = pfds[i].revents;
        const struct poll_ref *r = &refs[i];
        if (!revents)
            continue;
        if (r->kind == REF_SIGNAL) {
            on_signal();
        } else if (r->kind == REF_LISTEN) {
            on_accept();
        } else if (r->kind == REF_CHANNEL) {
            struct channel *ch = agent.channels[r->channel];
            if (ch && ch->serial == r->serial && ch->fd == pfds[i].fd && !ch->broken)
                channel_event(ch, revents);
        } else {
            dispatch_session(r);
        }
    }
}

/* Work that needs no event: frames left waiting for queue room, output to write now
 * rather than after another poll, channels to tear down. */
static void after_round(void)
{
    for (int c = 0; c < MAX_CHANNELS; c++) {
        struct channel *ch = agent.channels[c];
        if (!ch)
            continue;
        channel_process_input(ch);
        channel_flush(ch);
        if (ch->broken)
            channel_free(c);
    }
}

static void agent_shutdown(void)
{
    for (int c = 0; c < MAX_CHANNELS; c++)
        if (agent.channels[c])
            channel_free(c);
    close_fd(&agent.listen_fd);
    close_fd(&agent.sigfd);
    if (agent.unix_path)
        unlink(agent.unix_path);
}

static int setup_signals(void)
{
    /* A closed pipe or channel is an error return, never a death. */
    signal(SIGPIPE, SIG_IGN);
    /* An inherited SIG_IGN would have the kernel reap our children, statuses and all. */
    signal(SIGCHLD, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
#ifdef AGENT_STANDALONE
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
#endif
    if (sigprocmask(SIG_SETMASK, &set, NULL) < 0)
        return -1;
    agent.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return agent.sigfd < 0 ? -1 : 0;
}

/* Children get stdio by dup2 onto 0-2; were one of those free, a pipe could land there. */
static void ensure_stdio(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            continue;
        int null = open("/dev/null", O_RDWR);
        if (null >= 0 && null != fd) {
            dup2(null, fd);
            close(null);
        }
    }
}

int agent_main(const struct agent_config *cfg)
{
    agent.cfg = cfg;
    ensure_stdio();
    if (setup_signals() < 0) {
        startup_note("signals: %s", strerror(errno));
        return 1;
    }
    if (open_transport(cfg->transport) < 0) {
        agent_shutdown();
        return 1;
    }
    while (!agent.stopping) {
        int timeout = run_timers();
        nfds_t n = build_poll();
        int ready = poll(pfds, n, timeout);
        if (ready < 0 && errno != EINTR)
            sleep_ms(RETRY_MS); /* never expected; keeps the loop from spinning */
        if (ready > 0)
            dispatch(n);
        after_round();
    }
    agent_shutdown();
    return agent.status;
}

/* ------------------------------------------------------------ standalone */

#ifdef AGENT_STANDALONE
static void __attribute__((noreturn)) usage(void)
{
    fputs("usage: agent --listen-unix PATH [--user U] [--workdir D] [--env K=V]...\n", stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *path = NULL, *user = NULL, *workdir = NULL;
    char **env = calloc((size_t)argc + 1, sizeof *env);
    size_t nenv = 0;
    if (!env)
        return 1;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--listen-unix") == 0)
            path = argv[++i];
        else if (strcmp(argv[i], "--user") == 0)
            user = argv[++i];
        else if (strcmp(argv[i], "--workdir") == 0)
            workdir = argv[++i];
        else if (strcmp(argv[i], "--env") == 0 && argv[i + 1][0] != '=' && strchr(argv[i + 1], '='))
            env[nenv++] = argv[++i];
        else
            usage();
    }
    if (!path || !*path)
        usage();
    char *transport = malloc(strlen(path) + 6);
    if (!transport)
        return 1;
    sprintf(transport, "unix:%s", path);
    struct agent_config cfg = {.transport = transport, .user = user, .workdir = workdir, .envp = env};
    return agent_main(&cfg);
}
#endif
