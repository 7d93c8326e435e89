"""qintrospect.record against dataclasses, for the kinds of records qintrospect declares."""

import dataclasses
from typing import List, Optional

import pytest

from qintrospect.record import FrozenInstanceError, field, record, replace


def both(frozen=False, eq=True):
    """The same class body made by @dataclass and by @record."""
    made = []
    for deco, fld in ((dataclasses.dataclass, dataclasses.field), (record, field)):
        @deco(frozen=frozen, eq=eq)
        class Point:
            """A record."""
            x: int
            y: Optional[int] = None
            tags: List[str] = fld(default_factory=list)
            name: str = ""

            def norm(self) -> int:
                return abs(self.x) + abs(self.y or 0)
        made.append(Point)
    return made


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("eq", [False, True])
def test_behaves_as_a_dataclass(frozen, eq):
    D, R = both(frozen, eq)
    for args, kwargs in (((1,), {}), ((1, 2), {"name": "p"}), ((), {"x": 3, "tags": ["a"]})):
        d, r = D(*args, **kwargs), R(*args, **kwargs)
        assert repr(d) == repr(r)
        assert d.norm() == r.norm()
        assert (d == D(*args, **kwargs)) == (r == R(*args, **kwargs))
        assert (d != D(*args, **kwargs)) == (r != R(*args, **kwargs))
        assert (d == object()) == (r == object())
        hashable_d = D.__hash__ is not None
        assert hashable_d == (R.__hash__ is not None)
        if hashable_d:
            outcome = []
            for obj, again in ((d, D(*args, **kwargs)), (r, R(*args, **kwargs))):
                try:
                    outcome.append(hash(obj) == hash(again))
                except TypeError:             # a list field: unhashable either way
                    outcome.append("unhashable")
            assert outcome[0] == outcome[1]
    assert D(1).tags is not D(1).tags and R(1).tags is not R(1).tags   # a fresh list each
    r = R(1, 2, name="a")
    assert replace(r, y=5) == R(1, 5, name="a") if eq else replace(r, y=5).y == 5
    assert dataclasses.replace(D(1, 2), y=5) == D(1, 5) if eq else True
    with pytest.raises(TypeError):
        replace(r, nope=1)
    with pytest.raises(TypeError):
        R()                                   # x has no default
    if frozen:
        with pytest.raises(FrozenInstanceError):
            r.x = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            D(1).x = 2
        with pytest.raises(AttributeError):
            del r.x
    else:
        r.x = 7
        assert r.x == 7


def test_declaration_errors_as_dataclasses():
    with pytest.raises(TypeError):
        @record
        class Bad:
            a: int = 1
            b: int
    with pytest.raises(ValueError):
        @record
        class Mutable:
            a: list = []


def test_a_method_of_the_class_is_kept():
    @record(frozen=True)
    class Named:
        a: int

        def __repr__(self):
            return "mine"
    assert repr(Named(1)) == "mine" and Named(1) == Named(1) and hash(Named(1)) == hash((1,))
