"""Readers for the Linux kernel's own descriptions of itself, with no symbol files: BTF
(types and member offsets), kallsyms (/proc/kallsyms text, or the compressed tables in a
kernel's memory), vmcoreinfo notes, and a small typed-memory reader over BTF (structs, lists,
xarrays, maple trees). Shared by the host side (KVM's structs through /proc/kcore) and the
guest side (a guest kernel's memory). Every reader treats its input as hostile: bounded,
checked, and failing with a QIError (exit status 2 for bad data, 3 for hidden symbols)."""

# Each name is loaded from its module on first use (PEP 562): a command that needs only the
# vmcoreinfo reader (a guest kernel's facts kept from an earlier command) does not pay for the
# BTF parser, kallsyms and the typed walkers.
_WHERE = {
    "Btf": "btf", "Field": "btf", "Member": "btf", "Type": "btf", "parse_path": "btf",
    "AmbiguousSymbol": "errors", "BtfError": "errors", "BtfLookupError": "errors",
    "KallsymsError": "errors", "KallsymsRestricted": "errors", "SymbolNotFound": "errors",
    "VmcoreinfoError": "errors",
    "Kallsyms": "kallsyms", "Symbol": "kallsyms",
    "MapleTree": "maple",
    "Obj": "typed", "Walk": "typed", "XArray": "typed", "container_of": "typed",
    "list_for_each": "typed",
    "Vmcoreinfo": "vmcoreinfo", "find_note": "vmcoreinfo", "find_notes": "vmcoreinfo",
}

__all__ = [
    "Btf", "Type", "Member", "Field", "parse_path",
    "Kallsyms", "Symbol", "Vmcoreinfo", "find_note", "find_notes",
    "Obj", "Walk", "XArray", "MapleTree", "container_of", "list_for_each",
    "BtfError", "BtfLookupError", "KallsymsError", "KallsymsRestricted", "SymbolNotFound",
    "AmbiguousSymbol", "VmcoreinfoError",
]


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qintrospect.btf' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
