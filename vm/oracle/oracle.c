/*
 * Oracle guest: builds page tables with a known list of mappings in one x86 paging mode,
 * turns paging on, reads every listed address through the real (emulated) MMU, prints the list
 * on COM1 and halts. The list printed and the tables built come from the same table, SPECS.
 *
 * Mode from the multiboot command line: mode=32bit|pse|pae|4level|5level.
 *
 * Output (one line each, COM1 0x3f8):
 *   ORACLE INFO mode=.. maxphyaddr=N ram_end=0x.. image=0x..-0x..
 *   ORACLE FILL pa=0x.. value=0x..                      (8 bytes written at pa before paging)
 *   ORACLE MAP va=0x.. pa=0x..|none size=0x.. w=0|1 u=0|1 x=0|1 fault=none|not-present|reserved-bit name=..
 *   ORACLE PROBE va=0x.. result=ok value=0x.. | result=fault err=0x..
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
};

#define K4 0x1000ull
#define M2 0x200000ull
#define M4 0x400000ull
#define G1 0x40000000ull

static const struct spec SPECS[] = {
    /* name            modes   va                      pa        size w u x g */
    {"identity",      M_ALL,  0, 0, K4, 1, 0, 1, 0, .identity = 1},
    {"4k",            M_ALL,  0x10000000, F_4K,        K4, 1, 0, 1, 0},
    {"read-only",     M_ALL,  0x10001000, F_RO,        K4, 0, 0, 1, 0},
    {"user",          M_ALL,  0x10002000, F_USER,      K4, 1, 1, 1, 0},
    {"nx",            M_NX,   0x10003000, F_NX,        K4, 1, 0, 0, 0},
    {"alias-a",       M_ALL,  0x10004000, F_ALIAS,     K4, 1, 0, 1, 0},
    {"pat-4k",        M_ALL,  0x10005000, F_PAT,       K4, 1, 0, 1, 0, .pat = 1},
    {"np-pte",        M_ALL,  0x10006000, F_NP,        K4, 1, 0, 1, 0,
        .fault = F_NOTPRESENT, .fault_level = 1},
    {"rsvd-pte",      M_NX,   0x10007000, F_RSVD,      K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 1, .rsvd_bit = 0xff},
    {"restrict-parent", M_ALL, 0x10400000, F_RESTRICT, K4, 1, 1, 1, 0, .restrict_parent = 1},
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
    {"large-4m",      M_PSE,  0x40000000, L_LARGE,     M4, 1, 0, 1, 0},
    {"pse36-4m",      M_PSE,  0x40400000, PA_PSE36,    M4, 1, 0, 1, 0},
    {"rsvd-4m-bit21", M_PSE,  0x40800000, L_RSVD4M,    M4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 21},
    /* PSE-36 bit for physical bit MAXPHYADDR (PDE bit 13 + MAXPHYADDR - 32): reserved */
    {"rsvd-4m-above-maxphyaddr", M_PSE, 0x40c00000, L_LARGE, M4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 0xfe, .m_below_40 = 1},
    {"large-2m",      M_NX,   0x40000000, L_LARGE,     M2, 1, 0, 1, 1},
    {"rsvd-2m-bit13", M_NX,   0x40200000, L_RSVD2M,    M2, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 2, .rsvd_bit = 13},
    {"huge-1g",       M_LONG, 0x8000000000ull, L_1G,   G1, 1, 1, 0, 0},
    {"rsvd-1g-bit13", M_LONG, 0x8040000000ull, L_RSVD1G, G1, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 3, .rsvd_bit = 13},
    {"rsvd-pml4-ps",  M_LONG, 0x10000000000ull, F_RSVD2, K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 4, .rsvd_bit = 7},
    {"rsvd-pml5-ps",  M_5L,   0x0002000000000000ull, F_RSVD3, K4, 1, 0, 1, 0,
        .fault = F_RESERVED, .fault_level = 5, .rsvd_bit = 7},
    {"la57-only",     M_5L,   0x0000800000000000ull, F_LA57, K4, 1, 0, 1, 0},
    /* upper half */
    {"upper",         M_LO32, 0xc0000000, F_UPPER,     K4, 1, 0, 1, 1},
    {"alias-b",       M_LO32, 0xc0001000, F_ALIAS,     K4, 0, 1, 0, 0},
    {"last-page",     M_LO32, 0xfffff000, F_LAST,      K4, 1, 0, 0, 1},
    {"upper",         M_4L,   0xffff800000000000ull, F_UPPER, K4, 1, 0, 1, 1},
    {"alias-b",       M_4L,   0xffff800000001000ull, F_ALIAS, K4, 0, 1, 0, 0},
    {"upper",         M_5L,   0xff00000000000000ull, F_UPPER, K4, 1, 0, 1, 1},
    {"alias-b",       M_5L,   0xff00000000001000ull, F_ALIAS, K4, 0, 1, 0, 0},
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
    if ((mode & M_NX) && !(d & (1u << 20)))
        fail("this mode needs NX (cpuid 0x80000001 edx.20)");
    if ((mode & M_LONG) && !(d & (1u << 29)))
        fail("this mode needs long mode (cpuid 0x80000001 edx.29)");
    if ((mode & M_LONG) && !(d & (1u << 26)))
        fail("this mode needs 1 GiB pages: use -cpu max or -cpu qemu64,+pdpe1gb");
    cpuid(7, 0, &a, &b, &c, &d);
    if (mode == M_5L && !(c & (1u << 16)))
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
            int ok = s->fault == F_NONE;
            int x = s->x && !(s->restrict_parent && (mode & M_NX));
            if (!(mode & M_NX)) x = 1;
            puts_("ORACLE MAP va=");
            puthex(va_of(s, k));
            puts_(" pa=");
            if (ok) puthex(s->identity ? va_of(s, k) : spec_pa(s)); else puts_("none");
            puts_(" size=");
            puthex(ok ? s->size : span_of(s->fault_level));
            puts_(ok && s->w && !s->restrict_parent ? " w=1" : " w=0");
            puts_(ok && s->u && !s->restrict_parent ? " u=1" : " u=0");
            puts_(ok && x ? " x=1" : " x=0");
            puts_(s->fault == F_NONE ? " fault=none" :
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
