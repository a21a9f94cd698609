"""Run the pipelines on this machine with `kfp.local` (SubprocessRunner): the embedded default.

The same DAG as on a cluster; Kubernetes settings (GPU pool, secrets) are ignored and every step runs as a
subprocess of this Python environment. Artifacts land under a local pipeline root, MLflow logs to a local
SQLite store unless a tracking URI is given.
"""

import contextlib
import copy
import datetime
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from oneword import tracking
from oneword.batch import UNCHANGED_SUFFIX
from oneword.config import TrackingConfig
from oneword.errors import OnewordError
from oneword.logs import log_level
from oneword.outcome import FAILURE_FILE, LOCAL_RUN_ENV
from oneword.pipelines.interrupt import stopping
from oneword.pipelines.parameters import LOCAL_PIPELINE_ROOT
from oneword.tracking import ensure_store

log = logging.getLogger(__name__)

RUN_NAME_TIME = "%Y-%m-%d-%H-%M-%S-%f"  # kfp.local's run folders: NAME-<this>
EXPERIMENT = TrackingConfig().experiment
BUNDLE_STEP = "bundle-concepts"  # the batch's bundle step, as kfp.local names its task
CHECKPOINTS = "checkpoints"  # under the pipeline root: keyed by what is trained, so a rerun resumes or skips


def _local_overrides(pipeline_root: Path) -> dict:
    """Cluster defaults that make no sense on one machine: checkpoints go beside the runs, not to s3://."""
    return {"checkpoint_root": str((pipeline_root / CHECKPOINTS).resolve())}


def _step_failure(run_dir: Path | None, error: Exception, log_file: Path | None) -> OnewordError:
    """The failing step's own message and hint (its failure.json), in place of kfp.local's traceback."""
    import re

    found = sorted(run_dir.rglob(FAILURE_FILE), key=lambda p: p.stat().st_mtime) if run_dir else []
    if not found:
        said = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # kfp.local colours its names for a terminal
        task = re.search(r"Inner task failed: '([^']+)'", said)
        return OnewordError(
            f"the pipeline stopped at {task.group(1) if task else 'a step'}: {said}", hint=_where(log_file)
        )
    return _failure_error(found[-1], log_file)


def _where(log_file: Path | None) -> str:
    return f"the steps' full log: {log_file}" if log_file else "the steps' full log is above"


def _failure_error(failure_file: Path, log_file: Path | None) -> OnewordError:
    why = json.loads(failure_file.read_text())
    hint = f"{why['hint']}; {_where(log_file)}" if why.get("hint") else _where(log_file)
    said = why["error"] if why["error"].startswith(why["stage"]) else f"{why['stage']} failed: {why['error']}"
    return OnewordError(said, hint=hint)


def _init(pipeline_root: Path) -> None:
    import kfp.local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root.resolve()),
        raise_on_error=True,
    )


@contextlib.contextmanager
def _marked_local() -> Iterator[None]:
    """Tell the tasks (subprocesses, which inherit it) that they run under kfp.local, which caches nothing and
    here retries nothing: a step's transient error is then recorded as the concept's, not raised
    (`oneword.outcome.run_step`)."""
    before = os.environ.get(LOCAL_RUN_ENV)
    os.environ[LOCAL_RUN_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LOCAL_RUN_ENV, None)
        else:
            os.environ[LOCAL_RUN_ENV] = before


def default_log_file(pipeline_root: Path, pipeline: str) -> Path:
    """Where a local run's step logs go unless told: `<pipeline root>/logs/<pipeline>-<local time>-<pid>.log` (two
    runs started in one second into one pipeline root keep a file each)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pipeline_root / "logs" / f"{pipeline}-{stamp}-{os.getpid()}.log"


class _TaskProgress(logging.Filter):
    """On the root logger, where kfp.local logs each task's start and end: a line per finished task to `out` (the
    terminal, while the steps' own logs go to a file), the seconds since the run began first; in a batch, with
    the concepts of the shard the task ran for.

    kfp.local logs a task's outputs right after its end, from the same thread: their paths name the shard's
    loop iteration (`for-loop-N-iteration-I`), and `plan-batch`'s output lists the shards in that order.
    """

    FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
    OUTPUTS = re.compile(r"^Task '([^']+)' (?:outputs:|has no outputs)")
    SHARD = re.compile(r"for-loop-\d+-iteration-(\d+)")
    PLAN = "plan-batch"
    # what a training logs (`oneword.train`, `oneword.inversion`), read from its task's output
    # (after KFP's `[KFP Executor ... INFO]: `, or, from `train --gpus N`'s processes, `INFO oneword.inversion: `)
    TRAINING = re.compile(r"[\]:] training (?:\d+ concepts together \((?P<tokens>.*?)\)|(?P<token>\S+) \(init)")
    STEP = re.compile(r"[\]:] step (\d+)/(\d+): loss")
    RESUMED = re.compile(r"[\]:] resumed from .* \(step (\d+)\)")
    EARLY = re.compile(r"[\]:] early end at step (\d+) of (\d+)")
    DREW = re.compile(r"[\]:] evaluate (\S+): drew (\d+) of (\d+) images")  # `oneword.evaluation.evaluate`
    EVERY_S = 60.0  # between a training's progress lines: an hour's run says where it is, not every step

    def __init__(self, out, stopped: threading.Event | None = None, unsaid: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.out, self.start, self.unsaid = out, time.time(), unsaid  # tasks whose end is no news when they pass
        self.stopped = stopped or threading.Event()  # set on Ctrl-C: the tasks that fail after it are not news
        self.held: dict[int | None, tuple[str, str, float]] = {}  # thread -> a finished task awaiting its outputs
        self.shards: list[list[str]] = []
        self.lock = threading.Lock()

    def task(self) -> Callable[[str], None]:
        """A reader of one task's output lines (`interrupt.stopping`'s watch): while it trains, a line now and
        then with its step, speed and time left; and a line where it resumed from a checkpoint or ended early;
        while it evaluates, the images drawn of those it will draw, and time left. The steps' log has every step;
        the terminal said nothing between "cache-latents done" and "train done", nor for the evaluation's minutes.
        """
        seen: dict = {"tokens": "", "first": None, "said": time.monotonic()}

        def now_and_then(task: str, done: int, total: int, unit: str) -> None:
            now = time.monotonic()
            first = seen["first"] = seen["first"] or (done, now)
            if now - seen["said"] < self.EVERY_S or done == total or now <= first[1]:
                return
            seen["said"], rate = now, (done - first[0]) / (now - first[1])
            left = f", {_duration((total - done) / rate)} left" if rate > 0 else ""
            said = f"at {unit} {done}/{total}, {rate:.3g} {unit}s/s{left}"
            self._say(task, said, time.time() - self.start, seen["tokens"])

        def read(line: str) -> None:
            if found := self.TRAINING.search(line):
                seen["tokens"] = found["tokens"] or found["token"]
            elif found := self.RESUMED.search(line):
                self._say("train", f"resumed at step {found[1]}", time.time() - self.start, seen["tokens"])
            elif found := self.EARLY.search(line):
                self._say("train", f"ended early at step {found[1]} of {found[2]}", time.time() - self.start,
                          seen["tokens"])  # fmt: skip
            elif found := self.STEP.search(line):
                now_and_then("train", int(found[1]), int(found[2]), "step")
            elif found := self.DREW.search(line):
                seen["tokens"] = found[1]
                now_and_then("evaluate", int(found[2]), int(found[3]), "image")

        return read

    def filter(self, record: logging.LogRecord) -> bool:
        said = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # kfp.local colours its names for a terminal
        if found := self.FINISHED.match(said):
            task, status = found.groups()
            if status == "SUCCESS":
                if task not in self.unsaid:
                    self.held[record.thread] = (task, "done", time.time() - self.start)
            else:
                self._say(task, status.lower(), time.time() - self.start, "")
        elif (found := self.OUTPUTS.match(said)) and (held := self.held.pop(record.thread, None)):
            if held[0] == self.PLAN:
                self.shards = _shard_names(said)
            index = self.SHARD.search(said)
            names = self.shards[int(index.group(1))] if index and int(index.group(1)) < len(self.shards) else []
            self._say(*held, ", ".join(names))
        return True

    def flush(self) -> None:
        """Say the finished tasks whose outputs were never logged."""
        for task, mark, seconds in self.held.values():
            self._say(task, mark, seconds, "")
        self.held.clear()

    def _say(self, task: str, mark: str, seconds: float, concepts: str) -> None:
        if self.stopped.is_set():
            return
        room = 80 - len(f"  {seconds:5.0f} s  {task} {mark}  ()")  # the line stays within 80 columns
        if len(concepts) > room:
            concepts = concepts[: max(room - 1, 8)] + "…"
        with self.lock:  # tasks' threads say theirs at once
            print(f"  {seconds:5.0f} s  {task} {mark}" + (f"  ({concepts})" if concepts else ""), file=self.out,
                  flush=True)  # fmt: skip


def _duration(seconds: float) -> str:
    """About how long, for a person: "40 s", "12 min", "2 h 05 min"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{minutes} min" if not hours else f"{hours} h {minutes:02d} min"


def _shard_names(outputs: str) -> list[list[str]]:
    """The concepts' names of each shard, from `plan-batch`'s logged outputs (`Output: [[{...}, ...], ...]`)."""
    import ast

    for line in outputs.splitlines():
        if line.strip().startswith("Output: "):
            try:
                shards = ast.literal_eval(line.strip().removeprefix("Output: "))
                return [[str(c.get("name", "?")) for c in shard] for shard in shards]
            except (ValueError, SyntaxError, TypeError, AttributeError):  # a format of another kfp: names unsaid
                return []
    return []


@contextlib.contextmanager
def _task_logs(log_file: Path | None, unsaid: frozenset[str] = frozenset()) -> Iterator[None]:
    """Send kfp.local's streamed task logs to `log_file` (None: the terminal), and say on the terminal, a line
    each, which tasks finished (but those `unsaid` that passed) and, now and then, how far a training is; mark the
    tasks as local ones. Ctrl-C stops the run within seconds (`interrupt.stopping`) and raises
    KeyboardInterrupt."""
    progress = _TaskProgress(sys.stdout, unsaid=unsaid) if log_file else None  # before the logs take stdout
    watch = progress.task if progress else None  # without a log file, the tasks' own output is on the terminal
    with warnings.catch_warnings(), _marked_local(), stopping(progress.stopped if progress else None, watch):
        # kfp warns that the oneword image is "custom"; locally the steps run in this very environment
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # and that the cluster settings (requests, limits, GPUs) do nothing here, which is the point of them
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        if log_file is None or progress is None:
            yield
            return
        log_file.parent.mkdir(parents=True, exist_ok=True)
        print(f"kfp.local runs the steps here; their logs: {log_file}", flush=True)
        root = logging.getLogger()
        before = list(root.handlers)
        with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                root.addFilter(progress)  # a filter, not a handler: kfp.local replaces the root logger's handlers
                yield
            finally:
                root.removeFilter(progress)
                progress.flush()
                for h in list(root.handlers):  # kfp.local installs a stdout handler on the root logger
                    if h not in before:
                        root.removeHandler(h)


@contextlib.contextmanager
def _live_runs_ended_if_stopped(tracking_uri: str, run: "_ThisRun", experiment: str) -> Iterator[None]:
    """Around a local run: stopped (Ctrl-C, a signal), its trainings' live MLflow runs, which only a `register`
    completes, are ended as KILLED, not left RUNNING for good (a rerun is another KFP run, with runs of its own;
    on a cluster the exit handler ends them: `live.end_orphaned_runs`)."""
    from oneword.processes import Stopped

    try:
        yield
    except (KeyboardInterrupt, Stopped):
        run_dir = run.folder()
        if run_dir is not None:
            from oneword.live import end_orphaned_runs

            try:
                end_orphaned_runs(tracking_uri, experiment, "", "the local run was stopped before its register "
                                  "(a rerun resumes from its checkpoints)", kfp_run_name=run_dir.name)  # fmt: skip
            except Exception as e:  # the stop is what to report
                log.warning("could not end the stopped run's MLflow runs (%s)", e)
        raise


def _for_local_run(pipeline):
    """A copy of the pipeline without retry policies, for kfp.local.

    On one machine there is no preempted node to survive, and kfp.local honours retries by sleeping through the
    backoff (60 s, 120 s, 240 s) before running a deterministic failure again.
    """
    pipeline = copy.deepcopy(pipeline)
    spec = pipeline.pipeline_spec
    for comp in [spec.root, *spec.components.values()]:
        for task in comp.dag.tasks.values() if comp.HasField("dag") else []:
            task.ClearField("retry_policy")
    return pipeline


class _ThisRun:
    """The kfp.local run this process starts, and its folder.

    Several processes may share a pipeline root and start runs at the same moment (a script, or a scheduler, that
    starts `oneword run`s at once): the run's name is recorded as kfp.local makes it (`recording`), so that none
    reports another's failure or result, or ends another's MLflow runs. Where it could not be (a kfp release that
    names runs elsewhere), the folder is told by time (`_own_run`). The recording replaces kfp.local's naming
    function for the call (kfp.local runs one pipeline at a time in a process): a dependency on its internals,
    which `_own_run` stands in for where they changed.
    """

    def __init__(self, pipeline_root: Path, prefix: str) -> None:
        self.pipeline_root, self.prefix = pipeline_root, prefix
        self.started, self.name, self.hooked = time.time(), None, False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the name kfp.local gives the run started inside."""
        try:
            from kfp.local import executor_input_utils as naming

            make = naming.get_local_pipeline_resource_name
        except (ImportError, AttributeError):
            yield
            return

        def named(pipeline_name: str) -> str:
            self.name = make(pipeline_name)
            return self.name

        naming.get_local_pipeline_resource_name = named
        self.hooked = True
        try:
            yield
        finally:
            naming.get_local_pipeline_resource_name = make

    def folder(self) -> Path | None:
        """The run's folder; None where no task wrote one (or kfp.local had not named the run yet)."""
        if self.name is None:
            return None if self.hooked else _own_run(self.pipeline_root, self.prefix, self.started)
        folder = self.pipeline_root / self.name
        return folder if folder.is_dir() else None


def _own_run(pipeline_root: Path, prefix: str, started: float) -> Path | None:
    """The folder of the run this process started at `started` (`time.time()`), among the runs of other processes
    that share the pipeline root.

    kfp.local names a run `PREFIX-YYYY-mm-dd-HH-MM-SS-ffffff` (local time) as it starts, and makes its folder when
    a task first writes: another run's folder is named before `started` or after this one's. Which folder changed
    last says nothing: another run's task can write after this run's last.
    """
    runs = []
    for p in pipeline_root.glob(f"{prefix}-*"):
        try:
            named = datetime.datetime.strptime(p.name[len(prefix) + 1 :], RUN_NAME_TIME).timestamp()
        except ValueError:  # not a kfp.local run folder
            continue
        if named >= started - 1e-3 and p.is_dir():  # a name keeps whole microseconds
            runs.append((named, p))
    return min(runs)[1] if runs else None


def check_settings(params: dict, command: str = "run") -> None:
    """The parameters by their config fields' rules, before any step runs (a bad step count met in `train`
    stopped a run after its photos were encoded, as "Inner task failed: 'train'"); the hint names `command`'s help.
    """
    from oneword.pipelines.parameters import invalid

    if problems := invalid(params):
        raise OnewordError(
            "invalid setting" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems),
            hint=f"`oneword {command} --help` says what each option takes",
        )


def _check_concept(params: dict) -> None:
    """Check the concept as the pipeline's plan step will, on this machine: its mistake (a name no registry search
    can hold, a vector count of 0) is told here, whole, not as "Inner task failed: 'plan-concept'"."""
    from oneword.batch import ConceptEntry
    from oneword.registry import concept_name

    fields = ("images", "token", "init_word", "name", "n_vectors", "templates")
    required = ("images", "token", "init_word")  # given empty: said as such, not as left out
    entry = ConceptEntry(**{k: params[k] for k in fields if params.get(k) not in (None, "") or k in required})
    concept_name(entry.token, entry.name)
    if not entry.images.startswith("s3://"):  # a photo folder that is not there: said before kfp.local starts
        from oneword.preflight import images_problem

        problem, fix = images_problem(entry.images, entry.token)
        if problem:
            raise OnewordError(problem, hint=fix)


def run_textual_inversion(
    pipeline_root: Path = Path(LOCAL_PIPELINE_ROOT),
    tracking_uri: str | None = None,
    log_file: Path | None = None,
    **params,
) -> dict:
    """Run the `textual_inversion` pipeline locally.

    Args:
        pipeline_root: where KFP writes each task's artifacts.
        tracking_uri: MLflow tracking URI (default: `oneword.tracking.default_tracking_uri()`, ./mlflow.db).
        log_file: where the steps' logs go (default: the terminal).
        **params: pipeline parameters (images, token, init_word, base_model, steps, ...).

    Returns:
        `{"registered": "name/version@alias", "unchanged": bool, "run_dir": ..., "tracking_uri": ..., "report": ...,
        "grid": ..., "photos": (preprocess's manifest.json), "gate": (why that alias)}`; `unchanged` says that this
        very training was registered before (or by another run meanwhile). `registered` is what register wrote;
        without it (none is there), the run's exit handler's answer (`batch.run_answer`).
    """
    from oneword.pipelines.definitions import textual_inversion

    check_settings(params)
    _check_concept(params)
    uri = ensure_store(tracking_uri)  # made once here, before any step opens it
    _init(pipeline_root)
    run = _ThisRun(pipeline_root, "textual-inversion")
    args = {**_local_overrides(pipeline_root), **params, "tracking_uri": uri}
    if not os.path.isabs(str(args["images"])) and not str(args["images"]).startswith("s3://"):
        args["images"] = str(Path(args["images"]).resolve())
    experiment = args.get("experiment") or EXPERIMENT
    try:  # the pipeline's first task is the preflight: a mistake costs seconds, not a training run
        with _live_runs_ended_if_stopped(uri, run, experiment), _task_logs(log_file), run.recording():
            registered = _for_local_run(textual_inversion)(**args)
    except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        raise _step_failure(run.folder(), e, log_file) from e
    run_dir = run.folder()
    said = registered.output if hasattr(registered, "output") else registered
    said = str(said or "")
    unchanged = said.endswith(UNCHANGED_SUFFIX)  # told before any GPU step: no register ran (`oneword.unchanged`)
    out = {
        "registered": said.removesuffix(UNCHANGED_SUFFIX) or None,
        "unchanged": unchanged,
        "run_dir": str(run_dir),
        "tracking_uri": uri,
        "seconds": time.time() - run.started,
    }
    if run_dir:
        registration = sorted(run_dir.glob("**/register/registration/registration.json"))
        if registration:  # register's own record: it stands whether or not the exit handler could ask MLflow
            r = json.loads(registration[0].read_text())
            out["registered"], out["unchanged"] = f"{r['name']}/{r['version']}@{r['alias']}", r.get("unchanged", False)
            out["gate"] = r.get("reason")  # why that alias: a candidate's reader asks first
        for key, pattern in (
            ("report", "**/evaluate/evaluation/report.html"),
            ("grid", "**/evaluate/evaluation/grid.png"),
            ("metrics", "**/evaluate/evaluation/metrics.json"),
            # the checkpoint evaluation selected and register registered, which the printed scores describe
            ("embedding", "**/evaluate/evaluation/embedding/learned_embeds.safetensors"),
            ("photos", "**/preprocess/dataset/manifest.json"),  # which photos were used, which skipped and why
        ):
            hits = sorted(run_dir.glob(pattern))
            out[key] = str(hits[0]) if hits else None
    return out


def run_batch(
    concepts_manifest: str,
    pipeline_root: Path = Path(LOCAL_PIPELINE_ROOT),
    tracking_uri: str | None = None,
    log_file: Path | None = None,
    **params,
) -> dict:
    """Run the `batch_personalisation` pipeline locally; returns the batch's per-concept report, with `overview`:
    the path of its overview page (`oneword.batch_overview`), where report-batch wrote one."""
    import kfp.local

    from oneword.batch import concept_names, load_concepts_manifest, plan_concepts
    from oneword.bundles import check_bundle_name
    from oneword.pipelines.definitions import batch_personalisation

    check_settings(params, "batch")
    # as plan-batch will: a mistake is told here, whole
    entries = load_concepts_manifest(concepts_manifest)
    plan_concepts(entries, params.get("only_concepts", ()), concepts_manifest)
    uri = ensure_store(tracking_uri)  # made once here, before the shards open it in parallel
    if params.get("bundle"):
        check_bundle_name(params["bundle"], concept_names(entries), uri, concepts_manifest)
    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root.resolve()),
        raise_on_error=False,
    )  # a failed concept must not stop the report
    run = _ThisRun(pipeline_root, "batch-personalisation")
    # a run without a bundle: its bundle step ends at once, doing nothing worth a line
    experiment = params.get("experiment") or EXPERIMENT
    with _live_runs_ended_if_stopped(uri, run, experiment), run.recording(), \
            _task_logs(log_file, frozenset() if params.get("bundle") else frozenset({BUNDLE_STEP})):
        _for_local_run(batch_personalisation)(
            concepts_manifest=concepts_manifest, tracking_uri=uri,
            # kfp.local keeps no Argo workflow, whose size is what the limit is for: every changed concept trains
            **{**_local_overrides(pipeline_root), "max_concepts_per_run": 0, **params},
        )
    run_dir = run.folder()
    stopped = sorted(run_dir.rglob(f"preflight/**/{FAILURE_FILE}")) if run_dir else []
    if stopped:  # nothing ran: say why, rather than report every concept as not registered
        raise _failure_error(stopped[0], log_file)
    summaries = sorted(run_dir.rglob("report-batch/summary")) if run_dir else []
    report = json.loads(summaries[0].read_text()) if summaries else {}
    report.update({"run_dir": str(run_dir), "tracking_uri": uri, "seconds": time.time() - run.started})
    pages = sorted(run_dir.rglob("report-batch/overview")) if run_dir else []
    if pages:  # KFP names the artifact's file as its output; a browser opens it by its suffix
        report["overview"] = str(shutil.copyfile(pages[0], run_dir / "overview.html"))
    return report


def _why_changed(rows: list[dict], evaluations: dict[str, str], uri: str) -> None:
    """Say in each `to train` row why (`registry.why_changed`); a row the registry cannot tell keeps no why."""
    from oneword.registry import why_changed

    with tracking.briefly():
        for row in rows:
            if row["status"] == "to train" and not row["why"] and row["name"] in evaluations:
                try:
                    row["why"] = why_changed(uri, row["name"], evaluations[row["name"]])
                except Exception as e:  # it answered the lookup a moment ago: a blip leaves the row as it was
                    log.debug("%s: why it changed could not be told (%s)", row["name"], e)


def batch_plan(concepts_manifest: str, tracking_uri: str | None = None, **params) -> dict:
    """What `run_batch` with these parameters would do with each concept, running nothing and recording nothing
    (`oneword.unchanged`: the lookup the pipelines make before any GPU step, by this oneword release).

    Returns:
        `{"tracking_uri", "registry": bool (False: no store there yet, so nothing is registered), "concepts"}`;
        per concept, in the manifest's order: `{"name", "status", "version", "alias", "why"}`; status `unchanged`
        (the version and alias it would keep; `why`: what the gate said, where only the gate changed), `to train`,
        `fails at STEP` (`why`: the error that step would record at every attempt, and its hint), or `unknown`
        (`why`: it could not be told, and a run would train it).
    """
    from oneword.batch import load_concepts_manifest, plan_concepts
    from oneword.catalogue import champion_tokens
    from oneword.pipelines.parameters import DEFAULTS, lookup_settings
    from oneword.preflight import preflight
    from oneword.tracking import resolve, sqlite_path
    from oneword.unchanged import result_keys, unchanged_versions

    check_settings(params, "batch")
    entries = load_concepts_manifest(concepts_manifest)
    with log_level(logging.ERROR, "oneword.batch"):  # what it warns of, concept by concept, is the table's rows
        concepts = plan_concepts(entries, params.get("only_concepts", ()), concepts_manifest)
    uri = resolve(tracking_uri)
    store = sqlite_path(uri)
    registry = store is None or store.exists()  # no store yet: nothing registered, and asking would make one
    if params.get("bundle"):  # as plan-batch refuses it
        from oneword.batch import concept_names
        from oneword.bundles import check_bundle_name

        check_bundle_name(params["bundle"], concept_names(entries), uri, concepts_manifest, registry)
    # what would stop the whole run at its preflight stops the dry run too, with the same words: not a table of
    # concepts "a run trains" when a run would train none
    p = {**DEFAULTS, **params}
    preflight(p["base_model"], [], p["clip_model"], uri if registry else None, p["experiment"], "", p["prompt_set"],
              p["dino_model"], writes=False)  # fmt: skip  (a dry run records nothing, the experiment neither)
    settings = lookup_settings(params)
    with log_level(logging.ERROR, "oneword.batch", "oneword.unchanged"):  # as above
        told = unchanged_versions(concepts, settings, uri) if registry else result_keys(concepts, settings)
    rows = []
    for c in concepts:
        row = {"name": c["name"], "status": "to train", "version": "", "alias": "",
               "why": told.unknown.get(c["name"], "")}
        if c["name"] in told.found:
            hit = told.found[c["name"]]
            row.update(status="unchanged", version=hit["version"], alias=",".join(hit["aliases"]),
                       why=hit.get("rejudged", ""))  # fmt: skip
        elif c["name"] in told.failing:
            failing = told.failing[c["name"]]
            why = failing["error"] + (f" ({failing['hint']})" if failing.get("hint") else "")
            row.update(status=f"fails at {failing['stage']}", why=why)
        elif c["name"] in told.unknown:
            row["status"] = "unknown"
        rows.append(row)
    if registry:
        _why_changed(rows, told.evaluations, uri)
    retrained = [r["name"] for r in rows if r["status"] in ("to train", "unknown")]
    tokens = {c["name"]: c["token"] for c in concepts}
    for name, (version, token) in (champion_tokens(uri, retrained) if registry and retrained else {}).items():
        if token and token != tokens[name]:  # a prompt that names the old token draws nothing of the new version
            row = next(r for r in rows if r["name"] == name)
            said = f"its token changes: the champion (v{version}) answers to {token}, this to {tokens[name]}"
            row["why"] = "; ".join(x for x in (row["why"], said) if x)
    return {"tracking_uri": uri, "registry": registry, "concepts": rows}
