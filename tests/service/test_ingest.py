"""Ingestion: counts match the source files, re-runs are idempotent, malformed files are rejected whole,
a second dataset is refused by a store that holds another."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess

import pytest
from redis import Redis
from typer.testing import CliRunner

from service.cli import app
from service.history import Keys
from service.ingest import MalformedFile, StoreMismatch, read_movielens, require_store_holds
from tests.utils.stack import LOREC, ML100K


def _source_lines(name: str) -> int:
    with gzip.open(ML100K / f"{name}.gz", "rt", encoding="latin-1") as f:
        return sum(1 for line in f if line.strip())


def test_counts_match_the_source_files(ingested, redis_url, tiny_settings, gateway):
    assert ingested["ratings"] == _source_lines("u.data") == 100_000
    assert ingested["items"] == _source_lines("u.item") == 1682
    assert ingested["users"] == _source_lines("u.user") == 943
    redis, keys = Redis.from_url(redis_url, decode_responses=True), Keys()
    users = redis.smembers(keys.users())
    assert {str(u) for u in range(1, 944)} <= users
    original = [u for u in users if u.isdigit() and int(u) <= 943]
    pipe = redis.pipeline()
    for user in original:
        pipe.zcard(keys.events(user))
    # Later tests may append events for some users; the ingested total is at least the file's.
    assert sum(pipe.execute()) >= 100_000
    assert redis.scard(keys.items()) >= 1682
    assert redis.hgetall(keys.item("1"))["title"] == "Toy Story"
    assert redis.hgetall(keys.profile("1")) == {"gender": "male", "age": "24", "occupation": "technician"}
    assert asyncio.run(gateway.app.state.recommender.index.count()) >= 1682


def test_rerun_is_idempotent(ingested):
    again = ingested["rerun"]
    assert again["already_done"] is True
    assert {k: again[k] for k in ("users", "items", "ratings")} == \
        {k: ingested[k] for k in ("users", "items", "ratings")}


def _write_ml100k(directory, data_lines):
    (directory / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||url|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                      "2|GoldenEye (1995)|01-Jan-1995||url|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n",
                                      encoding="latin-1")
    (directory / "u.user").write_text("1|24|M|technician|85711\n", encoding="latin-1")
    (directory / "u.data").write_text("".join(data_lines), encoding="latin-1")


def test_malformed_line_rejects_the_file_with_its_line_number(tmp_path):
    _write_ml100k(tmp_path, ["1\t1\t5\t100\n", "1\t2\tfive\t101\n", "1\t2\t3\n"])
    with pytest.raises(MalformedFile) as raised:
        read_movielens(tmp_path)
    assert [n for n, _ in raised.value.errors] == [2, 3]
    assert "line 2" in str(raised.value) and "u.data" in str(raised.value)


def test_skip_bad_lines_reports_and_keeps_the_rest(tmp_path):
    _write_ml100k(tmp_path, ["1\t1\t5\t100\n", "1\t2\tfive\t101\n", "1\t2\t3\t102\n"])
    data = read_movielens(tmp_path, skip_bad_lines=True)
    assert len(data.ratings) == 2
    assert data.skipped == ["u.data line 2: could not convert string to float: 'five'"]
    assert [i.genres for i in data.items] == [("Animation", "Children's", "Comedy"),
                                              ("Action", "Adventure", "Thriller")]


def _write_ml1m(directory, movies="1::Toy Story (1995)::Animation|Children's|Comedy\n"):
    for name, text in {"movies.dat": movies, "users.dat": "1::F::1::10::48067\n",
                       "ratings.dat": "1::1::5::978300760\n1::1::4::978300761\n"}.items():
        with gzip.open(directory / f"{name}.gz", "wt", encoding="latin-1") as f:
            f.write(text)


def test_reads_ml1m_format_gzipped(tmp_path):
    _write_ml1m(tmp_path)
    data = read_movielens(tmp_path)
    assert data.name == "ml-1m"
    assert data.profiles["1"].age == "under 18" and data.profiles["1"].occupation == "K-12 student"
    assert data.items[0].year == 1995 and data.items[0].title == "Toy Story"
    assert len(data.ratings) == 2


def test_a_second_dataset_is_refused_and_the_first_is_untouched(ingested, redis_url, tiny_model, tmp_path):
    """ML-1M's user 1 and item 1 are not ML-100K's: merging them would corrupt both silently."""
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    _write_ml1m(folder, "1::Other Film (1999)::Drama\n")
    redis, keys = Redis.from_url(redis_url, decode_responses=True), Keys()
    before = (redis.hgetall(keys.item("1")), redis.hgetall(keys.profile("1")), redis.zcard(keys.events("1")))
    env = {"LOREC_REDIS_URL": redis_url, "LOREC_MODEL": str(tiny_model), "LOREC_DATA_DIR": str(tmp_path / "data"),
           "LOREC_QDRANT_URL": None, "QDRANT_URL": None, "LOREC_REDIS_PREFIX": None}
    result = CliRunner().invoke(app, ["ingest", "movielens", "--dir", str(folder)], env=env)
    assert result.exit_code == 2, result.output
    assert "holds 'ml-100k'" in result.output and "ingesting 'ml-1m'" in result.output
    assert (redis.hgetall(keys.item("1")), redis.hgetall(keys.profile("1")), redis.zcard(keys.events("1"))) == before
    assert redis.get(keys.dataset()) == "ml-100k"


def test_readers_refuse_a_store_that_holds_another_dataset(ingested, tiny_settings, tmp_path):
    """The trainer and `lorec eval` read the store's item vectors: another catalogue's would be wrong."""
    asyncio.run(require_store_holds(tiny_settings, "ml-100k"))
    with pytest.raises(StoreMismatch, match="holds 'ml-100k', not 'ml-1m'"):
        asyncio.run(require_store_holds(tiny_settings, "ml-1m"))
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    _write_ml1m(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("QDRANT_URL", "LOREC_REDIS_PREFIX")}
    env.update(LOREC_REDIS_URL=tiny_settings.redis.url, LOREC_MODEL=str(tiny_settings.model),
               LOREC_DATA_DIR=str(tiny_settings.data_dir))
    done = subprocess.run([LOREC, "eval", "--dir", str(folder), "--gateway", "http://127.0.0.1:9", "--n", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "holds 'ml-100k', not 'ml-1m'" in done.stderr, done.stderr[-2000:]
