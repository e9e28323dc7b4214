"""Stage 4, retrieval: which past behaviours go into each candidate's prompt.

SUBR (ReLLa): for each target item, the K behaviours of the user whose items
are nearest to the target by cosine similarity of item vectors, searched in
Qdrant with a filter `has_id in history`; shown in time order. `recent`: the
last K behaviours, the same for every candidate. `slate`: one search for the
whole request, the K history items nearest the candidates' centroid, so every
candidate's prompt shares one history prefix (vLLM's prefix cache computes it
once) at the cost of per-candidate relevance.

One small interface, `ItemIndex`, two implementations: `EdgeIndex` runs
Qdrant's engine in-process (qdrant-edge, the embedded default) and
`ServerIndex` talks to a Qdrant server through qdrant-client (QDRANT_URL).
The offline trainer calls the same `select_behaviours`, so SUBR is one
computation online and offline.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from service.config import IndexSettings

from service.records import Behaviour, RetrievalMode

_ID_NAMESPACE = uuid.UUID("6f1d3c1e-6a43-4c55-9b39-1f3c0c8a2b11")


def point_id(item_id: str) -> str:
    """Qdrant point ids are ints or UUIDs; item ids are free strings, so hash them."""
    return str(uuid.uuid5(_ID_NAMESPACE, item_id))


class ItemIndex(Protocol):
    dim: int | None

    async def ensure(self, dim: int) -> None: ...
    async def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> None: ...
    async def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]: ...
    async def nearest_within(self, queries: np.ndarray, allowed: Sequence[str], k: int
                             ) -> list[list[tuple[str, float]]]: ...
    async def count(self) -> int: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class EdgeIndex:
    """Qdrant Edge shard in this process; calls take well under a millisecond, so they run inline."""

    def __init__(self, path: Path) -> None:
        import qdrant_edge as qe

        self._qe = qe
        self.path = path
        self._shard = qe.EdgeShard.load(str(path)) if (path / "edge_config.json").exists() else None
        self.dim: int | None = self._stored_dim()

    def _stored_dim(self) -> int | None:
        if self._shard is None:
            return None
        import json

        config = json.loads((self.path / "edge_config.json").read_text())
        vectors = config.get("vectors", {})
        params = next(iter(vectors.values()), None) if isinstance(vectors, dict) else None
        return int(params["size"]) if params and "size" in params else None

    async def ensure(self, dim: int) -> None:
        if self._shard is not None:
            if self.dim not in (None, dim):
                raise ValueError(f"index at {self.path} holds {self.dim}-d vectors, not {dim}-d")
            self.dim = dim
            return
        qe = self._qe
        self.path.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(vectors={"": qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)})
        self._shard = qe.EdgeShard.create(str(self.path), config)
        self.dim = dim

    def _require(self):
        if self._shard is None:
            raise LookupError("the item index is empty: ingest a catalog first")
        return self._shard

    async def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        qe = self._qe
        points = [qe.Point(point_id(i), {"": v.tolist()}, {"item_id": i}) for i, v in zip(item_ids, vectors)]
        shard = self._require()
        shard.update(qe.UpdateOperation.upsert_points(points))
        shard.flush()

    async def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        by_point = {point_id(i): i for i in item_ids}
        records = self._require().retrieve(list(by_point), with_payload=False, with_vector=True)
        return {by_point[str(r.id)]: _as_array(r.vector) for r in records}

    async def nearest_within(self, queries: np.ndarray, allowed: Sequence[str], k: int
                             ) -> list[list[tuple[str, float]]]:
        qe = self._qe
        by_point = {point_id(i): i for i in allowed}
        flt = qe.Filter(must=[qe.HasIdCondition(set(by_point))])
        requests = [qe.QueryRequest(limit=k, query=qe.Query.Nearest(q.tolist(), using=""), filter=flt,
                                    with_payload=False, with_vector=False) for q in queries]
        results = self._require().query_batch(qe.QueryBatchRequest(requests))
        return [[(by_point[str(p.id)], p.score) for p in hits] for hits in results]

    async def count(self) -> int:
        if self._shard is None:
            return 0
        return int(self._shard.count(self._qe.CountRequest(exact=True)))

    async def ping(self) -> None:
        await self.count()

    async def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None


class ServerIndex:
    """A Qdrant collection through qdrant-client (a server, or the client's local mode in tests)."""

    def __init__(self, client, collection: str, shards: int = 1, replicas: int = 1) -> None:
        self.client = client
        self.collection = collection
        self.shards, self.replicas = shards, replicas  # used when this index creates the collection
        self.dim: int | None = None

    async def ensure(self, dim: int) -> None:
        from qdrant_client import models

        if await self.client.collection_exists(self.collection):
            info = await self.client.get_collection(self.collection)
            stored = info.config.params.vectors.size
            if stored != dim:
                raise ValueError(f"collection {self.collection} holds {stored}-d vectors, not {dim}-d")
        else:
            await self.client.create_collection(
                self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                shard_number=self.shards, replication_factor=self.replicas)
        self.dim = dim

    async def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        from qdrant_client import models

        points = [models.PointStruct(id=point_id(i), vector=v.tolist(), payload={"item_id": i})
                  for i, v in zip(item_ids, vectors)]
        await self.client.upsert(self.collection, points=points, wait=True)

    async def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        by_point = {point_id(i): i for i in item_ids}
        records = await self.client.retrieve(self.collection, ids=list(by_point), with_vectors=True,
                                             with_payload=False)
        return {by_point[str(r.id)]: _as_array(r.vector) for r in records}

    async def nearest_within(self, queries: np.ndarray, allowed: Sequence[str], k: int
                             ) -> list[list[tuple[str, float]]]:
        from qdrant_client import models

        by_point = {point_id(i): i for i in allowed}
        flt = models.Filter(must=[models.HasIdCondition(has_id=list(by_point))])
        requests = [models.QueryRequest(query=q.tolist(), filter=flt, limit=k) for q in queries]
        responses = await self.client.query_batch_points(self.collection, requests=requests)
        return [[(by_point[str(p.id)], p.score) for p in r.points] for r in responses]

    async def count(self) -> int:
        if not await self.client.collection_exists(self.collection):
            return 0
        return (await self.client.count(self.collection, exact=True)).count

    async def ping(self) -> None:
        await self.client.get_collections()

    async def close(self) -> None:
        await self.client.close()


def _as_array(vector) -> np.ndarray:
    if isinstance(vector, dict):  # named-vector form {"": [...]}
        vector = next(iter(vector.values()))
    return np.asarray(vector, dtype=np.float32)


def open_index(qdrant_url: str | None, api_key: str | None, collection: str, edge_path: Path,
               shards: int = 1, replicas: int = 1) -> ItemIndex:
    """Qdrant server when a URL is configured, else the embedded Qdrant Edge shard. `shards` and
    `replicas` apply when the collection is created on a distributed Qdrant."""
    if qdrant_url:
        from qdrant_client import AsyncQdrantClient

        if qdrant_url == ":memory:":  # qdrant-client's local mode: same client API, no server
            return ServerIndex(AsyncQdrantClient(location=":memory:"), collection)
        return ServerIndex(AsyncQdrantClient(url=qdrant_url, api_key=api_key), collection, shards, replicas)
    return EdgeIndex(edge_path)


def open_configured_index(index: IndexSettings, edge_path: Path) -> ItemIndex:
    """The index the settings name (gateway, ingestion and trainer open it alike)."""
    return open_index(index.qdrant_url, index.qdrant_key, index.qdrant_collection, edge_path, index.qdrant_shards,
                      index.qdrant_replicas)


# --- selection -----------------------------------------------------------------------------


TIE_MARGIN = 8


def top_k(found: Sequence[tuple[str, float]], k: int) -> list[str]:
    """Highest similarity first; equal similarities (to 1e-6) by item id."""
    return [i for i, _ in sorted(found, key=lambda hit: (-round(hit[1], 6), hit[0]))[:k]]


def latest_per_item(behaviours: Sequence[Behaviour]) -> dict[str, Behaviour]:
    """A re-rated item counts once, with its latest behaviour."""
    return {b.item_id: b for b in behaviours}


def pick_recent(behaviours: Sequence[Behaviour], k: int) -> list[Behaviour]:
    return list(behaviours[-k:]) if k > 0 else []


async def pick_subr(index: ItemIndex, behaviours: Sequence[Behaviour], targets: Sequence[str], k: int
                    ) -> dict[str, list[Behaviour]]:
    """For each target, its K nearest history items (by item vector), in time order."""
    latest = latest_per_item(behaviours)
    if len(latest) <= k:  # everything fits: nothing to choose
        chosen = sorted(latest.values(), key=lambda b: b.ts)
        return {t: chosen for t in targets}
    target_vectors = await index.vectors(targets)
    searchable = [t for t in targets if t in target_vectors]
    # A few more than K, so that equal similarities (e.g. one title listed twice in the catalog)
    # are broken the same way by every caller and every copy of the index.
    hits = await index.nearest_within(np.stack([target_vectors[t] for t in searchable]), list(latest),
                                      k + TIE_MARGIN) if searchable else []
    picked = {t: sorted((latest[i] for i in top_k(found, k)), key=lambda b: b.ts)
              for t, found in zip(searchable, hits)}
    recent = pick_recent(behaviours, k)
    return {t: picked.get(t, recent) for t in targets}  # no vector for a target: recent history


async def pick_slate(index: ItemIndex, behaviours: Sequence[Behaviour], targets: Sequence[str], k: int
                     ) -> list[Behaviour]:
    """The K history items nearest the centroid of the candidates' unit vectors, in time order."""
    latest = latest_per_item(behaviours)
    if len(latest) <= k:
        return sorted(latest.values(), key=lambda b: b.ts)
    target_vectors = list((await index.vectors(targets)).values())
    if not target_vectors:  # no candidate has a vector: recent history
        return pick_recent(behaviours, k)
    units = np.stack(target_vectors) / (np.linalg.norm(target_vectors, axis=1, keepdims=True) + 1e-12)
    (found,) = await index.nearest_within(units.mean(axis=0, keepdims=True), list(latest), k + TIE_MARGIN)
    return sorted((latest[i] for i in top_k(found, k)), key=lambda b: b.ts)


async def select_behaviours(index: ItemIndex, behaviours: Sequence[Behaviour], targets: Sequence[str],
                            k: int, mode: RetrievalMode) -> dict[str, list[Behaviour]]:
    if mode == "subr":
        return await pick_subr(index, behaviours, targets, k)
    shared = pick_recent(behaviours, k) if mode == "recent" else await pick_slate(index, behaviours, targets, k)
    return {t: shared for t in targets}


def brute_force_nearest(query: np.ndarray, candidates: dict[str, np.ndarray], k: int) -> list[str]:
    """Reference cosine top-k (tests and offline checks)."""
    ids = list(candidates)
    matrix = np.stack([candidates[i] for i in ids])
    sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
    return [ids[j] for j in np.argsort(-sims, kind="stable")[:k]]
