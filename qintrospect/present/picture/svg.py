"""A small SVG builder: rectangles, text, lines and groups, written as strings with every piece
of text and every attribute value escaped. Nothing else draws SVG in qintrospect.

Text that comes from the VM or from a log (RAM block names, notes, log lines) goes through
esc(): XML-escaped, and every character that is not printable (control characters, lone
surrogates, bidi overrides) shown as an escape (textsafe.printable), so every figure parses as
XML, inline in HTML or standalone, and reads as what it is.
"""

import html
import itertools
from typing import List, Optional


FONT = "'DejaVu Sans Mono', 'Liberation Mono', monospace"
CHAR_W = 0.6          # a monospace character's width, in em
_ids = itertools.count(1)


def clean(text) -> str:
    """The text with every character that is not printable shown as an escape (textsafe:
    terminal escapes, bidi overrides, characters XML cannot carry), line by line."""
    from ..textsafe import printable
    text = str(text)
    if text.isprintable():
        return text
    return "\n".join(printable(line) for line in text.split("\n"))


def esc(text) -> str:
    """Text or an attribute value for XML/HTML: & < > " ' escaped, impossible characters
    replaced."""
    return html.escape(clean(text), quote=True)


def text_width(text: str, size: float) -> float:
    """The width of `text` in the monospace font at `size` px."""
    return len(str(text)) * size * CHAR_W


def fit(text: str, width: float, size: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` px at `size` px."""
    text = str(text)
    n = int(width / (size * CHAR_W))
    if len(text) <= n:
        return text
    return text[:max(0, n - 1)] + "\u2026"


def _attrs(attrs: dict) -> str:
    out = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        if isinstance(value, float):
            value = f"{value:.2f}".rstrip("0").rstrip(".")
        out.append(f' {name}="{esc(value)}"')
    return "".join(out)


# One stylesheet for every figure (inline SVGs in one page share it; standalone files carry
# it). Light colours only: the figures print.
STYLE = f"""
.qi-fig {{ font-family: {FONT}; font-size: 12px; fill: #111; }}
.qi-fig text {{ fill: #111; }}
.qi-fig .t-small {{ font-size: 10px; }}
.qi-fig .t-title {{ font-size: 15px; font-weight: bold; }}
.qi-fig .t-head {{ font-size: 13px; font-weight: bold; }}
.qi-fig .t-dim {{ fill: #666; }}
.qi-fig .t-bad {{ fill: #b00020; font-weight: bold; }}
.qi-fig .t-ok {{ fill: #1b5e20; }}
.qi-fig .box {{ fill: #fff; stroke: #444; stroke-width: 1; }}
.qi-fig .box-table {{ fill: #f3f6fb; stroke: #3a5a8c; stroke-width: 1; }}
.qi-fig .box-entry {{ fill: #fff7d6; stroke: #b08900; stroke-width: 1.2; }}
.qi-fig .box-chain {{ fill: #eef7ee; stroke: #2e7d32; stroke-width: 1.2; }}
.qi-fig .box-slat {{ fill: #f4eefa; stroke: #6a1b9a; stroke-width: 1.2; }}
.qi-fig .box-fault {{ fill: #fdecee; stroke: #b00020; stroke-width: 1.6; }}
.qi-fig .box-note {{ fill: #fafafa; stroke: #bbb; stroke-width: 1; }}
.qi-fig .bit {{ fill: #fff; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-set {{ fill: #ffe08a; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-addr {{ fill: #dbe8fb; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-idx {{ fill: #e3f2e1; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-off {{ fill: #fdf1dc; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-sign {{ fill: #eeeeee; stroke: #999; stroke-width: 0.5; }}
.qi-fig .bit-bad {{ fill: #f7b6c0; stroke: #b00020; stroke-width: 0.8; }}
.qi-fig .field {{ fill: none; stroke: #333; stroke-width: 1.2; }}
.qi-fig .arrow {{ stroke: #333; stroke-width: 1.4; fill: none; }}
.qi-fig .arrow-slat {{ stroke: #6a1b9a; stroke-width: 1.4; fill: none; stroke-dasharray: 5 3; }}
.qi-fig .arrow-bad {{ stroke: #b00020; stroke-width: 1.6; fill: none; }}
.qi-fig .fold {{ stroke: #777; stroke-width: 1; fill: none; }}
.qi-fig .lane {{ fill: #fbfbfb; stroke: #ccc; stroke-width: 1; }}
.qi-fig .p-r {{ fill: #90caf9; }}
.qi-fig .p-rw {{ fill: #a5d6a7; }}
.qi-fig .p-rx {{ fill: #ffcc80; }}
.qi-fig .p-rwx {{ fill: #ef9a9a; }}
.qi-fig .strip-s {{ fill: #888; }}
.qi-fig .strip-u {{ fill: #1565c0; }}
.qi-fig .seg {{ stroke: #555; stroke-width: 0.5; fill: none; }}
.qi-fig .seg:hover {{ stroke: #000; stroke-width: 2; }}
"""


class Svg:
    """An SVG document built piece by piece; render() writes it."""

    def __init__(self, width: float, height: float, title: Optional[str] = None,
                 label: Optional[str] = None):
        self.width, self.height = width, height
        self.title = title
        self.label = label            # data-label: what the figure shows (for pages, tests)
        self.uid = f"qi{next(_ids)}"
        self.parts: List[str] = []

    # -- elements -------------------------------------------------------------------------
    def raw(self, markup: str) -> None:
        """Markup built by this module (already escaped)."""
        self.parts.append(markup)

    def rect(self, x, y, w, h, cls="box", title=None, rx=None, **attrs) -> None:
        a = _attrs(dict(x=x, y=y, width=max(0.0, w), height=max(0.0, h), class_=cls, rx=rx,
                        **attrs))
        if title:
            self.parts.append(f"<rect{a}><title>{esc(title)}</title></rect>")
        else:
            self.parts.append(f"<rect{a}/>")

    def text(self, x, y, s, cls=None, anchor=None, title=None, **attrs) -> None:
        a = _attrs(dict(x=x, y=y, class_=cls, text_anchor=anchor, **attrs))
        inner = esc(s) + (f"<title>{esc(title)}</title>" if title else "")
        self.parts.append(f"<text{a}>{inner}</text>")

    def line(self, x1, y1, x2, y2, cls="arrow", arrow=False) -> None:
        a = _attrs(dict(x1=x1, y1=y1, x2=x2, y2=y2, class_=cls,
                        marker_end=f"url(#{self.uid}-{self._marker(cls)})" if arrow else None))
        self.parts.append(f"<line{a}/>")

    def path(self, d: str, cls="arrow", arrow=False, title=None) -> None:
        a = _attrs(dict(d=d, class_=cls,
                        marker_end=f"url(#{self.uid}-{self._marker(cls)})" if arrow else None))
        if title:
            self.parts.append(f"<path{a}><title>{esc(title)}</title></path>")
        else:
            self.parts.append(f"<path{a}/>")

    @staticmethod
    def _marker(cls: str) -> str:
        return {"arrow-bad": "head-bad", "arrow-slat": "head-slat"}.get(cls, "head")

    def open_group(self, cls=None, title=None, transform=None, **attrs) -> None:
        self.parts.append(f"<g{_attrs(dict(class_=cls, transform=transform, **attrs))}>"
                          + (f"<title>{esc(title)}</title>" if title else ""))

    def close_group(self) -> None:
        self.parts.append("</g>")

    def embed(self, other: "Svg", x: float, y: float) -> None:
        """Another figure placed at (x, y), as a nested <svg> (its markers keep their ids)."""
        self.parts.append(other.render(standalone=False, x=x, y=y, nested=True))

    # -- output ---------------------------------------------------------------------------
    def _defs(self) -> str:
        heads = []
        for name, colour in (("head", "#333"), ("head-bad", "#b00020"), ("head-slat", "#6a1b9a")):
            heads.append(f'<marker id="{self.uid}-{name}" viewBox="0 0 10 10" refX="9" '
                         f'refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                         f'<path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>')
        return "<defs>" + "".join(heads) + "</defs>"

    def render(self, standalone: bool = True, x=None, y=None, nested: bool = False) -> str:
        """The figure: a standalone SVG file (XML declaration, namespace, its own stylesheet),
        or an element for an HTML page (the page carries the stylesheet)."""
        w, h = round(self.width, 1), round(self.height, 1)
        attrs = dict(xmlns="http://www.w3.org/2000/svg", width=w, height=h,
                     viewBox=f"0 0 {w} {h}", class_="qi-fig", x=x, y=y,
                     data_label=self.label, role="img")
        head = f"<svg{_attrs(attrs)}>"
        title = f"<title>{esc(self.title)}</title>" if self.title else ""
        style = f"<style>{STYLE}</style>" if standalone and not nested else ""
        body = head + title + style + self._defs() + "".join(self.parts) + "</svg>"
        if standalone and not nested:
            return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"
        return body
