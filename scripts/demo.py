"""Boot the bundled guest, start the probe, and show every probe address's chain."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qintrospect  # noqa: E402
from qintrospect import render  # noqa: E402
from vm.guest import Guest  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu", default="max", help="QEMU -cpu model (max: 5-level paging)")
    ap.add_argument("--keep", action="store_true", help="keep the VM running at the end")
    args = ap.parse_args()

    guest = Guest(cpu=args.cpu).start()
    try:
        probe = guest.start_probe("spin")
        print(f"guest up: QEMU pid {guest.pid}, QMP {guest.qmp_path}, gdb {guest.gdb_address}")
        print("the probe (pid %d) reports, from the guest kernel's own /proc/self/pagemap:" %
              probe["pid"])
        for line in probe["lines"]:
            print("  " + line)
        print()
        regions = probe["regions"]
        # The probe spins, so vCPU 0 is nearly always in its address space; retry until the
        # heap translates to what the guest says (another process may have run last).
        for _ in range(20):
            with qintrospect.attach(qmp=guest.qmp_path, gdb=guest.gdb_address) as vm:
                heap = vm.translate(regions["heap"]["gva"])
                if heap.gpa == regions["heap"]["gpa"]:
                    results = {n: vm.translate(r["gva"]) for n, r in regions.items()}
                    break
            time.sleep(0.05)
        else:
            sys.exit("the vCPU never ran the probe's address space")

        print(render.translation_text(results["heap"]))
        print()
        print(render.translation_text(results["thp"], show_bits=False))
        print()
        print(f"{'region':<10}{'GVA':<20}{'GPA (guest says)':<20}{'GPA (qintrospect)':<20}"
              f"{'HVA':<18}{'HPA':<14}{'page':<7}{'value same at GVA/HVA'}")
        for name, t in results.items():
            r = regions[name]
            want = "none" if r["gpa"] is None else f"{r['gpa']:#x}"
            if not t.ok:
                got = f"fault: {t.walk.fault.reason} at {t.walk.fault.level}"
                print(f"{name:<10}{t.gva:<#20x}{want:<20}{got}")
                continue
            same = "yes" if t.value_at_hva == t.value and t.value is not None else "no"
            print(f"{name:<10}{t.gva:<#20x}{want:<20}{t.gpa:<#20x}"
                  f"{t.hva or 0:<#18x}{t.hpa or 0:<#14x}{render.size_name(t.walk.page_size):<7}"
                  f"{same}")
        if args.keep:
            print(f"\nVM kept running. Try:\n  .venv/bin/qintrospect translate --qmp "
                  f"{guest.qmp_path} --gdb {guest.gdb_address} {regions['heap']['gva']:#x}\n"
                  "Ctrl-C ends it.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        guest.stop()


if __name__ == "__main__":
    main()
