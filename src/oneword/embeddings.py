"""Learned-embedding files: read and write the formats other tools load.

| format    | file                         | layout                                                       |
|-----------|------------------------------|--------------------------------------------------------------|
| diffusers | `learned_embeds.safetensors` | `{token: (n, width)}`; loads with `load_textual_inversion`   |
| a1111     | `<token>.pt`                 | `string_to_token`, `string_to_param`, `name`, `step`, ...    |
| kohya     | `<token>.safetensors`        | `{"emb_params": (n, width)}`, or `clip_l`/`clip_g` for SDXL  |

An SDXL embedding is a pair (one table per text encoder). In kohya's format (and in a run's own
`learned_embeds.safetensors`, `save_whole`) it is one `{"clip_l", "clip_g"}` file, which A1111 and ComfyUI load as
is. In diffusers' format it is the two files diffusers' SDXL script writes, `<stem>.safetensors` and
`<stem>_2.safetensors` (`second_file`), each `{token: table}`, which `load_textual_inversion` loads by path, one
call per encoder. A1111's `.pt` is refused: A1111 reads an SDXL `.pt` only as a bare dict of the two tables, with
no room for the name and metadata, which the kohya file holds. Read, diffusers' pair (its checkpoints'
`learned_embeds-steps-N` and `learned_embeds_2-steps-N` too, and `.bin` files) is one embedding.

A1111, SD.Next and kohya's scripts call an embedding by its file's stem (`file_trigger`). InvokeAI reads the width
of a `{token: (n, width)}` file from its first axis and refuses it: give it the a1111 or kohya file.

oneword's own metadata (token, initializer, model fingerprint, steps, version) rides in the safetensors header
(and in an `oneword` entry of A1111 files). `.pt` files are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from oneword import __version__, storage
from oneword.errors import OnewordError

Format = Literal["diffusers", "a1111", "kohya"]
FORMATS: tuple[str, ...] = ("diffusers", "a1111", "kohya")
log = logging.getLogger(__name__)
A1111_STAR_ID = 265  # CLIP's id for "*", the key A1111 uses
PAIR_KEY = "oneword_pair"  # in both files of an SDXL pair in diffusers' layout: a digest of the two tables
MAX_KEYS = 16  # an embedding file holds a table or two (and a few in some tools' files); a model, hundreds


@dataclass
class Embedding:
    """A learned concept: its token and vectors, plus where they came from.

    `vectors` has shape (n_vectors, width). `vectors_2` is SDXL's second text encoder (clip_g), if any.
    `meta` holds string metadata: `initializer`, `model_fingerprint`, `steps`, `oneword_version`, ...
    """

    token: str
    vectors: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)
    vectors_2: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def steps(self) -> int:
        return int(self.meta.get("steps", 0) or 0)


def shared(emb: Embedding) -> Embedding:
    """`emb` as a file that leaves oneword carries it (`export`, `concepts pull`): its base model named as the
    world knows it (a hub id, `toyworld`; a local folder or bucket prefix by its last part), not where it was kept
    (`/home/ana/models/...`, `s3://acme-private/...`). A run's own files keep the whole reference, which `generate`
    loads by default."""
    source = emb.meta.get("model_source", "")
    # a path of any system, read on any: /home/..., C:\..., \\nas\...
    if not (storage.is_s3(source) or source.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", source)):
        return emb
    name = re.split(r"[\\/]", source.rstrip("/\\"))[-1]
    return replace(emb, meta={**emb.meta, "model_source": name})


def blend(a: Embedding, b: Embedding, t: float, token: str) -> Embedding:
    """A concept between `a` and `b`: each vector slerped `t` of the way from a's to b's (`oneword.directional`).

    Meaningful for directions learned at the vocabulary's norm (Directional TI), which is where its authors use it;
    plain TI's vectors of very different norms blend less evenly. `t` 0 is `a`, 1 is `b`.

    Raises:
        OnewordError: the two do not have the same shape (vector count, width, SDXL's second table), or `t` is not
            in [0, 1].
    """
    from oneword.directional import slerp

    if not 0 <= t <= 1:
        raise OnewordError(f"blend fraction {t} is not between 0 and 1", hint="0 gives the first concept, 1 the second")
    shapes = [(e.n_vectors, e.width, None if e.vectors_2 is None else tuple(e.vectors_2.shape)) for e in (a, b)]
    if shapes[0] != shapes[1]:
        shown = [f"{n}x{w}" + ("" if g is None else f" + clip_g {g[0]}x{g[1]}") for n, w, g in shapes]
        raise OnewordError(
            f"{a.token} ({shown[0]}) and {b.token} ({shown[1]}) differ in shape",
            hint="blend two concepts learned on the same model with the same number of vectors",
        )
    if a.meta.get("model_fingerprint") != b.meta.get("model_fingerprint"):
        log.warning("%s and %s were trained on different base models", a.token, b.token)
    second = None if a.vectors_2 is None else slerp(a.vectors_2.float(), b.vectors_2.float(), t)
    meta = {k: v for k, v in a.meta.items() if k in ("model_fingerprint", "model_source")}
    meta.update(blend_of=f"{a.token},{b.token}", blend_t=str(t), oneword_version=__version__)
    return Embedding(token, slerp(a.vectors.float(), b.vectors.float(), t), meta, second)


def second_file(path: Path) -> Path:
    """Where diffusers' SDXL layout keeps the second encoder's table beside `path`: `learned_embeds_2` for
    `learned_embeds` (its checkpoints' `learned_embeds-steps-N` too), else `<stem>_2`."""
    path = Path(path)
    stem = path.stem
    if stem == "learned_embeds" or stem.startswith("learned_embeds-"):  # the names diffusers' script writes
        return path.with_name("learned_embeds_2" + stem.removeprefix("learned_embeds") + path.suffix)
    return path.with_name(f"{stem}_2{path.suffix}")


def files_written(emb: Embedding, path: Path, fmt: Format) -> list[Path]:
    """The files `save(emb, path, fmt)` writes: `path`, and for an SDXL pair in diffusers' format its second."""
    return [Path(path), second_file(path)] if emb.vectors_2 is not None and fmt == "diffusers" else [Path(path)]


def formats_for(emb: Embedding) -> tuple[str, ...]:
    """The formats that can hold `emb`: all of them, or for an SDXL pair all but A1111's one-table `.pt`."""
    return FORMATS if emb.vectors_2 is None else tuple(f for f in FORMATS if f != "a1111")


def default_filename(token: str, fmt: Format) -> str:
    """The conventional file name for `token` in `fmt` (A1111's and kohya's: `file_trigger(token)`)."""
    stem = file_trigger(token)
    return {"diffusers": "learned_embeds.safetensors", "a1111": f"{stem}.pt", "kohya": f"{stem}.safetensors"}[fmt]


TRIGGER_SUFFIX = "-ti"


def file_trigger(token: str) -> str:
    """The word A1111, SD.Next and kohya's scripts will call `token`'s embedding by: its file's stem, `token`
    without what a file name cannot hold, and `TRIGGER_SUFFIX` after it where that is one word of CLIP's vocabulary.
    Those tools put the embedding in place of the stem's tokens wherever a prompt has them: a file `cat.pt` (from
    the token `<cat>`) would take the place of every "cat" in every prompt."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"
    return stem + TRIGGER_SUFFIX if is_one_word(stem) else stem


def is_one_word(text: str) -> bool:
    """True if CLIP's tokenizer (every Stable Diffusion's first) reads `text` as one entry of its vocabulary."""
    return len(_clip_tokenizer()(text, add_special_tokens=False).input_ids) == 1


@functools.cache
def _clip_tokenizer():
    from oneword.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


# The suffixes each format's readers expect (A1111, ComfyUI and diffusers choose torch.load or safetensors by it).
SUFFIXES: dict[str, tuple[str, ...]] = {"diffusers": (".safetensors",), "kohya": (".safetensors",),
                                        "a1111": (".pt", ".bin")}  # fmt: skip


def is_safetensors(path: Path) -> bool:
    """True if the file is a safetensors file by its content (an 8-byte header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _header(emb: Embedding) -> dict[str, str]:
    return {"oneword": json.dumps({"token": emb.token, "oneword_version": __version__, **emb.meta})}


def save(emb: Embedding, path: Path, fmt: Format = "diffusers") -> Path:
    """Write `emb` to `path` in format `fmt` (atomically: a temporary file is renamed into place).

    Returns:
        `path`.
    """
    path = Path(path)
    if fmt in SUFFIXES and path.suffix.lower() not in SUFFIXES[fmt]:
        raise OnewordError(
            f"{path}: an embedding file in {fmt} format is named *{' or *'.join(SUFFIXES[fmt])}, and the tools "
            "that load it pick their reader by that suffix",
            hint=f"name it {path.with_suffix(SUFFIXES[fmt][0]).name}, or pick the format that suffix means",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    # a copy: torch.save writes a view's whole storage (three rows of a 49,411-row table: 150 MB)
    v = emb.vectors.detach().float().cpu().clone()
    pair = None if emb.vectors_2 is None else {"clip_l": v, "clip_g": emb.vectors_2.detach().float().cpu().clone()}
    if pair is not None and pair["clip_g"].shape[0] != v.shape[0]:
        raise OnewordError(
            f"{emb.token!r} has {v.shape[0]} clip_l but {pair['clip_g'].shape[0]} clip_g vectors: the two text "
            "encoders would read the token as sequences of different lengths",
            hint="an SDXL embedding has as many vectors for each encoder; take the pair from one training",
        )
    if pair is not None and fmt == "a1111":
        raise OnewordError(
            f"{emb.token!r} is an SDXL embedding (clip_l {tuple(v.shape)} and clip_g "
            f"{tuple(emb.vectors_2.shape)}): A1111 reads an SDXL .pt only as a bare dict of the two tables, "
            "with no room for its name and metadata",
            hint="use --format kohya: the same two tables in a safetensors file, which A1111 and ComfyUI load",
        )
    if fmt == "diffusers" and pair is not None:  # diffusers' SDXL layout: a {token: table} file per encoder
        second = second_file(path)
        tmp_2 = second.with_name(second.name + ".part")
        # both halves carry one digest of the pair: halves of two writings (a stop between the two moves below,
        # a copy of one file) are refused by `load`, not read as one embedding
        digest = hashlib.sha256(v.numpy().tobytes() + pair["clip_g"].numpy().tobytes()).hexdigest()[:16]
        header = {**_header(emb), PAIR_KEY: digest}
        try:
            storage.save_tensors({emb.token: pair["clip_g"]}, tmp_2, metadata=header)
            storage.save_tensors({emb.token: v}, tmp, metadata=header)
        except BaseException:
            tmp_2.unlink(missing_ok=True)
            raise
        tmp_2.replace(second)
    elif fmt == "diffusers":
        storage.save_tensors({emb.token: v}, tmp, metadata=_header(emb))
    elif fmt == "kohya":
        storage.save_tensors(pair or {"emb_params": v}, tmp, metadata=_header(emb))
    elif fmt == "a1111":
        torch.save(
            {
                "string_to_token": {"*": A1111_STAR_ID},
                "string_to_param": {"*": v},
                "name": emb.token,
                "step": emb.steps,
                # A1111's own fields name a checkpoint file by its hash and name: oneword knows no such hash (its
                # fingerprint is of the model's parts), and a path would tell the world where the model was kept
                "sd_checkpoint": None,
                "sd_checkpoint_name": Path(emb.meta.get("model_source", "")).name,
                "oneword": {"token": emb.token, "oneword_version": __version__, **emb.meta},
            },
            tmp,
            # A1111 vets a zipped .pt by its entry names, and rejects those newer torch writes (.format_version,
            # .storage_alignment; byteorder before 2023): it reads the legacy format's pickles without that check.
            _use_new_zipfile_serialization=False,
        )
    else:
        raise OnewordError(f"unknown embedding format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    tmp.replace(path)
    return path


def save_whole(emb: Embedding, path: Path) -> Path:
    """Write `emb` as one file that holds all of it, a run's own `learned_embeds.safetensors`: diffusers' format
    for one text encoder, the clip_l/clip_g file for an SDXL pair (so every step, the registry and a pull move one
    file, and A1111 and ComfyUI load it as is)."""
    return save(emb, path, "diffusers" if emb.vectors_2 is None else "kohya")


def load(path: Path, token: str | None = None) -> Embedding:
    """Read an embedding file in any of the supported formats (detected from its content).

    Args:
        path: the file.
        token: the token to use; by default the one recorded in the file, else the file name's stem.

    Returns:
        The `Embedding`.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", ".pt", ".bin"))
        raise OnewordError(
            f"embedding {path} is a folder", hint=f"pass the file inside it ({', '.join(found) or 'none found'})"
        )
    if not path.is_file():
        raise OnewordError(f"embedding file {path} not found")
    try:
        return _load(path, token)
    except OnewordError:
        raise
    except Exception as e:  # a file of the right kind with the wrong things inside: a key, a header, a type
        raise OnewordError(
            f"{path} is not an embedding oneword can read ({type(e).__name__}: {e})",
            hint="expected a diffusers, A1111 or kohya textual-inversion file",
        ) from e


def _load(path: Path, token: str | None) -> Embedding:
    # by content as well as by suffix: a .pt that holds safetensors is read as what it is
    if is_safetensors(path) or path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                keys = list(f.keys())
                if len(keys) > MAX_KEYS:  # a whole model passed by mistake: said without reading gigabytes
                    raise OnewordError(
                        f"{path} holds {len(keys)} tensors ({', '.join(keys[:3])}, ...): a model, not an embedding",
                        hint="pass the embedding file (learned_embeds.safetensors, or an A1111 .pt)",
                    )
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise OnewordError(f"{path} is not a readable safetensors file ({e})") from e
        meta = json.loads(header.get("oneword", "{}"))
        if not isinstance(meta, dict):
            raise OnewordError(f"{path}: its 'oneword' header is not a JSON object", hint="export it again")
        if "emb_params" in tensors:
            vectors, vectors_2 = tensors["emb_params"], None
        elif "clip_l" in tensors:
            vectors, vectors_2 = tensors["clip_l"], tensors.get("clip_g")
        elif len(tensors) == 1:
            file_token, vectors = next(iter(tensors.items()))
            vectors_2 = _second_table(path, file_token, vectors.shape[-1], header.get(PAIR_KEY))
            meta.setdefault("token", file_token)
        else:
            raise OnewordError(
                f"{path} holds {sorted(tensors)}, which is no embedding format oneword knows",
                hint="expected {token: tensor}, emb_params, or clip_l/clip_g",
            )
    else:
        try:
            # the paper's code and early A1111 kept string_to_param as an nn.ParameterDict: allowed, still weights-only
            with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            with open(path, "rb") as f:
                head = f.read(2)
            if not head.startswith((b"\x80", b"PK")):  # neither a pickle (a legacy .pt) nor a zip (torch's own)
                raise OnewordError(
                    f"{path} is not an embedding file: " + ("it is empty" if not head else
                                                            "neither safetensors nor torch's .pt/.bin"),
                    hint="pass a textual-inversion file: diffusers' .safetensors, an A1111 .pt, or a kohya file",
                ) from e
            raise OnewordError(
                f"{path} could not be read as a weights-only .pt/.bin file ({e})",
                hint="oneword never unpickles arbitrary objects; convert the file to safetensors",
            ) from e
        vectors_2 = None
        if isinstance(data, dict) and "string_to_param" in data:
            if not data["string_to_param"]:
                raise OnewordError(f"{path}: its string_to_param is empty, so it holds no vectors")
            params = data["string_to_param"]
            vectors = next(iter(getattr(params, "_parameters", params).values()))
            meta = {k: str(v) for k, v in (data.get("oneword") or {}).items()}
            meta.setdefault("token", data.get("name") or path.stem)
            if "step" in data and data["step"] is not None:
                meta.setdefault("steps", str(data["step"]))
        elif isinstance(data, dict) and "clip_l" in data:  # an SDXL pair saved with torch.save
            vectors, vectors_2, meta = data["clip_l"], data.get("clip_g"), {}
        elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
            file_token, vectors = next(iter(data.items()))
            # kohya's key names the format, not the concept: the token is the file's stem, as for its safetensors
            meta = {} if file_token == "emb_params" else {"token": file_token}
            vectors_2 = None if file_token == "emb_params" else _second_table(path, file_token, vectors.shape[-1])
        elif isinstance(data, torch.Tensor):
            vectors, meta = data, {}
        else:
            raise OnewordError(
                f"{path} is no embedding format oneword knows",
                hint="expected an A1111 .pt, a diffusers learned_embeds.bin, or a tensor",
            )
    if not isinstance(vectors, torch.Tensor) or (vectors_2 is not None and not isinstance(vectors_2, torch.Tensor)):
        raise OnewordError(f"{path}: its vectors are not tensors", hint="expected a textual-inversion file")
    vectors = vectors.float()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors_2 is not None:  # SDXL's clip_g, as clip_l: fp32, and one vector stored without its row axis
        vectors_2 = vectors_2.float()[None] if vectors_2.dim() == 1 else vectors_2.float()
    if not all(torch.isfinite(t).all() for t in (vectors, vectors_2) if t is not None):  # it would draw black
        raise OnewordError(
            f"{path} holds non-finite values (NaN or inf) in its vectors",
            hint="the file is damaged, or its training diverged: take an earlier checkpoint's, or train again",
        )
    name = token or meta.pop("token", None) or path.stem
    meta.pop("token", None)
    return Embedding(name, vectors, {k: str(v) for k, v in meta.items()}, vectors_2)


def _second_table(path: Path, token: str, width: int, said: str | None = None) -> torch.Tensor | None:
    """SDXL's clip_g table where diffusers' SDXL script writes it: beside `path`, in `second_file(path)` (its
    `learned_embeds_2.safetensors`, or `.bin`), under the same token, of another width (a table as wide is no
    pair's: a second version of the concept, say). Where oneword wrote both, their digests of the pair (`said`,
    the first's) agree, or they are halves of two writings: refused, not read as one."""
    beside = second_file(path)
    if not beside.is_file():
        return None
    try:
        if is_safetensors(beside):
            second = load_file(str(beside))
            with safe_open(str(beside), "pt") as f:
                said_2 = (f.metadata() or {}).get(PAIR_KEY)
        else:
            second, said_2 = torch.load(beside, map_location="cpu", weights_only=True), None
    except Exception:  # whatever it is, it is not the pair's second half: the first file is read alone
        return None
    if said and said_2 and said != said_2 and isinstance(second, dict) and token in second:
        raise OnewordError(
            f"{path} and {beside.name} beside it are halves of two different writings of {token!r}",
            hint="write the pair again (oneword export/pull --force), or read the kohya file, which holds both",
        )
    table = second.get(token) if isinstance(second, dict) and len(second) == 1 else None
    if not isinstance(table, torch.Tensor) or table.shape[-1] == width:
        return None
    log.info("%s: its clip_g table read from %s (diffusers' SDXL layout)", path, beside.name)
    return table


def check_compatible(
    emb: Embedding,
    width: int,
    model_fingerprint: str,
    force: bool = False,
    source: str = "",
    width_2: int | None = None,
) -> None:
    """Refuse to load `emb` into a model it was not trained for.

    A different width is always an error, and so is a mismatch in the second table: an SDXL model (`width_2`
    set) needs the clip_g vectors, and a one-encoder model cannot use them. A different recorded model
    fingerprint is an error unless `force`.
    """
    where = f" ({source})" if source else ""
    if emb.width != width:
        raise OnewordError(
            f"embedding {emb.token!r}{where} has width {emb.width} but the model's text encoder has width {width}",
            hint="use an embedding trained for this model family (768: SD 1.x, 1024: SD 2.x, 768 + 1280: SDXL)",
        )
    width_emb_2 = None if emb.vectors_2 is None else int(emb.vectors_2.shape[-1])
    if width_emb_2 != width_2:
        if width_2 is None:
            problem, hint = "is an SDXL pair (clip_l + clip_g), but the model has one text encoder", "use an SDXL model"
        elif width_emb_2 is None:
            problem = f"has no clip_g table, which this SDXL model's second text encoder (width {width_2}) needs"
            hint = "use an SDXL embedding (a safetensors file with clip_l and clip_g), or train one on this model"
        else:
            problem = f"has a clip_g table of width {width_emb_2}, but the model's second text encoder is {width_2}"
            hint = "use an embedding trained for this model family"
        raise OnewordError(f"embedding {emb.token!r}{where} {problem}", hint=hint)
    if emb.vectors_2 is not None and emb.vectors_2.shape[0] != emb.n_vectors:
        # diffusers would give the token a different number of pieces in each tokenizer: the two encoders'
        # sequences would be out of step after it, and the pictures silently wrong
        raise OnewordError(
            f"embedding {emb.token!r}{where} has {emb.n_vectors} clip_l but {emb.vectors_2.shape[0]} clip_g vectors",
            hint="an SDXL embedding has as many vectors for each text encoder",
        )
    recorded = emb.meta.get("model_fingerprint")
    if recorded and recorded != model_fingerprint and not force:
        raise OnewordError(
            f"embedding {emb.token!r}{where} was trained on model {recorded[:19]}… but this model is "
            f"{model_fingerprint[:19]}…",
            hint="pass --force to load it anyway (the widths match, so it may still work on a close relative)",
        )
