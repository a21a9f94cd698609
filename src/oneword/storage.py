"""Object storage: `s3://bucket/prefix` URIs on MinIO or any S3-protocol server, via the `minio` client.

The endpoint and credentials come from the environment, never from parameters, so that pipeline pods get them
from a Kubernetes Secret:

- `S3_ENDPOINT_URL` (or `MLFLOW_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL`): `http://minio:9000`. A value without a
  scheme is taken as http, since MinIO inside a cluster rarely has TLS.
- `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and optionally `AWS_SESSION_TOKEN`, `AWS_REGION`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from oneword.errors import OnewordError

ENDPOINT_VARS = ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# minio's own client waits 5 minutes to connect and 5 between reads, and tries 6 times: an endpoint that drops
# packets (a NetworkPolicy, a wrong host) held a step for half an hour before it said anything.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # between two reads of one answer: a large download may be slow, not silent this long


def is_s3(uri: str | os.PathLike) -> bool:
    """Return True if `uri` is an `s3://` URI."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/some/prefix` into `("bucket", "some/prefix")` (no leading or trailing slash)."""
    if not is_s3(uri):
        raise OnewordError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise OnewordError(f"{uri!r} has no bucket", hint="write it as s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


_UMASK = os.umask(0o022)  # read once, at import: os.umask is the only way to read it, and it sets it meanwhile
os.umask(_UMASK)


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, with the mode the umask gives any other file: safetensors creates its files
    0600, which a pod or a tool (a webui) running as another user on a shared volume cannot read."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # its I/O errors are not OSErrors
        raise OnewordError(f"cannot write {path}: {e}", hint="check the folder's permissions and free space") from e
    os.chmod(path, 0o666 & ~_UMASK)
    return Path(path)


def read_json(path: Path, hint: str) -> dict:
    """A JSON object that a step wrote, read; a file that is cut short, damaged or not an object is an
    `OnewordError` naming it, with `hint` (which step writes it again)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OnewordError(f"{path} is not readable JSON ({e})", hint=hint) from e
    if not isinstance(data, dict):
        raise OnewordError(f"{path} holds a JSON {type(data).__name__}, not the object oneword writes", hint=hint)
    return data


def part_path(final: Path) -> Path:
    """A hidden temporary name beside `final`, unique to this writer: writers in other pods on a shared volume
    often have the same process id (each container numbers its own), so a pid alone would let them collide."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.part")


def cache_root() -> Path:
    """Return oneword's cache folder: `$ONEWORD_CACHE`, else `~/.cache/oneword`."""
    return Path(os.environ.get("ONEWORD_CACHE", Path.home() / ".cache" / "oneword"))


def model_cache_root() -> Path:
    """Return where models under `s3://` are kept: `$ONEWORD_MODEL_CACHE`, else `cache_root()/models`. Apart from
    photos and latents: the images put it on the cluster's shared model volume, which people's photos stay off."""
    return Path(os.environ.get("ONEWORD_MODEL_CACHE", cache_root() / "models"))


def client(read_timeout: float = READ_TIMEOUT_S):
    """Build a `minio.Minio` client from the environment (see the module docstring).

    Args:
        read_timeout: seconds to wait between two reads of an answer (a check that must take seconds passes less).

    Returns:
        A `minio.Minio` client.
    """
    import certifi
    import urllib3
    from minio import Minio

    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if endpoint is None:
        raise OnewordError(
            "an s3:// path was given but no S3 endpoint is configured",
            hint="set S3_ENDPOINT_URL=http://HOST:PORT plus AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urlparse(endpoint)
    if parsed.path.strip("/"):  # the S3 client asks HOST:PORT/BUCKET/KEY: a path would be dropped unsaid
        raise OnewordError(
            f"the S3 endpoint {endpoint} has a path ({parsed.path}), which S3 clients cannot use",
            hint="give the endpoint as scheme://HOST[:PORT] only (a reverse proxy must serve S3 at its root)",
        )
    return Minio(
        parsed.netloc,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        http_client=urllib3.PoolManager(  # minio's own, with timeouts that end in minutes, not half an hour
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=5, connect=2, read=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        ),
    )


def list_objects(uri: str) -> list[tuple[str, int, str]]:
    """List the objects under an `s3://` prefix.

    Returns:
        `(key relative to the prefix, size in bytes, etag)` for each object, sorted by key.
    """
    bucket, prefix = split_s3(uri)
    mc = client()
    if not mc.bucket_exists(bucket):
        raise OnewordError(f"bucket {bucket!r} of {uri!r} does not exist", hint="create it or fix the URI")
    p = f"{prefix}/" if prefix else ""
    out = [
        (o.object_name[len(p) :], o.size or 0, (o.etag or "").strip('"'))
        for o in mc.list_objects(bucket, prefix=p, recursive=True)
        if not o.is_dir
    ]
    return sorted(out)


def download_prefix(uri: str, dest: Path | None = None, only: Sequence[str] = (), cache: Path | None = None,
                    pick: Callable[[list[str]], Collection[str]] | None = None) -> Path:
    """Download every object under an `s3://` prefix into a local folder, once, and keep the folder equal to it.

    Objects whose etag matches the previous download are not fetched again; files whose object is gone from the
    prefix are removed (a photo taken out of the bucket must not be trained on). Processes that fill one folder
    at once (kfp.local's parallel steps, pods sharing a cache volume) take turns. Without `dest`, the folder is
    `CACHE/s3/BUCKET/<hash of the prefix, and of only>`, in `cache` (default `cache_root()`).

    Args:
        uri: the `s3://` prefix.
        dest: the local folder.
        only: keys (relative to the prefix) to take, a folder's as `name/`; empty: every object.
        cache: where a `dest` not given lies (`model_cache_root()` for models).
        pick: of the keys listed (after `only`), those to take (`model_files.model_keys`: what a load reads). It
            names no folder of its own: give one prefix one `pick` wherever it is downloaded into one cache.

    Returns:
        The local folder.
    """
    bucket, prefix = split_s3(uri)
    if dest is None:  # a part of a prefix has a folder of its own: kept equal to it, it would empty the whole's
        named = prefix + "".join(f"\0{k}" for k in sorted(only))
        dest = (cache or cache_root()) / "s3" / bucket / hashlib.sha256(named.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()  # the files it keeps are compared as resolved paths
    objects = list_objects(uri)
    if only:
        objects = [o for o in objects if any(o[0] == k or (k.endswith("/") and o[0].startswith(k)) for k in only)]
    if pick is not None:
        taken = set(pick([o[0] for o in objects]))
        objects = [o for o in objects if o[0] in taken]
    if not objects:
        raise OnewordError(f"no objects under {uri!r}", hint="check the bucket and prefix")
    with FileLock(str(dest / ".oneword-s3.lock")):
        index_path = dest / ".oneword-s3-index.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.exists() else {}
        except ValueError:  # cut short by a kill: the files are fetched again, nothing worse
            index = {}
        mc = client()
        wanted = {}
        for key, _size, etag in objects:
            target = wanted[key] = _inside(dest, key, uri)
            if index.get(key) == etag and target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = part_path(target)  # hidden: never read as a photo
            mc.fget_object(bucket, f"{prefix}/{key}" if prefix else key, str(tmp))
            tmp.replace(target)
            index[key] = etag
        keep = set(wanted.values())
        for f in [f for f in dest.rglob("*") if f.is_file() and f not in keep]:
            if f.name.startswith(".oneword-s3"):
                continue
            f.unlink()  # gone from the prefix, or a download a kill cut short
        for d in sorted((d for d in dest.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()  # a sub-prefix whose objects are all gone
        index = {k: v for k, v in index.items() if k in wanted}
        tmp = part_path(index_path)
        tmp.write_text(json.dumps(index))
        tmp.replace(index_path)
    return dest


def _inside(dest: Path, key: str, uri: str) -> Path:
    """Where object `key` of the prefix goes under `dest`; a key that would land outside it is refused."""
    target = (dest / key.lstrip("/")).resolve()
    if not target.is_relative_to(dest) or target == dest:
        raise OnewordError(
            f"object {key!r} under {uri!r} names a path outside its folder",
            hint="rename the object: keys with '..' parts cannot be downloaded as files",
        )
    return target


def download_file(uri: str, dest: Path) -> Path:
    """Download one `s3://bucket/key` object to `dest` (written atomically). Returns `dest`."""
    bucket, key = split_s3(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    client().fget_object(bucket, key, str(tmp))
    tmp.replace(dest)
    return dest


def upload_file(path: Path, uri: str) -> None:
    """Upload a local file to the object `s3://bucket/key`, creating the bucket if needed."""
    bucket, key = split_s3(uri)
    mc = client()
    if not mc.bucket_exists(bucket):
        mc.make_bucket(bucket)
    mc.fput_object(bucket, key, str(path))


def upload_dir(path: Path, uri: str) -> None:
    """Upload every file under a local folder to an `s3://` prefix, keeping relative paths."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        upload_file(f, uri.rstrip("/") + "/" + f.relative_to(path).as_posix())


def object_size(uri: str) -> int:
    """The size in bytes of the object `s3://bucket/key`."""
    bucket, key = split_s3(uri)
    return int(client().stat_object(bucket, key).size or 0)


def refused(error: BaseException) -> bool:
    """True if the store refused the request itself (access denied, unknown keys, a bad bucket name).

    Asking again gets the same answer, so such errors are not retried; timeouts (408), throttling (429), server
    errors (5xx) and lost connections are.
    """
    from minio.error import S3Error

    if isinstance(error, S3Error):
        status = getattr(error.response, "status", None)
        return status is not None and 400 <= status < 500 and status not in (408, 429)
    return isinstance(error, ValueError) and not isinstance(error, OnewordError)  # minio checks names itself


def object_exists(uri: str) -> bool:
    """Return True if the object `s3://bucket/key` exists."""
    from minio.error import S3Error

    bucket, key = split_s3(uri)
    try:
        client().stat_object(bucket, key)
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            return False
        raise
    return True


def check_replaceable(final: Path, marker: str, what: str) -> None:
    """Refuse to replace `final` unless it is absent, empty, or an earlier output of the same kind (it holds `marker`).

    An output folder is replaced whole: a slip such as `-o runs/my-cat` for a folder that holds the training would
    otherwise delete it.
    """
    if final.exists() and not final.is_dir():
        raise OnewordError(f"{final} is a file, not a folder: cannot write {what} there", hint="choose another -o")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).exists():
        raise OnewordError(
            f"{final} already holds files and is not {what} (it has no {marker}): refusing to replace it",
            hint="choose a new or empty folder for the output; only an earlier output of the same step is replaced",
        )


def check_writable(final: Path) -> None:
    """Refuse an output `final` whose folder cannot be written (read-only, not a folder, no permission), said
    before the work that fills it rather than after: the output is written beside it, then moved in."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=final.parent, prefix=".oneword-probe-"):
            pass
    except OSError as e:
        raise OnewordError(
            f"cannot write the output {final}: {e.strerror or e} ({e.filename or final.parent})",
            hint="choose an -o in a folder you may write to",
        ) from e


@contextmanager
def atomic_dir(final: Path, marker: str | None = None, what: str = "an output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `final` and move it into place only if the block succeeds.

    A failure leaves `final` as it was (absent, or its previous content): never half-written output. With a
    `marker`, a non-empty `final` is replaced only if it holds that file (`check_replaceable`), checked before
    the block runs and again before the move.
    """
    if marker:
        check_replaceable(final, marker, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the output from pods of another user on a shared volume
    writing = FileLock(str(tmp / WRITING_LOCK), blocking=False)
    writing.acquire()  # held while the folder is written: a folder whose lock is free was abandoned
    old = final.with_name(f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        yield tmp
        # the old output steps aside before the new one moves in: `final` is never half-written (absent for an
        # instant at most); writers that finish together take turns, and the last one's output stays
        with FileLock(str(final.with_name(f".{final.name}.lock"))):
            if marker:
                check_replaceable(final, marker, what)
            if final.exists():
                final.rename(old)
            (tmp / WRITING_LOCK).unlink()  # not part of the output; still held through its open file
            try:
                tmp.rename(final)
            except BaseException:
                if old.exists():
                    old.rename(final)  # the new one did not move in: the old one goes back
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        writing.release()
    shutil.rmtree(old, ignore_errors=True)


WRITING_LOCK = ".oneword-writing.lock"
SCRATCH_GRACE_S = 60.0  # a scratch folder younger than this is never taken for abandoned


def _remove_abandoned(final: Path) -> None:
    """Remove what writers of `final` killed outright (kill -9, the OOM killer) left beside it: a scratch folder
    no writer holds, an old output set aside for a new one that moved in (or put back, if none did). A scratch
    folder of a writer still at work is held (`atomic_dir`) and stays; one without a lock file is left alone."""
    for scratch in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        lock = scratch / WRITING_LOCK
        try:  # a writer takes its lock a moment after it makes its folder: one that young is left alone
            if not lock.is_file() or time.time() - scratch.stat().st_mtime < SCRATCH_GRACE_S:
                continue
        except OSError:  # it went meanwhile
            continue
        held = FileLock(str(lock), blocking=False)
        try:
            held.acquire()
        except (Timeout, OSError):  # its writer is at work, or it went meanwhile
            continue
        try:
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            held.release()
    with FileLock(str(final.with_name(f".{final.name}.lock"))):  # no writer is between its two renames
        asides = []
        for aside in final.parent.glob(f".{glob_escape(final.name)}.old-*"):
            with contextlib.suppress(OSError):  # a writer that moved its output in removes its own, after the lock
                asides.append((aside.stat().st_mtime, aside))
        asides = [aside for _, aside in sorted(asides)]
        if asides and not final.exists():  # killed between them: the output it set aside goes back
            asides.pop().rename(final)
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


WRITER_LOCK = ".oneword-writer.lock"


@contextmanager
def one_writer(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for one writer while the block runs: a second writer at once is refused, not queued.

    For steps that write into their folder as they go (a training's checkpoints): two of them at once would
    interleave their files. The lock is the kernel's (`flock`), so a writer killed outright releases it. A folder
    this call created is removed again if the block fails before writing anything into it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OnewordError(f"{folder} is a file, not a folder: a {what} writes a folder", hint="choose another -o")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / WRITER_LOCK), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise OnewordError(
            f"{folder} is being written by another {what} now (it holds {folder / WRITER_LOCK})",
            hint="wait for that one to end, or choose another -o",
        ) from None
    try:
        yield
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= {WRITER_LOCK}:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        lock.release()
