"""`oneword toyworld quality`: does textual inversion really learn concepts? Measured end to end.

For each held-out concept: five pictures -> preprocess -> cache_latents -> train -> evaluate (the paper's CLIP
metrics with the toy CLIP, and checkpoint selection) -> the oracle checks pictures drawn at the chosen step:

- reconstruction: "a photo of S*" must show the concept's shape and colour;
- editability: "S* on a <colour> background", "a small S*", "a large S*" must show the requested change
  and keep the concept's shape and colour.

Sweeps (learning rate low/default/high, the L2 regulariser off/on, the cosine pull, Directional TI, few/many
steps) show the paper's trade-off on one distortion-editability chart.
"""

import hashlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from oneword.errors import OnewordError
from oneword.evaluation.evaluate import EvalConfig, evaluate
from oneword.evaluation.report import scatter
from oneword.images import preprocess
from oneword.inversion import ConceptSpec, TrainConfig
from oneword.latents import cache_latents
from oneword.profiles import PROFILES, TOYWORLD
from oneword.toyworld.assets import CLIP_NAME, DINO_NAME, assets_dir
from oneword.toyworld.concepts import CONCEPTS, ToyConcept, get_concept, write_concept
from oneword.toyworld.oracle import Oracle
from oneword.train import train_group

log = logging.getLogger(__name__)

# Textual inversion on the toy model, by default: the paper's optimiser and batch with the toy profile's lower
# learning rate and fewer steps (the world is simple and its 96-wide embeddings small: at the paper's 5e-3 the
# token soon absorbs the training backgrounds, "S* on a white background" drops to ~0.56 on purple-star against
# ~0.94 at 1e-3), and a checkpoint every 50 for the selection. The values live in `oneword.profiles`.
TOY = PROFILES[TOYWORLD]
TOY_TRAIN = TrainConfig(log_every=25).resolved(TOY)
TOY_SAMPLER = {"steps": TOY.sampling_steps, "guidance_scale": TOY.guidance_scale}
RESOLUTION = TOY.resolution
SELECTION_BUDGET = EvalConfig.model_fields["checkpoint_budget"].default  # per checkpoint and prompt, as `evaluate`
TARGETS = (0.85, 0.8)  # oracle reconstruction and editability a learned concept must reach (issue 15's targets)


@dataclass
class Setting:
    """One training setting of the benchmark. Sweeps score the final step (`select=False`), so that what a
    setting does is not hidden by checkpoint selection."""

    name: str
    train: TrainConfig
    select: bool = True


def default_settings() -> list[Setting]:
    return [Setting("default", TOY_TRAIN)]


def sweep_settings() -> list[Setting]:
    d = TOY_TRAIN
    return [
        Setting("final-default", d, select=False),
        Setting("lr-low", d.model_copy(update={"learning_rate": 2e-4}), select=False),
        Setting("lr-high", d.model_copy(update={"learning_rate": 5e-3}), select=False),
        Setting("l2-on", d.model_copy(update={"init_l2": 0.05}), select=False),
        # the L2 pull falling to 0 over the run (cloneofsimo/lora's TI norm prior schedule), and rising from 0
        Setting("l2-decay", d.model_copy(update={"init_l2": 0.05, "init_l2_schedule": "decay"}), select=False),
        Setting("l2-rise", d.model_copy(update={"init_l2": 0.05, "init_l2_schedule": "rise"}), select=False),
        Setting("cos-on", d.model_copy(update={"init_cos": 0.05}), select=False),  # the pull in angle alone
        Setting("dti", d.model_copy(update={"direction_only": True}), select=False),  # DTI at its code's defaults
        Setting("steps-50", d.model_copy(update={"steps": 50}), select=False),
        Setting("steps-1000", d.model_copy(update={"steps": 1000}), select=False),
    ]


def settings_named(names: list[str]) -> list[Setting]:
    """The benchmark's settings by name (`default` and the sweep's), in the order given."""
    known = {s.name: s for s in default_settings() + sweep_settings()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OnewordError(
            f"unknown toy-world quality setting(s): {', '.join(unknown)}",
            hint=f"use one of {', '.join(known)}",
        )
    return [known[n] for n in names]


def edits_for(c: ToyConcept) -> list[tuple[str, dict[str, str]]]:
    """Edit prompts the oracle can check, with the attribute each one asks for."""
    bg1 = "blue" if c.colour != "blue" else "green"
    bg2 = "white" if c.colour != "white" else "black"
    return [
        (f"{{}} on a {bg1} background", {"background": bg1}),
        (f"{{}} on a {bg2} background", {"background": bg2}),
        ("a small {}", {"size": "small"}),
        ("a large {}", {"size": "large"}),
    ]


@dataclass
class ConceptResult:
    concept: str
    setting: str
    chosen_step: int
    reconstruction_oracle: float
    editability_oracle: float
    per_edit_oracle: dict[str, float]
    clip_reconstruction: float
    clip_editability: float
    words_oracle: float | None = None  # the concept drawn from its words (upper bound)
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    curve: list = field(default_factory=list)
    oracle_curve: list = field(default_factory=list)  # the oracle on each checkpoint's selection pictures
    seed: int = 0

    @property
    def targets_met(self) -> bool:
        return self.reconstruction_oracle >= TARGETS[0] and self.editability_oracle >= TARGETS[1]


def run_concept(
    concept: str,
    setting: Setting,
    work: Path,
    n_images: int = 32,
    checkpoint_budget: int = SELECTION_BUDGET,
    oracle: Oracle | None = None,
    seed: int = 0,
    with_words: bool = False,
) -> ConceptResult:
    """Learn one held-out concept with one setting, then score it with the toy CLIP and the oracle."""
    return run_concepts([concept], setting, work, n_images, checkpoint_budget, oracle, seed, with_words)[0]


def run_concepts(
    concepts: list[str],
    setting: Setting,
    work: Path,
    n_images: int = 32,
    checkpoint_budget: int = SELECTION_BUDGET,
    oracle: Oracle | None = None,
    seed: int = 0,
    with_words: bool = False,
) -> list[ConceptResult]:
    """Learn held-out concepts together (one batch, as a batch shard does), then score each with the toy CLIP
    and the oracle. One concept trains alone. Folders: `work/<a+b+...>--<setting>/{<concept>/..., train/}`."""
    t0 = time.perf_counter()
    oracle = oracle or Oracle.load()
    root = work / f"{'+'.join(concepts)}--{setting.name}"
    for concept in concepts:
        write_concept(concept, root / concept / "photos", seed=seed)
        preprocess(root / concept / "photos", root / concept / "data", resolution=RESOLUTION)
        cache_latents(root / concept / "data", TOYWORLD, root / concept / "latents")
    t1 = time.perf_counter()
    rows = train_group(
        [
            (
                concept,
                ConceptSpec(token=f"<{concept}>", init_word="shape"),
                root / concept / "latents",
            )
            for concept in concepts
        ],
        root / "train",
        # Without selection only the final step is scored, so intermediate checkpoints would be written for nothing.
        setting.train.model_copy(update={"seed": seed, **({} if setting.select else {"checkpoint_every": 0})}),
        base_model=TOYWORLD,
        resume=False,
        progress=False,
    )
    failed = [r for r in rows if r["status"] != "trained"]
    if failed:
        raise OnewordError(f"toy-world training failed: {failed}")
    train_s = time.perf_counter() - t1
    results = []
    for concept in concepts:
        c = get_concept(concept)
        edits = edits_for(c)
        prompts_file = root / concept / "prompts.txt"
        prompts_file.write_text("\n".join(t for t, _ in edits) + "\n")
        captured: dict = {}
        oracle_curve: list[dict] = []

        def on_checkpoint(step, prompts, images, c=c, edits=edits, oracle_curve=oracle_curve):
            rec, edit, _ = _oracle_scores(oracle, c, edits, images)
            oracle_curve.append({"step": step, "reconstruction": rec, "editability": edit})

        m = evaluate(
            root / "train" / concept,
            root / concept / "data",
            root / concept / "eval",
            EvalConfig(
                prompt_set=str(prompts_file),
                n_images=n_images,
                checkpoint_budget=checkpoint_budget if setting.select else 0,  # 0: score the final step
                clip_model=CLIP_NAME,
                dino_model=DINO_NAME,  # subject fidelity on every checkpoint's pictures, beside the toy CLIP
                seed=seed + 1000,
                baselines=False,
                **TOY_SAMPLER,
            ),
            on_images=lambda prompts, images, captured=captured: captured.update(prompts=prompts, images=images),
            on_checkpoint=on_checkpoint,
        )
        rec, _, per_edit = _oracle_scores(oracle, c, edits, captured["images"])
        words = _words_accuracy(c, oracle, n_images, seed) if with_words else None
        results.append(
            ConceptResult(
                concept,
                setting.name,
                m["step"],
                rec,
                sum(per_edit.values()) / len(per_edit),
                per_edit,
                m["reconstruction"],
                m["editability"],
                words,
                train_s,
                time.perf_counter() - t0,
                m["selection"]["curve"],
                oracle_curve,
                seed,
            )
        )
    return results


def _oracle_scores(
    oracle: Oracle, c: ToyConcept, edits: list[tuple[str, dict[str, str]]], images: list[list]
) -> tuple[float, float, dict[str, float]]:
    """The oracle's reconstruction, mean editability and per-edit scores of one evaluation's pictures
    (reconstruction prompt first, then `edits` in order)."""
    attrs = {"shape": c.shape, "colour": c.colour}
    per_edit = {
        tpl.format("S*"): oracle.accuracy(ims, {**attrs, **ask})["all"] for (tpl, ask), ims in zip(edits, images[1:])
    }
    return oracle.accuracy(images[0], attrs)["all"], sum(per_edit.values()) / len(per_edit), per_edit


def _words_accuracy(c: ToyConcept, oracle: Oracle, n: int, seed: int) -> float:
    from oneword.generate import SamplerConfig, build_pipeline, sample
    from oneword.models import load_base_model

    pipe = build_pipeline(load_base_model(TOYWORLD))
    ims = sample(pipe, [f"a photo of a {c.words}"], n, seed + 1000, SamplerConfig(**TOY_SAMPLER))[0]
    return oracle.accuracy(ims, {"shape": c.shape, "colour": c.colour})["all"]


def _log_run(r: ConceptResult) -> None:
    log.info(
        "%s [%s] seed %d: step %d, oracle reconstruction %.2f, editability %.2f (%.0f s)",
        r.concept,
        r.setting,
        r.seed,
        r.chosen_step,
        r.reconstruction_oracle,
        r.editability_oracle,
        r.total_seconds,
    )


def measure_quality(
    out: Path,
    concepts: list[str] | None = None,
    sweep: bool = True,
    n_images: int = 32,
    seeds: tuple[int, ...] = (0,),
    settings: list[str] | None = None,
    fresh: bool = False,
    checkpoint_budget: int = SELECTION_BUDGET,
) -> dict:
    """Run the quality benchmark and write `quality.json`, `quality.md` and the plots into `out`.

    Every concept x seed x setting is one run (five pictures drawn with that seed, trained and scored with it). A
    finished run is appended to `out/runs.jsonl` at once and reused by the next call with the same concept,
    setting, seed, picture count and training settings (unless `fresh`), so a long benchmark that stops loses
    nothing.

    Args:
        out: output folder.
        concepts: held-out concepts (default: all, the negative control included).
        sweep: also run the sweep's settings (ignored when `settings` names them).
        n_images: pictures per prompt for the oracle and the toy CLIP.
        seeds: seeds to repeat every run with.
        settings: setting names (`settings_named`); default: `default`, plus the sweep if `sweep`. The negative
            control runs `default` only.
        fresh: ignore runs recorded in `out/runs.jsonl`.
        checkpoint_budget: pictures a prompt for each checkpoint in selection (settings that select).

    Returns:
        The report dict.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(concepts or CONCEPTS))  # a name, seed or setting given twice runs once
    for name in names:
        get_concept(name)  # an unknown name fails before any training
    chosen = (
        settings_named(list(dict.fromkeys(settings)))
        if settings
        else default_settings() + (sweep_settings() if sweep else [])
    )
    oracle = Oracle.load()
    ledger = out / "runs.jsonl"
    done = {} if fresh else _recorded(ledger)
    assets = _assets_fingerprint()
    plan = [  # every concept x seed x setting, seed by seed; the negative control runs `default` only
        (seed, name, s)
        for seed in dict.fromkeys(seeds)
        for name in names
        for s in (chosen if get_concept(name).drawable else default_settings())
    ]
    results: list[ConceptResult] = []
    with tempfile.TemporaryDirectory() as d:
        for seed, name, s in plan:
            key = _run_key(name, s, seed, n_images, checkpoint_budget, assets)
            if key not in done:
                work = Path(d) / f"seed-{seed}"
                done[key] = run_concept(
                    name,
                    s,
                    work,
                    n_images=n_images,
                    checkpoint_budget=checkpoint_budget,
                    oracle=oracle,
                    seed=seed,
                    with_words=s.name == "default",
                )
                _log_run(done[key])
                _record(ledger, key, done[key])
                if s.name == "default":
                    _save_grid(work / f"{name}--default" / name, out / f"{name}-seed{seed}.png")
            results.append(done[key])
    report = {"results": [asdict(r) for r in results], "summary": _summary(results)}
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text(_markdown(results, report["summary"]))
    series = [
        {
            "label": f"{r.concept} {r.setting} seed {r.seed}",
            "final": {"reconstruction": r.clip_reconstruction, "editability": r.clip_editability},
        }
        for r in results
        if get_concept(r.concept).drawable
    ]
    scatter(series, out / "scatter.png", title="toy world: learning rate, L2 and steps")
    oracle_scatter(results, out / "oracle.png")
    return report


def _run_key(concept: str, setting: Setting, seed: int, n_images: int, budget: int, assets: str) -> str:
    """What makes two runs the same run: concept, setting (its name and every training value), seed, pictures,
    selection budget (where the setting selects) and the shipped assets that trained and scored it."""
    return json.dumps(
        [
            concept,
            setting.name,
            setting.select,
            setting.train.model_dump(mode="json"),
            seed,
            n_images,
            budget if setting.select else 0,
            assets,
        ],
        sort_keys=True,
    )


def _assets_fingerprint() -> str:
    """A digest of the shipped toy model, its evaluators and the oracle: a run scored by others is another run."""
    h = hashlib.sha256()
    for f in sorted(p for p in assets_dir().rglob("*") if p.is_file()):
        h.update(str(f.relative_to(assets_dir())).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _record(ledger: Path, key: str, r: ConceptResult) -> None:
    """Append one finished run, on a line of its own even after a line that a stop cut short."""
    with ledger.open("a+b") as f:  # opened at the end; appends go there whatever is read before
        cut = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((b"\n" if cut else b"") + json.dumps({"key": key, "result": asdict(r)}).encode() + b"\n")


def _recorded(ledger: Path) -> dict[str, ConceptResult]:
    """Finished runs recorded in `ledger` (a line cut short by a stop is skipped: that run is redone)."""
    done: dict[str, ConceptResult] = {}
    if not ledger.exists():
        return done
    for line in ledger.read_text().splitlines():
        try:
            row = json.loads(line)
            done[row["key"]] = ConceptResult(**row["result"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: skipping an unreadable line (that run is redone)", ledger)
    return done


def oracle_scatter(results: list[ConceptResult], out: Path) -> Path:
    """The distortion-editability plane as the oracle judges it: one colour per concept, one marker per setting.

    The paper's Fig. 9 plots CLIP scores; the oracle's are what a person would count (shape and colour right,
    the edit done), so regularisers are compared here on those.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawable = [r for r in results if get_concept(r.concept).drawable]
    concepts = list(dict.fromkeys(r.concept for r in drawable))
    settings = list(dict.fromkeys(r.setting for r in drawable))
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=110)
    for r in drawable:
        ax.scatter(
            r.editability_oracle,
            r.reconstruction_oracle,
            color=f"C{concepts.index(r.concept) % 10}",
            marker=markers[settings.index(r.setting) % len(markers)],
            s=40,
            alpha=0.8,
        )
    ax.axhline(0.85, color="grey", lw=0.6, ls="--")
    ax.axvline(0.8, color="grey", lw=0.6, ls="--")
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker="o", ls="", label=c) for i, c in enumerate(concepts)] + [
        plt.Line2D([], [], color="black", marker=markers[i % len(markers)], ls="", label=s)
        for i, s in enumerate(settings)
    ]
    # beside the plane, not on it: a failed run sits in the lower left, where a legend inside would hide it
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_xlabel("editability (oracle): the edit done, concept kept")
    ax.set_ylabel("reconstruction (oracle): shape and colour right")
    ax.set_title("toy world: regularisers on the distortion-editability plane", fontsize=10)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _save_grid(root: Path, dest: Path) -> None:
    """The evaluation's grid (its first row: the training pictures) as the report's picture of this run."""
    src = root / "eval" / "grid.png"
    if src.exists():
        shutil.copyfile(src, dest)


_METRICS = ("reconstruction_oracle", "editability_oracle", "clip_reconstruction", "clip_editability")


def _summary(results: list[ConceptResult]) -> dict:
    """Per setting, over its drawable runs (every concept and seed): how many met the targets, and each score's
    mean, sample standard deviation and minimum."""
    drawable = [r for r in results if get_concept(r.concept).drawable]
    default = [r for r in drawable if r.setting == "default"]
    by_setting: dict[str, dict] = {}
    for name in dict.fromkeys(r.setting for r in drawable):
        runs = [r for r in drawable if r.setting == name]
        row: dict = {"runs": len(runs), "targets_met": sum(r.targets_met for r in runs)}
        for m in _METRICS:
            v = [getattr(r, m) for r in runs]
            row[m] = statistics.fmean(v)
            row[m + "_sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
            row[m + "_min"] = min(v)
        by_setting[name] = row
    neg = [r for r in results if not get_concept(r.concept).drawable]
    return {
        "default": by_setting.get("default"),
        "targets_met": all(r.targets_met for r in default) if default else None,  # None: default not run
        "seeds": sorted({r.seed for r in results}),
        "by_setting": by_setting,
        "negative_control": [asdict(r) for r in neg],
        "seconds_per_concept": sum(r.total_seconds for r in default) / max(1, len(default)),
    }


def _markdown(results: list[ConceptResult], summary: dict) -> str:
    """Every run, then each setting's mean and spread over its concepts and seeds."""
    lines = [
        "| concept | seed | setting | step | oracle rec. | oracle edit. | words | CLIP rec. | CLIP edit. | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        words = "-" if r.words_oracle is None else f"{r.words_oracle:.2f}"
        lines.append(
            f"| {r.concept} | {r.seed} | {r.setting} | {r.chosen_step} | {r.reconstruction_oracle:.2f} | "
            f"{r.editability_oracle:.2f}{' *' if r.targets_met else ''} | {words} | {r.clip_reconstruction:.3f} | "
            f"{r.clip_editability:.3f} | {r.total_seconds:.0f} |"
        )
    lines += [
        "",
        f"\\* both targets met (oracle reconstruction >= {TARGETS[0]}, editability >= {TARGETS[1]}).",
        "",
        "| setting | runs | targets met | oracle rec. mean ± sd (min) | oracle edit. mean ± sd (min) | "
        "CLIP rec. | CLIP edit. |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["by_setting"].items():
        rec, edit = (
            f"{row[m]:.2f} ± {row[m + '_sd']:.2f} ({row[m + '_min']:.2f})"
            for m in ("reconstruction_oracle", "editability_oracle")
        )
        lines.append(
            f"| {name} | {row['runs']} | {row['targets_met']} / {row['runs']} | {rec} | {edit} | "
            f"{row['clip_reconstruction']:.3f} | {row['clip_editability']:.3f} |"
        )
    lines.append("")
    met = "the default setting was not run" if summary["targets_met"] is None else summary["targets_met"]
    lines.append(
        f"Targets met by every drawable concept at the chosen step (default setting, seeds "
        f"{', '.join(map(str, summary['seeds']))}): {met}"
    )
    return "\n".join(lines) + "\n"


def base_model_accuracy(
    n_prompts: int = 256, seed: int = 0, model: str = TOYWORLD, oracle: Oracle | None = None
) -> dict[str, float]:
    """Does the base model draw what captions ask? One picture per grammar caption (every attribute named).

    Returns:
        Oracle accuracy per attribute (shape, colour, background, size, pattern; position for small shapes).
    """
    import random

    from oneword.generate import SamplerConfig, build_pipeline, sample
    from oneword.models import load_base_model
    from oneword.toyworld import world

    oracle = oracle or Oracle.load()
    rng = random.Random(f"base:{seed}")
    scenes = [world.sample_scene(rng) for _ in range(n_prompts)]
    pipe = build_pipeline(load_base_model(model))
    prompts = [world.full_caption(s) for s in scenes]
    images = [row[0] for row in sample(pipe, prompts, 1, seed, SamplerConfig(**TOY_SAMPLER), batch_size=64)]
    preds = oracle.predict(images)
    acc = {}
    for attr in ("shape", "colour", "background", "size", "pattern"):
        acc[attr] = sum(p[attr] == getattr(s, attr) for p, s in zip(preds, scenes)) / n_prompts
    small = [(p, s) for p, s in zip(preds, scenes) if s.size == "small"]
    acc["position"] = sum(p["position"] == s.position for p, s in small) / max(1, len(small))
    acc["all_of_shape_colour_background"] = (
        sum(
            p["shape"] == s.shape and p["colour"] == s.colour and p["background"] == s.background
            for p, s in zip(preds, scenes)
        )
        / n_prompts
    )
    return acc
