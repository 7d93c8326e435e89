"""This host's CPU and KVM, as they decide how guest memory is walked: the vendor (which
second-level format KVM builds: EPT on Intel, NPT on AMD), whether KVM uses it (two-dimensional
paging), 1 GiB pages (Page1GB: the processor walks a guest's tables itself under EPT/NPT) and the
physical address width. One answer for each, read once (/proc/cpuinfo, /sys/module)."""

from functools import lru_cache
from typing import Optional

VENDORS = {"AuthenticAMD": "amd", "HygonGenuine": "amd", "GenuineIntel": "intel"}


@lru_cache(maxsize=1)
def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} when it cannot be read)."""
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep:
                    out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def vendor() -> Optional[str]:
    """"amd" or "intel", None if unknown."""
    return VENDORS.get(_cpuinfo().get("vendor_id", ""))


def page1gb() -> Optional[bool]:
    """Whether the CPU has 1 GiB pages (the pdpe1gb flag), None if unknown."""
    flags = _cpuinfo().get("flags")
    return None if flags is None else "pdpe1gb" in flags.split()


def phys_bits() -> int:
    """The physical address width ("address sizes"), 52 if unknown."""
    try:
        return int(_cpuinfo()["address sizes"].split()[0])
    except (KeyError, ValueError, IndexError):
        return 52


def tdp() -> dict:
    """Which second-level paging this host's KVM uses: {"vendor": "amd"|"intel"|None,
    "module", "kind": "ept"|"npt", "enabled": bool|None (None: KVM not loaded), "parameter"}."""
    for vendor_name, module, param in (("intel", "kvm_intel", "ept"), ("amd", "kvm_amd", "npt")):
        path = f"/sys/module/{module}/parameters/{param}"
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        return {"vendor": vendor_name, "module": module, "kind": param,
                "enabled": value in ("Y", "1"), "parameter": path}
    return {"vendor": None, "module": None, "kind": None, "enabled": None, "parameter": None}


def slat_formats() -> tuple:
    """The second-level formats to look for, this host's kind first."""
    return ("ept", "npt") if vendor() == "intel" else ("npt", "ept")
