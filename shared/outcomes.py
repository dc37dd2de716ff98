"""The fixed vocabularies: outcomes, sources, interaction types, verdicts, error codes, cache
lookup results and circuit states.

These strings appear in channel variables, metric labels, logs, messages and the README;
they are defined here once and nowhere else. What each word implies is declared here too, next
to it (`Outcome.is_failover`, `ErrorCode.outcome`, `ErrorCode.is_crm_result`,
`CacheLookup.read`, `CircuitState.level`), so metrics, tests and docs iterate these enums
instead of keeping their own lists: adding a word is one member plus its entry in the tables
below it (tests/unit/test_vocabulary.py fails until every table names it, and until the README
and docs/design.md list it).
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a call left an identification node (`OML_IDENT_OUTCOME`)."""

    IDENTIFIED = "identified"
    NOT_IDENTIFIED = "not_identified"
    CRM_DESTINATION = "crm_destination"
    NO_INPUT = "no_input"
    INVALID_INPUT = "invalid_input"
    CRM_TIMEOUT = "crm_timeout"
    CRM_ERROR = "crm_error"
    CRM_BAD_RESPONSE = "crm_bad_response"
    HANGUP = "hangup"
    CONFIG_ERROR = "config_error"

    @property
    def is_failover(self) -> bool:
        """The CRM could not decide: the call goes to the node's `on_error`, else its
        `on_not_identified` (source `failover`). DESIGN.md §2 gives these outcomes, and only
        these, the default destination "`on_error` or else `on_not_identified`";
        `config_error` also has source `failover` but goes to the gateway-wide fallback."""
        return self in _FAILOVER_OUTCOMES


class Source(StrEnum):
    """Where a decision came from (`OML_IDENT_SOURCE`)."""

    CRM = "crm"
    CACHE = "cache"
    LOCAL = "local"
    FAILOVER = "failover"


class Interaction(StrEnum):
    """A node's interaction type; OMniLeads stores it as `TYPE` 1/2/3."""

    NONE = "none"
    CRM_TRUE_FALSE = "crm_true_false"
    CRM_DESTINATION = "crm_destination"

    @classmethod
    def from_omnileads(cls, value: str) -> Interaction:
        """Map OMniLeads' numeric `TYPE` field; raise ValueError for anything else."""
        mapping = {"1": cls.NONE, "2": cls.CRM_TRUE_FALSE, "3": cls.CRM_DESTINATION}
        try:
            return mapping[value.strip()]
        except KeyError:
            raise ValueError(f"TYPE must be 1, 2 or 3, got {value!r}") from None


class Verdict(StrEnum):
    """A resolver's answer in an identification reply."""

    TRUE = "true"
    FALSE = "false"
    DESTINATION = "destination"
    ERROR = "error"


class ErrorCode(StrEnum):
    """Why a resolver could not answer; each maps to exactly one call outcome."""

    CRM_TIMEOUT = "crm_timeout"
    CRM_UNREACHABLE = "crm_unreachable"
    CRM_HTTP_STATUS = "crm_http_status"
    CRM_STATUS_FAIL = "crm_status_fail"
    CRM_CIRCUIT_OPEN = "crm_circuit_open"
    CRM_BAD_RESPONSE = "crm_bad_response"
    CRM_DISALLOWED_DESTINATION = "crm_disallowed_destination"
    EXPIRED = "expired"
    UNKNOWN_NODE = "unknown_node"
    INTERNAL = "internal"

    @property
    def outcome(self) -> Outcome:
        """The call outcome this error leads to: always a failover (`Outcome.is_failover`)."""
        return _ERROR_OUTCOMES[self]

    @property
    def is_crm_result(self) -> bool:
        """Asking the CRM ended this way (an HTTP attempt, or the breaker refusing one): a
        `result` of `callerid_crm_requests_total`. The others are the resolver's own."""
        return self not in _RESOLVER_ERRORS


class CacheLookup(StrEnum):
    """What a read of the answer cache found: the `result` label of the cache_lookups metrics."""

    HIT = "hit"
    MISS = "miss"
    """No answer, or one the node no longer accepts (its configuration changed since)."""
    ERROR = "error"
    """The backend failed or was too slow; the request goes on without the cache."""
    SKIPPED = "skipped"
    """Not read: the gateway reads only while enough recent requests were in the cache."""

    @property
    def read(self) -> bool:
        """The cache was read. A resolver always reads, so it never counts SKIPPED."""
        return self is not CacheLookup.SKIPPED


class CircuitState(StrEnum):
    """A CRM's circuit breaker state (crm_resolver.circuit)."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def level(self) -> int:
        """The value of the `callerid_crm_circuit_state` gauge: 0 closed, 1 half-open, 2 open."""
        return _CIRCUIT_LEVELS[self]


# The tables behind the properties; tests/unit/test_vocabulary.py checks each is complete.

_FAILOVER_OUTCOMES = frozenset({Outcome.CRM_TIMEOUT, Outcome.CRM_ERROR, Outcome.CRM_BAD_RESPONSE})

# Every error code's outcome, after DESIGN.md §2's "when" column: no answer in time is
# crm_timeout, an answer the node cannot use is crm_bad_response, everything else crm_error.
_ERROR_OUTCOMES: dict[ErrorCode, Outcome] = {
    ErrorCode.CRM_TIMEOUT: Outcome.CRM_TIMEOUT,
    ErrorCode.CRM_UNREACHABLE: Outcome.CRM_ERROR,
    ErrorCode.CRM_HTTP_STATUS: Outcome.CRM_ERROR,
    ErrorCode.CRM_STATUS_FAIL: Outcome.CRM_ERROR,
    ErrorCode.CRM_CIRCUIT_OPEN: Outcome.CRM_ERROR,
    ErrorCode.CRM_BAD_RESPONSE: Outcome.CRM_BAD_RESPONSE,
    ErrorCode.CRM_DISALLOWED_DESTINATION: Outcome.CRM_BAD_RESPONSE,
    ErrorCode.EXPIRED: Outcome.CRM_TIMEOUT,
    ErrorCode.UNKNOWN_NODE: Outcome.CRM_ERROR,
    ErrorCode.INTERNAL: Outcome.CRM_ERROR,
}

# Error codes a resolver gives without asking the CRM: not CRM request results.
_RESOLVER_ERRORS = frozenset({ErrorCode.EXPIRED, ErrorCode.UNKNOWN_NODE, ErrorCode.INTERNAL})

_CIRCUIT_LEVELS: dict[CircuitState, int] = {
    CircuitState.CLOSED: 0,
    CircuitState.HALF_OPEN: 1,
    CircuitState.OPEN: 2,
}
