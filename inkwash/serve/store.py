"""The durable side of the server: SQLite in WAL mode holds jobs, their result metadata and arena votes;
images live on disk beside it. Every state change is committed before it is announced, so a restart
loses nothing: queued and interrupted jobs are handed back to run again, finished ones stay listed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- 'api' or 'arena'
    model TEXT NOT NULL,
    request TEXT NOT NULL,           -- the normalised request, JSON
    status TEXT NOT NULL,            -- queued | running | succeeded | failed | cancelled
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    images TEXT                      -- JSON list of {"file", "seed"} once succeeded
);
CREATE INDEX IF NOT EXISTS jobs_gallery ON jobs (kind, status, created);
CREATE TABLE IF NOT EXISTS matches (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    left_name TEXT NOT NULL,
    right_name TEXT NOT NULL,
    left_job TEXT NOT NULL,
    right_job TEXT NOT NULL,
    created REAL NOT NULL,
    winner TEXT,                     -- left | right | tie, once voted
    voted REAL
);
"""

TERMINAL = ("succeeded", "failed", "cancelled")


class Store:
    """One connection shared by the server's threads, behind a lock (SQLite calls here take microseconds)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.images = self.dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.dir / "inkwash.db", check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _exec(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # --- jobs ---------------------------------------------------------------------------------------

    def add_job(self, job_id: str, kind: str, model: str, request: dict) -> dict:
        self._exec(
            "INSERT INTO jobs (id, kind, model, request, status, created) VALUES (?, ?, ?, ?, 'queued', ?)",
            (job_id, kind, model, json.dumps(request), time.time()),
        )
        return self.job(job_id)

    def set_running(self, job_id: str) -> None:
        self._exec("UPDATE jobs SET status='running', started=? WHERE id=?", (time.time(), job_id))

    def finish(self, job_id: str, status: str, *, images: list[dict] | None = None, error: str | None = None):
        """Mark a job finished; a job already finished keeps its first outcome."""
        assert status in TERMINAL
        self._exec(
            "UPDATE jobs SET status=?, finished=?, images=?, error=? WHERE id=? AND status NOT IN (?, ?, ?)",
            (status, time.time(), json.dumps(images) if images is not None else None, error, job_id, *TERMINAL),
        )

    def job(self, job_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def unfinished(self) -> list[dict]:
        """Jobs a previous server left queued or running, oldest first: they are to run again."""
        rows = self._exec("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created")
        self._exec("UPDATE jobs SET status='queued', started=NULL WHERE status='running'")
        return [_job(r) | {"status": "queued"} for r in rows]

    def gallery(self, limit: int = 48, before: float | None = None) -> list[dict]:
        rows = self._exec(
            "SELECT * FROM jobs WHERE kind='api' AND status='succeeded' AND created < ? ORDER BY created DESC LIMIT ?",
            (float("inf") if before is None else before, limit),
        )
        return [_job(r) for r in rows]

    # --- arena --------------------------------------------------------------------------------------

    def add_match(self, match_id: str, prompt: str, seed: int, left: tuple[str, str], right: tuple[str, str]):
        """`left` and `right` are (contestant name, job id)."""
        self._exec(
            "INSERT INTO matches (id, prompt, seed, left_name, left_job, right_name, right_job, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (match_id, prompt, seed, *left, *right, time.time()),
        )

    def match(self, match_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM matches WHERE id=?", (match_id,))
        return dict(rows[0]) if rows else None

    def blind(self, job_id: str) -> bool:
        """True for an arena job whose match has no vote yet (its contestant stays hidden)."""
        rows = self._exec("SELECT 1 FROM matches WHERE (left_job=? OR right_job=?) AND winner IS NULL", (job_id,) * 2)
        return bool(rows)

    def vote(self, match_id: str, winner: str) -> bool:
        """Record a vote; False if the match already has one (a vote is final)."""
        with self.lock:
            cur = self.db.execute(
                "UPDATE matches SET winner=?, voted=? WHERE id=? AND winner IS NULL", (winner, time.time(), match_id)
            )
            return cur.rowcount == 1

    def votes(self) -> list[tuple[str, str, float]]:
        """(left, right, outcome for left: 1 win, 0 loss, 0.5 tie) for every voted match."""
        score = {"left": 1.0, "right": 0.0, "tie": 0.5}
        rows = self._exec("SELECT left_name, right_name, winner FROM matches WHERE winner IS NOT NULL")
        return [(r["left_name"], r["right_name"], score[r["winner"]]) for r in rows]


def _job(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["request"] = json.loads(d["request"])
    d["images"] = json.loads(d["images"]) if d["images"] else []
    return d
