"""`callerid-cache-purge` against the real Redis: what the engineer on call runs."""

from __future__ import annotations

import asyncio

import pytest

from crm_resolver.ports import CacheMiss, CrmAnswer
from crm_resolver.purge import main
from crm_resolver.redis_cache import RedisCache
from shared.outcomes import Verdict

pytestmark = pytest.mark.integration
TRUE = CrmAnswer(Verdict.TRUE)


async def test_purge_one_customer_then_a_node(
    redis_base_url: str,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One customer's answer goes, then the rest of the node; other nodes keep theirs."""
    monkeypatch.setenv("CALLERID_REDIS_URL", redis_base_url)
    monkeypatch.setenv("CALLERID_CACHE_KEY_PEPPER", unique_name)
    node, other = f"{unique_name}-a", f"{unique_name}-b"
    cache = RedisCache.from_url(redis_base_url, timeout=1.0, pepper=unique_name)
    try:
        for customer in ("111", "222", "333"):
            await cache.put(node, customer, TRUE, 60)
        await cache.put(other, "111", TRUE, 60)

        assert await asyncio_main(["--node", node, "--customer", "222"]) == 0
        assert "removed 1 cached answer(s)" in capsys.readouterr().out
        assert await cache.fetch(node, "222") is CacheMiss.MISS
        assert await cache.fetch(node, "111") == TRUE

        assert await asyncio_main(["--node", node]) == 0
        assert "removed 2 cached answer(s)" in capsys.readouterr().out
        assert await cache.fetch(node, "111") is CacheMiss.MISS
        assert await cache.fetch(other, "111") == TRUE
    finally:
        await cache.purge(other)
        await cache.close()


async def asyncio_main(argv: list[str]) -> int:
    """main() runs its own event loop: run it in a thread from this async test."""
    return await asyncio.to_thread(main, argv)


@pytest.mark.parametrize(
    "argv", [["--node", "a b"], ["--node", "1", "--customer", "12x"], ["--customer", "1"]]
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    """Malformed node or customer ids, or no node at all, stop before touching Redis."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
