/* hetero's native reader: a pool of threads doing pread into caller-owned (page-aligned) buffers.
 *
 * Called through ctypes (hetero/flash/reader.py), so every call runs without the GIL. The caller
 * opens the files (with O_DIRECT or F_NOCACHE where it can) and owns the buffers; this file only
 * moves bytes and checksums them:
 *
 *   slot = hr_submit(pool, fd, buf, len, offset, want_crc, urgent)
 *                                                            queue one read (urgent: ahead of every
 *                                                            queued one); -EAGAIN when full
 *   hr_poll(pool, slot)                                      1 when done, 0 while in flight
 *   hr_wait(pool, slot, &result)                             block until done; frees the slot
 *
 * A read loops over short preads until `len` bytes or end of file; result.nbytes is what was read
 * (less than len at end of file) or -errno. The checksum is zlib's crc32 (slice-by-8) of the bytes
 * read, computed by the worker so verification costs no time on the calling thread.
 */
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { FREE = 0, QUEUED, RUNNING, DONE };

typedef struct {
    int64_t nbytes;   /* bytes read, or -errno */
    uint32_t crc;
    int64_t start_ns; /* CLOCK_MONOTONIC, as Python's time.monotonic_ns() */
    int64_t done_ns;
} hr_result;

typedef struct {
    int fd, want_crc, state;
    char *buf;
    size_t len;
    int64_t off;
    hr_result res;
} req_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    req_t *slots;
    int *queue; /* FIFO of slot indices, capacity `cap` */
    int cap, qhead, qcount, nthreads, stop;
    pthread_t *threads;
} pool_t;

/* ------------------------------------------------------------------ crc32 (zlib polynomial) */

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t hr_crc32(uint32_t crc, const void *data, size_t len) {
    pthread_once(&crc_once, crc_init);
    const unsigned char *p = data;
    crc = ~crc;
    while (len && ((uintptr_t)p & 7)) { crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8); len--; }
    while (len >= 8) { /* little-endian slice-by-8 */
        uint64_t v;
        memcpy(&v, p, 8);
        uint32_t lo = (uint32_t)v ^ crc, hi = (uint32_t)(v >> 32);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
              crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--) crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* ------------------------------------------------------------------ the pool */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void do_read(req_t *r) {
    size_t done = 0;
    int64_t err = 0;
    r->res.start_ns = now_ns();
    while (done < r->len) {
        ssize_t n = pread(r->fd, r->buf + done, r->len - done, (off_t)(r->off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            /* O_DIRECT refuses an unaligned retry after a short read at end of file: that is EOF */
            if (!(errno == EINVAL && done > 0)) err = -errno;
            break;
        }
        if (n == 0) break;
        done += (size_t)n;
    }
    r->res.nbytes = err ? err : (int64_t)done;
    r->res.crc = (!err && r->want_crc) ? hr_crc32(0, r->buf, done) : 0;
    r->res.done_ns = now_ns();
}

static void *worker(void *arg) {
    pool_t *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->qcount && !p->stop) pthread_cond_wait(&p->work, &p->mu);
        if (!p->qcount && p->stop) break;
        int s = p->queue[p->qhead];
        p->qhead = (p->qhead + 1) % p->cap;
        p->qcount--;
        req_t *r = &p->slots[s];
        r->state = RUNNING;
        pthread_mutex_unlock(&p->mu);
        do_read(r);
        pthread_mutex_lock(&p->mu);
        r->state = DONE;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

void hr_pool_free(pool_t *p);

pool_t *hr_pool_new(int nthreads, int cap) {
    pool_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->cap = cap;
    p->slots = calloc((size_t)cap, sizeof *p->slots);
    p->queue = calloc((size_t)cap, sizeof *p->queue);
    p->threads = calloc((size_t)nthreads, sizeof *p->threads);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    if (!p->slots || !p->queue || !p->threads) { hr_pool_free(p); return NULL; }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&p->threads[i], NULL, worker, p)) break;
        p->nthreads++;
    }
    if (!p->nthreads) { hr_pool_free(p); return NULL; }
    return p;
}

void hr_pool_free(pool_t *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1; /* workers drain what is queued, then leave */
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    free(p->slots);
    free(p->queue);
    free(p->threads);
    free(p);
}

int hr_submit(pool_t *p, int fd, void *buf, size_t len, int64_t off, int want_crc, int urgent) {
    pthread_mutex_lock(&p->mu);
    int s = -1;
    for (int i = 0; i < p->cap; i++)
        if (p->slots[i].state == FREE) { s = i; break; }
    if (s < 0 || p->stop) { pthread_mutex_unlock(&p->mu); return -EAGAIN; }
    req_t *r = &p->slots[s];
    memset(r, 0, sizeof *r);
    r->fd = fd; r->buf = buf; r->len = len; r->off = off; r->want_crc = want_crc; r->state = QUEUED;
    if (urgent) { /* a read the compute thread is about to wait for: first in line */
        p->qhead = (p->qhead + p->cap - 1) % p->cap;
        p->queue[p->qhead] = s;
    } else {
        p->queue[(p->qhead + p->qcount) % p->cap] = s;
    }
    p->qcount++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    return s;
}

int hr_poll(pool_t *p, int s) {
    pthread_mutex_lock(&p->mu);
    int done = s >= 0 && s < p->cap && p->slots[s].state == DONE;
    pthread_mutex_unlock(&p->mu);
    return done;
}

int hr_wait(pool_t *p, int s, hr_result *out) {
    if (s < 0 || s >= p->cap) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    if (p->slots[s].state == FREE) { pthread_mutex_unlock(&p->mu); return -EINVAL; }
    while (p->slots[s].state != DONE) pthread_cond_wait(&p->done, &p->mu);
    *out = p->slots[s].res;
    p->slots[s].state = FREE;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* An importable module, so the package can locate this library with importlib; the functions
 * above are reached through ctypes, which drops the GIL around each call. */
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native", "hetero's native reader (see reader.c)", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
