"""Unit-of-work records (stage x unit) in one SQLite file: cost does not grow in driver memory.

A unit is done only when its output was renamed into place, its record says so, and its
fingerprint (hash of the inputs and settings it was built from) matches the current one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
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
);
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY,
    fingerprint TEXT,
    total INTEGER,
    started REAL,
    report TEXT
);
"""
# Columns added after the first release; old manifests get them on open.
_ADDED_COLUMNS = {"node": "TEXT", "started": "REAL"}

# SQLite binds at most 999 variables per statement on old builds.
_IN_CHUNK = 900


class Manifest:
    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a killed process (only a power cut may lose the last
        # ones, and a lost "done" only means the unit is redone, its output renamed over itself).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(units)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE units ADD COLUMN {column} {kind}")
        self._db.commit()

    # --- units ----------------------------------------------------------------------------

    def done_units(self, stage: str, fingerprint: str) -> set[str]:
        rows = self._db.execute(
            "SELECT unit FROM units WHERE stage=? AND state='done' AND fingerprint=?",
            (stage, fingerprint))
        return {r[0] for r in rows}

    def done_among(self, stage: str, fingerprint: str, units: list[str]) -> set[str]:
        """Which of ``units`` are done with this fingerprint (one query per chunk, so a stage of
        a million units never loads them all)."""
        done: set[str] = set()
        for start in range(0, len(units), _IN_CHUNK):
            chunk = units[start:start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT unit FROM units WHERE stage=? AND state='done' AND fingerprint=? "
                f"AND unit IN ({marks})", (stage, fingerprint, *chunk))
            done.update(r[0] for r in rows)
        return done

    def is_done(self, stage: str, unit: str, fingerprint: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM units WHERE stage=? AND unit=? AND state='done' AND fingerprint=?",
            (stage, unit, fingerprint)).fetchone()
        return row is not None

    def mark_running(self, stage: str, units: list[str], fingerprint: str) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO units (stage, unit, state, attempts, fingerprint, updated, started) "
            "VALUES (?, ?, 'running', 1, ?, ?, ?) ON CONFLICT(stage, unit) DO UPDATE SET "
            "state='running', attempts=attempts+1, fingerprint=excluded.fingerprint, error=NULL, "
            "updated=excluded.updated, started=excluded.started, node=NULL",
            [(stage, u, fingerprint, now, now) for u in units])
        self._db.commit()

    def mark_done(self, stage: str, unit: str, counts: dict | None = None,
                  checksum: str | None = None, node: str | None = None) -> None:
        self.mark_done_many(stage, [(unit, counts, node)], checksum)

    def mark_done_many(self, stage: str, finished: Iterable[tuple[str, dict | None, str | None]],
                       checksum: str | None = None) -> None:
        """Record (unit, counts, node id) of finished units in one transaction."""
        now = time.time()
        self._db.executemany(
            "UPDATE units SET state='done', counts=?, output_checksum=?, error=NULL, updated=?, "
            "node=? WHERE stage=? AND unit=?",
            [(json.dumps(counts or {}, default=str), checksum, now, node, stage, unit)
             for unit, counts, node in finished])
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

    def units(self, stage: str | None = None):
        """Every unit record as a dict (streamed), e.g. to compare before and after a resume."""
        cursor = self._db.execute(
            "SELECT stage, unit, state, attempts, fingerprint, error, node, started, updated "
            "FROM units" + (" WHERE stage=?" if stage else "") + " ORDER BY stage, unit",
            (stage,) if stage else ())
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))

    def failures(self, stage: str | None = None, limit: int | None = None
                 ) -> list[tuple[str, str, str]]:
        q = "SELECT stage, unit, error FROM units WHERE state='failed'"
        args: tuple = ()
        if stage:
            q += " AND stage=?"
            args = (stage,)
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        return self._db.execute(q, args).fetchall()

    def stage_names(self) -> list[str]:
        """Stages in the order they first ran."""
        return [r[0] for r in self._db.execute(
            "SELECT stage FROM units GROUP BY stage ORDER BY MIN(rowid)")]

    def reset_stages(self, keep) -> int:
        """Forget the units of every stage for which ``keep(stage)`` is false (their outputs
        are gone, e.g. never uploaded); returns how many records were dropped."""
        drop = [s for s in self.stage_names() if not keep(s)]
        for stage in drop:
            self._db.execute("DELETE FROM units WHERE stage=?", (stage,))
            self._db.execute("DELETE FROM stages WHERE stage=?", (stage,))
        self._db.commit()
        return len(drop)

    # --- stages ---------------------------------------------------------------------------

    def start_stage(self, stage: str, fingerprint: str, total: int | None) -> None:
        self._db.execute(
            "INSERT INTO stages (stage, fingerprint, total, started, report) VALUES (?, ?, ?, ?, NULL) "
            "ON CONFLICT(stage) DO UPDATE SET fingerprint=excluded.fingerprint, "
            "total=excluded.total, started=excluded.started, report=NULL",
            (stage, fingerprint, total, time.time()))
        self._db.commit()

    def finish_stage(self, stage: str, report: dict) -> None:
        self._db.execute("UPDATE stages SET report=? WHERE stage=?",
                         (json.dumps(report, default=str), stage))
        self._db.commit()

    def stage_info(self, stage: str) -> dict | None:
        row = self._db.execute("SELECT fingerprint, total, started, report FROM stages WHERE stage=?",
                               (stage,)).fetchone()
        if row is None:
            return None
        return {"fingerprint": row[0], "total": row[1], "started": row[2],
                "report": json.loads(row[3]) if row[3] else None}

    def snapshot(self, dest: str | os.PathLike) -> None:
        """A consistent copy of the database (WAL included) at ``dest``, e.g. to upload it."""
        target = sqlite3.connect(str(dest))
        try:
            self._db.backup(target)
        finally:
            target.close()

    def close(self) -> None:
        self._db.close()
