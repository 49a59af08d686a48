/*
 * The guest's PID 1: prepares the root filesystem from virtio disks found by
 * serial, applies the instance config and runs the program.  See
 * managers/guest/README.md for the design and the config-disk format, and
 * managers/guest/markers.py for the serial markers printed here.
 *
 * Every failure path ends in fail(): an error marker, then power-off.  The
 * guest must never sit waiting for someone.
 *
 * An ACPI power-button press while the program runs is a graceful stop: SIGTERM,
 * SIGKILL after STOP_GRACE_MS, then the usual exit marker and power-off.
 *
 * Once the program runs, a forked child serves the host's guest agent protocol
 * (agent.c); the init restarts it should it die.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <grp.h>

#include "agent.h"
#include "common.h"

#define MARKER_PREFIX "@@dataplane-guest@@ "
#define CONFIG_MAGIC "DPGCFG01"
#define CONFIG_HEADER 16
#define CONFIG_MAX (16u << 20)
#define MODULE_LIST "/etc/dataplane/modules"
/* After a power-button press the program gets SIGTERM and this long to exit before
 * SIGKILL.  The hosts force the VM off after 10 s; this leaves time to sync and power off. */
#define STOP_GRACE_MS 8000
/* After SIGKILL, how long to wait for the kernel to reap the program (a process stuck in
 * uninterruptible sleep never dies) before powering off regardless. */
#define KILL_WAIT_MS 2000
#define MAX_POWER_BUTTONS 8
/* The longest the init waits for the program's execve before loading the late modules. */
#define EXEC_WAIT_MS 2000
/* A guest agent that died is started again after AGENT_RESTART_MS, at most
 * AGENT_MAX_RESTARTS times: one that cannot find its transport must not burn the vCPU. */
#define AGENT_RESTART_MS 1000
#define AGENT_MAX_RESTARTS 10

enum tag {
    TAG_ARG = 1,
    TAG_ENV = 2,
    TAG_WORKDIR = 3,
    TAG_USER = 4,
    TAG_HOSTNAME = 5,
    TAG_NET_ADDRESS = 6,
    TAG_NET_GATEWAY = 7,
    TAG_NET_DNS = 8,
    TAG_NET_MAC = 9,
    TAG_VOLUME = 10,
    TAG_AGENT = 11,
    TAG_OUTPUT = 12,
};

struct volume {
    int readonly;
    char *source; /* a virtio serial, or a path under /dev */
    char *target;
};

struct config {
    char **argv;
    size_t argc;
    char **envp;
    size_t envc;
    char *workdir;
    char *user;
    char *hostname;
    int has_address, has_gateway, has_mac;
    uint8_t address[4], prefix, gateway[4], mac[6];
    char **dns;
    size_t ndns;
    struct volume *volumes;
    size_t nvolumes;
    char *agent; /* the guest agent's transport; NULL: the agent's default */
    char *output; /* the program's output: "console" or "virtio-serial:NAME"; NULL: serial */
};

/* Markers start with a newline so they sit on a line of their own even when
 * the program's output did not end with one. */
static void marker(const char *fmt, ...)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "\n" MARKER_PREFIX);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t room = sizeof buf - (size_t)n - 2; /* what vsnprintf could write */
    size_t len = (size_t)n + (m < 0 ? 0 : ((size_t)m < room ? (size_t)m : room));
    /* A detail must not break the marker's line. */
    for (size_t i = (size_t)n; i < len; i++)
        if ((unsigned char)buf[i] < 0x20 || buf[i] == 0x7f)
            buf[i] = '?';
    buf[len++] = '\n';
    write_all(STDOUT_FILENO, buf, len);
}

static void __attribute__((noreturn)) power_off(void)
{
    sync();
    reboot(RB_POWER_OFF);
    /* If power-off is refused, a reboot makes a -no-reboot VMM exit, and
     * PID 1 exiting panics a kernel booted with panic=-1 into a reboot. */
    reboot(RB_AUTOBOOT);
    _exit(1);
}

static void __attribute__((noreturn, format(printf, 2, 3))) fail(const char *reason, const char *fmt, ...)
{
    char detail[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    marker("error reason=%s detail=%s", reason, detail);
    power_off();
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        fail("out-of-memory", "allocation of %zu bytes failed", n * size);
    return p;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char buf[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof buf)
        return -1;
    memcpy(buf, path, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char saved = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, mode) < 0 && errno != EEXIST)
                return -1;
            buf[i] = saved;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ setup */

static void mount_early(void)
{
    mkdir("/dev", 0755);
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY)
        fail("mount-failed", "devtmpfs on /dev: %s", strerror(errno));
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        fail("mount-failed", "proc on /proc: %s", strerror(errno));
    if (mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        fail("mount-failed", "sysfs on /sys: %s", strerror(errno));
}

static void setup_console(void)
{
    /* The kernel hands PID 1 /dev/console when the initrd has the node;
     * open it ourselves if it did not. */
    if (fcntl(STDOUT_FILENO, F_GETFD) < 0) {
        int fd = open("/dev/console", O_RDWR | O_NOCTTY);
        if (fd >= 0) {
            dup2(fd, STDIN_FILENO);
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            if (fd > STDERR_FILENO)
                close(fd);
        }
    }
    /* Raw output: the program's bytes reach the serial log unchanged (no
     * newline translation), which byte-exact logs depend on. */
    struct termios t;
    if (tcgetattr(STDOUT_FILENO, &t) == 0) {
        t.c_oflag &= ~(tcflag_t)OPOST;
        tcsetattr(STDOUT_FILENO, TCSANOW, &t);
    }
}

/* The module list: "<group> <path>" lines in load order (see modules.py).  Groups
 * are loaded when needed; whatever is left is loaded once the program runs. */
struct module {
    char group[16];
    char path[496];
    int done;
    int fd; /* opened before the root switch hides the initrd; -1 until then */
};
static struct module *modules;
static size_t nmodules;
/* Once the program runs, the serial console may be its output (when the config names no
 * output channel): nothing of ours may interleave. */
static int program_running;

static void read_module_list(void)
{
    FILE *list = fopen(MODULE_LIST, "re");
    if (!list)
        fail("module-load-failed", "%s: %s", MODULE_LIST, strerror(errno));
    char line[512];
    while (fgets(line, sizeof line, list)) {
        line[strcspn(line, "\n")] = '\0';
        char *space = strchr(line, ' ');
        if (!space || space == line || (size_t)(space - line) >= sizeof modules->group)
            continue;
        struct module *grown = realloc(modules, (nmodules + 1) * sizeof *grown);
        if (!grown)
            fail("out-of-memory", "module list");
        modules = grown;
        memset(&modules[nmodules], 0, sizeof *modules);
        modules[nmodules].fd = -1;
        memcpy(modules[nmodules].group, line, (size_t)(space - line));
        snprintf(modules[nmodules].path, sizeof modules->path, "%s", space + 1);
        nmodules++;
    }
    fclose(list);
}

static void load_module(struct module *m)
{
    if (m->done)
        return;
    /* Not fatal: a KERNEL_PATH kernel may have the driver built in.  A driver
     * that is really missing shows up as a missing disk or interface. */
    int by_path = m->fd < 0;
    int fd = by_path ? open(m->path, O_RDONLY | O_CLOEXEC) : m->fd;
    if ((fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)) && !program_running) {
        char msg[768];
        int n = snprintf(msg, sizeof msg, "dataplane-init: module %s: %s\n", m->path, strerror(errno));
        write_all(STDERR_FILENO, msg, n < 0 ? 0 : ((size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1));
    }
    if (fd >= 0)
        close(fd);
    /* A path may sit in several groups: load it once. */
    for (size_t i = 0; i < nmodules; i++)
        if (strcmp(modules[i].path, m->path) == 0) {
            modules[i].done = 1;
            modules[i].fd = -1;
        }
    /* The module now lives in kernel memory; its file only costs RAM.  (Only
     * before the root switch: afterwards the path would name a file of the image.) */
    if (by_path)
        unlink(m->path);
}

/* After the root switch the initrd's files are out of reach: keep what is still to be
 * loaded open. */
static void open_pending_modules(void)
{
    for (size_t i = 0; i < nmodules; i++) {
        if (modules[i].done || modules[i].fd >= 0)
            continue;
        int fd = open(modules[i].path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        /* The open descriptor keeps the content; the name is no longer needed. */
        unlink(modules[i].path);
        for (size_t j = i; j < nmodules; j++)
            if (strcmp(modules[j].path, modules[i].path) == 0)
                modules[j].fd = fd;
    }
}

/* group NULL: every module not loaded yet. */
static void load_modules(const char *group)
{
    for (size_t i = 0; i < nmodules; i++)
        if (!group || strcmp(modules[i].group, group) == 0)
            load_module(&modules[i]);
}

/* Driver binding is synchronous on module load, but wait (bounded) for any
 * virtio block device that is not bound yet so that a missing disk is a
 * missing disk and not a slow probe. */
static void wait_for_virtio_disks(void)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        DIR *d = opendir("/sys/bus/virtio/devices");
        if (!d)
            return;
        int pending = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            char path[512], value[64];
            snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
            if (read_small_file(path, value, sizeof value) < 0 || strcmp(value, "0x0002") != 0)
                continue;
            snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/driver", e->d_name);
            if (access(path, F_OK) < 0)
                pending = 1;
        }
        closedir(d);
        if (!pending)
            return;
        sleep_ms(10);
    }
}

/* Fills devpath with /dev/<name> of the disk whose virtio serial is
 * `serial`, creating the node if devtmpfs has not yet. */
static int find_disk(const char *serial, char *devpath, size_t size)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], value[128];
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        if (read_small_file(path, value, sizeof value) < 0 || strcmp(value, serial) != 0)
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/dev", e->d_name);
        unsigned major_no, minor_no;
        if (read_small_file(path, value, sizeof value) < 0 ||
            sscanf(value, "%u:%u", &major_no, &minor_no) != 2)
            continue;
        snprintf(devpath, size, "/dev/%s", e->d_name);
        if (access(devpath, F_OK) < 0)
            mknod(devpath, S_IFBLK | 0600, makedev(major_no, minor_no));
        found = 0;
        break;
    }
    closedir(d);
    return found;
}

static int resolve_device(const char *source, char *devpath, size_t size)
{
    if (strncmp(source, "/dev/", 5) == 0) {
        snprintf(devpath, size, "%s", source);
        return access(devpath, F_OK);
    }
    return find_disk(source, devpath, size);
}

static const char *detect_fs(const char *dev)
{
    unsigned char sb[2048];
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    ssize_t n = pread(fd, sb, sizeof sb, 0);
    close(fd);
    if (n < (ssize_t)sizeof sb)
        return NULL;
    uint32_t erofs = (uint32_t)sb[1024] | (uint32_t)sb[1025] << 8 | (uint32_t)sb[1026] << 16 |
                     (uint32_t)sb[1027] << 24;
    if (erofs == 0xE0F5E1E2u)
        return "erofs";
    if (sb[1080] == 0x53 && sb[1081] == 0xEF)
        return "ext4";
    return NULL;
}

static void mount_disk(const char *what, const char *dev, const char *target, int readonly)
{
    const char *fs = detect_fs(dev);
    if (!fs)
        fail("mount-failed", "%s %s: no erofs or ext4 filesystem", what, dev);
    if (strcmp(fs, "erofs") == 0)
        load_modules("erofs");
    unsigned long flags = MS_NODEV;
    /* A read-only ext4 must not try to replay a journal on a read-only disk. */
    const char *data = NULL;
    if (readonly || strcmp(fs, "erofs") == 0) {
        flags |= MS_RDONLY;
        if (strcmp(fs, "ext4") == 0)
            data = "noload";
    }
    if (mkdir_p(target, 0755) < 0)
        fail("mount-failed", "%s: cannot create %s: %s", what, target, strerror(errno));
    if (mount(dev, target, fs, flags, data) < 0)
        fail("mount-failed", "%s %s (%s) on %s: %s", what, dev, fs, target, strerror(errno));
}

static int run_wait(char *const argv[])
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0) {
            dup2(null, STDOUT_FILENO);
            dup2(null, STDERR_FILENO);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void prepare_overlay_disk(const char *dev)
{
    if (detect_fs(dev))
        return;
    /* A blank overlay disk: format it here so the host may hand over a bare
     * sparse file.  busybox makes ext2, which the built-in ext4 driver mounts. */
    char *argv[] = {"/bin/busybox", "mke2fs", "-F", "-b", "4096", (char *)dev, NULL};
    int rc = run_wait(argv);
    if (rc != 0)
        fail("mount-failed", "overlay %s: mke2fs exited with %d", dev, rc);
}

/* ----------------------------------------------------------------- config */

static uint32_t crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static char *dup_text(const unsigned char *p, uint32_t len, const char *field)
{
    if (memchr(p, '\0', len))
        fail("bad-config", "%s contains a NUL byte", field);
    char *s = xcalloc(1, (size_t)len + 1);
    memcpy(s, p, len);
    return s;
}

static void push(char ***list, size_t *count, char *item)
{
    char **grown = realloc(*list, (*count + 2) * sizeof **list);
    if (!grown)
        fail("out-of-memory", "config list");
    grown[(*count)++] = item;
    grown[*count] = NULL;
    *list = grown;
}

static unsigned char *read_config_bytes(const char *dev, uint32_t *out_len)
{
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("bad-config", "open %s: %s", dev, strerror(errno));
    unsigned char header[CONFIG_HEADER];
    if (pread(fd, header, sizeof header, 0) != (ssize_t)sizeof header)
        fail("bad-config", "%s: cannot read the header", dev);
    if (memcmp(header, CONFIG_MAGIC, 8) != 0)
        fail("bad-config", "%s: not a dataplane config disk (bad magic)", dev);
    uint32_t len = le32(header + 8), crc = le32(header + 12);
    if (len > CONFIG_MAX)
        fail("bad-config", "%s: payload of %u bytes is too large", dev, len);
    unsigned char *payload = xcalloc(1, len);
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, payload + done, len - done, (off_t)(CONFIG_HEADER + done));
        if (n <= 0)
            fail("bad-config", "%s: truncated payload (%zu of %u bytes)", dev, done, len);
        done += (size_t)n;
    }
    close(fd);
    if (crc32(payload, len) != crc)
        fail("bad-config", "%s: checksum mismatch", dev);
    *out_len = len;
    return payload;
}

static void parse_config(const unsigned char *p, uint32_t len, struct config *cfg)
{
    uint32_t off = 0;
    while (off < len) {
        if (len - off < 5)
            fail("bad-config", "truncated record at offset %u", off);
        unsigned tag = p[off];
        uint32_t vlen = le32(p + off + 1);
        off += 5;
        if (vlen > len - off)
            fail("bad-config", "record %u overruns the payload", tag);
        const unsigned char *v = p + off;
        switch (tag) {
        case TAG_ARG:
            push(&cfg->argv, &cfg->argc, dup_text(v, vlen, "argv"));
            break;
        case TAG_ENV: {
            char *kv = dup_text(v, vlen, "env");
            if (!strchr(kv, '=') || kv[0] == '=')
                fail("bad-config", "env entry without a name");
            push(&cfg->envp, &cfg->envc, kv);
            break;
        }
        case TAG_WORKDIR:
            cfg->workdir = dup_text(v, vlen, "workdir");
            break;
        case TAG_USER:
            cfg->user = dup_text(v, vlen, "user");
            break;
        case TAG_HOSTNAME:
            cfg->hostname = dup_text(v, vlen, "hostname");
            break;
        case TAG_NET_ADDRESS:
            if (vlen != 5 || v[4] > 32)
                fail("bad-config", "network address record");
            memcpy(cfg->address, v, 4);
            cfg->prefix = v[4];
            cfg->has_address = 1;
            break;
        case TAG_NET_GATEWAY:
            if (vlen != 4)
                fail("bad-config", "network gateway record");
            memcpy(cfg->gateway, v, 4);
            cfg->has_gateway = 1;
            break;
        case TAG_NET_DNS:
            push(&cfg->dns, &cfg->ndns, dup_text(v, vlen, "dns"));
            break;
        case TAG_NET_MAC:
            if (vlen != 6)
                fail("bad-config", "network mac record");
            memcpy(cfg->mac, v, 6);
            cfg->has_mac = 1;
            break;
        case TAG_VOLUME: {
            if (vlen < 3)
                fail("bad-config", "volume record");
            uint32_t slen = (uint32_t)v[1] | (uint32_t)v[2] << 8;
            if (slen == 0 || slen > vlen - 3 || vlen - 3 - slen == 0)
                fail("bad-config", "volume record");
            struct volume *grown = realloc(cfg->volumes, (cfg->nvolumes + 1) * sizeof *grown);
            if (!grown)
                fail("out-of-memory", "volumes");
            cfg->volumes = grown;
            grown[cfg->nvolumes].readonly = v[0] != 0;
            grown[cfg->nvolumes].source = dup_text(v + 3, slen, "volume source");
            grown[cfg->nvolumes].target = dup_text(v + 3 + slen, vlen - 3 - slen, "volume path");
            if (grown[cfg->nvolumes].target[0] != '/')
                fail("bad-config", "volume path %s is not absolute", grown[cfg->nvolumes].target);
            cfg->nvolumes++;
            break;
        }
        case TAG_AGENT:
            cfg->agent = dup_text(v, vlen, "agent");
            if (!agent_transport_valid(cfg->agent))
                fail("bad-config", "agent transport %s is not virtio-serial:NAME or vsock:PORT", cfg->agent);
            break;
        case TAG_OUTPUT:
            cfg->output = dup_text(v, vlen, "output");
            if (strcmp(cfg->output, "console") != 0 &&
                (strncmp(cfg->output, "virtio-serial:", 14) != 0 || !cfg->output[14] ||
                 strchr(cfg->output + 14, '/')))
                fail("bad-config", "output %s is not console or virtio-serial:NAME", cfg->output);
            break;
        default:
            fail("bad-config", "unknown record tag %u", tag);
        }
        off += vlen;
    }
    if (cfg->argc == 0)
        fail("bad-config", "no program to run (empty entrypoint and cmd)");
}

/* ---------------------------------------------------------------- network */

static void set_ipv4(struct sockaddr *sa, const uint8_t ip[4])
{
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    memset(in, 0, sizeof *in);
    in->sin_family = AF_INET;
    memcpy(&in->sin_addr, ip, 4);
}

static void if_up(int sock, const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
        fail("network-failed", "%s: get flags: %s", name, strerror(errno));
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0)
        fail("network-failed", "%s: up: %s", name, strerror(errno));
}

static int find_interface(const struct config *cfg, char *name, size_t size)
{
    char want[32] = "";
    if (cfg->has_mac)
        snprintf(want, sizeof want, "%02x:%02x:%02x:%02x:%02x:%02x", cfg->mac[0], cfg->mac[1],
                 cfg->mac[2], cfg->mac[3], cfg->mac[4], cfg->mac[5]);
    DIR *d = opendir("/sys/class/net");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "lo") == 0)
            continue;
        if (cfg->has_mac) {
            char path[512], value[64];
            snprintf(path, sizeof path, "/sys/class/net/%s/address", e->d_name);
            if (read_small_file(path, value, sizeof value) < 0 || strcasecmp(value, want) != 0)
                continue;
        }
        snprintf(name, size, "%s", e->d_name);
        found = 0;
        break;
    }
    closedir(d);
    return found;
}

static void setup_network(const struct config *cfg)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        fail("network-failed", "socket: %s", strerror(errno));
    if_up(sock, "lo");
    if (!cfg->has_address) {
        close(sock);
        return;
    }
    load_modules("net");
    char name[IFNAMSIZ];
    if (find_interface(cfg, name, sizeof name) < 0)
        fail("network-failed", "no network interface%s", cfg->has_mac ? " with the configured MAC" : "");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    set_ipv4(&ifr.ifr_addr, cfg->address);
    if (ioctl(sock, SIOCSIFADDR, &ifr) < 0)
        fail("network-failed", "%s: address: %s", name, strerror(errno));
    uint32_t mask = cfg->prefix ? htonl(0xFFFFFFFFu << (32 - cfg->prefix)) : 0;
    set_ipv4(&ifr.ifr_netmask, (const uint8_t *)&mask);
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) < 0)
        fail("network-failed", "%s: netmask: %s", name, strerror(errno));
    if_up(sock, name);
    if (cfg->has_gateway) {
        struct rtentry rt;
        const uint8_t any[4] = {0, 0, 0, 0};
        memset(&rt, 0, sizeof rt);
        set_ipv4(&rt.rt_dst, any);
        set_ipv4(&rt.rt_genmask, any);
        set_ipv4(&rt.rt_gateway, cfg->gateway);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = name;
        if (ioctl(sock, SIOCADDRT, &rt) < 0)
            fail("network-failed", "default route: %s", strerror(errno));
    }
    close(sock);
}

static void write_file(const char *path, const char *content)
{
    /* Replace rather than write through: the image may ship a symlink here. */
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        fail("config-apply-failed", "%s: %s", path, strerror(errno));
    write_all(fd, content, strlen(content));
    close(fd);
}

static void write_resolv_conf(const struct config *cfg)
{
    if (cfg->ndns == 0)
        return;
    char buf[4096];
    size_t used = 0;
    for (size_t i = 0; i < cfg->ndns && used < sizeof buf; i++)
        used += (size_t)snprintf(buf + used, sizeof buf - used, "nameserver %s\n", cfg->dns[i]);
    mkdir("/etc", 0755);
    write_file("/etc/resolv.conf", buf);
}

/* As Docker does: the program can resolve its own host name without DNS. */
static void write_hosts(const struct config *cfg)
{
    if (!cfg->hostname || !*cfg->hostname)
        return;
    char own[32] = "127.0.1.1";
    if (cfg->has_address)
        snprintf(own, sizeof own, "%u.%u.%u.%u", cfg->address[0], cfg->address[1],
                 cfg->address[2], cfg->address[3]);
    char buf[1024];
    snprintf(buf, sizeof buf, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n",
             own, cfg->hostname);
    mkdir("/etc", 0755);
    write_file("/etc/hosts", buf);
}

/* ------------------------------------------------------------ root switch */

static void relocate_mount(const char *from, const char *to)
{
    mkdir(to, 0755);
    if (mount(from, to, NULL, MS_MOVE, NULL) < 0)
        fail("mount-failed", "move %s to %s: %s", from, to, strerror(errno));
}

static void build_root(const struct config *cfg)
{
    char dev[256];
    wait_for_virtio_disks();
    if (find_disk("image", dev, sizeof dev) < 0)
        fail("no-image-disk", "no disk with serial 'image'");
    mount_disk("image", dev, "/mnt/image", 1);

    if (find_disk("overlay", dev, sizeof dev) < 0)
        fail("no-overlay-disk", "no disk with serial 'overlay'");
    prepare_overlay_disk(dev);
    mount_disk("overlay", dev, "/mnt/overlay", 0);
    if (mkdir_p("/mnt/overlay/upper", 0755) < 0 || mkdir_p("/mnt/overlay/work", 0755) < 0)
        fail("mount-failed", "overlay directories: %s", strerror(errno));
    mkdir("/newroot", 0755);
    load_modules("overlay");
    if (mount("overlay", "/newroot", "overlay", 0,
              "lowerdir=/mnt/image,upperdir=/mnt/overlay/upper,workdir=/mnt/overlay/work") < 0)
        fail("mount-failed", "overlay root: %s", strerror(errno));

    for (size_t i = 0; i < cfg->nvolumes; i++) {
        const struct volume *v = &cfg->volumes[i];
        if (resolve_device(v->source, dev, sizeof dev) < 0)
            fail("no-volume-disk", "volume %s: no such disk", v->source);
        char target[4096];
        snprintf(target, sizeof target, "/newroot%s", v->target);
        mount_disk("volume", dev, target, v->readonly);
    }

    open_pending_modules();
    relocate_mount("/dev", "/newroot/dev");
    relocate_mount("/proc", "/newroot/proc");
    relocate_mount("/sys", "/newroot/sys");
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0)
        fail("mount-failed", "switch root: %s", strerror(errno));
    /* What containers expect beside /dev; neither is fatal to miss. */
    mkdir("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666");
    mkdir("/dev/shm", 01777);
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
}

/* ------------------------------------------------------------------- user */

/* ---------------------------------------------------------------- program */

/* The child reports why it could not exec through a close-on-exec pipe:
 * "reason\0detail".  Nothing arrives when execve succeeded. */
static void __attribute__((noreturn)) child_fail(int pipe_fd, const char *reason, const char *detail)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "%s%c%s", reason, '\0', detail);
    write_all(pipe_fd, buf, n > 0 ? ((size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1) : 0);
    _exit(127);
}

static void __attribute__((noreturn)) run_child(const struct config *cfg, int report, int output)
{
    char err[1024];
    struct identity id;
    setsid();
    int null = open("/dev/null", O_RDONLY);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        if (null != STDIN_FILENO)
            close(null);
    }
    if (resolve_identity(cfg->user, &id, err, sizeof err) < 0)
        child_fail(report, "bad-user", err);

    char **envp = NULL;
    size_t envc = 0;
    for (size_t i = 0; i < cfg->envc; i++)
        push(&envp, &envc, cfg->envp[i]);
    if (!env_get(envp, "PATH"))
        push(&envp, &envc, "PATH=" DEFAULT_PATH);
    if (!env_get(envp, "HOME")) {
        char *home = xcalloc(1, strlen(id.home) + 6);
        sprintf(home, "HOME=%s", id.home);
        push(&envp, &envc, home);
    }

    if (setgroups((size_t)id.ngroups, id.groups) < 0 || setgid(id.gid) < 0 || setuid(id.uid) < 0) {
        snprintf(err, sizeof err, "switch to %u:%u: %s", id.uid, id.gid, strerror(errno));
        child_fail(report, "bad-user", err);
    }
    const char *workdir = cfg->workdir && *cfg->workdir ? cfg->workdir : "/";
    if (chdir(workdir) < 0) {
        snprintf(err, sizeof err, "workdir %s: %s", workdir, strerror(errno));
        child_fail(report, "bad-workdir", err);
    }
    char path[4096];
    if (find_program(cfg->argv[0], env_get(envp, "PATH"), path, sizeof path) < 0) {
        snprintf(err, sizeof err, "%s: not found", cfg->argv[0]);
        child_fail(report, "program-not-found", err);
    }
    /* The marker still goes to the serial port; from here on the program writes into the
     * relay's pipe when there is one (the pipe's other end is closed on exec). */
    marker("program-started");
    if (output >= 0) {
        dup2(output, STDOUT_FILENO);
        dup2(output, STDERR_FILENO);
    }
    execve(path, cfg->argv, envp);
    int exec_errno = errno;
    snprintf(err, sizeof err, "%s: %s", path, strerror(exec_errno));
    child_fail(report, exec_errno == ENOENT ? "program-not-found" : "exec-failed", err);
}

/* ------------------------------------------------------------ power button */

#define LONG_BITS (8 * sizeof(unsigned long))

/* Opens the event devices that can report KEY_POWER: the ACPI power button (button.ko)
 * reaches userspace through the input layer and evdev.  Anything that fails here only
 * means no graceful stop: the program still runs and is waited for. */
static size_t open_power_buttons(int *fds, size_t max)
{
    DIR *d = opendir("/sys/class/input");
    if (!d)
        return 0;
    size_t n = 0;
    struct dirent *e;
    while (n < max && (e = readdir(d))) {
        if (strncmp(e->d_name, "event", 5) != 0)
            continue;
        char path[512], value[64];
        snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
        if (access(path, F_OK) < 0) {
            /* devtmpfs makes the node; make it from sysfs should it be missing. */
            char sys[512];
            unsigned major_no, minor_no;
            snprintf(sys, sizeof sys, "/sys/class/input/%s/dev", e->d_name);
            if (read_small_file(sys, value, sizeof value) < 0 ||
                sscanf(value, "%u:%u", &major_no, &minor_no) != 2)
                continue;
            mkdir("/dev/input", 0755);
            mknod(path, S_IFCHR | 0600, makedev(major_no, minor_no));
        }
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        unsigned long keys[(KEY_MAX + LONG_BITS) / LONG_BITS];
        memset(keys, 0, sizeof keys);
        if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) < 0 ||
            !(keys[KEY_POWER / LONG_BITS] & (1UL << (KEY_POWER % LONG_BITS)))) {
            close(fd);
            continue;
        }
        fds[n++] = fd;
    }
    closedir(d);
    return n;
}

/* Drains one event device: 1 if it reported a KEY_POWER press, 0 if not, -1 if the
 * device is gone (its descriptor is then useless to poll). */
static int read_power_press(int fd)
{
    struct input_event ev[16];
    int pressed = 0;
    for (;;) {
        ssize_t n = read(fd, ev, sizeof ev);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return pressed;
        if (n <= 0)
            return -1;
        for (size_t i = 0; i < (size_t)n / sizeof ev[0]; i++)
            if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1)
                pressed = 1;
    }
}

static void signal_program(pid_t child, int sig)
{
    /* The program leads its own session (setsid), so its group is everything it started
     * that did not move away; the direct kill covers a child that has not called setsid
     * yet. */
    kill(-child, sig);
    kill(child, sig);
}

/* ------------------------------------------------------------------ agent */

/* The guest agent (agent.c) is a forked copy of the init, not an exec: nothing to put
 * in the initrd, nothing to find after the root switch. */
static struct {
    struct agent_config cfg;
    sigset_t mask; /* the mask a child starts from */
    pid_t pid;     /* -1: not running */
    int restarts;
    long restart_at; /* -1: no restart pending */
} agent = {.pid = -1, .restart_at = -1};

static void schedule_agent_restart(void)
{
    agent.pid = -1;
    if (agent.restarts < AGENT_MAX_RESTARTS)
        agent.restart_at = now_ms() + AGENT_RESTART_MS;
}

static void start_agent(void)
{
    pid_t pid = fork();
    if (pid < 0) {
        schedule_agent_restart();
        return;
    }
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, &agent.mask, NULL);
        /* Its own session: out of the program's reach (the power button signals the
         * program's group) and without the console as controlling terminal. */
        setsid();
        /* Silent: the serial console may be the program's output. */
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
            dup2(null, STDERR_FILENO);
        }
        /* The init's signalfd, power buttons and exec-report pipe are not the agent's. */
        close_fds_from(3);
        _exit(agent_main(&agent.cfg));
    }
    agent.pid = pid;
}

static void start_first_agent(const struct config *cfg, const sigset_t *mask)
{
    agent.cfg.transport = cfg->agent;
    agent.cfg.user = cfg->user;
    agent.cfg.workdir = cfg->workdir;
    agent.cfg.envp = cfg->envp;
    agent.mask = *mask;
    start_agent();
}

/* Anything reaped that is not the program: the agent is started again later. */
static void agent_reaped(pid_t pid)
{
    if (pid > 0 && pid == agent.pid)
        schedule_agent_restart();
}

/* Restarts the agent if it is time; returns how long until it is, or -1 if no restart
 * is pending. */
static long agent_restart_due(void)
{
    if (agent.restart_at < 0)
        return -1;
    long left = agent.restart_at - now_ms();
    if (left > 0)
        return left;
    agent.restart_at = -1;
    agent.restarts++;
    start_agent();
    return -1;
}

/* The program's output: a pipe whose bytes the init relays to the output channel the config
 * names (see open_program_output).  A write to that channel is a VM exit, so a program
 * writing a line at a time straight to hvc0 ran at 0.8 MB/s on QEMU/TCG (a terminal is
 * line-buffered: one exit per line); through the pipe the program writes as fast as a pipe
 * takes bytes, and the relay lets the pipe fill for RELAY_GATHER_MS after a short read and
 * then hands the channel up to RELAY_CHUNK at a time.  As in a container run without a
 * terminal, stdout and stderr are that pipe, not a TTY. */
#define RELAY_CHUNK (256 * 1024)
/* After the program ended and everything left was killed, how long the rest of the pipe
 * may take to reach the channel. */
#define RELAY_DRAIN_MS 2000
/* How long the relay lets a short read's pipe fill before it reads again: what it adds to the
 * latency of a line. */
#define RELAY_GATHER_MS 50
/* How long one relay pass may take before the init looks at its other work. */
#define RELAY_PASS_MS 20
/* What one read takes from the pipe when the channel is the serial port (0.33 MB/s). */
#define RELAY_SERIAL_READ 4096
/* Room for what a program writes while the relay gathers (a full pipe blocks the program). */
#define RELAY_PIPE_BYTES (1024 * 1024)
/* How long the output port may take to be announced. */
#define OUTPUT_WAIT_MS 2000

struct relay {
    int in;      /* the pipe's read end, -1 once it reached its end */
    int out;     /* the output channel, -1 without one */
    size_t read; /* bytes taken from the pipe at a time: RELAY_CHUNK, less on the serial port */
};

/* Move what the pipe holds to the channel, at most `budget` bytes and for about
 * RELAY_PASS_MS (so that a program that never stops writing, or a slow channel, cannot keep
 * the init from the power button and its children).  Returns -1 once the pipe reached its
 * end (every writer is gone), else how many bytes it moved. */
static ssize_t relay_some(struct relay *r, size_t budget)
{
    static char buf[RELAY_CHUNK];
    size_t moved = 0;
    long until = now_ms() + RELAY_PASS_MS;
    while (r->in >= 0 && budget > 0 && (moved == 0 || now_ms() < until)) {
        size_t want = r->read < budget ? r->read : budget;
        ssize_t n = read(r->in, buf, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return (ssize_t)moved;
        if (n <= 0) {
            close(r->in);
            r->in = -1;
            return -1;
        }
        moved += (size_t)n;
        /* A channel that fails (never expected) must not stop the program: its output is
         * then dropped rather than left to fill the pipe and block it. */
        if (r->out >= 0 && write_all(r->out, buf, (size_t)n) < 0) {
            close(r->out);
            r->out = -1;
        }
        budget -= (size_t)n;
    }
    return r->in >= 0 ? (ssize_t)moved : -1;
}

/* Everything still in the pipe, once the program and what it left behind are gone. */
static void relay_rest(struct relay *r)
{
    long deadline = now_ms() + RELAY_DRAIN_MS;
    while (r->in >= 0) {
        long left = deadline - now_ms();
        if (left <= 0) {
            close(r->in);
            r->in = -1;
            break;
        }
        struct pollfd p = {.fd = r->in, .events = POLLIN};
        if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
            break;
        relay_some(r, (size_t)-1);
    }
    if (r->out >= 0)
        close(r->out);
}

/* Waits for the program to exit and returns its wait status.  A power-button press sends
 * it SIGTERM, then SIGKILL after STOP_GRACE_MS.  `sfd` is a signalfd for SIGCHLD, or -1
 * (then the loop looks again every 100 ms); without it and without buttons this is a
 * plain blocking wait, as before graceful stops existed.  The guest agent is reaped here
 * too and started again (see agent_reaped). */
static int wait_program(pid_t child, int sfd, const int *buttons, size_t nbuttons,
                        struct relay *relay)
{
    /* The relay's pipe is polled last, after the buttons. */
    struct pollfd pfds[2 + MAX_POWER_BUTTONS];
    pfds[0].fd = sfd;
    pfds[0].events = POLLIN;
    for (size_t i = 0; i < nbuttons; i++) {
        pfds[1 + i].fd = buttons[i];
        pfds[1 + i].events = POLLIN;
    }
    struct pollfd *piped = &pfds[1 + nbuttons];
    piped->fd = relay->in;
    piped->events = POLLIN;
    long relay_at = -1; /* when the pipe is polled again after a short read */
    long deadline = -1; /* set once the program was told to stop */
    int killed = 0;
    for (;;) {
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            if (pid == child)
                return st;
            agent_reaped(pid);
        }
        if (pid < 0 && errno != EINTR)
            fail("exec-failed", "waitpid: %s", strerror(errno));

        long restart = agent_restart_due();
        if (sfd < 0 && nbuttons == 0 && restart < 0 && relay->in < 0) {
            pid = waitpid(-1, &st, 0);
            if (pid == child)
                return st;
            agent_reaped(pid);
            if (pid < 0 && errno != EINTR)
                fail("exec-failed", "waitpid: %s", strerror(errno));
            continue;
        }
        long timeout = sfd < 0 ? 100 : -1;
        if (restart >= 0 && (timeout < 0 || restart < timeout))
            timeout = restart;
        if (deadline >= 0) {
            long left = deadline - now_ms();
            if (left < 0)
                left = 0;
            if (timeout < 0 || left < timeout)
                timeout = left;
        }
        if (relay_at >= 0) {
            long left = relay_at - now_ms();
            if (left <= 0) {
                relay_at = -1;
                piped->fd = relay->in;
            } else if (timeout < 0 || left < timeout) {
                timeout = left;
            }
        }
        int ready = poll(pfds, (nfds_t)(2 + nbuttons), (int)timeout);
        if (ready < 0 && errno != EINTR)
            sleep_ms(100); /* never expected; keeps the loop from spinning */
        if (ready > 0 && piped->fd >= 0 && piped->revents) {
            ssize_t moved = relay_some(relay, 16 * RELAY_CHUNK);
            if (moved < 0) {
                piped->fd = -1; /* at its end: every writer closed it */
            } else if (moved < RELAY_CHUNK) {
                /* A short read: let the program fill the pipe a while before the next one,
                 * rather than wake for every write it makes (on one vCPU the two would
                 * take turns for each few kilobytes, and each channel write is an exit). */
                piped->fd = -1;
                relay_at = now_ms() + RELAY_GATHER_MS;
            }
        }
        if (ready > 0 && (pfds[0].revents & POLLIN)) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) > 0) {
            }
        }
        int pressed = 0;
        for (size_t i = 0; ready > 0 && i < nbuttons; i++) {
            if (pfds[1 + i].fd < 0 || !pfds[1 + i].revents)
                continue;
            int r = (pfds[1 + i].revents & POLLIN) ? read_power_press(pfds[1 + i].fd) : -1;
            if (r < 0) {
                close(pfds[1 + i].fd);
                pfds[1 + i].fd = -1; /* poll skips negative descriptors */
            } else if (r > 0) {
                pressed = 1;
            }
        }
        if (pressed && deadline < 0) {
            signal_program(child, SIGTERM);
            deadline = now_ms() + STOP_GRACE_MS;
        }
        if (deadline >= 0 && now_ms() >= deadline) {
            if (killed)
                return SIGKILL; /* the status of a process killed by SIGKILL */
            signal_program(child, SIGKILL);
            killed = 1;
            deadline = now_ms() + KILL_WAIT_MS;
        }
    }
}

/* The channel the relay writes the program's output to, as the config disk names it:
 * "console", the VMM's virtio console (hvc0, made raw so no newline is translated), or
 * "virtio-serial:NAME", a port of a virtio-serial device (not a terminal: each write is one
 * buffer of up to 32 KiB handed to the host without waiting for it, where hvc0 takes 2 KiB
 * per exit and waits; QEMU/TCG measured 11.9 against 7.5 MB/s).  -1 without one, or when it
 * does not appear: the program then writes to the serial port itself, beside the kernel and
 * our markers. */
static int open_program_output(const struct config *cfg)
{
    if (!cfg->output)
        return -1;
    load_modules("console");
    if (strcmp(cfg->output, "console") == 0) {
        int fd = open("/dev/hvc0", O_WRONLY | O_NOCTTY | O_CLOEXEC);
        struct termios t;
        if (fd >= 0 && tcgetattr(fd, &t) == 0) {
            t.c_oflag &= ~(tcflag_t)OPOST;
            tcsetattr(fd, TCSANOW, &t);
        }
        return fd;
    }
    /* A multiport device announces its ports over its control queue after the driver bound. */
    long deadline = now_ms() + OUTPUT_WAIT_MS;
    for (;;) {
        int fd = open_virtio_port(cfg->output + 14, O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (fd >= 0 || now_ms() >= deadline)
            return fd;
        sleep_ms(2);
    }
}

static int run_program(const struct config *cfg)
{
    if (cfg->workdir && *cfg->workdir)
        mkdir_p(cfg->workdir, 0755);
    int fds[2];
    /* Non-blocking: a program that never died (see KILL_WAIT_MS) still holds the write end. */
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
        fail("exec-failed", "pipe: %s", strerror(errno));
    /* SIGCHLD through a signalfd, so one poll() waits for the program and the power
     * button.  Without it the wait still works (see wait_program). */
    sigset_t chld, saved;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    int sfd = -1;
    int blocked = sigprocmask(SIG_BLOCK, &chld, &saved) == 0;
    if (blocked) {
        sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
        if (sfd < 0) {
            sigprocmask(SIG_SETMASK, &saved, NULL);
            blocked = 0;
        }
    }
    /* The channel itself is opened once the program runs (below): its module and the port's
     * announcement then cost the boot nothing, and the pipe holds what the program writes
     * meanwhile. */
    struct relay relay = {.in = -1, .out = -1, .read = RELAY_CHUNK};
    int output[2] = {-1, -1};
    if (cfg->output && pipe2(output, O_CLOEXEC) == 0) {
        relay.in = output[0];
        fcntl(relay.in, F_SETFL, O_NONBLOCK);
        fcntl(relay.in, F_SETPIPE_SZ, RELAY_PIPE_BYTES);
    }
    pid_t child = fork();
    if (child < 0)
        fail("exec-failed", "fork: %s", strerror(errno));
    if (child == 0) {
        /* A blocked signal stays blocked across execve: give the program a clean mask. */
        if (blocked)
            sigprocmask(SIG_SETMASK, &saved, NULL);
        close(fds[0]);
        run_child(cfg, fds[1], output[1]);
    }
    close(fds[1]);
    if (output[1] >= 0)
        close(output[1]);
    /* What the boot did not wait for arrives once the program runs: the power button
     * first, so that a stop request is heard as early as possible, then vsock
     * and an unconfigured NIC.  Waiting for the exec (the pipe's write end closes, or a
     * failure report arrives) keeps this work from delaying program-started on a single
     * vCPU; the bound keeps a stuck child from holding the init. */
    struct pollfd exec_done = {.fd = fds[0], .events = POLLIN};
    long exec_deadline = now_ms() + EXEC_WAIT_MS;
    for (long left = EXEC_WAIT_MS; left > 0; left = exec_deadline - now_ms())
        if (poll(&exec_done, 1, (int)left) >= 0 || errno != EINTR)
            break;
    program_running = 1;
    load_modules("power");
    int buttons[MAX_POWER_BUTTONS];
    size_t nbuttons = open_power_buttons(buttons, MAX_POWER_BUTTONS);
    if (relay.in >= 0) {
        relay.out = open_program_output(cfg);
        /* A channel that never appeared: the serial port still shows the output. */
        if (relay.out < 0) {
            relay.out = dup(STDOUT_FILENO);
            relay.read = RELAY_SERIAL_READ;
        }
    }
    load_modules(NULL);
    /* After the late modules: its transport needs virtio_console or vsock. */
    sigset_t child_mask;
    if (blocked)
        child_mask = saved;
    else
        sigprocmask(SIG_SETMASK, NULL, &child_mask);
    start_first_agent(cfg, &child_mask);

    int status = wait_program(child, sfd, buttons, nbuttons, &relay);
    char report[1024];
    ssize_t n = read(fds[0], report, sizeof report - 1);
    if (n > 0) {
        report[n] = '\0';
        size_t reason_len = strlen(report);
        fail(report, "%s", (ssize_t)reason_len < n ? report + reason_len + 1 : "");
    }
    /* The program is the instance: whatever it left behind ends with it. */
    kill(-1, SIGKILL);
    relay_rest(&relay);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(void)
{
    mount_early();
    setup_console();
    marker("init-started");
    read_module_list();
    load_modules("core");

    char dev[256];
    wait_for_virtio_disks();
    if (find_disk("config", dev, sizeof dev) < 0)
        fail("no-config-disk", "no disk with serial 'config'");
    struct config cfg;
    memset(&cfg, 0, sizeof cfg);
    uint32_t len;
    unsigned char *payload = read_config_bytes(dev, &len);
    parse_config(payload, len, &cfg);

    build_root(&cfg);
    if (cfg.hostname && *cfg.hostname && sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
        fail("config-apply-failed", "hostname: %s", strerror(errno));
    setup_network(&cfg);
    write_resolv_conf(&cfg);
    write_hosts(&cfg);

    int code = run_program(&cfg);
    sync();
    marker("program-exited code=%d", code);
    power_off();
}
