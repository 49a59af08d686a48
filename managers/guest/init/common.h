/*
 * What the init and the guest agent share: running a program the way the init runs
 * the instance's program (Docker's user forms, PATH lookup), and a few small helpers.
 */
#ifndef DATAPLANE_COMMON_H
#define DATAPLANE_COMMON_H

#include <stddef.h>
#include <sys/types.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct identity {
    uid_t uid;
    gid_t gid;
    char name[256];
    char home[1024];
    gid_t groups[64];
    int ngroups;
};

/* 0, or -1 with errno set; retries short writes and EINTR. */
int write_all(int fd, const void *buf, size_t len);
/* Reads a small file into buf (NUL-terminated, trailing whitespace cut); its length or -1. */
ssize_t read_small_file(const char *path, char *buf, size_t size);
void sleep_ms(long ms);
long now_ms(void);
/* Docker's rules: "user", "uid", "user:group", "uid:gid", from /etc/passwd and /etc/group.
 * 0, or -1 with a message in err. */
int resolve_identity(const char *spec, struct identity *id, char *err, size_t errsize);
const char *env_get(char *const *envp, const char *name);
/* The executable `file` names, searched in path_env (or DEFAULT_PATH) when it has no
 * slash; 0, or -1 when there is none. */
int find_program(const char *file, const char *path_env, char *out, size_t size);
/* The virtio-serial port whose sysfs name is `name`, opened with `flags` (its /dev node made
 * from sysfs should it be missing); -1 while there is none: a multiport device announces its
 * ports, and then their names, some time after the driver bound. */
int open_virtio_port(const char *name, int flags);
/* A forked child that does not exec must not hold its parent's descriptors. */
void close_fds_from(int lowfd);

#endif
