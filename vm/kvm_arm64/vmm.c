/*
 * vmm.c: a tiny static KVM VMM for aarch64 (L1 of qintrospect's arm64 KVM rig, vm/kvm_arm64).
 *
 * It runs inside L1 (an aarch64 Linux at EL2 under qemu-system-aarch64 -M virt,virtualization=on)
 * and starts ONE vCPU of a VM of its own (L2) through /dev/kvm, so that L2's memory goes through
 * a real stage-2 table that L1's KVM builds (VTTBR_EL2/VTCR_EL2).
 *
 *   slot 0: IPA 0x40000000, 16 MiB (default), anonymous memory, MADV_NOHUGEPAGE (4 KiB pages)
 *   slot 1: IPA 0x8000000000 (2^39), 6 MiB (default), anonymous, 2 MiB-aligned HVA,
 *           MADV_HUGEPAGE (a THP, so KVM may map it with a 2 MiB stage-2 block)
 *   payload (raw A64 code, payload.bin) at the start of slot 0, entered at EL1h, DAIF masked,
 *   MMU off (stage 1 off: L2's addresses are IPAs).
 *   Two vCPUs, each on a thread of its own: vCPU 0 keeps its MMU off; vCPU 1 (x1 = 1 at entry)
 *   turns its MMU on with stage 1 tables the VMM wrote at IPA 0x40800000 (s1_tables below), so
 *   L2 has both: addresses that are IPAs, and virtual addresses whose tables are at IPAs.
 *
 * The VMM writes a table at IPA 0x40000800 (x0 at entry points at it):
 *   u64 n, then n x {u64 ipa, u64 value}: L2 stores each value at its IPA,
 *   u64 mmio (the IPA of the "ready" doorbell), u64 counter (an IPA L2 increments forever),
 *   then for vCPU 1: u64 TTBR0_EL1, TCR_EL1, MAIR_EL1, and the VA of its own counter.
 * After the stores L2 writes 1 to the doorbell (not in any memslot: KVM_EXIT_MMIO); the VMM
 * then checks each marker through its own mapping (HVA), prints ONE line
 *   KVMARM-READY pid=... ipa_bits=... slot0=IPA+SIZE@HVA:4k slot1=IPA+SIZE@HVA:thp entry=...
 *     table=... mmio=... counter=... untouched=IPA,... markers=IPA:VALUE,...
 *     vcpus=2 s1root=IPA s1=VA:IPA:KIND,... counter1=IPA
 * and re-enters KVM_RUN forever (L2 spins incrementing the counter at EL1; vCPU 1 its own,
 * through its VA). KIND says the stage 1 rights: user-rw, user-ro, kernel-rw, kernel-ro,
 * kernel-rwx; s2-unmapped: an IPA stage 2 never maps (L2 never touches it).
 *
 * Usage: vmm PAYLOAD [--ipa-bits N] [--slot0-mib N] [--slot1-mib N] [--no-slot1]
 * Build: aarch64-linux-gnu-gcc -static -O2 -o vmm vmm.c   (vm/kvm_arm64/build.sh)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/kvm.h>

#define SLOT0_IPA   0x40000000ULL
#define SLOT1_IPA   0x8000000000ULL   /* 2^39: the second concatenated root table at 40-bit IPA */
#define TABLE_OFF   0x800ULL           /* the marker table: slot0 + 0x800 */
#define COUNTER_OFF 0x2000ULL          /* L2's heartbeat counter: slot0 + 0x2000 */
#define MMIO_IPA    0x10000000ULL      /* the doorbell: no memslot there */
#define MAGIC       0x4b564d4100000000ULL  /* "KVMA": marker i = MAGIC | (i+1)<<28 | IPA>>12 */
#define HUGE_2M     (2ULL << 20)
#define S1_OFF      0x800000ULL        /* vCPU 1's stage 1 tables: slot0 + 8 MiB, 3 pages */
#define COUNTER1_OFF 0x4000ULL         /* vCPU 1's counter: slot0 + 0x4000, at VA 0x3000 */

/* VMSAv8-64 stage 1 descriptors, 4 KiB granule; AttrIndx 0 (MAIR attr0: Normal WB) */
#define S1_TABLE    3ULL
#define S1_BLOCK    1ULL
#define S1_PAGE     3ULL
#define S1_NORMAL   ((1ULL << 10) | (3ULL << 8))  /* AF, inner shareable */
#define S1_EL0      (1ULL << 6)                    /* AP[1]: EL0 may access */
#define S1_RO       (1ULL << 7)                    /* AP[2]: read-only */
#define S1_XN       ((1ULL << 53) | (1ULL << 54))  /* PXN, UXN */
#define S1_UXN      (1ULL << 54)
/* TCR_EL1: T0SZ 25 (39-bit VA: levels 1-3), IRGN0/ORGN0 WBWA, SH0 inner, TG0 4 KiB, EPD1
   (no TTBR1 walks), IPS 40 bits */
#define S1_TCR      (25ULL | 1ULL << 8 | 1ULL << 10 | 3ULL << 12 | 1ULL << 23 | 2ULL << 32)
#define S1_MAIR     0xffULL

static void die(const char *what)
{
    fprintf(stderr, "KVMARM-ERROR %s: %s\n", what, strerror(errno));
    fflush(stderr);
    exit(1);
}

static void set_reg(int vcpu, uint64_t id, uint64_t value)
{
    struct kvm_one_reg reg = { .id = id, .addr = (uint64_t)(uintptr_t)&value };
    if (ioctl(vcpu, KVM_SET_ONE_REG, &reg) < 0)
        die("KVM_SET_ONE_REG");
}

#define CORE_REG(name) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | \
                        KVM_REG_ARM_CORE_REG(name))

/* anonymous memory of `size` bytes aligned to `align`, every page touched (present) */
static uint8_t *guest_ram(uint64_t size, uint64_t align, int advice)
{
    uint8_t *p = mmap(NULL, size + align, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    uint8_t *a = (uint8_t *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
    if (a > p)
        munmap(p, a - p);
    munmap(a + size, (p + size + align) - (a + size));
    if (madvise(a, size, advice) < 0)
        fprintf(stderr, "KVMARM-WARN madvise(%d): %s\n", advice, strerror(errno));
    for (uint64_t o = 0; o < size; o += 4096)
        ((volatile uint8_t *)a)[o] = 0;
    return a;
}

static void add_slot(int vm, uint32_t slot, uint64_t ipa, uint64_t size, void *hva)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = 0, .guest_phys_addr = ipa, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)hva,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
}

/* vCPU 1's stage 1 (VA -> IPA): an L1 table at slot0 + S1_OFF, an L2 and an L3 table after it.
   Fills `maps` with "VA:IPA:KIND" items for the READY line; returns the L1 table's IPA. */
static uint64_t s1_tables(uint8_t *ram0, uint64_t slot0_size, int slot1, uint64_t untouched,
                          char *maps, size_t len)
{
    uint64_t *l1 = (uint64_t *)(ram0 + S1_OFF), *l2 = l1 + 512, *l3 = l2 + 512;
    uint64_t l1_ipa = SLOT0_IPA + S1_OFF;
    memset(l1, 0, 3 * 4096);
    l1[0] = (l1_ipa + 0x1000) | S1_TABLE;                           /* VA 0-1 GiB: below */
    l1[1] = SLOT0_IPA | S1_BLOCK | S1_NORMAL | S1_UXN;              /* identity, the code */
    if (slot1)
        l1[2] = SLOT1_IPA | S1_BLOCK | S1_NORMAL | S1_XN;           /* VA 2 GiB -> slot 1 */
    l2[0] = (l1_ipa + 0x2000) | S1_TABLE;
    l2[1] = (SLOT0_IPA + 0x200000) | S1_BLOCK | S1_NORMAL | S1_RO | S1_XN;   /* 2 MiB, RO */
    l3[1] = (SLOT0_IPA + 0x1000) | S1_PAGE | S1_NORMAL | S1_EL0 | S1_XN;
    l3[2] = (SLOT0_IPA + slot0_size - 0x1000) | S1_PAGE | S1_NORMAL | S1_EL0 | S1_RO | S1_XN;
    l3[3] = (SLOT0_IPA + COUNTER1_OFF) | S1_PAGE | S1_NORMAL | S1_XN;
    l3[4] = untouched | S1_PAGE | S1_NORMAL | S1_XN;
    int o = snprintf(maps, len,
                     "0x1000:%#llx:user-rw,0x2000:%#llx:user-ro,0x2005a8:%#llx:kernel-ro,"
                     "0x3000:%#llx:kernel-rw,0x4000:%#llx:s2-unmapped,%#llx:%#llx:kernel-rwx",
                     SLOT0_IPA + 0x1000, (unsigned long long)(SLOT0_IPA + slot0_size - 0x1000),
                     SLOT0_IPA + 0x2005a8, SLOT0_IPA + COUNTER1_OFF,
                     (unsigned long long)untouched, SLOT0_IPA + 0x1000, SLOT0_IPA + 0x1000);
    if (slot1)
        snprintf(maps + o, len - o, ",0x80101000:%#llx:kernel-rw", SLOT1_IPA + 0x101000);
    return l1_ipa;
}

struct vcpu_thread {
    int fd;
    struct kvm_run *run;
    int index;
};

/* vCPU 1's KVM_RUN loop (it makes no exits of its own: MMIO there is only logged) */
static void *run_vcpu1(void *arg)
{
    struct vcpu_thread *t = arg;
    for (;;) {
        if (ioctl(t->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN (vCPU 1)");
        }
        if (t->run->exit_reason == KVM_EXIT_MMIO) {
            fprintf(stderr, "KVMARM-MMIO vcpu1 %s %#llx\n",
                    t->run->mmio.is_write ? "write" : "read",
                    (unsigned long long)t->run->mmio.phys_addr);
            if (!t->run->mmio.is_write)
                memset(t->run->mmio.data, 0, sizeof t->run->mmio.data);
        } else if (t->run->exit_reason != KVM_EXIT_INTR) {
            fprintf(stderr, "KVMARM-EXIT vcpu1 reason %u\n", t->run->exit_reason);
            exit(1);
        }
    }
    return NULL;
}

static int make_vcpu(int kvm, int vm, int index, struct kvm_run **run)
{
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, index);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (*run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_vcpu_init init;
    memset(&init, 0, sizeof init);
    if (ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init) < 0)
        die("KVM_ARM_PREFERRED_TARGET");
    if (ioctl(vcpu, KVM_ARM_VCPU_INIT, &init) < 0)
        die("KVM_ARM_VCPU_INIT");
    set_reg(vcpu, CORE_REG(regs.pc), SLOT0_IPA);
    set_reg(vcpu, CORE_REG(regs.pstate), 0x3c5);     /* EL1h, D A I F masked */
    set_reg(vcpu, CORE_REG(regs.regs[0]), SLOT0_IPA + TABLE_OFF);
    set_reg(vcpu, CORE_REG(regs.regs[1]), index);    /* the payload's path */
    return vcpu;
}

int main(int argc, char **argv)
{
    const char *payload = NULL;
    int ipa_bits = 0, slot1 = 1;
    uint64_t slot0_size = 16ULL << 20, slot1_size = 6ULL << 20;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ipa-bits") && i + 1 < argc)
            ipa_bits = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--slot0-mib") && i + 1 < argc)
            slot0_size = strtoull(argv[++i], NULL, 0) << 20;
        else if (!strcmp(argv[i], "--slot1-mib") && i + 1 < argc)
            slot1_size = strtoull(argv[++i], NULL, 0) << 20;
        else if (!strcmp(argv[i], "--no-slot1"))
            slot1 = 0;
        else if (argv[i][0] != '-' && !payload)
            payload = argv[i];
        else {
            fprintf(stderr, "usage: %s PAYLOAD [--ipa-bits N] [--slot0-mib N] "
                            "[--slot1-mib N] [--no-slot1]\n", argv[0]);
            return 2;
        }
    }
    if (!payload || slot0_size < (4ULL << 20) || (slot1 && slot1_size < 3 * HUGE_2M)) {
        fprintf(stderr, "usage: %s PAYLOAD (slot0 >= 4 MiB, slot1 >= 6 MiB)\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("KVM_GET_API_VERSION");
    int max_ipa = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_VM_IPA_SIZE);
    int vm = ioctl(kvm, KVM_CREATE_VM, (unsigned long)KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits));
    if (vm < 0)
        die("KVM_CREATE_VM");
    int eff_ipa = ipa_bits ? ipa_bits : 40;   /* type 0: KVM's default 40-bit IPA space */

    /* memory */
    uint8_t *ram0 = guest_ram(slot0_size, HUGE_2M, MADV_NOHUGEPAGE);
    add_slot(vm, 0, SLOT0_IPA, slot0_size, ram0);
    uint8_t *ram1 = NULL;
    if (slot1) {
        if (SLOT1_IPA + slot1_size > (1ULL << eff_ipa)) {
            fprintf(stderr, "KVMARM-ERROR slot1 at %#llx is beyond the %d-bit IPA space\n",
                    SLOT1_IPA, eff_ipa);
            return 1;
        }
        ram1 = guest_ram(slot1_size, HUGE_2M, MADV_HUGEPAGE);
        add_slot(vm, 1, SLOT1_IPA, slot1_size, ram1);
    }

    /* payload */
    int pf = open(payload, O_RDONLY | O_CLOEXEC);
    if (pf < 0)
        die("open payload");
    ssize_t plen = read(pf, ram0, TABLE_OFF);
    if (plen <= 0)
        die("read payload");
    close(pf);

    /* markers: a distinct value at the start of several pages, in both slots, and an IPA
       (not page-aligned) inside a page; untouched pages are left for the negative case */
    uint64_t ipas[16];
    int n = 0;
    ipas[n++] = SLOT0_IPA + 0x1000;
    ipas[n++] = SLOT0_IPA + 0x3000;
    ipas[n++] = SLOT0_IPA + 0x123000;
    ipas[n++] = SLOT0_IPA + 0x200000 + 0x5a8;
    ipas[n++] = SLOT0_IPA + slot0_size - 0x1000;
    if (slot1) {
        ipas[n++] = SLOT1_IPA;
        ipas[n++] = SLOT1_IPA + 0x101000;
        ipas[n++] = SLOT1_IPA + 0x3ff010;        /* the end of its second 2 MiB region */
    }
    uint64_t *table = (uint64_t *)(ram0 + TABLE_OFF);
    uint64_t values[16];
    table[0] = n;
    for (int i = 0; i < n; i++) {
        values[i] = MAGIC | (uint64_t)(i + 1) << 28 | (ipas[i] >> 12 & 0x0fffffff);
        table[1 + 2 * i] = ipas[i];
        table[2 + 2 * i] = values[i];
    }
    table[1 + 2 * n] = MMIO_IPA;
    table[2 + 2 * n] = SLOT0_IPA + COUNTER_OFF;
    /* IPAs L2 never touches, in 2 MiB regions it never touches (slot 1's first two 2 MiB
       regions may be single stage-2 blocks): no stage-2 mapping, though present in L1 */
    uint64_t untouched[2] = { SLOT0_IPA + 0x400000, slot1 ? SLOT1_IPA + slot1_size - 0x1000 : 0 };
    char s1_maps[512];
    uint64_t s1_root = s1_tables(ram0, slot0_size, slot1, untouched[0], s1_maps,
                                 sizeof s1_maps);
    table[3 + 2 * n] = s1_root;                 /* vCPU 1: TTBR0_EL1 (ASID 0) */
    table[4 + 2 * n] = S1_TCR;
    table[5 + 2 * n] = S1_MAIR;
    table[6 + 2 * n] = 0x3000;                  /* its counter's VA */

    /* vCPUs: 0 on this thread (MMU off), 1 on a thread of its own (MMU on) */
    struct kvm_run *run;
    int vcpu = make_vcpu(kvm, vm, 0, &run);
    static struct vcpu_thread second;
    second.index = 1;
    second.fd = make_vcpu(kvm, vm, 1, &second.run);
    pthread_t thread;
    if (pthread_create(&thread, NULL, run_vcpu1, &second) != 0)
        die("pthread_create");

    fprintf(stderr, "KVMARM-START pid=%d max_ipa_bits=%d ipa_bits=%d vcpus=2 payload=%zd\n",
            getpid(), max_ipa, eff_ipa, plen);
    fflush(stderr);

    int ready = 0;
    unsigned long exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_MMIO:
            if (run->mmio.phys_addr == MMIO_IPA && run->mmio.is_write && !ready) {
                ready = 1;
                char buf[4096];
                int o = snprintf(buf, sizeof buf,
                    "KVMARM-READY pid=%d ipa_bits=%d slot0=%#llx+%#llx@%#llx:4k",
                    getpid(), eff_ipa, SLOT0_IPA, (unsigned long long)slot0_size,
                    (unsigned long long)(uintptr_t)ram0);
                if (slot1)
                    o += snprintf(buf + o, sizeof buf - o, " slot1=%#llx+%#llx@%#llx:thp",
                                  SLOT1_IPA, (unsigned long long)slot1_size,
                                  (unsigned long long)(uintptr_t)ram1);
                o += snprintf(buf + o, sizeof buf - o,
                              " entry=%#llx table=%#llx mmio=%#llx counter=%#llx untouched=%#llx",
                              SLOT0_IPA, SLOT0_IPA + TABLE_OFF, MMIO_IPA,
                              SLOT0_IPA + COUNTER_OFF, (unsigned long long)untouched[0]);
                if (slot1)
                    o += snprintf(buf + o, sizeof buf - o, ",%#llx",
                                  (unsigned long long)untouched[1]);
                o += snprintf(buf + o, sizeof buf - o, " markers=");
                int bad = 0;
                for (int i = 0; i < n; i++) {
                    uint64_t ipa = ipas[i];
                    uint8_t *hva = ipa >= SLOT1_IPA ? ram1 + (ipa - SLOT1_IPA)
                                                    : ram0 + (ipa - SLOT0_IPA);
                    if (*(volatile uint64_t *)hva != values[i])
                        bad++;
                    o += snprintf(buf + o, sizeof buf - o, "%s%#llx:%#llx", i ? "," : "",
                                  (unsigned long long)ipa, (unsigned long long)values[i]);
                }
                o += snprintf(buf + o, sizeof buf - o, " vcpus=2 s1root=%#llx s1=%s counter1=%#llx",
                              (unsigned long long)s1_root, s1_maps,
                              SLOT0_IPA + COUNTER1_OFF);
                if (bad)
                    o += snprintf(buf + o, sizeof buf - o, " bad=%d", bad);
                printf("%s\n", buf);
                fflush(stdout);
            } else {
                fprintf(stderr, "KVMARM-MMIO %s %#llx len=%u\n",
                        run->mmio.is_write ? "write" : "read",
                        (unsigned long long)run->mmio.phys_addr, run->mmio.len);
                if (!run->mmio.is_write)
                    memset(run->mmio.data, 0, sizeof run->mmio.data);
            }
            break;
        case KVM_EXIT_INTR:
            break;
        case KVM_EXIT_SYSTEM_EVENT:
            fprintf(stderr, "KVMARM-EXIT system event %u\n", run->system_event.type);
            return 1;
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "KVMARM-EXIT fail entry %#llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            return 1;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "KVMARM-EXIT internal error %u\n", run->internal.suberror);
            return 1;
        default:
            fprintf(stderr, "KVMARM-EXIT reason %u after %lu exits\n", run->exit_reason, exits);
            return 1;
        }
    }
}
