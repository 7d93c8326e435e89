"""textsafe.printable: what anyone may write (a VM's name, a monitor's text) made safe to print."""

import pytest
from hypothesis import given, strategies as st

from qintrospect.present.textsafe import printable


@pytest.mark.parametrize("text,shown", [
    ("vm1", "vm1"),
    ("héllo wörld 日本", "héllo wörld 日本"),                 # printable text is left alone
    ("a\\x1b", "a\\x1b"),                                      # so is a backslash
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),                # OSC: retitle the terminal
    ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),                      # CSI: clear, home
    ("\x9b2J", "\\x9b2J"),                                     # the same with C1's CSI
    ("a\tb\nc\rd\x00e\x7f", "a\\x09b\\x0ac\\x0dd\\x00e\\x7f"),  # one line: no line ends
    ("vm-\udcff\udcfe", "vm-\\xff\\xfe"),                      # bytes kept by surrogateescape
    ("\ud800x\udfff", "\\ud800x\\udfff"),                      # other lone surrogates
    ("abc\u202egnp.exe", "abc\\u202egnp.exe"),                 # a bidi override
    ("a\u200bb\ufeff", "a\\u200bb\\ufeff"),                    # zero-width ones
    ("a\u00a0b\u2028c", "a\\xa0b\\u2028c"),                    # spaces other than ' ', LS
    ("\ue000\U000f0000\U0010ffff", "\\ue000\\U000f0000\\U0010ffff"),   # private use
    ("\U000e0001", "\\U000e0001"),                             # a tag character
])
def test_what_is_replaced(text, shown):
    assert printable(text) == shown


def test_not_text():
    assert printable(None) == "None" and printable(7) == "7"
    assert printable(b"\x1b") == "b'\\x1b'"


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_any_text_comes_out_printable_and_utf8(text):
    out = printable(text)
    assert out.isprintable()
    out.encode("utf-8")                          # never a lone surrogate
    assert printable(out) == out                 # already printable: left alone
    if text.isprintable():
        assert out == text
