"""The write path: behaviours into Redis, catalog items into Redis and their vectors into Qdrant."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.history import HistoryStore
from service.records import Behaviour, Item
from service.retrieval import ItemIndex
from service.schemas import EventIn


class Writer:
    def __init__(self, history: HistoryStore, index: ItemIndex, encoder) -> None:
        self.history = history
        self.index = index
        self.encoder = encoder
        self._encode_lock = asyncio.Lock()

    async def append_events(self, events: Sequence[EventIn]) -> int:
        """How many of `events` were new (retries and exact repeats are stored once)."""
        return await self.history.append_events(
            [(e.user_id, Behaviour(item_id=e.item_id, ts=e.ts, rating=e.rating), e.event_id) for e in events])

    async def put_items(self, items: Sequence[Item]) -> None:
        # The encoder runs the LLM on CPU: keep it off the event loop, one batch at a time.
        async with self._encode_lock:
            vectors = await asyncio.to_thread(self.encoder.encode, [i.description() for i in items])
        # Vector first: an item in the catalog always has its vector.
        await self.index.upsert([i.item_id for i in items], vectors)
        for item in items:
            await self.history.put_item(item)
