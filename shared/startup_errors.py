"""Why a service cannot start, as one line: `<service>: cannot start: <SETTING>: <what is
wrong> (<the fix>)`, and the exit status that goes with it.

What belongs here: turning each thing that stops a start (invalid settings, a node source that
cannot be read, an address that cannot be listened on, ...) into that line; the top-level
catch that makes sure nothing else reaches the operator as a traceback; and the one WARNING of
a start without the answer cache (its Redis does not answer: the services start anyway, the
cache fails open). What does not: deciding what is valid (the settings classes, `shared.nodes`,
`shared.redis_url`), and what the services do about a peer that is down (the broker is retried
by `shared.amqp_link`, the cache fails open in `crm_resolver.redis_cache`).

Exit statuses (README, "When it will not start"):

- 2 (`CONFIGURATION`): a setting or a file it names is wrong. Starting again with the same
  configuration fails the same way; a supervisor may stop retrying (systemd
  `RestartPreventExitStatus=2`).
- 1 (`ENVIRONMENT`): the configuration may be right but this host is not ready: the port is
  held by another process, the Redis the nodes are read from does not answer. The same
  configuration may start later, so a supervisor should retry.
- 1 as well for an unexpected exception: a bug. One ERROR line says so; the traceback is
  logged at DEBUG (`CALLERID_LOG_LEVEL=DEBUG`), never in the normal log.

Messages name the environment variable (or the flag, when the value came from one). A
validator's or a `ConfigError`'s message is the "what is wrong"; when it starts with a
`CALLERID_*` name that name is the setting (a rule across settings, or a URL checked outside
the settings class), and when it ends in parentheses those are its fix. Values are quoted back
except for settings that may hold a password or secret.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import annotated_types
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from shared.nodes import ConfigError
from shared.settings import LOG_FORMAT, describe_default, env_name

CONFIGURATION = 2
ENVIRONMENT = 1
UNEXPECTED = 1
INTERRUPTED = 130  # Ctrl-C during start-up: the shell's convention for SIGINT

# Settings whose value may hold a password or a secret: never quoted back.
SECRET_SETTINGS = frozenset({"amqp_url", "redis_url", "cache_key_pepper", "nodes"})

# The fix for a value a validator refused, by setting, where the validator's message does not
# carry its own. `{default}` is the setting's default as the README writes it.
FIXES: dict[str, str] = {
    "agi_listen": "write host:port, e.g. {default}",
    "http_listen": "write host:port, e.g. {default}",
    "agi_allowed_peers": "list your Asterisk servers' addresses or CIDRs, separated by commas, "
    "e.g. 10.0.0.5,10.0.1.0/24",
    "jump_templates": 'write a JSON object from a destination type or "*" to '
    '"context,extension,priority", e.g. {{"*": "oml-dest-{{type}},{{id}},1"}}',
    "fallback_destination": 'write "type,id" with two integers, e.g. 1,3',
    "log_level": "use DEBUG, INFO, WARNING or ERROR",
    "amqp_url": "e.g. amqp://user:password@rabbitmq:5672/, or one URL per node of a cluster, "
    "comma-separated",
    "amqp_prefix": "use 1 to 64 letters, digits, '_', '.' or '-'",
    "omnileads_confirm_audio": "name an Asterisk sound, e.g. {default}",
    "amqp_ca_bundle": "name a readable PEM file of CA certificates, or unset it",
    "crm_ca_bundle": "name a readable PEM file of CA certificates, or unset it",
}
FALLBACK_FIX = 'see README, "Service settings"'
NODES_FIX = 'correct it; README, "Configure a node"'

_NAMED = re.compile(r"^(CALLERID_[A-Z0-9_]+): ")
_OWN_FIX = re.compile(r"^(?P<problem>.*\S) \((?P<fix>[^()]*)\)$")
_MAX_SHOWN = 60
_MAX_REASON = 200

T = TypeVar("T", bound=BaseSettings)

log = logging.getLogger(__name__)


class StartupError(Exception):
    """One reason a service cannot start: the setting (a settings field such as `agi_listen`,
    or a variable name), what is wrong with it, the fix, and the exit status."""

    def __init__(self, setting: str, problem: str, fix: str, status: int = CONFIGURATION):
        super().__init__(f"{setting}: {problem} ({fix})")
        self.setting = setting
        self.problem = problem
        self.fix = fix
        self.status = status

    def line(self, where: Callable[[str], str]) -> str:
        """The line without the service's name; `where` names the setting (flag or variable)."""
        return f"cannot start: {where(self.setting)}: {self.problem} ({self.fix})"


# --------------------------------------------------------------------------- settings


def from_settings(
    exc: ValidationError | SettingsError, settings_type: type[BaseSettings]
) -> list[StartupError]:
    """One StartupError per bad setting in pydantic's (or pydantic-settings') exception."""
    if isinstance(exc, SettingsError):
        return [_from_settings_error(exc, settings_type)]
    return [_from_error(error, settings_type) for error in exc.errors(include_url=False)]


def _from_settings_error(exc: SettingsError, settings_type: type[BaseSettings]) -> StartupError:
    # pydantic-settings decodes structured settings (a dict) as JSON before validating them;
    # it names the field only in its message.
    named = re.search(r'field "(\w+)"', str(exc))
    field = named.group(1) if named else "settings"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        problem = f"not valid JSON: {cause.msg} at character {cause.pos + 1}"
    else:
        problem = f"cannot be read: {cause or exc}"
    return StartupError(field, problem, _fix(field, settings_type))


def _from_error(error: Any, settings_type: type[BaseSettings]) -> StartupError:
    loc = error["loc"]
    field = str(loc[0]) if loc else "settings"
    message = str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if not loc or kind == "value_error":
        return _from_message(field, message, settings_type)
    got = _shown(field, error.get("input"))
    default = describe_default(settings_type, field) if field in settings_type.model_fields else ""
    known = default not in ("", "unset", "empty")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        low, high = _bounds(settings_type, field)
        if low is not None and high is not None:
            problem = f"must be from {low} to {high}{got}"
        elif low is not None:
            problem = f"must be at least {low}{got}"
        else:
            problem = f"must be at most {high}{got}"
        fix = "set a value in that range" + (f", or unset it for the default, {default}" * known)
        return StartupError(field, problem, fix)
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return StartupError(field, f"must be a whole number{got}", _example(default, known))
    if kind in ("float_parsing", "float_type", "finite_number"):
        return StartupError(field, f"must be a number{got}", _example(default, known))
    if kind in ("bool_parsing", "bool_type"):
        fix = "1/0, yes/no and on/off work too" + (f"; unset, it is {default}" * known)
        return StartupError(field, f"must be true or false{got}", fix)
    if kind in ("literal_error", "enum"):
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", "")
        fix = f"use {expected}" + (f"; unset, it is {default}" * known)
        return StartupError(field, f"not one of the values it may take{got}", fix)
    if kind == "string_pattern_mismatch":
        return StartupError(field, f"not in the form it must have{got}", _fix(field, settings_type))
    if kind == "dict_type":
        return StartupError(field, f"must be a JSON object{got}", _fix(field, settings_type))
    return StartupError(field, message[0].lower() + message[1:], _fix(field, settings_type))


def _example(default: str, known: bool) -> str:
    return f"e.g. {default}, the default" if known else FALLBACK_FIX


def _from_message(field: str, message: str, settings_type: type[BaseSettings]) -> StartupError:
    """A validator's own words: a leading `CALLERID_*:` and trailing parentheses are the
    setting and the fix (see the module docstring)."""
    named = _NAMED.match(message)
    if named is not None:
        field, message = named.group(1), message[named.end() :]
    own = _OWN_FIX.match(message)
    if own is not None:
        return StartupError(field, own.group("problem"), own.group("fix"))
    return StartupError(field, message, _fix(field, settings_type))


def _bounds(settings_type: type[BaseSettings], field: str) -> tuple[Any, Any]:
    low: Any = None
    high: Any = None
    for item in settings_type.model_fields[field].metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt
    return _number(low), _number(high)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _shown(field: str, value: Any) -> str:
    if field in SECRET_SETTINGS or value is None:
        return ""
    text = repr(value)
    return f", got {text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + '...'}"


def _fix(field: str, settings_type: type[BaseSettings]) -> str:
    fix = FIXES.get(field, FALLBACK_FIX)
    default = describe_default(settings_type, field) if field in settings_type.model_fields else ""
    return fix.format(default=default)


# --------------------------------------------------------------------------- starting


@contextmanager
def listening(field: str, address: str) -> Iterator[None]:
    """Around a listen on `address` (the value of setting `field`): an OSError becomes a
    StartupError saying why, in the setting's terms."""
    try:
        yield
    except OSError as exc:
        raise _listen_error(field, address, exc) from exc


def _listen_error(field: str, address: str, exc: OSError) -> StartupError:
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return StartupError(
            field,
            f"the host in {address!r} is not known: {reason}",
            "use an IP address of this host, or 0.0.0.0 for all",
        )
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            field,
            f"{address} is already in use by another process",
            "stop that process, or choose a free port",
            ENVIRONMENT,
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            field,
            f"{address} is not an address of this host",
            "use one of its addresses, or 0.0.0.0 for all",
        )
    if exc.errno == errno.EACCES:
        return StartupError(
            field,
            f"no permission to listen on {address}",
            "use a port above 1023; lower ones need root or CAP_NET_BIND_SERVICE",
        )
    return StartupError(
        field, f"cannot listen on {address}: {reason}", "check the address", ENVIRONMENT
    )


def from_config_error(exc: ConfigError, nodes: str | None) -> StartupError:
    """A node source that cannot be used (`shared.nodes.ConfigError`). Its message names
    source, node and field; it is about `CALLERID_NODES` unless it names another setting.
    `nodes` is that setting's value: Redis not answering there is this host's problem."""
    message = str(exc)
    if _NAMED.match(message):
        return _from_message("nodes", message, BaseSettings)
    cause = exc.__cause__
    if nodes is not None and nodes.startswith(("redis://", "rediss://", "unix://")):
        # Imported here: redis is only this branch's business.
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(cause, RedisConnectionError | RedisTimeoutError | OSError):
            return StartupError(
                "nodes",
                message,
                "the nodes are read from that Redis: start it or correct the URL; "
                "a restart tries again",
                ENVIRONMENT,
            )
    if isinstance(cause, OSError):
        return StartupError("nodes", message, "name the nodes YAML file, readable by the service")
    return StartupError("nodes", message, NODES_FIX)


# --------------------------------------------------------------------------- degraded starts

CACHE_PROBE_TIMEOUT = 1.0
"""Seconds the start-up ping of the cache's Redis may take: longer than an operation's
`CALLERID_CACHE_TIMEOUT` (a first connection on a busy host), short enough not to hold the
start up."""


async def warn_if_cache_unreachable(url: str, *, timeout: float = CACHE_PROBE_TIMEOUT) -> bool:
    """Ping the answer cache's Redis once; when it does not answer, log one WARNING naming
    CALLERID_REDIS_URL. The service starts either way: the cache fails open (README, "Failure
    behaviour"), so a Redis that is down costs CRM lookups, not calls. Whether it answered."""
    from redis.exceptions import RedisError

    from shared.redis_url import fail_fast_client, parse_redis_url, redacted

    client = fail_fast_client(parse_redis_url(url), timeout=timeout, max_connections=1)
    try:
        async with asyncio.timeout(3 * timeout):  # Sentinel: each sentinel has `timeout`
            await client.ping()
    except (RedisError, OSError) as exc:  # TimeoutError is an OSError
        # redis-py's Sentinel errors carry the reprs of whole clients: the first clause is
        # what matters, and no repr may show a password.
        reason = (str(exc) or type(exc).__name__).split(" : <")[0]
        reason = re.sub(r"password=[^,)>\s]+", "password=***", reason)[:_MAX_REASON]
        log.warning(
            "CALLERID_REDIS_URL: no usable answer from %s (%s): running without the answer "
            "cache until there is, every lookup goes to the CRM (start Redis or correct the URL)",
            redacted(url),
            reason,
        )
        return False
    finally:
        await client.aclose()
    return True


# --------------------------------------------------------------------------- reporting


def origins(
    parser: argparse.ArgumentParser, settings_type: type[BaseSettings], flags: set[str]
) -> Callable[[str], str]:
    """How a line names a setting: the flag when the value came from one (`flags`: the
    fields given as flags), else its environment variable; a variable name stays as it is."""

    def where(setting: str) -> str:
        if setting in flags:
            options = [a.option_strings[-1] for a in parser._actions if a.dest == setting]
            if options:
                return options[0]
        if setting in settings_type.model_fields:
            return env_name(settings_type, setting)
        return setting

    return where


def load_settings(
    parser: argparse.ArgumentParser, settings_type: type[T], overrides: dict[str, Any]
) -> T | int:
    """`settings_type` from the environment and `overrides` (the flags given, by field); when
    they are invalid, one line per bad setting is logged and the exit status returned."""
    try:
        return settings_type(**overrides)
    except (ValidationError, SettingsError) as exc:
        where = origins(parser, settings_type, set(overrides))
        return report(parser.prog, from_settings(exc, settings_type), where)


def report(service: str, errors: list[StartupError], where: Callable[[str], str]) -> int:
    """Log one ERROR line per error under the service's name; the exit status to return."""
    logger = _logger(service)
    for error in errors:
        logger.error("%s", error.line(where))
    return max(error.status for error in errors)


def report_unexpected(service: str, exc: BaseException) -> int:
    """An exception nothing translated: a bug. One ERROR line; the traceback only at DEBUG."""
    logger = _logger(service)
    logger.error(
        "stopped by an unexpected error: %s: %s (a bug: run it with CALLERID_LOG_LEVEL=DEBUG "
        "for where it happened, and report it)",
        type(exc).__name__,
        str(exc)[:300] or "no message",
    )
    logger.debug("the unexpected error", exc_info=exc)
    return UNEXPECTED


def _logger(service: str) -> logging.Logger:
    # Settings are checked before logging is configured from them: a plain handler on stderr
    # then (a no-op when logging is configured already, or under pytest's capture).
    logging.basicConfig(format=LOG_FORMAT)
    return logging.getLogger(service)
