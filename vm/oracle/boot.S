/*
 * Oracle guest: multiboot v1 entry, descriptor tables, the switch into each paging mode,
 * page-fault catching probes (32-bit and 64-bit) and the final halt loop.
 *
 * Assembled as a 32-bit object (gcc -m32 -c); the 64-bit parts use .code64.
 * Everything runs at CPL 0 with interrupts off. Selectors: 0x08 32-bit code, 0x10 data,
 * 0x18 64-bit code. The 64-bit code addresses memory RIP-relative only: an ELF32 object has
 * no relocation for a sign-extended 32-bit absolute address.
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, give memory info; ELF layout (no bit 16) */

#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text
    .code32
    .globl _start
_start:
    cli
    cld
    /* The loader's GDT may be anywhere: load ours before touching a segment register. */
    lgdt gdt_desc
    ljmp $SEL_CODE32, $1f
1:  movw $SEL_DATA, %cx
    movw %cx, %ds
    movw %cx, %es
    movw %cx, %fs
    movw %cx, %gs
    movw %cx, %ss
    /* Clear .bss (the stack lives there) while eax/ebx still hold the multiboot magic/info. */
    movl %eax, %esi
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $stack_top, %esp
    pushl %ebx              /* multiboot info */
    pushl %esi              /* multiboot magic */
    call oracle_main
    /* oracle_main does not return; if it does, stop. */
2:  cli
    hlt
    jmp 2b

/* void enable_paging(u32 cr3, u32 cr4, u32 efer_set_bits) -- turns paging on. With
 * EFER.LME among the bits this enters IA-32e mode (compatibility submode: we keep running
 * this 32-bit code, now translated by 4- or 5-level tables). */
    .globl enable_paging
enable_paging:
    movl 8(%esp), %eax
    movl %eax, %cr4
    movl 4(%esp), %eax
    movl %eax, %cr3
    cmpl $0, 12(%esp)
    je 1f
    movl $0xC0000080, %ecx
    rdmsr
    orl 12(%esp), %eax
    wrmsr
1:  movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    jmp 2f
2:  ret

/* u32 probe32(u32 va, u64 *out): read 8 bytes at va; returns 0xffffffff, or the #PF error code. */
    .globl probe32
probe32:
    pushl %ebx
    movl 8(%esp), %eax
    movl $0xffffffff, fault_err
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl (%eax), %ecx
    movl 4(%eax), %edx
probe32_recover:
    movl 12(%esp), %ebx
    movl %ecx, (%ebx)
    movl %edx, 4(%ebx)
    movl fault_err, %eax
    popl %ebx
    ret

/* #PF handler for the 32-bit modes: record the error code, resume at probe32_recover. */
    .globl pf32
pf32:
    popl fault_err
    movl %cr2, %eax
    movl %eax, fault_cr2
    movl $probe32_recover, (%esp)
    iret

/* void run_probes64(struct probe *p, u32 n): in IA-32e mode, go to 64-bit mode, read 8 bytes
 * at each p[i].va (u64 va; u64 value; u32 err; u32 pad), come back to compatibility mode. */
    .globl run_probes64
run_probes64:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    movl 20(%esp), %esi
    movl 24(%esp), %edi
    ljmp $SEL_CODE64, $1f
    .code64
1:  movl %esi, %esi         /* upper halves are undefined after a mode switch */
    movl %edi, %edi
    movl %esp, %esp
    lidt idt64_desc(%rip)
2:  testl %edi, %edi
    jz 3f
    movq (%rsi), %rax
    movl $0xffffffff, fault_err(%rip)
    xorl %ebx, %ebx
    movq (%rax), %rbx
probe64_recover:
    movq %rbx, 8(%rsi)
    movl fault_err(%rip), %eax
    movl %eax, 16(%rsi)
    addq $24, %rsi
    decl %edi
    jmp 2b
3:  pushq $SEL_CODE32
    leaq 4f(%rip), %rax
    pushq %rax
    lretq
    .code32
4:  popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret

/* #PF handler for the long modes (always entered in 64-bit mode). */
    .code64
    .globl pf64
pf64:
    movl (%rsp), %eax
    movl %eax, fault_err(%rip)
    addq $8, %rsp
    movq %cr2, %rax
    movl %eax, fault_cr2(%rip)
    leaq probe64_recover(%rip), %rax
    movq %rax, (%rsp)
    iretq
    .code32

/* void halt_forever32(void) / halt_forever64(void): cli; hlt loop in 32-bit / 64-bit mode. */
    .globl halt_forever32
halt_forever32:
    cli
1:  hlt
    jmp 1b

    .globl halt_forever64
halt_forever64:
    cli
    ljmp $SEL_CODE64, $1f
    .code64
1:  movl %esp, %esp
    lidt idt64_desc(%rip)
2:  hlt
    jmp 2b
    .code32

/* void load_idt32(void) */
    .globl load_idt32
load_idt32:
    lidt idt32_desc
    ret

    .section .data
    .align 16
gdt:
    .quad 0x0000000000000000
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code, base 0, limit 4 GiB */
    .quad 0x00CF92000000FFFF    /* 0x10: data, base 0, limit 4 GiB */
    .quad 0x00AF9A000000FFFF    /* 0x18: 64-bit code (L=1, D=0) */
gdt_end:
    .align 4
    .word 0
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .align 4
    .word 0
    .globl idt32_desc
idt32_desc:
    .word 32 * 8 - 1
    .long idt32
    .word 0
    .globl idt64_desc
idt64_desc:
    .word 32 * 16 - 1
    .long idt64
    .long 0

    .globl fault_err, fault_cr2
fault_err:
    .long 0
fault_cr2:
    .long 0

    .section .bss
    .align 16
    .globl idt32, idt64
idt32:
    .space 32 * 8
idt64:
    .space 32 * 16
    .align 16
stack_bottom:
    .space 16384
stack_top:
