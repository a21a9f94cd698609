"""Bad input gets a clear error that names the file or value and what to do, and loses nothing: the files a user
can hand a step by mistake (a text file for latents, a damaged JSON a step wrote, a manifest in another encoding,
a file that is no database for a store, an embedding of NaNs) and values no setting can take."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from oneword import embeddings as E
from oneword.errors import OnewordError

from .test_cli import run


def test_what_is_not_a_latent_set_is_said_to_be_so(cat_latents_dir, tmp_path):
    from oneword.latents import LatentSet

    (tmp_path / "notes.txt").write_text("not latents")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # safetensors without oneword's header
    E.save(E.Embedding("<e>", torch.ones(1, 32), {}), tmp_path / "emb.safetensors")  # a header, not latents'
    for f in ("notes.txt", "other.safetensors", "emb.safetensors"):
        with pytest.raises(OnewordError, match="is not a latent set oneword wrote") as e:
            LatentSet.load(tmp_path / f)
        assert str(tmp_path / f) in e.value.message and "cache-latents -o" in e.value.hint
    assert len(LatentSet.load(cat_latents_dir)) > 0


def test_a_damaged_json_a_step_wrote_is_named_with_the_step_that_writes_it_again(cat_dataset, tmp_path):
    from oneword.evaluation.evaluate import _load_summary
    from oneword.images import Manifest

    data = shutil.copytree(cat_dataset, tmp_path / "data")
    manifest = data / "manifest.json"
    manifest.write_text('{"resolution": 32,')  # cut short
    with pytest.raises(OnewordError, match="is not readable JSON") as e:
        Manifest.load(data)
    assert str(manifest) in e.value.message and "oneword preprocess" in e.value.hint
    manifest.write_text("{}")
    with pytest.raises(OnewordError, match="is not a manifest oneword wrote"):
        Manifest.load(data)
    manifest.write_text("[1, 2]")
    with pytest.raises(OnewordError, match="holds a JSON list"):
        Manifest.load(data)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text("{")
    with pytest.raises(OnewordError, match=r"summary\.json is not readable JSON") as e:
        _load_summary(tmp_path / "train")
    assert "train again" in e.value.hint


def test_a_manifest_in_another_encoding_or_with_settings_beside_its_concepts(tmp_path):
    from oneword.batch import load_concepts_manifest

    (tmp_path / "cat").mkdir()
    text = 'concepts:\n  - images: cat\n    token: "<cat-é>"\n    init_word: cat\n'
    (tmp_path / "u16.yaml").write_text(text, encoding="utf-16")  # with its byte-order mark, as Notepad saves it
    (tmp_path / "bom.yaml").write_text(text, encoding="utf-8-sig")
    for f in ("u16.yaml", "bom.yaml"):
        (entry,) = load_concepts_manifest(str(tmp_path / f))
        assert entry.token == "<cat-é>", f
    (tmp_path / "latin.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(OnewordError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at position \d+\)") as e:
        load_concepts_manifest(str(tmp_path / "latin.yaml"))
    assert "UTF-8" in e.value.hint
    (tmp_path / "steps.yaml").write_text("steps: 100\n" + text)
    with pytest.raises(OnewordError, match="has 'steps' beside `concepts:`, which it does not read"):
        load_concepts_manifest(str(tmp_path / "steps.yaml"))
    (tmp_path / "mapping.yaml").write_text('concepts:\n  images: cat\n  token: "<c>"\n  init_word: cat\n')
    with pytest.raises(OnewordError, match="is a mapping, not a list") as e:
        load_concepts_manifest(str(tmp_path / "mapping.yaml"))
    assert "- images:" in e.value.hint


def test_a_file_that_is_no_database_is_no_store_and_is_left_as_it_was(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    code, out = run(["concepts", "list", "--tracking-uri", notes], capsys)
    assert code == 2 and "is not a SQLite database" in out and "Traceback" not in out, out
    assert notes.read_text() == "my notes"


def test_an_embedding_of_nans_or_of_no_kind_is_refused(tmp_path):
    save_file({"<y>": torch.full((1, 32), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(OnewordError, match=r"nan\.safetensors holds non-finite values"):
        E.load(tmp_path / "nan.safetensors")
    (tmp_path / "notes.pt").write_text("some text")
    (tmp_path / "empty.pt").write_bytes(b"")
    for f, said in (("notes.pt", "neither safetensors nor torch's .pt/.bin"), ("empty.pt", "it is empty")):
        with pytest.raises(OnewordError, match="is not an embedding file") as e:
            E.load(tmp_path / f)
        assert said in e.value.message and "A1111 .pt" in e.value.hint


def test_values_no_setting_can_take_are_refused_by_name(cat_latents_dir, tmp_path, capsys):
    from oneword.catalogue import check_alias

    for option, value in (("--learning-rate", "inf"), ("--learning-rate", "nan"), ("--steps", "0")):
        code, out = run(["train", cat_latents_dir, "--token", "<q>", "--init-word", "cat", "-o", tmp_path / "t",
                         option, value], capsys)  # fmt: skip
        assert code == 2 and option.lstrip("-").replace("-", "_") in out and "Traceback" not in out, out
    assert not (tmp_path / "t").exists()
    for alias, said in (("bad alias!", "not one MLflow can hold"), ("latest", "reserved"), ("v3", "reserved")):
        with pytest.raises(OnewordError, match=said):
            check_alias(alias)
    check_alias("champion")
    check_alias("prüfung")  # letters of any script, as MLflow takes them


def test_the_summary_a_registration_reads_is_checked_too(tmp_path):
    from oneword.registry import register

    train, ev = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    ev.mkdir()
    (train / "summary.json").write_text(json.dumps({"concept": {"token": "<x>"}}))
    (ev / "metrics.json").write_text("{")
    with pytest.raises(OnewordError, match=r"metrics\.json is not readable JSON") as e:
        register(train, ev, tracking_uri=f"sqlite:///{tmp_path / 'r.db'}")
    assert "evaluate" in e.value.hint


def test_a_folder_of_photos_that_cannot_be_read_or_is_a_link_is_said_not_lost(tmp_path, monkeypatch):
    import os

    from oneword.images import preprocess

    from .conftest import DREAMBENCH

    photos = shutil.copytree(DREAMBENCH / "cat", tmp_path / "photos")
    shutil.copytree(DREAMBENCH / "dog", tmp_path / "elsewhere")
    (photos / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    locked = shutil.copytree(DREAMBENCH / "dog", photos / "locked")
    scandir = os.scandir

    def refusing(path=".", *args):  # as a folder of mode 000 is to anyone but root, which the tests may run as
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing)
    manifest = preprocess(photos, tmp_path / "data", resolution=32)
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in manifest.skipped}
    assert "cannot be read: check its permissions" in reasons["locked"]
    assert "a link to a folder, which is not followed" in reasons["linked"]
    assert len(manifest.images) == len([p for p in (DREAMBENCH / "cat").iterdir() if p.suffix == ".jpg"])


def test_a_templates_or_prompt_file_that_is_missing_or_empty_is_said_as_such(tmp_path):
    from oneword.evaluation.prompts import get_prompt_set
    from oneword.templates import get_templates

    (tmp_path / "empty.txt").write_text("\n\n")
    for read, what in ((get_templates, "template"), (get_prompt_set, "prompt")):
        with pytest.raises(OnewordError, match=f"{what} file '.*nofile.txt' not found"):
            read(str(tmp_path / "nofile.txt"))
        with pytest.raises(OnewordError, match=f"{what} file .*empty.txt is empty"):
            read(str(tmp_path / "empty.txt"))
        with pytest.raises(OnewordError, match=f"unknown {what} set 'nope'"):
            read("nope")


def test_an_unclosed_quote_is_said_where_it_begins_and_a_group_names_each_concept_once(cat_latents_dir, tmp_path,
                                                                                       capsys):
    from oneword.batch import load_concepts_manifest

    (tmp_path / "q.yaml").write_text('concepts:\n  - images: "cat\n    token: x\n    init_word: cat\n')
    with pytest.raises(OnewordError, match="quoted scalar that begins at line 2, column 13"):
        load_concepts_manifest(str(tmp_path / "q.yaml"))
    entry = f"  - name: a\n    latents: {cat_latents_dir}\n    token: '<a{{}}>'\n    init_word: cat\n"
    (tmp_path / "group.yaml").write_text("concepts:\n" + entry.format(1) + entry.format(2))
    code, out = run(["train", "--concepts", tmp_path / "group.yaml", "-o", tmp_path / "g"], capsys)
    assert code == 2 and "group.yaml names 'a' more than once" in out, out


def test_an_object_store_that_does_not_answer_or_refuses_is_said_in_a_line(s3_bucket, tmp_path, monkeypatch, capsys):
    """An S3 endpoint that is down, or an object it does not have: the error names the endpoint (the object) and
    the settings to check, not a traceback of urllib3's retries."""
    from .conftest import free_port

    code, said = run(["batch", f"s3://{s3_bucket}/no-such.yaml", "--dry-run"], capsys)
    assert code == 2 and f"the object store refused {s3_bucket}/no-such.yaml: NoSuchKey" in said, said
    assert "Traceback" not in said
    port = free_port()
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    code, said = run(["preprocess", "s3://photos/cat", "-o", tmp_path / "data"], capsys)
    assert code == 2 and f"could not reach 127.0.0.1:{port}" in said and "check S3_ENDPOINT_URL" in said, said
    assert "Traceback" not in said
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}/minio")  # behind a proxy, at a path
    code, said = run(["preprocess", "s3://photos/cat", "-o", tmp_path / "data"], capsys)
    assert code == 2 and "has a path (/minio), which S3 clients cannot use" in said, said
