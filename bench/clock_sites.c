/* Count the clock reads of a Python process by the Python line that made them.
 *
 * Loaded with LD_PRELOAD by bench/profile_ops.py --clock-sites.  It replaces
 * clock_gettime() with the system call itself (so that every read is seen,
 * vDSO or not) and, while recording is on, writes one line per read to the
 * file given to pyxen9p_clock_sites_start():
 *
 *     <thread id> <kind> <file:line:function> <file:line:function>
 *
 * kind: "lock" (PyThread_acquire_lock_timed: CPython up to 3.12 reads the
 * clock on every lock acquire), "deadline" (a timeout turned into a
 * deadline: poll, select, Condition.wait...), "monotonic" (time.monotonic
 * and friends), or "other" (the interpreter itself, e.g. waiting for the
 * GIL).  The two Python frames (innermost first) are known only when the
 * thread holds the GIL; "-" otherwise.
 *
 * Only for measuring: it is slow (a file write per clock read).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static FILE *out;
/* the file of the last recording: flushed, not closed, at the stop (another
 * thread may still be writing its last line); closed at the next start */
static FILE *done;
static __thread int busy;

typedef void *(*get0_t)(void);
typedef void *(*get1_t)(void *);
typedef int (*int1_t)(void *);
typedef int (*int0_t)(void);
typedef void *(*attr_t)(void *, const char *);
typedef const char *(*utf8_t)(void *);
typedef void (*decref_t)(void *);

static struct {
    int0_t gil_held;
    get0_t frame;
    get1_t back, code;
    int1_t lineno;
    attr_t attr;
    utf8_t utf8;
    decref_t decref;
} py;

int pyxen9p_clock_sites_stop(void);

int pyxen9p_clock_sites_start(const char *path)
{
    pyxen9p_clock_sites_stop();
    if (done != NULL) {
        fclose(done);
        done = NULL;
    }
    py.gil_held = (int0_t)dlsym(RTLD_DEFAULT, "PyGILState_Check");
    py.frame = (get0_t)dlsym(RTLD_DEFAULT, "PyEval_GetFrame");
    py.back = (get1_t)dlsym(RTLD_DEFAULT, "PyFrame_GetBack");
    py.code = (get1_t)dlsym(RTLD_DEFAULT, "PyFrame_GetCode");
    py.lineno = (int1_t)dlsym(RTLD_DEFAULT, "PyFrame_GetLineNumber");
    py.attr = (attr_t)dlsym(RTLD_DEFAULT, "PyObject_GetAttrString");
    py.utf8 = (utf8_t)dlsym(RTLD_DEFAULT, "PyUnicode_AsUTF8");
    py.decref = (decref_t)dlsym(RTLD_DEFAULT, "Py_DecRef");
    if (!py.gil_held || !py.frame || !py.back || !py.code || !py.lineno || !py.attr ||
        !py.utf8 || !py.decref)
        return -2;
    out = fopen(path, "w");
    return out == NULL ? -1 : 0;
}

int pyxen9p_clock_sites_stop(void)
{
    FILE *f = out;
    out = NULL;
    if (f == NULL)
        return 0;
    done = f;
    return fflush(f);
}

static const char *kind_of(void **stack, int depth)
{
    for (int i = 1; i < depth; i++) {
        Dl_info info;
        if (!dladdr(stack[i], &info) || info.dli_sname == NULL)
            continue;
        const char *name = info.dli_sname;
        if (strstr(name, "acquire_lock"))
            return "lock";
        if (strstr(name, "Deadline"))
            return "deadline";
        if (strstr(name, "WithInfo") || strstr(name, "time_monotonic") ||
            strstr(name, "time_perf_counter"))
            return "monotonic";
    }
    return "other";
}

/* "file:line:function" of *frame*, into buf */
static void describe(void *frame, char *buf, size_t size)
{
    void *code = py.code(frame);
    void *file = code ? py.attr(code, "co_filename") : NULL;
    void *name = code ? py.attr(code, "co_name") : NULL;
    const char *f = file ? py.utf8(file) : NULL;
    const char *n = name ? py.utf8(name) : NULL;
    const char *base = f ? strrchr(f, '/') : NULL;
    snprintf(buf, size, "%s:%d:%s", base ? base + 1 : (f ? f : "?"), py.lineno(frame),
             n ? n : "?");
    if (file)
        py.decref(file);
    if (name)
        py.decref(name);
    if (code)
        py.decref(code);
}

int clock_gettime(clockid_t clock, struct timespec *ts)
{
    int rc = (int)syscall(SYS_clock_gettime, clock, ts);
    if (out == NULL || busy)
        return rc;
    busy = 1;
    void *stack[6];
    int depth = backtrace(stack, 6);
    char first[256] = "-", second[256] = "-";
    if (py.gil_held()) {
        void *frame = py.frame(); /* borrowed */
        if (frame != NULL) {
            describe(frame, first, sizeof first);
            void *back = py.back(frame); /* new reference */
            if (back != NULL) {
                describe(back, second, sizeof second);
                py.decref(back);
            }
        }
    }
    FILE *f = out;
    if (f != NULL)
        fprintf(f, "%ld %s %s %s\n", (long)syscall(SYS_gettid), kind_of(stack, depth), first,
                second);
    busy = 0;
    return rc;
}
