"""`callerid-cache-purge`: remove cached CRM answers for a node, or for one customer of a node.

For the engineer on call: after a CRM fix, answers cached before it (up to the node's TTL) can
be dropped at once instead of waiting them out. Uses the resolvers' own settings
(`CALLERID_REDIS_URL`, `CALLERID_CACHE_KEY_PEPPER`), because keys hold only a hash of the id.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from crm_resolver.redis_cache import CacheUnavailable, RedisCache
from crm_resolver.settings import ResolverSettings
from shared.redis_url import RedisUrlError
from shared.startup_errors import load_settings

_NODE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_CUSTOMER_ID = re.compile(r"[0-9]{1,30}")


async def purge(settings: ResolverSettings, node_id: str, customer_id: str | None) -> int:
    assert settings.redis_url is not None
    # A purge is not on a caller's path: give Redis seconds, not the hot path's milliseconds.
    cache = RedisCache.from_url(settings.redis_url, timeout=5.0, pepper=settings.cache_key_pepper)
    try:
        return await cache.purge(node_id, customer_id)
    finally:
        await cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callerid-cache-purge", description=__doc__)
    parser.add_argument("--node", required=True, help="node id whose cached answers go")
    parser.add_argument("--customer", help="only this customer id (digits)")
    parser.add_argument("--redis-url", help="Redis URL (CALLERID_REDIS_URL)")
    args = parser.parse_args(argv)
    if not _NODE_ID.fullmatch(args.node):
        parser.error("--node: 1-64 letters, digits, '_' or '-'")
    if args.customer is not None and not _CUSTOMER_ID.fullmatch(args.customer):
        parser.error("--customer: 1-30 digits")
    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    settings = load_settings(parser, ResolverSettings, overrides)
    if isinstance(settings, int):
        return settings  # one line per bad setting was logged (shared.startup_errors)
    if not settings.redis_url:
        parser.error("no Redis: set CALLERID_REDIS_URL or pass --redis-url")
    try:
        removed = asyncio.run(purge(settings, args.node, args.customer))
    except (CacheUnavailable, RedisUrlError) as exc:
        print(f"callerid-cache-purge: {exc}", file=sys.stderr)
        return 1
    what = "its customer" if args.customer else "all customers"
    print(f"removed {removed} cached answer(s) of node {args.node} ({what})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
