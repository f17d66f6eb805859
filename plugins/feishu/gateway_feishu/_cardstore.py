"""Which card answers which reply, kept on disk so a reply resumed after a crash updates its card.

DingTalk lets the caller name a card; Feishu assigns card ids (``card_id``), so the mapping
``reply id + part -> card`` must outlive the process.  One small JSON file per card in the
instance's state directory, written atomically (temporary file, then rename) in a thread: it is
written twice per card (created, then sent), never per update.

The record also fixes the card's *sequence clock*: CardKit wants a strictly increasing ``sequence``
for every operation on a card, across retries and restarts.  Sequences are milliseconds since the
card was created (at least one more than the previous), so a restarted process continues above
every number used before without writing each one down.  Cards can be edited for 14 days; older
records are deleted when the store opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import attrs

__all__ = ["CardRecord", "CardStore", "Sequence"]

_KEEP = 14 * 86400.0


@attrs.frozen
class CardRecord:
    card_id: str
    created: float  # wall clock (epoch seconds): the origin of the sequence numbers
    message_id: str = ""  # the reply message showing the card, once sent

    @classmethod
    def new(cls, card_id: str) -> CardRecord:
        return cls(card_id, time.time())


class Sequence:
    """Strictly increasing CardKit sequence numbers for one card (milliseconds since creation)."""

    def __init__(self, created: float) -> None:
        self._created = created
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, int((time.time() - self._created) * 1000) + 1)
        return self._last


class CardStore:
    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._pruned = False

    def _path(self, key: str) -> Path:
        return self._folder / f"{key}.json"

    async def get(self, key: str) -> CardRecord | None:
        return await asyncio.to_thread(self._read, key)

    async def put(self, key: str, record: CardRecord) -> None:
        await asyncio.to_thread(self._write, key, record)

    def _read(self, key: str) -> CardRecord | None:
        try:
            data = json.loads(self._path(key).read_text("utf-8"))
            return CardRecord(str(data["card_id"]), float(data["created"]), data["message_id"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: a new card is better than none

    def _write(self, key: str, record: CardRecord) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        if not self._pruned:
            self._prune()
        path = self._path(key)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(attrs.asdict(record), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)

    def _prune(self) -> None:
        self._pruned = True
        horizon = time.time() - _KEEP
        for path in self._folder.glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < horizon:
                    path.unlink()
