/*
 * libmockxen.so: the state machinery behind the mock libxengnttab.so.1 and
 * libxenevtchn.so.1 of the pyxen9p test suite.
 *
 * MODEL
 * -----
 * A "Xen system" is a directory, $MOCKXEN_DIR, read when a handle is opened;
 * the caller is domain $MOCKXEN_DOMID (default 0), also read at open time, so
 * one process may hold handles of several domains.  Opening without
 * $MOCKXEN_DIR (or with a directory that does not exist) fails with ENOENT,
 * like the real libraries without /dev/xen.  The directory holds:
 *
 *   lock        flock(2)ed around every access to the shared state
 *   state       struct mx_state, mmap(MAP_SHARED): the handle, grant, mapped
 *               page and event-channel port tables
 *   pages       the grant pages (slot N at offset N*4096, sparse); sharing
 *               and mapping both mmap(MAP_SHARED) the slot, so the memory is
 *               really shared between handles and processes
 *   gntdev, gntalloc
 *               plain files standing in for the device nodes (the
 *               descriptors returned by xengnttab_fd / xengntshr_fd)
 *   evtchn.<id> a FIFO per event-channel handle: its read end is the handle's
 *               xenevtchn_fd; a delivered event is the 4-byte port written
 *               into it, and xenevtchn_pending reads it back
 *
 * Grants: refs are slot + 8, so refs 0..7 are never handed out (as in
 * Linux).  A grant is ACTIVE from share to unshare; if the peer still maps
 * it then, it becomes ENDED and its slot stays allocated until the last
 * mapping goes (Linux defers the free the same way).  At most
 * $MOCKXEN_GRANT_LIMIT (read when the directory is first used; default 1024,
 * the gntalloc default) grants per granting domain exist at once: ENOSPC.
 *
 * Event channels follow Xen + Linux's evtchn driver: ports are per domain,
 * lowest free first; delivering an event masks the port and queues it; an
 * event on a masked port only sets its pending bit, which the unmask turns
 * into one new delivery; bind_interdomain leaves the new local port pending
 * (Xen does so in case the remote end already signalled); unbinding an
 * interdomain port puts the remote end back into the unbound state.
 *
 * Process death: grants, mappings and handle records carry the owner pid (or,
 * for event channels, are alive while a reader holds the FIFO open); a
 * garbage collection, run by every open and by the control functions, ends
 * what dead processes left behind and performs their unmap notifications,
 * as the kernel does at exit.
 *
 * CONTROL FUNCTIONS (exported with the prefix mockxen_)
 * -----------------------------------------------------
 * mockxen_fail(fn, nth, err)  call nth (1-based, counted since the last
 *     reset; 0 = every call) of C function fn fails with errno err, without
 *     side effects (a failing *_close still closes, as the real ones free the
 *     handle whatever close(2) says).  Returns 0, or -1/EINVAL for an
 *     unknown function name or bad arguments.
 * $MOCKXEN_FAIL="fn:nth:ERRNO[,...]" (ERRNO a name such as EIO, or a number)
 *     installs the same rules, read at the first call of the process.
 * mockxen_reset()             forget all rules, call counts and misuse count.
 * mockxen_calls(fn)           calls of fn since the last reset.
 * mockxen_live_grants()       pages this process shares and has not unshared
 * mockxen_live_mappings()     mappings (map calls) this process has not unmapped
 * mockxen_live_ports()        ports bound by this process's open evtchn handles
 * mockxen_live_handles()      open handles (all three kinds) of this process
 * mockxen_misuse()            calls made with a closed or unknown handle (they
 *                             fail with EBADF) or a handle of the other kind
 *                             (ENOTTY); handles are never freed, so this is safe
 * mockxen_dir_live(dir, what) the same for every process using dir (NULL:
 *     $MOCKXEN_DIR) after a garbage collection; what is "grants" (grants not
 *     yet freed, ENDED ones included), "mappings", "ports" or "handles".
 * mockxen_gc(dir)             collect what dead processes left in dir.
 * mockxen_purge()             unmap, unshare and close everything this process
 *                             still holds (test isolation after a leak).
 * mockxen_raise_virq(dir, domid, virq)  fire a virtual IRQ bound by domid.
 *
 * KNOWN DIFFERENCES FROM THE REAL LIBRARIES
 * -----------------------------------------
 * - xengntshr_unshare needs the exact start address and page count of a
 *   share (Linux's is a bare munmap of any range).
 * - xenevtchn_fdopen accepts only a descriptor of a mock evtchn handle of the
 *   same MOCKXEN_DIR (ENOTTY otherwise; the real one fails later instead).
 * - xengnttab_set_max_grants records the value and enforces nothing (as on
 *   pvops kernels); the dma-buf calls fail with ENOSYS.
 * - A clear-byte unmap notification on a read-only mapping is refused with
 *   EINVAL.
 * - Like Linux (not like the header's wording), closing a gntdev/gntalloc
 *   handle leaves its mappings and shared pages in place until unmapped.
 * - The dead-process collection runs lazily (open, control calls), not at
 *   the moment of death.
 */
#define _GNU_SOURCE
#include "mockxen_common.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MX_STATE_MAGIC 0x314e45584b434f4dULL /* "MOCKXEN1" */
#define MX_HANDLE_MAGIC 0x6d78686eu

enum { MX_G_FREE = 0, MX_G_ACTIVE = 1, MX_G_ENDED = 2 };
enum { MX_P_FREE = 0, MX_P_UNBOUND = 1, MX_P_INTERDOMAIN = 2, MX_P_VIRQ = 3 };

struct mx_hrec {
    uint32_t in_use, kind, id;
    int32_t pid;
    uint32_t domid, restrict_domid;
    uint64_t dev, ino; /* the FIFO of an evtchn handle */
};

struct mx_grant {
    uint32_t state;
    uint32_t granter, grantee, writable;
    int32_t owner_pid;
    uint32_t region, page_index, count;
    uint32_t map_count;
    uint32_t notify_offset; /* absolute in the region; kept on page 0 */
    uint32_t notify_port;
    uint32_t pad;
};

struct mx_map {
    uint32_t in_use;
    int32_t pid;
    uint32_t domid, region, page_index, slot, count;
    uint32_t notify_offset, notify_port; /* kept on page 0 */
    uint32_t pad;
};

struct mx_port {
    uint32_t state, domid, port, owner;
    uint32_t remote_domid, remote_port;
    uint32_t masked, pending, virq, pad;
};

struct mx_state {
    uint64_t magic;
    uint32_t size;
    uint32_t grant_limit;
    uint32_t next_handle_id;
    uint32_t next_region_id;
    uint32_t grant_cursor;
    uint32_t pad;
    struct mx_hrec handles[MX_MAX_HANDLES];
    struct mx_grant grants[MX_MAX_GRANTS];
    struct mx_map maps[MX_MAX_MAPS];
    struct mx_port ports[MX_MAX_PORTS];
};

/* The process's view of one MOCKXEN_DIR. */
struct mx_ctx {
    char dir[PATH_MAX];
    pid_t pid; /* the process that opened lockfd (re-opened after fork) */
    int lockfd;
    int pagesfd;
    struct mx_state *st;
    struct mx_ctx *next;
};

enum { MX_REGION_MAP = 1, MX_REGION_SHARE = 2 };
struct mx_region {
    int kind;
    char *addr;
    uint32_t count;
    uint32_t region_id;
    struct mx_ctx *ctx;
    struct mx_region *next;
};

/* ---- process-wide state ---- */

static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct mx_ctx *g_ctxs;
static struct mx_handle *g_handles;
static struct mx_region *g_regions;
static int g_misuse;

void mockxen__lock(void) { pthread_mutex_lock(&g_mutex); }
void mockxen__unlock(void) { pthread_mutex_unlock(&g_mutex); }

/* fork() while another thread is inside the library must not leave the
 * child with a locked mutex */
static void atfork_prepare(void) { pthread_mutex_lock(&g_mutex); }
static void atfork_release(void) { pthread_mutex_unlock(&g_mutex); }

__attribute__((constructor)) static void mockxen_init(void)
{
    pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

/* ---- fault injection ---- */

static const char *const g_functions[] = {
    "xengnttab_open", "xengnttab_close", "xengnttab_fd", "xengnttab_map_grant_ref",
    "xengnttab_map_grant_refs", "xengnttab_map_domain_grant_refs",
    "xengnttab_map_grant_ref_notify", "xengnttab_unmap", "xengnttab_set_max_grants",
    "xengnttab_grant_copy", "xengnttab_dmabuf_exp_from_refs",
    "xengnttab_dmabuf_exp_wait_released", "xengnttab_dmabuf_imp_to_refs",
    "xengnttab_dmabuf_imp_release", "xengntshr_open", "xengntshr_close", "xengntshr_fd",
    "xengntshr_share_pages", "xengntshr_share_page_notify", "xengntshr_unshare",
    "xenevtchn_open", "xenevtchn_fdopen", "xenevtchn_close", "xenevtchn_fd",
    "xenevtchn_notify", "xenevtchn_bind_unbound_port", "xenevtchn_bind_interdomain",
    "xenevtchn_bind_virq", "xenevtchn_unbind", "xenevtchn_pending", "xenevtchn_unmask",
    "xenevtchn_restrict",
};
#define MX_NFUNCS (sizeof(g_functions) / sizeof(g_functions[0]))
#define MX_MAX_RULES 128

struct mx_rule {
    int func;
    int nth;
    int err;
};
static struct mx_rule g_rules[MX_MAX_RULES];
static int g_nrules;
static int g_calls[MX_NFUNCS];
static int g_env_read;

static int func_index(const char *name)
{
    if (!name)
        return -1;
    for (size_t i = 0; i < MX_NFUNCS; i++)
        if (strcmp(g_functions[i], name) == 0)
            return (int)i;
    return -1;
}

static const struct {
    const char *name;
    int value;
} g_errnos[] = {
    {"EPERM", EPERM},   {"ENOENT", ENOENT},   {"ESRCH", ESRCH},       {"EINTR", EINTR},
    {"EIO", EIO},       {"ENXIO", ENXIO},     {"E2BIG", E2BIG},       {"EBADF", EBADF},
    {"EAGAIN", EAGAIN}, {"ENOMEM", ENOMEM},   {"EACCES", EACCES},     {"EFAULT", EFAULT},
    {"EBUSY", EBUSY},   {"EEXIST", EEXIST},   {"ENODEV", ENODEV},     {"EINVAL", EINVAL},
    {"ENFILE", ENFILE}, {"EMFILE", EMFILE},   {"ENOTTY", ENOTTY},     {"EFBIG", EFBIG},
    {"ENOSPC", ENOSPC}, {"ERANGE", ERANGE},   {"ENOSYS", ENOSYS},     {"ENOTCONN", ENOTCONN},
    {"ETIMEDOUT", ETIMEDOUT}, {"EOVERFLOW", EOVERFLOW}, {"EOPNOTSUPP", EOPNOTSUPP},
    {"ECONNREFUSED", ECONNREFUSED}, {"EWOULDBLOCK", EWOULDBLOCK},
};

static int parse_errno(const char *s)
{
    char *end;
    long v;
    for (size_t i = 0; i < sizeof(g_errnos) / sizeof(g_errnos[0]); i++)
        if (strcmp(g_errnos[i].name, s) == 0)
            return g_errnos[i].value;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || end == s || v <= 0 || v > 4095)
        return -1;
    return (int)v;
}

static int add_rule(int func, int nth, int err)
{
    if (func < 0 || nth < 0 || err <= 0 || g_nrules >= MX_MAX_RULES)
        return -1;
    g_rules[g_nrules].func = func;
    g_rules[g_nrules].nth = nth;
    g_rules[g_nrules].err = err;
    g_nrules++;
    return 0;
}

/* $MOCKXEN_FAIL="fn:nth:ERRNO,...": bad entries are reported on stderr. */
static void read_env_rules(void)
{
    const char *env = getenv("MOCKXEN_FAIL");
    char *copy, *saveptr = NULL, *item;
    g_env_read = 1;
    if (!env || !*env)
        return;
    copy = strdup(env);
    if (!copy)
        return;
    for (item = strtok_r(copy, ",", &saveptr); item; item = strtok_r(NULL, ",", &saveptr)) {
        char *c1 = strchr(item, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL, *end;
        long nth;
        int err;
        while (isspace((unsigned char)*item))
            item++;
        if (!c1 || !c2)
            goto bad;
        *c1 = *c2 = '\0';
        errno = 0;
        nth = strtol(c1 + 1, &end, 10);
        if (errno || *end || end == c1 + 1 || nth < 0 || nth > INT_MAX)
            goto bad;
        err = parse_errno(c2 + 1);
        if (add_rule(func_index(item), (int)nth, err) == 0)
            continue;
    bad:
        fprintf(stderr, "mockxen: ignoring bad MOCKXEN_FAIL entry %s\n", item);
    }
    free(copy);
}

int mockxen__enter(const char *function)
{
    int f, err = 0;
    mockxen__lock();
    if (!g_env_read)
        read_env_rules();
    f = func_index(function);
    if (f >= 0) {
        int n = ++g_calls[f];
        for (int i = 0; i < g_nrules; i++)
            if (g_rules[i].func == f && (g_rules[i].nth == 0 || g_rules[i].nth == n)) {
                err = g_rules[i].err;
                break;
            }
    }
    mockxen__unlock();
    return err;
}

int mockxen_fail(const char *function, int nth, int err)
{
    int rc;
    mockxen__lock();
    if (!g_env_read)
        read_env_rules();
    rc = add_rule(func_index(function), nth, err);
    mockxen__unlock();
    if (rc)
        errno = EINVAL;
    return rc;
}

void mockxen_reset(void)
{
    mockxen__lock();
    g_env_read = 1;
    g_nrules = 0;
    memset(g_calls, 0, sizeof(g_calls));
    g_misuse = 0;
    mockxen__unlock();
}

int mockxen_calls(const char *function)
{
    int f, n;
    mockxen__lock();
    f = func_index(function);
    n = f >= 0 ? g_calls[f] : -1;
    mockxen__unlock();
    if (f < 0)
        errno = EINVAL;
    return n;
}

/* ---- the shared state ---- */

static int open_in(const struct mx_ctx *c, const char *name, int flags);

static int slock(struct mx_ctx *c)
{
    if (c->pid && c->pid != getpid()) {
        /* forked: the inherited descriptor shares its flock with the parent */
        int fd = open_in(c, "lock", O_RDWR | O_CREAT);
        if (fd < 0)
            return -1;
        close(c->lockfd);
        c->lockfd = fd;
        c->pid = getpid();
    }
    while (flock(c->lockfd, LOCK_EX) == -1)
        if (errno != EINTR)
            return -1;
    return 0;
}

static void sunlock(struct mx_ctx *c)
{
    int saved = errno;
    flock(c->lockfd, LOCK_UN);
    errno = saved;
}

static void dir_path(const struct mx_ctx *c, char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", c->dir, name);
}

static int open_in(const struct mx_ctx *c, const char *name, int flags)
{
    char path[PATH_MAX + 32];
    dir_path(c, path, sizeof(path), name);
    return open(path, flags | O_CLOEXEC, 0600);
}

static void fifo_path(const struct mx_ctx *c, uint32_t id, char *out, size_t size)
{
    snprintf(out, size, "%s/evtchn.%u", c->dir, id);
}

static int ctx_init(struct mx_ctx *c)
{
    int statefd = -1, err;
    struct stat sb;
    void *p;

    c->lockfd = open_in(c, "lock", O_RDWR | O_CREAT);
    if (c->lockfd < 0)
        return errno;
    if (slock(c))
        goto fail;
    statefd = open_in(c, "state", O_RDWR | O_CREAT);
    if (statefd < 0 || fstat(statefd, &sb))
        goto fail_locked;
    if ((size_t)sb.st_size < sizeof(struct mx_state) &&
        ftruncate(statefd, sizeof(struct mx_state)))
        goto fail_locked;
    c->pagesfd = open_in(c, "pages", O_RDWR | O_CREAT);
    if (c->pagesfd < 0 || fstat(c->pagesfd, &sb))
        goto fail_locked;
    if ((size_t)sb.st_size < (size_t)MX_MAX_GRANTS * MX_PAGE &&
        ftruncate(c->pagesfd, (off_t)MX_MAX_GRANTS * MX_PAGE))
        goto fail_locked;
    p = mmap(NULL, sizeof(struct mx_state), PROT_READ | PROT_WRITE, MAP_SHARED, statefd, 0);
    if (p == MAP_FAILED)
        goto fail_locked;
    c->st = p;
    if (c->st->magic != MX_STATE_MAGIC) {
        const char *lim = getenv("MOCKXEN_GRANT_LIMIT");
        unsigned long limit = lim && *lim ? strtoul(lim, NULL, 10) : MX_DEFAULT_GRANT_LIMIT;
        memset(c->st, 0, sizeof(*c->st));
        c->st->size = sizeof(struct mx_state);
        c->st->grant_limit = (uint32_t)(limit && limit <= MX_MAX_GRANTS ? limit : MX_MAX_GRANTS);
        c->st->next_handle_id = 1;
        c->st->next_region_id = 1;
        c->st->magic = MX_STATE_MAGIC;
    } else if (c->st->size != sizeof(struct mx_state)) {
        errno = EPROTO; /* a directory of another mock version */
        goto fail_locked;
    }
    close(statefd);
    sunlock(c);
    c->pid = getpid();
    return 0;

fail_locked:
    err = errno;
    sunlock(c);
    errno = err;
fail:
    err = errno;
    if (statefd >= 0)
        close(statefd);
    if (c->st) {
        munmap(c->st, sizeof(struct mx_state));
        c->st = NULL;
    }
    if (c->pagesfd >= 0)
        close(c->pagesfd);
    close(c->lockfd);
    return err ? err : EIO;
}

/* The context of $MOCKXEN_DIR (or @dir); NULL with errno. Caller holds g_mutex. */
static struct mx_ctx *ctx_get(const char *dir)
{
    char real[PATH_MAX];
    struct mx_ctx *c;
    int err;

    if (!dir)
        dir = getenv("MOCKXEN_DIR");
    if (!dir || !*dir) {
        errno = ENOENT; /* like a missing /dev/xen/... node */
        return NULL;
    }
    if (!realpath(dir, real))
        return NULL;
    for (c = g_ctxs; c; c = c->next)
        if (strcmp(c->dir, real) == 0)
            return c; /* slock() re-opens the lock descriptor after a fork */
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    snprintf(c->dir, sizeof(c->dir), "%s", real);
    c->pagesfd = -1;
    err = ctx_init(c);
    if (err) {
        free(c);
        errno = err;
        return NULL;
    }
    c->next = g_ctxs;
    g_ctxs = c;
    return c;
}

/* Forget a context this process no longer uses (no open handle, no region),
 * so that a test suite using a fresh directory per test keeps no descriptor
 * of old ones.  Caller holds g_mutex, not the flock. */
static void ctx_maybe_drop(struct mx_ctx *c)
{
    struct mx_ctx **pp;
    if (!c)
        return;
    for (struct mx_handle *h = g_handles; h; h = h->next)
        if (!h->closed && h->ctx == c)
            return;
    for (struct mx_region *r = g_regions; r; r = r->next)
        if (r->ctx == c)
            return;
    for (pp = &g_ctxs; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            munmap(c->st, sizeof(struct mx_state));
            close(c->pagesfd);
            close(c->lockfd);
            free(c);
            return;
        }
}

static int pid_alive(int32_t pid)
{
    char path[64], buf[512], *p;
    ssize_t n;
    int fd;
    if (pid <= 0)
        return 0;
    if (pid == getpid())
        return 1;
    if (kill(pid, 0) == -1 && errno == ESRCH)
        return 0;
    /* an unreaped zombie has released everything already */
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno != ENOENT;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = '\0';
    p = strrchr(buf, ')');
    if (p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'))
        return 0;
    return 1;
}

/* Is an evtchn handle's FIFO still open for reading by some process? */
static int fifo_alive(struct mx_ctx *c, uint32_t id)
{
    char path[PATH_MAX + 32];
    int fd;
    fifo_path(c, id, path, sizeof(path));
    fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    return !(errno == ENXIO || errno == ENOENT);
}

static struct mx_port *port_find(struct mx_state *st, uint32_t domid, uint32_t port)
{
    for (uint32_t i = 0; i < MX_MAX_PORTS; i++) {
        struct mx_port *p = &st->ports[i];
        if (p->state != MX_P_FREE && p->domid == domid && p->port == port)
            return p;
    }
    return NULL;
}

static struct mx_hrec *hrec_find(struct mx_state *st, uint32_t id)
{
    for (uint32_t i = 0; i < MX_MAX_HANDLES; i++)
        if (st->handles[i].in_use && st->handles[i].id == id)
            return &st->handles[i];
    return NULL;
}

/* Queue an event on a port: Linux masks it on delivery; a masked port only
 * remembers that an event is pending. */
static void deliver(struct mx_ctx *c, struct mx_port *p)
{
    char path[PATH_MAX + 32];
    uint32_t port = p->port;
    int fd;
    if (p->masked) {
        p->pending = 1;
        return;
    }
    p->masked = 1;
    fifo_path(c, p->owner, path, sizeof(path));
    fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return; /* the owner is gone; collected later */
    if (write(fd, &port, sizeof(port)) != (ssize_t)sizeof(port)) {
        /* cannot happen: at most one queued event per port, the pipe holds 16384 */
    }
    close(fd);
}

/* notify_remote_via_evtchn(port) as done by domain @domid. */
static void signal_port(struct mx_ctx *c, uint32_t domid, uint32_t port)
{
    struct mx_port *p = port_find(c->st, domid, port), *r;
    if (!p || p->state != MX_P_INTERDOMAIN)
        return; /* unbound: Xen drops it; virq: EINVAL ignored by Linux */
    r = port_find(c->st, p->remote_domid, p->remote_port);
    if (r && r->state == MX_P_INTERDOMAIN && r->remote_domid == domid && r->remote_port == port)
        deliver(c, r);
}

static void clear_byte(struct mx_ctx *c, uint32_t slot, uint32_t offset_in_page)
{
    static const char zero = 0;
    if (pwrite(c->pagesfd, &zero, 1, (off_t)slot * MX_PAGE + offset_in_page) != 1) {
        /* the pages file is always large enough */
    }
}

static void port_release(struct mx_ctx *c, struct mx_port *p)
{
    if (p->state == MX_P_INTERDOMAIN) {
        struct mx_port *r = port_find(c->st, p->remote_domid, p->remote_port);
        if (r && r->state == MX_P_INTERDOMAIN && r->remote_domid == p->domid &&
            r->remote_port == p->port) {
            r->state = MX_P_UNBOUND; /* Xen's evtchn_close */
            r->remote_port = 0;
        }
    }
    memset(p, 0, sizeof(*p));
}

static void grant_maybe_free(struct mx_grant *g)
{
    if (g->state == MX_G_ENDED && g->map_count == 0)
        memset(g, 0, sizeof(*g));
}

/* End the grants of a shared region (unshare, or death of the sharer). */
static void share_end(struct mx_ctx *c, uint32_t region)
{
    struct mx_state *st = c->st;
    struct mx_grant *first = NULL;
    for (uint32_t i = 0; i < MX_MAX_GRANTS; i++)
        if (st->grants[i].state == MX_G_ACTIVE && st->grants[i].region == region &&
            st->grants[i].page_index == 0)
            first = &st->grants[i];
    if (first && first->notify_offset != MX_NONE) {
        uint32_t page = first->notify_offset / MX_PAGE;
        for (uint32_t i = 0; i < MX_MAX_GRANTS; i++)
            if (st->grants[i].state == MX_G_ACTIVE && st->grants[i].region == region &&
                st->grants[i].page_index == page)
                clear_byte(c, i, first->notify_offset % MX_PAGE);
    }
    if (first && first->notify_port != MX_NONE)
        signal_port(c, first->granter, first->notify_port);
    for (uint32_t i = 0; i < MX_MAX_GRANTS; i++) {
        struct mx_grant *g = &st->grants[i];
        if (g->state == MX_G_ACTIVE && g->region == region) {
            g->state = MX_G_ENDED;
            grant_maybe_free(g);
        }
    }
}

/* Drop the mapped-page records of a mapping region (unmap, or death). */
static void map_end(struct mx_ctx *c, uint32_t region)
{
    struct mx_state *st = c->st;
    struct mx_map *first = NULL;
    for (uint32_t i = 0; i < MX_MAX_MAPS; i++)
        if (st->maps[i].in_use && st->maps[i].region == region && st->maps[i].page_index == 0)
            first = &st->maps[i];
    if (first && first->notify_offset != MX_NONE) {
        uint32_t page = first->notify_offset / MX_PAGE;
        for (uint32_t i = 0; i < MX_MAX_MAPS; i++)
            if (st->maps[i].in_use && st->maps[i].region == region &&
                st->maps[i].page_index == page)
                clear_byte(c, st->maps[i].slot, first->notify_offset % MX_PAGE);
    }
    if (first && first->notify_port != MX_NONE)
        signal_port(c, first->domid, first->notify_port);
    for (uint32_t i = 0; i < MX_MAX_MAPS; i++) {
        struct mx_map *m = &st->maps[i];
        if (m->in_use && m->region == region) {
            struct mx_grant *g = &st->grants[m->slot];
            if (g->map_count)
                g->map_count--;
            grant_maybe_free(g);
            memset(m, 0, sizeof(*m));
        }
    }
}

static void hrec_release(struct mx_ctx *c, struct mx_hrec *r)
{
    if (r->kind == MX_KIND_EVTCHN) {
        char path[PATH_MAX + 32];
        for (uint32_t i = 0; i < MX_MAX_PORTS; i++)
            if (c->st->ports[i].state != MX_P_FREE && c->st->ports[i].owner == r->id)
                port_release(c, &c->st->ports[i]);
        fifo_path(c, r->id, path, sizeof(path));
        unlink(path);
    }
    memset(r, 0, sizeof(*r));
}

/* Collect what dead processes left behind, in the kernel's exit order:
 * memory first (with its unmap notifications), then the descriptors. */
static void gc_locked(struct mx_ctx *c)
{
    struct mx_state *st = c->st;
    for (uint32_t i = 0; i < MX_MAX_GRANTS; i++) {
        struct mx_grant *g = &st->grants[i];
        if (g->state == MX_G_ACTIVE && !pid_alive(g->owner_pid))
            share_end(c, g->region);
    }
    for (uint32_t i = 0; i < MX_MAX_MAPS; i++) {
        struct mx_map *m = &st->maps[i];
        if (m->in_use && !pid_alive(m->pid))
            map_end(c, m->region);
    }
    for (uint32_t i = 0; i < MX_MAX_HANDLES; i++) {
        struct mx_hrec *r = &st->handles[i];
        if (!r->in_use)
            continue;
        if (r->kind == MX_KIND_EVTCHN ? !fifo_alive(c, r->id) : !pid_alive(r->pid))
            hrec_release(c, r);
    }
}

/* ---- handles ---- */

static int parse_domid(uint32_t *out)
{
    const char *s = getenv("MOCKXEN_DOMID");
    char *end;
    unsigned long v;
    if (!s || !*s) {
        *out = 0;
        return 0;
    }
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v >= MX_DOMID_FIRST_RESERVED)
        return EINVAL;
    *out = (uint32_t)v;
    return 0;
}

static struct mx_hrec *hrec_alloc(struct mx_state *st)
{
    for (uint32_t i = 0; i < MX_MAX_HANDLES; i++)
        if (!st->handles[i].in_use) {
            struct mx_hrec *r = &st->handles[i];
            memset(r, 0, sizeof(*r));
            r->in_use = 1;
            r->id = st->next_handle_id++;
            if (st->next_handle_id == 0)
                st->next_handle_id = 1;
            r->pid = getpid();
            r->restrict_domid = MX_UNRESTRICTED;
            return r;
        }
    return NULL;
}

static struct mx_handle *handle_new(int kind, struct mx_ctx *c, uint32_t id, uint32_t domid,
                                    int fd)
{
    struct mx_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->magic = MX_HANDLE_MAGIC;
    h->kind = kind;
    h->id = id;
    h->domid = domid;
    h->fd = fd;
    h->ctx = c;
    h->next = g_handles;
    g_handles = h;
    return h;
}

struct mx_handle *mockxen__open(int kind, int cloexec)
{
    struct mx_ctx *c;
    struct mx_hrec *r;
    struct mx_handle *h;
    uint32_t domid;
    int err, fd = -1;

    err = parse_domid(&domid);
    if (err) {
        errno = err;
        return NULL;
    }
    c = ctx_get(NULL);
    if (!c)
        return NULL;
    if (slock(c))
        return NULL;
    gc_locked(c);
    r = hrec_alloc(c->st);
    if (!r) {
        err = EMFILE;
        goto out;
    }
    r->kind = (uint32_t)kind;
    r->domid = domid;
    if (kind == MX_KIND_EVTCHN) {
        char path[PATH_MAX + 32];
        struct stat sb;
        fifo_path(c, r->id, path, sizeof(path));
        unlink(path);
        if (mkfifo(path, 0600) == -1) {
            err = errno;
            goto out_rec;
        }
        fd = open(path, O_RDWR | (cloexec ? O_CLOEXEC : 0));
        if (fd < 0 || fstat(fd, &sb)) {
            err = errno;
            unlink(path);
            goto out_rec;
        }
        r->dev = (uint64_t)sb.st_dev;
        r->ino = (uint64_t)sb.st_ino;
    } else {
        /* gntdev is opened O_CLOEXEC by the real library, gntalloc is not */
        char path[PATH_MAX + 32];
        dir_path(c, path, sizeof(path), kind == MX_KIND_GNTTAB ? "gntdev" : "gntalloc");
        fd = open(path, O_RDWR | O_CREAT | (cloexec ? O_CLOEXEC : 0), 0600);
        if (fd < 0) {
            err = errno;
            goto out_rec;
        }
    }
    h = handle_new(kind, c, r->id, domid, fd);
    if (!h) {
        err = ENOMEM;
        goto out_rec;
    }
    sunlock(c);
    return h;

out_rec:
    if (fd >= 0)
        close(fd);
    memset(r, 0, sizeof(*r));
out:
    sunlock(c);
    ctx_maybe_drop(c);
    errno = err;
    return NULL;
}

struct mx_handle *mockxen__fdopen_evtchn(int fd)
{
    struct mx_ctx *c;
    struct stat sb;
    struct mx_handle *h = NULL;
    int err = 0;

    if (fd < 0 || fstat(fd, &sb)) {
        errno = EBADF;
        return NULL;
    }
    c = ctx_get(NULL);
    if (!c)
        return NULL;
    if (slock(c))
        return NULL;
    gc_locked(c);
    err = ENOTTY; /* not an event channel descriptor of this directory */
    for (uint32_t i = 0; i < MX_MAX_HANDLES; i++) {
        struct mx_hrec *r = &c->st->handles[i];
        if (r->in_use && r->kind == MX_KIND_EVTCHN && r->dev == (uint64_t)sb.st_dev &&
            r->ino == (uint64_t)sb.st_ino) {
            h = handle_new(MX_KIND_EVTCHN, c, r->id, r->domid, fd);
            err = h ? 0 : ENOMEM;
            break;
        }
    }
    sunlock(c);
    if (err) {
        ctx_maybe_drop(c);
        errno = err;
    }
    return h;
}

int mockxen__check(const void *handle, int kind)
{
    struct mx_handle *h;
    for (h = g_handles; h; h = h->next)
        if (h == handle)
            break;
    if (!h || h->magic != MX_HANDLE_MAGIC || h->closed) {
        g_misuse++;
        return EBADF;
    }
    if (h->kind != kind) {
        g_misuse++;
        return ENOTTY; /* an ioctl of the other device */
    }
    return 0;
}

int mockxen__close(struct mx_handle *h)
{
    struct mx_ctx *c = h->ctx;
    h->closed = 1;
    close(h->fd);
    h->fd = -1;
    if (slock(c))
        return errno;
    {
        struct mx_hrec *r = hrec_find(c->st, h->id);
        /* an evtchn handle lives while any descriptor of its FIFO is open
         * (xenevtchn_fdopen of a dup, or a fork child's copy): Linux releases
         * the ports at the last close.  A gnt handle closed by a fork child
         * stays the parent's.  Mappings and shared pages outlive the handle,
         * as in Linux. */
        if (r && (h->kind == MX_KIND_EVTCHN ? !fifo_alive(c, h->id) : r->pid == getpid()))
            hrec_release(c, r);
    }
    sunlock(c);
    h->ctx = NULL;
    ctx_maybe_drop(c);
    return 0;
}

/* ---- gntdev ---- */

static struct mx_region *region_add(int kind, void *addr, uint32_t count, uint32_t id,
                                    struct mx_ctx *c)
{
    struct mx_region *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->kind = kind;
    r->addr = addr;
    r->count = count;
    r->region_id = id;
    r->ctx = c;
    r->next = g_regions;
    g_regions = r;
    return r;
}

static struct mx_region *region_take(int kind, void *addr)
{
    for (struct mx_region **pp = &g_regions; *pp; pp = &(*pp)->next)
        if ((*pp)->kind == kind && (*pp)->addr == addr)
            return *pp;
    return NULL;
}

static void region_unlink(struct mx_region *r)
{
    for (struct mx_region **pp = &g_regions; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            free(r);
            return;
        }
}

/* Reserve @count pages of address space and map the given slots into it. */
static void *map_slots(struct mx_ctx *c, const uint32_t *slots, uint32_t count, int prot,
                       int *err)
{
    size_t len = (size_t)count * MX_PAGE;
    char *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++) {
        void *p = mmap(base + (size_t)i * MX_PAGE, MX_PAGE, prot, MAP_SHARED | MAP_FIXED,
                       c->pagesfd, (off_t)slots[i] * MX_PAGE);
        if (p == MAP_FAILED) {
            *err = errno;
            munmap(base, len);
            return NULL;
        }
    }
    return base;
}

static uint32_t region_id_new(struct mx_state *st)
{
    uint32_t id = st->next_region_id++;
    if (st->next_region_id == 0)
        st->next_region_id = 1;
    return id;
}

void *mockxen__map(struct mx_handle *h, uint32_t count, const uint32_t *domids,
                   int domid_stride, const uint32_t *refs, int prot, uint32_t notify_offset,
                   uint32_t notify_port, int *err)
{
    struct mx_ctx *c = h->ctx;
    struct mx_state *st = c->st;
    uint32_t *slots = NULL, *recs = NULL, free_recs = 0, region;
    int writable = (prot & PROT_WRITE) != 0;
    char *addr = NULL;

    *err = 0;
    if (count == 0 || !domids || !refs) {
        *err = EINVAL;
        return NULL;
    }
    slots = calloc(count, sizeof(*slots));
    recs = calloc(count, sizeof(*recs));
    if (!slots || !recs) {
        *err = ENOMEM;
        goto out;
    }
    if (slock(c)) {
        *err = errno;
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint32_t ref = refs[i], domid = domids[(size_t)i * (size_t)domid_stride];
        struct mx_grant *g;
        if (ref < MX_FIRST_REF || ref - MX_FIRST_REF >= MX_MAX_GRANTS) {
            *err = EINVAL; /* GNTST_bad_gntref: the mmap fails with EINVAL */
            goto out_locked;
        }
        g = &st->grants[ref - MX_FIRST_REF];
        if (g->state != MX_G_ACTIVE || g->granter != domid || g->grantee != h->domid ||
            (writable && !g->writable)) {
            *err = EINVAL;
            goto out_locked;
        }
        slots[i] = ref - MX_FIRST_REF;
    }
    if (notify_offset < (uint64_t)count * MX_PAGE && !writable) {
        *err = EINVAL; /* the byte cannot be cleared through a read-only map */
        goto out_locked;
    }
    if (notify_port != MX_NONE && !port_find(st, h->domid, notify_port)) {
        *err = EINVAL; /* evtchn_get() fails on a port that is not bound */
        goto out_locked;
    }
    for (uint32_t i = 0; i < MX_MAX_MAPS && free_recs < count; i++)
        if (!st->maps[i].in_use)
            recs[free_recs++] = i;
    if (free_recs < count) {
        *err = ENOMEM;
        goto out_locked;
    }
    addr = map_slots(c, slots, count, prot & (PROT_READ | PROT_WRITE), err);
    if (!addr)
        goto out_locked;
    region = region_id_new(st);
    if (!region_add(MX_REGION_MAP, addr, count, region, c)) {
        munmap(addr, (size_t)count * MX_PAGE);
        addr = NULL;
        *err = ENOMEM;
        goto out_locked;
    }
    for (uint32_t i = 0; i < count; i++) {
        struct mx_map *m = &st->maps[recs[i]];
        m->in_use = 1;
        m->pid = getpid();
        m->domid = h->domid;
        m->region = region;
        m->page_index = i;
        m->slot = slots[i];
        m->count = count;
        m->notify_offset = MX_NONE;
        m->notify_port = MX_NONE;
        st->grants[slots[i]].map_count++;
    }
    if (notify_offset < (uint64_t)count * MX_PAGE)
        st->maps[recs[0]].notify_offset = notify_offset;
    st->maps[recs[0]].notify_port = notify_port;

out_locked:
    sunlock(c);
out:
    free(slots);
    free(recs);
    return addr;
}

int mockxen__unmap(struct mx_handle *h, void *addr, uint32_t count)
{
    struct mx_region *r;
    struct mx_ctx *c;
    (void)h;
    if (!addr)
        return EINVAL;
    r = region_take(MX_REGION_MAP, addr);
    if (!r || r->count != count)
        return EINVAL;
    c = r->ctx;
    if (slock(c))
        return errno;
    /* Linux: the notification is done when the pages are unmapped */
    munmap(addr, (size_t)count * MX_PAGE);
    map_end(c, r->region_id);
    sunlock(c);
    region_unlink(r);
    ctx_maybe_drop(c);
    return 0;
}

/* the layout of xengnttab_grant_copy_segment_t */
struct mx_copy_seg {
    union {
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
};
#define MX_GNTCOPY_source_gref 1
#define MX_GNTCOPY_dest_gref 2
#define MX_GNTST_okay 0
#define MX_GNTST_general_error (-1)
#define MX_GNTST_bad_gntref (-3)

/* The slot of a foreign page the caller may copy from/to, or a GNTST_* < 0. */
static int copy_slot(struct mx_state *st, const struct mx_handle *h, uint32_t ref,
                     uint16_t domid, int write)
{
    struct mx_grant *g;
    if (ref < MX_FIRST_REF || ref - MX_FIRST_REF >= MX_MAX_GRANTS)
        return MX_GNTST_bad_gntref;
    g = &st->grants[ref - MX_FIRST_REF];
    if (g->state != MX_G_ACTIVE || g->granter != domid || g->grantee != h->domid ||
        (write && !g->writable))
        return MX_GNTST_general_error; /* Xen: no GTF_permit_access for us */
    return (int)(ref - MX_FIRST_REF);
}

int mockxen__grant_copy(struct mx_handle *h, uint32_t count, void *segments)
{
    struct mx_copy_seg *segs = segments;
    struct mx_ctx *c = h->ctx;
    char buf[MX_PAGE];

    if (count && !segs)
        return EFAULT;
    /* Linux's gntdev rejects the whole batch on these */
    for (uint32_t i = 0; i < count; i++) {
        const struct mx_copy_seg *s = &segs[i];
        if (!(s->flags & (MX_GNTCOPY_source_gref | MX_GNTCOPY_dest_gref)))
            return EINVAL;
        if ((s->flags & MX_GNTCOPY_source_gref) && s->source.foreign.offset + s->len > MX_PAGE)
            return EINVAL;
        if ((s->flags & MX_GNTCOPY_dest_gref) && s->dest.foreign.offset + s->len > MX_PAGE)
            return EINVAL;
        if (s->len > MX_PAGE)
            return EINVAL;
    }
    if (slock(c))
        return errno;
    for (uint32_t i = 0; i < count; i++) {
        struct mx_copy_seg *s = &segs[i];
        int src = -1, dst = -1;
        s->status = MX_GNTST_okay;
        if (s->flags & MX_GNTCOPY_source_gref) {
            src = copy_slot(c->st, h, s->source.foreign.ref, s->source.foreign.domid, 0);
            if (src < 0) {
                s->status = (int16_t)src;
                continue;
            }
        }
        if (s->flags & MX_GNTCOPY_dest_gref) {
            dst = copy_slot(c->st, h, s->dest.foreign.ref, s->dest.foreign.domid, 1);
            if (dst < 0) {
                s->status = (int16_t)dst;
                continue;
            }
        }
        if (src >= 0) {
            if (pread(c->pagesfd, buf, s->len, (off_t)src * MX_PAGE + s->source.foreign.offset) !=
                (ssize_t)s->len) {
                s->status = MX_GNTST_general_error;
                continue;
            }
        } else {
            memcpy(buf, s->source.virt, s->len);
        }
        if (dst >= 0) {
            if (pwrite(c->pagesfd, buf, s->len, (off_t)dst * MX_PAGE + s->dest.foreign.offset) !=
                (ssize_t)s->len)
                s->status = MX_GNTST_general_error;
        } else {
            memcpy(s->dest.virt, buf, s->len);
        }
    }
    sunlock(c);
    return 0;
}

/* ---- gntalloc ---- */

static void zero_slot(struct mx_ctx *c, uint32_t slot)
{
    static const char zeros[MX_PAGE];
    if (fallocate(c->pagesfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)slot * MX_PAGE,
                  MX_PAGE) == 0)
        return;
    if (pwrite(c->pagesfd, zeros, MX_PAGE, (off_t)slot * MX_PAGE) != MX_PAGE) {
        /* the file is preallocated to the full size */
    }
}

void *mockxen__share(struct mx_handle *h, uint32_t domid, int count, uint32_t *refs,
                     int writable, uint32_t notify_offset, uint32_t notify_port, int *err)
{
    struct mx_ctx *c = h->ctx;
    struct mx_state *st = c->st;
    uint32_t *slots = NULL, used = 0, found = 0, region;
    char *addr = NULL;

    *err = 0;
    if (count <= 0 || !refs) {
        *err = EINVAL;
        return NULL;
    }
    slots = calloc((size_t)count, sizeof(*slots));
    if (!slots) {
        *err = ENOMEM;
        return NULL;
    }
    if (slock(c)) {
        *err = errno;
        goto out;
    }
    for (uint32_t i = 0; i < MX_MAX_GRANTS; i++)
        if (st->grants[i].state != MX_G_FREE && st->grants[i].granter == h->domid)
            used++;
    if (used + (uint32_t)count > st->grant_limit) {
        *err = ENOSPC; /* gntalloc: "limit" reached */
        goto out_locked;
    }
    if (notify_port != MX_NONE && !port_find(st, h->domid, notify_port)) {
        *err = EINVAL;
        goto out_locked;
    }
    /* round robin, so that a freed ref is not handed out again at once */
    for (uint32_t n = 0; n < MX_MAX_GRANTS && found < (uint32_t)count; n++) {
        uint32_t i = (st->grant_cursor + n) % MX_MAX_GRANTS;
        if (st->grants[i].state == MX_G_FREE)
            slots[found++] = i;
    }
    if (found < (uint32_t)count) {
        *err = ENOSPC;
        goto out_locked;
    }
    for (uint32_t i = 0; i < found; i++)
        zero_slot(c, slots[i]);
    addr = map_slots(c, slots, (uint32_t)count, PROT_READ | PROT_WRITE, err);
    if (!addr)
        goto out_locked;
    region = region_id_new(st);
    if (!region_add(MX_REGION_SHARE, addr, (uint32_t)count, region, c)) {
        munmap(addr, (size_t)count * MX_PAGE);
        addr = NULL;
        *err = ENOMEM;
        goto out_locked;
    }
    st->grant_cursor = (slots[found - 1] + 1) % MX_MAX_GRANTS;
    for (uint32_t i = 0; i < found; i++) {
        struct mx_grant *g = &st->grants[slots[i]];
        memset(g, 0, sizeof(*g));
        g->state = MX_G_ACTIVE;
        g->granter = h->domid;
        g->grantee = domid;
        g->writable = writable ? 1 : 0;
        g->owner_pid = getpid();
        g->region = region;
        g->page_index = i;
        g->count = (uint32_t)count;
        g->notify_offset = MX_NONE;
        g->notify_port = MX_NONE;
        refs[i] = slots[i] + MX_FIRST_REF;
    }
    if (notify_offset < (uint64_t)count * MX_PAGE)
        st->grants[slots[0]].notify_offset = notify_offset;
    st->grants[slots[0]].notify_port = notify_port;

out_locked:
    sunlock(c);
out:
    free(slots);
    return addr;
}

int mockxen__unshare(struct mx_handle *h, void *addr, uint32_t count)
{
    struct mx_region *r;
    struct mx_ctx *c;
    (void)h;
    if (!addr)
        return EINVAL;
    r = region_take(MX_REGION_SHARE, addr);
    /* stricter than Linux, where unshare is a bare munmap of any range */
    if (!r || r->count != count)
        return EINVAL;
    c = r->ctx;
    if (slock(c))
        return errno;
    share_end(c, r->region_id);
    munmap(addr, (size_t)count * MX_PAGE);
    sunlock(c);
    region_unlink(r);
    ctx_maybe_drop(c);
    return 0;
}

/* ---- event channels ---- */

static struct mx_port *port_alloc(struct mx_state *st, uint32_t domid, int *err)
{
    static unsigned char used[MX_PORTS_PER_DOMAIN];
    struct mx_port *slot = NULL;
    memset(used, 0, sizeof(used));
    for (uint32_t i = 0; i < MX_MAX_PORTS; i++) {
        struct mx_port *p = &st->ports[i];
        if (p->state == MX_P_FREE) {
            if (!slot)
                slot = p;
        } else if (p->domid == domid && p->port < MX_PORTS_PER_DOMAIN) {
            used[p->port] = 1;
        }
    }
    for (uint32_t port = 1; slot && port < MX_PORTS_PER_DOMAIN; port++)
        if (!used[port]) {
            memset(slot, 0, sizeof(*slot));
            slot->domid = domid;
            slot->port = port;
            return slot;
        }
    *err = ENOSPC; /* Xen's get_free_port */
    return NULL;
}

static struct mx_hrec *evtchn_rec(struct mx_handle *h)
{
    return hrec_find(h->ctx->st, h->id);
}

int mockxen__evtchn_notify(struct mx_handle *h, uint32_t port)
{
    struct mx_ctx *c = h->ctx;
    struct mx_port *p;
    int rc = 0;
    if (port >= MX_PORTS_PER_DOMAIN)
        return -EINVAL;
    if (slock(c))
        return -errno;
    p = port_find(c->st, h->domid, port);
    if (!p || p->owner != h->id)
        rc = -ENOTCONN;
    else
        signal_port(c, h->domid, port);
    sunlock(c);
    return rc;
}

int mockxen__evtchn_bind_unbound(struct mx_handle *h, uint32_t remote_domid)
{
    struct mx_ctx *c = h->ctx;
    struct mx_hrec *rec;
    struct mx_port *p;
    int rc, err = 0;
    if (remote_domid == MX_DOMID_SELF)
        remote_domid = h->domid;
    else if (remote_domid >= MX_DOMID_FIRST_RESERVED)
        return -ESRCH;
    if (slock(c))
        return -errno;
    rec = evtchn_rec(h);
    if (rec && rec->restrict_domid != MX_UNRESTRICTED) {
        rc = -EACCES;
        goto out;
    }
    p = port_alloc(c->st, h->domid, &err);
    if (!p) {
        rc = -err;
        goto out;
    }
    p->state = MX_P_UNBOUND;
    p->owner = h->id;
    p->remote_domid = remote_domid;
    rc = (int)p->port;
out:
    sunlock(c);
    return rc;
}

int mockxen__evtchn_bind_interdomain(struct mx_handle *h, uint32_t remote_domid,
                                     uint32_t remote_port)
{
    struct mx_ctx *c = h->ctx;
    struct mx_hrec *rec;
    struct mx_port *p, *r;
    int rc, err = 0;
    if (remote_domid == MX_DOMID_SELF)
        remote_domid = h->domid;
    else if (remote_domid >= MX_DOMID_FIRST_RESERVED)
        return -ESRCH;
    if (slock(c))
        return -errno;
    rec = evtchn_rec(h);
    if (rec && rec->restrict_domid != MX_UNRESTRICTED && rec->restrict_domid != remote_domid) {
        rc = -EACCES;
        goto out;
    }
    r = port_find(c->st, remote_domid, remote_port);
    if (!r || r->state != MX_P_UNBOUND || r->remote_domid != h->domid) {
        rc = -EINVAL;
        goto out;
    }
    p = port_alloc(c->st, h->domid, &err);
    if (!p) {
        rc = -err;
        goto out;
    }
    p->state = MX_P_INTERDOMAIN;
    p->owner = h->id;
    p->remote_domid = remote_domid;
    p->remote_port = remote_port;
    r->state = MX_P_INTERDOMAIN;
    r->remote_port = p->port;
    /* Xen: "we may have lost notifications on the remote unbound port",
     * so the new local port starts pending */
    deliver(c, p);
    rc = (int)p->port;
out:
    sunlock(c);
    return rc;
}

int mockxen__evtchn_bind_virq(struct mx_handle *h, unsigned int virq)
{
    struct mx_ctx *c = h->ctx;
    struct mx_hrec *rec;
    struct mx_port *p;
    int rc, err = 0;
    if (virq >= MX_NR_VIRQS)
        return -EINVAL;
    if (slock(c))
        return -errno;
    rec = evtchn_rec(h);
    if (rec && rec->restrict_domid != MX_UNRESTRICTED) {
        rc = -EACCES;
        goto out;
    }
    for (uint32_t i = 0; i < MX_MAX_PORTS; i++) {
        p = &c->st->ports[i];
        if (p->state == MX_P_VIRQ && p->domid == h->domid && p->virq == virq) {
            rc = -EEXIST;
            goto out;
        }
    }
    p = port_alloc(c->st, h->domid, &err);
    if (!p) {
        rc = -err;
        goto out;
    }
    p->state = MX_P_VIRQ;
    p->owner = h->id;
    p->virq = virq;
    rc = (int)p->port;
out:
    sunlock(c);
    return rc;
}

int mockxen__evtchn_unbind(struct mx_handle *h, uint32_t port)
{
    struct mx_ctx *c = h->ctx;
    struct mx_port *p;
    int rc = 0;
    if (port >= MX_PORTS_PER_DOMAIN)
        return -EINVAL;
    if (slock(c))
        return -errno;
    p = port_find(c->st, h->domid, port);
    if (!p || p->owner != h->id)
        rc = -ENOTCONN;
    else
        port_release(c, p);
    sunlock(c);
    return rc;
}

int mockxen__evtchn_unmask(struct mx_handle *h, uint32_t port)
{
    struct mx_ctx *c = h->ctx;
    struct mx_port *p;
    if (slock(c))
        return -errno;
    p = port_find(c->st, h->domid, port);
    /* Linux's evtchn_write silently ignores ports of other users */
    if (p && p->owner == h->id && p->masked) {
        p->masked = 0;
        if (p->pending) {
            p->pending = 0;
            deliver(c, p);
        }
    }
    sunlock(c);
    return 0;
}

int mockxen__evtchn_restrict(struct mx_handle *h, uint32_t domid)
{
    struct mx_ctx *c = h->ctx;
    struct mx_hrec *rec;
    int rc = 0;
    if (slock(c))
        return -errno;
    rec = evtchn_rec(h);
    if (!rec)
        rc = -EBADF;
    else if (rec->restrict_domid != MX_UNRESTRICTED)
        rc = -EACCES;
    else if (domid == 0 || domid >= MX_DOMID_FIRST_RESERVED)
        rc = -EINVAL;
    else
        rec->restrict_domid = domid;
    sunlock(c);
    return rc;
}

/* ---- counters ---- */

int mockxen_live_grants(void)
{
    int n = 0;
    mockxen__lock();
    for (struct mx_region *r = g_regions; r; r = r->next)
        if (r->kind == MX_REGION_SHARE)
            n += (int)r->count;
    mockxen__unlock();
    return n;
}

int mockxen_live_mappings(void)
{
    int n = 0;
    mockxen__lock();
    for (struct mx_region *r = g_regions; r; r = r->next)
        if (r->kind == MX_REGION_MAP)
            n++;
    mockxen__unlock();
    return n;
}

int mockxen_live_handles(void)
{
    int n = 0;
    mockxen__lock();
    for (struct mx_handle *h = g_handles; h; h = h->next)
        if (!h->closed)
            n++;
    mockxen__unlock();
    return n;
}

int mockxen_live_ports(void)
{
    int n = 0;
    mockxen__lock();
    for (struct mx_ctx *c = g_ctxs; c; c = c->next) {
        if (slock(c))
            continue;
        for (uint32_t i = 0; i < MX_MAX_PORTS; i++) {
            struct mx_port *p = &c->st->ports[i];
            if (p->state == MX_P_FREE)
                continue;
            for (struct mx_handle *h = g_handles; h; h = h->next)
                if (!h->closed && h->kind == MX_KIND_EVTCHN && h->ctx == c && h->id == p->owner) {
                    n++;
                    break;
                }
        }
        sunlock(c);
    }
    mockxen__unlock();
    return n;
}

/* Give back everything this process still holds: unmap and unshare every
 * region, close every open handle.  For test isolation after a leak; any
 * Python view of the memory must already be released.  Returns the number
 * of regions and handles released. */
int mockxen_purge(void)
{
    int n = 0;
    mockxen__lock();
    while (g_regions) {
        struct mx_region *r = g_regions;
        struct mx_ctx *c = r->ctx;
        if (slock(c) == 0) {
            if (r->kind == MX_REGION_MAP)
                map_end(c, r->region_id);
            else
                share_end(c, r->region_id);
            sunlock(c);
        }
        munmap(r->addr, (size_t)r->count * MX_PAGE);
        region_unlink(r);
        ctx_maybe_drop(c);
        n++;
    }
    for (struct mx_handle *h = g_handles; h; h = h->next)
        if (!h->closed) {
            mockxen__close(h);
            n++;
        }
    mockxen__unlock();
    return n;
}

int mockxen_misuse(void)
{
    int n;
    mockxen__lock();
    n = g_misuse;
    mockxen__unlock();
    return n;
}

int mockxen_gc(const char *dir)
{
    struct mx_ctx *c;
    int rc = -1;
    mockxen__lock();
    c = ctx_get(dir);
    if (c && slock(c) == 0) {
        gc_locked(c);
        sunlock(c);
        rc = 0;
    }
    ctx_maybe_drop(c);
    mockxen__unlock();
    return rc;
}

int mockxen_dir_live(const char *dir, const char *what)
{
    struct mx_ctx *c;
    struct mx_state *st;
    int n = 0, err = 0;
    mockxen__lock();
    c = ctx_get(dir);
    if (!c || slock(c)) {
        err = errno;
        goto out;
    }
    gc_locked(c);
    st = c->st;
    if (what && strcmp(what, "grants") == 0) {
        for (uint32_t i = 0; i < MX_MAX_GRANTS; i++)
            n += st->grants[i].state != MX_G_FREE;
    } else if (what && strcmp(what, "mappings") == 0) {
        for (uint32_t i = 0; i < MX_MAX_MAPS; i++)
            n += st->maps[i].in_use && st->maps[i].page_index == 0;
    } else if (what && strcmp(what, "ports") == 0) {
        for (uint32_t i = 0; i < MX_MAX_PORTS; i++)
            n += st->ports[i].state != MX_P_FREE;
    } else if (what && strcmp(what, "handles") == 0) {
        for (uint32_t i = 0; i < MX_MAX_HANDLES; i++)
            n += st->handles[i].in_use != 0;
    } else {
        err = EINVAL;
    }
    sunlock(c);
out:
    ctx_maybe_drop(c);
    mockxen__unlock();
    if (err) {
        errno = err;
        return -1;
    }
    return n;
}

int mockxen_raise_virq(const char *dir, uint32_t domid, unsigned int virq)
{
    struct mx_ctx *c;
    int err = ENOENT;
    mockxen__lock();
    c = ctx_get(dir);
    if (!c || slock(c)) {
        err = errno;
        goto out;
    }
    for (uint32_t i = 0; i < MX_MAX_PORTS; i++) {
        struct mx_port *p = &c->st->ports[i];
        if (p->state == MX_P_VIRQ && p->domid == domid && p->virq == virq) {
            deliver(c, p);
            err = 0;
            break;
        }
    }
    sunlock(c);
out:
    ctx_maybe_drop(c);
    mockxen__unlock();
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}
