/*
 * The guest agent: serves managers/agent/PROTOCOL.md on one transport.  In the guest the
 * init forks it once the program runs; built with -DAGENT_STANDALONE it is a host
 * program listening on a Unix socket (see agent.c's main).
 */
#ifndef DATAPLANE_AGENT_H
#define DATAPLANE_AGENT_H

struct agent_config {
    /* "virtio-serial:NAME" or "vsock:PORT" ("unix:PATH" in the standalone build); NULL:
     * the virtio-serial port dataplane.agent if it appears, else vsock port 1024. */
    const char *transport;
    /* What EXEC uses when the request does not say: the program's user (Docker's forms;
     * NULL is root), working directory (NULL is /) and environment (NULL-terminated). */
    const char *user;
    const char *workdir;
    char *const *envp;
};

/* 1 if spec is a transport agent_main accepts, else 0. */
int agent_transport_valid(const char *spec);

/* Runs the agent; returns only when its transport cannot be had (1) or, standalone, on
 * SIGTERM or SIGINT (0).  Blocks SIGCHLD and ignores SIGPIPE for the calling process. */
int agent_main(const struct agent_config *cfg);

#endif
