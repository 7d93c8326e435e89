"""qintrospect: explain, address by address, how a running QEMU guest's memory maps.

    import qintrospect
    with qintrospect.attach(qmp="/run/vm/qmp.sock", gdb="127.0.0.1:1234") as vm:
        t = vm.translate(0x7f12345673e8)
        print(t.gpa, t.hva, t.hpa, t.value)
"""

from .errors import AttachError, MemoryReadError, ParseError, QIError, UsageError, VMGoneError

__all__ = ["attach", "Session", "Translation", "QIError", "UsageError", "ParseError",
           "AttachError", "VMGoneError", "MemoryReadError"]


def __getattr__(name):
    """attach, Session and Translation load the session (numpy, QMP) on first use, so that the
    command line starts without them (`qintrospect --help` imports almost nothing)."""
    if name in ("attach", "Session"):
        from .connect import session
        return getattr(session, name)
    if name == "Translation":
        from .commands.translate import Translation
        return Translation
    raise AttributeError(f"module 'qintrospect' has no attribute {name!r}")
