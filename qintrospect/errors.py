"""The small tree of errors qintrospect raises on purpose.

Every error a person may see is a QIError: its message says what was wrong, with what value,
and what to do. `exit_status` is the command's exit status for it (see README, "Exit status").
Anything else escaping is a bug.
"""


class QIError(Exception):
    """Base of every expected failure."""

    exit_status = 1


class UsageError(QIError):
    """Bad command line or input value (a malformed address, a vCPU that does not exist)."""

    exit_status = 2


class ParseError(QIError):
    """Text we had to understand (QEMU's output, a module log) is not in the expected form."""

    exit_status = 2


class AttachError(QIError):
    """Could not reach or attach to the VM (socket missing, refused, not QMP, not a gdbstub)."""

    exit_status = 3


class VMGoneError(AttachError):
    """The VM or its connection went away in the middle of the work."""


class MemoryReadError(QIError):
    """Physical memory at this address cannot be read (not RAM, MMIO, beyond RAM, read failed)."""

    def __init__(self, message: str, address: int = None):
        super().__init__(message)
        self.address = address
