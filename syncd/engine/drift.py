"""The drift guard: each mapping against the vendors' live schemas.

A mapping is validated at load against syncd's own vocabulary; this module checks it
against the world it runs in:

* every CRM property the mapping reads (:attr:`~syncd.core.mapping.PipelineMapping.source_reads`)
  still exists at the CRM (:class:`~syncd.core.interfaces.CrmSchema`), so a property deleted
  or renamed by an admin is reported by name before a record fails on it;
* every code the mapping can produce as written
  (:attr:`~syncd.core.mapping.PipelineMapping.target_codes`: account codes, tax types,
  currencies, item codes) exists at the invoicing tool
  (:class:`~syncd.core.interfaces.InvoicingCodes`), so an archived account is reported before
  an invoice is attempted.

Each problem names the mapping file, the line and the key, and what is missing::

    mappings/hubspot-xero.toml:41 [client].po_number: hubspot company property
    "default_po_number" does not exist (deleted or renamed?)

``syncd check`` runs :func:`check_pipelines`; the daemon runs :func:`run_drift_check` on
a schedule (``[daemon].drift_check_interval_s``), logging each problem as
``mapping_drift`` and keeping the count for ``/metrics``. A connector without the
optional protocol is not checked (and says nothing): only what can be checked is.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import structlog

from syncd.core.billing import KNOWN_CODES
from syncd.core.errors import SyncdError
from syncd.core.interfaces import CodeKind, CrmSchema, InvoicingCodes
from syncd.core.transforms import did_you_mean, listing
from syncd.engine.runtime import Pipeline, Runtime

log = structlog.get_logger("syncd.engine.drift")

DRIFT_PROBLEMS = "mapping_drift_problems"
"""Key in :attr:`Runtime.extra <syncd.engine.runtime.Runtime.extra>` holding the last check's problem count."""

_CODE_WORDS: Mapping[CodeKind, str] = {
    "account_code": "account code",
    "tax_type": "tax type",
    "currency": "currency",
    "item_code": "item code",
    "tracking": "tracking category option",
}


@dataclass(frozen=True, kw_only=True)
class DriftProblem:
    """One mismatch between a mapping and a vendor's live schema.

    Attributes:
        place: ``file:line [table].key`` in the mapping, or ``[connections.NAME]`` when
            the vendor could not be asked.
        message: what is missing, and where it was looked for.
    """

    place: str
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}"


async def check_pipelines(runtime: Runtime, *, skip: Collection[str] = ()) -> list[DriftProblem]:
    """Every drift problem of every pipeline, each vendor list read once per connection.

    Args:
        runtime: the running (or checking) runtime; its current pipelines are checked.
        skip: connection names not to ask (``syncd check`` skips those whose
            credentials already failed).
    """
    answers = _Answers()
    problems: list[DriftProblem] = []
    for pipeline in list(runtime.pipelines):
        if pipeline.crm_name not in skip:
            problems += await _check_reads(pipeline, answers)
        if pipeline.invoicing_name not in skip:
            problems += await _check_codes(pipeline, answers)
    answers.remember(runtime)
    return list(dict.fromkeys(problems))


async def run_drift_check(runtime: Runtime) -> int:
    """Check every pipeline, log each problem (``mapping_drift``) and keep the count for ``/metrics``.

    Returns:
        how many problems were found.
    """
    problems = await check_pipelines(runtime)
    for problem in problems:
        log.warning("mapping_drift", place=problem.place, problem=problem.message)
    runtime.extra[DRIFT_PROBLEMS] = len(problems)
    log.info("mapping_drift_checked", pipelines=len(runtime.pipelines), problems=len(problems))
    return len(problems)


@dataclass
class _Answers:
    """The vendors' answers within one check, so each list is read once per connection."""

    properties: dict[tuple[str, str], frozenset[str] | DriftProblem] = field(default_factory=dict)
    codes: dict[str, Mapping[CodeKind, frozenset[str]] | DriftProblem] = field(default_factory=dict)

    async def properties_of(self, name: str, crm: CrmSchema, object_type: str) -> frozenset[str] | DriftProblem:
        """``object_type``'s live properties at connection ``name`` (or why they could not be read)."""
        key = (name, object_type)
        if key not in self.properties:
            try:
                self.properties[key] = await crm.properties(object_type)
            except SyncdError as exc:
                self.properties[key] = _unreadable(name, f"{object_type} properties", exc)
        return self.properties[key]

    async def codes_of(self, name: str, invoicing: InvoicingCodes) -> Mapping[CodeKind, frozenset[str]] | DriftProblem:
        """The codes in use at connection ``name`` (or why they could not be read)."""
        if name not in self.codes:
            try:
                self.codes[name] = await invoicing.codes()
            except SyncdError as exc:
                self.codes[name] = _unreadable(name, "codes", exc)
        return self.codes[name]

    def remember(self, runtime: Runtime) -> None:
        """Keep the codes read in ``runtime.extra``: drafts check a client's own codes against them."""
        kept = runtime.extra.setdefault(KNOWN_CODES, {})
        kept.update({name: codes for name, codes in self.codes.items() if not isinstance(codes, DriftProblem)})


def _unreadable(name: str, what: str, exc: SyncdError) -> DriftProblem:
    return DriftProblem(place=f"[connections.{name}]", message=f"cannot read its {what} for the drift check: {exc}")


async def _check_reads(pipeline: Pipeline, answers: _Answers) -> list[DriftProblem]:
    crm = pipeline.crm
    if not isinstance(crm, CrmSchema):
        return []
    problems: list[DriftProblem] = []
    for read in pipeline.mapping.source_reads:
        live = await answers.properties_of(pipeline.crm_name, crm, read.object_type)
        if isinstance(live, DriftProblem):
            problems.append(live)
        elif read.name not in live:
            kind = read.object_type.replace("_", " ")
            message = f'{pipeline.crm_name} {kind} property "{read.name}" does not exist (deleted or renamed?)'
            problems.append(DriftProblem(place=read.place, message=message + did_you_mean(read.name, live)))
    return problems


async def _check_codes(pipeline: Pipeline, answers: _Answers) -> list[DriftProblem]:
    invoicing = pipeline.invoicing
    if not isinstance(invoicing, InvoicingCodes) or not pipeline.mapping.target_codes:
        return []
    known = await answers.codes_of(pipeline.invoicing_name, invoicing)
    if isinstance(known, DriftProblem):
        return [known]
    problems: list[DriftProblem] = []
    for target in pipeline.mapping.target_codes:
        codes = known.get(target.kind)
        if codes is None or target.code in codes:
            continue
        word = _CODE_WORDS[target.kind]
        message = f'{pipeline.invoicing_name} has no {word} "{target.code}"; it has: {listing(codes, 20)}'
        problems.append(DriftProblem(place=target.place, message=message))
    return problems
