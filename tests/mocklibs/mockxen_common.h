/*
 * mockxen: user-space stand-ins for libxengnttab.so.1 and libxenevtchn.so.1.
 *
 * Shared declarations of libmockxen.so, the library that holds the state
 * machinery used by both mock libraries (see mockxen_common.c for the model).
 *
 * Part of the pyxen9p test suite; not installed.
 */
#ifndef MOCKXEN_COMMON_H
#define MOCKXEN_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MX_EXPORT __attribute__((visibility("default")))

#define MX_PAGE 4096u
#define MX_NONE 0xFFFFFFFFu         /* "no notify offset / port" */
#define MX_FIRST_REF 8u             /* refs 0..7 are reserved, as in Linux */
#define MX_MAX_HANDLES 1024u
#define MX_MAX_GRANTS 8192u         /* grant slots (pages) in one MOCKXEN_DIR */
#define MX_MAX_MAPS 16384u          /* mapped pages in one MOCKXEN_DIR */
#define MX_MAX_PORTS 4096u          /* port entries in one MOCKXEN_DIR */
#define MX_PORTS_PER_DOMAIN 4096u   /* 2-level event channel ABI, 64-bit guest */
#define MX_NR_VIRQS 24u
#define MX_DOMID_FIRST_RESERVED 0x7FF0u
#define MX_DOMID_SELF 0x7FF0u
#define MX_UNRESTRICTED 0xFFFFu
#define MX_DEFAULT_GRANT_LIMIT 1024u /* xen_gntalloc.limit default */

enum mx_kind { MX_KIND_GNTTAB = 1, MX_KIND_GNTSHR = 2, MX_KIND_EVTCHN = 3 };

/* A handle as the process sees it.  Never freed: a closed handle keeps its
 * memory so that use after close is reported (EBADF) instead of crashing. */
struct mx_ctx;
struct mx_handle {
    uint32_t magic;
    int kind;
    int closed;
    uint32_t id;            /* record id in the shared state */
    uint32_t domid;
    int fd;
    uint32_t max_grants;
    struct mx_ctx *ctx;
    struct mx_handle *next;
};

/* ---- internal API of libmockxen.so (prefix mockxen__) ---- */

/* Counts the call, applies injected failures: returns 0 or an errno. */
MX_EXPORT int mockxen__enter(const char *function);

/* The per-process lock held by every entry point (not while blocking). */
MX_EXPORT void mockxen__lock(void);
MX_EXPORT void mockxen__unlock(void);

/* Open a handle of @kind in $MOCKXEN_DIR as domain $MOCKXEN_DOMID.
 * Returns NULL with errno set.  Caller holds mockxen__lock. */
MX_EXPORT struct mx_handle *mockxen__open(int kind, int cloexec);
/* Adopt an evtchn descriptor opened by another handle (xenevtchn_fdopen). */
MX_EXPORT struct mx_handle *mockxen__fdopen_evtchn(int fd);
/* Validate a handle pointer: 0 or an errno (EBADF when closed/unknown). */
MX_EXPORT int mockxen__check(const void *handle, int kind);
/* Close: 0 or an errno (the handle is closed in every case). */
MX_EXPORT int mockxen__close(struct mx_handle *h);

/* gntdev */
MX_EXPORT void *mockxen__map(struct mx_handle *h, uint32_t count, const uint32_t *domids,
                             int domid_stride, const uint32_t *refs, int prot,
                             uint32_t notify_offset, uint32_t notify_port, int *err);
MX_EXPORT int mockxen__unmap(struct mx_handle *h, void *addr, uint32_t count);
MX_EXPORT int mockxen__grant_copy(struct mx_handle *h, uint32_t count, void *segs);

/* gntalloc */
MX_EXPORT void *mockxen__share(struct mx_handle *h, uint32_t domid, int count, uint32_t *refs,
                               int writable, uint32_t notify_offset, uint32_t notify_port,
                               int *err);
MX_EXPORT int mockxen__unshare(struct mx_handle *h, void *addr, uint32_t count);

/* evtchn: each returns a port (>= 0) or -errno */
MX_EXPORT int mockxen__evtchn_notify(struct mx_handle *h, uint32_t port);
MX_EXPORT int mockxen__evtchn_bind_unbound(struct mx_handle *h, uint32_t remote_domid);
MX_EXPORT int mockxen__evtchn_bind_interdomain(struct mx_handle *h, uint32_t remote_domid,
                                               uint32_t remote_port);
MX_EXPORT int mockxen__evtchn_bind_virq(struct mx_handle *h, unsigned int virq);
MX_EXPORT int mockxen__evtchn_unbind(struct mx_handle *h, uint32_t port);
MX_EXPORT int mockxen__evtchn_unmask(struct mx_handle *h, uint32_t port);
MX_EXPORT int mockxen__evtchn_restrict(struct mx_handle *h, uint32_t domid);

/* ---- control API (see mockxen_common.c for the documentation) ---- */
MX_EXPORT int mockxen_fail(const char *function, int nth, int err);
MX_EXPORT void mockxen_reset(void);
MX_EXPORT int mockxen_calls(const char *function);
MX_EXPORT int mockxen_live_grants(void);
MX_EXPORT int mockxen_live_mappings(void);
MX_EXPORT int mockxen_live_ports(void);
MX_EXPORT int mockxen_live_handles(void);
MX_EXPORT int mockxen_misuse(void);
MX_EXPORT int mockxen_purge(void);
MX_EXPORT int mockxen_dir_live(const char *dir, const char *what);
MX_EXPORT int mockxen_gc(const char *dir);
MX_EXPORT int mockxen_raise_virq(const char *dir, uint32_t domid, unsigned int virq);

#endif
