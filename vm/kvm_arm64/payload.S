/*
 * payload.S: L2 of the arm64 KVM rig (vm/kvm_arm64). Raw A64 code the VMM loads at IPA
 * 0x40000000 and enters at EL1h with DAIF masked and the MMU off (stage 1 off: every address
 * below is an IPA). Position-independent; no stack, no literal pool.
 *
 * x0 = the VMM's table: u64 n; n x {u64 ipa, u64 value}; u64 mmio; u64 counter;
 *      u64 ttbr0, tcr, mair, va (vCPU 1's stage 1 and the VA of its counter).
 * x1 = the vCPU's index.
 * vCPU 0 stores each value at its IPA (8-byte aligned, as Device memory requires with the MMU
 * off), rings the doorbell (a store to `mmio`, outside every memslot: KVM_EXIT_MMIO in the
 * VMM), then increments the counter at `counter` forever, its MMU off.
 * vCPU 1 turns its MMU on with the VMM's tables (they map this code at its own address) and
 * increments the counter at `va` forever.
 */
    .text
    .globl _start
_start:
    cbnz    x1, 5f
    ldr     x1, [x0], #8            // n
1:  cbz     x1, 2f
    ldp     x2, x3, [x0], #16       // ipa, value
    str     x3, [x2]
    sub     x1, x1, #1
    b       1b
2:  ldp     x4, x5, [x0]            // mmio, counter
    dsb     sy
    mov     x6, #1
    str     x6, [x4]                // ready: exits to the VMM
    mov     x7, #0
3:  add     x7, x7, #1
    str     x7, [x5]
    b       3b

5:  ldr     x1, [x0], #8            // vCPU 1: n
    add     x0, x0, x1, lsl #4      // past the markers
    add     x0, x0, #16             // past mmio and counter
    ldp     x2, x3, [x0], #16       // ttbr0, tcr
    ldp     x4, x5, [x0]            // mair, va
    msr     mair_el1, x4
    msr     tcr_el1, x3
    msr     ttbr0_el1, x2
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    mrs     x6, sctlr_el1
    orr     x6, x6, #1              // M
    orr     x6, x6, #4              // C
    orr     x6, x6, #0x1000         // I
    msr     sctlr_el1, x6
    isb
    mov     x7, #0
6:  add     x7, x7, #1
    str     x7, [x5]
    b       6b
