"""Directional Textual Inversion's update: learn each vector's direction at a fixed, in-distribution norm.

Kim, Park, Hong and Shim, "Directional Textual Inversion for Personalized Text-to-Image Generation" (arXiv
2512.13672, ICLR 2026). Textual inversion lets a learned vector's norm grow far beyond the vocabulary's (theirs
reached 20 against about 0.4 in CLIP's table), which drowns the position embedding and the rest of the prompt in
the pre-norm text encoder. DTI writes the vector as e = m·v with m fixed at the vocabulary's mean norm and v on the
unit sphere, and updates v by Riemannian SGD: the gradient is projected onto the sphere's tangent plane at v, a
step is taken, and v is put back on the sphere (retraction). Direction learning is MAP estimation under a von
Mises-Fisher prior centred on the initializer's direction μ, log p(v) = κ μ·v + const, whose gradient is the
constant κμ. As in the authors' code (their `--beta 0` default), each step has unit length in the tangent plane,
so the learning rate is an angle in radians per step.

Here the trained tensor stays the embedding e itself (so the splice, checkpoints and exported files are unchanged);
the optimiser works on v = e/m and writes m·v back.
"""

from __future__ import annotations

import torch


class DirectionalSGD(torch.optim.Optimizer):
    """Riemannian SGD of each row's direction on a sphere of fixed radius, with a von Mises-Fisher prior.

    Args:
        params: one parameter group per trained table, each a dict with `params` ([e], rows to train), `radius`
            (the fixed norm m, a float) and `mean_direction` (μ, the prior's unit directions, like e).
        lr: the angle, in radians, that each row turns per step (DTI's code: 0.01).
        kappa: the prior's concentration κ (DTI's code: 1e-4); 0 turns the prior off.
    """

    def __init__(self, params, lr: float = 0.01, kappa: float = 1e-4, eps: float = 1e-12):
        if lr <= 0 or kappa < 0:
            raise ValueError(f"need lr > 0 and kappa >= 0, not lr={lr}, kappa={kappa}")
        super().__init__(params, {"lr": lr, "kappa": kappa, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every row with a gradient (the module docstring has the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m, mu = group["radius"], group["mean_direction"]
            for e in group["params"]:
                if e.grad is None:
                    continue
                v = e.float() / m
                g = e.grad.float() * m  # dL/dv, since e = m v
                g = g - group["kappa"] * mu.to(g)  # the negative log prior's gradient is -κμ
                g = g - (g * v).sum(-1, keepdim=True) * v  # onto the tangent plane at v
                g = g / g.norm(dim=-1, keepdim=True).clamp_min(group["eps"])  # unit step (DTI's beta = 0)
                # a row with no data gradient (a progressive vector not yet switched on) stays where it is
                g = g * e.grad.ne(0).any(dim=-1, keepdim=True)
                v = v - group["lr"] * g
                v = v / v.norm(dim=-1, keepdim=True)  # retraction onto the sphere
                e.copy_(m * v)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then each prior direction back beside its rows (a checkpoint is read onto the CPU)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["mean_direction"] = group["mean_direction"].to(group["params"][0].device)


def on_sphere(rows: torch.Tensor, radius: float) -> torch.Tensor:
    """`rows` rescaled to norm `radius` (the start of a directional run: the initializer's direction at m)."""
    return rows / rows.norm(dim=-1, keepdim=True) * radius


def vocabulary_norm(table: torch.Tensor) -> float:
    """The mean norm of a token-embedding table's rows: DTI's in-distribution magnitude (its `token_scale=mean`)."""
    return table.detach().float().norm(dim=-1).mean().item()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two vectors (rows), with the norm interpolated linearly.

    What DTI's directions make meaningful: a blend of two learned concepts that stays at the vocabulary's norm.
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    u = (torch.sin((1 - t) * omega) / so) * ua + (torch.sin(t * omega) / so) * ub
    return u * ((1 - t) * na + t * nb)
