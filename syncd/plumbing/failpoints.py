"""Named failpoints at the engine's step boundaries, armed only from the environment.

The fault suite (``tests/faults/``, docs/reliability.md) proves that a crash between any
two steps of an invoice's path loses nothing and duplicates nothing. To crash *exactly*
there, a test starts a real ``syncd run`` with ``SYNCD_FAILPOINTS`` set, e.g.::

    SYNCD_FAILPOINTS=after_vendor_2xx:kill syncd run --config config.toml

and the process SIGKILLs itself the first time the engine passes that point. The points
(:data:`POINTS`), in the order an invoice passes them:

* ``after_claim``: an effect was claimed (lease taken, attempt counted), nothing done yet;
* ``before_vendor_call``: right before the invoicing tool is asked to create the invoice;
* ``after_vendor_2xx``: the tool answered 2xx (the invoice exists there), nothing recorded here;
* ``after_local_commit``: the invoice is recorded and its CRM write-back queued, not yet run;
* ``after_token_refresh``: a single-use refresh token was spent at the vendor and the new
  set is not yet saved (``syncd/plumbing/tokens.py``).

Actions: ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it: frozen until a SIGCONT,
as a paused VM or a long GC would freeze it) and ``raise`` (raise :class:`FailpointHit`,
an unexpected error the engine must survive). Several points are separated by commas:
``after_claim:raise,after_local_commit:kill``. Each armed point fires once per process.

Never armed by the config file, and :func:`hit` costs one dictionary truth test while
nothing is armed. ``syncd run`` arms the environment's points at start
(:func:`arm_from_env`) and logs ``failpoints_armed`` as a warning naming them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

import structlog

from syncd.core.errors import ConfigError

log = structlog.get_logger("syncd.failpoints")

ENV = "SYNCD_FAILPOINTS"
POINTS = ("after_claim", "before_vendor_call", "after_vendor_2xx", "after_local_commit", "after_token_refresh")
ACTIONS = ("kill", "stop", "raise")

_armed: dict[str, str] = {}


class FailpointHit(RuntimeError):
    """Raised at a failpoint armed with ``raise``."""


def parse(spec: str) -> dict[str, str]:
    """``point:action,point:action`` as {point: action}.

    Raises:
        ConfigError: an unknown point or action, or an entry without ``:``, naming
            :data:`ENV` and what is known.
    """
    armed: dict[str, str] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        point, sep, action = (text.strip() for text in entry.partition(":"))
        if not sep or point not in POINTS or action not in ACTIONS:
            raise ConfigError(
                f"{ENV}: {entry!r} is not point:action; points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)}",
                place=ENV,
            )
        armed[point] = action
    return armed


def arm(points: Mapping[str, str]) -> None:
    """Arm ``points`` ({point: action}), replacing whatever was armed."""
    _armed.clear()
    _armed.update(parse(",".join(f"{point}:{action}" for point, action in points.items())))


def arm_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Arm the points named in ``SYNCD_FAILPOINTS`` (none when unset); what is armed.

    Raises:
        ConfigError: the variable names an unknown point or action.
    """
    arm(parse(environ.get(ENV, "")))
    if _armed:
        log.warning("failpoints_armed", points=dict(_armed))
    return dict(_armed)


def disarm() -> None:
    """Disarm every point."""
    _armed.clear()


def hit(point: str) -> None:
    """Pass ``point``: nothing unless it is armed, else its action (once)."""
    if not _armed:
        return
    action = _armed.pop(point, None)
    if action is None:
        return
    log.warning("failpoint_hit", point=point, action=action, pid=os.getpid())
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise FailpointHit(f"failpoint {point} hit")
