/* See common.h. */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

ssize_t read_small_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    while (n > 0 && isspace((unsigned char)buf[n - 1]))
        buf[--n] = '\0';
    return n;
}

void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void close_fds_from(int lowfd)
{
    if (close_range((unsigned)lowfd, ~0U, 0) == 0)
        return;
    /* Kernels before 5.9 have no close_range. */
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (int fd = lowfd; fd < max; fd++)
        close(fd);
}

/* ------------------------------------------------------------------- user */

static int all_digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return 0;
    return 1;
}

/* Splits a colon-separated line in place; returns the number of fields. */
static int split_fields(char *line, char **fields, int max)
{
    int n = 0;
    line[strcspn(line, "\n")] = '\0';
    fields[n++] = line;
    for (char *p = line; *p && n < max; p++)
        if (*p == ':') {
            *p = '\0';
            fields[n++] = p + 1;
        }
    return n;
}

static int lookup_passwd(const char *user, struct identity *id)
{
    FILE *f = fopen("/etc/passwd", "re");
    if (!f)
        return -1;
    char line[2048];
    char *fl[7];
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (split_fields(line, fl, 7) < 7)
            continue;
        int match = all_digits(user) ? (uid_t)strtoul(fl[2], NULL, 10) == (uid_t)strtoul(user, NULL, 10)
                                     : strcmp(fl[0], user) == 0;
        if (!match)
            continue;
        id->uid = (uid_t)strtoul(fl[2], NULL, 10);
        id->gid = (gid_t)strtoul(fl[3], NULL, 10);
        snprintf(id->name, sizeof id->name, "%s", fl[0]);
        snprintf(id->home, sizeof id->home, "%s", fl[5]);
        found = 0;
        break;
    }
    fclose(f);
    return found;
}

static int lookup_group(const char *group, gid_t *gid)
{
    FILE *f = fopen("/etc/group", "re");
    if (!f)
        return -1;
    char line[4096];
    char *fl[4];
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (split_fields(line, fl, 4) < 3 || strcmp(fl[0], group) != 0)
            continue;
        *gid = (gid_t)strtoul(fl[2], NULL, 10);
        found = 0;
        break;
    }
    fclose(f);
    return found;
}

static void supplementary_groups(struct identity *id)
{
    id->groups[0] = id->gid;
    id->ngroups = 1;
    if (!id->name[0])
        return;
    FILE *f = fopen("/etc/group", "re");
    if (!f)
        return;
    char line[4096];
    char *fl[4];
    while (fgets(line, sizeof line, f) && id->ngroups < 64) {
        if (split_fields(line, fl, 4) < 4)
            continue;
        char *save = NULL;
        for (char *member = strtok_r(fl[3], ",", &save); member; member = strtok_r(NULL, ",", &save)) {
            if (strcmp(member, id->name) == 0) {
                gid_t g = (gid_t)strtoul(fl[2], NULL, 10);
                if (g != id->gid)
                    id->groups[id->ngroups++] = g;
                break;
            }
        }
    }
    fclose(f);
}

/* A numeric uid missing from /etc/passwd is allowed, a name is not. */
int resolve_identity(const char *spec, struct identity *id, char *err, size_t errsize)
{
    memset(id, 0, sizeof *id);
    snprintf(id->home, sizeof id->home, "/");
    if (!spec || !*spec)
        spec = "0";
    char buf[512];
    snprintf(buf, sizeof buf, "%s", spec);
    char *group = strchr(buf, ':');
    if (group)
        *group++ = '\0';
    if (lookup_passwd(buf, id) < 0) {
        if (!all_digits(buf)) {
            snprintf(err, errsize, "user %s not found in /etc/passwd", buf);
            return -1;
        }
        id->uid = (uid_t)strtoul(buf, NULL, 10);
        id->gid = 0;
        id->name[0] = '\0';
    }
    if (group && *group) {
        if (all_digits(group)) {
            id->gid = (gid_t)strtoul(group, NULL, 10);
        } else if (lookup_group(group, &id->gid) < 0) {
            snprintf(err, errsize, "group %s not found in /etc/group", group);
            return -1;
        }
        id->groups[0] = id->gid;
        id->ngroups = 1;
        return 0;
    }
    supplementary_groups(id);
    return 0;
}

/* ---------------------------------------------------------------- program */

const char *env_get(char *const *envp, const char *name)
{
    size_t len = strlen(name);
    for (char *const *e = envp; e && *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

int find_program(const char *file, const char *path_env, char *out, size_t size)
{
    if (strchr(file, '/')) {
        snprintf(out, size, "%s", file);
        return access(out, F_OK);
    }
    const char *p = path_env ? path_env : DEFAULT_PATH;
    while (1) {
        const char *end = strchrnul(p, ':');
        size_t dlen = (size_t)(end - p);
        if (dlen == 0)
            snprintf(out, size, "%s", file);
        else
            snprintf(out, size, "%.*s/%s", (int)dlen, p, file);
        struct stat st;
        if (stat(out, &st) == 0 && S_ISREG(st.st_mode) && access(out, X_OK) == 0)
            return 0;
        if (!*end)
            return -1;
        p = end + 1;
    }
}

static int make_port_node(const char *entry, const char *path)
{
    char sys[512], value[64];
    unsigned major_no, minor_no;
    snprintf(sys, sizeof sys, "/sys/class/virtio-ports/%s/dev", entry);
    if (read_small_file(sys, value, sizeof value) < 0 || sscanf(value, "%u:%u", &major_no, &minor_no) != 2)
        return -1;
    return mknod(path, S_IFCHR | 0600, makedev(major_no, minor_no));
}

int open_virtio_port(const char *name, int flags)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    int fd = -1;
    struct dirent *e;
    while (fd < 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], value[258];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_small_file(path, value, sizeof value) < 0 || strcmp(value, name) != 0)
            continue;
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        if (access(path, F_OK) < 0)
            make_port_node(e->d_name, path);
        fd = open(path, flags);
    }
    closedir(d);
    return fd;
}
