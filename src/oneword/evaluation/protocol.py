"""The evaluation protocol: everything a score depends on besides the concept itself.

Two scores are comparable only when they were measured the same way: the same prompts, images per prompt, sampler,
seeds, base model, checkpoint-selection budget and rule, and evaluators (weights and image preprocessing).
`evaluate` records the protocol with every score; the registry's gate and `oneword compare` refuse to compare
scores whose protocols differ, and say which parts differ.

Not in it: the concept's own photos, against which reconstruction is measured. A version trained on new photos
of a concept is compared with its champion all the same, each scored against its own photos (the gate asks
which version draws its concept better, not which draws one set of photos better).
"""

from __future__ import annotations

import hashlib
import json

# Image j of prompt i in the reported pass uses seed `seed + j`; checkpoint selection draws from `seed + this + j`,
# so the images that choose a checkpoint are never among the images that report its scores.
SELECTION_SEED_OFFSET = 1_000_000


def config_fingerprint(config: dict) -> str:
    """A short sha256 of a processor's config (an evaluator's image preprocessing)."""
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("processor_class",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def protocol(metrics: dict, seed: int, dino: dict | None) -> dict:
    """The protocol of a metrics dict written by `evaluate` (its prompt set, sampler, evaluator, ...)."""
    identity = prompt_set_identity(metrics)
    targets = _targets_identity(metrics)
    return {
        "prompt_set": identity,
        # a prompt file as the releases before 27 November 2026 knew it: their versions compare on it
        **({"prompt_targets": targets} if targets != identity else {}),
        "class_word": metrics.get("class_word", ""),
        "n_images": metrics["n_images"],
        "sampler": metrics["sampler"],
        "seed": seed,
        "selection_seed": seed + SELECTION_SEED_OFFSET,
        "selection_budget": metrics["selection"]["budget"],
        # which checkpoint the scores belong to depends on the rule that picked it
        "selection_rule": metrics["selection"].get("rule", "balanced"),  # written before the rule was recorded
        "selection_tolerance": metrics["selection"].get("tolerance", 0.02),
        "base_model_fingerprint": metrics["model_fingerprint"],
        "evaluator": metrics["evaluator"],
        "dino_evaluator": dino,
    }


def prompt_set_identity(metrics: dict) -> str:
    """A named prompt set by its name; a prompt file by what it asked (its templates, where the token goes
    included), not by its path: an edited file is another protocol, the same file at another path the same one.
    (Scores written before the templates were recorded are known by their text targets, which leave out where
    the token stood.)"""
    from oneword.evaluation.prompts import BUILTIN, PACKAGED

    name = metrics["prompt_set"]
    rows = metrics.get("per_prompt", [])
    if name in BUILTIN or name in PACKAGED or not rows:
        return name
    if not all("template" in p for p in rows):
        return _targets_identity(metrics)
    return "file sha256:" + hashlib.sha256(json.dumps([p["template"] for p in rows]).encode()).hexdigest()[:16]


def _targets_identity(metrics: dict) -> str:
    """A prompt file by its prompts' text targets (where the token stood left out); a named set by its name."""
    from oneword.evaluation.prompts import BUILTIN, PACKAGED

    name, rows = metrics["prompt_set"], metrics.get("per_prompt", [])
    if name in BUILTIN or name in PACKAGED or not rows:
        return name
    return "file sha256:" + hashlib.sha256(json.dumps([p["text_target"] for p in rows]).encode()).hexdigest()[:16]


def protocol_id(p: dict) -> str:
    """A short sha256 of a protocol: equal ids, comparable scores."""
    return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(a: dict, b: dict) -> list[str]:
    """The protocol parts in which `a` and `b` differ, as `key: a vs b`.

    An evaluator counts by its weights and preprocessing, not by the name it was loaded by (a hub id and its
    mirror in a bucket are one evaluator). DINO's scores are not compared, only recorded: a version scored with
    DINO and one without compare on the rest; two DINO evaluators must still be the same one.
    """
    a, b = _comparable(a), _comparable(b)
    # a version scored before prompt files were known by their templates: compare both by their text targets
    old = [p for p in (a, b) if "prompt_targets" not in p]
    for p in (a, b):
        targets = p.pop("prompt_targets", None)
        if targets is not None and old:
            p["prompt_set"] = targets
    if a.get("dino_evaluator") is None or b.get("dino_evaluator") is None:
        a, b = (
            {k: v for k, v in a.items() if k != "dino_evaluator"},
            {k: v for k, v in b.items() if k != "dino_evaluator"},
        )
    return [f"{k}{_set_by(k)}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# The `evaluate` options (the pipelines' parameters, with _) that set each part of a protocol
SET_BY = {
    "prompt_set": "--prompt-set", "prompt_targets": "--prompt-set", "n_images": "--n-images",
    "sampler": "--sampling-steps, --guidance-scale", "seed": "--seed", "selection_seed": "--seed",
    "selection_budget": "--checkpoint-budget", "selection_rule": "--selection-rule",
    "selection_tolerance": "--selection-tolerance", "base_model_fingerprint": "--base-model",
    "evaluator": "--clip-model", "dino_evaluator": "--dino-model",
}  # fmt: skip


def _set_by(key: str) -> str:
    return f" ({SET_BY[key]})" if key in SET_BY else ""


def _comparable(p: dict) -> dict:
    """A protocol with its evaluators' names left out."""
    out = dict(p)
    for k in ("evaluator", "dino_evaluator"):
        if isinstance(out.get(k), dict):
            out[k] = {key: v for key, v in out[k].items() if key != "name"}
    return out


RUNTIME_ONLY = {"batch_size", "device", "gpus"}  # how the pictures are drawn, not which ones

# Bump when a change to oneword changes the scores `evaluate` gives one training with the same settings: its
# sampling, prompt rendering, checkpoint selection, how it runs the evaluators, the packaged toy world's
# evaluators. Each concept's next run then evaluates it again (once). A release that changes none of these keeps
# every registered result: a catalogue is not evaluated again, on GPUs, at every upgrade of the image.
SCORING_REVISION = 1


def evaluation_key(training_key: str, config) -> str:
    """One training (`summary.json`'s `training_key`) evaluated with `config` (as given, before the model's
    profile fills it in; a prompt file by its content), scored as `SCORING_REVISION` scores. The profiles'
    evaluation defaults and the named prompt sets' prompts are part of it: a release that changes one evaluates
    again the concepts that take it (and, as the key does not know a concept's model family, the others too)."""
    from oneword.config import MODEL_DEPENDENT_EVAL
    from oneword.evaluation.prompts import BUILTIN, PACKAGED, get_prompt_set
    from oneword.profiles import PROFILES

    settings = config.model_dump(exclude=RUNTIME_ONLY)
    if config.prompt_set and config.prompt_set not in BUILTIN and config.prompt_set not in PACKAGED:
        settings["prompt_set"] = list(get_prompt_set(config.prompt_set))
    defaults = {f: {k: getattr(p, v) for k, v in MODEL_DEPENDENT_EVAL.items()} for f, p in PROFILES.items()}
    named = {n: list(get_prompt_set(n)) for n in (*BUILTIN, *PACKAGED)}  # a release may edit one
    what = {"training": training_key, "evaluation": settings, "profiles": defaults, "prompt_sets": named,
            "scoring": SCORING_REVISION}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def result_key(evaluation: str, thresholds) -> str:
    """What a registered version is the result of: an evaluation (`evaluation_key`) judged by the quality gate's
    `thresholds`. A scheduled batch finds the concept's newest version by it and neither evaluates nor registers
    that concept again; under changed thresholds alone, its recorded scores are judged again
    (`registry.rejudged_result`)."""
    what = {"evaluation": evaluation, "gate": thresholds.model_dump()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
