"""Text from outside (a guest, a process's command line, a monitor's answer) made safe to print.

A VM's `-name`, a socket path, QMP's status text or an error's description are chosen by whoever
started QEMU or by the guest behind its monitor. Printed raw they can drive the terminal: ESC
sequences retitle it (`\\x1b]0;...\\x07`), move the cursor, rewrite what was printed before; a
bidi override (U+202E) reorders a cell; a lone surrogate (a byte that is not UTF-8, kept by
surrogateescape decoding) makes printing fail. `printable()` is the one place that neutralizes
them for text renderers (a table, a message); HTML output escapes for HTML on top of it, and
JSON output needs neither (json.dumps escapes controls and surrogates).
"""

__all__ = ["printable"]

# U+DC80..U+DCFF stand for the undecodable bytes 0x80..0xFF under surrogateescape
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def printable(text) -> str:
    """`text` with every character that is not printable replaced by a visible escape.

    Replaced: whatever `str.isprintable()` refuses. That is the C0 controls (U+0000-U+001F,
    tab and line ends included: a cell is one line), DEL (U+007F), the C1 controls
    (U+0080-U+009F), lone surrogates, format characters (bidi overrides, zero-width ones),
    private-use and unassigned code points, and every space but U+0020. Each becomes a
    backslash escape as Python's repr spells it, the shortest that holds it: `\\xNN`, `\\uNNNN`,
    `\\UNNNNNNNN` (ESC is `\\x1b`, U+202E `\\u202e`); a surrogate that stands for an
    undecodable byte (U+DC80-U+DCFF, from surrogateescape) becomes that byte, `\\xNN`.
    Everything else is kept as is, so ordinary text (accents, CJK) is unchanged, and so is a
    backslash: the result is for reading, not for decoding back. It always encodes to UTF-8.

    Not a str (None, a number): its str() is made printable the same way.
    """
    if not isinstance(text, str):
        text = str(text)
    if text.isprintable():              # the common case, in C: nothing to do
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
            continue
        n = ord(c)
        if n < 0x100:
            out.append(f"\\x{n:02x}")
        elif n in _ESCAPED_BYTES:
            out.append(f"\\x{n - 0xDC00:02x}")
        elif n < 0x10000:
            out.append(f"\\u{n:04x}")
        else:
            out.append(f"\\U{n:08x}")
    return "".join(out)
