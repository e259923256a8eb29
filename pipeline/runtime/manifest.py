"""Unit-of-work records (stage x unit) in one SQLite file: cost does not grow in driver memory.

A unit is done only when its output was renamed into place, its record says so, and its
fingerprint (hash of the inputs and settings it was built from) matches the current one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    stage TEXT NOT NULL,
    unit TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT,
    error TEXT,
    counts TEXT,
    output_checksum TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (stage, unit)
)
"""


class Manifest:
    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def done_units(self, stage: str, fingerprint: str) -> set[str]:
        rows = self._db.execute(
            "SELECT unit FROM units WHERE stage=? AND state='done' AND fingerprint=?",
            (stage, fingerprint))
        return {r[0] for r in rows}

    def is_done(self, stage: str, unit: str, fingerprint: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM units WHERE stage=? AND unit=? AND state='done' AND fingerprint=?",
            (stage, unit, fingerprint)).fetchone()
        return row is not None

    def mark_running(self, stage: str, units: list[str], fingerprint: str) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO units (stage, unit, state, attempts, fingerprint, updated) "
            "VALUES (?, ?, 'running', 1, ?, ?) ON CONFLICT(stage, unit) DO UPDATE SET "
            "state='running', attempts=attempts+1, fingerprint=excluded.fingerprint, error=NULL, "
            "updated=excluded.updated",
            [(stage, u, fingerprint, now) for u in units])
        self._db.commit()

    def mark_done(self, stage: str, unit: str, counts: dict | None = None,
                  checksum: str | None = None) -> None:
        self._db.execute(
            "UPDATE units SET state='done', counts=?, output_checksum=?, error=NULL, updated=? "
            "WHERE stage=? AND unit=?",
            (json.dumps(counts or {}, default=str), checksum, time.time(), stage, unit))
        self._db.commit()

    def mark_failed(self, stage: str, unit: str, error: str) -> None:
        self._db.execute("UPDATE units SET state='failed', error=?, updated=? WHERE stage=? AND unit=?",
                         (error[-4000:], time.time(), stage, unit))
        self._db.commit()

    def counts(self, stage: str) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM units WHERE stage=? GROUP BY state", (stage,))
        return dict(rows.fetchall())

    def unit_counts(self, stage: str, fingerprint: str | None = None):
        """(unit, counts dict) of done units (with this fingerprint, if given), streamed."""
        query = "SELECT unit, counts FROM units WHERE stage=? AND state='done'"
        args: tuple = (stage,)
        if fingerprint is not None:
            query += " AND fingerprint=?"
            args += (fingerprint,)
        for unit, counts in self._db.execute(query + " ORDER BY unit", args):
            yield unit, json.loads(counts or "{}")

    def failures(self, stage: str | None = None) -> list[tuple[str, str, str]]:
        q = "SELECT stage, unit, error FROM units WHERE state='failed'"
        args: tuple = ()
        if stage:
            q += " AND stage=?"
            args = (stage,)
        return self._db.execute(q, args).fetchall()

    def close(self) -> None:
        self._db.close()
