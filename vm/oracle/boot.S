/*
 * Oracle guest: multiboot v1 entry, descriptor tables, the switch into each paging mode,
 * page-fault catching probes (32-bit and 64-bit) and the final halt loop.
 *
 * Assembled as a 32-bit object (gcc -m32 -c); the 64-bit parts use .code64.
 * Everything runs at CPL 0 with interrupts off, except the ring-3 excursions of the access
 * checks (access32/access64). Selectors: 0x08 32-bit code, 0x10 data, 0x18 64-bit code,
 * 0x20/0x28/0x30 the same at DPL 3, 0x38 a 32-bit TSS, 0x40 a 64-bit TSS (16 bytes; both
 * descriptors are filled in by oracle.c). The 64-bit code addresses memory RIP-relative
 * only: an ELF32 object has no relocation for a sign-extended 32-bit absolute address.
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, give memory info; ELF layout (no bit 16) */

#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18
#define SEL_UCODE32 0x23    /* 0x20 | RPL 3 */
#define SEL_UDATA  0x2b     /* 0x28 | RPL 3 */
#define SEL_UCODE64 0x33    /* 0x30 | RPL 3 */

/* Access kinds (oracle.c ACC_*): bits 1:0 = 0 read, 1 write, 2 execute; bit 2 = user mode. */
#define ACC_USER 4
/* The ring-3 stubs live in the user-code page, 16 bytes apart, one per operation. */
#define STUB_STRIDE_SHIFT 4

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


/* ---------------------------------------------------------------------------------------
 * Access checks: one access of one kind at one address, with whatever CR0/CR4/EFER/PKRU the
 * caller set. A #PF records its error code and CR2; every path ends by restoring the stack
 * saved on entry (a longjmp), so a fault in ring 3 or in a jumped-to page comes back here.
 * Supervisor accesses run right here at CPL 0 with EFLAGS.AC=0; user accesses iret to a stub
 * in the user-code page (ring 3, EFLAGS=0x2: AC=0, IF=0), which does the access and returns
 * with `int $0x80` (gate DPL 3). Execute accesses jump to the target, where oracle.c put
 * `int $0x80` (cd 80) before paging. Any other exception is recorded as 0xee000000 | vector.
 * --------------------------------------------------------------------------------------- */

/* u32 access32(u32 addr, u32 kind): returns 0xffffffff (done) or the #PF error code. */
    .globl access32
access32:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    movl 20(%esp), %eax
    movl 24(%esp), %ecx
    movl %esp, acc_saved_sp
    movl $0xffffffff, fault_err
    testl $ACC_USER, %ecx
    jnz 3f
    cmpl $1, %ecx
    je 1f
    cmpl $2, %ecx
    je 2f
    movl (%eax), %edx               /* supervisor read */
    jmp access32_done
1:  movb $0xa5, (%eax)              /* supervisor write */
    jmp access32_done
2:  jmp *%eax                       /* supervisor execute: int $0x80 at the target */
3:  andl $3, %ecx                   /* user: iret to the stub for this operation */
    shll $STUB_STRIDE_SHIFT, %ecx
    addl user_stub_va, %ecx
    movw $SEL_UDATA, %dx
    movw %dx, %ds
    movw %dx, %es
    pushl $SEL_UDATA                /* ss */
    pushl $0                        /* esp: the stubs use no stack */
    pushl $0x2                      /* eflags: AC=0, IF=0, IOPL=0 */
    pushl $SEL_UCODE32              /* cs */
    pushl %ecx                      /* eip */
    iret
    .globl access32_done
access32_done:
    movw $SEL_DATA, %dx
    movw %dx, %ds
    movw %dx, %es
    movw %dx, %ss
    movl acc_saved_sp, %esp
    movl fault_err, %eax
    popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret

/* 32-bit handlers for the access checks */
    .globl pfacc32
pfacc32:
    movl (%esp), %eax
    movl %eax, fault_err
    movl %cr2, %eax
    movl %eax, acc_cr2
    movl $0, acc_cr2 + 4
    jmp access32_done
    .globl back32
back32:                             /* int $0x80: the access completed */
    jmp access32_done
exc32_common:                       /* %eax = 0xee000000 | vector */
    movl %eax, fault_err
    jmp access32_done

    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exc32_\n:
    movl $(0xee000000 | \n), %eax
    jmp exc32_common
    .endr

/* u32 access64(struct acc64 *a): a->addr (u64), a->kind (u32); in IA-32e mode, does the
 * access in 64-bit mode (user: a 64-bit ring-3 code segment) and comes back to
 * compatibility mode. Returns 0xffffffff (done) or the #PF error code. */
    .globl access64
access64:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    movl 20(%esp), %esi
    ljmp $SEL_CODE64, $1f
    .code64
1:  movl %esi, %esi
    movl %esp, %esp
    lidt idt64_desc(%rip)
    movq %rsp, acc_saved_sp64(%rip)
    movl $0xffffffff, fault_err(%rip)
    movq (%rsi), %rax
    movl 8(%rsi), %ecx
    testl $ACC_USER, %ecx
    jnz 4f
    cmpl $1, %ecx
    je 2f
    cmpl $2, %ecx
    je 3f
    movl (%rax), %edx               /* supervisor read */
    jmp access64_done
2:  movb $0xa5, (%rax)              /* supervisor write */
    jmp access64_done
3:  jmp *%rax                       /* supervisor execute: int $0x80 at the target */
4:  andl $3, %ecx
    shll $STUB_STRIDE_SHIFT, %ecx
    movl user_stub_va(%rip), %edx
    addq %rdx, %rcx
    pushq $SEL_UDATA                /* ss */
    pushq $0                        /* rsp: the stubs use no stack */
    pushq $0x2                      /* rflags: AC=0, IF=0, IOPL=0 */
    pushq $SEL_UCODE64              /* cs */
    pushq %rcx                      /* rip */
    iretq
access64_done:
    movq acc_saved_sp64(%rip), %rsp
    movw $SEL_DATA, %dx             /* an interrupt from ring 3 left SS null */
    movw %dx, %ss
    movw %dx, %ds
    movw %dx, %es
    pushq $SEL_CODE32
    leaq 5f(%rip), %rax
    pushq %rax
    lretq
    .code32
5:  movl fault_err, %eax
    popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret

/* 64-bit handlers for the access checks (interrupts in IA-32e mode run in 64-bit mode) */
    .code64
    .globl pfacc64
pfacc64:
    movl (%rsp), %eax
    movl %eax, fault_err(%rip)
    movq %cr2, %rax
    movq %rax, acc_cr2(%rip)
    jmp access64_done
    .globl back64
back64:
    jmp access64_done
exc64_common:
    movl %eax, fault_err(%rip)
    jmp access64_done

    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exc64_\n:
    movl $(0xee000000 | \n), %eax
    jmp exc64_common
    .endr
    .code32

/* Entry points of the exception stubs, by vector, for oracle.c to put in the IDTs. */
    .section .rodata
    .align 4
    .globl exc32_table, exc64_table
exc32_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long exc32_\n
    .endr
exc64_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long exc64_\n
    .endr
    .section .text
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
    .quad 0x00CFFA000000FFFF    /* 0x20: 32-bit code, DPL 3 */
    .quad 0x00CFF2000000FFFF    /* 0x28: data, DPL 3 */
    .quad 0x00AFFA000000FFFF    /* 0x30: 64-bit code, DPL 3 */
    .globl gdt_tss32, gdt_tss64
gdt_tss32:
    .quad 0                     /* 0x38: 32-bit TSS (filled in by oracle.c) */
gdt_tss64:
    .quad 0, 0                  /* 0x40: 64-bit TSS, 16 bytes (filled in by oracle.c) */
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
    .word 256 * 8 - 1
    .long idt32
    .word 0
    .globl idt64_desc
idt64_desc:
    .word 256 * 16 - 1
    .long idt64
    .long 0

/* Everything the guest writes after its probes lives in .bss below, laid out so that no page
 * of the image starts with a byte that changes after the probes (a PROBE line of an identity
 * page must stay true): the variables sit behind a constant first quad, the IDT and TSS are
 * set up before the probes (only vector 14 changes later, far from a page start), and the
 * stacks end on a page boundary, so only a stack 4 KiB deep would touch a page's first bytes. */
    .section .bss
    .align 4096
    .quad 0, 0                  /* constant: this page's first bytes */
    .globl fault_err, fault_cr2
fault_err:
    .long 0
fault_cr2:
    .long 0
    .globl acc_cr2, user_stub_va
    .align 8
acc_cr2:
    .quad 0
acc_saved_sp64:
    .quad 0
acc_saved_sp:
    .long 0
user_stub_va:                   /* linear address of the user-code page (set by oracle.c) */
    .long 0
    .align 16
    .globl idt32, idt64, tss, stack0_top
idt32:
    .space 256 * 8
idt64:
    .space 256 * 16
    .align 16
tss:                            /* one TSS: ESP0/SS0 (32-bit) or RSP0 (64-bit) only */
    .space 104
    .align 4096
stack0_bottom:                  /* ring-0 stack for interrupts from ring 3 (one page) */
    .space 4096
stack0_top:
stack_bottom:
    .space 16384
stack_top:
