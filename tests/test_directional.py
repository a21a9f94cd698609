"""Regularisers from the work after the paper: Directional TI (norm held, direction learned) and the cosine pull."""

import math

import pytest
import torch

from oneword.directional import DirectionalSGD, on_sphere, slerp, vocabulary_norm
from oneword.inversion import ConceptSpec, InversionTrainer, TrainConfig
from oneword.models import load_base_model

CAT = ConceptSpec(token="<cat-d>", init_word="cat")


def _train(model_dir, latents, steps=12, **cfg) -> InversionTrainer:
    tr = InversionTrainer(
        load_base_model(str(model_dir), parts=("unet",)),
        [(CAT, latents)],
        TrainConfig(steps=steps, checkpoint_every=0, **cfg),
    )
    tr.run(progress=False)
    return tr


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def test_riemannian_sgd_keeps_the_norm_and_turns_toward_the_optimum():
    # maximise w·e on a sphere of radius 2: the optimum is 2·w/|w|, reached in steps of lr radians at most
    torch.manual_seed(0)
    w = torch.randn(3, 16)
    e = torch.nn.Parameter(on_sphere(torch.randn(3, 16), 2.0))
    opt = DirectionalSGD([{"params": [e], "radius": 2.0, "mean_direction": on_sphere(w, 1.0)}], lr=0.05, kappa=0)
    angles = []
    for _ in range(200):
        before = e.detach().clone()
        (-(w * e).sum()).backward()
        opt.step()
        opt.zero_grad()
        angles.append(torch.arccos(torch.nn.functional.cosine_similarity(before, e.detach(), dim=-1).clamp(-1, 1)))
        assert torch.allclose(e.norm(dim=-1), torch.full((3,), 2.0), atol=1e-5)
    assert max(a.max().item() for a in angles) <= 0.05 + 1e-4  # a step turns a row by at most the learning rate
    # far from the optimum a step turns a row by the full learning rate: the gradient's radial part, which the
    # retraction would undo, is projected away first (without the projection the turn is visibly shorter)
    assert all(a.min().item() == pytest.approx(0.05, rel=0.02) for a in angles[:5])
    assert _cos(e.detach(), w) > 0.999


def test_the_von_mises_fisher_prior_alone_pulls_toward_its_mean():
    mu = on_sphere(torch.randn(1, 8, generator=torch.Generator().manual_seed(1)), 1.0)
    e = torch.nn.Parameter(on_sphere(torch.randn(1, 8, generator=torch.Generator().manual_seed(2)), 0.5))
    opt = DirectionalSGD([{"params": [e], "radius": 0.5, "mean_direction": mu}], lr=0.05, kappa=1.0)
    start = _cos(e.detach(), mu)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        e.grad = 1e-6 * torch.randn(e.shape, generator=g)  # a negligible data term: the prior's -κμ moves it
        opt.step()
    assert start < 0.9 and _cos(e.detach(), mu) > 0.99
    before = e.detach().clone()
    e.grad = torch.zeros_like(e)  # no data gradient at all (a progressive vector not yet on): it stays
    opt.step()
    assert torch.equal(e.detach(), before)


def test_directional_ti_holds_the_vocabulary_norm_and_learns_a_direction(tiny_model_dir, cat_latents):
    tr = _train(tiny_model_dir, cat_latents, direction_only=True, direction_lr=0.05, vmf_kappa=0.0)
    c = tr.concepts[0]
    m = vocabulary_norm(tr.splices[0].base.weight)
    assert torch.allclose(c.param.detach().norm(dim=-1), torch.full((1,), m), rtol=1e-5)
    turned = math.acos(min(1.0, _cos(c.param.detach(), c.init)))
    assert 0.05 < turned <= 12 * 0.05 + 1e-4  # it learned, at most lr radians a step
    plain = _train(tiny_model_dir, cat_latents)
    # plain TI's vector leaves the vocabulary's norm (it is free to); DTI's cannot
    assert abs(plain.concepts[0].param.detach().norm().item() - m) > abs(c.param.detach().norm().item() - m)


def test_a_strong_prior_keeps_directional_ti_near_the_initializer(tiny_model_dir, cat_latents):
    free = _train(tiny_model_dir, cat_latents, direction_only=True, direction_lr=0.05, vmf_kappa=0.0)
    held = _train(tiny_model_dir, cat_latents, direction_only=True, direction_lr=0.05, vmf_kappa=1e3)
    assert _cos(held.concepts[0].param.detach(), held.concepts[0].init) > _cos(
        free.concepts[0].param.detach(), free.concepts[0].init
    )


def test_cosine_pull_holds_the_direction_and_leaves_the_norm(tiny_model_dir, cat_latents):
    free = _train(tiny_model_dir, cat_latents, steps=30)
    pulled = _train(tiny_model_dir, cat_latents, steps=30, init_cos=1e3)
    f, p = free.concepts[0], pulled.concepts[0]
    assert _cos(p.param.detach(), p.init) > _cos(f.param.detach(), f.init)
    assert _cos(p.param.detach(), p.init) > 0.99 > _cos(f.param.detach(), f.init)
    assert not torch.allclose(p.param.detach().norm(), p.init.norm(), rtol=1e-3)  # the norm is left free


def test_directional_run_resumes_bit_for_bit(tiny_model_dir, cat_latents, tmp_path):
    cfg = dict(direction_only=True, direction_lr=0.05, checkpoint_every=5)
    whole = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)), [(CAT, cat_latents)], TrainConfig(steps=10, **cfg)
    )
    whole.run(tmp_path / "a", progress=False)
    half = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)), [(CAT, cat_latents)], TrainConfig(steps=5, **cfg)
    )
    half.run(tmp_path / "b", progress=False)
    rest = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)), [(CAT, cat_latents)], TrainConfig(steps=10, **cfg)
    )
    rest.run(tmp_path / "b", resume=True, progress=False)
    assert torch.equal(whole.concepts[0].param, rest.concepts[0].param)


def test_resume_refuses_a_checkpoint_of_the_other_optimiser(tiny_model_dir, cat_latents, tmp_path):
    from oneword.errors import OnewordError

    plain = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)),
        [(CAT, cat_latents)],
        TrainConfig(steps=2, checkpoint_every=2),
    )
    plain.run(tmp_path, progress=False)
    directional = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)),
        [(CAT, cat_latents)],
        TrainConfig(steps=4, checkpoint_every=2, direction_only=True),
    )
    with pytest.raises(OnewordError, match="without direction_only"):
        directional.run(tmp_path, resume=True, progress=False)


def test_progressive_vectors_join_on_the_sphere(tiny_model_dir, cat_latents):
    two = ConceptSpec(token="<cat-p>", init_word="cat", n_vectors=2)
    tr = InversionTrainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)),
        [(two, cat_latents)],
        TrainConfig(steps=6, checkpoint_every=0, progressive_every=3, direction_only=True, direction_lr=0.05),
    )
    tr.run(progress=False)
    m = vocabulary_norm(tr.splices[0].base.weight)
    assert torch.allclose(tr.concepts[0].param.detach().norm(dim=-1), torch.full((2,), m), rtol=1e-5)
    assert _cos(tr.concepts[0].param.detach()[1:], tr.concepts[0].init[1:]) < 1 - 1e-6  # the second one learned


def test_slerp_runs_along_the_sphere():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(1.5)  # the norms blend linearly
    assert mid[0, 0].item() == pytest.approx(mid[0, 1].item())  # half way in angle


def test_blend_of_two_concepts_is_an_embedding_file_like_any_other(tmp_path, capsys):
    from oneword import embeddings as E
    from oneword.cli import main
    from oneword.errors import OnewordError

    a = E.Embedding("<a>", on_sphere(torch.randn(1, 32), 0.4), {"model_fingerprint": "f"})
    b = E.Embedding("<b>", on_sphere(torch.randn(1, 32), 0.4), {"model_fingerprint": "f"})
    E.save(a, tmp_path / "a.safetensors")
    E.save(b, tmp_path / "b.safetensors")
    main(["blend", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--token", "<ab>",
          "-o", str(tmp_path / "ab.safetensors"), "--t", "0.25"])  # fmt: skip
    ab = E.load(tmp_path / "ab.safetensors")
    assert ab.token == "<ab>" and ab.meta["blend_of"] == "<a>,<b>"
    assert torch.allclose(ab.vectors, slerp(a.vectors, b.vectors, 0.25), atol=1e-6)
    assert ab.vectors.norm().item() == pytest.approx(0.4, rel=1e-4)  # on the sphere of the two
    with pytest.raises(OnewordError, match="differ in shape"):
        E.blend(a, E.Embedding("<c>", torch.randn(2, 32)), 0.5, "<x>")
    with pytest.raises(OnewordError, match="between 0 and 1"):
        E.blend(a, b, 1.5, "<x>")
