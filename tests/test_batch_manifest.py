"""The concepts manifest of a batch: what it reads, and how it says what is wrong with it."""

from pathlib import Path

import pytest

from oneword.batch import load_concepts_manifest
from oneword.errors import OnewordError

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_example_reads():
    entries = load_concepts_manifest(str(ROOT / "k8s" / "examples" / "concepts.yaml"))
    assert [e.token for e in entries][:2] == ["<my-cat>", "<red-mug>"]
    assert all(e.images.startswith("s3://") for e in entries)  # an s3 prefix is kept as written


def test_local_photos_are_found_beside_the_manifest_wherever_it_is_read_from(tmp_path, monkeypatch):
    manifest = tmp_path / "batch" / "concepts.yaml"
    manifest.parent.mkdir()
    manifest.write_text("- images: photos/cat\n  token: <cat-m>\n  init_word: cat\n")  # a bare list reads too
    monkeypatch.chdir(tmp_path)
    (entry,) = load_concepts_manifest("batch/concepts.yaml")
    assert entry.images == str(tmp_path / "batch" / "photos" / "cat")
    # so is a file of templates; `~` is the home folder; a template set's name is left as it is
    manifest.write_text(
        "- {images: ~/photos/cat, token: <cat-m>, init_word: cat, templates: cat-templates.txt}\n"
        "- {images: /abs/dog, token: <dog-m>, init_word: dog, templates: style}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cat, dog = load_concepts_manifest("batch/concepts.yaml")
    assert (cat.images, cat.templates) == (
        str(tmp_path / "home" / "photos" / "cat"),
        str(manifest.parent / "cat-templates.txt"),
    )
    assert (dog.images, dog.templates) == ("/abs/dog", "style")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concepts: []\n", "lists no concepts"),
        ("concepts: [\n", r"manifest .*concepts.yaml is not valid YAML, line 2, column 1: expected the node"),
        ("concepts:\n  - images: a\n   token: <a>\n", r"not valid YAML, line 3, column 4: expected <block end>"),
        ("concepts:\n  - {images: a, token: <a>}\n", r"concept #1 \(<a>\) of .*: missing field 'init_word'"),
        ("concepts:\n  - {images: a, token: <a>, init_word: cat, learning_rat: 1}\n",
         r"unknown field 'learning_rat' \(did you mean 'learning_rate'\?\)"),
        ("concepts:\n  - {images: a, token: <a>, init_word: cat, n_vectors: two}\n", r"n_vectors: .* \(got 'two'\)"),
        ("concept:\n  - {images: a}\n", "lists no concepts: it has no `concepts:` key, but 'concept'"),
        ("concepts:\n  - {images: '', token: <a>, init_word: cat}\n", r"concept #1 \(<a>\) of .*: images: is empty"),
        ("concepts:\n  - {images: a, token: '<my cat>', init_word: cat}\n", r"token: '<my cat>' is not one word"),
        ("concepts:\n  - {images: a, token: <a>, init_word: ''}\n", r"concept #1 \(<a>\) of .*: init_word: is empty"),
        ("concepts:\n  - a\n", "concept #1 of .* is 'a', not a mapping of fields"),
        ("concepts:\n  - {images: a, token: <a>, init_word: cat, no: 1}\n", "key False is not a field's name"),
        (
            "concepts:\n  - {images: a, token: <a>, init_word: cat}\n  - {images: b, token: <b>, init_word: dog,"
            ' name: "bob\'s cat"}\n',
            "concept #2 of .*: registered-model name",
        ),
        (
            "concepts:\n  - {images: a, token: <a>, init_word: cat}\n  - {images: b, token: <b>, init_word: dog}\n"
            "  - {images: c, token: <a>, init_word: dog}\n",
            "concepts #1 and #3 of .* share the token '<a>'",
        ),
        (
            "concepts:\n  - {images: a, token: <a>, init_word: cat, name: x}\n"
            "  - {images: b, token: <b>, init_word: dog, name: x}\n",
            "concepts #1 and #2 of .* share the name 'x'",
        ),
        (  # a prompt matches an added token in any case: one of the two would never train
            "concepts:\n  - {images: a, token: <Cat-Q>, init_word: cat, name: x1}\n"
            "  - {images: b, token: <cat-q>, init_word: cat, name: x2}\n",
            "concepts #1 and #2 of .* tokens '<Cat-Q>' and '<cat-q>' cannot be told apart",
        ),
        (  # diffusers reads <a>_1 as <a>'s second vector
            "concepts:\n  - {images: a, token: <a>, init_word: cat}\n  - {images: b, token: <a>_1, init_word: dog}\n",
            "concepts #1 and #2 of .* tokens '<a>' and '<a>_1' cannot be told apart",
        ),
    ],
)
def test_a_bad_manifest_names_the_entry_and_what_to_do(text, message, tmp_path):
    manifest = tmp_path / "concepts.yaml"
    manifest.write_text(text)
    with pytest.raises(OnewordError, match=message) as bad:
        load_concepts_manifest(str(manifest))
    assert str(manifest) in bad.value.message


def test_a_run_takes_the_changed_concepts_first_then_those_that_waited_longest():
    """`this_run_takes`: what a cluster run trains of the concepts to train, at most its limit."""
    from oneword.batch import JUDGED_KEY, this_run_takes

    def names(concepts):
        return [c["name"] for c in concepts]

    todo = [{"name": n, JUDGED_KEY: True} for n in "abcd"]
    assert this_run_takes(todo, 0) == (todo, {}) == this_run_takes(todo, -1)  # no limit (a UI typo is none too)
    now, later = this_run_takes(todo, 2)
    assert names(now) == ["a", "b"] and later == {"c": 1, "d": 1}
    now, later = this_run_takes(todo, 2, {"c": 1, "d": 3})  # d waited longest, then c
    assert names(now) == ["c", "d"] and later == {"a": 1, "b": 1}
    # a concept the lookup could not tell of (which may well be unchanged) comes after every one found changed
    untold = [{"name": "u"}, *todo]
    now, later = this_run_takes(untold, 4, {"u": 5})
    assert names(now) == ["a", "b", "c", "d"] and later == {"u": 6}


def test_every_problem_of_a_manifest_is_told_at_once(tmp_path):
    """A manifest of many concepts with three mistakes was refused three times over, a mistake each."""
    from oneword.batch import load_concepts_manifest

    manifest = tmp_path / "concepts.yaml"
    manifest.write_text(
        "concepts:\n"
        "  - {images: a, token: '<a>', init_word: cat}\n"
        "  - {images: b, token: '<b>', init_wrod: dog}\n"
        "  - just a string\n"
        "  - {images: c, token: '<a>', init_word: cat}\n"
        "  - {images: d, token: '<D>', init_word: dog}\n"
        "  - {images: e, token: '<d>', init_word: dog}\n"
        "  - {images: f, token: '<b>'}\n"
    )
    with pytest.raises(OnewordError) as e:
        load_concepts_manifest(str(manifest))
    lines = e.value.message.splitlines()
    assert lines[0] == f"6 problems in concepts manifest {manifest}:", lines
    assert "share the token '<a>'" in lines[1] and "concepts #1 and #4" in lines[1]  # in the file's order
    assert "#2 (<b>)" in lines[2] and "'init_wrod' (did you mean 'init_word'?)" in lines[2]
    # an entry with a mistake of its own still has its token checked against the others'
    assert "concepts #2 and #7 share the token '<b>'" in lines[3]
    assert "#3" in lines[4] and "not a mapping of fields" in lines[4]
    assert "#5 and #6" in lines[5] and "cannot be told apart" in lines[5]
    assert "#7 (<b>)" in lines[6] and "missing field 'init_word'" in lines[6] and len(lines) == 7  # '<a>' said once
    hint = e.value.hint
    assert "give each concept its own token" in hint and hint.count("optional:") == 1 and "--dry-run" in hint
    assert str(manifest) not in "".join(lines[1:])  # the file is named once
