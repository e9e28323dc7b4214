"""An evaluation's journal: each gateway score appended as it arrives (JSON lines after a header naming the
evaluation), so a 10,000-sample evaluation cut short goes on where it stopped instead of starting over."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters.samples import Sample
from service.artifacts import code_version


class JournalMismatch(ValueError):
    """The journal belongs to another evaluation (other samples, adapter, options or code)."""


@dataclass
class Journal:
    """Each gateway score appended as it arrives (JSON lines after a header naming the evaluation), so a
    10,000-sample evaluation cut short goes on where it stopped instead of starting over."""

    path: Path
    key: dict
    rows: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0  # the earlier runs' time at the gateway

    def load(self, samples: Sequence[Sample]) -> None:
        """Read what an earlier run scored, checking each row is the same sample; drop a line cut by a kill."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]  # a run killed mid-write leaves a partial last line
        if complete != text:
            self.path.write_text(complete)
        lines = complete.splitlines()
        if not lines:
            return
        if lines[0] != json.dumps(self.key, sort_keys=True):
            raise JournalMismatch(f"{self.path} holds another evaluation ({lines[0][:300]}): remove it to start over")
        segments: dict[int, float] = defaultdict(float)
        for number, line in enumerate(lines[1:], start=2):
            row = self._row(line, number)
            sample = samples[row["i"]] if 0 <= row["i"] < len(samples) else None
            if sample is None or [sample.user_id, sample.item_id, sample.ts] != row["sample"]:
                raise JournalMismatch(f"{self.path}: line {number} is not this evaluation's sample {row['i']}")
            self.rows[row["i"]] = row
            segments[row["segment"]] = max(segments[row["segment"]], row["t"])
        self.seconds = sum(segments.values())

    def _row(self, line: str, number: int) -> dict:
        try:
            row = json.loads(line)
            return {"i": int(row["i"]), "sample": list(row["sample"]), "score": float(row["score"]),
                    "prompt": list(row["prompt"]), "served_by": str(row["served_by"]),
                    "components": dict(row.get("components") or {}), "scorer": str(row.get("scorer", "llm")),
                    "segment": int(row["segment"]), "t": float(row["t"])}
        except (ValueError, TypeError, KeyError) as error:
            raise JournalMismatch(f"{self.path}: line {number} is not a journal row ({error})") from None

    @contextmanager
    def appender(self):
        """An append function for this run's rows (the header first when the journal is new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            if self.path.stat().st_size == 0:
                handle.write(json.dumps(self.key, sort_keys=True) + "\n")
            segment, started = time.time_ns(), time.monotonic()

            def append(i: int, sample: Sample, score: float, prompt: list[int], served_by: str,
                       components: dict | None = None, scorer: str = "llm") -> None:
                handle.write(json.dumps({"i": i, "sample": [sample.user_id, sample.item_id, sample.ts],
                                         "score": score, "prompt": prompt, "served_by": served_by,
                                         "components": components or {}, "scorer": scorer,
                                         "segment": segment, "t": round(time.monotonic() - started, 3)}) + "\n")
                handle.flush()
            yield append




def open_journal(folder: Path, samples: Sequence[Sample], bank: str | None, **evaluation) -> Journal:
    """The journal of this evaluation: named by a hash of what it is (options, adapter or bank, the version of
    the scoring code, so a commit of documents or results does not orphan a long run), so another evaluation
    gets its own file; what an earlier run scored is read back."""
    key = {**evaluation, "samples": len(samples), "code": code_version(), "bank": bank}
    label = evaluation["method"] or evaluation["mode"] or evaluation["adapter"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    journal = Journal(folder / f"{evaluation['dataset']}-{label}-{digest}.jsonl", key)
    journal.load(samples)
    return journal
