"""Stage 1, history: users' lifelong behaviour, profiles and the item catalog in Redis.

Key layout (every key starts with the prefix, `lorec` by default):

    {p}:user:{<uid>}:events   ZSET   member "<item>\\x1f<rating>\\x1f<ts>", score ts (seconds).
                                     Time order comes from the score; an identical event
                                     written twice is stored once (same member).
                                     rating is empty for a click.
    {p}:user:{<uid>}:eids     HASH   client event id -> member: a retried event is stored once
    {p}:user:{<uid>}:profile  HASH   gender, age, occupation (display text)
    {p}:item:<iid>            HASH   title, year ("" if unknown), genres ("|"-joined)
    {p}:item:{<iid>}:r:<b>    ZSET   every user's ratings of the item in bucket <b> (stars 1..5, a rating
                                     rounded to the nearest star, or "click"): member
                                     "<uid>\\x1f<rating>\\x1f<ts>", score ts. Counted by time range
                                     (ZCOUNT) they give the item's point-in-time statistics (features.py)
                                     without reading its ratings; one Lua call reads a request's items
                                     (on a cluster: one per item).
    {p}:item:{<iid>}:r:all    ZSET   the same members, all buckets together (recent count, first time)
    {p}:users                 SET    every user id with events or a profile
    {p}:items                 SET    every catalog item id
    {p}:ingest:<dataset>      HASH   fingerprint and counts of a finished ingestion

The `{<uid>}` hash tag keeps one user's keys in one Redis Cluster slot: a user's
events are written in one MULTI/EXEC (and checked against the user's event ids
in one Lua call) on a cluster as on a single server. The `{<iid>}` tag does the
same for an item's rating sets, which one script call reads together. A rating is
written to its user's keys first (the transaction), then to its item's set; a
retried event rewrites the item's member, which stores nothing twice, so an
event acknowledged with 2xx is in both. Ids may not contain control
characters, so the separator \\x1f cannot occur in them. Key builders and codecs
are pure functions; reads are one non-transactional pipeline per round trip
(a cluster client splits it by node).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numba
import numpy as np
from redis.asyncio import Redis, RedisCluster

from service.feature_vector import ALL, BUCKETS, RECENT_S, ItemStats, bucket
from service.item_ids import UTF8, EncodedIds, ItemPositions
from service.records import NO_BEHAVIOURS, Behaviour, Item, Profile, Timeline, UserContext

SEP = "\x1f"


class Keys:
    def __init__(self, prefix: str = "lorec") -> None:
        self.prefix = prefix

    def events(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}:events"

    def event_ids(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}:eids"

    def profile(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}:profile"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}"

    def item_ratings(self, item_id: str, bucket: str) -> str:
        return f"{self.prefix}:item:{{{item_id}}}:r:{bucket}"

    def item_buckets(self, item_id: str) -> list[str]:
        """The bucket sets in BUCKETS order, then the set of all."""
        return [self.item_ratings(item_id, b) for b in (*BUCKETS, ALL)]

    def users(self) -> str:
        return f"{self.prefix}:users"

    def items(self) -> str:
        return f"{self.prefix}:items"

    def ingest(self, dataset: str) -> str:
        return f"{self.prefix}:ingest:{dataset}"

    def dataset(self) -> str:
        return f"{self.prefix}:dataset"


# --- pure codecs ---------------------------------------------------------------------------


def encode_event(b: Behaviour) -> str:
    rating = "" if b.rating is None else f"{b.rating:g}"
    return f"{b.item_id}{SEP}{rating}{SEP}{b.ts}"


def decode_event(member: str) -> Behaviour:
    item_id, rating, ts = member.split(SEP)
    return Behaviour(item_id, int(ts), float(rating) if rating else None)


class _RatingTexts(dict):
    """A member's rating text -> its value (NaN: a click): a few distinct texts (stars, half stars) make up
    nearly every member, and a dict hit costs less than float(); bounded, for texts a client made up."""

    def __missing__(self, text: str) -> float:
        value = float(text) if text else np.nan
        if len(self) < 1024:
            self[text] = value
        return value


_RATINGS = _RatingTexts()
_MEMBER_END = "\x1e"  # between members in decode_timeline's one string: not in any field (ids have no controls)


def decode_timeline(members: Sequence[str]) -> Timeline:
    """Members in time order as columns, parsed in compiled code from one buffer of them all: no object per
    event, and the item ids stay bytes (item_ids.py). 2,000 members, and their ids' lookup in the features
    stage, cost ~0.3 ms here against ~1.7 ms as strings. A member the parser does not take as canonical
    (`_parse_members`) sends the whole history down the string path, which reads what `decode_event` reads and
    raises where it raises: the two give the same columns."""
    n = len(members)
    if not n:
        return NO_BEHAVIOURS
    text = np.frombuffer(_MEMBER_END.join(members).encode(*UTF8), dtype=np.uint8)
    parsed, starts, ends, ts, ratings = _parse_members(text, n, _POWERS_OF_TEN)
    if parsed:
        return Timeline(EncodedIds(text, starts, ends), ts, ratings)
    return _decode_strings(members)


def _decode_strings(members: Sequence[str]) -> Timeline:
    """decode_timeline by one split of the members with a marker field between them. A member not of three
    fields moves the markers, and is then named by decode_event's error: the columns never shift silently."""
    n = len(members)
    fields = (SEP + _MEMBER_END + SEP).join(members).split(SEP)
    if len(fields) != 4 * n - 1 or fields[3::4].count(_MEMBER_END) != n - 1:
        for member in members:
            decode_event(member)  # raises on the first malformed one
        raise ValueError("an event member holds the member separator")
    return Timeline(fields[0::4], np.fromiter(map(int, fields[2::4]), dtype=np.int64, count=n),
                    np.fromiter(map(_RATINGS.__getitem__, fields[1::4]), dtype=np.float64, count=n))


_POWERS_OF_TEN = np.array([10.0 ** k for k in range(16)])  # 10^0..10^15, each an exact double
_MAX_DIGITS = 15  # a mantissa below 10^15 < 2^53 is exact, so mantissa / 10^k is the correctly rounded value


@numba.njit(cache=True, nogil=True)
def _parse_members(text: np.ndarray, n: int, powers: np.ndarray
                   ) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """n members joined by 0x1e, each "<item>0x1f<rating>0x1f<ts>" as encode_event writes them: each item id's
    span, its time and its rating (NaN: empty, a click), and whether every member was of that canonical form
    (rating: empty, or [-]digits[.digits] with at most 15 digits; ts: [-]digits, at most 18). What it takes it
    reads as int() and float() do (float(): one correctly rounded division of two exact doubles); anything
    else (another form, a control character in a field, a field too many or too few) answers False."""
    starts, ends = np.empty(n, np.int64), np.empty(n, np.int64)
    ts, ratings = np.empty(n, np.int64), np.empty(n, np.float64)
    size, at = len(text), 0
    for m in range(n):
        starts[m] = at
        while at < size and text[at] != 0x1F:
            if text[at] == 0x1E:
                return False, starts, ends, ts, ratings
            at += 1
        if at == size:
            return False, starts, ends, ts, ratings
        ends[m] = at
        at += 1
        negative = at < size and text[at] == 0x2D  # "-"
        if negative:
            at += 1
        mantissa, digits, decimals, point = 0, 0, 0, False
        while at < size and text[at] != 0x1F:
            c = text[at]
            if 0x30 <= c <= 0x39:
                mantissa = mantissa * 10 + (c - 0x30)
                digits += 1
                if point:
                    decimals += 1
            elif c == 0x2E and not point:  # "."
                point = True
            else:
                return False, starts, ends, ts, ratings
            at += 1
        if at == size or digits > _MAX_DIGITS or (digits == 0 and (negative or point)):
            return False, starts, ends, ts, ratings
        value = mantissa / powers[decimals]
        ratings[m] = np.nan if digits == 0 else -value if negative else value
        at += 1
        negative = at < size and text[at] == 0x2D
        if negative:
            at += 1
        time, digits = 0, 0
        while at < size and text[at] != 0x1E:
            c = text[at]
            if not 0x30 <= c <= 0x39 or digits == 18:
                return False, starts, ends, ts, ratings
            time = time * 10 + (c - 0x30)
            digits += 1
            at += 1
        if digits == 0 or (m < n - 1) != (at < size):
            return False, starts, ends, ts, ratings
        ts[m] = -time if negative else time
        at += 1
    return True, starts, ends, ts, ratings


def compile_decoder() -> None:
    """Compile the member parser and the item positions' probe now, not on a request: numba compiles on a type's
    first call (~1 s each where its cache under __pycache__ is not there yet)."""
    timeline = decode_timeline([encode_event(Behaviour("x", 0, 4.0))])
    ItemPositions(["x"]).positions(timeline.item_ids)


def encode_item_rating(user_id: str, b: Behaviour) -> str:
    """An item's rating-set member: unique per event, as the user's member is."""
    rating = "" if b.rating is None else f"{b.rating:g}"
    return f"{user_id}{SEP}{rating}{SEP}{b.ts}"


def decode_item_stats(reply: Sequence[int]) -> ItemStats:
    """ITEM_STATS' reply: counts per bucket, the recent count, the first time (-1: none)."""
    n = len(BUCKETS)
    first = int(reply[n + 1])
    return ItemStats(counts=tuple(map(int, reply[:n])), recent=int(reply[n]), first_ts=None if first < 0 else first)


def encode_item(item: Item) -> dict[str, str]:
    return {"title": item.title, "year": "" if item.year is None else str(item.year), "genres": "|".join(item.genres)}


def decode_item(item_id: str, fields: dict[str, str]) -> Item | None:
    if not fields:
        return None
    year = fields.get("year") or ""
    genres = fields.get("genres") or ""
    return Item(item_id=item_id, title=fields["title"], year=int(year) if year else None,
                genres=tuple(genres.split("|")) if genres else ())


def encode_profile(profile: Profile) -> dict[str, str]:
    return {k: v for k, v in (("gender", profile.gender), ("age", profile.age),
                               ("occupation", profile.occupation)) if v}


def decode_profile(fields: dict[str, str]) -> Profile:
    return Profile(gender=fields.get("gender"), age=fields.get("age"), occupation=fields.get("occupation"))


def time_order_key(b: Behaviour) -> tuple[int, str]:
    """The order Redis keeps a user's events in: by time, ties by member bytes."""
    return b.ts, encode_event(b)


def history_bounds(as_of: int | None) -> str:
    """Upper score bound: strictly before `as_of` (ZRANGE's "(" excludes it)."""
    return "+inf" if as_of is None else f"({as_of}"


# --- reads ---------------------------------------------------------------------------------


# An event with a client id is stored only if that id is new for the user; both keys share the
# user's hash tag, so the script runs on one Redis Cluster slot. Replies: 1 stored, 0 already stored
# (a retry, or the same event again), -1 refused (the id names another event of this user).
STORE_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[1]) == 1 then
  return redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[1] then
  return 0
end
return -1
"""

# Items' statistics before a time. KEYS: per item, its bucket sets (BUCKETS order) and the set of all, one
# hash tag per item. ARGV[1]: the upper bound ("(t": strictly before t, or "+inf"); ARGV[2]: t - 30 days;
# ARGV[3]: keys per item. Reply, per item: the count below the bound per bucket, the count of all from
# ARGV[2] to the bound, the earliest time of all (-1: none before the bound). One call for a request's
# items on one server (the client's cost per command dominates 20 small calls); on a Redis Cluster one
# call per item, whose keys share a slot.
ITEM_STATS = """
local per_item = tonumber(ARGV[3])
local out = {}
for base = 0, #KEYS - 1, per_item do
  for i = 1, per_item - 1 do
    out[#out + 1] = redis.call('ZCOUNT', KEYS[base + i], '-inf', ARGV[1])
  end
  local all = KEYS[base + per_item]
  out[#out + 1] = redis.call('ZCOUNT', all, ARGV[2], ARGV[1])
  local head = redis.call('ZRANGEBYSCORE', all, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, 1)
  out[#out + 1] = head[2] and tonumber(head[2]) or -1
end
return out
"""


def connect(url: str, cluster: bool = False, **options) -> Redis | RedisCluster:
    """A client for one Redis server, or for the Redis Cluster that `url` names a node of."""
    if cluster:
        return RedisCluster.from_url(url, decode_responses=True, **options)
    return Redis.from_url(url, decode_responses=True, **options)


class HistoryStore:
    """Reads and writes of the key layout above over one async Redis (or Redis Cluster) client."""

    def __init__(self, redis: Redis | RedisCluster, keys: Keys, max_events: int) -> None:
        self.redis = redis
        self.keys = keys
        self.max_events = max_events
        self.cluster = isinstance(redis, RedisCluster)

    async def load_request(self, user_id: str, item_ids: Sequence[str], as_of: int | None
                           ) -> tuple[UserContext, dict[str, Item | None]]:
        """The user's profile, newest `max_events` behaviours before `as_of`, and the candidates."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrangebyscore(self.keys.events(user_id), history_bounds(as_of), "-inf",
                              start=0, num=self.max_events)
        pipe.hgetall(self.keys.profile(user_id))
        for item_id in item_ids:
            pipe.hgetall(self.keys.item(item_id))
        members, profile, *items = await pipe.execute()
        members.reverse()  # newest first off the wire
        context = UserContext(user_id, decode_profile(profile), decode_timeline(members))
        return context, {i: decode_item(i, f) for i, f in zip(item_ids, items)}

    async def items(self, item_ids: Iterable[str]) -> dict[str, Item | None]:
        ids = list(dict.fromkeys(item_ids))
        pipe = self.redis.pipeline(transaction=False)
        for item_id in ids:
            pipe.hgetall(self.keys.item(item_id))
        return {i: decode_item(i, f) for i, f in zip(ids, await pipe.execute())}

    async def item_stats(self, item_ids: Sequence[str], as_of: int | None, now: int) -> dict[str, ItemStats]:
        """Each item's ratings by every user strictly before `as_of` (all of them when None), and those
        of the RECENT_S before `now`: one script call for them all (on a cluster, one per item's slot)."""
        ids = list(dict.fromkeys(item_ids))
        groups = [[i] for i in ids] if self.cluster else [ids] if ids else []
        per_item = len(BUCKETS) + 1
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:  # EVAL, not EVALSHA: no script cache to load first on each cluster node
            keys = [k for item_id in group for k in self.keys.item_buckets(item_id)]
            pipe.eval(ITEM_STATS, len(keys), *keys, history_bounds(as_of), now - RECENT_S, per_item)
        replies = [reply for group_reply in await pipe.execute() for reply in group_reply]
        width = len(BUCKETS) + 2
        return {i: decode_item_stats(replies[n * width:(n + 1) * width]) for n, i in enumerate(ids)}

    async def user_history(self, user_id: str, as_of: int | None, limit: int) -> UserContext:
        context, _ = await self.load_request(user_id, [], as_of)
        return UserContext(user_id, context.profile, context.timeline.tail(limit))

    async def user_exists(self, user_id: str) -> bool:
        return bool(await self.redis.sismember(self.keys.users(), user_id))

    # --- writes ----------------------------------------------------------------------------

    async def append_events(self, events: Sequence[tuple[str, Behaviour, str | None]]) -> int:
        """Stores a batch; returns how many events were new.

        A user's events are stored all or none (MULTI/EXEC on the user's slot). On one server the
        whole batch is one transaction; a cluster cannot run a transaction across slots, so there
        each user's part commits on its own, and a client retrying a failed batch stores nothing
        twice: re-sending an identical event, or any event under a client event id already seen for
        that user, stores nothing."""
        by_user: dict[str, list[tuple[Behaviour, str | None]]] = defaultdict(list)
        for user_id, behaviour, event_id in events:
            by_user[user_id].append((behaviour, event_id))
        groups = [[u] for u in by_user] if self.cluster else [list(by_user)]
        replies = await asyncio.gather(*(self._store_events(users, by_user) for users in groups))
        if by_user:  # after the events: a user is listed once they exist
            await self.redis.sadd(self.keys.users(), *by_user)
        # Then each item's statistics, for every event the user's keys hold (new or stored by an earlier try
        # of this batch), not for one refused by its id: re-adding a member stores nothing twice.
        kept = []
        for users, reply in zip(groups, replies):
            written = [(u, b) for u in users for b, _ in by_user[u]]  # _store_events' command order
            kept += [event for event, outcome in zip(written, reply) if outcome >= 0]
        await self.add_item_ratings(kept)
        return sum(outcome == 1 for reply in replies for outcome in reply)

    async def _store_events(self, users: list[str], by_user: dict[str, list[tuple[Behaviour, str | None]]]
                            ) -> list[int]:
        pipe = self.redis.pipeline(transaction=True)
        for user_id in users:
            for behaviour, event_id in by_user[user_id]:
                member = encode_event(behaviour)
                if event_id is None:
                    pipe.zadd(self.keys.events(user_id), {member: behaviour.ts})
                else:  # EVAL, not EVALSHA: no script cache to load first on each cluster node
                    pipe.eval(STORE_ONCE, 2, self.keys.events(user_id), self.keys.event_ids(user_id),
                              member, behaviour.ts, event_id)
        return [int(r) for r in await pipe.execute()]

    async def add_item_ratings(self, events: Sequence[tuple[str, Behaviour]]) -> None:
        """Each (user, behaviour) into its item's bucket set; idempotent, one pipeline."""
        if not events:
            return
        pipe = self.redis.pipeline(transaction=False)
        for user_id, b in events:
            member = {encode_item_rating(user_id, b): b.ts}
            pipe.zadd(self.keys.item_ratings(b.item_id, bucket(b.rating)), member)
            pipe.zadd(self.keys.item_ratings(b.item_id, ALL), member)
        await pipe.execute()

    async def put_item(self, item: Item) -> None:
        pipe = self.redis.pipeline(transaction=True)  # one key: a replaced item never shows mixed fields
        pipe.delete(self.keys.item(item.item_id))
        pipe.hset(self.keys.item(item.item_id), mapping=encode_item(item))
        await pipe.execute()
        await self.redis.sadd(self.keys.items(), item.item_id)  # another slot on a cluster
