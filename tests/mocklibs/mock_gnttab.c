/*
 * Mock libxengnttab.so.1 for the pyxen9p test suite.
 *
 * Exports exactly the functions of Debian's libxengnttab.so.1 (Xen 4.17),
 * with the same symbol versions; the work is done by libmockxen.so (see
 * mockxen_common.c for the model, the environment variables and the
 * mockxen_* control functions, reachable through this library's handle).
 *
 * When <xengnttab.h> (libxen-dev) is installed it is included, so the
 * compiler checks every prototype below against the real header.
 */
#define _GNU_SOURCE
#include "mockxen_common.h"

#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>

#if __has_include(<xengnttab.h>) && !defined(MOCKXEN_NO_SYSTEM_HEADERS)
#include <xengnttab.h>
#else
struct xentoollog_logger;
typedef uint32_t evtchn_port_t;
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntdev_handle xengntshr_handle;
typedef struct xengnttab_grant_copy_segment {
    union xengnttab_copy_ptr {
        void *virt;
        struct {
            uint32_t ref;
            uint16_t offset;
            uint16_t domid;
        } foreign;
    } source, dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
} xengnttab_grant_copy_segment_t;
#endif

_Static_assert(sizeof(xengnttab_grant_copy_segment_t) == 24, "grant copy segment layout");
_Static_assert(offsetof(xengnttab_grant_copy_segment_t, len) == 16, "grant copy segment layout");

struct xengntdev_handle {
    struct mx_handle h;
};

#define API __attribute__((visibility("default")))

/* Common prologue: count the call, apply an injected failure, check the
 * handle.  On failure sets errno and returns @failret. */
#define ENTER(name, handle, kind, failret)                                                     \
    int err_ = mockxen__enter(name);                                                           \
    if (err_) {                                                                                \
        errno = err_;                                                                          \
        return failret;                                                                        \
    }                                                                                          \
    mockxen__lock();                                                                           \
    err_ = mockxen__check((handle), (kind));                                                   \
    if (err_) {                                                                                \
        mockxen__unlock();                                                                     \
        errno = err_;                                                                          \
        return failret;                                                                        \
    }

#define LEAVE_PTR(ptr, err)                                                                    \
    do {                                                                                       \
        void *p_ = (ptr);                                                                      \
        int e_ = (err);                                                                        \
        mockxen__unlock();                                                                     \
        if (!p_)                                                                               \
            errno = e_;                                                                        \
        return p_;                                                                             \
    } while (0)

#define LEAVE_INT(err)                                                                         \
    do {                                                                                       \
        int e_ = (err);                                                                        \
        mockxen__unlock();                                                                     \
        if (e_) {                                                                              \
            errno = e_;                                                                        \
            return -1;                                                                         \
        }                                                                                      \
        return 0;                                                                              \
    } while (0)

static void *open_kind(const char *name, int kind, int cloexec)
{
    struct mx_handle *h;
    int err = mockxen__enter(name);
    if (err) {
        errno = err;
        return NULL;
    }
    mockxen__lock();
    h = mockxen__open(kind, cloexec);
    err = errno;
    mockxen__unlock();
    if (!h)
        errno = err;
    return h;
}

static int close_kind(const char *name, void *handle, int kind)
{
    int injected, err;
    if (!handle)
        return 0;
    injected = mockxen__enter(name);
    mockxen__lock();
    err = mockxen__check(handle, kind);
    if (!err)
        err = mockxen__close(handle);
    mockxen__unlock();
    /* an injected failure still closes: the real library frees the handle
     * whatever close(2) returns */
    if (injected)
        err = injected;
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

/* ---- xengnttab (gntdev) ---- */

API xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return open_kind("xengnttab_open", MX_KIND_GNTTAB, 1);
}

API int xengnttab_close(xengnttab_handle *xgt)
{
    return close_kind("xengnttab_close", xgt, MX_KIND_GNTTAB);
}

API int xengnttab_fd(xengnttab_handle *xgt)
{
    int fd;
    ENTER("xengnttab_fd", xgt, MX_KIND_GNTTAB, -1);
    fd = xgt->h.fd;
    mockxen__unlock();
    return fd;
}

static void *map(const char *name, xengnttab_handle *xgt, uint32_t count, const uint32_t *domids,
                 int stride, const uint32_t *refs, int prot, uint32_t notify_offset,
                 evtchn_port_t notify_port)
{
    void *addr;
    int err;
    ENTER(name, xgt, MX_KIND_GNTTAB, NULL);
    addr = mockxen__map(&xgt->h, count, domids, stride, refs, prot, notify_offset, notify_port,
                        &err);
    LEAVE_PTR(addr, err);
}

API void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return map("xengnttab_map_grant_ref", xgt, 1, &domid, 0, &ref, prot, MX_NONE, MX_NONE);
}

API void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                                   uint32_t *refs, int prot)
{
    return map("xengnttab_map_grant_refs", xgt, count, domids, 1, refs, prot, MX_NONE, MX_NONE);
}

API void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                          uint32_t *refs, int prot)
{
    return map("xengnttab_map_domain_grant_refs", xgt, count, &domid, 0, refs, prot, MX_NONE,
               MX_NONE);
}

API void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                         int prot, uint32_t notify_offset,
                                         evtchn_port_t notify_port)
{
    return map("xengnttab_map_grant_ref_notify", xgt, 1, &domid, 0, &ref, prot, notify_offset,
               notify_port);
}

API int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    ENTER("xengnttab_unmap", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(mockxen__unmap(&xgt->h, start_address, count));
}

API int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    /* pvops kernels have no such limit (the library ignores their ENOTTY) */
    ENTER("xengnttab_set_max_grants", xgt, MX_KIND_GNTTAB, -1);
    xgt->h.max_grants = nr_grants;
    LEAVE_INT(0);
}

API int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                             xengnttab_grant_copy_segment_t *segs)
{
    ENTER("xengnttab_grant_copy", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(mockxen__grant_copy(&xgt->h, count, segs));
}

/* dma-buf export/import is not modelled: ENOSYS, as on Mini-OS */
API int xengnttab_dmabuf_exp_from_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t flags,
                                       uint32_t count, const uint32_t *refs, uint32_t *fd)
{
    (void)domid, (void)flags, (void)count, (void)refs, (void)fd;
    ENTER("xengnttab_dmabuf_exp_from_refs", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(ENOSYS);
}

API int xengnttab_dmabuf_exp_wait_released(xengnttab_handle *xgt, uint32_t fd,
                                           uint32_t wait_to_ms)
{
    (void)fd, (void)wait_to_ms;
    ENTER("xengnttab_dmabuf_exp_wait_released", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(ENOSYS);
}

API int xengnttab_dmabuf_imp_to_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t fd,
                                     uint32_t count, uint32_t *refs)
{
    (void)domid, (void)fd, (void)count, (void)refs;
    ENTER("xengnttab_dmabuf_imp_to_refs", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(ENOSYS);
}

API int xengnttab_dmabuf_imp_release(xengnttab_handle *xgt, uint32_t fd)
{
    (void)fd;
    ENTER("xengnttab_dmabuf_imp_release", xgt, MX_KIND_GNTTAB, -1);
    LEAVE_INT(ENOSYS);
}

/* ---- xengntshr (gntalloc) ---- */

API xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    /* the real library opens /dev/xen/gntalloc without O_CLOEXEC */
    return open_kind("xengntshr_open", MX_KIND_GNTSHR, 0);
}

API int xengntshr_close(xengntshr_handle *xgs)
{
    return close_kind("xengntshr_close", xgs, MX_KIND_GNTSHR);
}

API int xengntshr_fd(xengntshr_handle *xgs)
{
    int fd;
    ENTER("xengntshr_fd", xgs, MX_KIND_GNTSHR, -1);
    fd = xgs->h.fd;
    mockxen__unlock();
    return fd;
}

API void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                                int writable)
{
    void *addr;
    int err;
    ENTER("xengntshr_share_pages", xgs, MX_KIND_GNTSHR, NULL);
    addr = mockxen__share(&xgs->h, domid, count, refs, writable, MX_NONE, MX_NONE, &err);
    LEAVE_PTR(addr, err);
}

API void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                      int writable, uint32_t notify_offset,
                                      evtchn_port_t notify_port)
{
    void *addr;
    int err;
    ENTER("xengntshr_share_page_notify", xgs, MX_KIND_GNTSHR, NULL);
    addr = mockxen__share(&xgs->h, domid, 1, ref, writable, notify_offset, notify_port, &err);
    LEAVE_PTR(addr, err);
}

API int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    ENTER("xengntshr_unshare", xgs, MX_KIND_GNTSHR, -1);
    LEAVE_INT(mockxen__unshare(&xgs->h, start_address, count));
}
