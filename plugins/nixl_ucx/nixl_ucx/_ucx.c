/*
 * nixl_ucx native layer: the whole per-descriptor path of the UCX backend, over libucp.
 *
 * Python hands over numpy arrays once per request (nx_xfer_new); nx_xfer_post then posts every
 * put (WRITE) or get (READ) of the request and one flush per endpoint in a single call, either
 * in the caller's thread or, for large batches, split in chunks that the workers' progress
 * threads post in parallel. Completion is a status word the flush callbacks set; a request
 * with a notification sends it as an active message from the last flush callback, so the
 * receiver sees it only after the data is visible. Nothing here calls back into Python.
 *
 * Objects (all opaque to Python):
 *   nx_ctx    UCP context, its workers, the notification queue, the completion condition.
 *   nx_worker one UCP worker (thread mode MULTI), optionally a progress thread sleeping on the
 *             worker's event fd, and a queue of chunks to post.
 *   nx_peer   one endpoint per local worker to a remote agent (or to this agent itself).
 *   nx_mem    a mapped local region and its packed remote key.
 *   nx_rkey   a remote region's key unpacked once per endpoint of a peer.
 *   nx_xfer   a prepared request: descriptor arrays, key tables, per-post state.
 *
 * Ownership at teardown. UCX keeps operations after they were posted: cma, for one, queues
 * every put/get and copies it during later progress, and a FORCE-closed endpoint hands its
 * transport endpoints to the worker, which finishes (or cancels) their queued operations in the
 * background. Destroying a worker while such an operation is queued aborts the process inside
 * UCX (ucs_arbiter_group_cleanup: "Assertion `ucs_arbiter_group_is_empty(group)' failed"), and
 * freeing a remote key or unmapping memory under one is a use after free. Therefore:
 *   - a request ends (leaves IN PROGRESS) only after a flush of every endpoint it posted on
 *     completed, also when posting stopped early (peer closing or failed, post error);
 *   - peer->posting counts the chunks of the peer that are queued or being posted, and the
 *     notification sends of its finished requests; nx_peer_quiesce waits for it to drop to 0;
 *   - nx_ctx_drain waits (bounded) for a worker flush of every worker, which completes only once
 *     every operation issued before it, including those of discarded transport endpoints, is
 *     done; the backend drains before it frees keys, unmaps memory or destroys the context, and
 *     leaks them instead when a drain does not complete in time.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#define NX_AM_ID 0x4e58u
#define NX_INPROG 1
#define NX_DONE 0
/* Progress every this many posted operations that did not complete at once (TCP). */
#define NX_PROGRESS_EVERY 64
/* Without progress threads, a standalone notification is pushed for at most this long. */
#define NX_SEND_PUSH_US 20000

typedef struct nx_ctx nx_ctx;
typedef struct nx_worker nx_worker;
typedef struct nx_xfer nx_xfer;

typedef struct nx_notif {
    struct nx_notif *next;
    uint32_t hlen;
    uint32_t dlen;
    char data[];
} nx_notif;

typedef struct nx_chunk {
    struct nx_chunk *next; /* job queue link */
    nx_xfer *x;
    size_t begin, end;
    int worker;
} nx_chunk;

struct nx_worker {
    nx_ctx *c;
    int index;
    ucp_worker_h w;
    int efd;
    int epfd;
    pthread_t thread;
    int has_thread;
    atomic_int stop;
    pthread_mutex_t jlock;
    nx_chunk *jhead, *jtail;
};

struct nx_ctx {
    ucp_context_h ctx;
    int nworkers;
    nx_worker *workers;
    int threads;
    int err_mode; /* 0 none, 1 peer */
    uint64_t mem_types;
    char *name;
    size_t name_len;
    pthread_mutex_t nlock;
    nx_notif *nhead, *ntail;
    atomic_size_t nbytes;
    pthread_mutex_t dlock;
    pthread_cond_t dcond;
};

typedef struct nx_peer {
    nx_ctx *c;
    int n;
    ucp_ep_h *eps;
    atomic_int failed;
    atomic_int fail_status;
    atomic_int closing;
    atomic_int posting;
} nx_peer;

typedef struct nx_mem {
    ucp_mem_h memh;
    void *rkey;
    size_t rkey_len;
} nx_mem;

typedef struct nx_rkey {
    nx_peer *peer;
    int n;
    ucp_rkey_h rk[];
} nx_rkey;

struct nx_xfer {
    nx_ctx *c;
    nx_peer *peer;
    int op; /* 0 WRITE (put), 1 READ (get) */
    size_t n;
    const uint64_t *laddr, *raddr, *lens;
    uint64_t ulen;
    const uint32_t *lidx, *ridx;
    nx_mem **lms;
    nx_rkey **rks;
    int wsel;
    size_t split;
    /* per post */
    atomic_int status;
    atomic_int remaining;
    atomic_int first_err;
    atomic_int orphan;
    int nchunks;
    nx_chunk *chunks;
    char *notif;
    size_t notif_len;
    int has_notif;
};

static void set_err(char *buf, size_t cap, const char *what, ucs_status_t st)
{
    if (buf != NULL && cap > 0) {
        snprintf(buf, cap, "%s: %s", what, ucs_status_string(st));
    }
}

const char *nx_status_string(int status) { return ucs_status_string((ucs_status_t)status); }

/* ------------------------------------------------------------------ notifications (receive) */
static ucs_status_t am_recv_cb(void *arg, const void *header, size_t hlen, void *data, size_t dlen,
                               const ucp_am_recv_param_t *param)
{
    nx_ctx *c = (nx_ctx *)arg;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        /* Senders of this backend always use the eager protocol; a rendezvous message is not
         * ours and is dropped (returning OK releases it). */
        return UCS_OK;
    }
    nx_notif *node = malloc(sizeof(nx_notif) + hlen + dlen);
    if (node == NULL) {
        return UCS_OK;
    }
    node->next = NULL;
    node->hlen = (uint32_t)hlen;
    node->dlen = (uint32_t)dlen;
    if (hlen) memcpy(node->data, header, hlen);
    if (dlen) memcpy(node->data + hlen, data, dlen);
    pthread_mutex_lock(&c->nlock);
    if (c->ntail) c->ntail->next = node; else c->nhead = node;
    c->ntail = node;
    atomic_fetch_add(&c->nbytes, 8 + hlen + dlen);
    pthread_mutex_unlock(&c->nlock);
    return UCS_OK;
}

size_t nx_notif_pending(nx_ctx *c) { return atomic_load(&c->nbytes); }

/* Copy whole records [u32 hlen][u32 dlen][header][data] into out; returns bytes written. */
size_t nx_notif_take(nx_ctx *c, char *out, size_t cap)
{
    size_t off = 0;
    pthread_mutex_lock(&c->nlock);
    while (c->nhead != NULL) {
        nx_notif *node = c->nhead;
        size_t rec = 8 + (size_t)node->hlen + node->dlen;
        if (off + rec > cap) break;
        memcpy(out + off, &node->hlen, 4);
        memcpy(out + off + 4, &node->dlen, 4);
        memcpy(out + off + 8, node->data, node->hlen + (size_t)node->dlen);
        off += rec;
        c->nhead = node->next;
        if (c->nhead == NULL) c->ntail = NULL;
        atomic_fetch_sub(&c->nbytes, rec);
        free(node);
    }
    pthread_mutex_unlock(&c->nlock);
    return off;
}

/* ------------------------------------------------------------------ completion */
static void signal_done(nx_ctx *c)
{
    pthread_mutex_lock(&c->dlock);
    pthread_cond_broadcast(&c->dcond);
    pthread_mutex_unlock(&c->dlock);
}

/* Publish the request's final status. The request may be freed by another thread as soon as
 * the status is stored: read everything needed before. */
static void xfer_finish(nx_xfer *x, int status)
{
    nx_ctx *c = x->c;
    int threads = c->threads;
    atomic_store(&x->status, status);
    if (threads) signal_done(c);
}

static void am_done_cb(void *request, ucs_status_t status, void *user_data)
{
    nx_xfer *x = (nx_xfer *)user_data;
    ucp_request_free(request);
    xfer_finish(x, status == UCS_OK ? NX_DONE : (int)status);
}

static int peer_status(nx_peer *p)
{
    int st = atomic_load(&p->fail_status);
    return st < 0 ? st : (int)UCS_ERR_CONNECTION_RESET;
}

/* All chunks flushed: send the notification (the data is visible remotely now) or finish. */
static void xfer_flushed(nx_xfer *x, int worker)
{
    int err = atomic_load(&x->first_err);
    if (err < 0) {
        xfer_finish(x, err);
        return;
    }
    if (!x->has_notif || atomic_load(&x->orphan)) {
        xfer_finish(x, NX_DONE);
        return;
    }
    nx_peer *peer = x->peer;
    /* The peer counts this send as posting, so that a close does not free the endpoint under
     * it; a closing peer gets no notification. */
    atomic_fetch_add(&peer->posting, 1);
    if (atomic_load(&peer->closing)) {
        atomic_fetch_sub(&peer->posting, 1);
        xfer_finish(x, (int)UCS_ERR_CANCELED);
        return;
    }
    if (atomic_load(&peer->failed)) {
        atomic_fetch_sub(&peer->posting, 1);
        xfer_finish(x, peer_status(peer));
        return;
    }
    ucp_request_param_t p;
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                     UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_FAST_CMPL;
    p.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
    p.cb.send = am_done_cb;
    p.user_data = x;
    ucs_status_ptr_t sp = ucp_am_send_nbx(peer->eps[worker], NX_AM_ID, x->c->name,
                                          x->c->name_len, x->notif, x->notif_len, &p);
    if (sp == NULL) {
        xfer_finish(x, NX_DONE);
    } else if (UCS_PTR_IS_ERR(sp)) {
        xfer_finish(x, (int)UCS_PTR_STATUS(sp));
    }
    atomic_fetch_sub(&peer->posting, 1);
}

static void record_err(nx_xfer *x, ucs_status_t status)
{
    int expect = 0;
    if (status != UCS_OK) atomic_compare_exchange_strong(&x->first_err, &expect, (int)status);
}

static void chunk_done(nx_chunk *ch, ucs_status_t status)
{
    nx_xfer *x = ch->x;
    record_err(x, status);
    if (atomic_fetch_sub(&x->remaining, 1) == 1) {
        xfer_flushed(x, ch->worker);
    }
}

static void flush_cb(void *request, ucs_status_t status, void *user_data)
{
    ucp_request_free(request);
    chunk_done((nx_chunk *)user_data, status);
}

/* Post every operation of one chunk on one endpoint, then its flush. Runs in the caller's
 * thread (inline posts) or in a worker's progress thread (split batches). The caller counted
 * the chunk in peer->posting; it leaves that count here, after its last use of the endpoint.
 * Once anything was posted the chunk ends only through the flush, also when posting stopped
 * early: UCX may still own the operations posted so far. */
static void post_chunk(nx_chunk *ch)
{
    nx_xfer *x = ch->x;
    nx_peer *peer = x->peer;
    int k = ch->worker;
    nx_worker *wk = &x->c->workers[k];
    ucp_ep_h ep = peer->eps[k];
    ucs_status_t st = UCS_OK;
    size_t pending = 0;
    size_t i = ch->begin;

    if (atomic_load(&peer->closing)) {
        st = UCS_ERR_CANCELED;
        goto out;
    }
    if (atomic_load(&peer->failed)) {
        st = (ucs_status_t)peer_status(peer);
        goto out;
    }
    ucp_request_param_t p;
    p.op_attr_mask = UCP_OP_ATTR_FLAG_MULTI_SEND;
    const uint64_t *laddr = x->laddr, *raddr = x->raddr, *lens = x->lens;
    const uint32_t *lidx = x->lidx, *ridx = x->ridx;
    nx_rkey **rks = x->rks;
    ucp_rkey_h rk0 = rks[0]->rk[k];
    if (x->lms != NULL) {
        p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        p.memh = x->lms[0]->memh;
    }
    const int get = x->op == 1;
    for (; i < ch->end; i++) {
        size_t len = lens ? (size_t)lens[i] : (size_t)x->ulen;
        ucp_rkey_h rk = ridx ? rks[ridx[i]]->rk[k] : rk0;
        if (lidx) p.memh = x->lms[lidx[i]]->memh;
        ucs_status_ptr_t sp;
        if (get) {
            sp = ucp_get_nbx(ep, (void *)(uintptr_t)laddr[i], len, raddr[i], rk, &p);
        } else {
            sp = ucp_put_nbx(ep, (const void *)(uintptr_t)laddr[i], len, raddr[i], rk, &p);
        }
        if (sp != NULL) {
            if (UCS_PTR_IS_ERR(sp)) {
                st = UCS_PTR_STATUS(sp);
                break;
            }
            ucp_request_free(sp);
            pending++;
        }
        if ((i - ch->begin) % NX_PROGRESS_EVERY == NX_PROGRESS_EVERY - 1) {
            /* Operations queued (TCP) need progress to move; a dead or closing peer stops us. */
            if (pending) {
                ucp_worker_progress(wk->w);
                pending = 0;
            }
            if (atomic_load(&peer->failed)) {
                st = (ucs_status_t)peer_status(peer);
                break;
            }
            if (atomic_load(&peer->closing)) {
                st = UCS_ERR_CANCELED;
                break;
            }
        }
    }
    if (i == ch->begin && st != UCS_OK) goto out; /* nothing of this chunk reached UCX */
    record_err(x, st);
    ucp_request_param_t fp;
    fp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    fp.cb.send = flush_cb;
    fp.user_data = ch;
    ucs_status_ptr_t fsp = ucp_ep_flush_nbx(ep, &fp);
    if (fsp == NULL) {
        chunk_done(ch, UCS_OK);
    } else if (UCS_PTR_IS_ERR(fsp)) {
        chunk_done(ch, UCS_PTR_STATUS(fsp));
    }
    atomic_fetch_sub(&peer->posting, 1);
    return;
out:
    chunk_done(ch, st);
    atomic_fetch_sub(&peer->posting, 1);
}

/* ------------------------------------------------------------------ progress threads */
static nx_chunk *pop_job(nx_worker *wk)
{
    pthread_mutex_lock(&wk->jlock);
    nx_chunk *ch = wk->jhead;
    if (ch != NULL) {
        wk->jhead = ch->next;
        if (wk->jhead == NULL) wk->jtail = NULL;
    }
    pthread_mutex_unlock(&wk->jlock);
    return ch;
}

static void push_job(nx_worker *wk, nx_chunk *ch)
{
    ch->next = NULL;
    pthread_mutex_lock(&wk->jlock);
    if (wk->jtail) wk->jtail->next = ch; else wk->jhead = ch;
    wk->jtail = ch;
    pthread_mutex_unlock(&wk->jlock);
    ucp_worker_signal(wk->w);
}

static void *progress_main(void *arg)
{
    nx_worker *wk = (nx_worker *)arg;
    struct epoll_event ev;
    while (!atomic_load(&wk->stop)) {
        nx_chunk *ch = pop_job(wk);
        if (ch != NULL) {
            post_chunk(ch);
            continue;
        }
        if (ucp_worker_progress(wk->w)) continue;
        ucs_status_t st = ucp_worker_arm(wk->w);
        if (st == UCS_ERR_BUSY) continue;
        if (st != UCS_OK) {
            /* No event support: poll gently instead of sleeping on the fd. */
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (wk->jhead != NULL || atomic_load(&wk->stop)) continue;
        epoll_wait(wk->epfd, &ev, 1, 100);
    }
    return NULL;
}

/* ------------------------------------------------------------------ context and workers */
void nx_ctx_free(nx_ctx *c);

nx_ctx *nx_ctx_new(const char *name, const char *const *keys, const char *const *vals, int nkv,
                   int nworkers, int err_mode, int threads, char *err, size_t errcap)
{
    ucp_config_t *cfg = NULL;
    ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
    if (st != UCS_OK) {
        set_err(err, errcap, "ucp_config_read", st);
        return NULL;
    }
    for (int i = 0; i < nkv; i++) {
        st = ucp_config_modify(cfg, keys[i], vals[i]);
        if (st != UCS_OK) {
            if (err) snprintf(err, errcap, "UCX option %s=%s: %s", keys[i], vals[i],
                              ucs_status_string(st));
            ucp_config_release(cfg);
            return NULL;
        }
    }
    nx_ctx *c = calloc(1, sizeof(nx_ctx));
    c->name_len = strlen(name);
    c->name = strdup(name);
    c->err_mode = err_mode;
    c->threads = threads;
    pthread_mutex_init(&c->nlock, NULL);
    pthread_mutex_init(&c->dlock, NULL);
    pthread_cond_init(&c->dcond, NULL);
    atomic_init(&c->nbytes, 0);

    ucp_params_t up;
    memset(&up, 0, sizeof(up));
    up.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                    UCP_PARAM_FIELD_NAME;
    up.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    up.mt_workers_shared = 1;
    up.name = c->name;
    st = ucp_init(&up, cfg, &c->ctx);
    ucp_config_release(cfg);
    if (st != UCS_OK) {
        set_err(err, errcap, "ucp_init", st);
        c->ctx = NULL;
        nx_ctx_free(c);
        return NULL;
    }
    ucp_context_attr_t ca;
    ca.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(c->ctx, &ca) == UCS_OK) c->mem_types = ca.memory_types;

    c->workers = calloc((size_t)nworkers, sizeof(nx_worker));
    for (int k = 0; k < nworkers; k++) {
        nx_worker *wk = &c->workers[k];
        wk->c = c;
        wk->index = k;
        wk->efd = -1;
        wk->epfd = -1;
        pthread_mutex_init(&wk->jlock, NULL);
        ucp_worker_params_t wp;
        memset(&wp, 0, sizeof(wp));
        wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
        wp.thread_mode = UCS_THREAD_MODE_MULTI;
        st = ucp_worker_create(c->ctx, &wp, &wk->w);
        if (st != UCS_OK) {
            set_err(err, errcap, "ucp_worker_create", st);
            wk->w = NULL;
            nx_ctx_free(c);
            return NULL;
        }
        c->nworkers = k + 1;
        ucp_am_handler_param_t ap;
        ap.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                        UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
        ap.id = NX_AM_ID;
        ap.cb = am_recv_cb;
        ap.arg = c;
        ap.flags = UCP_AM_FLAG_WHOLE_MSG;
        st = ucp_worker_set_am_recv_handler(wk->w, &ap);
        if (st != UCS_OK) {
            set_err(err, errcap, "ucp_worker_set_am_recv_handler", st);
            nx_ctx_free(c);
            return NULL;
        }
        if (ucp_worker_get_efd(wk->w, &wk->efd) == UCS_OK) {
            wk->epfd = epoll_create1(EPOLL_CLOEXEC);
            struct epoll_event ev;
            ev.events = EPOLLIN;
            ev.data.fd = wk->efd;
            epoll_ctl(wk->epfd, EPOLL_CTL_ADD, wk->efd, &ev);
        }
    }
    if (threads) {
        for (int k = 0; k < nworkers; k++) {
            nx_worker *wk = &c->workers[k];
            atomic_store(&wk->stop, 0);
            if (pthread_create(&wk->thread, NULL, progress_main, wk) != 0) {
                if (err) snprintf(err, errcap, "pthread_create: %s", strerror(errno));
                nx_ctx_free(c);
                return NULL;
            }
            wk->has_thread = 1;
        }
    }
    return c;
}

void nx_ctx_stop_threads(nx_ctx *c)
{
    for (int k = 0; k < c->nworkers; k++) {
        nx_worker *wk = &c->workers[k];
        if (!wk->has_thread) continue;
        atomic_store(&wk->stop, 1);
        ucp_worker_signal(wk->w);
        pthread_join(wk->thread, NULL);
        wk->has_thread = 0;
        /* Chunks never posted end their requests as canceled. */
        nx_chunk *ch;
        while ((ch = pop_job(wk)) != NULL) {
            nx_peer *peer = ch->x->peer;
            chunk_done(ch, UCS_ERR_CANCELED);
            atomic_fetch_sub(&peer->posting, 1);
        }
    }
    c->threads = 0;
}

static long elapsed_us(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t0->tv_sec) * 1000000 + (now.tv_nsec - t0->tv_nsec) / 1000;
}

/* Progress worker k until request reqs[k] (one per worker, NULL: none) completes, for all k,
 * at most timeout_ms after t0; yield_us > 0 sleeps that long between rounds (when progress
 * threads do most of the work). Requests still running are released (UCX frees them when they
 * complete). Returns how many were still running. */
static int wait_requests(nx_ctx *c, ucs_status_ptr_t *reqs, int n, int timeout_ms,
                         const struct timespec *t0, long yield_us)
{
    int left;
    for (;;) {
        left = 0;
        for (int k = 0; k < n; k++) {
            if (reqs[k] == NULL) continue;
            ucp_worker_progress(c->workers[k].w);
            if (ucp_request_check_status(reqs[k]) != UCS_INPROGRESS) {
                ucp_request_free(reqs[k]);
                reqs[k] = NULL;
            } else {
                left++;
            }
        }
        if (!left || elapsed_us(t0) > (long)timeout_ms * 1000) break;
        if (yield_us > 0) {
            struct timespec ts = {0, yield_us * 1000};
            nanosleep(&ts, NULL);
        }
    }
    for (int k = 0; k < n; k++) {
        if (reqs[k] != NULL) ucp_request_free(reqs[k]);
    }
    return left;
}

/* Wait until every operation issued on any worker before this call is done: a worker flush
 * completes only once the endpoints' operations and those of discarded transport endpoints
 * (closed or failed endpoints) finished or were canceled. Progresses the workers itself, so it
 * works with or without progress threads. Returns 0, or -1 when that did not happen within
 * timeout_ms (UCX may then still use keys, memory and workers). */
int nx_ctx_drain(nx_ctx *c, int timeout_ms)
{
    ucs_status_ptr_t *reqs = calloc((size_t)c->nworkers, sizeof(ucs_status_ptr_t));
    if (reqs == NULL) return -1;
    ucp_request_param_t fp;
    fp.op_attr_mask = 0;
    for (int k = 0; k < c->nworkers; k++) {
        reqs[k] = ucp_worker_flush_nbx(c->workers[k].w, &fp);
        if (!UCS_PTR_IS_PTR(reqs[k])) reqs[k] = NULL;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* With progress threads, they do most of the work: do not fight them for the workers. */
    int left = wait_requests(c, reqs, c->nworkers, timeout_ms, &t0, c->threads ? 20 : 0);
    free(reqs);
    return left ? -1 : 0;
}

/* Destroy the context. The caller stopped the threads and drained it (nx_ctx_drain returned 0):
 * a worker destroyed while UCX still holds an operation aborts the process. */
void nx_ctx_free(nx_ctx *c)
{
    if (c == NULL) return;
    nx_ctx_stop_threads(c);
    for (int k = 0; k < c->nworkers; k++) {
        nx_worker *wk = &c->workers[k];
        if (wk->epfd >= 0) close(wk->epfd);
        if (wk->w) ucp_worker_destroy(wk->w);
    }
    free(c->workers);
    if (c->ctx) ucp_cleanup(c->ctx);
    nx_notif *node = c->nhead;
    while (node) {
        nx_notif *next = node->next;
        free(node);
        node = next;
    }
    free(c->name);
    free(c);
}

uint64_t nx_ctx_mem_types(nx_ctx *c) { return c->mem_types; }
int nx_ctx_threads(nx_ctx *c) { return c->threads; }

/* Progress every worker until none has work or max_rounds passed; returns events seen. */
unsigned nx_progress(nx_ctx *c, int max_rounds)
{
    unsigned total = 0;
    for (int r = 0; r < max_rounds; r++) {
        unsigned got = 0;
        for (int k = 0; k < c->nworkers; k++) got += ucp_worker_progress(c->workers[k].w);
        total += got;
        if (!got) break;
    }
    return total;
}

/* The worker's address: *out (release with nx_free_address). */
int nx_worker_address(nx_ctx *c, int k, void **out, size_t *len)
{
    ucp_address_t *a = NULL;
    ucs_status_t st = ucp_worker_get_address(c->workers[k].w, &a, len);
    *out = a;
    return (int)st;
}

void nx_free_address(nx_ctx *c, int k, void *addr)
{
    ucp_worker_release_address(c->workers[k].w, (ucp_address_t *)addr);
}

/* ------------------------------------------------------------------ memory */
nx_mem *nx_mem_map(nx_ctx *c, uint64_t addr, uint64_t len, int cuda, int *status)
{
    ucp_mem_map_params_t mp;
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    mp.address = (void *)(uintptr_t)addr;
    mp.length = (size_t)len;
    mp.memory_type = cuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
    nx_mem *m = calloc(1, sizeof(nx_mem));
    ucs_status_t st = ucp_mem_map(c->ctx, &mp, &m->memh);
    if (st != UCS_OK) {
        free(m);
        *status = (int)st;
        return NULL;
    }
    void *buf = NULL;
    size_t blen = 0;
    st = ucp_rkey_pack(c->ctx, m->memh, &buf, &blen);
    if (st != UCS_OK) {
        ucp_mem_unmap(c->ctx, m->memh);
        free(m);
        *status = (int)st;
        return NULL;
    }
    m->rkey = malloc(blen);
    memcpy(m->rkey, buf, blen);
    m->rkey_len = blen;
    ucp_rkey_buffer_release(buf);
    *status = 0;
    return m;
}

size_t nx_mem_rkey(nx_mem *m, const void **buf)
{
    *buf = m->rkey;
    return m->rkey_len;
}

void nx_mem_unmap(nx_ctx *c, nx_mem *m)
{
    ucp_mem_unmap(c->ctx, m->memh);
    free(m->rkey);
    free(m);
}

/* ------------------------------------------------------------------ peers */
static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)ep;
    nx_peer *p = (nx_peer *)arg;
    int expect = 0;
    atomic_compare_exchange_strong(&p->fail_status, &expect, (int)status);
    atomic_store(&p->failed, 1);
    signal_done(p->c);
}

static void ep_close_param(nx_ctx *c, ucp_request_param_t *cp);

/* One endpoint per local worker k, to remote address addrs[k % naddrs]. */
nx_peer *nx_peer_new(nx_ctx *c, const void *const *addrs, int naddrs, int *status)
{
    nx_peer *p = calloc(1, sizeof(nx_peer));
    p->c = c;
    p->n = c->nworkers;
    p->eps = calloc((size_t)p->n, sizeof(ucp_ep_h));
    for (int k = 0; k < p->n; k++) {
        ucp_ep_params_t ep;
        memset(&ep, 0, sizeof(ep));
        ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
        ep.address = (const ucp_address_t *)addrs[k % naddrs];
        ep.err_mode = c->err_mode ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
        if (c->err_mode) {
            ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
            ep.err_handler.cb = ep_err_cb;
            ep.err_handler.arg = p;
        }
        ucs_status_t st = ucp_ep_create(c->workers[k].w, &ep, &p->eps[k]);
        if (st != UCS_OK) {
            *status = (int)st;
            for (int j = 0; j < k; j++) {
                ucp_request_param_t cp;
                ep_close_param(c, &cp);
                ucs_status_ptr_t r = ucp_ep_close_nbx(p->eps[j], &cp);
                if (UCS_PTR_IS_PTR(r)) ucp_request_free(r);
            }
            free(p->eps);
            free(p);
            return NULL;
        }
    }
    *status = 0;
    return p;
}

int nx_peer_failed(nx_peer *p) { return atomic_load(&p->failed) ? peer_status(p) : 0; }

/* Stop new posts on the peer and wait (bounded) for its chunks queued or being posted, and its
 * notification sends, to leave. Returns 0, or -1 when they did not in time. */
int nx_peer_quiesce(nx_peer *p, int timeout_ms)
{
    atomic_store(&p->closing, 1);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (atomic_load(&p->posting) > 0) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms > timeout_ms) return -1;
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* UCX accepts a FORCE close only on endpoints with peer error handling; the others are closed
 * in flush mode. */
static void ep_close_param(nx_ctx *c, ucp_request_param_t *cp)
{
    cp->op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    cp->flags = c->err_mode ? UCP_EP_CLOSE_FLAG_FORCE : 0;
}

/* Close every endpoint (FORCE with peer error handling: never waits for an unresponsive peer),
 * then drain the workers so that nothing UCX still does for these endpoints outlives them,
 * bounded in time. The caller quiesced the peer first. Returns 0 (the peer is freed), or -1
 * when the closes or the drain did not finish in time: the peer is then leaked, not freed, and
 * UCX may still use the keys unpacked for it. */
int nx_peer_close(nx_peer *p, int timeout_ms)
{
    nx_ctx *c = p->c;
    ucs_status_ptr_t *reqs = calloc((size_t)p->n, sizeof(ucs_status_ptr_t));
    if (reqs == NULL) return -1;
    ucp_request_param_t cp;
    ep_close_param(c, &cp);
    for (int k = 0; k < p->n; k++) {
        reqs[k] = ucp_ep_close_nbx(p->eps[k], &cp);
        if (!UCS_PTR_IS_PTR(reqs[k])) reqs[k] = NULL;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int left = wait_requests(c, reqs, p->n, timeout_ms, &t0, 0);
    free(reqs);
    if (left) return -1;
    long spent_ms = elapsed_us(&t0) / 1000;
    if (nx_ctx_drain(c, timeout_ms > spent_ms ? timeout_ms - (int)spent_ms : 0) != 0) return -1;
    free(p->eps);
    free(p);
    return 0;
}

/* Text of ucp_ep_print_info for worker k's endpoint (for the transport report). */
size_t nx_peer_info(nx_peer *p, int k, char *out, size_t cap)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL) return 0;
    ucp_ep_print_info(p->eps[k], f);
    fclose(f);
    size_t n = len < cap ? len : cap;
    memcpy(out, buf, n);
    free(buf);
    return n;
}

/* Unpack a packed remote key once per endpoint of the peer. */
nx_rkey *nx_rkey_unpack(nx_peer *p, const void *buf, int *status)
{
    nx_rkey *r = calloc(1, sizeof(nx_rkey) + (size_t)p->n * sizeof(ucp_rkey_h));
    r->peer = p;
    for (int k = 0; k < p->n; k++) {
        ucs_status_t st = ucp_ep_rkey_unpack(p->eps[k], buf, &r->rk[k]);
        if (st != UCS_OK) {
            for (int j = 0; j < k; j++) ucp_rkey_destroy(r->rk[j]);
            free(r);
            *status = (int)st;
            return NULL;
        }
        r->n = k + 1;
    }
    *status = 0;
    return r;
}

void nx_rkey_free(nx_rkey *r)
{
    for (int k = 0; k < r->n; k++) ucp_rkey_destroy(r->rk[k]);
    free(r);
}

/* ------------------------------------------------------------------ notifications (send) */
typedef struct nx_sendbuf {
    atomic_int state; /* 0 in flight, 1 completed (callback ran), 2 abandoned by the sender */
    char data[];
} nx_sendbuf;

static void notif_sent_cb(void *request, ucs_status_t status, void *user_data)
{
    (void)status;
    nx_sendbuf *b = (nx_sendbuf *)user_data;
    ucp_request_free(request);
    if (atomic_exchange(&b->state, 1) == 2) free(b);
}

/* Standalone notification on worker 0's endpoint (one endpoint keeps a sender's order). */
int nx_send_notif(nx_peer *p, const char *msg, size_t len)
{
    nx_ctx *c = p->c;
    if (atomic_load(&p->failed)) return peer_status(p);
    nx_sendbuf *b = malloc(sizeof(nx_sendbuf) + (len ? len : 1));
    atomic_init(&b->state, 0);
    if (len) memcpy(b->data, msg, len);
    ucp_request_param_t sp;
    sp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_FAST_CMPL;
    sp.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
    sp.cb.send = notif_sent_cb;
    sp.user_data = b;
    ucs_status_ptr_t r = ucp_am_send_nbx(p->eps[0], NX_AM_ID, c->name, c->name_len, b->data,
                                         len, &sp);
    if (r == NULL) {
        free(b);
        return 0;
    }
    if (UCS_PTR_IS_ERR(r)) {
        free(b);
        return (int)UCS_PTR_STATUS(r);
    }
    /* Without progress threads nothing else may progress this worker before the user calls
     * in again: push the message out, bounded in time (every worker is progressed, so a
     * receiver in this process cannot deadlock it). */
    if (!c->threads) {
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (atomic_load(&b->state) == 0) {
            nx_progress(c, 4);
            clock_gettime(CLOCK_MONOTONIC, &now);
            long us = (now.tv_sec - t0.tv_sec) * 1000000 + (now.tv_nsec - t0.tv_nsec) / 1000;
            if (us > NX_SEND_PUSH_US) break;
        }
    }
    if (atomic_exchange(&b->state, 2) == 1) free(b);
    return 0;
}

/* ------------------------------------------------------------------ transfers */
nx_xfer *nx_xfer_new(nx_ctx *c, nx_peer *peer, int op, size_t n, const uint64_t *laddr,
                     const uint64_t *raddr, const uint64_t *lens, uint64_t ulen,
                     const uint32_t *lidx, nx_mem **lms, const uint32_t *ridx, nx_rkey **rks,
                     int wsel, size_t split)
{
    nx_xfer *x = calloc(1, sizeof(nx_xfer));
    x->c = c;
    x->peer = peer;
    x->op = op;
    x->n = n;
    x->laddr = laddr;
    x->raddr = raddr;
    x->lens = lens;
    x->ulen = ulen;
    x->lidx = lidx;
    x->lms = lms;
    x->ridx = ridx;
    x->rks = rks;
    x->wsel = wsel % c->nworkers;
    x->split = split ? split : (size_t)-1;
    x->chunks = calloc((size_t)c->nworkers, sizeof(nx_chunk));
    atomic_init(&x->status, NX_DONE);
    return x;
}

/* Post the request: 0 DONE, 1 IN PROGRESS, < 0 a UCS error. The notification (when has_notif)
 * is copied; it is sent after every flush completed. */
int nx_xfer_post(nx_xfer *x, const char *notif, size_t notif_len, int has_notif)
{
    nx_ctx *c = x->c;
    if (atomic_load(&x->peer->failed)) return peer_status(x->peer);
    if (atomic_load(&x->peer->closing)) return (int)UCS_ERR_CANCELED;
    free(x->notif);
    x->notif = NULL;
    x->notif_len = 0;
    x->has_notif = has_notif;
    if (has_notif) {
        x->notif = malloc(notif_len ? notif_len : 1);
        if (notif_len) memcpy(x->notif, notif, notif_len);
        x->notif_len = notif_len;
    }
    atomic_store(&x->first_err, 0);
    atomic_store(&x->orphan, 0);
    atomic_store(&x->status, NX_INPROG);
    int nch = 1;
    if (c->threads && x->n >= x->split) {
        size_t per = (x->n + (size_t)c->nworkers - 1) / (size_t)c->nworkers;
        if (per < x->split / 2) per = x->split / 2; /* no tiny chunks */
        nch = (int)((x->n + per - 1) / per);
        if (nch > c->nworkers) nch = c->nworkers;
        per = (x->n + (size_t)nch - 1) / (size_t)nch;
        atomic_store(&x->remaining, nch);
        x->nchunks = nch;
        for (int j = 0; j < nch; j++) {
            nx_chunk *ch = &x->chunks[j];
            ch->x = x;
            ch->worker = (x->wsel + j) % c->nworkers;
            ch->begin = (size_t)j * per;
            ch->end = ch->begin + per < x->n ? ch->begin + per : x->n;
        }
        atomic_fetch_add(&x->peer->posting, nch);
        for (int j = 0; j < nch; j++) push_job(&c->workers[x->chunks[j].worker], &x->chunks[j]);
        return NX_INPROG;
    }
    x->nchunks = 1;
    atomic_store(&x->remaining, 1);
    nx_chunk *ch = &x->chunks[0];
    ch->x = x;
    ch->worker = x->wsel;
    ch->begin = 0;
    ch->end = x->n;
    atomic_fetch_add(&x->peer->posting, 1);
    post_chunk(ch);
    int st = atomic_load(&x->status);
    if (st == NX_INPROG && !c->threads) {
        /* One progress round often completes the flush and the notification at once. */
        ucp_worker_progress(c->workers[x->wsel].w);
        st = atomic_load(&x->status);
    }
    return st;
}

int nx_xfer_status(nx_xfer *x) { return atomic_load(&x->status); }

/* Progress the request's workers once and return its status. */
int nx_xfer_poll(nx_xfer *x)
{
    int st = atomic_load(&x->status);
    if (st != NX_INPROG) return st;
    nx_ctx *c = x->c;
    for (int j = 0; j < x->nchunks; j++) {
        int k = x->nchunks == 1 ? x->chunks[0].worker : x->chunks[j].worker;
        while (ucp_worker_progress(c->workers[k].w)) {
        }
    }
    return atomic_load(&x->status);
}

/* Wait up to timeout_us for the request to leave IN PROGRESS, without spinning: on the
 * completion condition when progress threads run, else on the workers' event fds. */
int nx_xfer_wait(nx_xfer *x, long timeout_us)
{
    nx_ctx *c = x->c;
    int st = atomic_load(&x->status);
    if (st != NX_INPROG || timeout_us <= 0) return st;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_us / 1000000;
    dl.tv_nsec += (timeout_us % 1000000) * 1000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    if (c->threads) {
        pthread_mutex_lock(&c->dlock);
        while ((st = atomic_load(&x->status)) == NX_INPROG) {
            if (pthread_cond_timedwait(&c->dcond, &c->dlock, &dl) == ETIMEDOUT) break;
        }
        pthread_mutex_unlock(&c->dlock);
        return atomic_load(&x->status);
    }
    nx_worker *wk = &c->workers[x->chunks[0].worker];
    struct timespec now;
    for (;;) {
        while (ucp_worker_progress(wk->w)) {
        }
        st = atomic_load(&x->status);
        if (st != NX_INPROG) return st;
        clock_gettime(CLOCK_REALTIME, &now);
        long left_ms = (dl.tv_sec - now.tv_sec) * 1000 + (dl.tv_nsec - now.tv_nsec) / 1000000;
        if (left_ms <= 0) return st;
        if (wk->epfd < 0) continue;
        ucs_status_t a = ucp_worker_arm(wk->w);
        if (a == UCS_ERR_BUSY) continue;
        if (a != UCS_OK) continue;
        struct epoll_event ev;
        epoll_wait(wk->epfd, &ev, 1, left_ms < 5 ? (int)left_ms : 5);
    }
}

/* A released request that is still running: send no notification when it finishes. */
void nx_xfer_orphan(nx_xfer *x) { atomic_store(&x->orphan, 1); }

void nx_xfer_free(nx_xfer *x)
{
    free(x->notif);
    free(x->chunks);
    free(x);
}
