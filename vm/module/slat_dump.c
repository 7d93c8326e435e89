// SPDX-License-Identifier: GPL-2.0
/*
 * slat_dump: print how a hypervisor's second-level table (AMD NPT or Intel EPT) maps one
 * guest-physical address (GPA -> HPA), walked in C as the hardware walks it, on the host that
 * holds the table (for qintrospect's KVM rig: inside L1, whose KVM keeps L2's NPT).
 *
 *   insmod slat_dump.ko root=<table address or EPTP> gpa=<address> [format=npt|ept]
 *          [levels=4|5] [expect=<8-byte value>]; rmmod slat_dump
 *
 * root= is the physical address of the table's top level: the nCR3 KVM gives the guest (NPT),
 * or the EPT root; for EPT a whole EPTP is accepted too (its bits 11:0 give the memory type and
 * the walk length). format= defaults to this CPU's kind (npt on AMD/Hygon, ept otherwise).
 * levels= defaults, for NPT, to the host's own paging depth (KVM's NPT follows it: 5 with
 * LA57), for EPT to the EPTP's walk length (4 when root= has no low bits). expect= (decimal or
 * 0x hex) checks the 8 bytes found at the HPA. Numbers are decimal or 0x hex.
 *
 * The table pages are read through the kernel's direct map (the pages KVM allocates for its
 * tables are ordinary kernel pages): a table or page whose frame is not in the kernel's memory
 * map (pfn_valid) is refused, and every read is copy_from_kernel_nofault. The walk runs under
 * rcu_read_lock() (KVM's TDP MMU frees table pages after an RCU grace period); KVM may still
 * change entries while we read them: the log is one moment's view. Nothing is written.
 *
 * The output keeps the seed lab report's ept_dump layout line for line (so qintrospect/modlog/
 * reads the seed's logs and ours alike), with Linux's level names (PGD is the top level: PML5
 * with 5 levels, PML4 with 4; P4D is PML4 under a PML5), the wording "NPT"/"EPT", full lines
 * (nothing cut at 80 columns) and hex lines beside the binary ones:
 *
 *   slat_dump: begin format=npt levels=5 root=0x... gpa=0x... maxphyaddr=N
 *   slat_dump:  NPT PGD index: 0              (EPT PGD index with format=ept)
 *   slat_dump:  GPA [PGD IDX] [P4D IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]
 *   slat_dump:  GPA 000000000 ... 101111101000
 *   slat_dump: This is NPT
 *   slat_dump:  GPA: 0x...
 *   slat_dump:  nCR3: 0x...                   (EPTP: 0x... for EPT)
 *   slat_dump:  NEXT_LVL_HPA(nCR3) =  <bits 51..12>  +  64 * idx
 *   slat_dump:  0  : PGD <bits 63..52> <bits 51..12> <bits 11..0>
 *   slat_dump:  PGD entry: 0x...
 *   slat_dump:  PGD flags: P RW US A
 *   slat_dump:  NEXT_LVL_HPA(PGD)  =  <bits 51..12>  +  64 * idx
 *   ...                                       (a 2 MiB / 1 GiB leaf: the Huge Page block)
 *   slat_dump: HPA   <bits 63..52> <bits 51..12> <bits 11..0>
 *   slat_dump:  HPA: 0x...
 *   slat_dump: Value at HPA: <decimal>  /  Value at HPA (hex): 0x...
 *   slat_dump: end
 *
 * A not-present entry (NPT: P=0; EPT: R=W=X=0), a reserved bit the hardware checks, or an EPT
 * misconfiguration ends the walk with one line that says so, then "end".
 *
 * It prints once, from init, and stays loaded doing nothing: `rmmod slat_dump` before the next
 * run (busybox's insmod retries init_module() after a failed finit_module(), so returning an
 * error to spare the rmmod would print everything twice). Bad parameters fail with -EINVAL
 * after a line saying why.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pgtable.h>
#include <linux/rcupdate.h>
#include <linux/sizes.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <asm/io.h>
#include <asm/processor.h>

static unsigned long root;
module_param(root, ulong, 0444);
MODULE_PARM_DESC(root, "physical address of the top-level table (nCR3, EPT root or EPTP)");

static unsigned long gpa;
module_param(gpa, ulong, 0444);
MODULE_PARM_DESC(gpa, "guest-physical address to walk (decimal or 0x hex)");

static char *format_param;
module_param_named(format, format_param, charp, 0444);
MODULE_PARM_DESC(format, "npt or ept (default: npt on AMD/Hygon, ept otherwise)");

static int levels;
module_param(levels, int, 0444);
MODULE_PARM_DESC(levels, "4 or 5 (default: NPT as the host pages, EPT from the EPTP)");

static char *expect;
module_param(expect, charp, 0444);
MODULE_PARM_DESC(expect, "the 8-byte value expected at the HPA (decimal or 0x hex)");

#define ADDR_MASK	GENMASK_ULL(51, 12)
#define BIT_P		BIT_ULL(0)	/* NPT: present */
#define BIT_PS		BIT_ULL(7)	/* both: large page (NPT PTE: PAT) */
#define EPT_RWX		GENMASK_ULL(2, 0)

static const char *const level_names[5] = { "PGD", "P4D", "PUD", "PMD", "PTE" };

struct slat {
	bool ept;
	int levels;
	const char *fmt;	/* "NPT" or "EPT" */
	u64 reserved_high;	/* address bits above MAXPHYADDR */
};

/* Binary digits of bits hi..lo of v. */
static const char *bits(char *buf, u64 v, int hi, int lo)
{
	int i, n = 0;

	for (i = hi; i >= lo; i--)
		buf[n++] = (v >> i) & 1 ? '1' : '0';
	buf[n] = '\0';
	return buf;
}

/* The walk's level k (0 = top) as Linux names it: with 4 levels there is no P4D. */
static const char *lname(const struct slat *s, int k)
{
	return level_names[s->levels == 5 || k == 0 ? k : k + 1];
}

/* Bits of the GPA that index level k (0 = top). */
static int lshift(const struct slat *s, int k)
{
	return 12 + 9 * (s->levels - 1 - k);
}

static unsigned int lindex(const struct slat *s, int k, u64 addr)
{
	return (addr >> lshift(s, k)) & 511;
}

/* 8 bytes of physical memory through the direct map: 0, or why not. */
static int read_phys(u64 pa, u64 *out)
{
	if (!pfn_valid(PHYS_PFN(pa)))
		return -ERANGE;
	if (copy_from_kernel_nofault(out, phys_to_virt(pa), sizeof(*out)))
		return -EFAULT;
	return 0;
}

static const char *read_error(int err)
{
	return err == -ERANGE ? "its frame is not in the kernel's memory map (pfn not valid)" :
				"reading it through the direct map faulted";
}

/* " NEXT_LVL_HPA(PGD)  =  <51..12>  +  64 * idx", '=' aligned as in the seed. */
static void print_next(const char *name, u64 table, unsigned int next_idx)
{
	char mid[48];
	int pad = 5 - (int)strlen(name);

	pr_info(" NEXT_LVL_HPA(%s)%*s=  %s  +  64 * %u\n", name, pad < 1 ? 1 : pad, "",
		bits(mid, table, 51, 12), next_idx);
}

/* A 12/40/12 line ("PMD    <63..52> <51..12> <11..0>"), the label padded to `width`. */
static void print_split(const char *name, int width, u64 v)
{
	char hi[16], mid[48], lo[16];

	pr_info(" %-*s %s %s %s\n", width, name, bits(hi, v, 63, 52), bits(mid, v, 51, 12),
		bits(lo, v, 11, 0));
}

static const char *memory_type(unsigned int mt)
{
	static const char *const names[8] = { "UC", "WC", "reserved", "reserved", "WT", "WP",
					      "WB", "reserved" };
	return names[mt & 7];
}

/* " PMD flags: P RW US A D PS" (NPT) or " PMD flags: R W X MT=6(WB) PS A D" (EPT). */
static void print_flags(const struct slat *s, int k, u64 e, bool leaf)
{
	char buf[128];
	int n = 0;

#define ADD(cond, text)							\
	do {								\
		if (cond)						\
			n += scnprintf(buf + n, sizeof(buf) - n, " %s", text); \
	} while (0)
	if (s->ept) {
		ADD(e & BIT_ULL(0), "R");
		ADD(e & BIT_ULL(1), "W");
		ADD(e & BIT_ULL(2), "X");
		if (leaf)
			n += scnprintf(buf + n, sizeof(buf) - n, " MT=%llu(%s)%s", (e >> 3) & 7,
				       memory_type((e >> 3) & 7), e & BIT_ULL(6) ? " IPAT" : "");
		ADD(k != s->levels - 1 && (e & BIT_PS), "PS");
		ADD(e & BIT_ULL(8), "A");
		ADD(leaf && (e & BIT_ULL(9)), "D");
		ADD(e & BIT_ULL(10), "XU");
		ADD(leaf && (e & BIT_ULL(63)), "SVE");
	} else {
		ADD(e & BIT_ULL(0), "P");
		ADD(e & BIT_ULL(1), "RW");
		ADD(e & BIT_ULL(2), "US");
		ADD(e & BIT_ULL(3), "PWT");
		ADD(e & BIT_ULL(4), "PCD");
		ADD(e & BIT_ULL(5), "A");
		ADD(leaf && (e & BIT_ULL(6)), "D");
		ADD(e & BIT_PS, k == s->levels - 1 ? "PAT" : "PS");
		ADD(leaf && (e & BIT_ULL(8)), "G");
		ADD(leaf && k != s->levels - 1 && (e & BIT_ULL(12)), "PAT");
		ADD(e & BIT_ULL(63), "NX");
	}
#undef ADD
	pr_info(" %s flags:%s\n", lname(s, k), n ? buf : " (none)");
}

/* " 435: PMD <63..52> <51..12> <11..0>" as the seed prints it, the hex, the flags. */
static void print_entry(const struct slat *s, int k, unsigned int idx, u64 e, bool leaf)
{
	char hi[16], mid[48], lo[16];
	const char *name = lname(s, k);

	pr_info(" %-3u: %s %s %s %s\n", idx, name, bits(hi, e, 63, 52), bits(mid, e, 51, 12),
		bits(lo, e, 11, 0));
	pr_info(" %s entry: 0x%016llx\n", name, e);
	print_flags(s, k, e, leaf);
}

static bool present(const struct slat *s, u64 e)
{
	return s->ept ? e & EPT_RWX : e & BIT_P;
}

/* The page size a level's leaf maps (0: this level cannot be a leaf). */
static u64 leaf_size(const struct slat *s, int k)
{
	int from_bottom = s->levels - 1 - k;	/* 0 = PTE, 1 = PMD, 2 = PUD */

	return from_bottom == 0 ? SZ_4K : from_bottom == 1 ? SZ_2M : from_bottom == 2 ? SZ_1G : 0;
}

/*
 * What the hardware would refuse in this entry (0: nothing), with a sentence. NPT (APM vol 2,
 * 15.25.5 and 5.3): long-mode entries; address bits above MAXPHYADDR, PS in a PML5E/PML4E, PS
 * in a PDPTE without 1 GiB pages, bits between PAT (12) and the frame of a large page are
 * reserved (#NPF with RSVD). EPT (SDM vol 3, 29.3.3.1): the same address bits, W without R,
 * reserved bits of non-leaf entries, a reserved memory type at a leaf (EPT misconfiguration).
 */
static u64 problems(const struct slat *s, int k, u64 e, bool leaf, const char **why)
{
	u64 size = leaf_size(s, k), bad;

	if (e & s->reserved_high) {
		*why = "address bits above MAXPHYADDR";
		return e & s->reserved_high;
	}
	if (s->ept) {
		if ((e & 3) == 2) {
			*why = "write permission without read (W=1, R=0)";
			return BIT_ULL(1);
		}
		if (!leaf) {
			bad = e & (size ? GENMASK_ULL(6, 3) : GENMASK_ULL(7, 3));
			if (bad) {
				*why = "reserved in a non-leaf EPT entry";
				return bad;
			}
		} else {
			unsigned int mt = (e >> 3) & 7;

			if (mt == 2 || mt == 3 || mt == 7) {
				*why = "reserved memory type";
				return GENMASK_ULL(5, 3);
			}
			if (size > SZ_4K && (e & GENMASK_ULL(ilog2(size) - 1, 12))) {
				*why = "must be 0 in a large EPT page";
				return e & GENMASK_ULL(ilog2(size) - 1, 12);
			}
		}
		return 0;
	}
	if (k != s->levels - 1 && !leaf_size(s, k) && (e & BIT_PS)) {
		*why = "PS is reserved at this level";
		return BIT_PS;
	}
	if (size == SZ_1G && (e & BIT_PS) && !boot_cpu_has(X86_FEATURE_GBPAGES)) {
		*why = "PS in a PDPTE without 1 GiB pages (CPUID Page1GB)";
		return BIT_PS;
	}
	if (leaf && size > SZ_4K && (e & GENMASK_ULL(ilog2(size) - 1, 13))) {
		*why = "must be 0 in a large page entry";
		return e & GENMASK_ULL(ilog2(size) - 1, 13);
	}
	return 0;
}

/* The Huge Page block of the seed's ept_dump; returns the HPA. */
static u64 huge_leaf(const struct slat *s, int k, u64 e, u64 size, u64 addr)
{
	u64 mask1 = ADDR_MASK & ~(size - 1), mask2 = size - 1;
	int level = s->levels - k;	/* counted from the bottom: PTE = 1 */

	pr_info("Huge Page (%s) at level %d detected!\n", size == SZ_1G ? "1G" : "2M", level);
	pr_info("[e.g]   [Rsvd./Ign.] [  Huge Page Number, %d Bits  ][Ignored] [ ]\n",
		52 - ilog2(size));
	print_split(lname(s, k), 6, e);
	print_split("Mask1", 6, mask1);
	print_split("HFN", 6, e & mask1);
	pr_info(" -----------------------------------------------------------------\n");
	print_split("GPA", 6, addr);
	print_split("Mask2", 6, mask2);
	print_split("Offset", 6, addr & mask2);
	pr_info(" -----------------------------------------------------------------\n");
	return (e & mask1) | (addr & mask2);
}

static void print_header(const struct slat *s, u64 addr)
{
	char f[5][16], off[16];
	unsigned int idx[5];
	int k;

	for (k = 0; k < s->levels; k++) {
		idx[k] = lindex(s, k, addr);
		pr_info(" %s %s index: %u\n", s->fmt, lname(s, k), idx[k]);
	}
	for (k = 0; k < s->levels; k++)
		bits(f[k], addr, lshift(s, k) + 8, lshift(s, k));
	bits(off, addr, 11, 0);
	if (s->levels == 5) {
		pr_info("%13u%10u%10u%10u%9u\n", idx[0], idx[1], idx[2], idx[3], idx[4]);
		pr_info(" GPA [PGD IDX] [P4D IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]\n");
		pr_info(" GPA %s %s %s %s %s %s\n", f[0], f[1], f[2], f[3], f[4], off);
	} else {
		pr_info("%13u%10u%10u%9u\n", idx[0], idx[1], idx[2], idx[3]);
		pr_info(" GPA [PGD IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]\n");
		pr_info(" GPA %s %s %s %s %s\n", f[0], f[1], f[2], f[3], off);
	}
	pr_info("This is %s\n", s->fmt);
	pr_info("\n");
}

/* Walk addr from the table at `table`, printing every level. true with *hpa at a leaf. */
static bool walk(const struct slat *s, u64 table, u64 addr, u64 *hpa)
{
	int k, err;
	u64 e, bad;
	const char *why;

	for (k = 0; k < s->levels; k++) {
		const char *name = lname(s, k);
		unsigned int idx = lindex(s, k, addr);
		u64 size = leaf_size(s, k);
		bool leaf;

		err = read_phys(table + 8 * idx, &e);
		if (err) {
			pr_info(" %s table at 0x%016llx not read: %s; the walk stops\n", name, table,
				read_error(err));
			return false;
		}
		if (!present(s, e)) {
			print_entry(s, k, idx, e, false);
			if (s->ept)
				pr_info(" %s not present (R=W=X=0, entry 0x%016llx): GPA 0x%016llx is not mapped in this EPT (a guest access would cause an EPT violation)\n",
					name, e, addr);
			else
				pr_info(" %s not present (P=0, entry 0x%016llx): GPA 0x%016llx is not mapped in this NPT (a guest access would exit with #NPF)\n",
					name, e, addr);
			return false;
		}
		leaf = k == s->levels - 1 || (size && size > SZ_4K && (e & BIT_PS));
		print_entry(s, k, idx, e, leaf);
		bad = problems(s, k, e, leaf, &why);
		if (bad) {
			if (s->ept)
				pr_info(" %s misconfigured (entry 0x%016llx, bits 0x%016llx: %s): a guest access would cause an EPT misconfiguration; the walk stops\n",
					name, e, bad, why);
			else
				pr_info(" %s reserved bits set (entry 0x%016llx, bits 0x%016llx: %s): a guest access would exit with #NPF (RSVD); the walk stops\n",
					name, e, bad, why);
			return false;
		}
		if (leaf) {
			if (size > SZ_4K)
				*hpa = huge_leaf(s, k, e, size, addr);
			else
				*hpa = (e & ADDR_MASK) | (addr & (SZ_4K - 1));
			return true;
		}
		table = e & ADDR_MASK;
		print_next(name, table, lindex(s, k + 1, addr));
		pr_info("\n");
	}
	return false;	/* not reached: the last level is always a leaf */
}

static void print_value(u64 hpa)
{
	u64 value, want;
	int err = read_phys(hpa, &value);

	if (err) {
		pr_info("Value at HPA: unreadable (%s)\n", read_error(err));
		return;
	}
	pr_info("Value at HPA: %llu\n", value);
	pr_info("Value at HPA (hex): 0x%016llx\n", value);
	if (expect && *expect) {
		if (kstrtoull(expect, 0, &want))
			pr_info("Value check: expect=%s is not a number\n", expect);
		else
			pr_info("Value check: expect=0x%016llx: %s\n", want,
				want == value ? "equal" : "DIFFERENT");
	}
}

static int __init slat_dump_init(void)
{
	struct slat s = { 0 };
	u64 table, hpa = 0, top;
	bool vendor_amd = boot_cpu_data.x86_vendor == X86_VENDOR_AMD ||
			  boot_cpu_data.x86_vendor == X86_VENDOR_HYGON;
	const char *rootname;
	int err;
	u64 probe;

	if (!format_param || !*format_param)
		s.ept = !vendor_amd;
	else if (!strcmp(format_param, "npt"))
		s.ept = false;
	else if (!strcmp(format_param, "ept"))
		s.ept = true;
	else {
		pr_err("format=%s: expected npt or ept\n", format_param);
		return -EINVAL;
	}
	s.fmt = s.ept ? "EPT" : "NPT";
	rootname = s.ept ? "EPTP" : "nCR3";
	if (levels) {
		s.levels = levels;
	} else if (s.ept) {
		/* An EPTP's bits 5:3 are the walk length minus one; a bare address means 4. */
		s.levels = (root & 0xfff) ? ((root >> 3) & 7) + 1 : 4;
	} else {
		s.levels = pgtable_l5_enabled() ? 5 : 4;	/* KVM's NPT follows the host */
	}
	if (s.levels != 4 && s.levels != 5) {
		pr_err("levels=%d: a %s has 4 or 5 levels\n", s.levels, s.fmt);
		return -EINVAL;
	}
	if (!root) {
		pr_err("root= is missing: give the table's physical address (nCR3 / EPT root)\n");
		return -EINVAL;
	}
	s.reserved_high = boot_cpu_data.x86_phys_bits < 52 ?
			  GENMASK_ULL(51, boot_cpu_data.x86_phys_bits) : 0;
	table = root & ADDR_MASK;
	err = read_phys(table, &probe);
	if (err) {
		pr_err("root=0x%lx: the table at 0x%016llx is refused: %s\n", root, table,
		       read_error(err));
		return -EINVAL;
	}

	pr_info("begin format=%s levels=%d root=0x%016lx gpa=0x%016lx maxphyaddr=%u\n",
		s.ept ? "ept" : "npt", s.levels, root, gpa, boot_cpu_data.x86_phys_bits);
	print_header(&s, gpa);
	pr_info(" GPA: 0x%016lx\n", gpa);
	pr_info(" %s: 0x%016lx\n", rootname, root);
	top = s.levels == 5 ? 57 : 48;
	if (gpa >> top) {
		pr_info(" GPA 0x%016lx is beyond the %llu bits a %d-level %s translates: not walked\n",
			gpa, top, s.levels, s.fmt);
		pr_info("end\n");
		return 0;
	}
	print_next(rootname, table, lindex(&s, 0, gpa));
	pr_info("\n");

	rcu_read_lock();
	if (walk(&s, table, gpa, &hpa)) {
		print_split("HPA", 5, hpa);	/* "HPA   <12> <40> <12>" as the seed's */
		pr_info(" HPA: 0x%016llx\n", hpa);
		print_value(hpa);
	}
	rcu_read_unlock();
	pr_info("end\n");
	return 0;
}

static void __exit slat_dump_exit(void)
{
}

module_init(slat_dump_init);
module_exit(slat_dump_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Print the NPT/EPT walk of one guest-physical address");
