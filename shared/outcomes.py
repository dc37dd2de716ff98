"""The fixed vocabularies: outcomes, sources, interaction types, verdicts and error codes.

These strings appear in channel variables, metric labels, logs, messages and the README;
they are defined here once and nowhere else.
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
        return _ERROR_OUTCOMES.get(self, Outcome.CRM_ERROR)


_ERROR_OUTCOMES = {
    ErrorCode.CRM_TIMEOUT: Outcome.CRM_TIMEOUT,
    ErrorCode.EXPIRED: Outcome.CRM_TIMEOUT,
    ErrorCode.CRM_BAD_RESPONSE: Outcome.CRM_BAD_RESPONSE,
    ErrorCode.CRM_DISALLOWED_DESTINATION: Outcome.CRM_BAD_RESPONSE,
}
