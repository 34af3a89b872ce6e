"""The mapping vocabulary: small typed transforms and conditions (docs/architecture.md).

A mapping file never holds code. Each value in it is one of a closed set of transforms,
each a frozen pydantic model with an ``apply(context)`` method. In TOML a transform is an
inline table named by its *head key*, the one key that says what it is::

    { path = "deal.properties.dealname" }                       # PathRef
    { lookup = "deal.properties.billing_type", table = {...} }   # Lookup
    { money = "item.properties.price", round = true }            # Money

A bare TOML value in a value position is a constant (``"one_time"``, ``30``); where a
transform takes an input (``lookup = ...``, ``date = ...``), a bare string is a path.
Conditions (``when`` filters, the won rule) are tables named by their operator::

    { path = "deal.properties.dealstage", in = ["closedwon"] }
    { any = [ {...}, {...} ] }

The head key is the discriminator: :func:`as_value`, :func:`as_input` and
:func:`as_condition` pick the model from it and validate the table with every problem
reported at once, each at its key (``pydantic`` ``loc``), with a "did you mean" hint for
unknown names. Values are never evaluated as code: paths only index into mappings and
lists, templates only substitute paths, and numbers are parsed from strings straight into
:class:`~decimal.Decimal` (a float is refused everywhere).

Absent values (missing, null, an empty string or an empty list) flow through transforms
as ``None`` so that ``coalesce`` and ``default`` can fill them; a required field that ends
up absent is reported by :mod:`syncd.core.mapping` with the paths it tried.
"""

from __future__ import annotations

import abc
import difflib
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any, ClassVar, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from syncd.core.errors import MappingError
from syncd.core.money import check_currency, from_minor, round_money

ALL = "*"
"""The path step that means "every item of this list" (written ``name[*]``)."""

_STEP = re.compile(r"(?P<name>[A-Za-z0-9_-]+)(?:\[(?P<index>\*|\d+)\])?")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_EPOCH_MS = re.compile(r"-?\d{6,}")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS = 86_400_000

ROOTS = ("deal", "company", "contacts", "line_items", "contact", "record", "defaults")
"""Path roots every mapping can read (``item`` is added inside repeated tables)."""

# ---------------------------------------------------------------------------
# Absent values, text, and problems
# ---------------------------------------------------------------------------


def absent(value: Any) -> bool:
    """Whether ``value`` counts as no value: None, blank text or an empty list."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list | tuple) and not value


def as_text(value: Any) -> str:
    """``value`` as the text a template or lookup key uses; lists join with ", "."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return ", ".join(as_text(item) for item in value)
    return str(value).strip()


def show(value: Any) -> str:
    """A short rendering of ``value`` for messages (text quoted and cut at 60 characters)."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace('"', '\\"') + '"'
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return as_text(value)


def listing(names: Sequence[str] | set[str] | frozenset[str], limit: int = 15) -> str:
    """Sorted names joined for a message, cut after ``limit`` with ", …"."""
    ordered = sorted(str(name) for name in names)
    if not ordered:
        return "(none)"
    shown = ", ".join(ordered[:limit])
    return shown + (", …" if len(ordered) > limit else "")


def did_you_mean(name: str, choices: Sequence[str] | set[str] | frozenset[str]) -> str:
    """`` (did you mean "x"?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def problem(message: str) -> PydanticCustomError:
    """A validation problem whose text is final (braces in it are not placeholders)."""
    return PydanticCustomError("mapping", "{message}", {"message": message})


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def parse_path(text: str) -> tuple[str | int, ...]:
    """Split a dotted path into steps: names, list indexes and :data:`ALL`.

    ``line_items.0.properties.name`` and ``line_items[0].properties.name`` index one
    item; ``line_items[*].properties.name`` takes every item.

    Raises:
        ValueError: the text is not a path.
    """
    steps: list[str | int] = []
    for part in text.split("."):
        match = _STEP.fullmatch(part)
        if match is None:
            raise ValueError(f'invalid path "{text}": "{part}" is not a name, an index or name[*]')
        name = match["name"]
        steps.append(int(name) if name.isdigit() else name)
        if match["index"] is not None:
            steps.append(ALL if match["index"] == ALL else int(match["index"]))
    if not isinstance(steps[0], str) or steps[0] == ALL:
        raise ValueError(f'invalid path "{text}": it must start with a name such as "deal"')
    return tuple(steps)


def _check_path(text: str) -> str:
    try:
        parse_path(text)
    except ValueError as exc:
        raise problem(str(exc)) from None
    return text


def _step_into(value: Any, step: str | int) -> Any:
    if isinstance(step, int):
        if isinstance(value, list | tuple) and 0 <= step < len(value):
            return value[step]
        return None
    if isinstance(value, Mapping):
        return value.get(step)
    return None


def resolve(steps: Sequence[str | int], value: Any) -> Any:
    """Follow ``steps`` into nested mappings and lists; ``None`` where anything is missing.

    Only mapping keys and list indexes are followed: no attribute is ever read.
    """
    for position, step in enumerate(steps):
        if step == ALL:
            if not isinstance(value, list | tuple):
                return None
            found = (resolve(steps[position + 1 :], item) for item in value)
            return [item for item in found if not absent(item)]
        value = _step_into(value, step)
        if value is None:
            return None
    return value


def _dotted(steps: Sequence[str | int]) -> str:
    return ".".join(str(step) for step in steps)


def explain_missing(text: str, roots: Mapping[str, Any], subject: str) -> str:
    """Why ``text`` has no value on the record, naming what is there instead."""
    value: Any = roots
    walked: list[str | int] = []
    steps = parse_path(text)
    for position, step in enumerate(steps):
        if step == ALL:
            return f'path "{text}" found no values on {subject}'
        following = _step_into(value, step)
        last = position == len(steps) - 1
        if following is None and last and isinstance(value, Mapping) and step in value:
            return f'path "{text}" is empty on {subject}'
        if following is None:
            return f'path "{text}" not found on {subject}; {_what_is_there(value, walked, step)}'
        value = following
        walked.append(step)
    return f'path "{text}" is empty on {subject}'


def _what_is_there(value: Any, walked: list[str | int], step: str | int) -> str:
    if isinstance(value, Mapping) and step not in value:
        noun = "properties" if walked and walked[-1] == "properties" else "keys"
        return f"known {noun}: {listing(set(value))}"
    if isinstance(value, list | tuple):
        return f'"{_dotted(walked)}" has {len(value)} items'
    return f'"{_dotted([*walked, step])}" is empty'


# ---------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a transform reads while mapping one field of one record.

    Attributes:
        roots: the path roots (``deal``, ``company``, ``contacts``, ``line_items``,
            ``contact``, ``record``, ``defaults`` and, in repeated tables, ``item``).
        subject: the record in words, for messages (``deal 8812``).
        place: where the field is mapped (``mappings/x.toml:12 [client].legal_name``).
        timezone: IANA zone that dates without an offset are read in.
        currency: ISO 4217 code that ``money`` uses when it names none.
        tables: the named lookup tables of the mapping file.
    """

    roots: Mapping[str, Any]
    subject: str
    place: str | None = None
    timezone: str = "UTC"
    currency: str | None = None
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def resolve(self, path: str) -> Any:
        """The value at ``path`` (``None`` when absent)."""
        return resolve(parse_path(path), self.roots)

    def explain(self, path: str) -> str:
        """Why ``path`` has no value here."""
        return explain_missing(path, self.roots, self.subject)

    def zone(self) -> ZoneInfo:
        """The context's time zone."""
        return ZoneInfo(self.timezone)

    def fail(self, message: str) -> MappingError:
        """A :class:`~syncd.core.errors.MappingError` at this field, to raise."""
        return MappingError(message, place=self.place)

    def derive(self, **changes: Any) -> Context:
        """A copy with some attributes changed."""
        return replace(self, **changes)


# ---------------------------------------------------------------------------
# Parsing values (strings straight into Decimal; never float)
# ---------------------------------------------------------------------------


def to_decimal(value: Any) -> Decimal:
    """``value`` as an exact Decimal: from text like ``"1500.00"``, an int or a Decimal.

    Raises:
        ValueError: a float (it may already have lost digits), a bool, or text that is
            not a plain decimal number (no exponents, no thousands separators).
    """
    if isinstance(value, bool):
        raise ValueError(f"{show(value)} is a boolean, not a number")
    if isinstance(value, float):
        raise ValueError(f"{value!r} is a float; numbers must come as text or integers so no digit is lost")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite number")
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return Decimal(value.strip())
    raise ValueError(f'{show(value)} is not a plain decimal number (like "1500.00")')


def to_integer(value: Any) -> int:
    """``value`` as an int (``"30"``, ``"30.0"``, 30).

    Raises:
        ValueError: not a number, or a number with a fraction.
    """
    number = to_decimal(value)
    if number != number.to_integral_value():
        raise ValueError(f"{show(value)} is not a whole number")
    return int(number)


def to_bool(value: Any) -> bool:
    """``value`` as a bool: true/false, yes/no, y/n, 1/0, on/off (any case).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool):
        return value
    text = as_text(value).lower() if isinstance(value, str | int | Decimal) else ""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{show(value)} is not a boolean (true/false, yes/no, 1/0)")


def _from_epoch_ms(milliseconds: int, midnight_utc_is_date: bool) -> date | datetime:
    try:
        instant = _EPOCH + timedelta(milliseconds=milliseconds)
    except OverflowError:
        raise ValueError(f"{milliseconds} is out of range for a millisecond timestamp") from None
    if midnight_utc_is_date and milliseconds % _DAY_MS == 0:
        return instant.date()
    return instant


def _from_text(text: str, zone: ZoneInfo, midnight_utc_is_date: bool) -> date | datetime:
    if _EPOCH_MS.fullmatch(text):
        return _from_epoch_ms(int(text), midnight_utc_is_date)
    if _ISO_DATE.fullmatch(text):
        return date.fromisoformat(text)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=zone)
    if midnight_utc_is_date and parsed.utcoffset() == timedelta(0) and parsed.time() == time():
        return parsed.date()
    return parsed


def to_instant(value: Any, zone: ZoneInfo, *, midnight_utc_is_date: bool = True) -> date | datetime:
    """``value`` as a calendar date or an aware datetime.

    Accepts ISO dates (``2024-03-01``), ISO datetimes with or without an offset (without
    one they are read in ``zone``), and millisecond epoch timestamps (text or int).
    With ``midnight_utc_is_date`` a value at exactly midnight UTC is a calendar date:
    that is how HubSpot stores date properties ("Date properties ... must be set to
    midnight UTC for the date you want",
    https://developers.hubspot.com/docs/faq/how-should-timestamps-be-formatted-for-hubspots-apis),
    so the date the admin picked survives conversion to any zone.

    Raises:
        ValueError: the value is none of those.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    if isinstance(value, date):
        return value
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return _from_epoch_ms(to_integer(value), midnight_utc_is_date)
    if isinstance(value, str):
        try:
            return _from_text(value.strip(), zone, midnight_utc_is_date)
        except ValueError:
            raise ValueError(f"{show(value)} is not an ISO date, ISO datetime or millisecond timestamp") from None
    raise ValueError(f"{show(value)} is not a date")


def to_date(value: Any, zone: ZoneInfo, *, midnight_utc_is_date: bool = True) -> date:
    """The calendar date of ``value`` in ``zone`` (a date stays the date it is)."""
    instant = to_instant(value, zone, midnight_utc_is_date=midnight_utc_is_date)
    return instant.astimezone(zone).date() if isinstance(instant, datetime) else instant


def to_datetime(value: Any, zone: ZoneInfo, *, midnight_utc_is_date: bool = True) -> datetime:
    """``value`` as an aware datetime; a calendar date becomes its midnight in ``zone``."""
    instant = to_instant(value, zone, midnight_utc_is_date=midnight_utc_is_date)
    if isinstance(instant, datetime):
        return instant
    return datetime.combine(instant, time(), tzinfo=zone)


# ---------------------------------------------------------------------------
# Field types used by the models below
# ---------------------------------------------------------------------------


def _constant(raw: Any) -> Any:
    if isinstance(raw, list):
        return [_scalar(item) for item in raw]
    return _scalar(raw)


def _scalar(raw: Any) -> Any:
    if isinstance(raw, float):
        raise problem(f"{raw!r} is a float; write numbers as TOML numbers (read as exact decimals) or text")
    if isinstance(raw, time) or not isinstance(raw, str | int | Decimal | date):
        raise problem(f"{show(raw)} is not a constant (text, number, boolean or date)")
    return raw


def _check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise problem(f'"{name}" is not an IANA time zone (like "Europe/Berlin")') from None
    return name


def _lookup_table(raw: Any) -> Any:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, Mapping):
        raise problem(f"expected a table of key = value, or the name of a [tables.NAME] table, got {show(raw)}")
    errors: list[InitErrorDetails] = []
    table: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            table[key] = _scalar(value)
        except PydanticCustomError as exc:
            errors.append(InitErrorDetails(type=exc, loc=(key,), input=value))
    if errors:
        raise ValidationError.from_exception_data("table", errors)
    return table


PathText = Annotated[str, AfterValidator(_check_path)]
"""A dotted path, checked at load."""
ZoneName = Annotated[str, AfterValidator(_check_zone)]
"""An IANA time-zone name, checked at load."""
Constant = Annotated[Any, PlainValidator(_constant)]
"""A TOML constant: text, integer, decimal, boolean, date or datetime (or a list of them)."""
Scalar = Annotated[Any, PlainValidator(_scalar)]
"""One TOML constant (not a list)."""
LookupTable = Annotated[Any, PlainValidator(_lookup_table)]
"""An inline ``{ key = value }`` table, or the name of a ``[tables.NAME]`` table."""

# ---------------------------------------------------------------------------
# Base classes and dispatch on the head key
# ---------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


class Node(BaseModel, abc.ABC):
    """A transform or condition: frozen, no unknown keys, named by its head key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]

    @abc.abstractmethod
    def apply(self, context: Context) -> Any:
        """Evaluate against ``context``; raises :class:`~syncd.core.errors.MappingError`."""

    def children(self) -> Iterator[Node]:
        """The transforms and conditions nested directly in this one."""
        for name in type(self).model_fields:
            yield from _nodes_in(getattr(self, name))

    def paths(self) -> Iterator[str]:
        """The paths this node reads itself (not its children's)."""
        return iter(())


def _nodes_in(value: Any) -> Iterator[Node]:
    if isinstance(value, Node):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _nodes_in(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _nodes_in(item)


def walk(node: Node) -> Iterator[Node]:
    """``node`` and every node nested in it, depth first."""
    yield node
    for child in node.children():
        yield from walk(child)


def describe(node: Node) -> str:
    """A node in words for messages: ``path "deal.properties.x"`` or ``lookup``."""
    if isinstance(node, PathRef):
        return f'path "{node.path}"'
    return node.name


def aliases(model: type[BaseModel]) -> list[str]:
    """The keys a table for ``model`` may hold (field aliases where they have one)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def validate_table(model: type[M], raw: Mapping[str, Any]) -> M:
    """Validate a TOML table as ``model``, reporting every problem at once.

    Unknown keys get a "did you mean" hint. Raises :class:`pydantic.ValidationError`
    whose messages are final and whose ``loc`` is the key path inside the table.
    """
    allowed = aliases(model)
    errors = [
        InitErrorDetails(type=problem(f'unknown key "{key}"{did_you_mean(key, allowed)}'), loc=(key,), input=value)
        for key, value in raw.items()
        if key not in allowed
    ]
    try:
        built = model.model_validate({key: value for key, value in raw.items() if key in allowed})
    except ValidationError as exc:
        errors.extend(_final(error) for error in exc.errors(include_url=False))
    else:
        if not errors:
            return built
    raise ValidationError.from_exception_data(model.__name__, errors)


def _final(error: Any) -> InitErrorDetails:
    loc = tuple(error["loc"])
    if error["type"] == "mapping":
        message = error["msg"]
    elif error["type"] == "missing":
        message = f'missing required key "{loc[-1]}"' if loc else "missing"
    else:
        message = f"{error['msg']} (got {show(error['input'])})"
    return InitErrorDetails(type=problem(message), loc=loc, input=error.get("input"))


def _head(raw: Mapping[str, Any], heads: Mapping[str, type[Node]], kind: str) -> type[Node]:
    named = [key for key in raw if key in heads]
    classes = {heads[key] for key in named}
    if len(classes) == 1:
        return classes.pop()
    if classes:
        listed = " and ".join(f'"{key}"' for key in named)
        raise problem(f"{listed} name different {kind}s; use one per table and nest the other inside it")
    options = {key for cls in set(heads.values()) for key in aliases(cls)} - set(heads)
    unknown = [key for key in raw if key not in options]
    expected = listing(set(heads), limit=30)
    if not unknown:
        raise problem(f"no {kind} named in this table; expected one of: {expected}")
    hint = did_you_mean(unknown[0], set(heads))
    raise problem(f'unknown {kind} "{unknown[0]}"' + (hint or f"; expected one of: {expected}"))


def _looks_like_path(text: str) -> bool:
    first = re.split(r"[.\[]", text, maxsplit=1)[0]
    if first not in (*ROOTS, "item") or text == first:
        return False
    try:
        parse_path(text)
    except ValueError:
        return False
    return True


def as_value(raw: Any) -> Transform:
    """A transform table, or a bare TOML value as a constant.

    A bare string that looks like a path (``"company.properties.name"``) is refused:
    write ``{ path = ... }`` for the path or ``{ const = ... }`` for the text.
    """
    if isinstance(raw, Transform):
        return raw
    if isinstance(raw, Mapping):
        built = validate_table(_head(raw, VALUE_HEADS, "transform"), raw)
        assert isinstance(built, Transform)
        return built
    if isinstance(raw, str) and _looks_like_path(raw):
        raise problem(f'"{raw}" looks like a path; write {{ path = "{raw}" }} (or {{ const = "{raw}" }} for the text)')
    return Const(const=_constant(raw))


def as_input(raw: Any) -> Transform:
    """A transform table, or a bare string as a path."""
    if isinstance(raw, Transform):
        return raw
    if isinstance(raw, str):
        return PathRef(path=_check_path(raw))
    if isinstance(raw, Mapping):
        return as_value(raw)
    raise problem(f"expected a path string or a transform table, got {show(raw)}")


def as_condition(raw: Any) -> Condition:
    """A condition table such as ``{ path = "...", equals = "..." }``."""
    if isinstance(raw, Condition):
        return raw
    if not isinstance(raw, Mapping):
        raise problem(f'expected a condition table such as {{ path = "...", equals = "..." }}, got {show(raw)}')
    built = validate_table(_head(raw, CONDITION_HEADS, "condition"), raw)
    assert isinstance(built, Condition)
    return built


Value = Annotated["Transform", PlainValidator(as_value)]
"""A value position: a transform table or a bare constant."""
Input = Annotated["Transform", PlainValidator(as_input)]
"""An input position: a transform table or a bare path string."""
Cond = Annotated["Condition", PlainValidator(as_condition)]
"""A condition position."""


class Transform(Node):
    """A value transform: computes one value from the record.

    Every transform takes ``default``: the value (or transform) used when it yields
    nothing.
    """

    default: Value | None = None

    def apply(self, context: Context) -> Any:
        """The value, or ``default`` when there is none; ``None`` means absent."""
        value = self.compute(context)
        if absent(value) and self.default is not None:
            return self.default.apply(context)
        return value

    @abc.abstractmethod
    def compute(self, context: Context) -> Any:
        """The value before ``default`` is applied."""

    def outputs(self, tables: Mapping[str, Mapping[str, Any]]) -> Iterator[Any]:
        """Constants this transform can return as they are, for checks at load."""
        if self.default is not None:
            yield from self.default.outputs(tables)

    def _input(self, source: Transform, context: Context) -> Any:
        value = source.apply(context)
        if isinstance(value, list | tuple):
            raise context.fail(f"{self.name}: {describe(source)} gives several values on {context.subject}")
        return value

    def _bad(self, context: Context, source: Transform, exc: ValueError) -> MappingError:
        return context.fail(f"{self.name}: {exc} (from {describe(source)} on {context.subject})")


class Condition(Node):
    """A test on the record, for ``when`` filters and the won rule."""

    @abc.abstractmethod
    def apply(self, context: Context) -> bool:
        """Whether the record passes."""


# ---------------------------------------------------------------------------
# Value transforms
# ---------------------------------------------------------------------------


class PathRef(Transform):
    """``{ path = "deal.properties.dealname" }``: the value at a path, absent if missing.

    Steps are dotted; ``line_items.0.properties.name`` indexes one item and
    ``line_items[*].properties.name`` gives the list of every item's value.
    """

    name: ClassVar[str] = "path"
    path: PathText

    def compute(self, context: Context) -> Any:
        """The value at the path."""
        return context.resolve(self.path)

    def paths(self) -> Iterator[str]:
        """The one path read."""
        yield self.path


class Const(Transform):
    """``{ const = "one_time" }`` (or just ``"one_time"``): always this value."""

    name: ClassVar[str] = "const"
    value: Constant = Field(alias="const")

    def compute(self, context: Context) -> Any:
        """The constant."""
        return self.value

    def outputs(self, tables: Mapping[str, Mapping[str, Any]]) -> Iterator[Any]:
        """The constant."""
        yield self.value


class Coalesce(Transform):
    """``{ coalesce = [ a, b, ... ] }``: the first option that has a value."""

    name: ClassVar[str] = "coalesce"
    options: list[Value] = Field(alias="coalesce", min_length=1)

    def compute(self, context: Context) -> Any:
        """The first present option's value, else absent."""
        for option in self.options:
            value = option.apply(context)
            if not absent(value):
                return value
        return None

    def outputs(self, tables: Mapping[str, Mapping[str, Any]]) -> Iterator[Any]:
        """Every option's constants and the default's."""
        for option in self.options:
            yield from option.outputs(tables)
        yield from super().outputs(tables)


class Lookup(Transform):
    """``{ lookup = "<input>", table = { key = value, ... }, default = ... }``.

    Maps the input's text to a value from the table (inline, or a ``[tables.NAME]``
    table named by a string). A key that is not in the table raises, unless a
    ``default`` is given: then the lookup never raises. ``ignore_case`` compares keys
    case-insensitively.
    """

    name: ClassVar[str] = "lookup"
    key: Input = Field(alias="lookup")
    table: LookupTable
    ignore_case: bool = False

    def compute(self, context: Context) -> Any:
        """The table's value for the input (for each item when the input is a list)."""
        key = self.key.apply(context)
        if absent(key):
            return None
        if isinstance(key, list | tuple):
            return [self._find(item, context) for item in key]
        return self._find(key, context)

    def entries(self, tables: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
        """The table's entries (a named table is read from ``tables``)."""
        if isinstance(self.table, str):
            return tables.get(self.table, {})
        result: Mapping[str, Any] = self.table
        return result

    def _find(self, key: Any, context: Context) -> Any:
        entries = self.entries(context.tables)
        text = as_text(key)
        for candidate, value in entries.items():
            if candidate == text or (self.ignore_case and candidate.casefold() == text.casefold()):
                return value
        if self.default is not None:
            return self.default.apply(context)
        raise context.fail(
            f"lookup: {show(text)} (from {describe(self.key)} on {context.subject}) is not in the table; "
            f"known keys: {listing(set(entries))}; add it or give the lookup a default"
        )

    def outputs(self, tables: Mapping[str, Mapping[str, Any]]) -> Iterator[Any]:
        """Every table value and the default's constants."""
        yield from self.entries(tables).values()
        yield from super().outputs(tables)


@lru_cache(maxsize=1024)
def parse_template(text: str) -> tuple[tuple[bool, str], ...]:
    """Split a template into ``(is_placeholder, text)`` parts.

    ``{name}`` is a placeholder; ``{{`` and ``}}`` are literal braces. Nothing in a
    placeholder is evaluated: it is a path or a name from ``values``.

    Raises:
        ValueError: a lone brace or an empty placeholder.
    """
    parts: list[tuple[bool, str]] = []
    position = 0
    for match in _TEMPLATE_TOKEN.finditer(text):
        if match.start() > position:
            parts.append((False, text[position : match.start()]))
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append((False, token[0]))
        elif match.group(1) is None:
            raise ValueError(f'template has a lone "{token}"; write "{token}{token}" for a literal brace')
        elif not match.group(1).strip():
            raise ValueError("template has an empty placeholder {}")
        else:
            parts.append((True, match.group(1).strip()))
    if position < len(text):
        parts.append((False, text[position:]))
    return tuple(parts)


class Template(Transform):
    """``{ template = "{deal.properties.dealname} ({record.id})", values = {...} }``.

    Each ``{placeholder}`` is a path, or a name from ``values`` (a table of
    transforms). If any placeholder has no value the whole template is absent, so a
    ``coalesce`` or ``default`` can take over. There is no format spec and nothing is
    executed; a value's own braces are copied as they are.
    """

    name: ClassVar[str] = "template"
    text: str = Field(alias="template")
    values: dict[str, Value] = {}

    @model_validator(mode="after")
    def _placeholders(self) -> Template:
        try:
            parts = parse_template(self.text)
        except ValueError as exc:
            raise problem(str(exc)) from None
        used = {text for is_placeholder, text in parts if is_placeholder}
        for name in used - set(self.values):
            _check_path(name)
        unused = set(self.values) - used
        if unused:
            raise problem(f"values {listing(unused)} are not used in the template")
        for name in self.values:
            if not _NAME.fullmatch(name):
                raise problem(f'value name "{name}" must be letters, digits and underscores')
        return self

    def compute(self, context: Context) -> Any:
        """The filled-in text, or absent when a placeholder has no value."""
        out: list[str] = []
        for is_placeholder, text in parse_template(self.text):
            if not is_placeholder:
                out.append(text)
                continue
            value = self.values[text].apply(context) if text in self.values else context.resolve(text)
            if absent(value):
                return None
            out.append(as_text(value))
        return "".join(out)

    def paths(self) -> Iterator[str]:
        """The placeholders that are paths."""
        for is_placeholder, text in parse_template(self.text):
            if is_placeholder and text not in self.values:
                yield text


class DateOf(Transform):
    """``{ date = "<input>", timezone = "...", format = "%d %B %Y" }``: a calendar date.

    Reads ISO dates, ISO datetimes and millisecond timestamps. A datetime becomes its
    date in ``timezone`` (default: the client's); a date, or a value at exactly midnight
    UTC (HubSpot's date properties), stays the date it names unless
    ``midnight_utc_is_date = false``. ``format`` (strftime codes) turns it into text.
    """

    name: ClassVar[str] = "date"
    source: Input = Field(alias="date")
    timezone: ZoneName | None = None
    format: str | None = None
    midnight_utc_is_date: bool = True

    def compute(self, context: Context) -> Any:
        """The date (or its text when ``format`` is given)."""
        raw = self._input(self.source, context)
        if absent(raw):
            return None
        zone = ZoneInfo(self.timezone) if self.timezone else context.zone()
        try:
            day = to_date(raw, zone, midnight_utc_is_date=self.midnight_utc_is_date)
        except ValueError as exc:
            raise self._bad(context, self.source, exc) from None
        return day.strftime(self.format) if self.format else day


class DateTimeOf(Transform):
    """``{ datetime = "<input>", timezone = "..." }``: an aware datetime.

    A value without an offset is read in ``timezone`` (default: the client's); a
    calendar date becomes its midnight there.
    """

    name: ClassVar[str] = "datetime"
    source: Input = Field(alias="datetime")
    timezone: ZoneName | None = None
    midnight_utc_is_date: bool = True

    def compute(self, context: Context) -> Any:
        """The aware datetime."""
        raw = self._input(self.source, context)
        if absent(raw):
            return None
        zone = ZoneInfo(self.timezone) if self.timezone else context.zone()
        try:
            return to_datetime(raw, zone, midnight_utc_is_date=self.midnight_utc_is_date)
        except ValueError as exc:
            raise self._bad(context, self.source, exc) from None


class Money(Transform):
    """``{ money = "<input>", currency = ..., round = false, minor_units = false }``.

    Parses text straight into an exact Decimal (a float is refused). ``currency``
    (default: the engagement's or client's) is checked against ISO 4217; ``round``
    rounds half-up to its minor units; ``minor_units`` reads an integer count of them
    (``150000`` cents is ``1500.00`` USD). Unit prices stay unrounded: rounding happens
    once, at the line.
    """

    name: ClassVar[str] = "money"
    source: Input = Field(alias="money")
    currency: Value | None = None
    round: bool = False
    minor_units: bool = False

    def compute(self, context: Context) -> Any:
        """The amount as a Decimal."""
        raw = self._input(self.source, context)
        if absent(raw):
            return None
        code = self._currency(context)
        try:
            amount = from_minor(to_integer(raw), code) if self.minor_units else to_decimal(raw)
            return round_money(amount, code) if self.round else amount
        except ValueError as exc:
            raise self._bad(context, self.source, exc) from None

    def _currency(self, context: Context) -> str:
        code = self.currency.apply(context) if self.currency is not None else context.currency
        if absent(code):
            raise context.fail(f"money: no currency for {describe(self.source)} on {context.subject}")
        try:
            return check_currency(as_text(code))
        except ValueError as exc:
            raise context.fail(f"money: {exc} on {context.subject}") from None


class _Parsed(Transform):
    """A transform that parses its input with one function (``parse``); absent stays absent."""

    parse: ClassVar[Callable[[Any], Any]]
    source: Input

    def compute(self, context: Context) -> Any:
        """The parsed value, or ``None`` when the input is absent."""
        raw = self._input(self.source, context)
        if absent(raw):
            return None
        try:
            return type(self).parse(raw)
        except ValueError as exc:
            raise self._bad(context, self.source, exc) from None


class Number(_Parsed):
    """``{ number = "<input>" }``: an exact Decimal from text like ``"2.5"``."""

    name: ClassVar[str] = "number"
    parse: ClassVar[Callable[[Any], Any]] = staticmethod(to_decimal)
    source: Input = Field(alias="number")


class Integer(_Parsed):
    """``{ integer = "<input>" }``: a whole number from text like ``"30"``."""

    name: ClassVar[str] = "integer"
    parse: ClassVar[Callable[[Any], Any]] = staticmethod(to_integer)
    source: Input = Field(alias="integer")


class Boolean(_Parsed):
    """``{ boolean = "<input>" }``: true/false, yes/no, y/n, 1/0, on/off (any case)."""

    name: ClassVar[str] = "boolean"
    parse: ClassVar[Callable[[Any], Any]] = staticmethod(to_bool)
    source: Input = Field(alias="boolean")


class Split(Transform):
    """``{ split = "<input>", sep = ";", index = 0 }``: text cut into trimmed parts.

    Empty parts are dropped. Without ``index`` the result is the list of parts; with
    it, the one part at that position (absent when there are fewer).
    """

    name: ClassVar[str] = "split"
    source: Input = Field(alias="split")
    sep: str = Field(default=",", min_length=1)
    index: int | None = None

    def compute(self, context: Context) -> Any:
        """The parts, or one of them."""
        raw = self._input(self.source, context)
        if absent(raw):
            return None
        parts = [part.strip() for part in as_text(raw).split(self.sep) if part.strip()]
        if self.index is None:
            return parts
        return parts[self.index] if -len(parts) <= self.index < len(parts) else None


def _join_parts(raw: Any) -> Any:
    if isinstance(raw, list):
        return [as_value(item) for item in raw]
    return as_input(raw)


class Join(Transform):
    """``{ join = [ a, b, ... ], sep = " " }`` or ``{ join = "<list input>" }``.

    Joins the parts that have a value (lists are flattened) with ``sep``; absent when
    none has.
    """

    name: ClassVar[str] = "join"
    parts: Annotated[Any, PlainValidator(_join_parts)] = Field(alias="join")
    sep: str = ", "

    def compute(self, context: Context) -> Any:
        """The joined text."""
        sources = self.parts if isinstance(self.parts, list) else [self.parts]
        texts: list[str] = []
        for source in sources:
            value = source.apply(context)
            items = value if isinstance(value, list | tuple) else [value]
            texts.extend(as_text(item) for item in items if not absent(item))
        return self.sep.join(texts) if texts else None


# ---------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------


def _each(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [item for item in value if not absent(item)]
    return [] if absent(value) else [value]


def _comparable(actual: Any, expected: Any, zone: ZoneInfo) -> Any:
    """``actual`` in ``expected``'s kind, so they compare; raises ValueError."""
    if isinstance(expected, bool):
        return to_bool(actual)
    if isinstance(expected, int | Decimal):
        return to_decimal(actual)
    if isinstance(expected, datetime):
        return to_datetime(actual, zone)
    if isinstance(expected, date):
        return to_date(actual, zone)
    return as_text(actual)


def _bound(expected: Any, zone: ZoneInfo) -> Any:
    if isinstance(expected, datetime) and expected.tzinfo is None:
        return expected.replace(tzinfo=zone)
    return expected


def _equal(actual: Any, expected: Any, zone: ZoneInfo) -> bool:
    try:
        return bool(_comparable(actual, expected, zone) == _bound(expected, zone))
    except ValueError:
        return False


class Subject(Condition):
    """A condition on one value: ``path = "..."`` or ``value = <transform>``."""

    path: PathText | None = None
    value: Value | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> Subject:
        if (self.path is None) == (self.value is None):
            raise problem('give exactly one of "path" or "value" to say what is tested')
        return self

    def subject(self, context: Context) -> Any:
        """The tested value."""
        if self.value is not None:
            return self.value.apply(context)
        return context.resolve(self.path or "")

    def paths(self) -> Iterator[str]:
        """The tested path, if it is one."""
        if self.path is not None:
            yield self.path


class Equals(Subject):
    """``{ path = "...", equals = "default" }``: the value equals a constant.

    Compared as the constant's kind: ``equals = true`` reads "true"/"yes"/"1",
    ``equals = 1500`` compares numbers, a TOML date compares dates; text compares
    exactly. For a list (``[*]``) any item may match.
    """

    name: ClassVar[str] = "equals"
    expected: Scalar = Field(alias="equals")

    def apply(self, context: Context) -> bool:
        """Whether some value equals the constant."""
        zone = context.zone()
        return any(_equal(item, self.expected, zone) for item in _each(self.subject(context)))


class In(Subject):
    """``{ path = "...", in = ["closedwon", "contractsigned"] }``: equals one of them."""

    name: ClassVar[str] = "in"
    options: list[Scalar] = Field(alias="in", min_length=1)

    def apply(self, context: Context) -> bool:
        """Whether some value equals one of the options."""
        zone = context.zone()
        items = _each(self.subject(context))
        return any(_equal(item, option, zone) for item in items for option in self.options)


class Exists(Subject):
    """``{ path = "...", exists = true }``: the value is present (or, with false, absent)."""

    name: ClassVar[str] = "exists"
    exists: bool = True

    def apply(self, context: Context) -> bool:
        """Whether presence matches ``exists``."""
        return absent(self.subject(context)) is not self.exists


class Compare(Subject):
    """``{ path = "...", gt = 1000 }`` with ``gt``, ``ge``, ``lt``, ``le`` (any together).

    Bounds are numbers, dates or text; the value is read as the bound's kind and a
    value that cannot be raises. An absent value fails the test.
    """

    name: ClassVar[str] = "compare"
    gt: Scalar | None = None
    ge: Scalar | None = None
    lt: Scalar | None = None
    le: Scalar | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Compare:
        bounds = [bound for bound in (self.gt, self.ge, self.lt, self.le) if bound is not None]
        if any(isinstance(bound, bool) for bound in bounds):
            raise problem("gt/ge/lt/le take numbers, dates or text, not booleans")
        return self

    def apply(self, context: Context) -> bool:
        """Whether every value is within all the bounds (and there is one)."""
        items = _each(self.subject(context))
        return bool(items) and all(self._within(item, context) for item in items)

    def _within(self, actual: Any, context: Context) -> bool:
        zone = context.zone()
        checks = ((self.gt, operator.gt), (self.ge, operator.ge), (self.lt, operator.lt), (self.le, operator.le))
        for bound, holds in checks:
            if bound is None:
                continue
            try:
                value = _comparable(actual, bound, zone)
            except ValueError as exc:
                raise context.fail(f"compare: {exc}, so it cannot be compared with {show(bound)}") from None
            if not holds(value, _bound(bound, zone)):
                return False
        return True


class Not(Condition):
    """``{ not = <condition> }``: the condition fails."""

    name: ClassVar[str] = "not"
    inner: Cond = Field(alias="not")

    def apply(self, context: Context) -> bool:
        """The negation."""
        return not self.inner.apply(context)


class All(Condition):
    """``{ all = [ ... ] }``: every condition holds."""

    name: ClassVar[str] = "all"
    conditions: list[Cond] = Field(alias="all", min_length=1)

    def apply(self, context: Context) -> bool:
        """Whether all hold."""
        return all(condition.apply(context) for condition in self.conditions)


class AnyOf(Condition):
    """``{ any = [ ... ] }``: at least one condition holds."""

    name: ClassVar[str] = "any"
    conditions: list[Cond] = Field(alias="any", min_length=1)

    def apply(self, context: Context) -> bool:
        """Whether one holds."""
        return any(condition.apply(context) for condition in self.conditions)


VALUE_HEADS: Mapping[str, type[Node]] = {
    cls.name: cls
    for cls in (
        PathRef,
        Const,
        Coalesce,
        Lookup,
        Template,
        DateOf,
        DateTimeOf,
        Money,
        Number,
        Integer,
        Boolean,
        Split,
        Join,
    )
}
"""Value transforms by head key."""

CONDITION_HEADS: Mapping[str, type[Node]] = {
    "equals": Equals,
    "in": In,
    "exists": Exists,
    "gt": Compare,
    "ge": Compare,
    "lt": Compare,
    "le": Compare,
    "not": Not,
    "all": All,
    "any": AnyOf,
}
"""Conditions by operator key."""

_MODELS: list[type[BaseModel]] = [Transform, *VALUE_HEADS.values(), Subject, *CONDITION_HEADS.values()]
for _model in _MODELS:
    _model.model_rebuild()
