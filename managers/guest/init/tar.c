/*
 * See tar.h.  Runs in a forked child of the agent, writing into a pipe, so its blocking
 * writes and its memory never hold up the agent.  Entries are written in name order so
 * the same tree gives the same archive.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "tar.h"

#define BLOCK 512
/* Names longer than this are left out (and reported); pax could carry them, but every
 * buffer here is bounded. */
#define NAME_LIMIT (32u << 10)
#define LINK_LIMIT 4096
#define MAX_DEPTH 256
#define OUT_BUFFER (64u << 10)
#define PAX_LIMIT (NAME_LIMIT + LINK_LIMIT + 512)
#define PAX_HEADER_NAME "././@PaxHeader"

struct tar {
    int out;
    int write_error;    /* a failed write: nothing more is written */
    int first_error;    /* the first entry left out for a reason other than vanishing */
    size_t out_len;
    size_t name_len;
    unsigned char out_buf[OUT_BUFFER];
    char name[NAME_LIMIT + 2];
    char link[LINK_LIMIT];
    char pax[PAX_LIMIT];
};

static struct tar tar;

static void tar_flush(struct tar *t)
{
    if (t->out_len && !t->write_error && write_all(t->out, t->out_buf, t->out_len) < 0)
        t->write_error = errno ? errno : EIO;
    t->out_len = 0;
}

static void tar_write(struct tar *t, const void *data, size_t len)
{
    const unsigned char *p = data;
    while (len > 0 && !t->write_error) {
        size_t n = OUT_BUFFER - t->out_len < len ? OUT_BUFFER - t->out_len : len;
        if (p)
            memcpy(t->out_buf + t->out_len, p, n);
        else
            memset(t->out_buf + t->out_len, 0, n);
        t->out_len += n;
        len -= n;
        if (p)
            p += n;
        if (t->out_len == OUT_BUFFER)
            tar_flush(t);
    }
}

static void tar_zeros(struct tar *t, uint64_t len)
{
    while (len > 0 && !t->write_error) {
        size_t n = len < OUT_BUFFER ? (size_t)len : OUT_BUFFER;
        tar_write(t, NULL, n);
        len -= n;
    }
}

static void tar_pad(struct tar *t, uint64_t size)
{
    if (size % BLOCK)
        tar_zeros(t, BLOCK - size % BLOCK);
}

/* An entry left out: one that vanished while the tree was walked is no error. */
static void tar_skip(struct tar *t, int err)
{
    if (err != ENOENT && !t->first_error)
        t->first_error = err;
}

/* Writes value as width-1 octal digits and a NUL; -1 (field untouched) if it does not fit. */
static int octal(unsigned char *field, size_t width, uint64_t value)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%0*llo", (int)(width - 1), (unsigned long long)value);
    if (n < 0 || (size_t)n > width - 1)
        return -1;
    memcpy(field, tmp, (size_t)n + 1);
    return 0;
}

static size_t digits(size_t n)
{
    size_t d = 1;
    while (n >= 10) {
        n /= 10;
        d++;
    }
    return d;
}

/* Appends "LEN key=value\n" to the pax buffer; LEN counts the whole record, itself included. */
static void pax_add(struct tar *t, size_t *used, const char *key, const char *value, size_t vlen)
{
    size_t body = 1 + strlen(key) + 1 + vlen + 1;
    size_t len = body + 1;
    while (digits(len) + body != len)
        len = digits(len) + body;
    if (len > PAX_LIMIT - *used)
        return; /* cannot happen: names and links are bounded well below PAX_LIMIT */
    int n = snprintf(t->pax + *used, PAX_LIMIT - *used, "%zu %s=", len, key);
    memcpy(t->pax + *used + n, value, vlen);
    t->pax[*used + (size_t)n + vlen] = '\n';
    *used += len;
}

static void pax_number(struct tar *t, size_t *used, const char *key, long long value)
{
    char num[32];
    int n = snprintf(num, sizeof num, "%lld", value);
    pax_add(t, used, key, num, (size_t)n);
}

static void checksum(unsigned char *h)
{
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (size_t i = 0; i < BLOCK; i++)
        sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
}

static void basic_header(unsigned char *h, char type, mode_t mode, uint64_t size)
{
    memset(h, 0, BLOCK);
    octal(h + 100, 8, mode & 07777);
    octal(h + 108, 8, 0);
    octal(h + 116, 8, 0);
    octal(h + 124, 12, size);
    octal(h + 136, 12, 0);
    h[156] = (unsigned char)type;
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    octal(h + 329, 8, 0);
    octal(h + 337, 8, 0);
}

/* The header of the entry named t->name; a pax header first for what ustar cannot hold. */
static void tar_header(struct tar *t, char type, const struct stat *st, uint64_t size, const char *link,
                       size_t link_len)
{
    unsigned char h[BLOCK];
    size_t pax = 0;
    basic_header(h, type, st->st_mode, 0);
    memcpy(h, t->name, t->name_len < 100 ? t->name_len : 100);
    if (t->name_len > 100)
        pax_add(t, &pax, "path", t->name, t->name_len);
    if (link) {
        memcpy(h + 157, link, link_len < 100 ? link_len : 100);
        if (link_len > 100)
            pax_add(t, &pax, "linkpath", link, link_len);
    }
    if (octal(h + 108, 8, st->st_uid) < 0)
        pax_number(t, &pax, "uid", (long long)st->st_uid);
    if (octal(h + 116, 8, st->st_gid) < 0)
        pax_number(t, &pax, "gid", (long long)st->st_gid);
    if (octal(h + 124, 12, size) < 0)
        pax_number(t, &pax, "size", (long long)size);
    if (st->st_mtim.tv_sec < 0 || octal(h + 136, 12, (uint64_t)st->st_mtim.tv_sec) < 0)
        pax_number(t, &pax, "mtime", (long long)st->st_mtim.tv_sec);
    checksum(h);
    if (pax) {
        unsigned char x[BLOCK];
        basic_header(x, 'x', 0644, pax);
        memcpy(x, PAX_HEADER_NAME, sizeof PAX_HEADER_NAME - 1);
        checksum(x);
        tar_write(t, x, BLOCK);
        tar_write(t, t->pax, pax);
        tar_pad(t, pax);
    }
    tar_write(t, h, BLOCK);
}

static void tar_file(struct tar *t, int dirfd, const char *name)
{
    /* O_NONBLOCK and O_NOFOLLOW: the entry may have been swapped for a fifo or a link
     * since it was looked at. */
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        tar_skip(t, errno);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        tar_skip(t, errno);
        close(fd);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd); /* no longer a file: as good as vanished */
        return;
    }
    uint64_t size = (uint64_t)st.st_size, done = 0;
    tar_header(t, '0', &st, size, NULL, 0);
    while (done < size && !t->write_error) {
        size_t room = OUT_BUFFER - t->out_len;
        size_t want = size - done < room ? (size_t)(size - done) : room;
        ssize_t n = read(fd, t->out_buf + t->out_len, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            tar_skip(t, errno);
        if (n <= 0)
            break;
        t->out_len += (size_t)n;
        done += (uint64_t)n;
        if (t->out_len == OUT_BUFFER)
            tar_flush(t);
    }
    /* A file that shrank or failed to read is padded: the header already promised its size. */
    tar_zeros(t, size - done);
    tar_pad(t, size);
    close(fd);
}

static void tar_symlink(struct tar *t, int dirfd, const char *name, const struct stat *st)
{
    ssize_t n = readlinkat(dirfd, name, t->link, sizeof t->link);
    if (n < 0) {
        tar_skip(t, errno);
        return;
    }
    if ((size_t)n >= sizeof t->link) {
        tar_skip(t, ENAMETOOLONG);
        return;
    }
    tar_header(t, '2', st, 0, t->link, (size_t)n);
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The names in a directory, sorted; NULL with errno on failure (an empty list is not NULL). */
static char **list_dir(int dirfd, size_t *count)
{
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    size_t n = 0, cap = 16;
    char **names = malloc(cap * sizeof *names);
    struct dirent *e;
    while (names && (e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (n == cap) {
            char **grown = realloc(names, 2 * cap * sizeof *names);
            if (!grown)
                break;
            names = grown;
            cap *= 2;
        }
        if (!(names[n] = strdup(e->d_name)))
            break;
        n++;
    }
    closedir(d);
    if (!names) {
        errno = ENOMEM;
        return NULL;
    }
    qsort(names, n, sizeof *names, compare_names);
    *count = n;
    return names;
}

static void tar_dir(struct tar *t, int dirfd, int depth);

static void tar_subdir(struct tar *t, int dirfd, const char *name, const struct stat *st, int depth)
{
    if (depth >= MAX_DEPTH) {
        tar_skip(t, ENAMETOOLONG);
        return;
    }
    t->name[t->name_len++] = '/';
    t->name[t->name_len] = '\0';
    tar_header(t, '5', st, 0, NULL, 0);
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        tar_skip(t, errno);
        return;
    }
    tar_dir(t, fd, depth + 1);
    close(fd);
}

static void tar_entry(struct tar *t, int dirfd, const char *name, int depth)
{
    size_t len = strlen(name);
    if (t->name_len + len + 1 > NAME_LIMIT) {
        tar_skip(t, ENAMETOOLONG);
        return;
    }
    memcpy(t->name + t->name_len, name, len + 1);
    t->name_len += len;
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        tar_skip(t, errno);
    else if (S_ISREG(st.st_mode))
        tar_file(t, dirfd, name);
    else if (S_ISLNK(st.st_mode))
        tar_symlink(t, dirfd, name, &st);
    else if (S_ISDIR(st.st_mode))
        tar_subdir(t, dirfd, name, &st, depth);
    /* Devices, fifos and sockets are left out: an archive cannot carry their content. */
}

/* t->name holds the directory's name, ending with '/'. */
static void tar_dir(struct tar *t, int dirfd, int depth)
{
    size_t count = 0;
    char **names = list_dir(dirfd, &count);
    if (!names) {
        tar_skip(t, errno);
        return;
    }
    size_t base = t->name_len;
    for (size_t i = 0; i < count; i++) {
        if (!t->write_error)
            tar_entry(t, dirfd, names[i], depth);
        t->name_len = base;
        t->name[base] = '\0';
        free(names[i]);
    }
    free(names);
}

int tar_tree(int dirfd, int out)
{
    struct tar *t = &tar;
    memset(t, 0, sizeof *t);
    t->out = out;
    struct stat st;
    if (fstat(dirfd, &st) < 0)
        return errno;
    memcpy(t->name, "./", 3);
    t->name_len = 2;
    tar_header(t, '5', &st, 0, NULL, 0);
    tar_dir(t, dirfd, 0);
    tar_zeros(t, 2 * BLOCK);
    tar_flush(t);
    return t->write_error ? t->write_error : t->first_error;
}
