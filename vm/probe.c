/*
 * probe: the ground truth for qintrospect's tests, run inside the test guest.
 *
 * Stores distinct known 64-bit values at known places of its own address space and prints,
 * one line each,
 *
 *   PROBE name=<n> gva=0x<hex> value=0x<hex> gpa=0x<hex>|none size=<page-bytes> thp=<0|1>
 *
 * where gpa is what the guest kernel's own /proc/self/pagemap says (PFN << 12 | offset; "none"
 * when the page is not present) and thp is bit 22 (KPF_THP) of /proc/kpageflags for that PFN
 * (size is then 2097152, else 4096). Then "PROBE-READY pid=<pid>", and:
 *
 *   probe spin    busy-loops forever (so the vCPU keeps this process's CR3)
 *   probe sleep   sleeps forever
 *   probe once    exits
 *
 * SIGUSR1 makes a spinning or sleeping probe print its lines again (re-reading pagemap),
 * followed by "PROBE-READY pid=<pid>".
 *
 * Built with `gcc -O2 -static` by vm/build.sh. Needs root in the guest (pagemap PFNs and
 * /proc/kpageflags need CAP_SYS_ADMIN).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAGIC 0x51494e54524f0000ULL /* "QINTRO" */
#define PAGE 4096UL
#define HUGE (2UL << 20)
#define THP_OFFSET 0x1233e8UL

struct region {
    const char *name;
    volatile uint64_t *gva;
    uint64_t value;   /* what the tests must find at gva */
    int touched;      /* 0: never read gva (that would map the zero page) */
};

static struct region regions[8];
static int nregions;
static volatile sig_atomic_t reprint;

__attribute__((noinline)) uint64_t probe_text_marker(uint64_t x)
{
    /* Some code whose first bytes are the "text" value. */
    return x * 0x9e3779b97f4a7c15ULL + 0x51494e54524f0006ULL;
}

static int pagemap_fd = -1, kpageflags_fd = -1;

static void translate(uintptr_t va, uint64_t *gpa, int *present, int *thp)
{
    uint64_t entry = 0, flags = 0;
    *present = 0;
    *thp = 0;
    *gpa = 0;
    if (pagemap_fd < 0 ||
        pread(pagemap_fd, &entry, 8, (off_t)(va / PAGE) * 8) != 8)
        return;
    if (!(entry >> 63 & 1))
        return;
    uint64_t pfn = entry & ((1ULL << 55) - 1);
    if (pfn == 0) /* not root: PFNs read as zero */
        return;
    *present = 1;
    *gpa = pfn << 12 | (va & (PAGE - 1));
    if (kpageflags_fd >= 0 &&
        pread(kpageflags_fd, &flags, 8, (off_t)pfn * 8) == 8)
        *thp = (flags >> 22) & 1;
}

static void print_all(void)
{
    for (int i = 0; i < nregions; i++) {
        struct region *r = &regions[i];
        uint64_t gpa;
        int present, thp;
        translate((uintptr_t)r->gva, &gpa, &present, &thp);
        char gpa_s[32];
        if (present)
            snprintf(gpa_s, sizeof gpa_s, "0x%llx", (unsigned long long)gpa);
        else
            strcpy(gpa_s, "none");
        printf("PROBE name=%s gva=0x%llx value=0x%llx gpa=%s size=%lu thp=%d\n",
               r->name, (unsigned long long)(uintptr_t)r->gva,
               (unsigned long long)r->value, gpa_s, thp ? HUGE : PAGE, thp);
    }
    printf("PROBE-READY pid=%d\n", (int)getpid());
    fflush(stdout);
}

static void add(const char *name, volatile uint64_t *gva, uint64_t value, int touched)
{
    regions[nregions++] = (struct region){ name, gva, value, touched };
}

static void on_usr1(int sig)
{
    (void)sig;
    reprint = 1;
}

static void *map_page(int prot)
{
    void *p = mmap(NULL, PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("probe: mmap");
        exit(1);
    }
    return p;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "once";
    setvbuf(stdout, NULL, _IONBF, 0);

    /* heap: a malloc'd page (not page-aligned: the offset matters too). */
    volatile uint64_t *heap = malloc(PAGE);
    if (!heap) {
        perror("probe: malloc");
        return 1;
    }
    *heap = MAGIC + 1;
    add("heap", heap, MAGIC + 1, 1);

    /* stack: a local of main, alive for as long as the probe runs. */
    volatile uint64_t stack_value = MAGIC + 2;
    add("stack", &stack_value, MAGIC + 2, 1);

    /* rodata: a page mapped writable, written, then made read-only. */
    char *ro = map_page(PROT_READ | PROT_WRITE);
    volatile uint64_t *rodata = (volatile uint64_t *)(ro + 0x5a8);
    *rodata = MAGIC + 3;
    if (mprotect(ro, PAGE, PROT_READ) != 0) {
        perror("probe: mprotect");
        return 1;
    }
    add("rodata", rodata, MAGIC + 3, 1);

    /* thp: a 2 MiB-aligned 4 MiB anonymous region, madvise(MADV_HUGEPAGE), touched. */
    size_t len = 2 * HUGE;
    char *raw = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("probe: mmap thp");
        return 1;
    }
    char *big = (char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
    if (madvise(big, len, MADV_HUGEPAGE) != 0)
        fprintf(stderr, "probe: madvise(MADV_HUGEPAGE): %s\n", strerror(errno));
    memset(big, 0x5a, len);
    volatile uint64_t *thp = (volatile uint64_t *)(big + THP_OFFSET);
    *thp = MAGIC + 4;
    add("thp", thp, MAGIC + 4, 1);

    /* untouched: a page mapped and never touched (not even read): no GPA, reads as 0. */
    volatile uint64_t *untouched = map_page(PROT_READ | PROT_WRITE);
    add("untouched", untouched, 0, 0);

    /* text: a function's address; its value is its first 8 bytes. */
    uint64_t code;
    memcpy(&code, (const void *)(uintptr_t)&probe_text_marker, 8);
    add("text", (volatile uint64_t *)(uintptr_t)&probe_text_marker, code, 1);

    /* Keep the touched pages where they are (with vm.compact_unevictable_allowed=0, set by
     * /init, compaction leaves mlocked pages alone). Never mlock the untouched page: that
     * would fault it in. */
    for (int i = 0; i < nregions; i++) {
        if (!regions[i].touched)
            continue;
        uintptr_t va = (uintptr_t)regions[i].gva & ~(PAGE - 1);
        size_t n = PAGE;
        if (regions[i].gva == thp) {
            va = (uintptr_t)big;
            n = len;
        }
        if (mlock((void *)va, n) != 0 && errno != EPERM)
            fprintf(stderr, "probe: mlock %s: %s\n", regions[i].name, strerror(errno));
    }

    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap_fd < 0)
        perror("probe: /proc/self/pagemap");
    kpageflags_fd = open("/proc/kpageflags", O_RDONLY);
    if (kpageflags_fd < 0)
        perror("probe: /proc/kpageflags");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    print_all();

    if (strcmp(mode, "spin") == 0) {
        for (;;) {
            if (reprint) {
                reprint = 0;
                print_all();
            }
            __asm__ volatile("pause" ::: "memory");
        }
    } else if (strcmp(mode, "sleep") == 0) {
        for (;;) {
            pause();
            if (reprint) {
                reprint = 0;
                print_all();
            }
        }
    } else if (strcmp(mode, "once") != 0) {
        fprintf(stderr, "usage: probe [spin|sleep|once]\n");
        return 2;
    }
    /* Keep the stack value alive until here. */
    return stack_value == MAGIC + 2 ? 0 : 3;
}
