"""`oneword demo`: the README's first command, end to end on the toy world (its own file, so that under
`make test`'s parallel workers it runs beside the toy world's slow proofs, not after them)."""

import pytest


@pytest.mark.slow
def test_demo_registers_the_concept_and_writes_what_it_prints(tmp_path, monkeypatch, capsys):
    from oneword.cli import main

    monkeypatch.chdir(tmp_path)
    main(["demo", "--steps", "50", "--n-images", "2"])
    out = capsys.readouterr().out
    assert "registered purple-star/1@champion" in " ".join(out.split())
    # the new word spells out no concept: the base model cannot draw it from its parts
    assert "called <my-shape>" in " ".join(out.split())
    assert (tmp_path / "demo-out" / "purple-star.png").stat().st_size > 0
    assert "train" in (tmp_path / "demo-out" / "pipeline.log").read_text()  # the steps' logs, as printed


def test_a_demo_option_out_of_range_is_said_before_the_folder_is_touched(tmp_path, capsys):
    """A bogus concept left a folder holding only the demo's marker; --n-images 0 wrote the photos, then failed
    pointing at `oneword run --help`."""
    from oneword.cli import main

    for args, said in ((["--concept", "bogus"], "unknown toy-world concept 'bogus'"),
                       (["--n-images", "0"], "n_images=0: Input should be greater than or equal to 1")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["demo", "--out", str(tmp_path / "d"), *args])
        out = " ".join(capsys.readouterr().err.split())
        assert e.value.code == 2 and said in out and "oneword run --help" not in out, out
        assert not (tmp_path / "d").exists()
