"""One small generic registry for tasks, methods, compressors and model presets.

Each entry is a class (or factory) with an optional pydantic `Params` model; a suite names the entry by key
and passes `params`, which are validated against that entry's own schema, so adding an entry never touches
the suite schema.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from kdbench.errors import KdbenchError

T = TypeVar("T")


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "task", "method", ... used in error messages
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KdbenchError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def params_schema(self, name: str) -> type[BaseModel]:
        return getattr(self.get(name), "Params", NoParams)

    def validate_params(self, name: str, params: dict[str, Any] | None) -> BaseModel:
        """Validate `params` against entry `name`'s own schema; errors name the entry and the bad field."""
        schema = self.params_schema(name)
        try:
            return schema.model_validate(params or {})
        except ValidationError as e:
            errors = e.errors()
            first = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
            where = ".".join(["params", *(str(p) for p in first["loc"])])  # a model-wide check has no field
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            err = KdbenchError(f"{self.kind} {name!r}: {where}: {msg}")
            err.loc = ("params", *first["loc"])  # lets the suite loader point at the line
            raise err from None

    def describe(self, name: str) -> str:
        entry = self.get(name)
        if isinstance(entry, str):  # an entry that is a name (model types: a config class) describes itself
            return entry
        doc = (getattr(entry, "__doc__", None) or "").strip()
        return " ".join(doc.split("\n\n")[0].split())  # the first paragraph, whole: it may span lines

    def describe_params(self, name: str) -> list[str]:
        """One line per parameter of entry `name`: `name: type = default`, from its pydantic schema."""
        lines = []
        for field, info in self.params_schema(name).model_fields.items():
            kind = _type_name(info.annotation)
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            lines.append(f"{field}: {kind} = {default}")
        return lines


def _type_name(annotation) -> str:
    """A parameter's type as a user writes it: `a | b` for a Literal, `{key, ...}` for a nested schema (its keys),
    `T | None` for an Optional."""
    from typing import Annotated

    from pydantic import BaseModel

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # constraints (ge, lt) are the schema's to check, not part of the type's name
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(map(str, args))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    if args and type(None) in args and origin is not None:
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + " | None"
    if isinstance(origin, type) and args:  # dict[int, int], list[str]: the parameters say more than `dict`
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")

