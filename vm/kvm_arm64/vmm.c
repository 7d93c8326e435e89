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
 *
 * The VMM writes a table at IPA 0x40000800 (x0 at entry points at it):
 *   u64 n, then n x {u64 ipa, u64 value}: L2 stores each value at its IPA,
 *   u64 mmio (the IPA of the "ready" doorbell), u64 counter (an IPA L2 increments forever).
 * After the stores L2 writes 1 to the doorbell (not in any memslot: KVM_EXIT_MMIO); the VMM
 * then checks each marker through its own mapping (HVA), prints ONE line
 *   KVMARM-READY pid=... ipa_bits=... slot0=IPA+SIZE@HVA:4k slot1=IPA+SIZE@HVA:thp entry=...
 *     table=... mmio=... counter=... untouched=IPA,... markers=IPA:VALUE,...
 * and re-enters KVM_RUN forever (L2 spins incrementing the counter at EL1).
 *
 * Usage: vmm PAYLOAD [--ipa-bits N] [--slot0-mib N] [--slot1-mib N] [--no-slot1]
 * Build: aarch64-linux-gnu-gcc -static -O2 -o vmm vmm.c   (vm/kvm_arm64/build.sh)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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
    (void)untouched;

    /* vCPU */
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
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

    fprintf(stderr, "KVMARM-START pid=%d max_ipa_bits=%d ipa_bits=%d target=%u payload=%zd\n",
            getpid(), max_ipa, eff_ipa, init.target, plen);
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
