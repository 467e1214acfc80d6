/*
 * libdlogd: hand a finished file to the local dlogd service.
 *
 * The library opens the file as the calling process (so the kernel checks the
 * caller's own access), passes the descriptor over the submit socket, and
 * returns once the service has made the file durable in its spool, or refused.
 * Wire format: docs/submit-protocol.md. Usage: docs/api.md.
 */
#ifndef DLOGD_H
#define DLOGD_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Submit the file at `pathname` under `keyword`.
 *
 * Returns 0 once the file is durable in the spool, or -1 with errno set:
 *   - from the service's refusal: EPROTO (bad request), ENOENT (unknown
 *     keyword), EACCES (caller not allowed), EINVAL (not a regular file, or a
 *     path with no usable basename), EFBIG (too large), EAGAIN (temporary
 *     failure, retry later), ENOSPC (spool full: limits { spool_max_size;
 *     spool_min_free; } or its disk; retry later), EIO (service-side error);
 *   - or from the failing call: open() of the file, socket()/connect() to the
 *     service, sending or receiving (ETIMEDOUT after 30 s without an answer,
 *     ECONNRESET if the service hung up, EPROTO for a malformed answer);
 *   - EINVAL for a keyword the protocol cannot carry (1-64 of [A-Za-z0-9_.-],
 *     not starting with '.' or '-'), ENAMETOOLONG for a pathname over 4096 bytes.
 *
 * The socket is $DLOGD_SOCKET if set, else /run/dlogd/submit.sock.
 * Thread-safe; a blocking call (up to 30 s per send or receive).
 */
int dlogd_submit(const char *pathname, const char *keyword);

/*
 * The message of this thread's last dlogd_submit() call: on success the spool
 * entry ("<keyword>/<entry name>"), on a refusal the service's reason, on a
 * local failure a short description. Never NULL; valid until this thread's
 * next dlogd_submit() call.
 */
const char *dlogd_last_message(void);

#ifdef __cplusplus
}
#endif

#endif /* DLOGD_H */
