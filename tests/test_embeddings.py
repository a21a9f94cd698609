import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from oneword import embeddings as E
from oneword.errors import OnewordError
from oneword.generate import build_pipeline, load_embeddings
from oneword.inversion import ConceptSpec, InversionTrainer, TrainConfig
from oneword.train import train


def _emb(n=2, width=32, fp="sha256:" + "ab" * 32):
    g = torch.Generator().manual_seed(0)
    return E.Embedding(
        "<thing>", torch.randn(n, width, generator=g), {"initializer": "toy", "model_fingerprint": fp, "steps": "123"}
    )


@pytest.mark.parametrize("fmt", E.FORMATS)
def test_every_format_round_trips(fmt, tmp_path):
    emb = _emb()
    p = E.save(emb, tmp_path / E.default_filename(emb.token, fmt), fmt)
    back = E.load(p)
    assert back.token == "<thing>"
    assert torch.equal(back.vectors, emb.vectors)
    assert back.meta["initializer"] == "toy" and back.meta["model_fingerprint"] == emb.meta["model_fingerprint"]
    assert back.steps == 123


def test_layouts_are_what_other_tools_expect(tmp_path):
    emb = _emb()
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = load_file(E.save(emb, tmp_path / "d.safetensors", "diffusers"))
    assert list(d) == ["<thing>"] and d["<thing>"].shape == (2, 32)
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert '"oneword_version"' in f.metadata()["oneword"]
    k = load_file(E.save(emb, tmp_path / "k.safetensors", "kohya"))
    assert list(k) == ["emb_params"]
    a = torch.load(E.save(emb, tmp_path / "a.pt", "a1111"), weights_only=True)
    assert a["string_to_token"] == {"*": 265} and a["string_to_param"]["*"].shape == (2, 32)
    assert a["name"] == "<thing>" and a["step"] == 123
    assert {"sd_checkpoint", "sd_checkpoint_name"} <= set(a)


def test_a_file_named_after_a_word_would_take_its_place_in_a1111(tmp_path):
    """A1111, SD.Next and kohya's scripts call an embedding by its file's stem, and put it in place of the stem's
    tokens wherever a prompt has them: `cat.pt` would replace every "cat" in every prompt."""
    assert E.file_trigger("<my-cat>") == "my-cat" and E.default_filename("<my-cat>", "a1111") == "my-cat.pt"
    assert E.default_filename("<cat>", "a1111") == "cat-ti.pt" and E.default_filename("<cat>", "kohya") == (
        "cat-ti.safetensors")  # fmt: skip
    assert E.file_trigger("<photo>") == "photo-ti" and E.file_trigger("\u2039\u732b>") == "embedding"
    assert not E.is_one_word("cat-ti")


def test_what_other_tools_write_reads_as_they_meant_it(tmp_path):
    # the paper's code and early A1111: string_to_param an nn.ParameterDict, read without unpickling code
    old = {"string_to_token": {"*": torch.tensor(265)},
           "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 32))})}  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    assert E.load(tmp_path / "old.pt").vectors.shape == (2, 32)
    # diffusers' SDXL script: one file per text encoder, both under the token
    first, g = torch.randn(2, 32), torch.randn(2, 64)
    save_file({"<x>": first}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<x>": g}, str(tmp_path / "learned_embeds_2.safetensors"))
    pair = E.load(tmp_path / "learned_embeds.safetensors")
    assert pair.token == "<x>" and torch.equal(pair.vectors, first) and torch.equal(pair.vectors_2, g)
    # its checkpoints, learned_embeds-steps-N beside learned_embeds_2-steps-N, and its .bin files
    # (--no_safe_serialization): each pair is one embedding, never clip_l alone
    save_file({"<x>": first}, str(tmp_path / "learned_embeds-steps-500.safetensors"))
    save_file({"<x>": g}, str(tmp_path / "learned_embeds_2-steps-500.safetensors"))
    torch.save({"<x>": first}, tmp_path / "learned_embeds.bin")
    torch.save({"<x>": g}, tmp_path / "learned_embeds_2.bin")
    for name in ("learned_embeds-steps-500.safetensors", "learned_embeds.bin"):
        pair = E.load(tmp_path / name)
        assert pair.token == "<x>" and torch.equal(pair.vectors_2, g), name
    # a file beside it as wide is no pair: another version of the concept, say
    save_file({"<y>": first}, str(tmp_path / "y.safetensors"))
    save_file({"<y>": first * 2}, str(tmp_path / "y_2.safetensors"))
    assert E.load(tmp_path / "y.safetensors").vectors_2 is None


def test_what_oneword_writes_holds_only_the_embedding(tmp_path):
    # a view of a whole table: its storage is not written with it
    table = torch.randn(49411, 32)
    view = E.Embedding("<v>", table[49408:], {"model_source": "/home/me/models/secret/sd15.safetensors"})
    pt = E.save(view, tmp_path / "v.pt", "a1111")
    assert pt.stat().st_size < 20_000
    a = torch.load(pt, weights_only=True)
    assert a["sd_checkpoint"] is None and a["sd_checkpoint_name"] == "sd15.safetensors"
    # a file for sharing names its model as the world knows it, never where it was kept
    for source, named in (("/home/me/models/secret/sd15", "sd15"), ("s3://acme-private/models/sd21/", "sd21"),
                          ("stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1"),
                          ("toyworld", "toyworld"), ("C:\\Users\\me\\sd15.ckpt", "sd15.ckpt")):  # fmt: skip
        shared = E.shared(E.Embedding("<v>", torch.zeros(1, 4), {"model_source": source, "steps": "3"}))
        assert shared.meta == {"model_source": named, "steps": "3"}
        kohya = E.save(shared, tmp_path / "shared.safetensors", "kohya")
        assert source == named or source.rstrip("/") not in kohya.read_bytes().decode("latin-1")
    # an SDXL pair whose tables hold different numbers of vectors: the encoders would read different sequences
    with pytest.raises(OnewordError, match="2 clip_l but 3 clip_g"):
        E.save(E.Embedding("<p>", torch.randn(2, 32), {}, torch.randn(3, 64)), tmp_path / "p.safetensors", "kohya")
    assert not (tmp_path / "p.safetensors").exists()


# What A1111's modules/safe.py lets through (read in stable-diffusion-webui's releases; not its code): a zipped .pt
# only if every entry is named <dir>/data.pkl, <dir>/version or <dir>/data/N (later releases also allow byteorder
# and .data/serialization_id, never torch 2.x's .format_version); else the legacy format's five pickles, read by an
# unpickler that resolves a short list of globals. A file it refuses is skipped, logged as possibly malicious.
A1111_ZIP_ENTRY = re.compile(r"^[^/]+/(data/\d+|version|data\.pkl)$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    *(("torch", f"{kind}Storage") for kind in ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16")),
}


def _a1111_would_load(path) -> bool:
    import zipfile

    if zipfile.is_zipfile(path):
        return all(A1111_ZIP_ENTRY.match(name) for name in zipfile.ZipFile(path).namelist())

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in A1111_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name}")
            return dict if name == "OrderedDict" else (lambda *args: None)  # only what is resolved is checked

        def persistent_load(self, saved_id):
            return None

    with open(path, "rb") as f:
        unpickler = Restricted(f)
        for _ in range(5):
            unpickler.load()
    return True


@pytest.mark.parametrize("n", [1, 3])
def test_an_a1111_file_passes_a1111s_pickle_check_and_files_are_readable_by_other_users(n, tmp_path):
    emb = _emb(n=n)
    pt = E.save(emb, tmp_path / "thing.pt", "a1111")
    assert _a1111_would_load(pt)  # torch.save's default zip has .format_version: A1111 skipped every such file
    assert torch.equal(torch.load(pt, weights_only=True)["string_to_param"]["*"], emb.vectors)
    umask = os.umask(0o022)
    os.umask(umask)
    for fmt in E.FORMATS:  # safetensors writes 0600; an A1111 run by another user could not open those
        path = E.save(emb, tmp_path / E.default_filename(emb.token, fmt), fmt)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, fmt


def test_reads_sdxl_kohya_and_plain_tensors(tmp_path):
    save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    xl = E.load(tmp_path / "xl.safetensors")
    assert xl.vectors.shape == (2, 768) and xl.vectors_2.shape == (2, 1280) and xl.token == "xl"
    assert torch.equal(E.load(E.save(xl, tmp_path / "xl2.safetensors", "kohya")).vectors_2, xl.vectors_2)
    # one vector per encoder stored without its row axis (a third party's SDXL file), in fp16: read as oneword's
    save_file({"clip_l": torch.ones(768).half(), "clip_g": torch.ones(1280).half()}, str(tmp_path / "flat.safetensors"))
    flat = E.load(tmp_path / "flat.safetensors")
    assert (flat.vectors.shape, flat.vectors_2.shape, flat.vectors_2.dtype) == ((1, 768), (1, 1280), torch.float32)
    E.check_compatible(flat, 768, "", force=True, width_2=1280)
    torch.save({"<bin>": torch.ones(768)}, tmp_path / "learned_embeds.bin")  # diffusers' old .bin
    b = E.load(tmp_path / "learned_embeds.bin")
    assert b.token == "<bin>" and b.vectors.shape == (1, 768)


class _Evil:
    # Unpickling would call a global. Not `print`: kfp.local swaps builtins.print while a run logs, and a test
    # process that ran a pipeline before this test may still hold the swapped one, which pickle cannot name.
    def __reduce__(self):
        return (os.getenv, ("PWNED",))


def test_pt_files_are_never_unpickled(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Evil()}}, f)
    with pytest.raises(OnewordError, match="weights-only"):
        E.load(p)


def test_unknown_content_is_a_clear_error(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(OnewordError, match="no embedding format"):
        E.load(tmp_path / "two.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(OnewordError, match="not a readable safetensors"):
        E.load(tmp_path / "junk.safetensors")
    with pytest.raises(OnewordError, match="not found"):
        E.load(tmp_path / "missing.pt")
    with pytest.raises(OnewordError, match="is a folder") as folder:
        E.load(tmp_path)
    assert "two.safetensors" in folder.value.hint
    save_file({"<x>": torch.ones(1, 4)}, str(tmp_path / "bad-header.safetensors"), metadata={"oneword": "[1"})
    with pytest.raises(OnewordError, match=r"bad-header\.safetensors is not an embedding oneword can read"):
        E.load(tmp_path / "bad-header.safetensors")
    torch.save({"string_to_param": {}}, tmp_path / "empty.pt")
    with pytest.raises(OnewordError, match="string_to_param is empty"):
        E.load(tmp_path / "empty.pt")
    save_file({f"model.layer{i}": torch.ones(2) for i in range(40)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(OnewordError, match="a model, not an embedding"):
        E.load(tmp_path / "model.safetensors")


def test_the_format_is_read_from_the_content_and_written_under_its_suffix(tmp_path):
    emb = _emb()
    with pytest.raises(OnewordError, match=r"named \*\.safetensors") as wrong:
        E.save(emb, tmp_path / "cat.pt", "diffusers")  # A1111 would torch.load it
    assert "cat.safetensors" in wrong.value.hint and not (tmp_path / "cat.pt").exists()
    with pytest.raises(OnewordError, match=r"named \*\.pt or \*\.bin"):
        E.save(emb, tmp_path / "cat.safetensors", "a1111")
    # a file that another tool named .pt but wrote as safetensors is read as what it holds
    save_file({"<thing>": emb.vectors}, str(tmp_path / "from-elsewhere.pt"))
    assert torch.equal(E.load(tmp_path / "from-elsewhere.pt").vectors, emb.vectors)


def test_an_sdxl_pair_with_unequal_tables_is_refused():
    pair = E.Embedding("<x>", torch.ones(2, 32), {}, torch.ones(3, 64))
    with pytest.raises(OnewordError, match="2 clip_l but 3 clip_g vectors"):
        E.check_compatible(pair, 32, "sha256:m", width_2=64)


def test_a_placeholder_that_is_a_piece_of_a_vocabulary_word_is_refused():
    from oneword.tokenizer import load_clip_tokenizer
    from oneword.tokens import check_new_token

    tok = load_clip_tokenizer()
    piece = next(t for t in ("kitt", "pupp", "skul") if t in tok.get_vocab())
    assert len(tok(piece, add_special_tokens=False).input_ids) > 1  # the old one-id check let it through
    with pytest.raises(OnewordError, match="already in the vocabulary"):
        check_new_token(tok, piece)
    tok.add_tokens(["<x>_1"])  # the second vector's entry of <x> is taken
    with pytest.raises(OnewordError, match="cannot be told from '<x>_1'"):
        check_new_token(tok, "<x>", n_vectors=2)
    tok.add_tokens(["<Cat-Q>"])
    for token, taken in (("<x>", "<x>_1"), ("<cat-q>", "<Cat-Q>"), ("<Cat-Q>_1", "<Cat-Q>")):
        with pytest.raises(OnewordError, match=f"cannot be told from '{taken}'"):
            check_new_token(tok, token)
    check_new_token(tok, "<y>", n_vectors=2)
    from oneword.tokens import clashing_entries

    # diffusers chains NAME_1, NAME_2, ... from 1, in order: without NAME_1, NAME_2 is a token of its own
    assert clashing_entries(["<rex>_2"], ["<rex>"]) == [] and clashing_entries(["dog_2024"], ["dog"]) == []
    assert clashing_entries(["<rex>_2"], ["<rex>", "<rex>_1"]) == ["<rex>"]


def test_generate_refuses_embeddings_a_prompt_cannot_tell_apart(tiny_model_dir, tmp_path):
    """`<a>` then `<a>_1`: diffusers would add the second concept's vector to every `<a>` prompt; the other order
    was diffusers' bare ValueError."""
    from oneword.models import load_base_model

    for first, second in (("<a>", "<a>_1"), ("<a>_1", "<a>"), ("<Dog-Q>", "<dog-q>")):
        model = load_base_model(str(tiny_model_dir))  # its tokenizer gets the tokens loaded
        files = [E.save(E.Embedding(t, torch.randn(1, 32)), tmp_path / f"{i}.safetensors") for i, t in
                 enumerate((first, second))]  # fmt: skip
        with pytest.raises(OnewordError, match=f"embedding '{second}' cannot be told from the loaded '{first}'"):
            load_embeddings(build_pipeline(model), model, files)


def test_wrong_width_and_wrong_model(tiny_model, tmp_path):
    pipe = build_pipeline(tiny_model)
    with pytest.raises(OnewordError, match="width 768 but the model's text encoder has width 32"):
        load_embeddings(pipe, tiny_model, [_emb(width=768, fp=tiny_model.fingerprint)])
    other = _emb()  # recorded for another model
    with pytest.raises(OnewordError, match="--force"):
        load_embeddings(pipe, tiny_model, [other])
    assert load_embeddings(pipe, tiny_model, [other], force=True) == ["<thing>"]
    piece = next(t for t in ("kitt", "pupp", "skul") if t in pipe.tokenizer.get_vocab())
    word = E.Embedding(piece, torch.ones(1, 32), {"model_fingerprint": tiny_model.fingerprint})
    with pytest.raises(OnewordError, match="already an entry of the model's vocabulary") as taken:
        load_embeddings(pipe, tiny_model, [word])  # diffusers' own refusal was a bare ValueError
    assert "oneword export" in taken.value.hint


def test_diffusers_loads_our_file_and_encodes_like_the_trainer(tiny_model_dir, cat_latents_dir, tmp_path):
    """The file loads unchanged with the stock `load_textual_inversion`, and gives the same prompt embedding."""
    from oneword.latents import LatentSet
    from oneword.models import load_base_model

    concept = ConceptSpec(token="<cat-z>", init_word="cat", n_vectors=3)
    trainer_model = load_base_model(str(tiny_model_dir), parts=("unet",))
    trainer = InversionTrainer(
        trainer_model, [(concept, LatentSet.load(cat_latents_dir))], TrainConfig(steps=8, checkpoint_every=0)
    )
    trainer.run(progress=False)
    path = E.save(trainer.embeddings()[0], tmp_path / "learned_embeds.safetensors")
    prompt = "a watercolor of <cat-z> on the moon"
    ours = trainer.encode([prompt])

    pipe = build_pipeline(load_base_model(str(tiny_model_dir)))
    pipe.load_textual_inversion(str(path))  # stock diffusers, no help from oneword
    theirs, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_train_step_writes_every_format(tiny_model_dir, cat_latents_dir, tmp_path):
    r = train(
        cat_latents_dir,
        tmp_path / "out",
        ConceptSpec(token="<cat-w>", init_word="cat"),
        TrainConfig(steps=6, checkpoint_every=3),
        progress=False,
    )
    out = tmp_path / "out"
    for rel in (
        "learned_embeds.safetensors",
        "a1111/cat-w.pt",
        "kohya/cat-w.safetensors",
        "curve.json",
        "summary.json",
        "checkpoints/step-000003.pt",
        "checkpoints/step-000006.pt",
    ):
        assert (out / rel).exists(), rel
    for f in ("learned_embeds.safetensors", "a1111/cat-w.pt", "kohya/cat-w.safetensors"):
        assert torch.equal(E.load(out / f).vectors, r.embeddings[0].vectors)
    assert E.load(out / "learned_embeds.safetensors").meta["model_fingerprint"].startswith("sha256:")


def test_an_sdxl_pair_is_never_exported_half(tmp_path):
    """clip_g is half of an SDXL embedding: kohya's file (and a run's own) holds the pair in one file, diffusers'
    format in its SDXL script's two files, each under the token; A1111's .pt cannot hold it with its name, so it is
    refused."""
    xl = E.Embedding("<xl>", torch.randn(2, 768), {"steps": "10"}, torch.randn(2, 1280))
    for f in (E.save(xl, tmp_path / "kohya.safetensors", "kohya"), E.save_whole(xl, tmp_path / "run.safetensors")):
        assert sorted(load_file(f)) == ["clip_g", "clip_l"], f
        back = E.load(f)
        assert back.token == "<xl>" and torch.equal(back.vectors_2, xl.vectors_2), f
    f = E.save(xl, tmp_path / "d" / "learned_embeds.safetensors", "diffusers")
    assert E.files_written(xl, f, "diffusers") == [f, tmp_path / "d" / "learned_embeds_2.safetensors"]
    assert sorted(p.name for p in f.parent.iterdir()) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    assert torch.equal(load_file(f)["<xl>"], xl.vectors)
    assert torch.equal(load_file(E.second_file(f))["<xl>"], xl.vectors_2)
    back = E.load(f)
    assert back.token == "<xl>" and torch.equal(back.vectors_2, xl.vectors_2) and back.steps == 10
    assert E.second_file(tmp_path / "my-cat.safetensors").name == "my-cat_2.safetensors"
    assert E.second_file(tmp_path / "learned_embeds_v2.safetensors").name == "learned_embeds_v2_2.safetensors"
    # halves of two writings (a stop between the two files' moves, one file copied over): refused, not mixed
    newer = E.Embedding("<xl>", torch.randn(2, 768), {"steps": "10"}, torch.randn(2, 1280))
    E.save(newer, tmp_path / "e" / "learned_embeds.safetensors", "diffusers")
    shutil.copy(tmp_path / "e" / "learned_embeds_2.safetensors", E.second_file(f))
    with pytest.raises(OnewordError, match="halves of two different writings of '<xl>'"):
        E.load(f)
    with pytest.raises(OnewordError, match="SDXL") as e:
        E.save(xl, tmp_path / "xl.pt", "a1111")
    assert "--format kohya" in e.value.hint and not (tmp_path / "xl.pt").exists()


def test_a_kohya_pt_takes_its_token_from_the_file_name(tmp_path):
    torch.save({"emb_params": torch.ones(2, 768)}, tmp_path / "my-style.pt")
    emb = E.load(tmp_path / "my-style.pt")
    assert emb.token == "my-style" and emb.vectors.shape == (2, 768)
    torch.save({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, tmp_path / "xl-style.pt")
    xl = E.load(tmp_path / "xl-style.pt")
    assert xl.token == "xl-style" and xl.vectors_2.shape == (1, 1280)


def test_progressive_vectors_that_would_never_train_are_refused(tiny_model_dir, cat_latents):
    from oneword.models import load_base_model

    spec = ConceptSpec(token="<late>", init_word="cat", n_vectors=3)
    with pytest.raises(OnewordError, match="vector 3 of 3 switches on at step 10") as e:
        InversionTrainer(
            load_base_model(str(tiny_model_dir)), [(spec, cat_latents)], TrainConfig(steps=10, progressive_every=5)
        )
    assert "at most 2 vectors" in e.value.hint and "progressive_every at most 4" in e.value.hint
    ok = InversionTrainer(
        load_base_model(str(tiny_model_dir)), [(spec, cat_latents)], TrainConfig(steps=11, progressive_every=5)
    )  # vector 3 switches on at step 10, the last
    assert ok.n_active(10) == 3
