/*
 * Mock libxenevtchn.so.1 for the pyxen9p test suite.
 *
 * Exports exactly the functions of Debian's libxenevtchn.so.1 (Xen 4.17),
 * with the same symbol versions; the shared state lives in libmockxen.so
 * (see mockxen_common.c).  Each handle owns a FIFO in $MOCKXEN_DIR whose
 * read end is xenevtchn_fd(): it is readable exactly while an event is
 * queued, and xenevtchn_pending() reads the next queued port (blocking,
 * like the real read(2) of /dev/xen/evtchn, while nothing is queued).
 *
 * When <xenevtchn.h> (libxen-dev) is installed it is included, so the
 * compiler checks every prototype below against the real header.
 */
#define _GNU_SOURCE
#include "mockxen_common.h"

#include <errno.h>
#include <unistd.h>

#if __has_include(<xenevtchn.h>) && !defined(MOCKXEN_NO_SYSTEM_HEADERS)
#include <xenevtchn.h>
#else
struct xentoollog_logger;
typedef uint32_t evtchn_port_t;
typedef uint16_t domid_t;
typedef int xenevtchn_port_or_error_t;
typedef struct xenevtchn_handle xenevtchn_handle;
#define XENEVTCHN_NO_CLOEXEC (1 << 0)
#endif

struct xenevtchn_handle {
    struct mx_handle h;
};

#define API __attribute__((visibility("default")))

#define ENTER(name, handle, failret)                                                           \
    int err_ = mockxen__enter(name);                                                           \
    if (err_) {                                                                                \
        errno = err_;                                                                          \
        return failret;                                                                        \
    }                                                                                          \
    mockxen__lock();                                                                           \
    err_ = mockxen__check((handle), MX_KIND_EVTCHN);                                           \
    if (err_) {                                                                                \
        mockxen__unlock();                                                                     \
        errno = err_;                                                                          \
        return failret;                                                                        \
    }

/* rc is a port / 0 (success) or -errno */
static int leave(int rc)
{
    mockxen__unlock();
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return rc;
}

API xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    struct mx_handle *h;
    int err = mockxen__enter("xenevtchn_open");
    (void)logger;
    if (err) {
        errno = err;
        return NULL;
    }
    if (flags & ~(unsigned int)XENEVTCHN_NO_CLOEXEC) {
        errno = EINVAL;
        return NULL;
    }
    mockxen__lock();
    h = mockxen__open(MX_KIND_EVTCHN, !(flags & XENEVTCHN_NO_CLOEXEC));
    err = errno;
    mockxen__unlock();
    if (!h)
        errno = err;
    return (xenevtchn_handle *)h;
}

API xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd,
                                       unsigned open_flags)
{
    struct mx_handle *h;
    int err = mockxen__enter("xenevtchn_fdopen");
    (void)logger;
    if (err) {
        errno = err;
        return NULL;
    }
    if (open_flags) {
        errno = EINVAL; /* XENEVTCHN_NO_CLOEXEC is rejected, others are unknown */
        return NULL;
    }
    mockxen__lock();
    h = mockxen__fdopen_evtchn(fd);
    err = errno;
    mockxen__unlock();
    if (!h)
        errno = err;
    return (xenevtchn_handle *)h;
}

API int xenevtchn_close(xenevtchn_handle *xce)
{
    int injected, err;
    if (!xce)
        return 0;
    injected = mockxen__enter("xenevtchn_close");
    mockxen__lock();
    err = mockxen__check(xce, MX_KIND_EVTCHN);
    if (!err)
        err = mockxen__close(&xce->h);
    mockxen__unlock();
    if (injected)
        err = injected; /* closed anyway, as the real library frees the handle */
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

API int xenevtchn_fd(xenevtchn_handle *xce)
{
    ENTER("xenevtchn_fd", xce, -1);
    return leave(xce->h.fd);
}

API int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    ENTER("xenevtchn_notify", xce, -1);
    return leave(mockxen__evtchn_notify(&xce->h, port));
}

API xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    ENTER("xenevtchn_bind_unbound_port", xce, -1);
    return leave(mockxen__evtchn_bind_unbound(&xce->h, domid));
}

API xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                         evtchn_port_t remote_port)
{
    ENTER("xenevtchn_bind_interdomain", xce, -1);
    return leave(mockxen__evtchn_bind_interdomain(&xce->h, domid, remote_port));
}

API xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    ENTER("xenevtchn_bind_virq", xce, -1);
    return leave(mockxen__evtchn_bind_virq(&xce->h, virq));
}

API int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    ENTER("xenevtchn_unbind", xce, -1);
    return leave(mockxen__evtchn_unbind(&xce->h, port));
}

API xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    uint32_t port;
    ssize_t n;
    int fd;
    ENTER("xenevtchn_pending", xce, -1);
    fd = xce->h.fd;
    mockxen__unlock(); /* the read may block: never hold the lock there */
    n = read(fd, &port, sizeof(port));
    if (n != (ssize_t)sizeof(port)) {
        if (n >= 0)
            errno = EIO;
        return -1;
    }
    return (xenevtchn_port_or_error_t)port;
}

API int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    ENTER("xenevtchn_unmask", xce, -1);
    return leave(mockxen__evtchn_unmask(&xce->h, port));
}

API int xenevtchn_restrict(xenevtchn_handle *xce, domid_t domid)
{
    ENTER("xenevtchn_restrict", xce, -1);
    return leave(mockxen__evtchn_restrict(&xce->h, domid));
}
