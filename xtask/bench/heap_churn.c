// Benchmark workload: malloc/free pairs in a tight loop, timed by the program itself so that
// start-up and attach time are not part of the figure.
//
//   heap_churn pairs N      N malloc/free pairs of mixed small sizes; prints "ns_per_pair X"
//   heap_churn live N       allocates N blocks and keeps them live until exit (tracer memory)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

__attribute__((noinline)) static void churn_pairs(long n) {
    static const size_t sizes[] = {16, 24, 32, 48, 64, 96, 128, 256};
    for (long i = 0; i < n; i++) {
        void *p = malloc(sizes[i & 7]);
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
}

__attribute__((noinline)) static void **hold_live(long n) {
    void **blocks = malloc(n * sizeof(void *));
    for (long i = 0; i < n; i++) blocks[i] = malloc(32);
    return blocks;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: heap_churn pairs|live N\n");
        return 2;
    }
    long n = atol(argv[2]);
    setvbuf(stdout, NULL, _IONBF, 0);
    if (strcmp(argv[1], "pairs") == 0) {
        churn_pairs(n / 10); // warm-up: page in the allocator's arenas
        double t0 = now_ns();
        churn_pairs(n);
        double t1 = now_ns();
        printf("ns_per_pair %.1f\n", (t1 - t0) / n);
    } else {
        void **blocks = hold_live(n);
        printf("live %ld %p\n", n, (void *)blocks);
    }
    return 0;
}
