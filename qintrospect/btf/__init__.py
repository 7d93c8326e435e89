"""Readers for the Linux kernel's own descriptions of itself, with no symbol files: BTF
(types and member offsets), kallsyms (/proc/kallsyms text, or the compressed tables in a
kernel's memory), vmcoreinfo notes, and a small typed-memory reader over BTF (structs, lists,
xarrays, maple trees). Shared by the host side (KVM's structs through /proc/kcore) and the
guest side (a guest kernel's memory). Every reader treats its input as hostile: bounded,
checked, and failing with a QIError (exit status 2 for bad data, 3 for hidden symbols)."""

from .btf import Btf, Field, Member, Type, parse_path
from .errors import (
    AmbiguousSymbol, BtfError, BtfLookupError, KallsymsError, KallsymsRestricted,
    SymbolNotFound, VmcoreinfoError,
)
from .kallsyms import Kallsyms, Symbol
from .maple import MapleTree
from .typed import Obj, Walk, XArray, container_of, list_for_each
from .vmcoreinfo import Vmcoreinfo, find_note, find_notes

__all__ = [
    "Btf", "Type", "Member", "Field", "parse_path",
    "Kallsyms", "Symbol", "Vmcoreinfo", "find_note", "find_notes",
    "Obj", "Walk", "XArray", "MapleTree", "container_of", "list_for_each",
    "BtfError", "BtfLookupError", "KallsymsError", "KallsymsRestricted", "SymbolNotFound",
    "AmbiguousSymbol", "VmcoreinfoError",
]
