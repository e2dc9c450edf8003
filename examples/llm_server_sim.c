// llm_server_sim: a small stand-in for an LLM inference server, the workload of ./scripts/demo.
//
//   llm_server_sim [SECONDS [WORKERS]]      (defaults: 5 seconds, 4 worker threads)
//
// An accept loop queues requests; worker threads serve them. What each part does with memory,
// so that `alloctrace report` and the flamegraph have a story to tell:
//
//   accept_request          malloc a request and its prompt; freed by the worker     (churn)
//   prefill_activations     per-request activation buffer, freed after prefill       (churn)
//   decode_logits           calloc'd logits for every generated token, freed         (churn)
//   append_token_text       the response text grows by realloc, freed after sending  (churn)
//   kv_pool_grow            KV-cache blocks (posix_memalign): returned to the pool,
//                           never to the allocator: grows to a high-water mark       (plateau)
//   tokenizer_cache_insert  cache of token strings, bounded, evicts old entries      (plateau)
//   register_session        a per-request session record that nobody ever frees     (THE LEAK)
//
// Built with frame pointers by ./scripts/demo:
//   cc -O2 -g -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer -pthread
//      examples/llm_server_sim.c -o target/demo/llm_server_sim
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

enum {
    MAX_WORKERS = 32,
    QUEUE_CAP = 64,
    KV_BLOCK_BYTES = 16 * 1024, // one KV-cache block: 16 tokens x 1 KiB
    KV_TOKENS_PER_BLOCK = 16,
    VOCAB = 4096,
    HIDDEN = 1024,
    TOKENIZER_CACHE_CAP = 2048,
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

// Deterministic per-thread pseudo-random numbers.
static unsigned next_rand(unsigned *state) {
    *state = *state * 1103515245u + 12345u;
    return (*state >> 16) & 0x7fff;
}

static void *xmalloc_check(void *p) {
    if (p == NULL) {
        fprintf(stderr, "llm_server_sim: out of memory\n");
        exit(1);
    }
    return p;
}

// ---- requests and the queue ----------------------------------------------------------------

struct request {
    unsigned id;
    unsigned prompt_tokens;
    unsigned max_new_tokens;
    char *prompt;
};

static struct request *queue[QUEUE_CAP];
static unsigned q_head, q_len;
static int shutting_down;
static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t q_not_full = PTHREAD_COND_INITIALIZER;

NOINLINE static struct request *accept_request(unsigned id, unsigned *rng) {
    struct request *r = xmalloc_check(malloc(sizeof *r));
    r->id = id;
    r->prompt_tokens = 32 + next_rand(rng) % 480;
    r->max_new_tokens = 8 + next_rand(rng) % 40;
    size_t len = (size_t)r->prompt_tokens * 5;
    r->prompt = xmalloc_check(malloc(len + 1));
    for (size_t i = 0; i < len; i++) r->prompt[i] = (char)('a' + (i * 7 + id) % 26);
    r->prompt[len] = '\0';
    return r;
}

static void enqueue(struct request *r) {
    pthread_mutex_lock(&q_lock);
    while (q_len == QUEUE_CAP) pthread_cond_wait(&q_not_full, &q_lock);
    queue[(q_head + q_len) % QUEUE_CAP] = r;
    q_len++;
    pthread_cond_signal(&q_not_empty);
    pthread_mutex_unlock(&q_lock);
}

static struct request *dequeue(void) {
    pthread_mutex_lock(&q_lock);
    while (q_len == 0 && !shutting_down) pthread_cond_wait(&q_not_empty, &q_lock);
    struct request *r = NULL;
    if (q_len > 0) {
        r = queue[q_head];
        q_head = (q_head + 1) % QUEUE_CAP;
        q_len--;
        pthread_cond_signal(&q_not_full);
    }
    pthread_mutex_unlock(&q_lock);
    return r;
}

// ---- KV-cache block pool (grows to a high-water mark, never shrinks) -----------------------

struct kv_block {
    struct kv_block *next;
};

static struct kv_block *kv_free_list;
static size_t kv_blocks_total;
static pthread_mutex_t kv_lock = PTHREAD_MUTEX_INITIALIZER;

NOINLINE static struct kv_block *kv_pool_grow(void) {
    void *p = NULL;
    if (posix_memalign(&p, 4096, KV_BLOCK_BYTES) != 0) xmalloc_check(NULL);
    kv_blocks_total++;
    return p;
}

static struct kv_block *kv_acquire(void) {
    pthread_mutex_lock(&kv_lock);
    struct kv_block *b = kv_free_list;
    if (b != NULL) {
        kv_free_list = b->next;
    } else {
        b = kv_pool_grow();
    }
    pthread_mutex_unlock(&kv_lock);
    return b;
}

static void kv_release(struct kv_block *b) {
    pthread_mutex_lock(&kv_lock);
    b->next = kv_free_list;
    kv_free_list = b;
    pthread_mutex_unlock(&kv_lock);
}

// ---- tokenizer cache (bounded: entries are evicted and freed) ------------------------------

struct token_entry {
    unsigned token;
    char *text;
};

static struct token_entry *tok_cache;
static size_t tok_len, tok_cap, tok_evict;
static pthread_mutex_t tok_lock = PTHREAD_MUTEX_INITIALIZER;

NOINLINE static void tokenizer_cache_insert(unsigned token) {
    pthread_mutex_lock(&tok_lock);
    for (size_t i = 0; i < tok_len; i++) {
        if (tok_cache[i].token == token) {
            pthread_mutex_unlock(&tok_lock);
            return;
        }
    }
    char *text = xmalloc_check(malloc(16 + token % 48));
    snprintf(text, 16, "tok%u", token);
    if (tok_len < TOKENIZER_CACHE_CAP) {
        if (tok_len == tok_cap) {
            tok_cap = tok_cap ? tok_cap * 2 : 64;
            tok_cache = xmalloc_check(realloc(tok_cache, tok_cap * sizeof *tok_cache));
        }
        tok_cache[tok_len++] = (struct token_entry){token, text};
    } else {
        struct token_entry *victim = &tok_cache[tok_evict++ % TOKENIZER_CACHE_CAP];
        free(victim->text);
        *victim = (struct token_entry){token, text};
    }
    pthread_mutex_unlock(&tok_lock);
}

// ---- sessions (the leak) -------------------------------------------------------------------

struct session {
    struct session *next;
    unsigned request_id;
    unsigned tokens;
    double started_at;
    char client[96];
};

static struct session *sessions; // appended to, never pruned: the bug this demo is about
static size_t session_count;
static pthread_mutex_t session_lock = PTHREAD_MUTEX_INITIALIZER;

NOINLINE static void register_session(const struct request *r) {
    struct session *s = xmalloc_check(malloc(sizeof *s));
    s->request_id = r->id;
    s->tokens = r->prompt_tokens + r->max_new_tokens;
    s->started_at = now_s();
    snprintf(s->client, sizeof s->client, "client-%u", r->id % 97);
    pthread_mutex_lock(&session_lock);
    s->next = sessions;
    sessions = s;
    session_count++;
    pthread_mutex_unlock(&session_lock);
}

// ---- the model -----------------------------------------------------------------------------

static volatile float sink;

NOINLINE static void prefill_activations(const struct request *r) {
    size_t n = (size_t)r->prompt_tokens * HIDDEN / 8;
    float *act = xmalloc_check(malloc(n * sizeof *act));
    for (size_t i = 0; i < n; i += 64) act[i] = (float)(i % 17);
    sink = act[n / 2];
    free(act);
}

NOINLINE static unsigned decode_logits(unsigned step, unsigned *rng) {
    float *logits = xmalloc_check(calloc(VOCAB, sizeof *logits));
    unsigned best = 0;
    for (unsigned i = 0; i < VOCAB; i += 16) {
        logits[i] = (float)((i * 31 + step) % 101);
        if (logits[i] > logits[best]) best = i;
    }
    free(logits);
    return (best + next_rand(rng)) % VOCAB;
}

NOINLINE static char *append_token_text(char *text, size_t *len, unsigned token) {
    char piece[24];
    int n = snprintf(piece, sizeof piece, " tok%u", token);
    text = xmalloc_check(realloc(text, *len + (size_t)n + 1));
    memcpy(text + *len, piece, (size_t)n + 1);
    *len += (size_t)n;
    return text;
}

NOINLINE static void handle_request(struct request *r, unsigned *rng) {
    register_session(r);
    prefill_activations(r);

    unsigned total_tokens = r->prompt_tokens + r->max_new_tokens;
    unsigned nblocks = (total_tokens + KV_TOKENS_PER_BLOCK - 1) / KV_TOKENS_PER_BLOCK;
    struct kv_block *blocks[64];
    if (nblocks > 64) nblocks = 64;
    for (unsigned i = 0; i < nblocks; i++) blocks[i] = kv_acquire();

    char *text = NULL;
    size_t len = 0;
    for (unsigned step = 0; step < r->max_new_tokens; step++) {
        unsigned token = decode_logits(step, rng);
        tokenizer_cache_insert(token);
        text = append_token_text(text, &len, token);
        if (step % 8 == 0) usleep(50); // the "GPU" is busy
    }
    free(text); // response sent

    for (unsigned i = 0; i < nblocks; i++) kv_release(blocks[i]);
    free(r->prompt);
    free(r);
}

// ---- threads and main ----------------------------------------------------------------------

static unsigned long served[MAX_WORKERS];
static int workers_idle;
static pthread_cond_t idle_changed = PTHREAD_COND_INITIALIZER;

static void *worker_main(void *arg) {
    long id = (long)arg;
    unsigned rng = 1234u + (unsigned)id * 7919u;
    struct request *r;
    while ((r = dequeue()) != NULL) {
        handle_request(r, &rng);
        served[id]++;
    }
    // Park instead of exiting, like a server's worker pool at shutdown: a thread that exits makes
    // glibc free the blocks cached in its tcache, which a tracer sees as frees of blocks that
    // were already freed (unmatched frees).
    pthread_mutex_lock(&q_lock);
    workers_idle++;
    pthread_cond_broadcast(&idle_changed);
    for (;;) pthread_cond_wait(&q_not_empty, &q_lock);
    return NULL;
}

NOINLINE static unsigned accept_loop(double seconds) {
    unsigned rng = 42, id = 0;
    double end = now_s() + seconds;
    while (now_s() < end) {
        enqueue(accept_request(id++, &rng));
        usleep(id % 8 == 0 ? 4000 : 250); // requests arrive in bursts
    }
    return id;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    long workers = argc > 2 ? atol(argv[2]) : 4;
    if (seconds <= 0 || workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "usage: llm_server_sim [SECONDS (>0, default 5) [WORKERS (1-%d, default 4)]]\n",
                MAX_WORKERS);
        return 2;
    }
    fprintf(stderr, "llm_server_sim: pid %d, serving for %.1f s with %ld workers\n", (int)getpid(),
            seconds, workers);

    pthread_t threads[MAX_WORKERS];
    for (long i = 0; i < workers; i++) pthread_create(&threads[i], NULL, worker_main, (void *)i);
    unsigned accepted = accept_loop(seconds);

    pthread_mutex_lock(&q_lock);
    shutting_down = 1;
    pthread_cond_broadcast(&q_not_empty);
    while (workers_idle < workers) pthread_cond_wait(&idle_changed, &q_lock);
    pthread_mutex_unlock(&q_lock);
    unsigned long total = 0;
    for (long i = 0; i < workers; i++) total += served[i];
    fprintf(stderr,
            "llm_server_sim: accepted %u, served %lu requests; %zu sessions never freed "
            "(%zu bytes); KV pool %zu blocks (%zu KiB); tokenizer cache %zu entries\n",
            accepted, total, session_count, session_count * sizeof(struct session),
            kv_blocks_total, kv_blocks_total * KV_BLOCK_BYTES / 1024, tok_len);
    return 0;
}
