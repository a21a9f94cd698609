"""The MLflow tracking store: which one, and making a local one safely.

A local SQLite store is created (tables made and migrated) the first time anything opens it. MLflow does that
without a lock, so two processes opening a fresh store at once both run the migrations and one of them fails
half-way (`duplicate column name`), which can leave the store unusable. kfp.local runs a batch's ParallelFor
iterations as parallel processes, so this is the normal case, not a corner: every opening of a SQLite store
goes through `ensure_store`, which makes the store once, under a file lock beside the database.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

from filelock import FileLock

from oneword.errors import OnewordError

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
_ready: set[str] = set()  # stores this process has already made or checked


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # sqlite:, http(s):, postgresql:, databricks, file:, ...


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a SQLite store `mlflow.db` in the working directory (made on first use)."""
    return as_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE_PREFIX}{Path.cwd() / 'mlflow.db'}")


def resolve(tracking_uri: str | None) -> str:
    """The store a command uses: `tracking_uri` as `as_uri` reads it, else `default_tracking_uri()`."""
    return as_uri(tracking_uri) if tracking_uri else default_tracking_uri()


def as_uri(text: str) -> str:
    """A tracking URI as given, or a SQLite database given as a path (`./mlflow.db`: `sqlite:///` + its absolute
    path, which every step of a run reads the same wherever it starts).

    MLflow reads any other path as a file store (a folder like `./mlruns`), which it keeps in maintenance mode
    and oneword's registry does not use: refused, saying what to write.
    """
    if _SCHEME.match(text) or text == "databricks":  # MLflow's own word for the default Databricks profile
        return text
    path = Path(text).expanduser()
    if path.suffix.lower() in SQLITE_SUFFIXES or path.is_file():
        return f"{SQLITE_PREFIX}{path.resolve()}"
    raise OnewordError(
        f"tracking URI {text!r} is a path, which MLflow would read as a file store (a folder of runs, which "
        "MLflow keeps in maintenance mode and oneword's registry does not use)",
        hint=f"a local store is a SQLite file: --tracking-uri {text.rstrip('/')}.db (or sqlite:///PATH); "
        "a server is http://HOST:5000",
    )


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(tracking_uri[len(SQLITE_PREFIX) :]) if tracking_uri.startswith(SQLITE_PREFIX) else None


def existing_store(tracking_uri: str | None) -> str:
    """`tracking_uri` (else the default), refused where it names a SQLite file that is not there: a command that
    reads the registry must not make an empty store (a misspelt path, another folder) and answer from it."""
    uri = resolve(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise OnewordError(
            f"no MLflow store at {db}",
            hint="pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the runs registered in: "
            "`oneword run` and `oneword demo` print it",
        )
    return uri


# the user and password of `scheme://user:pass@host`, to the last "@" before the path (a password may hold one)
_USERINFO = re.compile(r"\b(\w[\w+.-]*://)[^/\s'\"]+@")


def shown(text: str) -> str:
    """A tracking URI, or a text that quotes URIs (an error, a log line), fit to print or keep: without the user
    and password a URI may carry (MLflow takes `http://user:password@host` as basic auth)."""
    return _USERINFO.sub(r"\1", text)


class HideCredentials(logging.Filter):
    """A logging filter that passes every record on with the credentials of the URIs it quotes left out (`shown`):
    a step's log is kept, and read by others, with the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            said = record.getMessage()
        except Exception:  # arguments that do not fit the message: logging's handler says so, as without this
            return True
        if "@" in said:
            record.msg, record.args = shown(said), None
        return True

    @classmethod
    def install(cls) -> None:
        """On every handler of the root logger (once): a pipeline step logs through the runner's own."""
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, cls) for f in handler.filters):
                handler.addFilter(cls())


def local_artifact_root(tracking_uri: str) -> str | None:
    """Where a SQLite store keeps its artifacts: `mlartifacts/` beside the database (not the cwd)."""
    db = sqlite_path(tracking_uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db else None


def ensure_store(tracking_uri: str | None = None) -> str:
    """Make sure the tracking store exists and is migrated, safely under concurrent callers.

    For a `sqlite:///` store this creates the tables (once, under `<db>.lock`); other stores (an `mlflow
    server`, PostgreSQL behind it) are made by their server and are left alone.

    Returns:
        The tracking URI used.

    Raises:
        OnewordError: if the SQLite store cannot be made or was left half-migrated by an older oneword.
    """
    uri = resolve(tracking_uri)
    db = sqlite_path(uri)
    if db is None or uri in _ready:
        return uri
    if db.is_file() and db.stat().st_size and _head(db) != SQLITE_MAGIC:
        raise OnewordError(
            f"{db} is not a SQLite database, so not an MLflow store (it was left as it was)",
            hint="pass --tracking-uri the store's .db file (`oneword run` prints it), or a new file's name",
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from sqlalchemy.exc import DatabaseError

    lock = FileLock(f"{db}.lock")
    try:
        lock.acquire()
    except OSError as e:
        if not db.is_file():
            raise OnewordError(f"cannot make the MLflow store {db}: {e.strerror} ({e.filename})",
                               hint="pass --tracking-uri a file in a folder you may write to") from e  # fmt: skip
        if e.errno != errno.EROFS and os.access(db.parent, os.W_OK):  # a lock another user's, NFS: opened unlocked,
            raise OnewordError(  # a migration of the store could meet another's and damage it
                f"cannot take the MLflow store's lock {db}.lock: {e.strerror}",
                hint="make the lock file writable for you (a store shared by several users: the group's), or "
                "remove it if no oneword uses the store now",
            ) from e
        lock = None  # a folder that cannot be written (a read-only backup, a snapshot): the store is read as it is
    try:
        TrackingStore(uri, local_artifact_root(uri))  # creates or migrates the tables
        RegistryStore(uri)
    except (DatabaseError, MlflowException) as e:  # OperationalError among them
        raise OnewordError(f"cannot open the MLflow store {db}: {said(e)}", hint=store_hint(str(e), db, uri)) from e
    finally:
        if lock is not None:
            lock.release()
    _ready.add(uri)
    return uri


def store_hint(error: str, db: Path, uri: str) -> str:
    """What to do about a SQLite store that could not be opened, by what SQLite said."""
    if "_alembic_tmp_" in error:
        return (f"the store was left half-migrated by an unguarded concurrent start: if it holds nothing you need, "
                f"delete {db}; otherwise drop the `_alembic_tmp_*` table named above with sqlite3, then run "
                f"`mlflow db upgrade {uri}`")  # fmt: skip
    if "database is locked" in error:
        return (f"another process holds {db} (a long write, or one stuck): wait for it or stop it; SQLite on a "
                "network file system (NFS) is not safe to share")
    if "malformed" in error or "not a database" in error:
        return (f"{db} is damaged: restore it from a backup (`sqlite3 {db} .recover` may save what it holds), or "
                "pass another --tracking-uri")
    if "disk is full" in error or "disk I/O" in error:
        return f"free space where {db} lies, or move it to a disk with room"
    if "readonly" in error or "read-only" in error:
        return f"{db} cannot be written: check its permissions and its disk, or pass another --tracking-uri"
    return f"take a backup of {db}, then run `mlflow db upgrade {uri}`; or pass another --tracking-uri"


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC))
    except OSError as e:  # unreadable: said as such, not as a traceback
        raise OnewordError(f"cannot read the MLflow store {path}: {e.strerror}",
                           hint="check the file's permissions, or pass another --tracking-uri") from e


def refuse_active_run(step: str) -> None:
    """Refuse to start `step`, which opens MLflow runs of its own with MLflow's fluent API, while the caller has a
    run of theirs active in this thread (`with mlflow.start_run():` in a notebook): MLflow would refuse it with a
    bare Exception after the experiment was made, and the caller's run be left logging to oneword's store."""
    import mlflow

    if (active := mlflow.active_run()) is not None:
        raise OnewordError(
            f"{step} opens an MLflow run of its own, and run {active.info.run_id} is active in this thread",
            hint="call it outside that run's `with mlflow.start_run():` block (or after mlflow.end_run())",
        )


def client(tracking_uri: str | None = None):
    """Point mlflow at the store (made first if local) and return `(mlflow, MlflowClient)`."""
    import mlflow

    uri = ensure_store(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, mlflow.MlflowClient(uri, uri)


# A person (or an exit handler) waits at what asks MLflow and nothing else: a server that does not answer is said
# in seconds, not after MLflow's default of 7 retries with backoff (almost 5 minutes). Set either to override.
QUERY_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def said(e: Exception, most: int = 300) -> str:
    """An MLflow client error in one short line. A server that could not be reached ("http://host:5000 did not
    answer: Connection refused"), that answered with errors only, or whose certificate was refused is said as
    such, not as the request's 400-character URL and urllib3's retry chatter, from which a person must dig out
    which it was."""
    text = str(e).strip()
    # the database's own words, beneath SQLAlchemy's (to a line's end: a newline, or a server's JSON's \\n)
    if db := re.search(r"\((?:sqlite3|psycopg2|pymysql|MySQLdb)[.\w]*\) ((?:(?!\\n)[^\n\[])+)", text):
        return shown(f"the store's database said: {db.group(1).strip()}")[:most]
    request = re.match(r"API request to (\w+://[^/\s]+)\S* failed with (?:timeout )?exception ", text)
    if request:
        where = shown(request.group(1))
        if found := re.search(r"too many (\d+) error responses", text):
            return f"{where} answered HTTP {found.group(1)} at every attempt"
        if "SSLError" in text or "CERTIFICATE" in text:
            why = re.findall(r"\[SSL: [^\]]+\] ([^'\")(]+)", text) or re.findall(r"SSLError\((.{0,120})", text)
            return f"{where}: TLS failed: {(why[-1] if why else 'see --verbose').strip()}"
        why = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.findall(
            r"(Connection to \S+ timed out|Read timed out)", text
        )
        if why:
            return f"{where} did not answer: {why[-1].strip()}"
    return shown(text.splitlines()[0])[:most] if text else type(e).__name__


def briefly():
    """A context in which MLflow's client waits as `QUERY_HTTP` says, where not set otherwise; the environment is
    as it was after it."""
    from unittest.mock import patch  # the stdlib's scoped os.environ change

    return patch.dict(os.environ, {k: v for k, v in QUERY_HTTP.items() if k not in os.environ})
