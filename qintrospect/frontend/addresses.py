"""Addresses as people write them: gdb's and QEMU's conventions (0x... hex, plain digits
decimal), one at a time or a stream of lines (translate -)."""

from ..errors import UsageError

MASK64 = (1 << 64) - 1



def parse_number(text: str, what: str = "address") -> int:
    """gdb/QEMU conventions: 0x... is hex, plain digits are decimal. Refuse anything else
    rather than guess (a bare 'ffff8880' is not silently read as hex)."""
    shown = quoted(text)
    t = text.strip().replace("_", "").replace("`", "")
    try:
        if t.lower().startswith("0x"):
            value = int(t[2:], 16)
        elif t.isdigit():
            value = int(t, 10)
        elif t.startswith("-"):
            raise UsageError(f"{what} {shown} is negative; give a value from 0 to 0xffffffffffffffff")
        else:
            hint = " (hex needs a 0x prefix)" if all(c in "0123456789abcdefABCDEF" for c in t) \
                and t else ""
            raise UsageError(f"{what} {shown} is not a number{hint}")
    except ValueError:
        raise UsageError(f"{what} {shown} is not a number") from None
    if value > MASK64:
        raise UsageError(f"{what} {shown} does not fit in 64 bits")
    return value


def quoted(text: str, most: int = 64) -> str:
    """text as a message quotes it: repr, cut short (a line of a file may be megabytes)."""
    if len(text) <= most:
        return repr(text)
    return f"{text[:most]!r}... ({len(text):,} characters)"


def read_addresses(lines):
    """parse_number() of each non-blank line (text, or bytes as read from stdin's buffer),
    lazily, a batch of lines at a time (flattened in C, not passed one by one through a
    generator). A batch of lines that are all plain 0x-hex (most of a long stream) is read
    by int() alone, which reads them the same: every line holds "0x" once (int(line, 16)
    takes "0x" only as a prefix, so a line that has it twice fails), and no sign."""
    import itertools
    return itertools.chain.from_iterable(_address_batches(iter(lines)))


def _address_batches(lines):
    import itertools
    seen = 0            # lines before this batch
    while True:
        batch = list(itertools.islice(lines, 4096))
        if not batch:
            return
        seen += len(batch)
        joined = (b"" if isinstance(batch[0], bytes) else "").join(batch)
        x, minus, plus = ((b"0x", b"-", b"+") if isinstance(joined, bytes) else ("0x", "-", "+"))
        if joined.count(x) == len(batch) and minus not in joined and plus not in joined:
            try:
                values = [int(line, 16) for line in batch]
            except ValueError:
                values = None
            if values is not None and max(values) <= MASK64:
                yield values
                continue
        values = []
        for number, line in enumerate(batch, seen - len(batch) + 1):
            if isinstance(line, bytes):
                line = line.decode("utf-8", "replace")
            if line.strip():
                try:
                    values.append(parse_number(line.strip()))
                except UsageError as exc:
                    yield values        # the lines before it, as one by one would give them
                    raise UsageError(f"line {number} of the addresses: {exc}") from None
        yield values
