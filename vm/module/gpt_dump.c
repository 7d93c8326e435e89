// SPDX-License-Identifier: GPL-2.0
/*
 * gpt_dump: print how one process's page tables map one virtual address (GVA -> GPA).
 *
 *   insmod gpt_dump.ko pid=<pid> gva=<address, decimal or 0x hex>; rmmod gpt_dump
 *
 * pid=0 walks the tables of the insmod process itself (fine for kernel addresses, whose
 * upper-half entries every process shares). The output keeps the lab report's gpt_dump
 * layout line for line (so qintrospect/modlog/ reads old and new logs alike) and adds
 * hex lines, so that a line cut at the console width loses nothing the hex does not repeat:
 *
 *   gpt_dump: begin pid=N comm=X gva=0x... levels=4|5
 *   gpt_dump:  GPT PGD index: 284            (P4D too with 5-level paging)
 *   gpt_dump:  GVA 100011100 010100001 110110011 001010011 101111101000
 *   gpt_dump:  CR3: 0x...                    (the table root: __pa(mm->pgd), no PCID bits)
 *   gpt_dump:  page_offset_base: 0x...       (the direct map's base, for kernel GVAs)
 *   gpt_dump:  NEXT_LVL_GPA(CR3)  =  <bits 51..12>  +  64 * 284
 *   gpt_dump:  284: PGD <bits 63..52> <bits 51..12> <bits 11..0>
 *   gpt_dump:  PGD entry: 0x...
 *   ...                                      (a 2 MiB / 1 GiB leaf adds the Mask1/HFN block)
 *   gpt_dump:  GPA: 0x...
 *   gpt_dump: Value at GVA: <decimal>  /  Value at GVA (hex): 0x...
 *   gpt_dump: end
 *
 * The module only reads: the entries through the kernel's own page-table helpers, the value
 * with access_process_vm(FOLL_NOFAULT) (or copy_from_kernel_nofault for a kernel address),
 * and only once the walk found the page present, so that reading does not fault a page in.
 *
 * It prints once, from init, and then stays loaded doing nothing: `rmmod gpt_dump` before the
 * next run. Returning an error such as -EAGAIN from init would spare the rmmod, but busybox's
 * insmod (the guest's) retries with init_module() whenever finit_module() fails, so every run
 * would print twice; and insmod's exit status 0 can then mean success. A bad pid (none, or a
 * kernel thread without an mm) fails with -EINVAL, which busybox shows as "invalid
 * parameters"; dmesg says which (twice, for the reason above).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pgtable.h>
#include <linux/pid.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/sched/task.h>
#include <linux/uaccess.h>

static int pid;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "process whose page tables are walked (0: the insmod process)");

/* A ulong parameter is parsed with kstrtoul(..., 0, ...): decimal or 0x hex both work. */
static unsigned long gva;
module_param(gva, ulong, 0444);
MODULE_PARM_DESC(gva, "virtual address to walk (decimal or 0x hex)");

/* Binary digits of bits hi..lo of v. */
static const char *bits(char *buf, u64 v, int hi, int lo)
{
	int i, n = 0;

	for (i = hi; i >= lo; i--)
		buf[n++] = (v >> i) & 1 ? '1' : '0';
	buf[n] = '\0';
	return buf;
}

/* " 284: PGD <63..52> <51..12> <11..0>" as the seed prints it, then the same in hex. */
static void print_entry(const char *name, unsigned int idx, u64 e)
{
	char hi[16], mid[48], lo[16];

	pr_info(" %-3u: %s %s %s %s\n", idx, name, bits(hi, e, 63, 52), bits(mid, e, 51, 12),
		bits(lo, e, 11, 0));
	pr_info(" %s entry: 0x%016llx\n", name, e);
}

/* " NEXT_LVL_GPA(PGD)  =  <51..12>  +  64 * idx": the next table and the index into it. */
static void print_next(const char *name, u64 table, unsigned int next_idx)
{
	char mid[48];

	pr_info(" NEXT_LVL_GPA(%s)  =  %s  +  64 * %u\n", name, bits(mid, table, 51, 12),
		next_idx);
}

/* A 12/40/12 line of the huge-page block ("PMD    <63..52> <51..12> <11..0>"). */
static void print_split(const char *name, u64 v)
{
	char hi[16], mid[48], lo[16];

	pr_info(" %-6s %s %s %s\n", name, bits(hi, v, 63, 52), bits(mid, v, 51, 12),
		bits(lo, v, 11, 0));
}

/* A large leaf: the frame is the entry's address bits above the page size (bit 12 is PAT). */
static u64 huge_leaf(const char *name, const char *size_name, int level, u64 e, u64 size,
		     unsigned long addr)
{
	u64 mask1 = PTE_PFN_MASK & ~(size - 1), mask2 = size - 1;
	u64 gpa = (e & mask1) | (addr & mask2);

	pr_info("Huge Page (%s) at level %d detected!\n", size_name, level);
	print_split(name, e);
	print_split("Mask1", mask1);
	print_split("HFN", e & mask1);
	pr_info(" -----------------------------------------------------------------\n");
	print_split("GVA", addr);
	print_split("Mask2", mask2);
	print_split("Offset", addr & mask2);
	pr_info(" -----------------------------------------------------------------\n");
	return gpa;
}

static void print_header(unsigned long addr, int l5)
{
	char f[5][16], off[16];
	unsigned int pgd_i = pgd_index(addr), p4d_i = p4d_index(addr);
	unsigned int pud_i = pud_index(addr), pmd_i = pmd_index(addr), pte_i = pte_index(addr);

	pr_info(" GPT PGD index: %u\n", pgd_i);
	if (l5)
		pr_info(" GPT P4D index: %u\n", p4d_i);
	pr_info(" GPT PUD index: %u\n", pud_i);
	pr_info(" GPT PMD index: %u\n", pmd_i);
	pr_info(" GPT PTE index: %u\n", pte_i);
	bits(off, addr, 11, 0);
	if (l5) {
		pr_info("%13u%10u%10u%10u%9u\n", pgd_i, p4d_i, pud_i, pmd_i, pte_i);
		pr_info(" GVA [PGD IDX] [P4D IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]\n");
		pr_info(" GVA %s %s %s %s %s %s\n", bits(f[0], addr, 56, 48),
			bits(f[1], addr, 47, 39), bits(f[2], addr, 38, 30), bits(f[3], addr, 29, 21),
			bits(f[4], addr, 20, 12), off);
	} else {
		pr_info("%13u%10u%10u%9u\n", pgd_i, pud_i, pmd_i, pte_i);
		pr_info(" GVA [PGD IDX] [PUD IDX] [PMD IDX] [PTE IDX] [  Offset  ]\n");
		pr_info(" GVA %s %s %s %s %s\n", bits(f[0], addr, 47, 39), bits(f[1], addr, 38, 30),
			bits(f[2], addr, 29, 21), bits(f[3], addr, 20, 12), off);
	}
	pr_info("\n");
}

static bool not_present(const char *name, u64 e)
{
	if (e & _PAGE_PRESENT)
		return false;
	pr_info(" %s not present (entry 0x%016llx): the GVA is not mapped\n", name, e);
	return true;
}

/*
 * Walk mm's tables for addr, printing every level; the caller holds mmap_read_lock.
 * Returns true with *gpa set when a present leaf maps addr.
 */
static bool walk(struct mm_struct *mm, unsigned long addr, int l5, u64 *gpa)
{
	pgd_t *pgdp;
	p4d_t *p4dp;
	pud_t *pudp;
	pmd_t *pmdp;
	pte_t *ptep;
	u64 e;

	pr_info(" CR3: 0x%016llx\n", (u64)__pa(mm->pgd));
	/* The direct map's base (KASLR): a kernel GVA there is page_offset_base + GPA. */
	pr_info(" page_offset_base: 0x%016lx\n", (unsigned long)PAGE_OFFSET);
	print_next("CR3", __pa(mm->pgd), pgd_index(addr));
	pr_info("\n");

	pgdp = pgd_offset(mm, addr);
	e = pgd_val(READ_ONCE(*pgdp));
	print_entry("PGD", pgd_index(addr), e);
	if (not_present("PGD", e))
		return false;

	/* With 4-level paging the p4d level is folded: p4d_offset() returns the pgd entry. */
	p4dp = p4d_offset(pgdp, addr);
	if (l5) {
		print_next("PGD", e & PTE_PFN_MASK, p4d_index(addr));
		pr_info("\n");
		e = p4d_val(READ_ONCE(*p4dp));
		print_entry("P4D", p4d_index(addr), e);
		if (not_present("P4D", e))
			return false;
		print_next("P4D", e & PTE_PFN_MASK, pud_index(addr));
	} else {
		print_next("PGD", e & PTE_PFN_MASK, pud_index(addr));
	}
	pr_info("\n");

	pudp = pud_offset(p4dp, addr);
	e = pud_val(READ_ONCE(*pudp));
	print_entry("PUD", pud_index(addr), e);
	if (not_present("PUD", e))
		return false;
	if (e & _PAGE_PSE) {
		*gpa = huge_leaf("PUD", "1G", 3, e, PUD_SIZE, addr);
		return true;
	}
	print_next("PUD", e & PTE_PFN_MASK, pmd_index(addr));
	pr_info("\n");

	pmdp = pmd_offset(pudp, addr);
	e = pmd_val(READ_ONCE(*pmdp));
	print_entry("PMD", pmd_index(addr), e);
	if (not_present("PMD", e))
		return false;
	if (e & _PAGE_PSE) {
		*gpa = huge_leaf("PMD", "2M", 2, e, PMD_SIZE, addr);
		return true;
	}
	print_next("PMD", e & PTE_PFN_MASK, pte_index(addr));
	pr_info("\n");

	ptep = pte_offset_map(pmdp, addr);
	e = pte_val(READ_ONCE(*ptep));
	pte_unmap(ptep);
	print_entry("PTE", pte_index(addr), e);
	if (not_present("PTE", e))
		return false;
	*gpa = (e & PTE_PFN_MASK) | (addr & ~PAGE_MASK);
	return true;
}

static void print_value(struct task_struct *task, unsigned long addr)
{
	u64 value = 0;
	long got;

	/* Kernel addresses are not in any VMA: read them directly, without faulting. */
	if (addr >= TASK_SIZE_MAX)
		got = copy_from_kernel_nofault(&value, (void *)addr, sizeof(value)) ?
			0 : sizeof(value);
	else
		got = access_process_vm(task, addr, &value, sizeof(value), FOLL_NOFAULT);
	if (got != sizeof(value)) {
		pr_info("Value at GVA: unreadable (%ld of %zu bytes)\n", got, sizeof(value));
		return;
	}
	pr_info("Value at GVA: %llu\n", value);
	pr_info("Value at GVA (hex): 0x%016llx\n", value);
}

static int __init gpt_dump_init(void)
{
	struct task_struct *task;
	struct mm_struct *mm;
	int l5 = pgtable_l5_enabled();
	u64 gpa = 0;
	bool mapped;

	if (pid) {
		struct pid *p = find_get_pid(pid);

		task = p ? get_pid_task(p, PIDTYPE_PID) : NULL;
		put_pid(p);
		if (!task) {
			pr_err("no process with pid %d\n", pid);
			return -EINVAL;
		}
	} else {
		task = current;
		get_task_struct(task);
	}
	mm = get_task_mm(task);
	if (!mm) {
		pr_err("pid %d (%s) has no user address space (a kernel thread?)\n",
		       task_pid_nr(task), task->comm);
		put_task_struct(task);
		return -EINVAL;
	}

	pr_info("begin pid=%d comm=%s gva=0x%016lx levels=%d\n", task_pid_nr(task), task->comm,
		gva, l5 ? 5 : 4);
	print_header(gva, l5);
	mmap_read_lock(mm);
	mapped = walk(mm, gva, l5, &gpa);
	mmap_read_unlock(mm);
	if (mapped) {
		print_split("GPA", gpa);
		pr_info(" GPA: 0x%016llx\n", gpa);
		print_value(task, gva);
	}
	pr_info("end\n");

	mmput(mm);
	put_task_struct(task);
	return 0;
}

static void __exit gpt_dump_exit(void)
{
}

module_init(gpt_dump_init);
module_exit(gpt_dump_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Print the page-table walk of one virtual address of one process");
