"""Session state in Redis (standalone or Redis Cluster), shared by the ``redis`` and ``cache`` storages.

Layout, every key sharing the session's hash tag ``{uid}`` so that a session
lives on one Redis Cluster shard (sessions spread over the shards)::

    <prefix>{<uid>}:s      hash: v (configuration version), tasks, i:<trigger> (index),
                           n:<task> (counters), k:<trigger> (latest kwargs),
                           m:<key> (metadata), wv:<task> / av (versions), o (open instances)
    <prefix>{<uid>}:c      the configuration (JSON)
    <prefix>{<uid>}:w:<task>  hash: the task's waiting instances (unstarted)
    <prefix>{<uid>}:l:<task>  hash: the task's delayed instances (read by its unless triggers)
    <prefix>{<uid>}:a      hash: active instances (scheduled, running, failed)
    <prefix>{<uid>}:d      hash: done instances (finished, abandoned, replayed, skipped)
    <prefix>{<uid>}:h      list: the history (bounded)
    lock:<prefix>{<uid>}:lock / :hooks   the session and hook locks (python-redis-lock)

A step is optimistic and takes two round trips: a Lua script reads what the
step needs — for a fired trigger it follows the stored index to the counters
and waiting instances of the tasks that react to it and the latest kwargs of
their triggers — and a second script checks that nothing the step read has
changed (comparing SHA-1 digests of the values, field by field) and applies the
writes and the history events, or does nothing and the step runs again. Lua
rather than ``WATCH``: a check per field (not per key) means that steps on one
session conflict only when they touch the same records, a script needs no
connection kept between the round trips, and it runs unchanged on Redis
Cluster. A session expires ``timeout`` seconds after it became idle (nothing
open), never while it has open work.
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from triggers.exceptions import CorruptSessionState, InvalidArgument, StorageError
from triggers.locking import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    BaseLock,
    RedisSessionLock,
    require_redis,
)
from triggers.storages import _records as records
from triggers.storages.base import (
    BaseTriggerStorage,
    SessionStep,
    Want,
    history_limit,
    idempotency_limit,
)
from triggers.timers import CLAIM_SECONDS, due_at
from triggers.types import STATUS_RUNNING, STATUS_SCHEDULED, TaskInstance

__all__ = ["DueIndex", "RedisEngine", "RedisStorageBackend"]

logger = logging.getLogger(__name__)

_READ = """
local s, a, d = KEYS[1], KEYS[2], KEYS[3]
-- The arguments come as one JSON array (cheaper to send than many arguments).
local A = cjson.decode(ARGV[1])
local P = A[1]
local i = 2
local function take() local v = A[i]; i = i + 1; return v end
local fields, seen, tasks, tseen, late, lseen = {'v', 'sw'}, {v = true, sw = true}, {}, {}, {}, {}
local function field(f) if not seen[f] then seen[f] = true; fields[#fields + 1] = f end end
local function task(t)
  if not tseen[t] then tseen[t] = true; tasks[#tasks + 1] = t; field('n:' .. t); field('wv:' .. t) end
end
local function delayed(t)
  if not lseen[t] then lseen[t] = true; late[#late + 1] = t; field('lv:' .. t) end
end
if redis.call('HEXISTS', s, 'v') == 0 and redis.call('EXISTS', P .. 'state') == 1 then
  return {'old'}
end
local n = tonumber(take())
for _ = 1, n do
  local t = take()
  field('k:' .. t)
  local ix = redis.call('HGET', s, 'i:' .. t)
  if ix then
    local e = cjson.decode(ix)
    for _, x in ipairs(e[1]) do task(x) end
    for _, x in ipairs(e[2]) do field('k:' .. x) end
    for _, x in ipairs(e[3] or {}) do delayed(x) end
  end
end
n = tonumber(take())
for _ = 1, n do task(take()) end
n = tonumber(take())
for _ = 1, n do delayed(take()) end
n = tonumber(take())
for _ = 1, n do field(take()) end
local names = {}
n = tonumber(take())
for _ = 1, n do names[#names + 1] = take() end
local open = take() == '1'
local all = take() == '1'
local fields_only = take() == '1'
local idempotency = {}
n = tonumber(take())
for _ = 1, n do
  local key = take()
  idempotency[#idempotency + 1] = key
  idempotency[#idempotency + 1] = redis.call('HGET', P .. 'y', key)
end
if open or all then
  local listed = redis.call('HGET', s, 'tasks')
  if listed then for _, x in ipairs(cjson.decode(listed)) do task(x); delayed(x) end end
  field('av')
end
local values = redis.call('HMGET', s, unpack(fields))
local waiting = {}
for _, t in ipairs(tasks) do
  waiting[#waiting + 1] = t
  waiting[#waiting + 1] = redis.call('HGETALL', P .. 'w:' .. t)
end
local later = {}
for _, t in ipairs(late) do
  later[#later + 1] = t
  later[#later + 1] = redis.call('HGETALL', P .. 'l:' .. t)
end
local found = {}
for _, name in ipairs(names) do
  local t = string.match(name, '^(.*)#[^#]*$') or name
  found[#found + 1] = name
  found[#found + 1] = redis.call('HGET', P .. 'w:' .. t, name)
  found[#found + 1] = redis.call('HGET', P .. 'l:' .. t, name)
  found[#found + 1] = redis.call('HGET', a, name)
  found[#found + 1] = redis.call('HGET', d, name)
end
local active, done, everything = {}, {}, {}
if open or all then active = redis.call('HGETALL', a) end
if all then done = redis.call('HGETALL', d) end
if all or fields_only then everything = redis.call('HGETALL', s) end
local reply = {'ok', fields, values, waiting, found, active, done, everything, idempotency, later}
if take() == '1' then return cjson.encode(reply) end  -- one string: cheap to read
return reply
"""

_COMMIT = """
local A = cjson.decode(ARGV[1])
-- The due index (a key of another slot, on a standalone server only): its position in
-- KEYS, then ops {'A', member, due} / {'R', member} applied with the step.
local X = cjson.decode(ARGV[2] or '[0, []]')
local lock = KEYS[6]
if redis.call('EXISTS', lock) == 1 and redis.call('GET', lock) ~= A[1] then return 'locked' end
local token = A[2]
if redis.call('TYPE', KEYS[9])['ok'] == 'zset' then
  -- Fenced by a resolve: never applied. Present: applied already (a client re-sent it).
  if redis.call('ZSCORE', KEYS[9], '!' .. token) then return 'aborted' end
  if redis.call('ZSCORE', KEYS[9], token) then return 'ok' end
end
local i = 3
local function take() local v = A[i]; i = i + 1; return v end
local n = tonumber(take())
for _ = 1, n do
  local k, f, e = KEYS[tonumber(take())], take(), take()
  local v = redis.call('HGET', k, f)
  local seen = ''
  if v then seen = redis.sha1hex(v) end
  if seen ~= e then return 'conflict' end
end
-- Nothing is written unless every write can succeed: Lua does not roll back.
local kinds = {'hash', 'hash', 'hash', 'list', 'string', 'string', 'hash', 'list', 'zset'}
if X[1] > 0 then kinds[X[1]] = 'zset' end
for j = 1, #KEYS do
  if j ~= 6 then
    local kind = redis.call('TYPE', KEYS[j])['ok']
    if kind ~= 'none' and kind ~= (kinds[j] or 'hash') then return 'corrupt:' .. KEYS[j] end
  end
end
local opened = redis.call('HGET', KEYS[1], 'o')
if opened and not tonumber(opened) then return 'corrupt:' .. KEYS[1] end
n = tonumber(take())
local first = i
for _ = 1, n do
  local op, k, f = take(), KEYS[tonumber(take())], take()
  if op ~= 'D' then
    local value = take()
    if op == 'I' then
      local current = redis.call('HGET', k, f)
      if current and not tonumber(current) then return 'corrupt:' .. k end
    end
  end
end
i = first
for _ = 1, n do
  local op, k, f = take(), KEYS[tonumber(take())], take()
  if op == 'S' then redis.call('HSET', k, f, take())
  elseif op == 'D' then redis.call('HDEL', k, f)
  elseif op == 'I' then redis.call('HINCRBY', k, f, tonumber(take()))
  elseif op == 'C' then redis.call('SET', k, take())
  end
end
n = tonumber(take())
local limit = tonumber(take())
for _ = 1, n do
  local event = take()
  if limit > 0 then redis.call('RPUSH', KEYS[4], event) end
end
if n > 0 and limit > 0 then redis.call('LTRIM', KEYS[4], -limit, -1) end
n = tonumber(take())
local kept = tonumber(take())
for _ = 1, n do redis.call('RPUSH', KEYS[8], take()) end
if n > 0 then
  while redis.call('LLEN', KEYS[8]) > kept do
    local oldest = redis.call('LPOP', KEYS[8])
    if oldest then redis.call('HDEL', KEYS[7], oldest) end
  end
end
local delta, timeout, P, window = tonumber(take()), tonumber(take()), take(), tonumber(take())
-- The step's token, kept for ``window`` ms (server time) so that a client that lost
-- the reply can tell that it was applied.
local clock = redis.call('TIME')
local ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[9], ms, token)
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', ms - window)
local open = redis.call('HINCRBY', KEYS[1], 'o', delta)
if timeout > 0 and (open <= 0 or open - delta <= 0) then
  -- Every key of the session: the fixed ones and the per-task ones of every task.
  local all = {}
  for j = 1, #KEYS do if j ~= 6 and j ~= X[1] then all[#all + 1] = KEYS[j] end end
  local listed = redis.call('HGET', KEYS[1], 'tasks')
  if listed then
    for _, t in ipairs(cjson.decode(listed)) do
      all[#all + 1] = P .. 'w:' .. t
      all[#all + 1] = P .. 'l:' .. t
    end
  end
  for _, k in ipairs(all) do
    if open <= 0 then redis.call('EXPIRE', k, timeout) else redis.call('PERSIST', k) end
  end
end
-- The tokens matter for ``window`` ms after the last step: then they go (or with the
-- rest of an idle session, if that expires sooner).
if timeout > 0 and open <= 0 then window = math.min(window, timeout * 1000) end
redis.call('PEXPIRE', KEYS[9], window)
if X[1] > 0 then
  for _, op in ipairs(X[2]) do
    if op[1] == 'A' then redis.call('ZADD', KEYS[X[1]], op[3], op[2])
    else redis.call('ZREM', KEYS[X[1]], op[2]) end
  end
end
return 'ok'
"""

_RESOLVE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'zset' and redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'applied' end
local clock = redis.call('TIME')
local ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], ms, '!' .. ARGV[1])
if kind == 'none' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 'absent'
"""

_CLAIM = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(found) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], m) end
return found
"""

_SWEPT = """
-- The members of this session that the sweep claimed (their score is its claim) get
-- the due time the sweep found, or go; those a step changed meanwhile are the step's.
local dues = cjson.decode(ARGV[3])  -- member -> due time
local claimed = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[2])
for _, m in ipairs(claimed) do
  if cjson.decode(m)[1] == ARGV[1] then
    local due = dues[m]
    if due then redis.call('ZADD', KEYS[1], due, m) else redis.call('ZREM', KEYS[1], m) end
  end
end
return 1
"""

_S, _A, _D, _H, _C, _LOCK, _Y, _YL, _T = 1, 2, 3, 4, 5, 6, 7, 8, 9

#: Shards of the due index: sorted sets ``<prefix>due:{<n>}`` (on Redis Cluster each on
#: the slot of its own hash tag, so that no single key takes every write).
DUE_SHARDS = 16


class DueIndex:
    """The open instances with time-driven work, by when it is due (see
    :mod:`triggers.timers`), in :data:`DUE_SHARDS` sorted sets.

    A member is ``["<uid>","<instance>"]``; every member of a session is in the same
    shard. A step's commit script sets the members of the instances it writes (their
    due time, or removes them) atomically with the step on a standalone server; on
    Redis Cluster (another slot) the step adds them before its commit and removes them
    after it, so that a step cut off in between leaves a member too many (which a
    sweep drops), never one too few. A sweep claims the members that are due (moving
    them :data:`~triggers.timers.CLAIM_SECONDS` ahead, so that another sweep does not take them), does
    their sessions' work in steps that write the session's ``sw`` field — which every
    step reads and checks at commit: a step that wrote the index before the claim
    but commits after the sweep runs again — and then gives each claimed member the
    due time it found, or removes it.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = type(client).__name__ == "RedisCluster"
        self._claim = client.register_script(_CLAIM)
        self._swept = client.register_script(_SWEPT)

    def key(self, shard: int) -> str:
        return f"{self.prefix}due:{{{shard}}}"

    def key_of(self, uid: str) -> str:
        return self.key(zlib.crc32(uid.encode("utf-8")) % DUE_SHARDS)

    @staticmethod
    def member(uid: str, name: str) -> str:
        return json.dumps([uid, name], separators=(",", ":"))

    def claim(self, until: float, limit: int) -> list[str]:
        uids: list[str] = []
        first = random.randrange(DUE_SHARDS)  # no shard waits behind the others
        for n in range(DUE_SHARDS):
            if len(uids) >= limit:
                break
            found = self._claim(keys=[self.key((first + n) % DUE_SHARDS)],
                                args=[repr(until), repr(until + CLAIM_SECONDS), limit])
            for member in found:
                uid = json.loads(_text(member))[0]
                if uid not in uids:
                    uids.append(uid)
        return uids

    def swept(self, uid: str, dues: dict[str, float], until: float) -> None:
        members = {self.member(uid, name): due for name, due in dues.items()}
        self._swept(keys=[self.key_of(uid)],
                    args=[uid, repr(until + CLAIM_SECONDS), json.dumps(members) if members
                          else "{}"])


#: Seconds (at least) the token of an applied step is kept, however many steps follow.
TOKEN_WINDOW = 120.0


class _ConfigChanged(Exception):
    """The configuration was replaced between reading its version and reading it."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisEngine:
    """The records of one session in Redis, read and written by two Lua scripts."""

    def __init__(self, storage: BaseTriggerStorage, client: Any, prefix: str,
                 timeout: int | None, where: str, index_prefix: str) -> None:
        self.storage = storage
        self.uid = storage.uid
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.where = where
        self._read = client.register_script(_READ)
        self._commit = client.register_script(_COMMIT)
        self._resolve = client.register_script(_RESOLVE)
        self.index = DueIndex(client, index_prefix)

    # -- keys -------------------------------------------------------------------

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    def waiting_key(self, task: str) -> str:
        return self.prefix + "w:" + task

    def delayed_key(self, task: str) -> str:
        return self.prefix + "l:" + task

    @property
    def lock_name(self) -> str:
        return self.prefix + "lock"

    def fixed_keys(self) -> list[str]:
        return [self.key("s"), self.key("a"), self.key("d"), self.key("h"), self.key("c"),
                "lock:" + self.lock_name, self.key("y"), self.key("yl"), self.key("t")]

    # -- errors -----------------------------------------------------------------

    def failed(self, exc: BaseException, more: str = "") -> StorageError:
        from redis.exceptions import ResponseError

        if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
            return CorruptSessionState(
                f"Stored state of session {self.uid!r} is corrupt: a key of it "
                f"({self.prefix}…) holds a value of another type ({exc}). Nothing was executed.",
                session_uid=self.uid)
        return StorageError(
            f"Redis failed for session {self.uid!r} ({self.where}): {type(exc).__name__}: "
            f"{exc}.{more}", session_uid=self.uid)

    def call(self, script: Any, keys: list[str], args: list[Any], more: str = "") -> Any:
        try:
            return script(keys=keys, args=args)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise self.failed(exc, more) from exc

    # -- reading ------------------------------------------------------------------

    def load(self, step: SessionStep, want: Want) -> None:
        args: list[Any] = [self.prefix, len(want.triggers), *sorted(want.triggers)]
        tasks = sorted(want.waiting | want.counters)
        args += [len(tasks), *tasks]
        late = sorted(want.delayed)
        args += [len(late), *late]
        fields = sorted({"k:" + t for t in want.latest} | {"m:" + k for k in want.meta})
        args += [len(fields), *fields]
        names = sorted(want.instances)
        args += [len(names), *names, "1" if want.open else "0", "1" if want.everything else "0",
                 "1" if want.session else "0"]
        idempotency = sorted(want.idempotency)
        args += [len(idempotency), *idempotency]
        keys = [self.key("s"), self.key("a"), self.key("d")]
        for _attempt in range(10):
            reply = self._read_reply(keys, args)
            if _text(reply[0]) == "old":
                self.upgrade()
                reply = self._read_reply(keys, args)
            if step.config is not None:
                break
            version = reply[2][0]  # the first field read is always "v"
            try:
                step.loaded_config(self.config(version))
                break
            except _ConfigChanged:
                continue  # replaced between the two reads: read everything again
        else:
            raise records.corrupt(self.uid, self.prefix + "c",
                                  f"the configuration is not version {_text(version)}")
        (_status, fields_read, values, waiting, found, active, done, everything, remembered,
         later) = reply
        for index in range(0, len(remembered), 2):
            key, raw = _text(remembered[index]), remembered[index + 1]
            step.observed.setdefault("checks", {}).setdefault((self.key("y"), key),
                                                               records.digest(raw))
            step.loaded_idempotency(key, self.decode(raw, "y") if raw is not None else None)
        observed: dict[tuple[str, str], str] = step.observed.setdefault("checks", {})
        session_values: dict[str, Any] = {}
        for field, raw in zip(fields_read, values, strict=True):
            name = _text(field)
            observed.setdefault((self.key("s"), name), records.digest(raw))
            session_values[name] = raw
        config = step.config
        assert config is not None
        self._take_session_fields(step, session_values, complete=False)
        if want.session:
            self._take_session_fields(step, records.flatten(everything), complete=True)
            for task in config.tasks:
                step.loaded_counter(task, 0)
            step.loaded_counter("", 0, complete=True)
        for per_task, kept in ((waiting, records.PLACE_WAITING),
                               (later, records.PLACE_DELAYED)):
            for task, entries in records.flatten(per_task).items():
                step.loaded_waiting(_text(task), [
                    self.instance(_text(n), raw, config) for n, raw in
                    records.flatten(entries).items()], kept)
        for index in range(0, len(found), 5):
            name = _text(found[index])
            task_of = name.rsplit("#", 1)[0]
            instance: TaskInstance | None = None
            place: str | None = None
            for raw, key, where in (
                    (found[index + 1], self.waiting_key(task_of), records.PLACE_WAITING),
                    (found[index + 2], self.delayed_key(task_of), records.PLACE_DELAYED),
                    (found[index + 3], self.key("a"), records.PLACE_ACTIVE),
                    (found[index + 4], self.key("d"), records.PLACE_DONE)):
                observed.setdefault((key, name), records.digest(raw))
                if raw is not None and instance is None:
                    instance, place = self.instance(name, raw, config), where
            step.loaded_instance(name, instance, place)
        if want.open or want.everything:
            open_ = [self.instance(_text(n), raw, config)
                     for n, raw in records.flatten(active).items()]
            for instance in open_:
                step.loaded_instance(instance.name, instance, records.PLACE_ACTIVE)
            waiting_now = [i for task in config.tasks
                           for i in (*step.waiting(task), *step.delayed(task))]
            step.loaded_open([*waiting_now, *open_])
        if want.everything:
            for name, raw in records.flatten(done).items():
                step.loaded_instance(_text(name), self.instance(_text(name), raw, config),
                                     records.PLACE_DONE)

    def _read_reply(self, keys: list[str], args: list[Any]) -> list[Any]:
        """The read script's reply: as one JSON string (fast), or as Redis replies when a
        stored value is not UTF-8 text (so that it is reported as corrupt where it is)."""
        reply = self.call(self._read, keys, [records.dumps([*args, "1"])])
        if isinstance(reply, list):  # {'old'}
            return reply
        try:
            decoded: list[Any] = json.loads(reply)
        except ValueError:
            decoded = self.call(self._read, keys, [records.dumps([*args, "0"])])
            return decoded
        return [_nulls(value) for value in decoded]

    def _take_session_fields(self, step: SessionStep, values: dict[Any, Any],
                             complete: bool) -> None:
        for field, raw in values.items():
            name = _text(field)
            kind, _, rest = name.partition(":")
            if kind == "n":
                try:
                    step.loaded_counter(rest, int(raw) if raw is not None else 0)
                except ValueError as exc:
                    raise records.corrupt(self.uid, self.prefix + "s",
                                          f"counter {name!r} is {raw!r}") from exc
            elif kind == "k":
                step.loaded_latest(rest, self.decode(raw, name) if raw is not None else None)
            elif kind == "m":
                step.loaded_meta(rest, self.decode(raw, name) if raw is not None else None)
        if complete:
            step.loaded_latest("", None, complete=True)
            step.loaded_meta("", None, complete=True)

    def decode(self, raw: Any, where: str) -> Any:
        return records.decode(raw, self.uid, f"{self.prefix}{where}")

    def instance(self, name: str, raw: Any, config: records.ParsedConfig) -> TaskInstance:
        return records.instance_from_json(name, self.decode(raw, name), config.tasks, self.uid,
                                          f"{self.prefix}…[{name}]")

    def config(self, version: Any) -> records.ParsedConfig:
        if version is None:
            return records.EMPTY_CONFIG
        version = _text(version)
        cached = records.cached_config(version)
        if cached is not None:
            return cached
        try:
            raw = self.client.get(self.key("c"))
        except Exception as exc:  # noqa: BLE001
            raise self.failed(exc) from exc
        if raw is None:
            raise records.corrupt(self.uid, self.prefix + "c", "the configuration is missing")
        data = self.decode(raw, "c")
        if not isinstance(data, dict):
            raise records.corrupt(self.uid, self.prefix + "c", "the configuration is not an object")
        if data.get("v") != version:
            raise _ConfigChanged(version)
        return records.parse_config(data.get("tasks"), self.uid, self.prefix + "c", version)

    # -- writing ------------------------------------------------------------------

    def commit(self, step: SessionStep) -> bool:
        keys = self.fixed_keys()
        index: dict[str, int] = {key: n + 1 for n, key in enumerate(keys)}

        def key_index(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]

        checks: dict[tuple[str, str], str] = step.observed.get("checks", {})
        args: list[Any] = [step.observed.get("lock_owner") or "", step.token, len(checks)]
        for (key, field), digest in checks.items():
            args += [key_index(key), field, digest]
        writes: list[Any] = []
        config = step.new_config or step.config
        assert config is not None
        if step.new_config is not None:
            old = step.config
            writes += ["C", _C, "", records.dumps({"v": config.version, "tasks": config.raw}),
                       "S", _S, "v", config.version,
                       "S", _S, "tasks", records.dumps(sorted(config.tasks)),
                       "S", _S, "fmt", str(records.FORMAT_VERSION)]
            for trigger, entry in config.index.items():
                writes += ["S", _S, "i:" + trigger, records.dumps(list(entry))]
            for trigger in (old.index if old is not None else {}):
                if trigger not in config.index:
                    writes += ["D", _S, "i:" + trigger]
        for task, count in step.new_counters.items():
            writes += ["S", _S, "n:" + task, str(count)]
        for trigger, kwargs in step.new_latest.items():
            writes += ["S", _S, "k:" + trigger, records.dumps(kwargs)]
        for key_name, value in step.new_meta.items():
            writes += ["S", _S, "m:" + key_name, records.dumps(value)]
        bumps: dict[str, int] = {}
        for instance, before, after in step.moves():
            task = instance.task_name
            places = {records.PLACE_WAITING: self.waiting_key(task),
                      records.PLACE_DELAYED: self.delayed_key(task),
                      records.PLACE_ACTIVE: self.key("a"), records.PLACE_DONE: self.key("d")}
            if before is not None and before != after:
                writes += ["D", key_index(places[before]), instance.name]
            writes += ["S", key_index(places[after]), instance.name,
                       records.instance_to_json(instance)]
            for place in {before, after}:
                if place == records.PLACE_WAITING:
                    bumps["wv:" + task] = 1
                elif place == records.PLACE_DELAYED:
                    bumps["lv:" + task] = 1
                elif place == records.PLACE_ACTIVE:
                    bumps["av"] = 1
        for field in bumps:
            writes += ["I", _S, field, 1]
        for key_name, names in step.new_idempotency.items():
            writes += ["S", _Y, key_name, records.dumps(names)]
        if step.swept:
            writes += ["S", _S, "sw", repr(time.time())]
        args += [_count_ops(writes), *writes]
        events = step.history()
        limit = history_limit()
        args += [len(events), limit, *[records.dumps(event) for event in events]]
        args += [len(step.new_idempotency), idempotency_limit(), *step.new_idempotency]
        args += [step.open_delta(), self.timeout or 0, self.prefix, self.token_window_ms()]
        due_ops: list[list[Any]] = []
        for instance in step.dirty.values():
            due = due_at(instance)
            member = self.index.member(self.uid, instance.name)
            if due is not None:
                due_ops.append(["A", member, due])
            elif step.status_before(instance.name) in (STATUS_SCHEDULED, STATUS_RUNNING):
                due_ops.append(["R", member])
        outcome = self._commit_or_resolve(keys, [records.dumps(args)], step.token,
                                          (key_index(self.index.key_of(self.uid)), due_ops)
                                          if due_ops and not self.index.cluster else due_ops)
        if outcome == "ok" and due_ops and self.index.cluster:
            # After the commit, the exact times and the removals: a step cut off before
            # them leaves a member too early or too many, which a sweep puts right.
            try:
                pipe = self.index.client.pipeline(transaction=False)
                exact = {op[1]: op[2] for op in due_ops if op[0] == "A"}
                gone = [op[1] for op in due_ops if op[0] == "R"]
                if exact:
                    pipe.zadd(self.index.key_of(self.uid), exact)
                if gone:
                    pipe.zrem(self.index.key_of(self.uid), *gone)
                pipe.execute()
            except Exception:  # noqa: BLE001 - a member too early or too many: swept later
                logger.warning("Could not update the due index of session %r after its step",
                               self.uid, exc_info=True)
        if outcome == "locked":
            step.observed["locked"] = True
            return False
        if outcome == "aborted":
            return False  # not applied: the step runs again
        if outcome.startswith("corrupt:"):
            raise records.corrupt(self.uid, outcome[len("corrupt:"):],
                                  "a key holds a value of another type, or a count is not a "
                                  "number; nothing was written")
        return outcome == "ok"

    def step_applied(self, token: str) -> bool:
        """Whether the step that wrote ``token`` was applied; if not, it never will be
        (the check fences the token)."""
        try:
            outcome = _text(self._resolve(keys=[self.key("t")],
                                          args=[token, self.token_window_ms()]))
        except Exception as exc:  # noqa: BLE001 - a transient error: ask again later
            raise self.failed(exc) from exc
        return outcome == "applied"

    def token_window_ms(self) -> int:
        """How long the tokens of applied steps are kept: longer than any resolve takes."""
        return int(max(TOKEN_WINDOW, 4 * self.storage.lock_timeout) * 1000)

    def _commit_indexed(self, keys: list[str], args: list[Any], index: Any) -> str:
        """Run the commit script with the step's due-index changes: in the script on a
        standalone server (``index`` is the key's position and the ops); on a cluster the
        additions go first, in a call of their own (``index`` is the ops)."""
        if self.index.cluster and index:
            added = {op[1]: op[2] for op in index if op[0] == "A"}
            if added:  # only ever sooner: a step that does not apply delays nothing
                self.index.client.zadd(self.index.key_of(self.uid), added, lt=True)
            index = None
        if not index:
            return _text(self._commit(keys=keys, args=args))
        return _text(self._commit(keys=keys, args=[*args, records.dumps(list(index))]))

    def _commit_or_resolve(self, keys: list[str], args: list[Any], token: str,
                           index: Any = None) -> str:
        """Run the commit script; if the outcome is unknown (the connection broke after the
        script was sent), find out from the step's token whether it was applied.

        The check also fences the token: a commit still in flight is refused afterwards,
        so "absent" means not applied, ever.
        """
        import redis

        try:
            return self._commit_indexed(keys, args, index)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            unknown: BaseException = exc
        except Exception as exc:  # noqa: BLE001 - any other client error: nothing was applied
            raise self.failed(exc) from exc
        deadline = time.monotonic() + max(self.storage.lock_timeout, 1.0)
        delay = 0.05
        while True:
            try:
                outcome = _text(self._resolve(keys=[self.key("t")],
                                              args=[token, self.token_window_ms()]))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                unknown = exc
                if time.monotonic() + delay > deadline:
                    error = self.failed(
                        unknown, " The step may or may not have been applied; retry it with an "
                        "idempotency key to make the retry safe.")
                    error.step_token = token
                    raise error from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            except Exception as exc:  # noqa: BLE001
                raise self.failed(exc) from exc
            return "ok" if outcome == "applied" else "aborted"

    # -- the rest of the contract ------------------------------------------------

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        try:
            raws = self.client.lrange(self.key("h"), -limit if limit else 0, -1)
        except Exception as exc:  # noqa: BLE001
            raise self.failed(exc) from exc
        return [self.decode(raw, "h") for raw in raws]

    def delete(self) -> None:
        try:
            tasks = self.client.hget(self.key("s"), "tasks")
            names = records.decode(tasks, self.uid, "tasks") if tasks else []
            keys = [key for key in self.fixed_keys() if not key.startswith("lock:")]
            keys += [self.waiting_key(task) for task in names]
            keys += [self.delayed_key(task) for task in names]
            keys += [self.key("state"), self.key("done")]
            for key in keys:  # one by one: DEL of several keys is one command per slot anyway
                self.client.delete(key)
        except Exception as exc:  # noqa: BLE001
            raise self.failed(exc) from exc

    def lock(self, expire: int, timeout: float) -> RedisSessionLock:
        return RedisSessionLock(self.client, self.lock_name, self.uid, expire, timeout)

    def hook_lock(self, expire: int, timeout: float) -> BaseLock:
        return RedisSessionLock(self.client, self.prefix + "hooks", self.uid, expire, timeout)

    @contextmanager
    def step_lock(self, expire: int, timeout: float) -> Iterator[str | None]:
        lock = self.lock(expire, timeout)
        with lock.hold():
            yield lock.owner_id

    # -- the layout of release 1 ----------------------------------------------------

    def upgrade(self) -> None:
        """Rewrite a session stored in the previous layout (one JSON value) as records."""
        from redis.exceptions import WatchError

        old_key, done_key = self.key("state"), self.key("done")
        for _attempt in range(10):
            pipe = self.client.pipeline(transaction=True)
            try:
                pipe.watch(old_key, done_key, self.key("s"))
                raw, done = pipe.get(old_key), pipe.hgetall(done_key)
                if raw is None or pipe.hexists(self.key("s"), "v"):
                    pipe.reset()
                    return
                pipe.multi()
                self._upgrade_commands(pipe, self.decode(raw, "state"), done)
                pipe.delete(old_key, done_key)
                pipe.execute()
                return
            except WatchError:
                time.sleep(random.random() * 0.01)
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self.failed(exc) from exc
            finally:
                pipe.reset()

    def _upgrade_commands(self, pipe: Any, state: Any, done: dict[Any, Any]) -> None:
        where = self.key("state")
        if not isinstance(state, dict):
            raise records.corrupt(self.uid, where,
                                  f"expected a JSON object, got {type(state).__name__}")
        if state.get("v") != 1:
            raise records.corrupt(self.uid, where, f"unknown format version {state.get('v')!r}")
        try:
            self._upgrade_records(pipe, state, done, where)
        except CorruptSessionState:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise records.corrupt(self.uid, where, f"{type(exc).__name__}: {exc}") from exc

    def _upgrade_records(self, pipe: Any, state: dict[str, Any], done: dict[Any, Any],
                         where: str) -> None:
        for part in ("tasks", "kwargs", "counters", "open", "meta"):
            if not isinstance(state.get(part, {}), dict):
                raise records.corrupt(self.uid, where, f"{part!r} is a "
                                      f"{type(state[part]).__name__}, not an object")
        config = records.parse_config(state.get("tasks") or {}, self.uid, where)
        s = self.key("s")
        fields: dict[str, str] = {
            "v": config.version, "tasks": records.dumps(sorted(config.tasks)),
            "fmt": str(records.FORMAT_VERSION)}
        for trigger, entry in config.index.items():
            fields["i:" + trigger] = records.dumps(list(entry))
        for task, count in (state.get("counters") or {}).items():
            fields["n:" + task] = str(int(count))
        for trigger, kwargs in (state.get("kwargs") or {}).items():
            fields["k:" + trigger] = records.dumps(kwargs)
        for key, value in (state.get("meta") or {}).items():
            fields["m:" + key] = records.dumps(value)
        open_count = 0
        for name, data in (state.get("open") or {}).items():
            instance = records.instance_from_json(name, data, config.tasks, self.uid, "state")
            place = records.place_of(instance)
            key = {records.PLACE_WAITING: self.waiting_key(instance.task_name),
                   records.PLACE_DELAYED: self.delayed_key(instance.task_name)}.get(
                       place, self.key("a"))
            pipe.hset(key, name, records.instance_to_json(instance))
            open_count += 1
        fields["o"] = str(open_count)
        pipe.set(self.key("c"), records.dumps({"v": config.version, "tasks": config.raw}))
        pipe.hset(s, mapping=fields)
        if done:
            pipe.hset(self.key("d"), mapping={_text(k): v for k, v in done.items()})
        for key in (s, self.key("c"), self.key("a"), self.key("d")):
            pipe.persist(key)


def _nulls(value: Any) -> Any:
    """A decoded reply with Lua's false (Redis's nil) as None, and {} (empty) as []."""
    if value is False:
        return None
    if isinstance(value, dict):
        return []
    if isinstance(value, list):
        return [_nulls(item) for item in value]
    return value


def _count_ops(writes: list[Any]) -> int:
    """How many operations a flat write list holds (S and C: 4 items, D: 3, I: 4)."""
    count, index = 0, 0
    while index < len(writes):
        index += 3 if writes[index] == "D" else 4
        count += 1
    return count


_clients: dict[tuple[str, bool], Any] = {}


def client_for(url: str, cluster: bool) -> Any:
    """A redis-py client for ``url`` (shared per process), standalone or Redis Cluster."""
    key = (url, cluster)
    client = _clients.get(key)
    if client is None:
        # redis-py and python-redis-lock (the session locks) come with the redis extra:
        # a clear ImportError saying how to install them if they are missing.
        redis = require_redis("redis")
        require_redis("redis_lock")
        if cluster:
            client = require_redis("redis.cluster").RedisCluster.from_url(url)
        else:
            client = redis.Redis.from_url(url)
        _clients[key] = client
    return client


class RedisStorageBackend(BaseTriggerStorage):
    """Keeps a session in Redis through redis-py, standalone or on Redis Cluster.

    :param uid: the session UID.
    :param url: a redis-py URL (``redis://host:port/db``; for a cluster, any node).
    :param cluster: connect with ``RedisCluster``.
    :param timeout: seconds a session's keys live after it became idle (nothing
        unstarted, scheduled, running or failed); ``None``: forever.
    :param prefix: prefix of every key (before ``{uid}``).
    """

    name = "redis"
    optimistic = True
    commits_sweeps = True

    def __init__(self, uid: str, url: str = "redis://127.0.0.1:6379/0", cluster: bool = False,
                 timeout: int | None = 3600, prefix: str = "triggers:",
                 lock_expire: int = DEFAULT_LOCK_EXPIRE,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(uid, lock_expire=lock_expire, lock_timeout=lock_timeout)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout <= 0):
            raise InvalidArgument(f"RedisStorageBackend timeout must be a positive number of "
                                  f"seconds or None, got {timeout!r}", session_uid=uid)
        if not isinstance(url, str) or "://" not in url:
            raise InvalidArgument(f"RedisStorageBackend url must be a redis:// URL, got {url!r}",
                                  session_uid=uid)
        self.url, self.cluster, self.timeout, self.prefix = url, bool(cluster), timeout, prefix
        self.engine = RedisEngine(self, client_for(url, self.cluster), f"{prefix}{{{uid}}}:",
                                  timeout, f"redis {url}", prefix)

    def get_options(self) -> dict[str, Any]:
        return {"url": self.url, "cluster": self.cluster, "timeout": self.timeout,
                "prefix": self.prefix, "lock_expire": self.lock_expire,
                "lock_timeout": self.lock_timeout}

    def load(self, step: SessionStep, want: Want) -> None:
        self.engine.load(step, want)

    def commit(self, step: SessionStep) -> bool:
        return self.engine.commit(step)

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        return self.engine.read_history(limit)

    def delete(self) -> None:
        self.engine.delete()

    def step_applied(self, token: str) -> bool | None:
        return self.engine.step_applied(token)

    def _session_lock(self) -> Any:
        return self.engine.lock(self.lock_expire, self.lock_timeout).hold()


    def exclusive_step(self) -> Any:
        return locked_step(self, self.engine)

    def step_lock(self, timeout: float) -> Any:
        return self.engine.step_lock(self.lock_expire, timeout)

    def _hook_lock(self) -> BaseLock:
        return self.engine.hook_lock(self.lock_expire, self.lock_timeout)

    @classmethod
    def due_sessions(cls, until: float, limit: int, url: str = "redis://127.0.0.1:6379/0",
                     cluster: bool = False, prefix: str = "triggers:",
                     **_options: Any) -> list[str]:
        """Sessions with work due by ``until``, claimed from the due index (see DueIndex)."""
        return DueIndex(client_for(url, bool(cluster)), prefix).claim(until, limit)

    def swept(self, dues: dict[str, float], until: float) -> None:
        self.engine.index.swept(self.uid, dues, until)

    @classmethod
    def session_uids(cls, url: str = "redis://127.0.0.1:6379/0", cluster: bool = False,
                     prefix: str = "triggers:", **_options: Any) -> Iterator[str]:
        """UIDs of the sessions stored under ``prefix`` (SCAN on every node)."""
        yield from scan_uids(client_for(url, bool(cluster)), prefix)


@contextmanager
def locked_step(storage: BaseTriggerStorage, engine: RedisEngine) -> Iterator[SessionStep]:
    """A step holding the session lock: steps of other processes wait for it."""
    lock = engine.lock(storage.lock_expire, storage.lock_timeout)
    with lock.hold():
        step = SessionStep(storage, storage.uid)
        step.observed["lock_owner"] = lock.owner_id
        step.need(Want())
        yield step
        if step.changed and not engine.commit(step):
            raise StorageError(f"Session {storage.uid!r} changed while its lock was held "
                               "(the lock expired?); nothing was written.",
                               session_uid=storage.uid)


def scan_uids(client: Any, prefix: str) -> Iterator[str]:
    """UIDs of the sessions under ``prefix`` (their ``s`` key, or ``state`` of release 1)."""
    seen: set[str] = set()
    for key in client.scan_iter(match=f"{prefix}{{*}}:s*", count=1000):
        text = _text(key)
        head, _, suffix = text.rpartition("}:")
        if suffix not in ("s", "state") or not head.startswith(prefix + "{"):
            continue
        uid = head[len(prefix) + 1:]
        if uid not in seen:
            seen.add(uid)
            yield uid

