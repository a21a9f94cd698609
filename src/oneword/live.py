"""Live training metrics in MLflow: what a long training is doing while it runs.

Training opens one MLflow run per concept (the run `register` later completes and ends), logs each concept's
loss and embedding norm every `log_every` steps, and every `sample_every` steps a grid of sample pictures drawn
with the current embedding. The run stays RUNNING after training; its id goes into the concept's summary.json.

Nothing here may stop a training: a call that fails (an MLflow outage) logs a warning, and the points not yet
logged are sent with the next report once the server answers again. Live calls make no HTTP retries (a retry
sleeps through its backoff while the GPU waits); after a failure the next `RETRY_AFTER_S` seconds of reports are
skipped rather than each waiting for a timeout.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch  # the stdlib's scoped os.environ change

from oneword.config import ConceptSpec, TrackingConfig
from oneword.tracking import as_uri

log = logging.getLogger(__name__)

KFP_RUN_ID_TAG, KFP_RUN_NAME_TAG = "kfp.run_id", "kfp.run_name"
LIVE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
LIVE_ID_TAG = "oneword.live_id"  # one training's runs, one per concept
CHECKPOINTS_TAG = "oneword.checkpoint_dir"  # a training's checkpoints: a resume of it goes on in its run
FAILURE_TAGS = ("oneword.failed_stage", "oneword.error")
RETRY_AFTER_S = 60.0  # after a failed call, how long live logging rests before it tries again
SAMPLE_SEEDS = 2  # pictures per prompt
SAMPLE_STEPS = 10  # DDIM steps: enough to see the concept take shape, a fraction of an evaluation's cost
SAMPLE_SEED = 0  # fixed, so that the pictures of one run differ only by the embedding


def end_failed(client, run_id: str, stage: str, error: str) -> None:
    """End an MLflow run FAILED, tagged with the step it failed at and why (`FAILURE_TAGS`)."""
    client.set_tag(run_id, FAILURE_TAGS[0], stage)
    client.set_tag(run_id, FAILURE_TAGS[1], error[:4000])
    client.set_terminated(run_id, status="FAILED")


def kfp_tags(run_id: str = "", run_name: str = "") -> dict[str, str]:
    """The run tags saying which KFP run produced an MLflow run (none outside KFP)."""
    tags = {KFP_RUN_ID_TAG: run_id, KFP_RUN_NAME_TAG: run_name}
    return {k: v for k, v in tags.items() if v and not v.startswith("{{$")}


def decode_outside_autocast(vae) -> None:
    """Make `vae.decode` run in the VAE's own precision under an fp16 autocast.

    Samples are drawn under the training step's autocast (the UNet may be cast to fp16), which would run the
    decoder's convolutions in fp16 too; SDXL's VAE overflows there (its config's `force_upcast`), and diffusers'
    upcast, which looks at the VAE's weights (fp32 here), never fires: the pictures come out black.
    """
    import torch

    decode = vae.decode

    def decode_as_is(z, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_as_is


@dataclass(frozen=True)
class LiveTracking:
    """Where a training logs live: the MLflow store, experiment and the tags every run gets."""

    tracking_uri: str
    experiment: str = TrackingConfig().experiment
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def configured(
        cls, tracking_uri: str | None, experiment: str = TrackingConfig().experiment, tags: dict | None = None
    ) -> LiveTracking | None:
        """Live tracking to `tracking_uri`, else to `$MLFLOW_TRACKING_URI`; None when neither is set."""
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return cls(as_uri(uri), experiment, dict(tags or {})) if uri else None


@contextmanager
def _live_http() -> Iterator[None]:
    with patch.dict(os.environ, LIVE_HTTP):
        yield


class LiveRuns:
    """The open MLflow runs of one training, one per concept name, and the metrics callback that feeds them.

    Args:
        tracking: where to log.
        concepts: `(name, concept)` per concept trained; `name` is its registered-model name.
        fingerprint: the base model's fingerprint (a run tag, as `register` sets it).
        tags: more tags of each concept's run, by name.
    """

    def __init__(self, tracking: LiveTracking, concepts: Sequence[tuple[str, ConceptSpec]], fingerprint: str,
                 tags: dict[str, dict[str, str]] | None = None, resume: bool = False):
        self.tracking = tracking
        self.names = {spec.token: name for name, spec in concepts}
        self.run_ids: dict[str, str] = {}  # name -> run id
        self.logged: dict[str, int] = {}  # token -> the last step whose curve point is logged
        self.trainer = None
        self.sample_every = 0
        self._pipe = None
        self._resting_until = 0.0
        self._last_sample = 0
        self._client = None
        self._concepts, self._fingerprint, self._tags, self._resume = list(concepts), fingerprint, tags or {}, resume
        self._live_id = uuid.uuid4().hex  # finds a run whose create answered too late, rather than open a twin
        self._safely("open the runs", self._open)

    def _safely(self, what: str, fn: Callable[[], None], force: bool = False) -> bool:
        if not force and time.monotonic() < self._resting_until:
            return False
        try:
            with _live_http():
                fn()
            return True
        except Exception as e:  # an outage, a refused write, a bad picture: none of it may stop training
            self._resting_until = time.monotonic() + RETRY_AFTER_S
            log.warning(
                "MLflow at %s: could not %s (%s: %s); training goes on, live logging retries in %.0f s",
                self.tracking.tracking_uri,
                what,
                type(e).__name__,
                str(e).splitlines()[0][:300] if str(e) else "",
                RETRY_AFTER_S,
            )
            return False

    def _open(self) -> None:
        """Open the run of each concept that has none yet: at the start, and at a report after an outage."""
        from oneword import tracking
        from oneword.registry import CONCEPT_TAG, ensure_experiment

        mlflow, self._client = tracking.client(self.tracking.tracking_uri)
        exp_id = ensure_experiment(mlflow, self.tracking.experiment, self.tracking.tracking_uri)
        for name, spec in self._concepts:
            if name in self.run_ids:
                continue
            tags = {
                CONCEPT_TAG: name,
                "oneword.token": spec.token,
                "oneword.base_model_fingerprint": self._fingerprint,
                LIVE_ID_TAG: self._live_id,
                **self.tracking.tags,
                **self._tags.get(name, {}),
            }
            run_id = self._mine(exp_id, name)
            if run_id is None and (run_id := self._earlier_attempt(exp_id, name)) is not None:
                # a retried task (a preempted node) goes on in the run its first attempt opened
                self._client.update_run(run_id, status="RUNNING")
                ended = self._client.get_run(run_id).data.tags
                for key in FAILURE_TAGS:  # how the attempt before ended is not this attempt's end
                    if key in ended:
                        self._client.delete_tag(run_id, key)
            if run_id is None:
                run_id = self._client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            else:
                history = self._client.get_metric_history(run_id, "loss")
                # by step, not by count: the retry resumed from its last checkpoint, maybe before the last
                # point logged; those steps keep the values the first attempt logged (a resume replays them)
                self.logged[spec.token] = max((m.step for m in history), default=-1)
            self.run_ids[name] = run_id
            log.info("live metrics of %s: MLflow run %s in experiment %r", name, run_id, self.tracking.experiment)

    def _mine(self, exp_id: str, name: str) -> str | None:
        """The run this very training opened for `name` in a call whose answer was lost, if any."""
        from oneword.registry import CONCEPT_TAG

        runs = self._client.search_runs(
            [exp_id], f"tags.`{LIVE_ID_TAG}` = '{self._live_id}' and tags.`{CONCEPT_TAG}` = '{name}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def _earlier_attempt(self, exp_id: str, name: str) -> str | None:
        """The unfinished run an earlier attempt of this very KFP task opened for `name`, or, for a resume, the
        one the training it resumes opened (`CHECKPOINTS_TAG`: a `train --resume` after a kill), if any."""
        from oneword.registry import CONCEPT_TAG

        if kfp_run := self.tracking.tags.get(KFP_RUN_ID_TAG):
            same = f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run}'"
        elif self._resume and "'" not in (ckpt := self._tags.get(name, {}).get(CHECKPOINTS_TAG) or "'"):
            same = f"tags.`{CHECKPOINTS_TAG}` = '{ckpt}'"
        else:
            return None
        runs = self._client.search_runs(
            [exp_id], f"{same} and tags.`{CONCEPT_TAG}` = '{name}' and attributes.status != 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"],
        )  # fmt: skip
        return runs[0].info.run_id if runs else None

    def callback(self, trainer, sample_every: int = 0) -> Callable[[int, dict[str, float]], None]:
        """The `MetricsCallback` for `trainer`: every concept's new curve points, and sample pictures."""
        self.trainer, self.sample_every = trainer, sample_every
        self._last_sample = trainer.step
        if sample_every and getattr(trainer.model, "vae", None) is None:
            log.warning("no sample pictures: the base model was loaded without its VAE")
            self.sample_every = 0
        return self._report

    def _report(self, step: int, mean: dict[str, float]) -> None:
        if len(self.run_ids) < len(self._concepts):  # the server was down when training started
            self._safely("open the runs", self._open)
        if not self.run_ids:
            return
        self._safely("log the training metrics", self._log_curves)
        if self.sample_every and step // self.sample_every > self._last_sample // self.sample_every:
            self._last_sample = step
            self._safely("log sample pictures", lambda: self._log_samples(step))

    def _log_curves(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for c in self.trainer.concepts:
            token = c.spec.token
            run_id = self.run_ids.get(self.names.get(token, ""))
            if run_id is None:
                continue
            new = [p for p in self.trainer.curves[token] if int(p["step"]) > self.logged.get(token, -1)]
            batch = [Metric(k, float(p[k]), now, int(p["step"])) for p in new for k in ("loss", "embedding_norm")]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
                self._client.log_batch(run_id, metrics=batch[i : i + 1000])
                self.logged[token] = batch[min(i + 1000, len(batch)) - 1].step  # sent: never sent twice

    def _log_samples(self, step: int) -> None:
        import torch

        from oneword.evaluation import prompts as P
        from oneword.generate import SamplerConfig, build_pipeline, make_grid, sample

        t = self.trainer
        if self._pipe is None:
            self._pipe = build_pipeline(t.model, str(t.device))
            if t.precision == "fp16":
                decode_outside_autocast(self._pipe.vae)
        templates = [P.RECONSTRUCTION, P.get_prompt_set(t.profile.prompt_set)[0]]
        active = [c for c in t.active if self.names.get(c.spec.token) in self.run_ids]
        prompts = [P.with_token(tpl, c.spec.token) for c in active for tpl in templates]
        sampler = SamplerConfig(steps=SAMPLE_STEPS, guidance_scale=t.profile.guidance_scale)
        with torch.no_grad(), t.autocast:  # the UNet may be in bf16/fp16: sample as the training step runs it
            images = sample(self._pipe, prompts, SAMPLE_SEEDS, SAMPLE_SEED, sampler)
        for i, c in enumerate(active):
            rows = images[i * len(templates) : (i + 1) * len(templates)]
            grid = make_grid(rows, prompts[i * len(templates) : (i + 1) * len(templates)], label_width=160)
            self._client.log_image(self.run_ids[self.names[c.spec.token]], grid, key="samples", step=step)

    def end(self, failed: dict[str, str]) -> None:
        """After training: the last points go out; failed concepts' runs end FAILED (with why), the others stay
        RUNNING for `register`."""
        self._pipe = None
        if self.trainer is not None:  # the end is worth one more try, resting or not
            if len(self.run_ids) < len(self._concepts):
                self._safely("open the runs", self._open, force=True)
            if self.run_ids:
                self._safely("log the training metrics", self._log_curves, force=True)
        for name, error in failed.items():
            run_id = self.run_ids.pop(name, None)
            if run_id is None:
                continue

            def fail(run_id: str = run_id, error: str = error) -> None:
                end_failed(self._client, run_id, "train", error)

            self._safely(f"end the run of {name}", fail, force=True)

    def fail_all(self, error: str) -> None:
        """The training itself failed: every run ends FAILED."""
        self.end({name: error for name in list(self.run_ids)})


def end_training_run(tracking_uri: str | None, train_dir: Path, stage: str, error: str) -> str | None:
    """End, as FAILED with why, the live run a training left RUNNING for its `register`, when a step between
    them fails and stops the run (`on_error=fail`), with why; a pod lost for good is the exit handler's to end
    (`end_orphaned_runs`).

    Returns:
        The run's id, or None if there was none to end (or the store did not answer: the step's own failure is
        what matters, and is raised all the same).
    """
    import json

    from oneword import tracking

    summary = Path(train_dir) / "summary.json"
    run_id = json.loads(summary.read_text()).get("mlflow_run_id") if summary.is_file() else None
    if not run_id:
        return None
    try:
        with _live_http():  # the step's own failure waits to be raised: a silent server is not waited for long
            _, client = tracking.client(tracking_uri)
            if client.get_run(run_id).info.status != "RUNNING":
                return None
            end_failed(client, run_id, stage, error)
    except Exception as e:  # the store is down, or the run is another store's
        log.warning("could not end training's MLflow run %s (%s)", run_id, e)
        return None
    return run_id


def end_orphaned_runs(
    tracking_uri: str | None, experiment: str, kfp_run_id: str, why: str, kfp_run_name: str = ""
) -> list[str]:
    """End, as KILLED, the live runs a KFP run's trainings left RUNNING for a `register` that never ran (the
    pipeline stopped first: another concept failed under `on_error=fail`, or the run was cancelled, or a local
    run was stopped). The KFP run by its id, or, without one, by its name (a local run's folder).

    Returns:
        The ids of the runs ended.
    """
    from oneword import tracking
    from oneword.registry import CONCEPT_TAG

    tag, value = (KFP_RUN_ID_TAG, kfp_run_id) if kfp_run_id else (KFP_RUN_NAME_TAG, kfp_run_name)
    if not value:
        return []
    _, client = tracking.client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )
    ended = []
    for r in runs:
        if CONCEPT_TAG not in r.data.tags:
            continue
        client.set_tag(r.info.run_id, "oneword.ended_by", why[:4000])
        # where the run's report finds it (`batch_records.batch_failures`): a run's batch id is its KFP run id
        client.set_tag(r.info.run_id, "oneword.batch_id", r.data.tags.get(KFP_RUN_ID_TAG) or kfp_run_id)
        client.set_tag(r.info.run_id, FAILURE_TAGS[1], why[:4000])
        client.set_terminated(r.info.run_id, status="KILLED")
        ended.append(r.info.run_id)
        log.warning("ended run %s of %s as KILLED: %s", r.info.run_id, r.data.tags[CONCEPT_TAG], why)
    return ended
