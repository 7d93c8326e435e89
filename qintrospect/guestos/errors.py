"""The errors of qintrospect.guestos (placed in the project's tree: qintrospect.errors).

A guest whose kernel cannot be read without symbol files (not Linux, a kernel older than 6.0
whose vmcoreinfo does not name the kallsyms tables, no BTF) is like KVM's structures that
cannot be read for `--slat kvm`: exit status 3, with the reason and what to use instead.
A process asked for that is not there, or a name that several processes have, is bad usage:
exit status 2.
"""

from __future__ import annotations

from ..errors import AttachError, UsageError


class GuestOSUnavailable(AttachError):
    """The guest kernel's own facts cannot be read here; the message says why and what to
    use instead (--cr3, --find-cr3)."""


class NoSuchProcess(UsageError):
    """No guest process with that pid or name."""


class AmbiguousProcess(UsageError):
    """A name (comm) that several guest processes share; the message lists them."""


class NoSuchKvmVcpu(UsageError):
    """--kvm-vcpu names a guest process that holds no KVM VM, or a vCPU its VM does not
    have; the message says what there is."""


class NoKvmStructures(GuestOSUnavailable):
    """The guest kernel's BTF has no KVM/arm64 structures (built without KVM, or not arm64)."""
