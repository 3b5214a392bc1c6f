"""The shared store: names and live registrations in Redis, for a fleet of beacons.

Every operation that reads and writes is one Lua script, which Redis runs atomically: two
beacons claiming one name at once can't both win, and a key's oldest name is given up in the
same step that claims its new one. Names carry no Redis TTL (their expiry is the owner's last
use, kept in a sorted set and swept by :meth:`RedisStore.expire_names`, as the SQLite store does);
registrations and guests do (``PX``), renewed by every refresh. The key layout is documented in
``docs/beacon.md``; all keys sit under one prefix, and the scripts compute the keys they touch,
so the store needs one Redis (or a primary with replicas), not a Redis Cluster.

Every call fails with StoreUnavailableError when Redis is unreachable or answers with an error;
the caller bounds how long it waits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...errors import ConfigError, StoreUnavailableError
from ...net.traversal.beacon_wire import Status
from .base import Claim, Found, NameLimits, Registration, RelayTarget

PREFIX = "pilot:"
EXPIRE_BATCH = 1_000  # names deleted per sweep at most: one script never holds Redis long
MAX_CONNECTIONS = 32  # to Redis, per beacon

# Shared by the scripts: drop a name and its entries in the indexes.
_RELEASE = """
local function release(p, name)
  local fields = redis.call('HMGET', p .. 'name:' .. name, 'key', 'source')
  if not fields[1] then return end
  redis.call('DEL', p .. 'name:' .. name)
  redis.call('ZREM', p .. 'names', name)
  redis.call('ZREM', p .. 'key:' .. fields[1], name)
  redis.call('SREM', p .. 'source:' .. fields[2], name)
end
"""

# ARGV: prefix, name, key (hex), now (ns), source IP, names per key, names per source.
# Returns {status, owner (hex or ''), released names...}.
_CLAIM = (
    _RELEASE
    + """
local p, name, key, now, source = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local per_key, per_source = tonumber(ARGV[6]), tonumber(ARGV[7])
local owner = redis.call('HGET', p .. 'name:' .. name, 'key')
if owner == key then
  redis.call('HSET', p .. 'name:' .. name, 'used', now)
  redis.call('ZADD', p .. 'names', now, name)
  return {'ok', key}
end
if owner then return {'taken', owner} end
if redis.call('SCARD', p .. 'source:' .. source) >= per_source then return {'limit', ''} end
local result = {'ok', key}
local held = redis.call('ZRANGE', p .. 'key:' .. key, 0, -1)
for i = 1, #held - per_key + 1 do
  release(p, held[i])
  table.insert(result, held[i])
end
redis.call('HSET', p .. 'name:' .. name, 'key', key, 'claimed', now, 'used', now,
           'source', source)
redis.call('ZADD', p .. 'names', now, name)
redis.call('ZADD', p .. 'key:' .. key, now, name)
redis.call('SADD', p .. 'source:' .. source, name)
return result
"""
)

# ARGV: prefix, name. Returns {owner (hex or ''), registration (JSON or '')}.
_FIND_NAME = """
local p, name = ARGV[1], ARGV[2]
local owner = redis.call('HGET', p .. 'name:' .. name, 'key')
if not owner then return {'', ''} end
return {owner, redis.call('GET', p .. 'reg:' .. owner) or ''}
"""

# Shared by the scripts: the key as a guest of beacon id ``at`` ('' for none), JSON or ''.
_GUEST = """
local function guest(p, at, key)
  if at == '' then return '' end
  return redis.call('GET', p .. 'guest:' .. at .. ':' .. key) or ''
end
"""

# ARGV: prefix, key (hex), beacon id or ''. Returns {oldest name or '', registration (JSON or
# ''), guest (JSON or '')}.
_FIND_KEY = (
    _GUEST
    + """
local p, key = ARGV[1], ARGV[2]
local names = redis.call('ZRANGE', p .. 'key:' .. key, 0, 0)
return {names[1] or '', redis.call('GET', p .. 'reg:' .. key) or '', guest(p, ARGV[3], key)}
"""
)

# ARGV: prefix, cutoff (ns), batch. Returns how many names went.
_EXPIRE = (
    _RELEASE
    + """
local p = ARGV[1]
local names = redis.call('ZRANGEBYSCORE', p .. 'names', '-inf', '(' .. ARGV[2],
                         'LIMIT', 0, tonumber(ARGV[3]))
for _, name in ipairs(names) do release(p, name) end
return #names
"""
)

# ARGV: prefix, key (hex), beacon id or ''. Returns {registration (JSON or ''), guest (JSON or
# ''), sender, until, sender, until...}.
_RELAY_TARGET = (
    _GUEST
    + """
local p, key = ARGV[1], ARGV[2]
local result = {redis.call('GET', p .. 'reg:' .. key) or '', guest(p, ARGV[3], key)}
for _, value in ipairs(redis.call('HGETALL', p .. 'blocks:' .. key)) do
  table.insert(result, value)
end
return result
"""
)

# ARGV: prefix, receiver (hex), sender (hex), until (wall ns; '0' lifts), milliseconds it lasts.
# The hash lives until its longest block ends (PTTL is -1 for the hash HSET just created).
_BLOCK = """
local blocks = ARGV[1] .. 'blocks:' .. ARGV[2]
if ARGV[4] == '0' then return redis.call('HDEL', blocks, ARGV[3]) end
redis.call('HSET', blocks, ARGV[3], ARGV[4])
if redis.call('PTTL', blocks) < tonumber(ARGV[5]) then redis.call('PEXPIRE', blocks, ARGV[5]) end
return 1
"""

_CLAIM_STATUS = {b"ok": Status.OK, b"taken": Status.NAME_TAKEN, b"limit": Status.NAME_LIMIT}


def _text(value: bytes) -> str:
    return value.decode()


def _key(value: bytes) -> bytes | None:
    return bytes.fromhex(value.decode()) if value else None


class RedisStore:
    """A store in the Redis at ``url`` (``redis://[:PASSWORD@]HOST:PORT/DB`` or ``rediss://``)."""

    def __init__(self, url: str, *, timeout: float = 2.0, prefix: str = PREFIX) -> None:
        try:
            # Calls beyond the pool's connections wait for one (within the caller's timeout)
            # rather than each opening its own.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"--store {self._hide_password(url)}: {exc}") from None
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        # The publications of one event-loop turn, sent together by one task.
        self._publications: list[tuple[str, str, int]] | None = None
        self._published: asyncio.Future[None] | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._url = self._hide_password(url)
        self._prefix = prefix
        self._claim = self._redis.register_script(_CLAIM)
        self._find_name = self._redis.register_script(_FIND_NAME)
        self._find_key = self._redis.register_script(_FIND_KEY)
        self._expire = self._redis.register_script(_EXPIRE)
        self._relay_target = self._redis.register_script(_RELAY_TARGET)
        self._block = self._redis.register_script(_BLOCK)

    @staticmethod
    def _hide_password(url: str) -> str:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def synchronous(self) -> bool:
        return False

    def describe(self) -> str:
        return self._url

    async def check(self) -> None:
        """Raises StoreUnavailableError unless Redis answers."""
        await self._run(self._redis.ping())

    async def claim_name(
        self, name: str, key: bytes, now_ns: int, source: str, limits: NameLimits
    ) -> Claim:
        args: list[str | int] = [
            self._prefix,
            name,
            key.hex(),
            now_ns,
            source,
            limits.per_key,
            limits.per_source,
        ]
        reply = await self._run(self._claim(args=args))
        return Claim(_CLAIM_STATUS[reply[0]], _key(reply[1]), tuple(map(_text, reply[2:])))

    async def find_name(self, name: str) -> Found:
        owner, registration = await self._run(self._find_name(args=[self._prefix, name]))
        key = _key(owner)
        return Found(key, name, self._registration(key, registration))

    async def find_key(self, key: bytes, guest_at: str | None = None) -> Found:
        args = [self._prefix, key.hex(), guest_at or ""]
        name, registration, guest = await self._run(self._find_key(args=args))
        return Found(
            key,
            _text(name) or None,
            self._registration(key, registration),
            self._registration(key, guest),
        )

    async def publish(self, registration: Registration, ttl: float) -> None:
        """Every node's refresh publishes: those of one event-loop turn (a datagram batch) go
        to Redis in one pipeline, one round trip."""
        await self._set(f"{self._prefix}reg:{registration.key.hex()}", registration, ttl)

    async def publish_guest(self, guest: Registration, ttl: float) -> None:
        """In the pipeline of the publications: a guest refreshes as often as a node does."""
        await self._set(f"{self._prefix}guest:{guest.home}:{guest.key.hex()}", guest, ttl)

    async def _set(self, key: str, registration: Registration, ttl: float) -> None:
        entry = (key, registration.to_json(), max(1, int(ttl * 1000)))
        if self._publications is None or self._published is None:
            self._publications = []
            self._published = asyncio.get_running_loop().create_future()
            sender = asyncio.create_task(self._send_publications())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        self._publications.append(entry)
        # Shielded: a caller that stops waiting must not cancel the others' publication.
        await asyncio.shield(self._published)

    async def _send_publications(self) -> None:
        entries, done = self._publications, self._published
        self._publications = self._published = None
        assert entries is not None and done is not None
        pipeline = self._redis.pipeline(transaction=False)
        for key, value, ttl_ms in entries:
            pipeline.set(key, value, px=ttl_ms)
        try:
            await self._run(pipeline.execute())
            done.set_result(None)
        except StoreUnavailableError as exc:
            self._fail(done, exc)
        except asyncio.CancelledError:
            self._fail(done, StoreUnavailableError(f"{self._url}: the store was closed"))
            raise

    @staticmethod
    def _fail(done: asyncio.Future[None], error: StoreUnavailableError) -> None:
        done.set_exception(error)
        done.exception()  # retrieved: callers that gave up waiting leave nobody to read it

    async def expire_names(self, unused_since_ns: int) -> int:
        args: list[str | int] = [self._prefix, unused_since_ns, EXPIRE_BATCH]
        return int(await self._run(self._expire(args=args)))

    async def name_count(self) -> int:
        return int(await self._run(self._redis.zcard(f"{self._prefix}names")))

    async def block_relay(self, receiver: bytes, sender: bytes, until_ns: int) -> None:
        """A hash of the receiver's blocks, kept until its longest block ends (the relaying
        worker ignores those that ended before)."""
        lasts_ms = max(1, (until_ns - time.time_ns()) // 1_000_000) if until_ns else 0
        args: list[str | int] = [self._prefix, receiver.hex(), sender.hex(), until_ns, lasts_ms]
        await self._run(self._block(args=args))

    async def relay_target(self, key: bytes, guest_at: str | None = None) -> RelayTarget:
        args = [self._prefix, key.hex(), guest_at or ""]
        reply = await self._run(self._relay_target(args=args))
        blocks = {
            bytes.fromhex(reply[i].decode()): int(reply[i + 1]) for i in range(2, len(reply), 2)
        }
        return RelayTarget(
            self._registration(key, reply[0]), blocks, self._registration(key, reply[1])
        )

    async def aclose(self) -> None:
        for sender in self._senders:
            sender.cancel()
        await self._redis.aclose()

    @staticmethod
    def _registration(key: bytes | None, text: bytes) -> Registration | None:
        return Registration.from_json(key, text) if key is not None and text else None

    async def _run(self, call: Any) -> Any:
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{self._url}: {exc}") from None
