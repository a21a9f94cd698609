"""Copy a finished toy-world training run into the package, where `toyworld` and `toyworld-clip` resolve."""

import json
import shutil
from pathlib import Path

from oneword.toyworld.assets import assets_dir, clip_path, model_path, oracle_path


def install_assets(work: Path, dest: Path | None = None) -> Path:
    """Copy `work/model`, `work/clip` and `work/oracle.safetensors` into the package data folder.

    Returns:
        The destination folder.
    """
    dest = dest or assets_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for src, dst in ((work / "model", dest / model_path().name), (work / "clip", dest / clip_path().name)):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    shutil.copyfile(work / "oracle.safetensors", dest / oracle_path().name)
    reports = {}
    for name in ("config", "times", "vae_report", "oracle_report", "clip_report", "base_oracle"):
        f = work / f"{name}.json"
        if f.exists():
            reports[name] = json.loads(f.read_text())
    (dest / "training.json").write_text(json.dumps(reports, indent=2))
    return dest
