"""The errors of qintrospect.btf, placed in the project's tree (qintrospect.errors).

Malformed or unexpected data (a BTF blob, kallsyms text or tables, a vmcoreinfo note) is bad
input: exit status 2, like ParseError. Symbols the host hides from us (kptr_restrict) are an
attach problem: exit status 3, like AttachError.
"""

from __future__ import annotations

from ..errors import AttachError, ParseError


class BtfError(ParseError):
    """A BTF blob is malformed (truncated, bad offset, bad type id, reference cycle, ...), or
    names a type or member it does not have. The message says what and where."""


class BtfLookupError(BtfError):
    """The BTF is well formed but has no such type, member, or enumerator (or several)."""


class KallsymsError(ParseError):
    """kallsyms text or compressed tables are malformed, or a symbol is missing or ambiguous."""


class SymbolNotFound(KallsymsError):
    """No symbol of that name (in that module)."""


class AmbiguousSymbol(KallsymsError):
    """Several symbols of that name at different addresses (static symbols of several files)."""


class KallsymsRestricted(AttachError):
    """/proc/kallsyms shows every address as zero: kernel.kptr_restrict hides them from us."""


class VmcoreinfoError(ParseError):
    """A vmcoreinfo note or its text is malformed, or lacks a value asked for."""
