"""@record: what qintrospect used of @dataclasses.dataclass, made in one step per class.

Importing dataclasses loads inspect (with ast, dis and tokenize), and each dataclass compiles
five or six methods one by one: together a quarter of a one-address `translate`'s start. The
records here need only fields with defaults (or field(default_factory=...)), __init__,
__repr__, __eq__ (eq=False: identity), frozen=True (immutable, hashable) and replace();
one exec per class makes the methods that run often (__init__, __eq__, __hash__) the way
dataclasses writes them; __repr__ and a frozen record's __setattr__/__delattr__ are shared
functions (a compile is most of a record's cost at import). Methods a class defines itself
are kept.
"""

__all__ = ["record", "field", "field_names", "replace", "FrozenInstanceError"]

_NO_DEFAULT = object()


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record (as dataclasses.FrozenInstanceError)."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def field(*, default_factory):
    """A field whose default is made anew for each record: default_factory()."""
    return _Factory(default_factory)


def record(cls=None, *, frozen: bool = False, eq: bool = True):
    """@record, @record(frozen=True), @record(eq=False): as @dataclass with the same
    arguments."""
    def make(cls):
        return _make(cls, frozen, eq)
    return make if cls is None else make(cls)


def field_names(obj) -> tuple:
    """The field names of a record (or record class), in order (as dataclasses.fields)."""
    return obj.__record_fields__


def replace(obj, **changes):
    """A copy of a record with some fields changed (as dataclasses.replace)."""
    cls = type(obj)
    values = {name: getattr(obj, name) for name in cls.__record_fields__}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    values.update(changes)
    return cls(**values)


def _make(cls, frozen: bool, eq: bool):
    names = list(cls.__dict__.get("__annotations__", {}))
    # the generated code's own names: __r_... (no field can be called that)
    scope = {"__r_no_default": _NO_DEFAULT, "__r_set": object.__setattr__, "__r_cls": cls,
             "__r_frozen_error": FrozenInstanceError}
    params, body = [], []
    seen_default = False
    for name in names:
        default = cls.__dict__.get(name, _NO_DEFAULT)
        if isinstance(default, _Factory):
            scope[f"__r_make_{name}"] = default.make
            params.append(f"{name}=__r_no_default")
            value = f"__r_make_{name}() if {name} is __r_no_default else {name}"
            delattr(cls, name)                  # as dataclasses: no class attribute
        elif default is not _NO_DEFAULT:
            if isinstance(default, (list, dict, set)):
                raise ValueError(f"mutable default {type(default).__name__} for field {name} "
                                 "is not allowed: use field(default_factory=...)")
            scope[f"__r_default_{name}"] = default
            params.append(f"{name}=__r_default_{name}")
            value = name
        elif seen_default:
            raise TypeError(f"non-default argument {name!r} follows default argument")
        else:
            params.append(name)
            value = name
        seen_default = seen_default or default is not _NO_DEFAULT
        body.append(f"  __r_set(self, {name!r}, {value})" if frozen else
                    f"  self.{name} = {value}")
    mine = tuple(f"self.{n}" for n in names)
    theirs = tuple(f"other.{n}" for n in names)
    # only the methods that run often are compiled, and only those the class gets: a
    # compile is most of a record's cost at import
    source = [f"def __init__(self, {', '.join(params)}):", *(body or ["  pass"])]
    if eq:
        source += ["def __eq__(self, other):",
                   "  if other.__class__ is self.__class__:",
                   f"    return ({', '.join(mine)},) == ({', '.join(theirs)},)",
                   "  return NotImplemented"]
    if eq and frozen:
        source += ["def __hash__(self):", f"  return hash(({', '.join(mine)},))"]
    exec("\n".join(source), scope)
    scope["__repr__"] = _repr
    if frozen:
        scope["__setattr__"], scope["__delattr__"] = _frozen(cls)
    own = cls.__dict__
    wanted = ["__init__", "__repr__"] + (["__eq__"] if eq else [])
    if frozen:
        wanted += ["__setattr__", "__delattr__"] + (["__hash__"] if eq else [])
    for name in wanted:
        if name not in own:
            fn = scope[name]
            if fn is not _repr:
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, fn)
    if eq and not frozen and "__hash__" not in own:
        cls.__hash__ = None                     # as dataclasses: equal by value, unhashable
    cls.__record_fields__ = tuple(names)
    return cls


def _repr(self):
    """As dataclasses writes it: Class(field=value, ...)."""
    return self.__class__.__qualname__ + "(" + ", ".join(
        f"{name}={getattr(self, name)!r}" for name in self.__record_fields__) + ")"


def _frozen(cls):
    """__setattr__ and __delattr__ of a frozen record class: its fields cannot change (nor
    any attribute of the class itself; a subclass's own attributes can)."""
    def __setattr__(self, name, value):
        if type(self) is cls or name in cls.__record_fields__:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self, name):
        if type(self) is cls or name in cls.__record_fields__:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)
    return __setattr__, __delattr__
