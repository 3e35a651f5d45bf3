/* One label's row read after another, each read's address taken from the row read before it: the time a frame's
 * row costs when nothing else is under way, as for a frame taken alone by the one-frame path. The rows are 128
 * octets (ROW_SIZE) on huge pages where the kernel grants them, as the switching table's are, and visited in one
 * random cycle through all of them.
 *
 * usage: row_latency ROWS READS SEED   prints {"rows": ..., "reads": ..., "ns_per_read": ...} */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define ROW_SIZE 128
#define HUGE_PAGE (2UL << 20)

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t next_random(uint64_t *state) { /* xorshift64* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 2685821657736338717ULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: row_latency ROWS READS SEED\n");
        return 2;
    }
    size_t rows = strtoul(argv[1], NULL, 10), reads = strtoul(argv[2], NULL, 10);
    uint64_t state = strtoull(argv[3], NULL, 10) | 1;
    if (rows < 2 || reads < 1) {
        fprintf(stderr, "row_latency: ROWS must be at least 2 and READS at least 1\n");
        return 2;
    }
    size_t size = rows * ROW_SIZE;
    unsigned char *map = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t *order = malloc(rows * sizeof *order);
    if (map == MAP_FAILED || order == NULL) {
        perror("row_latency");
        return 1;
    }
    unsigned char *table = (unsigned char *)(((uintptr_t)map + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    madvise(table, size, MADV_HUGEPAGE); /* before the first touch, as mplslb.state advises the rows */
    memset(table, 0, size);
    for (size_t i = 0; i < rows; i++) order[i] = i;
    for (size_t i = rows - 1; i > 0; i--) { /* a random permutation, walked as one cycle */
        size_t j = next_random(&state) % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (size_t i = 0; i < rows; i++) {
        size_t next = order[(i + 1) % rows] * ROW_SIZE;
        memcpy(table + order[i] * ROW_SIZE, &next, sizeof next);
    }
    size_t at = order[0] * ROW_SIZE;
    double start = seconds();
    for (size_t i = 0; i < reads; i++) memcpy(&at, table + at, sizeof at);
    double took = seconds() - start;
    printf("{\"rows\": %zu, \"reads\": %zu, \"ns_per_read\": %.3f, \"end\": %zu}\n", rows, reads, took / reads * 1e9,
           at);
    return 0;
}
