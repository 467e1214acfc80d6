/*
 * libdlogd: the C caller of the local submit protocol (docs/submit-protocol.md).
 *
 * Place in the flow: an application calls dlogd_submit(); this file opens the
 * file as the caller, connects to /run/dlogd/submit.sock (one dlogd-submit@
 * instance per connection), passes the descriptor with the request and maps
 * the service's answer onto errno. It is the C twin of dlogd/client.py.
 *
 * Only dlogd_submit() and dlogd_last_message() are exported (the build uses
 * -fvisibility=hidden). Every descriptor is CLOEXEC and closed on every path;
 * sends use MSG_NOSIGNAL so a vanished service is an error, not a SIGPIPE.
 */
#define _GNU_SOURCE
#include "dlogd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DLOGD_EXPORT __attribute__((visibility("default")))

#define DEFAULT_SOCKET "/run/dlogd/submit.sock"
#define REQUEST_MAGIC "DLS1"
#define RESPONSE_MAGIC "DLR1"
#define MAGIC_SIZE 4
#define REQUEST_HEADER_SIZE 8
#define RESPONSE_HEADER_SIZE 16
#define MAX_KEYWORD 64
#define MAX_PATH 4096
#define MAX_MESSAGE 4096
#define IO_TIMEOUT_SECONDS 30
/* The default unit copies into the spool and fsyncs before it answers: wait a
 * slow disk's time for the file on top of the timeout (as the Python client). */
#define COPY_RATE (20L * 1024 * 1024)

/* The server's message (or a local reason) for this thread's last call. */
static __thread char last_message[MAX_MESSAGE + 1];

/* errno for each response code, indexed by code; docs/submit-protocol.md's table. */
static const int code_errno[] = {
    0,      /* OK */
    EPROTO, /* BAD_REQUEST */
    ENOENT, /* UNKNOWN_KEYWORD */
    EACCES, /* PERMISSION_DENIED */
    EINVAL, /* NOT_REGULAR_FILE */
    EFBIG,  /* TOO_LARGE */
    EINVAL, /* BAD_NAME */
    EAGAIN, /* TEMPORARY_FAILURE */
    EIO,    /* INTERNAL */
    ENOSPC, /* SPOOL_FULL: a spool quota (or the spool's disk); nothing spooled is dropped */
};
#define CODE_COUNT (sizeof code_errno / sizeof code_errno[0])

__attribute__((format(printf, 1, 2))) static void set_message(const char *fmt, ...)
{
    int saved = errno; /* callers set errno before describing it with %m */
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(last_message, sizeof last_message, fmt, ap);
    va_end(ap);
    errno = saved;
}

/* Fail with `err`, describing it; returns -1 for the caller to pass on. */
__attribute__((format(printf, 2, 3))) static int fail(int err, const char *fmt, ...)
{
    va_list ap;

    errno = err;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof last_message, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

static void close_keep_errno(int fd)
{
    int saved = errno;

    close(fd);
    errno = saved;
}

static int keyword_valid(const char *keyword, size_t len)
{
    /* As submitwire.KEYWORD_RE: a leading '-' is refused too, not only '.'. */
    if (len < 1 || len > MAX_KEYWORD || keyword[0] == '.' || keyword[0] == '-')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = keyword[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '_' || c == '.' || c == '-';
        if (!ok)
            return 0;
    }
    return 1;
}

static int open_file(const char *pathname)
{
    /* O_NONBLOCK: a FIFO must not hang the open; the service refuses it anyway.
     * No O_NOFOLLOW: the caller may submit through a symlink it can read; the
     * service works from this descriptor, never the name. */
    int fd;

    do
        fd = open(pathname, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        set_message("cannot open %s: %m", pathname);
    return fd;
}

static const char *socket_path(void)
{
    const char *env = getenv("DLOGD_SOCKET");

    return env && *env ? env : DEFAULT_SOCKET;
}

static __thread long answer_timeout = IO_TIMEOUT_SECONDS; /* this call's wait for an answer */

static int set_timeouts(int sock)
{
    struct timeval tv = {.tv_sec = IO_TIMEOUT_SECONDS, .tv_usec = 0};

    if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return -1;
    return 0;
}

static int set_answer_timeout(int sock, long seconds)
{
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};

    return setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

static int connect_service(void)
{
    const char *path = socket_path();
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    int sock, rc;

    if (len >= sizeof addr.sun_path)
        return fail(ENAMETOOLONG, "socket path too long: %s", path);
    memcpy(addr.sun_path, path, len + 1);

    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        set_message("cannot create socket: %m");
        return -1;
    }
    if (set_timeouts(sock) < 0) {
        set_message("cannot set socket timeouts: %m");
        close_keep_errno(sock);
        return -1;
    }
    /* An AF_UNIX connect only blocks on a full backlog; Linux retries cleanly. */
    do
        rc = connect(sock, (struct sockaddr *)&addr, sizeof addr);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        set_message("cannot reach dlogd at %s: %m", path);
        close_keep_errno(sock);
        return -1;
    }
    return sock;
}

/* A send/receive timeout shows as EAGAIN, which would read as TEMPORARY_FAILURE. */
static int io_errno(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK ? ETIMEDOUT : err;
}

static int send_all(int sock, const unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(sock, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(io_errno(errno), "sending to dlogd failed: %m");
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The fixed header with the descriptor in one sendmsg(); returns bytes sent. */
static ssize_t send_header_with_fd(int sock, int fd, const unsigned char *header)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = (void *)header, .iov_len = REQUEST_HEADER_SIZE};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cmsg;
    ssize_t n;

    memset(&control, 0, sizeof control);
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));

    /* EINTR means nothing was sent (not even the descriptor): retry whole. */
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return fail(io_errno(errno), "sending to dlogd failed: %m");
    return n;
}

static int send_request(int sock, int fd, const char *keyword, size_t klen, const char *path,
                        size_t plen)
{
    unsigned char buf[REQUEST_HEADER_SIZE + MAX_KEYWORD + MAX_PATH];
    ssize_t sent;

    memcpy(buf, REQUEST_MAGIC, MAGIC_SIZE);
    buf[4] = (unsigned char)(klen >> 8);
    buf[5] = (unsigned char)klen;
    buf[6] = (unsigned char)(plen >> 8);
    buf[7] = (unsigned char)plen;
    memcpy(buf + REQUEST_HEADER_SIZE, keyword, klen);
    memcpy(buf + REQUEST_HEADER_SIZE + klen, path, plen);

    sent = send_header_with_fd(sock, fd, buf);
    if (sent < 0)
        return -1;
    /* The descriptor rode on the first byte; the rest follows plainly. */
    return send_all(sock, buf + sent, REQUEST_HEADER_SIZE + klen + plen - (size_t)sent);
}

static int recv_all(int sock, unsigned char *buf, size_t len)
{
    while (len > 0) {
        /* Plain recv(): any descriptor a rogue peer attaches is discarded by the kernel. */
        ssize_t n = recv(sock, buf, len, 0);
        if (n == 0)
            return fail(ECONNRESET, "dlogd closed the connection before answering");
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return fail(ETIMEDOUT, "dlogd did not answer within %ld s (the file may "
                            "still have been spooled)", answer_timeout);
            return fail(errno, "receiving from dlogd failed: %m");
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads one answer into last_message; returns 0 for OK, else -1 with errno set. */
static int read_response(int sock)
{
    unsigned char header[RESPONSE_HEADER_SIZE];
    unsigned code;
    size_t mlen;

    if (recv_all(sock, header, sizeof header) < 0)
        return -1;
    code = header[4];
    mlen = ((size_t)header[6] << 8) | header[7];
    if (memcmp(header, RESPONSE_MAGIC, MAGIC_SIZE) != 0)
        return fail(EPROTO, "malformed answer from dlogd: bad magic");
    if (code >= CODE_COUNT)
        return fail(EPROTO, "malformed answer from dlogd: unknown code %u", code);
    if (mlen > MAX_MESSAGE)
        return fail(EPROTO, "malformed answer from dlogd: message length %zu", mlen);
    if (header[5] != 0)
        return fail(EPROTO, "malformed answer from dlogd: reserved byte %u", header[5]);
    if (code != 0 && memcmp(header + 8, "\0\0\0\0\0\0\0\0", 8) != 0)
        return fail(EPROTO, "malformed answer from dlogd: a refusal with a size");
    if (recv_all(sock, (unsigned char *)last_message, mlen) < 0)
        return -1;
    last_message[mlen] = '\0';
    if (code != 0) {
        errno = code_errno[code];
        return -1;
    }
    return 0;
}

static int submit_fd(int fd, const char *pathname, size_t plen, const char *keyword, size_t klen)
{
    int sock = connect_service();
    int rc;

    if (sock < 0)
        return -1;
    rc = send_request(sock, fd, keyword, klen, pathname, plen);
    if (rc == 0) {
        struct stat st;

        answer_timeout = IO_TIMEOUT_SECONDS;
        if (fstat(fd, &st) == 0 && st.st_size > 0)
            answer_timeout += (long)(st.st_size / COPY_RATE);
        /* No more requests: lets the service flush without waiting for more. */
        shutdown(sock, SHUT_WR);
        rc = set_answer_timeout(sock, answer_timeout) < 0
                 ? fail(errno, "cannot set socket timeout: %m")
                 : read_response(sock);
    }
    close_keep_errno(sock);
    return rc;
}

DLOGD_EXPORT int dlogd_submit(const char *pathname, const char *keyword)
{
    size_t klen, plen;
    int fd, rc;

    last_message[0] = '\0';
    if (!pathname || !keyword)
        return fail(EINVAL, "pathname and keyword are required");
    klen = strlen(keyword);
    plen = strlen(pathname);
    if (!keyword_valid(keyword, klen))
        return fail(EINVAL, "keyword must be 1-%d of [A-Za-z0-9_.-], not starting with '.' or '-'",
                    MAX_KEYWORD);
    if (plen > MAX_PATH)
        return fail(ENAMETOOLONG, "pathname over %d bytes", MAX_PATH);

    fd = open_file(pathname);
    if (fd < 0)
        return -1;
    rc = submit_fd(fd, pathname, plen, keyword, klen);
    close_keep_errno(fd);
    return rc;
}

DLOGD_EXPORT const char *dlogd_last_message(void)
{
    return last_message;
}
