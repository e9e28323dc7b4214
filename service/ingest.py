"""Bulk ingestion of GroupLens MovieLens (ML-100K, ML-1M) into Redis and the item index.

Every file is parsed and checked in full before anything is written: a
malformed line is reported with its line number and the whole file is
rejected (or, with `skip_bad_lines`, the bad lines are reported and left
out). Writes are idempotent (same events, same members; same items, same
hashes), and a marker records a finished ingestion so a re-run with the
same files and encoder returns at once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis, RedisCluster
from tqdm import tqdm

from service.config import Settings
from service.feature_vector import ALL, bucket
from service.history import Keys, connect, encode_event, encode_item, encode_item_rating, encode_profile
from service.records import Behaviour, Item, Profile
from service.retrieval import ItemIndex, open_configured_index

log = logging.getLogger(__name__)
# Bumped when ingestion writes new structures, so a store ingested before them is written again.
LAYOUT = "2"  # 2: item rating sets (point-in-time item statistics)

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western"]
ML1M_AGES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
             "56": "56 or older"}
ML1M_OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]
GENDERS = {"M": "male", "F": "female"}
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


class MalformedFile(ValueError):
    def __init__(self, path: Path, errors: list[tuple[int, str]]) -> None:
        shown = "; ".join(f"line {n}: {why}" for n, why in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        super().__init__(f"{path.name}: {len(errors)} malformed line(s), file rejected: {shown}{more}")
        self.path = path
        self.errors = errors


@dataclass
class MovieLens:
    name: str
    items: list[Item]
    profiles: dict[str, Profile]
    ratings: list[tuple[str, Behaviour]]
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""


def _find(directory: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="latin-1", newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line


def _parse(path: Path, sep: str, min_fields: int, build: Callable[[list[str]], object], skip_bad: bool,
           skipped: list[str]) -> list:
    out, errors = [], []
    for number, line in _lines(path):
        fields = line.split(sep)
        try:
            if len(fields) < min_fields:
                raise ValueError(f"expected {min_fields} fields separated by {sep!r}, got {len(fields)}")
            out.append(build(fields))
        except (ValueError, KeyError, IndexError) as exc:
            errors.append((number, str(exc)))
    if errors and not skip_bad:
        raise MalformedFile(path, errors)
    skipped += [f"{path.name} line {n}: {why}" for n, why in errors]
    return out


def _title_year(raw: str) -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(raw.strip())
    return (match.group(1), int(match.group(2))) if match else (raw.strip(), None)


def _item(item_id: str, raw_title: str, genres: list[str]) -> Item:
    if not item_id.strip() or not raw_title.strip():
        raise ValueError("empty id or title")
    title, year = _title_year(raw_title)
    return Item(item_id=item_id.strip(), title=title, year=year, genres=tuple(genres))


def _rating(user: str, item: str, rating: str, ts: str) -> tuple[str, Behaviour]:
    stars = float(rating)
    if not 0 <= stars <= 10:
        raise ValueError(f"rating {rating} out of range")
    return user.strip(), Behaviour(item_id=item.strip(), ts=int(ts), rating=stars)


def _ml100k_item(f: list[str], genre_names: list[str]) -> Item:
    flags = f[5:5 + len(genre_names)]
    if len(flags) != len(genre_names) or any(x not in ("0", "1") for x in flags):
        raise ValueError("genre flags must be 0 or 1")
    return _item(f[0], f[1], [g for g, on in zip(genre_names, flags) if on == "1"])


def _ml100k_profile(f: list[str]) -> tuple[str, Profile]:
    int(f[1])
    return f[0], Profile(gender=GENDERS[f[2]], age=f[1], occupation=f[3])


def _ml1m_profile(f: list[str]) -> tuple[str, Profile]:
    return f[0], Profile(gender=GENDERS[f[1]], age=ML1M_AGES[f[2]], occupation=ML1M_OCCUPATIONS[int(f[3])])


def read_movielens(directory: Path, skip_bad_lines: bool = False) -> MovieLens:
    """Read ML-100K (u.data, u.item, u.user) or ML-1M (ratings*.dat, movies.dat, users.dat), plain or .gz."""
    skipped: list[str] = []
    if (data := _find(directory, "u.data")) is not None:
        name, item_file, user_file = "ml-100k", _find(directory, "u.item"), _find(directory, "u.user")
        genre_file = _find(directory, "u.genre")
        genres = [line.split("|")[0] for _, line in _lines(genre_file)] if genre_file else ML100K_GENRES
        items = _parse(item_file, "|", 5 + len(genres), lambda f: _ml100k_item(f, genres), skip_bad_lines, skipped)
        users = _parse(user_file, "|", 4, _ml100k_profile, skip_bad_lines, skipped)
        ratings = _parse(data, "\t", 4, lambda f: _rating(*f[:4]), skip_bad_lines, skipped)
    else:
        data = _find(directory, "ratings.dat") or next(iter(sorted(directory.glob("ratings*.dat*"))), None)
        item_file, user_file = _find(directory, "movies.dat"), _find(directory, "users.dat")
        if data is None:
            raise FileNotFoundError(f"{directory}: no MovieLens ratings (u.data or ratings.dat)")
        name = "ml-1m"
        items = _parse(item_file, "::", 3, lambda f: _item(f[0], f[1], f[2].split("|") if f[2] else []),
                       skip_bad_lines, skipped)
        users = _parse(user_file, "::", 4, _ml1m_profile, skip_bad_lines, skipped)
        ratings = _parse(data, "::", 4, lambda f: _rating(*f[:4]), skip_bad_lines, skipped)
    if item_file is None or user_file is None:
        raise FileNotFoundError(f"{directory}: the item or user file is missing")
    digest = hashlib.sha256()
    for path in (data, item_file, user_file):
        digest.update(path.read_bytes())
    return MovieLens(name=name, items=items, profiles=dict(users), ratings=ratings, skipped=skipped,
                     fingerprint=digest.hexdigest())


@dataclass
class IngestReport:
    dataset: str
    users: int
    items: int
    ratings: int
    skipped_lines: list[str]
    already_done: bool = False
    fingerprint: str = ""  # of the raw files (shipped artifacts name the data they were trained on by it)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "users": self.users, "items": self.items, "ratings": self.ratings,
                "skipped_lines": len(self.skipped_lines), "already_done": self.already_done,
                "fingerprint": self.fingerprint}


class StoreMismatch(RuntimeError):
    """A store given a folder of another dataset than the one it holds (to ingest, train or evaluate)."""


async def claim_store(redis: Redis | RedisCluster, keys: Keys, dataset: str) -> None:
    """The first dataset ingested under a prefix owns it; any other is refused before anything is written:
    MovieLens ids are small integers that every release reuses, so a second dataset would merge its
    users' histories into the first's and overwrite its items and item vectors."""
    await redis.set(keys.dataset(), dataset, nx=True)
    holder = await redis.get(keys.dataset())
    if holder != dataset:
        raise StoreMismatch(f"this store (Redis prefix {keys.prefix!r}) holds {holder!r}; ingesting {dataset!r} "
                            f"into it would merge their users and overwrite items: give {dataset!r} its own "
                            "store (LOREC_DATA_DIR and Redis, or LOREC_REDIS_PREFIX and, with a Qdrant server, "
                            "LOREC_QDRANT_COLLECTION)")


async def require_store_holds(settings: Settings, dataset: str) -> None:
    """The trainer and the evaluator read the gateway's item vectors; they must be this dataset's,
    else every retrieved history would be another catalogue's items under the same ids."""
    redis = connect(settings.redis.url, settings.redis.cluster)
    try:
        holder = await redis.get(Keys(settings.redis.prefix).dataset())
    finally:
        await redis.aclose()
    if holder != dataset:
        held = f"holds {holder!r}" if holder else "holds no dataset"
        raise StoreMismatch(f"the store (Redis prefix {settings.redis.prefix!r}) {held}, not {dataset!r}: "
                            f"point LOREC_DATA_DIR / LOREC_REDIS_URL at {dataset!r}'s store, or run `lorec "
                            "ingest movielens` on the folder (into an empty store; a store an earlier lorec "
                            "ingested without recording its dataset only gets it recorded)")


async def stored_data_fingerprint(settings: Settings) -> str | None:
    """The fingerprint of the raw files the store was ingested from (None: not ingested)."""
    redis = connect(settings.redis.url, settings.redis.cluster)
    keys = Keys(settings.redis.prefix)
    try:
        dataset = await redis.get(keys.dataset())
        marker = await redis.hget(keys.ingest(dataset), "fingerprint") if dataset else None
    finally:
        await redis.aclose()
    return marker.split(":", 1)[0] if marker else None


async def ingest_movielens(data: MovieLens, redis: Redis | RedisCluster, keys: Keys, index: ItemIndex, encoder,
                           encoder_id: str, chunk: int = 5000) -> IngestReport:
    await claim_store(redis, keys, data.name)
    fingerprint = f"{data.fingerprint}:{encoder_id}:layout{LAYOUT}"
    users = set(data.profiles) | {u for u, _ in data.ratings}
    report = IngestReport(data.name, len(users), len(data.items), len(data.ratings), data.skipped,
                          fingerprint=data.fingerprint)
    if await redis.hget(keys.ingest(data.name), "fingerprint") == fingerprint \
            and await index.count() >= len(data.items):
        report.already_done = True
        return report

    vectors = encoder.fit([item.description() for item in data.items])
    await index.ensure(int(vectors.shape[1]))
    for start in tqdm(range(0, len(data.items), 256), desc="item vectors", unit="batch"):
        batch = data.items[start:start + 256]
        await index.upsert([i.item_id for i in batch], vectors[start:start + 256])

    by_user: dict[str, dict[str, int]] = defaultdict(dict)
    by_item_bucket: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for user_id, behaviour in data.ratings:
        by_user[user_id][encode_event(behaviour)] = behaviour.ts
        for item_set in (bucket(behaviour.rating), ALL):
            by_item_bucket[behaviour.item_id, item_set][encode_item_rating(user_id, behaviour)] = behaviour.ts
    commands: list[Callable] = []
    commands += [lambda p, i=i: (p.delete(keys.item(i.item_id)), p.hset(keys.item(i.item_id), mapping=encode_item(i)))
                 for i in data.items]
    commands += [lambda p, u=u, pr=pr: p.hset(keys.profile(u), mapping=encode_profile(pr))
                 for u, pr in data.profiles.items() if encode_profile(pr)]
    commands += [lambda p, u=u, m=m: p.zadd(keys.events(u), m) for u, m in by_user.items()]
    commands += [lambda p, i=i, b=b, m=m: p.zadd(keys.item_ratings(i, b), m) for (i, b), m in by_item_bucket.items()]
    for start in tqdm(range(0, len(commands), chunk), desc="redis", unit="chunk"):
        pipe = redis.pipeline(transaction=False)
        for command in commands[start:start + chunk]:
            command(pipe)
        await pipe.execute()
    await redis.sadd(keys.items(), *[i.item_id for i in data.items])
    await redis.sadd(keys.users(), *users)
    await redis.hset(keys.ingest(data.name), mapping={"fingerprint": fingerprint,
                                                      "counts": json.dumps(report.as_dict())})
    return report


async def ingest_folder(settings: Settings, directory: Path, skip_bad_lines: bool = False) -> dict:
    """`lorec ingest movielens`: read a folder, write Redis and the configured item index."""
    from service.encoder import build_encoder

    data = read_movielens(directory, skip_bad_lines=skip_bad_lines)
    for line in data.skipped:
        log.warning("skipped %s", line)
    model_dir = settings.model_dir
    encoder = build_encoder(settings.index.encoder, model_dir, settings.data_dir, settings.index.encoder_dim)
    redis = connect(settings.redis.url, settings.redis.cluster)
    index = open_configured_index(settings.index, settings.edge_path)
    try:
        encoder_id = f"{settings.index.encoder}:{model_dir.resolve()}:{settings.index.encoder_dim}"
        report = await ingest_movielens(data, redis, Keys(settings.redis.prefix), index, encoder, encoder_id)
    finally:
        await index.close()
        await redis.aclose()
    return report.as_dict()
