"""`oneword demo` (what `make demo` runs): learn a toy-world concept with the whole pipeline, register it, and
show it in new contexts."""

from pathlib import Path
from typing import Annotated

import typer

from oneword.cli.app import app, on_interrupt

DEMO_MARKER = ".oneword-demo"
DEMO_TOKEN = "<my-shape>"  # the new word: it spells out no concept of the toy world


@app.command("demo", short_help="Learn a toy-world concept end to end.")
def demo_cmd(
    out: Annotated[
        Path, typer.Option(help="folder for everything the demo makes (an earlier demo's is replaced)")
    ] = Path("demo-out"),
    concept: Annotated[str, typer.Option(help="held-out toy-world concept")] = "purple-star",
    steps: Annotated[int | None, typer.Option(help="textual-inversion steps (default: the toy profile's)")] = None,
    n_images: Annotated[int, typer.Option(help="evaluation pictures per prompt")] = 16,
) -> None:
    """Five pictures of a concept the toy model never drew -> the textual_inversion pipeline (kfp.local) ->
    MLflow registry -> a picture of the concept in new contexts.

    \b
    Example:
      oneword demo
    """
    import json
    import shutil
    import textwrap
    import time

    from PIL import Image
    from rich import print as rprint

    from oneword.pipelines.local import check_settings
    from oneword.storage import check_replaceable
    from oneword.toyworld.concepts import get_concept, write_concept
    from oneword.toyworld.quality import edits_for

    t0 = time.time()
    get_concept(concept)  # a mistake is said before the folder is touched
    check_settings({"steps": steps or 0, "n_images": n_images}, "demo")
    if not (out.is_dir() and {"photos", "prompts.txt"} <= {p.name for p in out.iterdir()}):  # a demo's, made
        check_replaceable(out, DEMO_MARKER, "an earlier demo's folder")  # before the marker was written
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `oneword demo`, which replaces this folder when it runs again\n")
    photos = write_concept(concept, out / "photos")
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(t for t, _ in edits_for(get_concept(concept))) + "\n")
    rprint(f"[bold]1.[/] {len(photos)} pictures of {concept} (never drawn by the model), to be called "
           f"{DEMO_TOKEN} -> {out / 'photos'}")
    rprint("[bold]2.[/] pipeline: preprocess -> cache_latents -> train -> evaluate -> register (kfp.local)")
    tracking = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    with on_interrupt(f"the demo stopped; its steps' logs: {out / 'pipeline.log'}"):
        r = _run(out, tracking, concept, steps, prompts, n_images)
    m = json.loads(Path(r["metrics"]).read_text())
    # The picture: the evaluation's grid (the training pictures, then each prompt across seeds), enlarged so
    # 32 px shapes show.
    grid = Image.open(r["grid"])
    picture = out / f"{concept}.png"
    grid.resize((grid.width * 3, grid.height * 3), Image.Resampling.NEAREST).save(picture)
    rprint(f"[bold]3.[/] registered [bold green]{r['registered']}[/] in MLflow ({tracking})")
    chosen = f"step {m['step']} of {m['final_step']} chosen ({m['selection']['criterion']})"
    rprint(textwrap.fill(chosen, 80, initial_indent="   ", subsequent_indent="   "))
    rprint(
        f"   reconstruction {m['reconstruction']:.3f}, editability {m['editability']:.3f} "
        f"(toy CLIP, {m['n_images']} picture{'s' if m['n_images'] != 1 else ''} per prompt)"
    )
    for p in m["per_prompt"]:
        rprint(f"     {p['prompt']:40s} {p['editability']:.3f}")
    rprint(f"[bold]4.[/] the concept in new contexts: [bold]{picture}[/]")
    rprint(f"   report: {r['report']}")
    rprint(f"   task logs: {out / 'pipeline.log'}")
    rprint(f"   browse: mlflow ui --backend-store-uri {tracking}")
    rprint(f"       or: oneword concepts list --tracking-uri {tracking}")
    rprint(f"done in {time.time() - t0:.0f} s")


def _run(out: Path, tracking: str, concept: str, steps: int | None, prompts: Path, n_images: int) -> dict:
    """The demo's pipeline run: everything else (resolution, templates, learning rate, steps, sampler, evaluator)
    is the toy profile's."""
    from oneword.pipelines.local import run_textual_inversion
    from oneword.profiles import TOYWORLD

    return run_textual_inversion(
        out / "kfp",
        tracking,
        log_file=out / "pipeline.log",
        images=str(out / "photos"),
        # a word that names neither colour nor shape: `<purple-star>` is read as "purple" and "star" by a model
        # without the embedding, which draws the concept from those words, and a failed load would pass unseen
        token=DEMO_TOKEN,
        name=concept,
        init_word="shape",
        base_model=TOYWORLD,
        steps=steps or 0,
        prompt_set=str(prompts.resolve()),
        n_images=n_images,
    )
