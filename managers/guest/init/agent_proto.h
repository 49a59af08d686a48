/*
 * The guest agent's wire format.  managers/agent/PROTOCOL.md is the contract; this header
 * is the guest side's only encoder and decoder of it (the host's is
 * managers/agent/protocol.py).  All integers are little-endian.
 */
#ifndef DATAPLANE_AGENT_PROTO_H
#define DATAPLANE_AGENT_PROTO_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define AGENT_MAGIC "DPGA"
#define AGENT_VERSION 1
#define AGENT_BUILD "dataplane-agent 1"
#define AGENT_HEADER_SIZE 16
#define AGENT_MAX_PAYLOAD 65536
#define AGENT_FRAME_MAX (AGENT_HEADER_SIZE + AGENT_MAX_PAYLOAD)
#define AGENT_WINDOW 262144
#define AGENT_MAX_SESSIONS 64
#define AGENT_RECORD_HEADER 5
#define AGENT_NONCE_SIZE 8
#define AGENT_STAT_SIZE 33
#define AGENT_TIME_SIZE 12
#define AGENT_TTY_SIZE 4

enum agent_type {
    AGENT_HELLO = 0x01,
    AGENT_EXEC = 0x02,
    AGENT_DATA_IN = 0x03,
    AGENT_SIGNAL = 0x04,
    AGENT_RESIZE = 0x05,
    AGENT_CREDIT = 0x06,
    AGENT_WRITE_FILE = 0x07,
    AGENT_READ_FILE = 0x08,
    AGENT_STAT = 0x09,
    AGENT_SET_TIME = 0x0A,
    AGENT_CLOSE = 0x0B,
    AGENT_PING = 0x0C,
    AGENT_MOUNT = 0x0D,
    AGENT_UMOUNT = 0x0E,
    AGENT_HELLO_OK = 0x81,
    AGENT_STARTED = 0x82,
    AGENT_DATA_OUT = 0x83,
    AGENT_STDERR = 0x84,
    AGENT_EXIT = 0x85,
    AGENT_ERROR = 0x86,
    AGENT_DONE = 0x87,
    AGENT_STAT_RESULT = 0x88,
    AGENT_CREDIT_OUT = 0x89,
    AGENT_PONG = 0x8A,
};

enum agent_tag {
    AGENT_TAG_NONCE = 1,
    AGENT_TAG_VERSION = 2,
    AGENT_TAG_AGENT = 3,
    AGENT_TAG_ARG = 4,
    AGENT_TAG_ENV = 5,
    AGENT_TAG_WORKDIR = 6,
    AGENT_TAG_USER = 7,
    AGENT_TAG_TTY = 8,
    AGENT_TAG_PATH = 9,
    AGENT_TAG_MODE = 10,
    AGENT_TAG_SIGNAL = 11,
    AGENT_TAG_EXIT_CODE = 12,
    AGENT_TAG_EXIT_SIGNAL = 13,
    AGENT_TAG_PID = 14,
    AGENT_TAG_TIME = 15,
    AGENT_TAG_STAT = 16,
    AGENT_TAG_LINK = 17,
    AGENT_TAG_CREDIT = 18,
    AGENT_TAG_ERRNO = 19,
    AGENT_TAG_MESSAGE = 20,
    AGENT_TAG_DEVICE = 21,
    AGENT_TAG_READONLY = 22,
};

/* STAT's type byte. */
enum agent_file_type {
    AGENT_FILE_REGULAR = 1,
    AGENT_FILE_DIRECTORY = 2,
    AGENT_FILE_SYMLINK = 3,
    AGENT_FILE_CHAR = 4,
    AGENT_FILE_BLOCK = 5,
    AGENT_FILE_FIFO = 6,
    AGENT_FILE_SOCKET = 7,
};

static inline uint16_t agent_get16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t agent_get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t agent_get64(const unsigned char *p)
{
    return (uint64_t)agent_get32(p) | (uint64_t)agent_get32(p + 4) << 32;
}

static inline void agent_put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void agent_put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static inline void agent_put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* --------------------------------------------------------------- frames */

struct agent_header {
    uint8_t type;
    uint32_t stream;
    uint32_t length;
};

/* 0, or -1 when the 16 bytes at p are not a valid header (a protocol error). */
static inline int agent_header_decode(const unsigned char *p, struct agent_header *h)
{
    if (memcmp(p, AGENT_MAGIC, 4) != 0 || p[5] != 0 || agent_get16(p + 6) != 0)
        return -1;
    h->type = p[4];
    h->stream = agent_get32(p + 8);
    h->length = agent_get32(p + 12);
    return h->length <= AGENT_MAX_PAYLOAD ? 0 : -1;
}

static inline void agent_header_encode(unsigned char *p, uint8_t type, uint32_t stream, uint32_t length)
{
    memcpy(p, AGENT_MAGIC, 4);
    p[4] = type;
    p[5] = 0;
    agent_put16(p + 6, 0);
    agent_put32(p + 8, stream);
    agent_put32(p + 12, length);
}

/* -------------------------------------------------------------- records */

struct agent_record {
    uint8_t tag;
    uint32_t length;
    const unsigned char *value;
};

/* Reads the record at *off of a payload: 1 and the record, 0 at the end, -1 when the
 * list is malformed (a truncated header or a value running past the payload). */
static inline int agent_record_next(const unsigned char *payload, size_t len, size_t *off,
                                    struct agent_record *r)
{
    if (*off == len)
        return 0;
    if (len - *off < AGENT_RECORD_HEADER)
        return -1;
    const unsigned char *p = payload + *off;
    uint32_t vlen = agent_get32(p + 1);
    if (vlen > len - *off - AGENT_RECORD_HEADER)
        return -1;
    r->tag = p[0];
    r->length = vlen;
    r->value = p + AGENT_RECORD_HEADER;
    *off += AGENT_RECORD_HEADER + vlen;
    return 1;
}

/* A record list built in a caller's buffer.  A record that does not fit is left out and
 * `overflow` set, so a writer never runs past its buffer. */
struct agent_writer {
    unsigned char *buf;
    size_t cap;
    size_t len;
    int overflow;
};

static inline void agent_put_record(struct agent_writer *w, uint8_t tag, const void *value, size_t len)
{
    if (len > UINT32_MAX || w->cap - w->len < AGENT_RECORD_HEADER ||
        w->cap - w->len - AGENT_RECORD_HEADER < len) {
        w->overflow = 1;
        return;
    }
    w->buf[w->len] = tag;
    agent_put32(w->buf + w->len + 1, (uint32_t)len);
    if (len)
        memcpy(w->buf + w->len + AGENT_RECORD_HEADER, value, len);
    w->len += AGENT_RECORD_HEADER + len;
}

static inline void agent_put_u32_record(struct agent_writer *w, uint8_t tag, uint32_t v)
{
    unsigned char b[4];
    agent_put32(b, v);
    agent_put_record(w, tag, b, sizeof b);
}

static inline void agent_put_text_record(struct agent_writer *w, uint8_t tag, const char *s)
{
    agent_put_record(w, tag, s, strlen(s));
}

struct agent_stat {
    uint8_t type;
    uint32_t mode, uid, gid;
    uint64_t size;
    int64_t mtime_sec;
    uint32_t mtime_nsec;
};

static inline void agent_put_stat_record(struct agent_writer *w, const struct agent_stat *st)
{
    unsigned char b[AGENT_STAT_SIZE];
    b[0] = st->type;
    agent_put32(b + 1, st->mode);
    agent_put32(b + 5, st->uid);
    agent_put32(b + 9, st->gid);
    agent_put64(b + 13, st->size);
    agent_put64(b + 21, (uint64_t)st->mtime_sec);
    agent_put32(b + 29, st->mtime_nsec);
    agent_put_record(w, AGENT_TAG_STAT, b, sizeof b);
}

#endif
