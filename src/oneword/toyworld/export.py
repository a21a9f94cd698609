"""Copy a finished toy-world training run into the package, where `toyworld`, `toyworld-clip` and `toyworld-dino`
resolve."""

import json
import shutil
from pathlib import Path

from oneword.toyworld import world
from oneword.toyworld.assets import assets_dir, clip_path, dino_path, model_path, oracle_path


def install_assets(work: Path, dest: Path | None = None) -> Path:
    """Copy `work/model`, `work/clip`, `work/dino` and `work/oracle.safetensors` into the package data folder.

    Returns:
        The destination folder.
    """
    dest = dest or assets_dir()
    dest.mkdir(parents=True, exist_ok=True)
    folders = [(work / name, dest / name) for name in (model_path().name, clip_path().name, dino_path().name)]
    for src, dst in folders:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    shutil.copyfile(work / "oracle.safetensors", dest / oracle_path().name)
    reports = {}
    for name in ("config", "times", "vae_report", "oracle_report", "clip_report", "dino_report", "base_oracle"):
        f = work / f"{name}.json"
        if f.exists():
            reports[name] = json.loads(f.read_text())
    if (work / "notes.md").exists():  # anything about this run a reader should know (interruptions, load)
        reports["notes"] = (work / "notes.md").read_text().strip()
    (dest / "training.json").write_text(json.dumps(reports, indent=2))
    (dest / model_path().name / "README.md").write_text(model_card(reports, dest / model_path().name))
    return dest


def _mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def model_card(reports: dict, model_dir: Path) -> str:
    """The model folder's README: how it was trained, how long it took, and how well it draws."""
    cfg, times = reports.get("config", {}), reports.get("times", {})
    lines = [
        "# toyworld: oneword's small text-to-image model",
        "",
        "A latent diffusion model of the toy world (32x32 pictures of one shape in a colour, pattern, size, place",
        "and background), built from the same classes as Stable Diffusion: `AutoencoderKL`, `CLIPTextModel` with",
        "the real CLIP tokenizer (padding to 20 positions), `UNet2DConditionModel`, `DDIMScheduler`",
        "(v-prediction, zero-terminal-SNR, trailing spacing). Weights stored in fp16; every part loads in fp32 by",
        "default (the text encoder's config names float32), so it runs on a CPU as it is. Load it with",
        "`oneword ... --base-model toyworld` or `StableDiffusionPipeline.from_pretrained(<this folder>)`, no dtype",
        "argument needed (`dtype=torch.float16` gives fp16 throughout).",
        "",
        "Held out of training: " + ", ".join(f"{c} {s}" for c, s in world.HELD_OUT) + "; the shape `heart` entirely.",
        "",
        "## How it was trained",
        "",
        "```",
        f"oneword toyworld train --work-dir runs/toyworld --seed {cfg.get('seed', 0)} --install",
        "```",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in cfg.items()],
        "",
        "Wall time on 2 CPU cores (AMD EPYC, torch 2.13 CPU build):",
        "",
        "| stage | minutes |",
        "|---|---|",
        *[f"| {k.removesuffix('_s')} | {v / 60:.1f} |" for k, v in times.items()],
        "",
        *([reports["notes"], ""] if "notes" in reports else []),
        "## How well it draws",
        "",
    ]
    if "vae_report" in reports:
        lines.append(f"- VAE reconstruction: {reports['vae_report']['psnr_db']:.1f} dB PSNR.")
    if "base_oracle" in reports:
        acc = reports["base_oracle"]
        lines.append(
            "- Oracle accuracy of pictures drawn from grammar captions (every attribute named, one picture "
            "per caption, 25 DDIM steps, guidance 4): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + "."
        )
    if "oracle_report" in reports:
        lines.append(
            "- The oracle's CNN on VAE round-tripped pictures: "
            + ", ".join(f"{k} {v:.3f}" for k, v in reports["oracle_report"].items())
            + "."
        )
    if "clip_report" in reports:
        lines.append(
            f"- The toy CLIP evaluator picks a picture's own caption among 64 with top-1 accuracy "
            f"{reports['clip_report']['zero_shot_top1_of_64']:.3f}."
        )
    if "dino_report" in reports:
        d = reports["dino_report"]
        lines.append(
            f"- The toy DINO (subject fidelity) finds a held-out object's nearest other picture among the same "
            f"object's with top-1 accuracy {d['top1']:.3f} (shape margin {d['shape_margin']:.3f}, colour margin "
            f"{d['colour_margin']:.3f})."
        )
    lines += [
        "",
        f"Size on disk: {_mb(model_dir):.1f} MB.",
        "",
        "Retraining with the same seed reproduces this quality (not the bits: CPU kernels and thread",
        "scheduling differ) within the wall time above.",
        "",
    ]
    return "\n".join(lines)
