/*
 * Oracle guest: builds page tables with a known list of mappings in one x86 paging mode,
 * turns paging on, reads every listed address through the real (emulated) MMU, prints the list
 * on COM1 and halts. The list printed and the tables built come from the same table, SPECS.
 *
 * Mode from the multiboot command line: mode=32bit|pse|pae|4level|5level; access=on adds
 * the access checks (ACCESS lines; off by default, so a plain boot prints what it always did).
 *
 * Output (one line each, COM1 0x3f8):
 *   ORACLE INFO mode=.. maxphyaddr=N ram_end=0x.. image=0x..-0x..
 *   ORACLE CPUID nx=0|1 page1gb=0|1 la57=0|1 smep=0|1 smap=0|1 pku=0|1
 *   ORACLE FILL pa=0x.. value=0x..                      (8 bytes written at pa before paging)
 *   ORACLE MAP va=0x.. pa=0x..|none size=0x.. w=0|1 u=0|1 x=0|1 fault=none|not-present|reserved-bit name=..
 *   ORACLE PROBE va=0x.. result=ok value=0x.. | result=fault err=0x..
 *   ORACLE ACCESS-RUN off | wp=0,1 smep=.. smap=.. nxe=.. pke=.. pkru=0x.. eflags.ac=0
 *                         read=+0x0 write=+0x808 execute=+0x800 pages=N count=N
 *   ORACLE ACCESS va=0x.. kind=<who>-<op> wp=0|1 smep=0|1 smap=0|1 nxe=0|1 pke=0|1 [pkru=0x..]
 *                 result=ok | result=fault err=0x.. name=..
 *   ORACLE READY mode=<mode> cr3=0x.. cr4=0x.. efer=0x.. cr0=0x..
 *   ORACLE ERROR <text>                                 (then halts without READY)
 *
 * MAP lines: one per page. For a fault line, size is the span the faulting entry covers and
 * w/u/x are 0. w/u/x are the effective rights (all levels combined) of a present mapping.
 *
 * Freestanding, 32-bit (gcc -m32); no 64-bit division anywhere (no libgcc).
 */

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

/* ---- the assembly side (boot.S) ---- */
void enable_paging(u32 cr3, u32 cr4, u32 efer_set);
u32 probe32(u32 va, u64 *out);
struct probe { u64 va; u64 value; u32 err; u32 pad; };
void run_probes64(struct probe *p, u32 n);
void pf32(void);
void pf64(void);
void load_idt32(void);
void halt_forever32(void) __attribute__((noreturn));
void halt_forever64(void) __attribute__((noreturn));
extern u8 idt32[], idt64[];
extern char __image_start[], __image_end[];
/* the access checks */
u32 access32(u32 addr, u32 kind);
struct acc64 { u64 addr; u32 kind; u32 pad; };
u32 access64(struct acc64 *a);
void pfacc32(void), back32(void), pfacc64(void), back64(void);
extern void (*const exc32_table[32])(void), (*const exc64_table[32])(void);
extern u64 acc_cr2;
extern u32 user_stub_va;
extern u8 gdt_tss32[], gdt_tss64[], tss[], stack0_top[];

/* ---- modes ---- */
enum { M_32 = 1, M_PSE = 2, M_PAE = 4, M_4L = 8, M_5L = 16 };
#define M_ALL  (M_32 | M_PSE | M_PAE | M_4L | M_5L)
#define M_LEG  (M_32 | M_PSE)          /* 32-bit paging: 4-byte entries, no NX */
#define M_LO32 (M_32 | M_PSE | M_PAE)  /* 32-bit linear addresses */
#define M_NX   (M_PAE | M_4L | M_5L)
#define M_LONG (M_4L | M_5L)

static const struct { const char *name; u32 bit; } MODES[] = {
    {"32bit", M_32}, {"pse", M_PSE}, {"pae", M_PAE}, {"4level", M_4L}, {"5level", M_5L},
};

/* ---- entry bits ---- */
#define P    (1ull << 0)
#define W    (1ull << 1)
#define U    (1ull << 2)
#define PS   (1ull << 7)   /* PAT in a 4 KiB PTE */
#define G    (1ull << 8)
#define NX   (1ull << 63)

#define CR4_PSE  (1u << 4)
#define CR4_PAE  (1u << 5)
#define CR4_PGE  (1u << 7)
#define CR4_LA57 (1u << 12)
#define CR4_SMEP (1u << 20)
#define CR4_SMAP (1u << 21)
#define CR4_PKE  (1u << 22)
#define CR0_WP   (1u << 16)
#define EFER_LME (1u << 8)
#define EFER_NXE (1u << 11)

/* ---- physical layout ---- */
#define PT_POOL     0x200000u   /* page tables: 0x200000-0x2fffff */
#define PT_POOL_END 0x300000u
#define F_4K        0x300000u
#define F_RO        0x301000u
#define F_USER      0x302000u
#define F_NX        0x303000u
#define F_ALIAS     0x304000u
#define F_PAT       0x305000u
#define F_NP        0x306000u   /* named by a PTE with P=0 */
#define F_RSVD      0x307000u   /* named by a PTE with a reserved bit */
#define F_RESTRICT  0x308000u
#define F_NPTOP     0x309000u   /* mapped below a top-level entry with P=0 */
#define F_UPPER     0x30a000u
#define F_LAST      0x30b000u
#define F_RSVD2     0x30c000u   /* mapped below a PML4E with PS=1 */
#define F_RSVD3     0x30d000u   /* mapped below a PML5E with PS=1 */
#define F_LA57      0x30e000u
#define F_USER_RO   0x30f000u
#define F_UCODE     0x310000u   /* the ring-3 stubs of the access checks */
#define L_LARGE     0x400000u   /* 4 MiB (pse) or 2 MiB (pae, long) page */
#define L_RSVD2M    0x600000u
#define L_RSVD4M    0x800000u
#define L_1G        0x40000000u
#define L_RSVD1G    0x80000000u

/* ---- the list ---- */
enum { F_NONE, F_NOTPRESENT, F_RESERVED };
enum { PA_PSE36 = 1 };      /* special pa values resolved at run time */

struct spec {
    const char *name;
    u32 modes;
    u64 va;
    u64 pa;          /* frame the leaf entry names (also for fault entries; not printed there) */
    u64 size;        /* page size of the leaf: 0x1000, 0x200000, 0x400000, 0x40000000 */
    u8 w, u, x, g;   /* leaf entry bits (x=0 sets NX where the mode has it) */
    u8 fault;        /* F_NONE, F_NOTPRESENT, F_RESERVED */
    u8 fault_level;  /* level of the entry that faults: 1 PT, 2 PD, 3 PDPT, 4 PML4, 5 PML5 */
    u8 absent;       /* not-present: leave the entry zero instead of clearing P on a real one */
    u8 rsvd_bit;     /* reserved-bit: bit to set in the faulting entry; 0xff = MAXPHYADDR,
                        0xfe = the 4 MiB PDE bit that holds physical bit MAXPHYADDR */
    u8 restrict_parent; /* the leaf's parent entry gets W=0, U=0, NX=1 */
    u8 pat;          /* set bit 7 (PAT) in a 4 KiB PTE */
    u8 identity;     /* va=pa=every page of the image */
    u8 m_below_40;   /* only when MAXPHYADDR < 40 (e.g. -cpu ...,phys-bits=36) */
    u8 acc;          /* in the access checks (ACCESS lines) */
    u8 pk;           /* protection key in leaf bits 62:59 (4-/5-level only) */
    u8 needs_1g;     /* a 1 GiB page: reserved-bit (PS=1 in a PDPTE) without CPUID.Page1GB */
};

#define K4 0x1000ull
#define M2 0x200000ull
#define M4 0x400000ull
#define G1 0x40000000ull

static const struct spec SPECS[] = {
    /* name            modes   va                      pa        size w u x g */
    {"identity",      M_ALL,  0, 0, K4, 1, 0, 1, 0, .identity = 1},
    {"4k",            M_ALL,  0x10000000, F_4K,        K4, 1, 0, 1, 0, .acc = 1, .pk = 1},
    {"read-only",     M_ALL,  0x10001000, F_RO,        K4, 0, 0, 1, 0, .acc = 1},
    {"user",          M_ALL,  0x10002000, F_USER,      K4, 1, 1, 1, 0, .acc = 1, .pk = 1},
    {"nx",            M_NX,   0x10003000, F_NX,        K4, 1, 0, 0, 0, .acc = 1},
    {"alias-a",       M_ALL,  0x10004000, F_ALIAS,     K4, 1, 0, 1, 0},
    {"pat-4k",        M_ALL,  0x10005000, F_PAT,       K4, 1, 0, 1, 0, .pat = 1},
    {"np-pte",        M_ALL,  0x10006000, F_NP,        K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 1},
    {"rsvd-pte",      M_NX,   0x10007000, F_RSVD,      K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 1, .rsvd_bit = 0xff},
    {"user-ro",       M_ALL,  0x10008000, F_USER_RO,   K4, 0, 1, 1, 0, .acc = 1, .pk = 3},
    {"user-code",     M_ALL,  0x10009000, F_UCODE,     K4, 0, 1, 1, 0},
    {"restrict-parent", M_ALL, 0x10400000, F_RESTRICT, K4, 1, 1, 1, 0, .restrict_parent = 1,
        .acc = 1},
    {"np-pde",        M_ALL,  0x10800000, 0,           K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 2, .absent = 1},
    /* top-level entry with P=0 that still points at a real table holding a mapping */
    {"np-top",        M_LEG,  0x20000000, F_NPTOP,     K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 2},
    {"np-top",        M_PAE,  0x80000000, F_NPTOP,     K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 3},
    {"np-top",        M_4L,   0x18000000000ull, F_NPTOP, K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 4},
    {"np-top",        M_5L,   0x0001000000000000ull, F_NPTOP, K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 5},
    /* large pages */
    {"large-4m",      M_PSE,  0x40000000, L_LARGE,     M4, 1, 0, 1, 0, .acc = 1},
    {"pse36-4m",      M_PSE,  0x40400000, PA_PSE36,    M4, 1, 0, 1, 0},
    {"rsvd-4m-bit21", M_PSE,  0x40800000, L_RSVD4M,    M4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 21},
    /* PSE-36 bit for physical bit MAXPHYADDR (PDE bit 13 + MAXPHYADDR - 32): reserved */
    {"rsvd-4m-above-maxphyaddr", M_PSE, 0x40c00000, L_LARGE, M4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 0xfe, .m_below_40 = 1},
    {"large-2m",      M_NX,   0x40000000, L_LARGE,     M2, 1, 0, 1, 1, .acc = 1},
    {"rsvd-2m-bit13", M_NX,   0x40200000, L_RSVD2M,    M2, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 13},
    {"huge-1g",       M_LONG, 0x8000000000ull, L_1G,   G1, 1, 1, 0, 0, .acc = 1, .pk = 2,
        .needs_1g = 1},
    {"rsvd-1g-bit13", M_LONG, 0x8040000000ull, L_RSVD1G, G1, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 3, .rsvd_bit = 13},
    {"rsvd-pml4-ps",  M_LONG, 0x10000000000ull, F_RSVD2, K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 4, .rsvd_bit = 7},
    {"rsvd-pml5-ps",  M_5L,   0x0002000000000000ull, F_RSVD3, K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 5, .rsvd_bit = 7},
    {"la57-only",     M_5L,   0x0000800000000000ull, F_LA57, K4, 1, 0, 1, 0},
    /* upper half */
    {"upper",         M_LO32, 0xc0000000, F_UPPER,     K4, 1, 0, 1, 1},
    {"alias-b",       M_LO32, 0xc0001000, F_ALIAS,     K4, 0, 1, 0, 0, .acc = 1},
    {"last-page",     M_LO32, 0xfffff000, F_LAST,      K4, 1, 0, 0, 1},
    {"upper",         M_4L,   0xffff800000000000ull, F_UPPER, K4, 1, 0, 1, 1},
    {"alias-b",       M_4L,   0xffff800000001000ull, F_ALIAS, K4, 0, 1, 0, 0, .acc = 1},
    {"upper",         M_5L,   0xff00000000000000ull, F_UPPER, K4, 1, 0, 1, 1},
    {"alias-b",       M_5L,   0xff00000000001000ull, F_ALIAS, K4, 0, 1, 0, 0, .acc = 1},
    {"last-page",     M_LONG, 0xfffffffffffff000ull, F_LAST, K4, 1, 0, 0, 1},
};
#define NSPECS (sizeof(SPECS) / sizeof(SPECS[0]))

/* ---- small helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc_(char c)
{
    int i;
    for (i = 0; i < 100000 && !(inb(0x3f8 + 5) & 0x20); i++)
        ;
    outb(0x3f8, (u8)c);
}
static void puts_(const char *s) { while (*s) { if (*s == '\n') putc_('\r'); putc_(*s++); } }
static void puthex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 0xf]; v >>= 4; } while (v);
    puts_("0x");
    puts_(&buf[i]);
}
static void putdec(u32 v)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts_(&buf[i]);
}

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static u32 read_cr0(void) { u32 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static u32 read_cr3(void) { u32 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static u32 read_cr4(void) { u32 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static void write_cr0(u32 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }
static void write_cr4(u32 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }
static void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/* wrpkru (needs CR4.PKE=1): PKRU = eax, with ecx = edx = 0 */
static void wrpkru(u32 v) { __asm__ volatile(".byte 0x0f, 0x01, 0xef" : : "a"(v), "c"(0), "d"(0)); }

static void memzero(void *p, u32 n) { u8 *b = p; while (n--) *b++ = 0; }

static void fail(const char *msg)
{
    puts_("ORACLE ERROR ");
    puts_(msg);
    puts_("\n");
    halt_forever32();
}

/* ---- state ---- */
static u32 mode;            /* one M_* bit */
static const char *mode_name;
static u32 maxphyaddr;
static u64 ram_end;
static int access_on;       /* access=on on the command line */
static int has_nx, has_1g, has_la57, has_smep, has_smap, has_pku;
static u32 root;            /* CR3 base */
static u32 pool_next = PT_POOL;
static int top_level, esize;

static u32 shift_of(int level)
{
    if (mode & M_LEG)
        return level == 1 ? 12 : 22;
    return 12 + 9 * (level - 1);
}
static u32 index_of(u64 va, int level)
{
    u32 bits = (mode & M_LEG) ? 10 : (mode == M_PAE && level == 3) ? 2 : 9;
    return (u32)(va >> shift_of(level)) & ((1u << bits) - 1);
}
static u64 span_of(int level) { return 1ull << shift_of(level); }

static u64 rd_entry(u32 addr) { return esize == 4 ? *(volatile u32 *)addr : *(volatile u64 *)addr; }
static void wr_entry(u32 addr, u64 v)
{
    if (esize == 4)
        *(volatile u32 *)addr = (u32)v;
    else
        *(volatile u64 *)addr = v;
}
static u32 table_of(u64 e)
{
    return (u32)(e & (esize == 4 ? 0xfffff000ull : 0x000ffffffffff000ull));
}

static u32 alloc_table(void)
{
    u32 t = pool_next;
    if (t >= PT_POOL_END)
        fail("page-table pool exhausted");
    pool_next += 0x1000;
    memzero((void *)t, 0x1000);
    return t;
}

/* Physical address of the entry at `level` for va; creates missing tables above it. */
static u32 entry_addr(u64 va, int level)
{
    u32 table = root;
    int l;
    for (l = top_level; l > level; l--) {
        u32 ea = table + index_of(va, l) * esize;
        u64 e = rd_entry(ea);
        if (e == 0) {
            u32 t = alloc_table();
            /* PAE PDPTEs have no R/W or U/S bit (they are reserved there). */
            e = t | P | ((mode == M_PAE && l == 3) ? 0 : (W | U));
            wr_entry(ea, e);
        }
        if (e & PS)
            fail("layout error: a table walk crosses a large page");
        table = table_of(e);
    }
    return table + index_of(va, level) * esize;
}

static int level_for_size(u64 size)
{
    if (size == K4) return 1;
    if (size == M2 || size == M4) return 2;
    return 3;
}

static u64 spec_pa(const struct spec *s)
{
    if (s->pa == PA_PSE36)
        return maxphyaddr >= 40 ? 0x8180400000ull : 0x180400000ull;
    return s->pa;
}

static u64 leaf_entry(const struct spec *s, u64 pa)
{
    u64 e = P;
    int level = level_for_size(s->size);
    if (s->w) e |= W;
    if (s->u) e |= U;
    if (s->g) e |= G;
    if (level > 1 || s->pat) e |= PS;
    if (!s->x && (mode & M_NX)) e |= NX;
    if (mode & M_LONG) e |= (u64)s->pk << 59;   /* ignored while CR4.PKE=0 */
    if (esize == 4 && level == 2)
        /* 4 MiB PDE: PA bits 31:22 in place, PA bits 39:32 in PDE bits 20:13 (PSE-36) */
        e |= (pa & 0xffc00000ull) | (((pa >> 32) & 0xff) << 13);
    else
        e |= pa;
    return e;
}

static u32 pages_of(const struct spec *s)
{
    if (s->identity)
        return ((u32)__image_end - ((u32)__image_start & ~0xfffu) + 0xfff) >> 12;
    return 1;
}
static u64 va_of(const struct spec *s, u32 i)
{
    return s->identity ? ((u32)__image_start & ~0xfffu) + (u64)i * K4 : s->va;
}

static int applies(const struct spec *s)
{
    return (s->modes & mode) && !(s->m_below_40 && maxphyaddr >= 40);
}

static void install(const struct spec *s)
{
    u32 i, n = pages_of(s);
    int leaf = level_for_size(s->size);
    for (i = 0; i < n; i++) {
        u64 va = va_of(s, i);
        u64 pa = s->identity ? va : spec_pa(s);
        if (s->fault == F_NOTPRESENT && s->absent) {
            (void)entry_addr(va, s->fault_level);  /* the tables above exist, the entry is 0 */
            continue;
        }
        wr_entry(entry_addr(va, leaf), leaf_entry(s, pa));
        if (s->restrict_parent) {
            u32 ea = entry_addr(va, leaf + 1);
            u64 e = rd_entry(ea) & ~(W | U);
            if (mode & M_NX) e |= NX;
            wr_entry(ea, e);
        }
        if (s->fault == F_NOTPRESENT) {
            u32 ea = entry_addr(va, s->fault_level);
            wr_entry(ea, rd_entry(ea) & ~P);
        } else if (s->fault == F_RESERVED) {
            u32 bit = s->rsvd_bit == 0xff ? maxphyaddr :
                      s->rsvd_bit == 0xfe ? 13 + maxphyaddr - 32 : s->rsvd_bit;
            u32 ea = entry_addr(va, s->fault_level);
            wr_entry(ea, rd_entry(ea) | (1ull << bit));
        }
    }
}

/* ---- fill values ---- */
static u64 fill_value(u64 pa) { return 0x4f52434c00000000ull ^ (pa >> 3); } /* "ORCL" ^ pa/8 */

static void fill(u64 pa)
{
    if (pa + 8 > ram_end || pa >= 0x100000000ull)
        return;
    *(volatile u64 *)(u32)pa = fill_value(pa);
    puts_("ORACLE FILL pa=");
    puthex(pa);
    puts_(" value=");
    puthex(fill_value(pa));
    puts_("\n");
}

/* ---- probes ---- */
#define MAX_PROBES 128
static struct probe probes[MAX_PROBES];
static u32 nprobes;

static void add_probe(u64 va)
{
    if (nprobes >= MAX_PROBES)
        fail("too many probes");
    probes[nprobes].va = va;
    probes[nprobes].value = 0;
    probes[nprobes].err = 0xffffffffu;
    nprobes++;
}

static void set_gate32(int vec, void (*fn)(void))
{
    u8 *g = idt32 + vec * 8;
    u32 off = (u32)fn;
    g[0] = off & 0xff; g[1] = (off >> 8) & 0xff;
    g[2] = 0x08; g[3] = 0;
    g[4] = 0; g[5] = 0x8e;
    g[6] = (off >> 16) & 0xff; g[7] = off >> 24;
}
static void set_gate64(int vec, void (*fn)(void))
{
    u8 *g = idt64 + vec * 16;
    u32 off = (u32)fn;
    memzero(g, 16);
    g[0] = off & 0xff; g[1] = (off >> 8) & 0xff;
    g[2] = 0x18; g[3] = 0;
    g[4] = 0; g[5] = 0x8e;
    g[6] = (off >> 16) & 0xff; g[7] = off >> 24;
}

/* ---- command line ---- */
static int starts_with(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static int word_is(const char *s, const char *w)
{
    while (*w) if (*s++ != *w++) return 0;
    return *s == 0 || *s == ' ';
}

static u32 parse_mode(const char *cmdline)
{
    const char *c = cmdline;
    unsigned i;
    while (c && *c) {
        if ((c == cmdline || c[-1] == ' ') && starts_with(c, "mode=")) {
            for (i = 0; i < sizeof(MODES) / sizeof(MODES[0]); i++)
                if (word_is(c + 5, MODES[i].name)) {
                    mode_name = MODES[i].name;
                    return MODES[i].bit;
                }
            fail("unknown mode= (want 32bit, pse, pae, 4level or 5level)");
        }
        c++;
    }
    fail("no mode= on the command line (want 32bit, pse, pae, 4level or 5level)");
    return 0;
}

static int parse_access(const char *cmdline)
{
    const char *c = cmdline;
    while (c && *c) {
        if ((c == cmdline || c[-1] == ' ') && starts_with(c, "access=")) {
            if (word_is(c + 7, "on"))
                return 1;
            if (word_is(c + 7, "off"))
                return 0;
            fail("access= wants on or off");
        }
        c++;
    }
    return 0;
}

/* ---- access checks ----
 * For each page of SPECS with .acc (and its frame in RAM), every kind of access, under every
 * setting of CR0.WP, CR4.SMEP/SMAP (where CPUID has them), EFER.NXE (both in the 32-bit
 * modes, where it only changes the #PF error code; 1 elsewhere) and CR4.PKE with PKRU = ACC_PKRU
 * (pae and long modes, where CPUID has PKU). Offsets in the page: read 4 bytes at +0 (the fill
 * value), write one byte 0xa5 at +0x808 (nothing else reads it), execute at +0x800, where
 * the frame holds `int $0x80` (cd 80) that returns to the checker. */
#define ACC_READ  0
#define ACC_WRITE 1
#define ACC_EXEC  2
#define ACC_USER  4
#define OFF_WRITE 0x808u
#define OFF_EXEC  0x800u
/* PKRU: WD0, AD1, WD2, AD3|WD3 (keys: 4k and user 1, huge-1g 2, user-ro 3, others 0) */
#define ACC_PKRU  0xe6u

static const u8 ACC_KINDS[6] = {ACC_READ, ACC_WRITE, ACC_EXEC,
                                ACC_USER | ACC_READ, ACC_USER | ACC_WRITE, ACC_USER | ACC_EXEC};
static const char *const ACC_NAMES[6] = {
    "supervisor-read", "supervisor-write", "supervisor-execute",
    "user-read", "user-write", "user-execute"};
/* The ring-3 stubs (16 bytes apart; the same bytes mean the same in 32- and 64-bit code):
 * read: mov (%eax/%rax),%edx; write: movb $0xa5,(%eax/%rax); execute: jmp *%eax/%rax;
 * then int $0x80 (the execute stub's target holds it). */
static const u8 STUB_READ[] = {0x8b, 0x10, 0xcd, 0x80};
static const u8 STUB_WRITE[] = {0xc6, 0x00, 0xa5, 0xcd, 0x80};
static const u8 STUB_EXEC[] = {0xff, 0xe0};
#define STUB_OFF 0x100u     /* in the user-code page, after its fill value */

static void copy(u32 dst, const u8 *src, u32 n) { while (n--) *(volatile u8 *)dst++ = *src++; }

static int acc_page_ok(const struct spec *s)
{
    return s->acc && applies(s) && spec_pa(s) + 0x1000 <= ram_end
           && spec_pa(s) + 0x1000 <= 0x100000000ull;
}

/* before paging: the stubs in the user-code frame, int $0x80 at +0x800 of every target */
static void prepare_access(void)
{
    static const u8 back[2] = {0xcd, 0x80};
    u32 i;
    copy(F_UCODE + STUB_OFF + 0x00, STUB_READ, sizeof(STUB_READ));
    copy(F_UCODE + STUB_OFF + 0x10, STUB_WRITE, sizeof(STUB_WRITE));
    copy(F_UCODE + STUB_OFF + 0x20, STUB_EXEC, sizeof(STUB_EXEC));
    user_stub_va = 0x10009000u + STUB_OFF;
    for (i = 0; i < NSPECS; i++)
        if (acc_page_ok(&SPECS[i])) {
            copy((u32)spec_pa(&SPECS[i]) + OFF_EXEC, back, 2);
            *(volatile u8 *)((u32)spec_pa(&SPECS[i]) + OFF_WRITE) = 0;
        }
}

static void set_tss_desc(u8 *d)
{
    u32 base = (u32)tss, limit = 103;
    d[0] = limit & 0xff; d[1] = (limit >> 8) & 0xff;
    d[2] = base & 0xff; d[3] = (base >> 8) & 0xff; d[4] = (base >> 16) & 0xff;
    d[5] = 0x89;                   /* present, DPL 0, available TSS (32-bit / 64-bit) */
    d[6] = 0; d[7] = base >> 24;
}

static void put_access(const struct spec *s, int k, u32 wp, u32 smep, u32 smap, u32 nxe,
                       u32 pke, u32 err)
{
    puts_("ORACLE ACCESS va=");
    puthex(s->va);
    puts_(" kind=");
    puts_(ACC_NAMES[k]);
    puts_(wp ? " wp=1" : " wp=0");
    puts_(smep ? " smep=1" : " smep=0");
    puts_(smap ? " smap=1" : " smap=0");
    puts_(nxe ? " nxe=1" : " nxe=0");
    if (pke) {
        puts_(" pke=1 pkru=");
        puthex(ACC_PKRU);
    } else {
        puts_(" pke=0");
    }
    if (err == 0xffffffffu) {
        puts_(" result=ok");
    } else {
        puts_(" result=fault err=");
        puthex(err);
    }
    puts_(" name=");
    puts_(s->name);
    puts_("\n");
}

static void put_list(const char *key, u32 many)
{
    puts_(key);
    puts_(many ? "0,1" : "0");
}

/* After paging is on (a 64-bit TSS must be loaded in IA-32e mode), before the probes: the
 * IDT for the checks (int $0x80, gate DPL 3, comes back to the checker, and so does every
 * exception other than #PF, as 0xee000000 | vector) and a TSS that gives ring 0 its stack. */
static void setup_access_tables(void)
{
    u32 i;
    memzero(tss, 104);
    if (mode & M_LONG) {
        *(u32 *)(tss + 4) = (u32)stack0_top;            /* RSP0 (high half 0) */
        set_tss_desc(gdt_tss64);
        __asm__ volatile("ltr %w0" : : "r"(0x40));
        for (i = 0; i < 32; i++)
            if (i != 14)
                set_gate64(i, exc64_table[i]);
        set_gate64(0x80, back64);
        idt64[0x80 * 16 + 5] = 0xee;                    /* DPL 3 */
    } else {
        *(u32 *)(tss + 4) = (u32)stack0_top;            /* ESP0 */
        *(u32 *)(tss + 8) = 0x10;                       /* SS0 */
        set_tss_desc(gdt_tss32);
        __asm__ volatile("ltr %w0" : : "r"(0x38));
        for (i = 0; i < 32; i++)
            if (i != 14)
                set_gate32(i, exc32_table[i]);
        set_gate32(0x80, back32);
        idt32[0x80 * 8 + 5] = 0xee;                     /* DPL 3 */
    }
}

static void run_access_checks(u32 cr0_base, u32 cr4_base)
{
    u32 i, k, n, npages = 0, wp, smep, smap, nxe, pke;
    u32 nxe_lo = (mode & M_NX) ? 1 : 0, nxe_hi = (mode & M_NX) ? 1 : (u32)has_nx;
    u32 pke_hi = (mode & M_LEG) ? 0 : (u32)has_pku;
    u64 efer0 = rdmsr(0xC0000080);
    struct acc64 a;

    if (!access_on) {
        puts_("ORACLE ACCESS-RUN off\n");
        return;
    }
    for (i = 0; i < NSPECS; i++)
        if (acc_page_ok(&SPECS[i]))
            npages++;
    n = npages * 6 * 2 * (has_smep ? 2 : 1) * (has_smap ? 2 : 1) * (nxe_hi - nxe_lo + 1)
        * (pke_hi + 1);
    puts_("ORACLE ACCESS-RUN");
    put_list(" wp=", 1);
    put_list(" smep=", has_smep);
    put_list(" smap=", has_smap);
    puts_(nxe_lo ? " nxe=1" : nxe_hi ? " nxe=0,1" : " nxe=0");
    put_list(" pke=", pke_hi);
    puts_(" pkru=");
    puthex(ACC_PKRU);
    puts_(" eflags.ac=0 read=+0x0 write=+0x808 execute=+0x800 pages=");
    putdec(npages);
    puts_(" count=");
    putdec(n);
    puts_("\n");

    /* #PF comes back to the checker from now on (the probes had their own handler) */
    if (mode & M_LONG)
        set_gate64(14, pfacc64);
    else
        set_gate32(14, pfacc32);

    for (nxe = nxe_lo; nxe <= nxe_hi; nxe++)
    for (pke = 0; pke <= pke_hi; pke++)
    for (smap = 0; smap <= (u32)has_smap; smap++)
    for (smep = 0; smep <= (u32)has_smep; smep++)
    for (wp = 0; wp <= 1; wp++) {
        u32 cr4 = (cr4_base & ~(CR4_SMEP | CR4_SMAP | CR4_PKE)) | (smep ? CR4_SMEP : 0)
                  | (smap ? CR4_SMAP : 0) | (pke ? CR4_PKE : 0);
        wrmsr(0xC0000080, nxe ? efer0 | EFER_NXE : efer0 & ~(u64)EFER_NXE);
        write_cr0(wp ? cr0_base | CR0_WP : cr0_base & ~CR0_WP);
        write_cr4(cr4 & ~CR4_PGE);                      /* flushes every TLB entry */
        write_cr4(cr4);
        if (pke)
            wrpkru(ACC_PKRU);
        for (i = 0; i < NSPECS; i++) {
            const struct spec *s = &SPECS[i];
            if (!acc_page_ok(s))
                continue;
            for (k = 0; k < 6; k++) {
                u32 op = ACC_KINDS[k] & 3, err;
                u64 addr = s->va + (op == ACC_WRITE ? OFF_WRITE : op == ACC_EXEC ? OFF_EXEC : 0);
                acc_cr2 = 0;
                if (mode & M_LONG) {
                    a.addr = addr;
                    a.kind = ACC_KINDS[k];
                    err = access64(&a);
                } else {
                    err = access32((u32)addr, ACC_KINDS[k]);
                }
                if ((err >> 24) == 0xee) {
                    puts_("ORACLE ERROR unexpected exception ");
                    putdec(err & 0xff);
                    puts_(" in the access check ");
                    puts_(ACC_NAMES[k]);
                    puts_(" at ");
                    puthex(addr);
                    puts_("\n");
                    halt_forever32();
                }
                if (err != 0xffffffffu && acc_cr2 != addr) {
                    puts_("ORACLE ERROR #PF with CR2=");
                    puthex(acc_cr2);
                    puts_(" in the access check at ");
                    puthex(addr);
                    puts_("\n");
                    halt_forever32();
                }
                put_access(s, (int)k, wp, smep, smap, nxe, pke, err);
            }
        }
    }
    /* back to the mode's own state (READY prints it) */
    if (pke_hi) {
        write_cr4(cr4_base | CR4_PKE);
        wrpkru(0);
    }
    wrmsr(0xC0000080, efer0);
    write_cr0(cr0_base);
    write_cr4(cr4_base & ~CR4_PGE);
    write_cr4(cr4_base);
}

/* ---- main ---- */
struct mbinfo { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

void oracle_main(u32 magic, struct mbinfo *mbi) __attribute__((noreturn));
void oracle_main(u32 magic, struct mbinfo *mbi)
{
    u32 a, b, c, d, i, k, cr4, efer_set;
    u64 efer;

    if (magic != 0x2BADB002)
        fail("not booted by a multiboot loader");
    if (!(mbi->flags & 4))
        fail("no command line");
    mode = parse_mode((const char *)mbi->cmdline);
    access_on = parse_access((const char *)mbi->cmdline);
    ram_end = (mbi->flags & 1) ? 0x100000ull + (u64)mbi->mem_upper * 1024 : 0x100000ull;
    if ((u32)__image_end > PT_POOL)
        fail("image overlaps the page-table pool");

    cpuid(0x80000000, 0, &a, &b, &c, &d);
    maxphyaddr = 36;
    if (a >= 0x80000008) {
        cpuid(0x80000008, 0, &a, &b, &c, &d);
        maxphyaddr = a & 0xff;
    }
    cpuid(0x80000001, 0, &a, &b, &c, &d);
    has_nx = !!(d & (1u << 20));
    has_1g = !!(d & (1u << 26));
    if ((mode & M_NX) && !has_nx)
        fail("this mode needs NX (cpuid 0x80000001 edx.20)");
    if ((mode & M_LONG) && !(d & (1u << 29)))
        fail("this mode needs long mode (cpuid 0x80000001 edx.29)");
    cpuid(0, 0, &a, &b, &c, &d);
    if (a >= 7) {
        cpuid(7, 0, &a, &b, &c, &d);
        has_la57 = !!(c & (1u << 16));
        has_smep = !!(b & (1u << 7));
        has_smap = !!(b & (1u << 20));
        has_pku = !!(c & (1u << 3));
    }
    if (mode == M_5L && !has_la57)
        fail("mode 5level needs LA57: use -cpu max or -cpu qemu64,+la57");
    if ((mode & M_NX) && maxphyaddr >= 52)
        fail("MAXPHYADDR is 52: no reserved physical-address bits to test");

    puts_("ORACLE INFO mode=");
    puts_(mode_name);
    puts_(" maxphyaddr=");
    putdec(maxphyaddr);
    puts_(" ram_end=");
    puthex(ram_end);
    puts_(" image=");
    puthex((u32)__image_start);
    puts_("-");
    puthex((u32)__image_end);
    puts_("\n");
    puts_(has_nx ? "ORACLE CPUID nx=1" : "ORACLE CPUID nx=0");
    puts_(has_1g ? " page1gb=1" : " page1gb=0");
    puts_(has_la57 ? " la57=1" : " la57=0");
    puts_(has_smep ? " smep=1" : " smep=0");
    puts_(has_smap ? " smap=1" : " smap=0");
    puts_(has_pku ? " pku=1\n" : " pku=0\n");

    /* tables */
    esize = (mode & M_LEG) ? 4 : 8;
    top_level = (mode & M_LEG) ? 2 : mode == M_PAE ? 3 : mode == M_4L ? 4 : 5;
    root = alloc_table();
    for (i = 0; i < NSPECS; i++)
        if (applies(&SPECS[i]))
            install(&SPECS[i]);

    /* fills (paging still off: physical = linear) */
    for (i = 0; i < NSPECS; i++) {
        const struct spec *s = &SPECS[i];
        if (!applies(s) || s->identity || s->absent)
            continue;
        for (k = 0; k < i; k++)   /* once per frame */
            if (applies(&SPECS[k]) && spec_pa(&SPECS[k]) == spec_pa(s) && !SPECS[k].identity)
                break;
        if (k < i)
            continue;
        fill(spec_pa(s));
        if (s->size > K4)
            fill(spec_pa(s) + s->size - 8);
    }

    if (access_on)
        prepare_access();

    /* probes: every listed page at its first 8 bytes, large pages also at their last 8 */
    for (i = 0; i < NSPECS; i++) {
        const struct spec *s = &SPECS[i];
        if (!applies(s))
            continue;
        for (k = 0; k < pages_of(s); k++)
            add_probe(va_of(s, k));
        if (s->size > K4)
            add_probe(s->va + s->size - 8);
    }

    /* paging on */
    cr4 = CR4_PGE;
    efer_set = 0;
    if (mode == M_PSE) cr4 |= CR4_PSE;
    if (mode & M_NX) { cr4 |= CR4_PAE; efer_set |= EFER_NXE; }
    if (mode & M_LONG) efer_set |= EFER_LME;
    if (mode == M_5L) cr4 |= CR4_LA57;
    if (mode & M_LONG) {
        set_gate64(14, pf64);
    } else {
        set_gate32(14, pf32);
        load_idt32();
    }
    enable_paging(root, cr4, efer_set);
    if (access_on)
        setup_access_tables();

    if (mode & M_LONG) {
        run_probes64(probes, nprobes);
    } else {
        for (i = 0; i < nprobes; i++)
            probes[i].err = probe32((u32)probes[i].va, &probes[i].value);
    }

    /* the list */
    for (i = 0; i < NSPECS; i++) {
        const struct spec *s = &SPECS[i];
        if (!applies(s))
            continue;
        for (k = 0; k < pages_of(s); k++) {
            /* without CPUID.Page1GB, PS=1 in a PDPTE is a reserved bit (SDM 4.5, table 4-16);
             * the entry is built all the same and probed: QEMU's TCG maps it anyway */
            int rsvd_1g = s->needs_1g && !has_1g;
            int ok = s->fault == F_NONE && !rsvd_1g;
            int x = s->x && !(s->restrict_parent && (mode & M_NX));
            if (!(mode & M_NX)) x = 1;
            puts_("ORACLE MAP va=");
            puthex(va_of(s, k));
            puts_(" pa=");
            if (ok) puthex(s->identity ? va_of(s, k) : spec_pa(s)); else puts_("none");
            puts_(" size=");
            puthex(ok || rsvd_1g ? s->size : span_of(s->fault_level));
            puts_(ok && s->w && !s->restrict_parent ? " w=1" : " w=0");
            puts_(ok && s->u && !s->restrict_parent ? " u=1" : " u=0");
            puts_(ok && x ? " x=1" : " x=0");
            puts_(ok ? " fault=none" :
                  s->fault == F_NOTPRESENT ? " fault=not-present" : " fault=reserved-bit");
            puts_(" name=");
            puts_(s->name);
            puts_("\n");
        }
    }
    for (i = 0; i < nprobes; i++) {
        puts_("ORACLE PROBE va=");
        puthex(probes[i].va);
        if (probes[i].err == 0xffffffffu) {
            puts_(" result=ok value=");
            puthex(probes[i].value);
        } else {
            puts_(" result=fault err=");
            puthex(probes[i].err);
        }
        puts_("\n");
    }

    run_access_checks(read_cr0(), read_cr4());

    efer = rdmsr(0xC0000080);
    puts_("ORACLE READY mode=");
    puts_(mode_name);
    puts_(" cr3=");
    puthex(read_cr3());
    puts_(" cr4=");
    puthex(read_cr4());
    puts_(" efer=");
    puthex(efer);
    puts_(" cr0=");
    puthex(read_cr0());
    puts_("\n");

    if (mode & M_LONG)
        halt_forever64();
    halt_forever32();
}
