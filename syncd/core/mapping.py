"""Pipeline mapping files: load, validate and apply them (docs/architecture.md).

A mapping file (``mappings/*.toml``, format in ``mappings/README.md``) says which CRM
records a pipeline takes, when a deal counts as won, and how a record becomes the
canonical :class:`~syncd.core.interfaces.Client` and :class:`~syncd.core.interfaces.Engagement`::

    [pipeline]        source, when (filter), won (rule), won_at, billing_contact_label
    [client]          one key per Client field, each a transform (syncd.core.transforms)
    [client.address]  / [client.billing_contact]: the nested models, the same way
    [engagement]      one key per Engagement field
    [engagement.lines]  one invoice line per line item (``item`` is the line item)
    [engagement.lines.otherwise]  the one line of a deal whose ``each`` yields none
    [invoice]         status, send, line_amount_types
    [accounts]        account codes of lines without their own: default, by_line_kind,
                      by_engagement_type (:func:`syncd.core.billing.with_ledger_codes`)
    [tax_types]       tax types likewise
    [tracking]        tracking category = option (a transform), on every line
    [tables.NAME]     named lookup tables

The field tables are generic: a key is valid when the canonical model has a field of
that name, and the value is checked against the field's type at load. A field added to
the model is mapped by adding a key, with no code here.

:func:`load_mapping` reports every problem in the file at once, each as
``file:line [table].key: message``; applying a mapping to a record raises
:class:`~syncd.core.errors.MappingError` whose ``place`` is ``file:line [table].key`` and whose
message names the path and the record.
"""

from __future__ import annotations

import bisect
import re
import tomllib
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from syncd.core.billing import CodeRule, LedgerRules
from syncd.core.errors import MappingError
from syncd.core.interfaces import (
    LINE_KINDS,
    Client,
    CodeKind,
    Engagement,
    EngagementType,
    InvoiceLine,
    Model,
    SourceRecord,
    TrackingOption,
)
from syncd.core.money import check_currency
from syncd.core.transforms import (
    ALL,
    ROOTS,
    Coalesce,
    Cond,
    Condition,
    Const,
    Context,
    Lookup,
    LookupTable,
    Money,
    Node,
    Transform,
    Value,
    absent,
    as_text,
    did_you_mean,
    listing,
    parse_path,
    problem,
    show,
    to_date,
    to_datetime,
    to_decimal,
    validate_table,
    walk,
)

KeyPath = tuple[str | int, ...]

# ---------------------------------------------------------------------------
# Public values
# ---------------------------------------------------------------------------


class MappingDefaults(Model):
    """Values a mapping falls back on when a record has none (from the daemon config).

    Attributes:
        timezone: IANA zone for clients whose mapping gives none.
        currency: ISO 4217 code for clients whose mapping gives none.
        payment_terms_days: days from issue to due date when the mapping gives none.
    """

    timezone: str = "UTC"
    currency: str = "USD"
    payment_terms_days: int = Field(default=30, ge=0)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _zone_name(value)


class InvoiceOptions(Model):
    """The ``[invoice]`` table: how invoices of this pipeline are created.

    Attributes:
        status: create invoices as drafts, or approved ("authorised") at the tool.
        send: email each invoice to the billing contact after creating it.
        line_amount_types: whether line unit prices exclude tax, include it, or have none
            (Xero's ``LineAmountTypes`` values).
        require_po: an invoice without a PO number is not sent: it is held as an
            outcome that needs attention until the deal or the client has one.
    """

    status: Literal["draft", "authorised"] = "authorised"
    send: bool = False
    line_amount_types: Literal["Exclusive", "Inclusive", "NoTax"] = "Exclusive"
    require_po: bool = False


class LedgerTable(Model):
    """The ``[accounts]`` or ``[tax_types]`` table: codes for lines that carry none of their own.

    Attributes:
        default: the code of every line nothing more specific gives one.
        by_line_kind: by what made the line (``period``, ``hours``, ``deposit`` ...:
            :data:`~syncd.core.interfaces.LineKind`).
        by_engagement_type: by the engagement's type (``retainer``, ``hourly`` ...).
    """

    default: str | None = Field(default=None, min_length=1)
    by_line_kind: dict[str, str] = Field(default_factory=dict)
    by_engagement_type: dict[str, str] = Field(default_factory=dict)

    @field_validator("by_line_kind")
    @classmethod
    def _line_kinds(cls, value: dict[str, str]) -> dict[str, str]:
        return _known_keys(value, LINE_KINDS, "line kind")

    @field_validator("by_engagement_type")
    @classmethod
    def _engagement_types(cls, value: dict[str, str]) -> dict[str, str]:
        return _known_keys(value, tuple(EngagementType), "engagement type")

    def rule(self) -> CodeRule:
        """The table as a :class:`~syncd.core.billing.CodeRule`."""
        return CodeRule(
            default=self.default, by_line_kind=dict(self.by_line_kind), by_engagement_type=dict(self.by_engagement_type)
        )


def _known_keys(value: dict[str, str], known: Sequence[str], what: str) -> dict[str, str]:
    for key, code in value.items():
        if key not in known:
            hint = did_you_mean(key, list(known))
            raise problem(f'"{key}" is not a known {what}{hint}; {what}s: {listing(list(known))}')
        if not code:
            raise problem(f'the code for "{key}" is empty')
    return value


class MappedDeal(Model):
    """What one CRM deal maps to.

    Attributes:
        client: the client it bills.
        engagement: how it bills (its ``won_at`` is the same as below).
        won_at: when the deal was won; ``None`` while it is not.
    """

    client: Client
    engagement: Engagement
    won_at: AwareDatetime | None


@dataclass(frozen=True, kw_only=True)
class SourceRead:
    """One vendor property a mapping reads, and where.

    Attributes:
        object_type: ``deal``, ``company``, ``contact`` or ``line_item``.
        name: the property's internal name at the CRM.
        place: ``file:line [table].key`` of the value that reads it.
    """

    object_type: str
    name: str
    place: str


@dataclass(frozen=True, kw_only=True)
class TargetCode:
    """A code at the invoicing tool that a mapping can produce as it is written, and where.

    Attributes:
        kind: ``account_code``, ``tax_type``, ``currency`` or ``item_code``.
        code: the code as it would be sent.
        place: ``file:line [table].key`` of the constant, default or lookup-table entry.
    """

    kind: CodeKind
    code: str
    place: str


# ---------------------------------------------------------------------------
# Field checks beyond the model's types
# ---------------------------------------------------------------------------


def _zone_name(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f'"{value}" is not an IANA time zone (like "Europe/Berlin")') from None
    return value


def _not_negative(value: Any) -> Any:
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _day_of_month(value: int) -> int:
    if not 1 <= value <= 31:
        raise ValueError(f"{value} is not a day of the month (1-31; 31 means month end)")
    return value


_FIELD_CHECKS: Mapping[str, Any] = {
    "currency": check_currency,
    "timezone": _zone_name,
    "payment_terms_days": _not_negative,
    "cap_hours": _not_negative,
    "anchor_day": _day_of_month,
}


@dataclass(frozen=True)
class _ModelSpec:
    """How syncd treats a canonical model's fields in a mapping table.

    Attributes:
        computed: fields syncd sets itself; mapping them is an error.
        fallback: fields that may be left out: syncd fills them (defaults, the client).
    """

    computed: frozenset[str] = frozenset()
    fallback: frozenset[str] = frozenset()


_SPECS: Mapping[type[BaseModel], _ModelSpec] = {
    Client: _ModelSpec(
        computed=frozenset({"key", "external_ids"}),
        fallback=frozenset({"timezone", "currency", "payment_terms_days"}),
    ),
    Engagement: _ModelSpec(
        computed=frozenset({"key", "client_key", "won_at", "won_recorded_at", "source_version", "tracking"}),
        fallback=frozenset({"currency"}),
    ),
    InvoiceLine: _ModelSpec(computed=frozenset({"kind", "tracking"})),
}
_FIRST = ("timezone", "currency")  # mapped first: later fields read dates and money in them
_RECORD_KEYS = ("id", "version", "connection", "object_type", "modified_at")
_OBJECT_KEYS: Mapping[str, tuple[str, ...]] = {
    "deal": ("id", "properties"),
    "company": ("id", "properties"),
    "contact": ("id", "properties", "primary", "labels"),
    "line_item": ("id", "properties"),
}
_ROOT_KINDS: Mapping[str, str] = {
    "deal": "deal",
    "company": "company",
    "contacts": "contact",
    "contact": "contact",
    "line_items": "line_item",
}
_LIST_ROOTS = ("contacts", "line_items")
_EACH_DEFAULTS: Mapping[str, str] = {"lines": "line_items"}  # a repeated table's list when it names none
_TOP = ("pipeline", "client", "engagement", "invoice", "accounts", "tax_types", "tracking", "tables")
# Xero allows two active tracking categories per organisation, so a line names at most two
# (Xero Business Community, "you can only have two active at any other time":
# https://community.xero.com/business/discussion/54766610).
TRACKING_MAX = 2
_LEDGER_TABLES: Mapping[str, CodeKind] = {"accounts": "account_code", "tax_types": "tax_type"}
# Line kinds each engagement type makes itself (syncd/core/billing.py, syncd/core/proration.py);
# ``one_time`` engagements bill mapped lines, and deposits only with deposit_percent.
_GENERATED: Mapping[str, tuple[str, ...]] = {
    "retainer": ("period", "proration", "adjustment", "credit"),
    "subscription": ("period", "proration", "adjustment", "credit"),
    "hourly": ("hours",),
    "milestone": ("milestone", "deposit", "deduction"),
    "one_time": (),
}
_OTHERWISE = "otherwise"
_CODE_FIELDS: Mapping[str, CodeKind] = {
    "account_code": "account_code",
    "tax_type": "tax_type",
    "currency": "currency",
    "item_code": "item_code",
}
_VALUE: TypeAdapter[Transform] = TypeAdapter(Value)
_CONDITION: TypeAdapter[Condition] = TypeAdapter(Cond)
_TABLE: TypeAdapter[Mapping[str, Any]] = TypeAdapter(LookupTable)


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _base_type(annotation: Any) -> Any:
    """The one non-None type of ``annotation`` among datetime, date, Decimal, str."""
    options = [arg for arg in get_args(annotation) if arg is not type(None)] if _is_union(annotation) else [annotation]
    if len(options) != 1:
        return None
    base = options[0]
    if get_origin(base) is Annotated:
        base = get_args(base)[0]
    if base is AwareDatetime:
        return datetime
    return next((kind for kind in (datetime, date, Decimal, str) if base is kind), None)


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError(f"{value!r} is a float; numbers and money must come as text or integers")
    if isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item)


# ---------------------------------------------------------------------------
# Compiled rules
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _FieldRule:
    """One mapped field: its transform, where it is written, and its type."""

    name: str
    place: str
    transform: Transform
    adapter: TypeAdapter[Any]
    annotation: Any
    required: bool

    def value(self, context: Context) -> Any:
        """The field's value for the record, typed; ``None`` when absent."""
        raw = self.transform.apply(context.derive(place=self.place))
        if absent(raw):
            return None
        try:
            return self.coerce(raw, context.zone())
        except ValueError as exc:
            raise MappingError(f"{exc} on {context.subject}", place=self.place) from None

    def coerce(self, value: Any, zone: ZoneInfo) -> Any:
        """``value`` as the field's type; raises ValueError naming the field."""
        _refuse_floats(value)
        target = _base_type(self.annotation)
        try:
            if target is Decimal:
                value = to_decimal(value)
            elif target is datetime:
                value = to_datetime(value, zone)
            elif target is date:
                value = to_date(value, zone)
            elif target is str and isinstance(value, int | Decimal) and not isinstance(value, bool):
                value = as_text(value)
            result = self.adapter.validate_python(value)
            check = _FIELD_CHECKS.get(self.name)
            return check(result) if check is not None and result is not None else result
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]["msg"]
            raise ValueError(f"{show(value)} is not a valid {self.name}: {reason}") from None
        except ValueError as exc:
            raise ValueError(f"{show(value)} is not a valid {self.name}: {exc}") from None

    def missing(self, context: Context) -> MappingError:
        """The error for a required field without a value, naming each path tried."""
        tried = [text for node in walk(self.transform) for text in node.paths()]
        reasons = [context.explain(text) for text in tried if absent(context.resolve(text))]
        if len(reasons) == 1:
            return MappingError(reasons[0], place=self.place)
        if reasons:
            return MappingError(f"no value for {self.name}: " + " | ".join(reasons), place=self.place)
        return MappingError(f"no value for {self.name} on {context.subject}", place=self.place)


def _narrow(context: Context, name: str, value: Any) -> Context:
    if name == "timezone":
        return context.derive(timezone=value)
    if name == "currency":
        return context.derive(currency=value)
    return context


@dataclass(frozen=True, kw_only=True)
class _SectionRule:
    """A mapped table for one canonical model (``[client]``, ``[client.address]``...)."""

    model: type[BaseModel]
    place: str
    fields: tuple[_FieldRule, ...]
    order: tuple[str, ...]
    parts: tuple[tuple[str, _SectionRule], ...]
    repeats: tuple[_RepeatRule, ...]

    def rule(self, name: str) -> _FieldRule | None:
        """The rule for field ``name``, if the file maps it."""
        return next((rule for rule in self.fields if rule.name == name), None)

    def build(self, context: Context, fallbacks: Mapping[str, Any]) -> dict[str, Any]:
        """The model's field values for the record (without computed fields)."""
        values: dict[str, Any] = {}
        for name in self.order:
            rule = self.rule(name)
            value = rule.value(context) if rule is not None else None
            if value is None:
                value = fallbacks.get(name)
            if value is None:
                if rule is not None and rule.required:
                    raise rule.missing(context)
                continue
            values[name] = value
            context = _narrow(context, name, value)
        for name, part in self.parts:
            part_values = part.build(context, {})
            if part_values:
                values[name] = part.construct(part_values, context)
        for repeat in self.repeats:
            values[repeat.name] = repeat.build(context)
        return values

    def construct(self, values: Mapping[str, Any], context: Context) -> Any:
        """The model from ``values``; a model-level rejection is a MappingError here."""
        try:
            return self.model(**values)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            where = ".".join(str(step) for step in error["loc"])
            raise MappingError(
                f"{self.model.__name__} for {context.subject} is invalid: {where}: {error['msg']}", place=self.place
            ) from None


@dataclass(frozen=True, kw_only=True)
class _RepeatRule:
    """A repeated table (``[engagement.lines]``): one model per item of a list."""

    name: str
    place: str
    each: str
    when: Condition | None
    section: _SectionRule
    otherwise: _SectionRule | None = None

    def build(self, context: Context) -> tuple[Any, ...]:
        """One model per item that passes ``when``; else the ``otherwise`` one, if mapped."""
        built = self._each(context)
        if built or self.otherwise is None:
            return built
        values = self.otherwise.build(context, {})
        if "kind" in self.otherwise.model.model_fields:
            values["kind"] = "deal"
        return (self.otherwise.construct(values, context),)

    def _each(self, context: Context) -> tuple[Any, ...]:
        items = context.resolve(self.each)
        if items is None:
            return ()
        if not isinstance(items, list | tuple):
            raise MappingError(f'"{self.each}" is not a list on {context.subject}', place=self.place)
        built = []
        for index, item in enumerate(items):
            item_id = item.get("id") if isinstance(item, Mapping) else None
            subject = f"item {item_id if item_id is not None else index} of {self.each} on {context.subject}"
            scoped = context.derive(roots={**context.roots, "item": item}, subject=subject)
            if self.when is not None and not self.when.apply(scoped.derive(place=self.place)):
                continue
            built.append(self.section.construct(self.section.build(scoped, {}), scoped))
        return tuple(built)


@dataclass(frozen=True, kw_only=True)
class _Rules:
    """Everything compiled from a mapping file beside its public attributes."""

    source: str
    when: Condition | None
    when_place: str
    won: Condition
    won_place: str
    won_at: _FieldRule
    contact_label: str | None
    client: _SectionRule
    engagement: _SectionRule
    tables: Mapping[str, Mapping[str, Any]]
    tracking: tuple[_FieldRule, ...] = ()


class _PipelineTable(BaseModel):
    """The ``[pipeline]`` table as written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["deal"] = "deal"
    when: Cond | None = None
    won: Cond
    won_at: Value
    billing_contact_label: str | None = None


# ---------------------------------------------------------------------------
# The pipeline mapping
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PipelineMapping:
    """One loaded, validated mapping file.

    Attributes:
        path: the file it was loaded from.
        source_properties: per object type (``deal``, ``company``, ``contact``,
            ``line_item``), the vendor properties the mapping reads, sorted; pass them to
            :meth:`~syncd.core.interfaces.Crm.fetch_deal`.
        invoice: the ``[invoice]`` options.
        rules: the compiled tables (internal).
        source_reads: every vendor property read, once per place that reads it, in
            file order (the drift guard names the place of a property that is gone).
        target_codes: every account code, tax type, currency and item code the mapping
            can produce as written (constants, defaults, lookup-table values, and the
            ``[accounts]`` and ``[tax_types]`` tables), once per place, in file order.
            Codes read from the record are not known until then.
        ledger: the account codes and tax types of lines without their own
            (:func:`syncd.core.billing.with_ledger_codes`).
    """

    path: Path
    source_properties: Mapping[str, tuple[str, ...]]
    invoice: InvoiceOptions
    rules: _Rules = field(repr=False)
    source_reads: tuple[SourceRead, ...] = ()
    target_codes: tuple[TargetCode, ...] = ()
    ledger: LedgerRules = field(default_factory=LedgerRules)

    def client_property(self, name: str) -> str | None:
        """The company property ``[client].name`` is read from first, for writing it back.

        The first ``company.properties.X`` path the field's transform reads (a ``coalesce``
        is read left to right), or ``None`` when it reads no company property.
        """
        rule = self.rules.client.rule(name)
        if rule is None:
            return None
        prefix = "company.properties."
        for path in _paths_of(rule.transform):
            if path.startswith(prefix) and "." not in path[len(prefix) :]:
                return path[len(prefix) :]
        return None

    def generated_line_kinds(self) -> list[tuple[str, str]]:
        """``(engagement type, line kind)`` of every line this mapping can make without a code of its own.

        These are the lines whose account code comes from ``[client]``, ``[accounts]``
        and ``[tax_types]`` (checked at load to always get one).
        """
        return _line_kinds_made(self.rules.engagement, self.rules.tables)

    def selects(self, record: SourceRecord) -> bool:
        """Whether this pipeline takes ``record`` (its source kind and ``when`` filter).

        Raises:
            MappingError: the filter cannot be evaluated on the record.
        """
        if record.object_type != self.rules.source:
            return False
        if self.rules.when is None:
            return True
        context = self._zoned(record, MappingDefaults())
        return self.rules.when.apply(context.derive(place=self.rules.when_place))

    def won_at(self, record: SourceRecord, *, defaults: MappingDefaults | None = None) -> datetime | None:
        """When the deal was won, or ``None`` while the won rule does not hold.

        A won time without an offset (or a bare date) is read in the client's time zone
        as mapped, else ``defaults.timezone`` (UTC when no defaults are given).

        Raises:
            MappingError: the deal is won but has no won time, or it cannot be read.
        """
        return self._won_at(self._zoned(record, defaults or MappingDefaults()))

    def map_deal(self, record: SourceRecord, *, defaults: MappingDefaults) -> MappedDeal:
        """Map a CRM deal record to its client, engagement and won time.

        Raises:
            MappingError: a required field has no value, or a value does not fit its
                field; ``place`` is ``file:line [table].key`` and the message names the
                path and the record.
        """
        context = self._zoned(record, defaults)
        won_at = self._won_at(context)
        client_values = self.rules.client.build(context, defaults.model_dump())
        client_values["key"] = _client_key(record, context.roots)
        client: Client = self.rules.client.construct(client_values, context)
        scoped = context.derive(timezone=client.timezone, currency=client.currency)
        values = self.rules.engagement.build(scoped, {"currency": client.currency})
        values.update(
            key=f"{record.connection}:deal:{_object_id(context.roots['deal']) or record.object_id}",
            client_key=client.key,
            won_at=won_at,
            source_version=record.version,
            tracking=self._tracking(scoped),
        )
        engagement: Engagement = self.rules.engagement.construct(values, scoped)
        return MappedDeal(client=client, engagement=engagement, won_at=won_at)

    def _tracking(self, context: Context) -> tuple[TrackingOption, ...]:
        found = ((rule.name, rule.value(context)) for rule in self.rules.tracking)
        return tuple(TrackingOption(name=name, option=option) for name, option in found if option is not None)

    def _won_at(self, context: Context) -> datetime | None:
        if not self.rules.won.apply(context.derive(place=self.rules.won_place)):
            return None
        value = self.rules.won_at.value(context)
        if value is None:
            raise self.rules.won_at.missing(context)
        won: datetime = value
        return won

    def _zoned(self, record: SourceRecord, defaults: MappingDefaults) -> Context:
        context = self._context(record, defaults)
        rule = self.rules.client.rule("timezone")
        zone = rule.value(context) if rule is not None else None
        return context.derive(timezone=zone or defaults.timezone)

    def _context(self, record: SourceRecord, defaults: MappingDefaults) -> Context:
        data = record.data
        contacts = list(data.get("contacts") or [])
        roots = {
            "deal": data.get("deal"),
            "company": data.get("company"),
            "contacts": contacts,
            "line_items": list(data.get("line_items") or []),
            "contact": _billing_contact(contacts, self.rules.contact_label),
            "record": {
                "id": record.object_id,
                "version": record.version,
                "connection": record.connection,
                "object_type": record.object_type,
                "modified_at": record.modified_at,
            },
            "defaults": defaults.model_dump(),
        }
        return Context(
            roots=roots,
            subject=f"{record.object_type} {record.object_id}",
            timezone=defaults.timezone,
            currency=defaults.currency,
            tables=self.rules.tables,
        )


def _paths_of(node: Node) -> Iterator[str]:
    """Every path ``node`` and the transforms nested in it read, depth first, in order."""
    yield from node.paths()
    for child in node.children():
        yield from _paths_of(child)


def _object_id(value: Any) -> str | None:
    if isinstance(value, Mapping) and not absent(value.get("id")):
        return as_text(value["id"])
    return None


def _billing_contact(contacts: Sequence[Any], label: str | None) -> Any:
    """The contact carrying ``label``, else the primary one, else the first."""
    people = [contact for contact in contacts if isinstance(contact, Mapping)]
    if label is not None:
        labelled = [person for person in people if label in (person.get("labels") or ())]
        if labelled:
            return labelled[0]
    primary = [person for person in people if person.get("primary") is True]
    chosen = primary or people
    return chosen[0] if chosen else None


def _client_key(record: SourceRecord, roots: Mapping[str, Any]) -> str:
    """``conn:company:id``, else ``conn:contact:id`` (billing contact), else ``conn:deal:id``."""
    for root in ("company", "contact", "deal"):
        found = _object_id(roots[root])
        if found is not None:
            return f"{record.connection}:{root}:{found}"
    return f"{record.connection}:deal:{record.object_id}"


# ---------------------------------------------------------------------------
# Line numbers (tomllib keeps none)
# ---------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}#\r\n]*")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


class _KeyLines:
    """The line each key of a TOML text is on, by key path (``("client", "currency")``).

    A small scanner over text that tomllib has already accepted: it reads table
    headers, keys, inline tables and arrays (array items get their index) and skips
    strings and scalars.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [index for index, char in enumerate(text) if char == "\n"]
        self.lines: dict[KeyPath, int] = {}
        self.arrays: dict[KeyPath, int] = {}

    def scan(self) -> dict[KeyPath, int]:
        """Every key path with its line; best effort if the text surprises the scanner."""
        table: KeyPath = ()
        try:
            while self._skip(newlines=True):
                if self.text.startswith("[", self.pos):
                    table = self._header()
                else:
                    self._keyval(table)
        except (ValueError, IndexError):
            return self.lines
        return self.lines

    def _line(self) -> int:
        return bisect.bisect_left(self.newlines, self.pos) + 1

    def _skip(self, *, newlines: bool) -> bool:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return True
        return False

    def _header(self) -> KeyPath:
        line = self._line()
        brackets = 2 if self.text.startswith("[[", self.pos) else 1
        self.pos += brackets
        key = self._key()
        self.pos = self.text.index("]" * brackets, self.pos) + brackets
        path: KeyPath = ()
        for part in key[:-1]:
            path = self._into_array((*path, part))
        path += (key[-1],)
        self.lines.setdefault(path, line)
        if brackets == 2:
            self.arrays[path] = self.arrays.get(path, -1) + 1
            path += (self.arrays[path],)
            self.lines.setdefault(path, line)
        return path

    def _into_array(self, path: KeyPath) -> KeyPath:
        return (*path, self.arrays[path]) if path in self.arrays else path

    def _keyval(self, table: KeyPath) -> None:
        line = self._line()
        key = self._key()
        for size in range(1, len(key) + 1):
            self.lines.setdefault(table + key[:size], line)
        self._skip(newlines=False)
        self.pos += 1  # "="
        self._skip(newlines=False)
        self._value(table + key)

    def _key(self) -> KeyPath:
        parts: list[str | int] = []
        while True:
            self._skip(newlines=False)
            parts.append(self._key_part())
            self._skip(newlines=False)
            if not self.text.startswith(".", self.pos):
                return tuple(parts)
            self.pos += 1

    def _key_part(self) -> str:
        if self.text[self.pos] in "\"'":
            start = self.pos
            self._string()
            part: str = tomllib.loads("k = " + self.text[start : self.pos])["k"]
            return part
        match = _BARE_KEY.match(self.text, self.pos)
        if match is None:
            raise ValueError("not a key")
        self.pos = match.end()
        return match.group(0)

    def _value(self, path: KeyPath) -> None:
        self.lines.setdefault(path, self._line())
        char = self.text[self.pos]
        if char in "{[":
            self._container(path, "}" if char == "{" else "]")
        elif char in "\"'":
            self._string()
        else:
            self.pos = _SCALAR.match(self.text, self.pos).end()  # type: ignore[union-attr]  # always matches

    def _container(self, path: KeyPath, closer: str) -> None:
        self.pos += 1
        index = 0
        while self._skip(newlines=True) and self.text[self.pos] != closer:
            if self.text[self.pos] == ",":
                self.pos += 1
            elif closer == "}":
                self._keyval(path)
            else:
                self._value((*path, index))
                index += 1
        self.pos += 1

    def _string(self) -> None:
        quote = self.text[self.pos]
        closer = quote * 3 if self.text.startswith(quote * 3, self.pos) else quote
        end = self.pos + len(closer)
        while True:
            end = self.text.index(closer, end)
            if quote == "'" or not _escaped(self.text, end):
                break
            end += 1
        self.pos = end + len(closer)
        while len(closer) == 3 and self.text.startswith(quote, self.pos):
            self.pos += 1


def _escaped(text: str, index: int) -> bool:
    backslashes = 0
    while index - backslashes - 1 >= 0 and text[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_mapping(path: Path) -> PipelineMapping:
    """Load and validate a mapping file.

    Raises:
        MappingError: the file cannot be read or parsed, or has problems; ``problems``
            lists every one, each as ``file:line [table].key: message``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"cannot read mapping file {path}: {exc}") from exc
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_AT.search(str(exc))
        line = found.group(1) if found else "1"
        reason = _TOML_AT.sub("", str(exc))
        column = f" (column {found.group(2)})" if found else ""
        raise MappingError(f"{path}:{line}: not valid TOML: {reason}{column}") from exc
    return _Loader(path, raw, _KeyLines(text).scan()).load()


@dataclass(frozen=True, kw_only=True)
class _Scope:
    """What paths may read in a table: its roots, and what ``item`` is (in repeated tables)."""

    roots: tuple[str, ...] = ROOTS
    item_kind: str | None = None
    repeated: bool = False


_TOP_SCOPE = _Scope()


class _Loader:
    """Walks a parsed mapping file, compiling rules and collecting every problem."""

    def __init__(self, path: Path, raw: Mapping[str, Any], lines: Mapping[KeyPath, int]) -> None:
        self.path = path
        self.raw = raw
        self.lines = lines
        self.found: list[tuple[int, str]] = []
        self.tables_seen: set[KeyPath] = set()
        self.named: dict[str, Mapping[str, Any]] = {}
        self.reads: set[tuple[str, str]] = set()
        self.read_at: dict[tuple[str, str, str], tuple[int, SourceRead]] = {}
        self.codes: dict[tuple[str, str, str], tuple[int, TargetCode]] = {}

    def load(self) -> PipelineMapping:
        """The compiled mapping; raises MappingError listing every problem."""
        self._check_top()
        self.named = self._named_tables()
        invoice = self._invoice()
        pipeline = self._pipeline()
        client = self._section(("client",), Client)
        engagement = self._section(("engagement",), Engagement)
        ledger = self._ledger(client)
        tracking = self._tracking()
        if not self.found and client is not None and engagement is not None and ledger is not None:
            self._check_ledger(client, engagement, ledger)
        problems = self.problems
        if problems or pipeline is None or client is None or engagement is None or invoice is None or ledger is None:
            listed = "\n".join(f"  {problem}" for problem in problems)
            raise MappingError(
                f"{self.path}: {len(problems)} problem(s); fix them and load again:\n{listed}", problems=problems
            )
        rules = _Rules(client=client, engagement=engagement, tables=self.named, tracking=tracking, **pipeline)
        return PipelineMapping(
            path=self.path,
            source_properties=self._properties(),
            invoice=invoice,
            rules=rules,
            source_reads=tuple(read for _, read in sorted(self.read_at.values(), key=lambda found: found[0])),
            target_codes=tuple(code for _, code in sorted(self.codes.values(), key=lambda found: found[0])),
            ledger=ledger,
        )

    # -- places ---------------------------------------------------------------

    def place(self, key_path: KeyPath) -> str:
        """``file:line [table].key`` for a key path."""
        label = self._label(key_path)
        return f"{self.path}:{self._line(key_path)}" + (f" {label}" if label else "")

    def report(self, key_path: KeyPath, message: str) -> None:
        """Record one problem at ``key_path``."""
        self.found.append((self._line(key_path), f"{self.place(key_path)}: {message}"))

    @property
    def problems(self) -> list[str]:
        """Every problem so far, in line order."""
        return [text for _, text in sorted(self.found, key=lambda found: found[0])]

    def _line(self, key_path: KeyPath) -> int:
        while key_path and key_path not in self.lines:
            key_path = key_path[:-1]
        return self.lines.get(key_path, 1)

    def _label(self, key_path: KeyPath) -> str:
        table = max((seen for seen in self.tables_seen if key_path[: len(seen)] == seen), key=len, default=())
        head = "[" + ".".join(str(part) for part in table) + "]" if table else ""
        tail = ""
        for step in key_path[len(table) :]:
            if isinstance(step, int):
                tail += f"[{step}]"
            else:
                name = step if _BARE_KEY.fullmatch(step) else f'"{step}"'
                tail += f".{name}" if tail or head else name
        return head + tail

    def _table_at(self, key_path: tuple[str, ...], *, required: bool) -> Mapping[str, Any] | None:
        value: Any = self.raw
        for step in key_path:
            value = value.get(step) if isinstance(value, Mapping) else None
        if value is None:
            if required:
                self.report(key_path[:-1], f"missing table [{'.'.join(key_path)}]")
            return None
        if not isinstance(value, Mapping):
            self.report(key_path, f"must be a table ([{'.'.join(key_path)}]), got {show(value)}")
            return None
        self.tables_seen.add(key_path)
        return value

    def _report_validation(self, base: KeyPath, exc: ValidationError) -> None:
        for error in exc.errors(include_url=False):
            self.report(base + tuple(error["loc"]), error["msg"])

    # -- top-level tables -----------------------------------------------------

    def _check_top(self) -> None:
        for key in self.raw:
            if key not in _TOP:
                self.report(
                    (key,), f"unknown table [{key}]{did_you_mean(key, set(_TOP))}; expected: {listing(set(_TOP))}"
                )

    def _named_tables(self) -> dict[str, Mapping[str, Any]]:
        tables = self._table_at(("tables",), required=False) or {}
        named: dict[str, Mapping[str, Any]] = {}
        for name in tables:
            entries = self._table_at(("tables", name), required=True)
            if entries is None:
                continue
            try:
                named[name] = _TABLE.validate_python(dict(entries))
            except ValidationError as exc:
                self._report_validation(("tables", name), exc)
        return named

    def _invoice(self) -> InvoiceOptions | None:
        raw = self._table_at(("invoice",), required=False)
        if raw is None:
            return InvoiceOptions() if "invoice" not in self.raw else None
        try:
            return validate_table(InvoiceOptions, raw)
        except ValidationError as exc:
            self._report_validation(("invoice",), exc)
            return None

    def _pipeline(self) -> dict[str, Any] | None:
        raw = self._table_at(("pipeline",), required=True)
        if raw is None:
            return None
        try:
            table = validate_table(_PipelineTable, raw)
        except ValidationError as exc:
            self._report_validation(("pipeline",), exc)
            return None
        for key in ("when", "won", "won_at"):
            node = getattr(table, key)
            if node is not None:
                self._check_node(("pipeline", key), node, ROOTS, None)
        won_at = self._rule(("pipeline", "won_at"), "won_at", table.won_at, datetime, required=True)
        return {
            "source": table.source,
            "when": table.when,
            "when_place": self.place(("pipeline", "when")),
            "won": table.won,
            "won_place": self.place(("pipeline", "won")),
            "won_at": won_at,
            "contact_label": table.billing_contact_label,
        }

    # -- tracking -------------------------------------------------------------

    def _tracking(self) -> tuple[_FieldRule, ...]:
        raw = self._table_at(("tracking",), required=False) or {}
        if len(raw) > TRACKING_MAX:
            self.report(("tracking",), f"{len(raw)} tracking categories; a line takes at most {TRACKING_MAX}")
        rules = []
        for category, value in raw.items():
            here = ("tracking", category)
            try:
                transform = _VALUE.validate_python(value)
            except ValidationError as exc:
                self._report_validation(here, exc)
                continue
            self._check_node(here, transform, ROOTS, None)
            rules.append(self._rule(here, category, transform, str | None, required=False))
            found = [(f"{category}/{as_text(option)}", where) for option, where in self._sourced(transform, here)]
            self._add_codes("tracking", found)
        return tuple(rules)

    # -- ledger codes ---------------------------------------------------------

    def _ledger(self, client: _SectionRule | None) -> LedgerRules | None:
        rules: dict[str, CodeRule] = {}
        for table, kind in _LEDGER_TABLES.items():
            raw = self._table_at((table,), required=False)
            if raw is None:
                if table in self.raw:
                    return None
                rules[table] = CodeRule()
                continue
            try:
                parsed = validate_table(LedgerTable, raw)
            except ValidationError as exc:
                self._report_validation((table,), exc)
                return None
            rules[table] = parsed.rule()
            self._ledger_codes(table, kind, parsed)
        places = {}
        for name in ("account_code", "tax_type"):
            rule = client.rule(name) if client is not None else None
            if rule is not None:
                places[name] = rule.place
        return LedgerRules(accounts=rules["accounts"], tax_types=rules["tax_types"], client_places=places)

    def _ledger_codes(self, table: str, kind: CodeKind, parsed: LedgerTable) -> None:
        found: list[tuple[Any, KeyPath]] = []
        if parsed.default is not None:
            found.append((parsed.default, (table, "default")))
        for group in ("by_line_kind", "by_engagement_type"):
            found += [(code, (table, group, key)) for key, code in getattr(parsed, group).items()]
        self._add_codes(kind, found)

    def _check_ledger(self, client: _SectionRule, engagement: _SectionRule, ledger: LedgerRules) -> None:
        """Every line the mapping can make gets an account code (else a problem at ``[accounts]``)."""
        if _always(client.rule("account_code")):
            return
        missing: dict[str, list[str]] = {}
        for engagement_type, kind in _line_kinds_made(engagement, self.named):
            accounts = ledger.accounts
            if not (
                accounts.default or kind in accounts.by_line_kind or engagement_type in accounts.by_engagement_type
            ):
                missing.setdefault(engagement_type, []).append(kind)
        if missing:
            self.tables_seen.add(("accounts",))
            listed = "; ".join(f"{kind} engagements: {', '.join(lines)}" for kind, lines in missing.items())
            self.report(
                ("accounts",),
                f"no account code for the lines syncd makes of {listed}. The ledger refuses an approved invoice "
                'line without one: add default = "<code>" (or by_line_kind / by_engagement_type entries)',
            )

    # -- model tables ---------------------------------------------------------

    def _section(
        self, key_path: tuple[str, ...], model: type[BaseModel], scope: _Scope = _TOP_SCOPE
    ) -> _SectionRule | None:
        raw = self._table_at(key_path, required=len(key_path) == 1)
        if raw is None:
            return None
        spec = _SPECS.get(model, _ModelSpec())
        members = [
            self._member((*key_path, key), value, model, spec, scope)
            for key, value in raw.items()
            if self._mappable(key_path, key, model, spec, scope)
        ]
        self._check_required(key_path, raw, model, spec)
        rules = [member for member in members if isinstance(member, _FieldRule)]
        names = [rule.name for rule in rules] + sorted(spec.fallback)
        return _SectionRule(
            model=model,
            place=self.place(key_path),
            fields=tuple(rules),
            order=tuple(dict.fromkeys([name for name in _FIRST if name in names] + names)),
            parts=tuple(member for member in members if isinstance(member, tuple)),
            repeats=tuple(member for member in members if isinstance(member, _RepeatRule)),
        )

    def _mappable(
        self, key_path: tuple[str, ...], key: str, model: type[BaseModel], spec: _ModelSpec, scope: _Scope
    ) -> bool:
        """Whether ``key`` names a field the table may map (reporting why not)."""
        if scope.repeated and key in ("each", "when", _OTHERWISE):
            return False
        if key in spec.computed:
            self.report((*key_path, key), f'"{key}" is set by syncd and cannot be mapped; remove it')
            return False
        if key not in model.model_fields:
            mappable = [name for name in model.model_fields if name not in spec.computed]
            hint = did_you_mean(key, mappable)
            self.report(
                (*key_path, key), f'unknown key "{key}"{hint}; [{".".join(key_path)}] takes: {listing(mappable, 30)}'
            )
            return False
        return True

    def _check_required(
        self, key_path: tuple[str, ...], raw: Mapping[str, Any], model: type[BaseModel], spec: _ModelSpec
    ) -> None:
        for name, info in model.model_fields.items():
            if info.is_required() and name not in raw and name not in spec.computed | spec.fallback:
                self.report((*key_path, name), f'missing required key "{name}"')

    def _member(
        self, here: tuple[str, ...], value: Any, model: type[BaseModel], spec: _ModelSpec, scope: _Scope
    ) -> _FieldRule | tuple[str, _SectionRule] | _RepeatRule | None:
        """The compiled rule for one key: a field, a nested model, or a repeated table."""
        key = here[-1]
        info = model.model_fields[key]
        shape = _shape(info.annotation)
        if shape is not None and shape[0] == "many":
            return self._repeat(here, shape[1])
        if shape is not None:
            part = self._section(here, shape[1], scope)
            return (key, part) if part is not None else None
        try:
            transform = _VALUE.validate_python(value)
        except ValidationError as exc:
            self._report_validation(here, exc)
            return None
        self._check_node(here, transform, scope.roots, scope.item_kind)
        required = info.is_required() and key not in spec.fallback
        return self._rule(here, key, transform, info.annotation, required=required)

    def _repeat(self, here: tuple[str, ...], model: type[BaseModel]) -> _RepeatRule | None:
        raw = self._table_at(here, required=True)
        if raw is None:
            return None
        each = raw.get("each", _EACH_DEFAULTS.get(here[-1]))
        if each is None:
            self.report((*here, "each"), 'missing required key "each": the path of the list to repeat over')
            return None
        if not isinstance(each, str):
            self.report((*here, "each"), f"must be a path to a list, got {show(each)}")
            return None
        try:
            root = parse_path(each)[0]
        except ValueError as exc:
            self.report((*here, "each"), str(exc))
            return None
        self._check_path((*here, "each"), each, ROOTS, None)
        when = None
        if "when" in raw:
            try:
                when = _CONDITION.validate_python(raw["when"])
            except ValidationError as exc:
                self._report_validation((*here, "when"), exc)
        scope = _Scope(roots=(*ROOTS, "item"), item_kind="line_item" if root == "line_items" else None, repeated=True)
        if when is not None:
            self._check_node((*here, "when"), when, scope.roots, scope.item_kind)
        section = self._section(here, model, scope)
        otherwise = self._section((*here, _OTHERWISE), model) if _OTHERWISE in raw else None
        if section is None:
            return None
        return _RepeatRule(
            name=here[-1], place=self.place(here), each=each, when=when, section=section, otherwise=otherwise
        )

    def _rule(self, here: KeyPath, name: str, transform: Transform, annotation: Any, *, required: bool) -> _FieldRule:
        rule = _FieldRule(
            name=name,
            place=self.place(here),
            transform=transform,
            adapter=TypeAdapter(annotation),
            annotation=annotation,
            required=required,
        )
        zone = ZoneInfo("UTC")
        for output in {repr(out): out for out in transform.outputs(self.named)}.values():
            try:
                rule.coerce(output, zone)
            except ValueError as exc:
                self.report(here, str(exc))
        self._collect_codes(here, name, transform)
        return rule

    # -- target codes ---------------------------------------------------------

    def _collect_codes(self, here: KeyPath, name: str, transform: Transform) -> None:
        """Record the codes a field (and any ``money`` currency in it) can produce as written."""
        kind = _CODE_FIELDS.get(name)
        if kind is not None:
            self._add_codes(kind, self._sourced(transform, here))
        for node in walk(transform):
            if isinstance(node, Money) and node.currency is not None:
                self._add_codes("currency", self._sourced(node.currency, here))

    def _add_codes(self, kind: CodeKind, found: Iterable[tuple[Any, KeyPath]]) -> None:
        for value, key_path in found:
            if isinstance(value, bool) or not isinstance(value, str | int | Decimal) or absent(value):
                continue
            code = TargetCode(kind=kind, code=as_text(value), place=self.place(key_path))
            self.codes.setdefault((kind, code.code, code.place), (self._line(key_path), code))

    def _sourced(self, node: Transform, here: KeyPath) -> Iterator[tuple[Any, KeyPath]]:
        """What ``node`` can return as written (as :meth:`Transform.outputs`), each with its key path.

        A named lookup table's values are placed at their entry in ``[tables.NAME]``;
        everything else at the key being mapped.
        """
        if isinstance(node, Lookup) and isinstance(node.table, str):
            for key, value in self.named.get(node.table, {}).items():
                yield value, ("tables", node.table, key)
        elif isinstance(node, Lookup):
            yield from ((value, here) for value in node.entries(self.named).values())
        elif isinstance(node, Coalesce):
            for option in node.options:
                yield from self._sourced(option, here)
        else:
            yield from ((value, here) for value in node.outputs(self.named))
            return
        if node.default is not None:
            yield from self._sourced(node.default, here)

    # -- static checks --------------------------------------------------------

    def _check_node(
        self, here: KeyPath, node: Transform | Condition, roots: Sequence[str], item_kind: str | None
    ) -> None:
        for inner in walk(node):
            for text in inner.paths():
                self._check_path(here, text, roots, item_kind)
            if isinstance(inner, Lookup) and isinstance(inner.table, str) and inner.table not in self.named:
                hint = did_you_mean(inner.table, set(self.named))
                self.report(here, f'lookup table "{inner.table}" is not defined{hint}; add [tables.{inner.table}]')

    def _check_path(self, here: KeyPath, text: str, roots: Sequence[str], item_kind: str | None) -> None:
        steps = parse_path(text)
        root = str(steps[0])
        if root not in roots:
            hint = did_you_mean(root, roots)
            self.report(here, f'path "{text}": unknown root "{root}"{hint}; roots here: {listing(roots)}')
            return
        if root in _LIST_ROOTS and len(steps) > 1 and isinstance(steps[1], str) and steps[1] != ALL:
            self.report(here, f'path "{text}": {root} is a list; write {root}.0.… for one item or {root}[*].… for all')
            return
        names = [step for step in steps[1:] if isinstance(step, str) and step != ALL]
        kind = item_kind if root == "item" else _ROOT_KINDS.get(root)
        allowed = {
            "record": _RECORD_KEYS,
            "defaults": tuple(MappingDefaults.model_fields),
        }.get(root) or (_OBJECT_KEYS[kind] if kind is not None else None)
        if allowed is not None and names and names[0] not in allowed:
            hint = did_you_mean(names[0], allowed)
            self.report(here, f'path "{text}": {root} has no "{names[0]}"{hint}; it has: {listing(allowed)}')
            return
        if kind == "line_item" and here[:2] == ("engagement", "milestones") and here[-1] == "done_at":
            self.report(
                here,
                f'path "{text}": a milestone cannot be marked done on a line item: syncd is told of changes '
                "to deals (webhooks and polls) and to Harvest, not of a line item edited alone, so it would "
                "never see it; read done_at from a deal property, or mark it done at Harvest (tracker_task_id)",
            )
            return
        if kind is not None and len(names) >= 2 and names[0] == "properties":
            self.reads.add((kind, names[1]))
            read = SourceRead(object_type=kind, name=names[1], place=self.place(here))
            self.read_at.setdefault((kind, read.name, read.place), (self._line(here), read))

    def _properties(self) -> Mapping[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for kind in _OBJECT_KEYS:
            found[kind] = tuple(sorted(name for read_kind, name in self.reads if read_kind == kind))
        return types.MappingProxyType(found)


def _shape(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """``("one", Model)`` for a nested model field, ``("many", Model)`` for a tuple of them."""
    if get_origin(annotation) is tuple:
        args = get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return "many", args[0]
        return None
    for option in get_args(annotation) if _is_union(annotation) else (annotation,):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return "one", option
    return None


def _always(rule: _FieldRule | None) -> bool:
    """Whether a mapped field always has a value: a constant, or a lookup with a constant default."""
    if rule is None:
        return False
    node = rule.transform
    if isinstance(node, Const):
        return not absent(node.value)
    return node.default is not None and isinstance(node.default, Const) and not absent(node.default.value)


def _closed(node: Transform) -> bool:
    """Whether ``node`` can only return what :meth:`Transform.outputs` lists (or fail)."""
    if isinstance(node, Const):
        return True
    if isinstance(node, Lookup):
        return node.default is None or _closed(node.default)
    if isinstance(node, Coalesce):
        return all(_closed(option) for option in node.options) and (node.default is None or _closed(node.default))
    return False


def _line_kinds_made(engagement: _SectionRule, tables: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(engagement type, line kind) of every line without its own account code the mapping can make."""
    rule = engagement.rule("type")
    types = [str(kind) for kind in EngagementType]
    if rule is not None and _closed(rule.transform):
        outputs = {str(value) for value in rule.transform.outputs(tables)}
        types = [kind for kind in types if kind in outputs] or types
    made = [(kind, line) for kind in types for line in _GENERATED[kind]]
    if "one_time" in types:
        made += [("one_time", line) for line in _mapped_line_kinds(engagement)]
    return made


def _mapped_line_kinds(engagement: _SectionRule) -> list[str]:
    kinds = ["deposit", "deduction"] if engagement.rule("deposit_percent") is not None else []
    lines = next((repeat for repeat in engagement.repeats if repeat.name == "lines"), None)
    if lines is not None and not _always(lines.section.rule("account_code")):
        kinds.append("item")
    if lines is not None and lines.otherwise is not None and not _always(lines.otherwise.rule("account_code")):
        kinds.append("deal")
    return kinds
