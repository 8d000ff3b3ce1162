"""A run directory and its SQLite ledger: which stages finished, when, with what metrics.

Stages talk through files in the run directory; the ledger (`run.db`) records their status,
timings and metrics so a run can be resumed, listed and reported. The standard-library
`sqlite3` is enough here: one writer (the running stage) and a few small tables.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.recipe import Recipe

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
  name TEXT PRIMARY KEY, status TEXT NOT NULL, fingerprint TEXT NOT NULL,
  started_at REAL, ended_at REAL, seconds REAL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
  pid INTEGER);
CREATE TABLE IF NOT EXISTS metrics (
  stage TEXT NOT NULL, subject TEXT NOT NULL, name TEXT NOT NULL, value REAL,
  PRIMARY KEY (stage, subject, name));
CREATE TABLE IF NOT EXISTS teacher_usage (  -- cumulative over every attempt: what was spent
  stage TEXT NOT NULL, teacher TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
  PRIMARY KEY (stage, teacher, name));
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the usual umask-based mode, so
    other local users — e.g. the `ollama` service account — can read what we publish."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: no half-written temporary file stays behind
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any error. Needed because the connections run in
    autocommit mode (isolation_level=None), where `with db:` opens no transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass(frozen=True)
class StageRecord:
    name: str
    status: str
    fingerprint: str
    seconds: float | None
    attempts: int
    error: str | None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that pid: alive
        return True
    return True


def _truthful(name: str, status: str, fingerprint: str, seconds: float | None, attempts: int,
              error: str | None, pid: int | None) -> StageRecord:
    """A stage still marked running whose process is gone (kill -9, power loss) was interrupted."""
    if status == "running" and not _alive(pid):
        status, error = "interrupted", error or "its process ended without recording why (killed?)"
    return StageRecord(name, status, fingerprint, seconds, attempts, error)


class Ledger:
    """The run's `run.db`: stage status and metrics."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            if "pid" not in {row[1] for row in self.db.execute("PRAGMA table_info(stages)")}:
                self.db.execute("ALTER TABLE stages ADD COLUMN pid INTEGER")  # ledgers made before it
        except sqlite3.OperationalError as exc:
            raise UserError(f"{path}: cannot open the run ledger ({exc}) — check the folder's permissions "
                            "and free space") from None

    def close(self) -> None:
        self.db.close()

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    _STAGE_COLUMNS = "name, status, fingerprint, seconds, attempts, error, pid"

    def stage(self, name: str) -> StageRecord | None:
        row = self.db.execute(f"SELECT {self._STAGE_COLUMNS} FROM stages WHERE name=?", (name,)).fetchone()
        return _truthful(*row) if row else None

    def stages(self) -> list[StageRecord]:
        rows = self.db.execute(f"SELECT {self._STAGE_COLUMNS} FROM stages ORDER BY started_at")
        return [_truthful(*r) for r in rows]

    def start_stage(self, name: str, fingerprint: str) -> None:
        self.db.execute(
            "INSERT INTO stages (name, status, fingerprint, started_at, attempts, pid) "
            "VALUES (?, 'running', ?, ?, 1, ?) "
            "ON CONFLICT(name) DO UPDATE SET status='running', fingerprint=excluded.fingerprint, "
            "started_at=excluded.started_at, ended_at=NULL, seconds=NULL, error=NULL, attempts=attempts+1, "
            "pid=excluded.pid",
            (name, fingerprint, time.time(), os.getpid()),
        )

    def end_stage(self, name: str, status: str, error: str | None = None) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE stages SET status=?, ended_at=?, seconds=? - started_at, error=? WHERE name=?",
            (status, now, now, error, name),
        )

    def mark_stale(self, names: list[str]) -> None:
        """Stages whose inputs were rebuilt by a single-stage command: rerun them next time."""
        self.db.executemany("UPDATE stages SET status='stale' WHERE name=? AND status='done'",
                            [(n,) for n in names])

    def log_metrics(self, stage: str, subject: str, values: dict[str, float]) -> None:
        with transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                [(stage, subject, k, float(v)) for k, v in values.items()],
            )

    def clear_metrics(self, stage: str) -> None:
        """Forget a stage's metrics before it measures again (no stale rows from older settings)."""
        with transaction(self.db):
            self.db.execute("DELETE FROM metrics WHERE stage=?", (stage,))

    def add_usage(self, stage: str, teacher: str, deltas: dict[str, float]) -> None:
        """Add to the cumulative teacher usage (requests, tokens, cost...) of a stage."""
        with transaction(self.db):
            self.db.executemany(
                "INSERT INTO teacher_usage VALUES (?, ?, ?, ?) "
                "ON CONFLICT(stage, teacher, name) DO UPDATE SET value = value + excluded.value",
                [(stage, teacher, k, float(v)) for k, v in deltas.items() if v])

    def usage(self) -> dict[tuple[str, str], dict[str, float]]:
        """`{(stage, teacher): {name: total}}` over the run's whole life."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for stage, teacher, name, value in self.db.execute(
                "SELECT stage, teacher, name, value FROM teacher_usage ORDER BY stage, teacher, name"):
            out.setdefault((stage, teacher), {})[name] = value
        return out

    def metrics(self, stage: str, subject: str | None = None) -> dict[str, dict[str, float]]:
        """`{subject: {name: value}}` for one stage."""
        sql, args = "SELECT subject, name, value FROM metrics WHERE stage=?", [stage]
        if subject is not None:
            sql, args = sql + " AND subject=?", [stage, subject]
        out: dict[str, dict[str, float]] = {}
        for subj, name, value in self.db.execute(sql, args):
            out.setdefault(subj, {})[name] = value
        return out


class RunDir:
    """The files of one run. Every stage gets its paths from here, never from globals."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunDir:
        return cls(Path(recipe.run.runs_dir) / recipe.run.name)

    recipe_path = property(lambda self: self.root / "recipe.toml")
    ledger_path = property(lambda self: self.root / "run.db")
    store_path = property(lambda self: self.root / "distill.db")
    distill_set_path = property(lambda self: self.root / "distill_set.json")
    student_init_dir = property(lambda self: self.root / "student_init")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    student_dir = property(lambda self: self.root / "student")
    student_sft_dir = property(lambda self: self.root / "student_sft")  # the SFT-only baseline
    eval_dir = property(lambda self: self.root / "eval")
    report_path = property(lambda self: self.root / "report.md")
    report_html_path = property(lambda self: self.root / "report.html")
    export_dir = property(lambda self: self.root / "export")  # GGUF files, Modelfile, export.md
    dataset_dir = property(lambda self: self.root / "dataset")  # Hugging Face `datasets` (Arrow)
    dataset_jsonl_path = property(lambda self: self.root / "distill_set.jsonl")

    def create(self, recipe: Recipe) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_path, recipe.to_toml())

    @contextmanager
    def held(self) -> Iterator[None]:
        """This process is the run's only writer while inside: a second process on the same folder
        (two `make demo` in one clone) stops at once with one line instead of racing the first
        through its files. An flock on the folder itself (no lock file: not a byte of a full disk
        is spent on it), which the kernel drops when the holder dies, even by kill -9."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(folder)
            raise UserError(f"{self.root}: another edgedistill process is working on this run — wait for it to "
                            "finish, or give this one another --name") from None
        try:
            yield
        finally:
            os.close(folder)  # closing it releases the lock

    def ledger(self) -> Ledger:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such run — start it with `edgedistill run RECIPE`")
        return Ledger(self.ledger_path)


def is_main_process() -> bool:
    """False in the other processes of a `torchrun` / `accelerate launch` run (RANK > 0)."""
    return int(os.environ.get("RANK", "0")) == 0


class FollowerLedger:
    """The ledger as the non-main processes of a distributed run see it: they read what the main
    process wrote and write nothing (one writer), keeping stage fingerprints in memory."""

    def __init__(self, ledger: Ledger):
        self._ledger = ledger
        self._running: dict[str, str] = {}

    def __getattr__(self, name: str):
        return getattr(self._ledger, name)

    def start_stage(self, name: str, fingerprint: str) -> None:
        self._running[name] = fingerprint

    def stage(self, name: str) -> StageRecord | None:
        if name in self._running:
            return StageRecord(name, "running", self._running[name], None, 0, None)
        return self._ledger.stage(name)

    def _ignore(self, *args, **kwargs) -> None:
        return None

    end_stage = mark_stale = log_metrics = set_meta = add_usage = clear_metrics = _ignore


@contextmanager
def open_ledger(run: RunDir) -> Iterator[Ledger]:
    ledger = run.ledger()
    try:
        yield ledger
    finally:
        ledger.close()


def list_runs(runs_dir: Path) -> list[dict[str, object]]:
    """One summary per run folder: name, stage statuses, total seconds."""
    out = []
    for db_path in sorted(runs_dir.glob("*/run.db")):
        ledger = Ledger(db_path)
        try:
            stages = ledger.stages()
            out.append({
                "name": db_path.parent.name,
                "path": str(db_path.parent),
                "stages": {s.name: s.status for s in stages},
                "seconds": sum(s.seconds or 0.0 for s in stages),
                "meta": json.dumps(ledger.meta()),
            })
        finally:
            ledger.close()
    return out
