"""`oneword compile`: write the compiled component and pipeline specs, or check that the checked-in ones are
up to date (CI runs `oneword compile --check`)."""

import ast
import difflib
import re
import tempfile
from pathlib import Path

from oneword.pipelines.container import with_registry

COMPONENTS_DIR, PIPELINES_DIR = "components", "pipelines"


_DICT_DEFAULT = re.compile(r"^(#\s+\w+: (?:dict|list) \[Default: )([{\[].*[}\]])(\])$")


def _sorted(value):
    """`value` with every dict's keys in order, however deep."""
    if isinstance(value, dict):
        return {k: _sorted(v) for k, v in sorted(value.items())}
    return [_sorted(v) for v in value] if isinstance(value, list) else value


def _stable_header(path: Path) -> None:
    # KFP writes dict defaults (and dicts in list defaults) in the header comment in protobuf map order, which
    # changes from run to run.
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = _DICT_DEFAULT.match(line.rstrip("\n"))
        if m:
            lines[i] = f"{m.group(1)}{_sorted(ast.literal_eval(m.group(2)))}{m.group(3)}\n"
    path.write_text("".join(lines))


def _write_pipeline(pipeline, path: Path) -> None:
    """Compile `pipeline` to `path` as KFP's compiler does, less the descriptions of its inner components' inputs
    and outputs: on a cluster each task's nodes carry its component spec several times, and Argo keeps a run's
    nodes in one size-capped object (docs/deploy.md, "How many concepts in one run"). The pipeline's own inputs
    keep theirs (the KFP dashboard shows them), and so do the components' own specs under components/."""
    from kfp.compiler import pipeline_spec_builder
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = pipeline_spec_pb2.PipelineSpec()
    spec.CopyFrom(pipeline.pipeline_spec)  # KFP caches the spec on the pipeline: leave that one as it is
    for component in spec.components.values():
        for group in (component.input_definitions, component.output_definitions):
            for each in (*group.parameters.values(), *group.artifacts.values()):
                each.ClearField("description")
    pipeline_spec_builder.write_pipeline_spec_to_file(
        pipeline_spec=spec,
        pipeline_description=pipeline.description,
        platform_spec=pipeline.platform_spec,
        package_path=str(path),
    )


def compile_all(root: Path, image_registry: str | None = None) -> list[Path]:
    """Compile every component to `root/components/<name>.yaml` and every pipeline to `root/pipelines/<name>.yaml`.

    With `image_registry`, the specs pull oneword's images from there instead of the published ones.

    Returns:
        The written files.
    """
    from kfp import compiler

    from oneword.pipelines import components
    from oneword.pipelines.definitions import PIPELINES

    written = []
    (root / COMPONENTS_DIR).mkdir(parents=True, exist_ok=True)
    (root / PIPELINES_DIR).mkdir(parents=True, exist_ok=True)
    for comp in components.ALL:
        p = root / COMPONENTS_DIR / f"{comp.name.replace('-', '_')}.yaml"
        compiler.Compiler().compile(comp, str(p))
        written.append(p)
    for name, pipeline in PIPELINES.items():
        p = root / PIPELINES_DIR / f"{name}.yaml"
        _write_pipeline(pipeline, p)
        _stable_header(p)
        written.append(p)
    if image_registry:
        for p in written:
            with_registry(p, image_registry)
    return written


def stale_files(root: Path) -> list[str]:
    """Compile into a temporary folder and list the checked-in files under `root` that differ or are missing.

    Returns:
        A unified diff's first lines for each stale file (empty when all are up to date).
    """
    problems = []
    with tempfile.TemporaryDirectory() as d:
        fresh = compile_all(Path(d))
        for f in fresh:
            rel = f.relative_to(d)
            mine = root / rel
            if not mine.exists():
                problems.append(f"{rel}: missing")
                continue
            a, b = mine.read_text().splitlines(), f.read_text().splitlines()
            if a != b:
                diff = list(difflib.unified_diff(a, b, f"{rel} (checked in)", f"{rel} (from code)", lineterm=""))
                problems.append("\n".join(diff[:20]))
        expected = {f.relative_to(d) for f in fresh}
        for folder in (COMPONENTS_DIR, PIPELINES_DIR):
            for extra in sorted((root / folder).glob("*.yaml")):
                if extra.relative_to(root) not in expected:
                    problems.append(f"{extra.relative_to(root)}: not produced by the code any more")
    return problems


def compile_pipeline(name: str, out: Path, image_registry: str | None = None) -> Path:
    """Compile one pipeline (`textual_inversion` or `batch_personalisation`) to `out` (images: see compile_all)."""
    from oneword.errors import OnewordError
    from oneword.pipelines.definitions import PIPELINES

    if name not in PIPELINES:
        raise OnewordError(f"unknown pipeline {name!r}", hint=f"use one of {', '.join(PIPELINES)}")
    _write_pipeline(PIPELINES[name], out)
    return with_registry(out, image_registry) if image_registry else out


def tmp_package(name: str, image_registry: str) -> Path:
    """Compile a pipeline to a temporary YAML file whose images come from `image_registry`; return its path."""
    d = Path(tempfile.mkdtemp(prefix="oneword-compile-"))
    return compile_pipeline(name, d / f"{name}.yaml", image_registry)
