"""The Textual Inversion trainer (Gal et al. 2022, arXiv 2208.01618).

One recipe class, `InversionTrainer`: setup (tokens, splice, optimiser), `train_step`, `run` (loop, logging,
checkpoints, resume) and `embeddings`. Only the new token rows learn; the text encoder, UNet and token table
stay frozen, and gradients flow through them to the new rows alone.

The loss is the LDM loss (Rombach et al. 2022, Eq. 2), with epsilon or v targets (Salimans & Ho 2022, Sec. 4)
as the model's scheduler config says. Latents come from the cache (`oneword.latents`): `mean + std * eps`,
the same draw as encoding the image at every step.

SDXL has two text encoders: each concept then has one trainable table per encoder (`param`: clip_l, `param_2`:
clip_g), each initialised from its own encoder's vocabulary, and the UNet is conditioned as diffusers' SDXL
pipeline conditions it (`oneword.conditioning`).

A batch may hold samples of several concepts (a batch job trains its shard's concepts together): each has its
own trainable parameter, learning rate, loss and curve, and the loss is the sum of the concepts' mean losses, so
each parameter gets exactly the gradient it would get training alone. A concept whose loss turns non-finite
stops there (its early end) while the others go on. (In fp16 the concepts share one loss scale: a step on
which one of them overflows is skipped for all, until that concept is stopped at the next report.)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oneword import __version__, checkpoints, distributed
from oneword.conditioning import TextConditioning, default_time_ids, tokenize
from oneword.config import ConceptSpec, TrainConfig
from oneword.device import DTYPES, device_precision, resolve_device
from oneword.directional import DirectionalSGD, on_sphere, vocabulary_norm
from oneword.embeddings import Embedding
from oneword.errors import NonFiniteLossError, OnewordError
from oneword.latents import LatentSet
from oneword.models import LoadedModel
from oneword.profiles import profile_of
from oneword.templates import get_templates
from oneword.tokens import (
    add_placeholder_tokens,
    check_new_token,
    expand_placeholder,
    initializer_id,
    install_splice,
)

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
# torch.compile's backend. Tests on CPU swap in "aot_eager": the same graph capture (so a host sync or graph
# break still fails there), without minutes of C++ code generation.
COMPILE_BACKEND = "inductor"


@dataclass
class _Concept:
    spec: ConceptSpec
    mean: torch.Tensor  # (N, 2, C, h, w) on the device
    std: torch.Tensor
    time_ids: torch.Tensor  # (N, 2, 6): SDXL's size and crop conditioning of each image and its mirror
    token_ids: list[int]
    inits: list[torch.Tensor]  # per text encoder: (n_vectors, width)
    params: list[torch.nn.Parameter]  # per text encoder, initialised from `inits`
    prompt_ids: dict[int, torch.Tensor]  # n_active -> (n_templates, n_encoders, 77)
    meta: dict = field(default_factory=dict)
    failed: str = ""  # why it stopped early (a non-finite loss); empty while it trains

    @property
    def param(self) -> torch.nn.Parameter:
        """The first text encoder's table (SDXL: clip_l)."""
        return self.params[0]

    @property
    def init(self) -> torch.Tensor:
        return self.inits[0]

    @property
    def param_2(self) -> torch.nn.Parameter | None:
        """SDXL's second table (clip_g), or None."""
        return self.params[1] if len(self.params) > 1 else None


@dataclass
class TrainResult:
    """What a run produced."""

    embeddings: list[Embedding]  # the concepts that did not fail, in order
    curve: list[dict]  # the first concept's curve (the only one when training one concept)
    steps: int
    seconds: float
    steps_per_second: float
    last_checkpoint: str | None
    curves: dict[str, list[dict]] = field(default_factory=dict)  # token -> curve
    failed: dict[str, str] = field(default_factory=dict)  # token -> why it stopped early
    steps_run: int = 0  # steps this run trained (0: resumed from checkpoints that were already at the end)
    ended_early_at: int | None = None  # the step at which every embedding had settled (`TrainConfig.early_end`)


def check_progressive(spec: ConceptSpec, config: TrainConfig) -> None:
    """Refuse a concept whose last vector would switch on (progressive_every) after training ends.

    Raises:
        OnewordError: naming the limits that would fit.
    """
    every, steps, n = config.progressive_every, config.steps, spec.n_vectors
    if every and n > 1 and (n - 1) * every >= steps:
        # Vector k switches on at step k * every: a later one would be exported as its initializer, untrained.
        raise OnewordError(
            f"{spec.token!r}: vector {n} of {n} switches on at step {(n - 1) * every} (progressive_every="
            f"{every}), but training ends at step {steps}: it would be exported untrained",
            hint=f"use at most {(steps - 1) // every + 1} vectors, progressive_every at most "
            f"{(steps - 1) // (n - 1)}, or more than {(n - 1) * every} steps",
        )


def check_concept(tokenizer, spec: ConceptSpec) -> None:
    """Raise `OnewordError` if `spec` cannot be trained in a model with this tokenizer (before any work): the
    first of its `concept_problems`."""
    if problems := concept_problems(tokenizer, spec):
        raise problems[0]


def concept_problems(tokenizer, spec: ConceptSpec) -> list[OnewordError]:
    """Every reason `spec` cannot be trained in a model with this tokenizer: its token, its initializer word, its
    templates' room for its vectors (a preflight lists them all, not one per run)."""
    problems = []
    for check in (
        lambda: check_new_token(tokenizer, spec.token, spec.n_vectors),
        lambda: initializer_id(tokenizer, spec.init_word),
        lambda: _check_room(tokenizer, spec),
    ):
        try:
            check()
        except OnewordError as e:
            problems.append(e)
    return problems


def _check_room(tokenizer, spec: ConceptSpec) -> None:
    templates = get_templates(spec.templates)
    # the text encoder reads model_max_length tokens, start and end among them: a vector past them is in no
    # prompt, gets no gradient, and would be exported as its initializer, shrunk by weight decay
    room = tokenizer.model_max_length - 2
    words, longest = max((len(tokenizer(t.format(""), add_special_tokens=False).input_ids), t) for t in templates)
    if words + spec.n_vectors > room:
        raise OnewordError(
            f"{spec.token!r}: {spec.n_vectors} vectors and the {words} other tokens of the template {longest!r} "
            f"are more than the {room} the text encoder reads: its last vectors would never train",
            hint=f"use at most {max(room - words, 1)} vectors, or templates with fewer words",
        )


class InversionTrainer:
    """Textual inversion of one or more concepts in a frozen base model.

    Args:
        model: a `LoadedModel` loaded with its UNet (the VAE is not needed).
        concepts: `(spec, latents)` pairs; each concept gets its own trainable (n_vectors, width) parameter.
        config: optimisation settings.
    """

    def __init__(self, model: LoadedModel, concepts: Sequence[tuple[ConceptSpec, LatentSet]], config: TrainConfig):
        if model.unet is None:
            raise OnewordError("training needs the base model's UNet, which was not loaded")
        if not concepts:
            raise OnewordError("nothing to train: no concept given")
        self.profile = profile_of(model)  # what the settings and concepts leave unset comes from here
        config = config.resolved(self.profile)
        self.model, self.config = model, config
        device = resolve_device(config.device)
        # several processes: each computes a share of every step's batch
        self.world = distributed.current(cpu=device.type == "cpu")
        self.device = distributed.device_for(device, self.world)
        self.precision = device_precision(config.precision, self.device)
        unet_dtype = DTYPES[self.precision]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.text_encoder = model.text_encoder.to(self.device)
        self.text_encoders = [self.text_encoder]
        self.tokenizers = [model.tokenizer]
        if model.text_encoder_2 is not None:  # SDXL
            self.text_encoders.append(model.text_encoder_2.to(self.device))
            self.tokenizers.append(model.tokenizer_2)
        self.conditioning = TextConditioning(self.text_encoders)
        self.unet = model.unet.to(self.device)
        if self.unet.dtype != unet_dtype:
            self.unet = self.unet.to(unet_dtype)
        if self.device.type == "cuda":
            if self.precision != "fp32":  # fp32 asked for (a loss that overflowed, say) is fp32, not TF32's 10 bits
                torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls outside autocast
                torch.backends.cudnn.allow_tf32 = True
            self.unet = self.unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; there is no dropout to worry about
        self.unet_forward = (
            torch.compile(self.unet, backend=COMPILE_BACKEND) if config.compile == "default" else self.unet
        )
        self._losses = self._per_sample_losses
        if config.compile == "max":
            # One graph from prompt ids to per-sample losses, forward and backward: with static shapes and no host
            # sync in it, inductor's reduce-overhead mode replays it as CUDA graphs (no per-kernel launch cost).
            graphs = self.device.type == "cuda" and COMPILE_BACKEND == "inductor"
            self._losses = torch.compile(
                self._per_sample_losses,
                fullgraph=True,
                backend=COMPILE_BACKEND,
                **({"mode": "reduce-overhead"} if graphs else {}),
            )
        self.splices = [install_splice(te) for te in self.text_encoders]
        self.concepts = [self._add_concept(spec, latents) for spec, latents in concepts]
        if config.compile == "max":
            with torch.no_grad():  # first calls install transformers' output hooks, which graph capture cannot trace
                c = self.concepts[0]
                self.conditioning(c.prompt_ids[1][:1], c.time_ids[:1, 0])

        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(model.scheduler_config)
        self.num_timesteps = sched.config.num_train_timesteps
        ac = sched.alphas_cumprod.to(self.device, torch.float32)
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise OnewordError(
                f"prediction type {self.prediction_type!r} is not supported",
                hint="use a model whose scheduler predicts epsilon or v",
            )

        self.optimizer = self._optimizer()
        self.gen = torch.Generator("cpu").manual_seed(config.seed)  # which image, flip, template
        self.gen_device = torch.Generator(self.device).manual_seed(config.seed + 1)  # latents, noise, t
        self.curves: dict[str, list[dict]] = {c.spec.token: [] for c in self.concepts}
        self.step = 0
        self._step_now = 0
        self.ended_early_at: int | None = None
        self._snapshots: dict[int, list[torch.Tensor]] = {}  # step -> the vectors then (for early_end)
        self._scale_at_report: float | None = None  # fp16's loss scale at the last report

    @property
    def autocast(self) -> torch.autocast:
        """A context that runs the UNet in the training precision (a new one per use)."""
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")

    @property
    def curve(self) -> list[dict]:
        """The first concept's curve: `[{"step", "loss", "embedding_norm"}]`."""
        return self.curves[self.concepts[0].spec.token]

    @property
    def active(self) -> list[_Concept]:
        """The concepts still training (not stopped by a non-finite loss)."""
        return [c for c in self.concepts if not c.failed]

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW over every concept's rows; with `direction_only`, DTI's Riemannian SGD (`oneword.directional`)."""
        cfg = self.config
        if not cfg.direction_only:
            return torch.optim.AdamW(
                [{"params": c.params, "lr": cfg.lr_for(c.spec)} for c in self.concepts],
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                fused=self.device.type == "cuda",  # one kernel for every concept's rows; CPU keeps torch's default
            )
        groups = []
        for c in self.concepts:
            for param, init, radius in zip(c.params, c.inits, self.radii):
                with torch.no_grad():
                    param.copy_(on_sphere(init, radius))  # the initializer's direction at the vocabulary's norm
                groups.append({"params": [param], "radius": radius, "mean_direction": on_sphere(init, 1.0)})
        return DirectionalSGD(groups, lr=cfg.direction_lr, kappa=cfg.vmf_kappa)

    @functools.cached_property
    def radii(self) -> list[float]:
        """Per text encoder, the norm Directional TI holds its vectors at: the vocabulary's mean."""
        return [vocabulary_norm(splice.base.weight) for splice in self.splices]

    def _add_concept(self, spec: ConceptSpec, latents: LatentSet) -> _Concept:
        check_progressive(spec, self.config)
        spec = spec.resolved(self.profile)
        for tok in self.tokenizers:  # whichever way training was reached: `oneword train`, a group, the library
            check_concept(tok, spec)
        inits, params, token_ids = [], [], []
        for tok, splice in zip(self.tokenizers, self.splices):
            init_id = initializer_id(tok, spec.init_word)
            offset = sum(p.shape[0] for p in splice.vectors)
            if len(tok) != splice.n_base + offset:
                # tokens added earlier without rows of their own would shift the id -> row mapping
                raise OnewordError(
                    f"tokenizer has {len(tok)} entries but the embedding table {splice.n_base + offset}",
                    hint="load a fresh base model",
                )
            ids = add_placeholder_tokens(tok, spec.token, spec.n_vectors)
            if ids[0] != splice.n_base + offset:
                raise OnewordError(f"unexpected token id {ids[0]} for {spec.token!r}")
            # the initializer's row alone, as diffusers starts (the paper's code started from the row plus
            # position 0's embedding, which the text encoder adds again wherever the token stands)
            init = splice.base.weight[init_id].detach().float().expand(spec.n_vectors, -1).clone().to(self.device)
            inits.append(init)
            params.append(splice.add(init))
            token_ids.append(ids)
        templates = get_templates(spec.templates)
        prompt_ids = {
            n_active: tokenize(
                self.tokenizers, [t.format(expand_placeholder(spec.token, n_active)) for t in templates], self.device
            )
            for n_active in range(1, spec.n_vectors + 1)
        }
        return _Concept(
            spec,
            latents.mean.to(self.device),
            latents.std.to(self.device),
            latents.time_ids_or_default().to(self.device),
            token_ids[0],
            inits,
            params,
            prompt_ids,
            {
                "scaling_factor": latents.scaling_factor,
                "shift_factor": latents.shift_factor,
                "image_sha256": latents.image_sha256,
            },
        )

    def n_active(self, step: int) -> int:
        """Vectors in use at `step` under the progressive schedule (all of them when it is off)."""
        every = self.config.progressive_every
        return 10**9 if every == 0 else 1 + step // every

    @torch.no_grad()
    def _activate_vectors(self, step: int) -> None:
        # A vector that joins now starts from the initializer, whatever weight decay did to the idle row.
        every = self.config.progressive_every
        if every and step > 0 and step % every == 0:
            k = step // every
            for c in self.concepts:
                for param, init, radius in zip(c.params, c.inits, self.radii):
                    if k < param.shape[0]:
                        param[k] = on_sphere(init[k], radius) if self.config.direction_only else init[k]
                        # and its optimiser moments start from zero: built while the row was idle (the L2 pull
                        # on a row weight decay moved), they would push it off its initializer. The step count
                        # is the whole parameter's, so its first updates are Adam's later-step size, not its
                        # first step's
                        for moment in self.optimizer.state.get(param, {}).values():
                            if torch.is_tensor(moment) and moment.shape == param.shape:
                                moment[k] = 0

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one batch, active concepts concatenated: latents z0 (B, C, h, w), prompt ids (B, n_encoders, 77)
        and the images' time ids (B, 6)."""
        cfg, z, ids, sizes = self.config, [], [], []
        for c in self.active:
            b = cfg.batch_size
            # drawn with replacement, each step afresh (the references shuffle epochs of 100 repeats: the same in
            # expectation, and no epoch boundary to keep across a resume)
            img = torch.randint(c.mean.shape[0], (b,), generator=self.gen)
            flip = (torch.rand(b, generator=self.gen) < cfg.flip_p).long()
            table = c.prompt_ids[min(self.n_active(step), c.spec.n_vectors)]
            tpl = torch.randint(table.shape[0], (b,), generator=self.gen)
            img, flip, tpl = (self._to_device(x) for x in (img, flip, tpl))
            mean, std = c.mean[img, flip], c.std[img, flip]
            eps = torch.randn(mean.shape, generator=self.gen_device, device=self.device)
            z.append((mean + std * eps - c.meta["shift_factor"]) * c.meta["scaling_factor"])
            ids.append(table[tpl])
            sizes.append(c.time_ids[img, flip])
        return torch.cat(z), torch.cat(ids), torch.cat(sizes)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Copy a CPU draw to the device without waiting for the GPU: a copy from pageable memory would first
        synchronise the stream, stalling the host on every step."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _per_sample_losses(
        self, z0: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The LDM loss of each sample (B,): noise the latents, condition on the prompts, predict, compare."""
        a, s = self.sqrt_ac[t].view(-1, 1, 1, 1), self.sqrt_1m_ac[t].view(-1, 1, 1, 1)
        noisy = a * z0 + s * noise
        target = noise if self.prediction_type == "epsilon" else a * noise - s * z0
        with self.autocast:
            hidden, added = self.conditioning(ids, time_ids)  # (B, 77, width), SDXL's pooled text and time ids
            pred = self.unet_forward(
                noisy.to(self.unet.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
            )[0]
        return F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))

    def concept_losses(
        self,
        z0: torch.Tensor,
        ids: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each active concept's LDM loss (K,) for a batch drawn by `_batch` (K concepts x batch_size rows).

        Latents `z0` (B, C, h, w), prompts `ids` (B, n_encoders, 77), `noise` like `z0`, timesteps `t` (B,),
        and for SDXL the images' `time_ids` (B, 6).
        """
        active = self.active
        per_sample = self._losses(z0, ids, noise, t, time_ids)  # (B,)
        losses = per_sample.view(len(active), -1).mean(dim=1)  # (K,)
        return losses + self._regularisers(active)

    def _share_losses(
        self, z0: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """This process's part of `concept_losses` (K,): its contiguous share of the batch's samples, each counted
        1 / batch_size toward its concept's mean, and 1 / processes of the regularisers, so that the sum over the
        processes is `concept_losses` of the whole batch."""
        active, b = self.active, self.config.batch_size
        lo, hi = self.world.share(z0.shape[0])
        losses = torch.zeros(len(active), device=self.device)
        if hi > lo:  # fewer samples than processes leaves some without any
            owner = torch.arange(lo, hi, device=self.device) // b
            rows = slice(lo, hi)
            per_sample = self._losses(
                z0[rows], ids[rows], noise[rows], t[rows], None if time_ids is None else time_ids[rows]
            )
            losses = losses.index_add(0, owner, per_sample) / b
        return losses + self._regularisers(active) / self.world.size

    def init_l2_weight(self, step: int) -> float:
        """The L2 pull's weight at `step` under `init_l2_schedule`.

        `decay` takes the schedule of cloneofsimo/lora's norm prior for textual inversion
        (lora_diffusion/cli_lora_pti.py, `clip_ti_decay`: a pull of strength min(1, 100 lr_t), with lr_t falling
        linearly to 0): here the L2 pull toward the initializer falls linearly from init_l2 to 0. `rise` is the
        reverse (ours): the vector moves freely first and is held near its initializer late, when TI overfits.
        """
        cfg = self.config
        frac = min(step / max(cfg.steps - 1, 1), 1.0)
        return cfg.init_l2 * {"constant": 1.0, "decay": 1.0 - frac, "rise": frac}[cfg.init_l2_schedule]

    def _regularisers(self, active: list[_Concept]) -> torch.Tensor | float:
        """Each active concept's pulls toward its initializer (K,), or 0 when none is on."""
        reg: torch.Tensor | float = 0.0
        if self.config.init_l2 > 0:
            l2 = torch.stack([sum(((p - i) ** 2).sum(-1).mean() for p, i in zip(c.params, c.inits)) for c in active])
            reg = reg + self.init_l2_weight(self._step_now) * l2
        if self.config.init_cos > 0:
            # the pull in direction alone (1 - cosine): the vector's norm is free, its angle to the initializer
            # is held; the same pull DTI's von Mises-Fisher prior gives, on an unconstrained vector
            cos = torch.stack(
                [sum((1 - F.cosine_similarity(p, i, dim=-1)).mean() for p, i in zip(c.params, c.inits)) for c in active]
            )
            reg = reg + self.config.init_cos * cos
        return reg

    def loss(
        self,
        z0: torch.Tensor,
        ids: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The total loss: the sum of the active concepts' losses (see `concept_losses`)."""
        return self.concept_losses(z0, ids, noise, t, time_ids).sum()

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step at index `step`; returns every concept's (detached) loss, 0 for stopped ones (K,)."""
        self._activate_vectors(step)
        self._step_now = step  # the step the regularisers weigh (train_step may be called without run)
        if self.config.compile == "max":
            # a new step for CUDA graph trees: the last step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        z0, ids, time_ids = self._batch(step)
        noise = torch.randn(z0.shape, generator=self.gen_device, device=self.device)
        t = torch.randint(0, self.num_timesteps, (z0.shape[0],), generator=self.gen_device, device=self.device)
        if self.world.size == 1:
            losses = self.concept_losses(z0, ids, noise, t, time_ids)
        else:
            losses = self._share_losses(z0, ids, noise, t, time_ids)
        scaled = self.scaler.scale(losses.sum())  # scaled even on an idle process: fp16's scaler.step needs it
        if scaled.requires_grad:  # a process with no samples and no regulariser has nothing to differentiate
            scaled.backward()
        if self.world.size > 1:
            self._sum_gradients()
        for c in self.concepts:  # the splice gives a stopped concept zero gradients, on which AdamW still moves it
            if c.failed:
                for p in c.params:
                    p.grad = None
        self.scaler.step(self.optimizer)  # stopped concepts have no gradient, so AdamW leaves them as they are
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if len(losses) == len(self.concepts):
            return losses.detach()
        # some concept stopped: spread the others' losses to their places (an index copied to the device: rare)
        out = torch.zeros(len(self.concepts), device=self.device)
        out[[i for i, c in enumerate(self.concepts) if not c.failed]] = losses.detach()
        return out

    def _sum_gradients(self) -> None:
        """Sum every concept's gradient over the processes (one all-reduce), so each takes the same step."""
        params = [p for c in self.concepts for p in c.params]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        distributed.all_reduce_(flat)
        for p in params:
            n = p.numel()
            p.grad = flat[:n].view_as(p).clone()
            flat = flat[n:]

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        return {
            "step": self.step,
            "vectors": {c.spec.token: c.param.detach().cpu() for c in self.concepts},
            "vectors_2": {c.spec.token: c.param_2.detach().cpu() for c in self.concepts if c.param_2 is not None},
            "optimizer": self.optimizer.state_dict(),
            "rng": self.gen.get_state(),
            "rng_device": self.gen_device.get_state(),
            "scaler": self.scaler.state_dict(),  # fp16's loss scale (empty when off)
            "model_fingerprint": self.model.fingerprint,
            # the fingerprint covers the text side and the UNet's config, not its weights: a UNet-only fine-tune
            # shares it, so the reference the model was loaded from is checked too
            "model_source": str(self.model.source),
            "device_type": self.device.type,
            "concepts": [c.spec.model_dump_json() for c in self.concepts],
            "image_sha256": {c.spec.token: list(c.meta["image_sha256"]) for c in self.concepts},
            "config": self.config.model_dump_json(),
            "curves": json.dumps(self.curves),
            "failed": json.dumps({c.spec.token: c.failed for c in self.concepts if c.failed}),
            "ended_early_at": self.ended_early_at,
            # the vectors early end measures from: a resumed run ends where an unbroken one would
            "early_end_snapshots": {s: [t.detach().cpu() for t in v] for s, v in self._snapshots.items()},
            "scale_at_report": self._scale_at_report,
            "oneword_version": __version__,
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore a state written by `state_dict` (after checking it belongs to this run)."""
        written = json.loads(state["config"]) if "config" in state else {}
        theirs = written.get("direction_only", False)
        if theirs != self.config.direction_only:
            raise OnewordError(
                f"{source} was trained {'with' if theirs else 'without'} direction_only, this run "
                f"{'with' if self.config.direction_only else 'without'}: their optimisers differ",
                hint="resume with the setting the checkpoint was written with, or use a fresh checkpoint folder",
            )
        every = written.get("progressive_every", self.config.progressive_every)
        if every != self.config.progressive_every:  # its vectors joined on another schedule: rows would be reset
            raise OnewordError(
                f"{source} was trained with progressive_every {every}, this run with "
                f"{self.config.progressive_every}: its vectors joined the prompts on another schedule",
                hint="resume with the setting the checkpoint was written with, or use a fresh checkpoint folder",
            )
        mine = [c.spec.model_dump_json() for c in self.concepts]
        if state["concepts"] != mine:
            raise OnewordError(
                f"{source} was written for concepts {state['concepts']}, not {mine}",
                hint="resume with the same token, initializer and vector count, or use a fresh checkpoint folder",
            )
        for c in self.concepts:  # the same word of other photos (a folder's photos changed since, another concept)
            mine = set(c.meta["image_sha256"])
            theirs = set(checkpoints.photos_of(state, c.spec.token) or mine)  # older ones do not say
            if mine != theirs:
                raise OnewordError(
                    f"{source} learned {c.spec.token} from other photos: {len(mine - theirs)} of this run's "
                    f"{len(mine)} are not among its {len(theirs)}, and {len(theirs - mine)} of its are not here",
                    hint="train these photos into a fresh output or checkpoint folder; to go on with the "
                    "checkpoint, train on the photos it was written with",
                )
        if state["model_fingerprint"] != self.model.fingerprint:
            raise OnewordError(
                f"{source} was trained on another base model ({state['model_fingerprint'][:19]}…)",
                hint="resume with the same base model, or use a fresh checkpoint folder",
            )
        if state.get("model_source", str(self.model.source)) != str(self.model.source):
            raise OnewordError(
                f"{source} was trained on base model {state['model_source']}, this run loads {self.model.source}",
                hint="resume with the same --base-model (a model that shares the text encoder may not share the "
                "UNet), or use a fresh checkpoint folder",
            )
        if state.get("device_type", self.device.type) != self.device.type:  # its random streams are the device's
            raise OnewordError(
                f"{source} was trained on {state['device_type']}, this run is on {self.device.type}: its random "
                "state cannot continue there",
                hint=f"resume on {state['device_type']}, or use a fresh checkpoint folder",
            )
        with torch.no_grad():
            for c in self.concepts:
                c.param.copy_(state["vectors"][c.spec.token].to(self.device))
                if c.param_2 is not None:
                    c.param_2.copy_(state["vectors_2"][c.spec.token].to(self.device))
        # the checkpoint's optimiser state (moments, step counts) goes on; its settings (learning rate, weight
        # decay) would replace this run's, which are what the user asked for and what summary.json reports
        settings = [
            {k: v for k, v in g.items() if isinstance(v, (int, float, str, tuple)) or v is None}  # not tensors
            for g in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, mine in zip(self.optimizer.param_groups, settings):
            if (theirs := {k: group.get(k) for k in mine}) != mine:
                log.info("resuming with this run's optimiser settings %s, not the checkpoint's %s", mine, theirs)
            group.update(mine)
        self.gen.set_state(state["rng"])
        self.gen_device.set_state(state["rng_device"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._scale_at_report = state.get("scale_at_report")
        self._snapshots = {
            int(s): [t.to(self.device) for t in v] for s, v in (state.get("early_end_snapshots") or {}).items()
        }
        if "curves" in state:
            self.curves = json.loads(state["curves"])
        else:  # written by oneword 0.1 (one concept)
            self.curves = {self.concepts[0].spec.token: json.loads(state["curve"])}
        failed = json.loads(state.get("failed", "{}"))
        for c in self.concepts:
            c.failed = failed.get(c.spec.token, "")
        self.step = int(state["step"])
        # an early end holds while early ending is on; resumed with it off, training goes on to `steps`
        self.ended_early_at = state.get("ended_early_at") if self.config.early_end else None

    def embeddings(self) -> list[Embedding]:
        """The learned concepts (those that did not fail) as `Embedding`s, with lineage metadata."""
        return [
            Embedding(
                c.spec.token,
                c.param.detach().float().cpu().clone(),
                {
                    "initializer": c.spec.init_word,
                    "model_fingerprint": self.model.fingerprint,
                    "model_source": self.model.source,
                    "steps": str(self.step),
                    "templates": c.spec.resolved(self.profile).templates,
                    "image_sha256": ",".join(c.meta["image_sha256"]),
                },
                None if c.param_2 is None else c.param_2.detach().float().cpu().clone(),
            )
            for c in self.active
        ]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The UNet's text states (B, 77, width) for prompts, multi-vector tokens expanded as diffusers does."""
        for c in self.concepts:
            prompts = [p.replace(c.spec.token, expand_placeholder(c.spec.token, c.spec.n_vectors)) for p in prompts]
        ids = tokenize(self.tokenizers, prompts, self.device)
        sizes = torch.tensor([default_time_ids(self.profile.resolution)] * len(prompts), device=self.device)
        return self.conditioning(ids, sizes)[0].float()

    # ---- loop --------------------------------------------------------------------------------------------
    def run(
        self,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callbacks: Sequence[MetricsCallback] = (),
        progress: bool = True,
        keep_going: bool = False,
    ) -> TrainResult:
        """Train to `config.steps`, checkpointing, reporting, and stopping a concept whose loss turns non-finite.

        Args:
            checkpoint_dir: folder or `s3://` prefix for checkpoints (None: no checkpoints).
            resume: continue from the newest readable checkpoint in `checkpoint_dir`, if there is one.
            callbacks: called as `cb(step, {"loss": ..., "embedding_norm": ...})` every `log_every` steps, with
                the means over the concepts still training (each concept's point is in `curves` by then).
            progress: show a progress bar (without one, every report is a log line).
            keep_going: when every concept has stopped, return (each with its reason in `failed`) instead of
                raising. A concept that stops while others still train never raises.

        Returns:
            A `TrainResult`.

        Raises:
            NonFiniteLossError: when the last training concept's loss turns non-finite (unless `keep_going`).
        """
        cfg = self.config
        last = self._resume(checkpoint_dir) if resume and checkpoint_dir is not None else None
        steps = distributed.gather([self.step], self.world)
        if len(set(steps)) > 1:  # a checkpoint one process could read and another not: they would diverge
            raise OnewordError(
                f"the processes resumed from different steps {steps} under {checkpoint_dir}",
                hint="rerun: a checkpoint was unreadable from some processes (storage trouble)",
            )
        if not self.world.main:  # every process holds the same state; the main one reports and writes it
            callbacks, progress = (), False
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        loss_sum, n_sum = torch.zeros(len(self.concepts), device=self.device), 0
        t0, start = time.perf_counter(), self.step
        if self.scaler.is_enabled() and self._scale_at_report is None:
            self._scale_at_report = self.scaler.get_scale()
        if cfg.early_end and not self._snapshots:  # where the movement is measured from (a checkpoint holds its own)
            self._snapshots = {self.step: [p.detach().clone() for c in self.active for p in c.params]}
        while self.step < cfg.steps and self.active and self.ended_early_at is None:
            loss_sum += self.train_step(self.step)
            n_sum += 1
            self.step += 1
            at_end = self.step == cfg.steps or self._settled()
            ckpt_now = checkpoint_dir is not None and (
                at_end or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
            )
            if self.step % cfg.log_every == 0 or at_end or ckpt_now:
                self._report(loss_sum / n_sum, n_sum, last, callbacks, bar, keep_going)
                loss_sum.zero_()
                n_sum = 0
            if ckpt_now and self.world.main:
                try:
                    last = checkpoints.save_checkpoint(checkpoint_dir, self.step, self.state_dict())
                except OnewordError as e:
                    if at_end:
                        raise
                    # an object store that is down for longer than the retries: train on, the next one retries
                    log.warning("%s; training goes on, the next checkpoint tries again", e.message)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        done = self.step - start
        if last and not done:
            log.info("nothing to train: the checkpoints under %s are at step %d already", checkpoint_dir, self.step)
        return TrainResult(
            self.embeddings(),
            self.curve,
            self.step,
            seconds,
            done / seconds if seconds > 0 else 0.0,
            last,
            curves=self.curves,
            failed={c.spec.token: c.failed for c in self.concepts if c.failed},
            steps_run=done,
            ended_early_at=self.ended_early_at,
        )

    def _settled(self) -> bool:
        """Early end: whether every training concept's vectors moved less than `early_end` of their norm over the
        last `early_end_window` steps (checked every `log_every` steps; sets `ended_early_at`)."""
        cfg = self.config
        if not cfg.early_end or self.step % cfg.log_every:
            return False
        # under the progressive schedule, rows not yet in the prompts barely move: "settled" means nothing before
        # the last of them has joined and had a window of its own
        last_joins = (max(c.spec.n_vectors for c in self.active) - 1) * cfg.progressive_every
        if self.step < last_joins + cfg.early_end_window:
            return False
        now = [p.detach().clone() for c in self.active for p in c.params]
        self._snapshots[self.step] = now
        old = [s for s in self._snapshots if s <= self.step - cfg.early_end_window]
        if not old:
            return False
        then = self._snapshots[max(old)]
        self._snapshots = {s: v for s, v in self._snapshots.items() if s >= max(old)}
        if len(then) != len(now):  # a concept stopped in between: measure from here on
            return False
        moved = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(now, then))
        # not finite: a concept whose vectors went NaN (max() keeps a NaN that comes first); `_report` stops it
        # alone, and the others must not be ended with it
        if not math.isfinite(moved) or moved >= cfg.early_end:
            return False
        self.ended_early_at = self.step
        log.info(
            "early end at step %d of %d: the vectors moved %.2g of their norm over the last %d steps (< %g)",
            self.step,
            cfg.steps,
            moved,
            cfg.early_end_window,
            cfg.early_end,
        )
        return True

    def _resume(self, checkpoint_dir: str | Path) -> str | None:
        """Load the newest checkpoint that reads; a damaged one (truncated, empty) is skipped with a warning."""
        found = checkpoints.list_checkpoints(checkpoint_dir)
        if found and found[-1][0] > self.config.steps:
            raise OnewordError(
                f"{checkpoint_dir} holds checkpoints up to step {found[-1][0]}, past this run's {self.config.steps} "
                "steps: resumed, it would return that later training as this one",
                hint=f"train for {found[-1][0]} steps or more, or use another checkpoint folder (-o) for a shorter run",
            )
        for step, path in reversed(found):
            try:
                state = checkpoints.load_checkpoint(path)
            except OnewordError as e:
                log.warning("skipping damaged checkpoint %s (%s); trying the one before", path, e.message)
                continue
            self.load_state_dict(state, source=path)
            log.info("resumed from %s (step %d)", path, step)
            return path
        return None

    def _report(self, mean_losses, n: int, last, callbacks, bar, keep_going: bool) -> None:
        """Record each training concept's curve point; stop the concepts whose loss or vectors are non-finite."""
        losses = distributed.all_reduce_(mean_losses.clone()).tolist()  # each process holds its share's part
        points = []
        for c, loss in zip(self.concepts, losses):
            if c.failed:
                continue
            norm = c.param.detach().norm(dim=-1).mean().item()
            # every table the concept trains (SDXL's clip_g too): one that turned NaN on the last update fails it
            finite = all(bool(torch.isfinite(p.detach()).all()) for p in c.params)
            if not (math.isfinite(loss) and math.isfinite(norm) and finite):
                c.failed = (
                    f"the loss of {c.spec.token} became {loss} between steps {self.step - n} and {self.step}; "
                    f"stopped. Last good checkpoint: {last or 'none'}"
                )
                log.warning("%s", c.failed)
                if self.scaler.is_enabled() and self._scale_at_report is not None:
                    # fp16 halved the shared loss scale at each of its non-finite steps: the others would train on
                    # at a scale hundreds of times too small, which 2000-step growth takes most of a run to undo
                    self.scaler.update(new_scale=self._scale_at_report)
                continue
            point = {"step": self.step, "loss": loss, "embedding_norm": norm}
            self.curves[c.spec.token].append(point)
            points.append(point)
        if self.scaler.is_enabled():
            self._scale_at_report = self.scaler.get_scale()
        if not points:
            if keep_going:
                return
            raise NonFiniteLossError(
                self.concepts[-1].failed if len(self.concepts) == 1 else "every concept's loss became non-finite",
                hint=f"lower the learning rate (now {self.config.lr:g}) or use --precision fp32, then --resume "
                "from the last good checkpoint",
            )
        mean = {k: sum(p[k] for p in points) / len(points) for k in ("loss", "embedding_norm")}
        if bar.disable and self.world.main:  # pods run without a bar: their log is where a training's progress shows
            log.info(
                "step %d/%d: loss %.4f, embedding norm %.4f%s",
                self.step,
                self.config.steps,
                mean["loss"],
                mean["embedding_norm"],
                f" (means of {len(points)} concepts)" if len(points) > 1 else "",
            )
        for cb in callbacks:
            cb(self.step, mean)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", norm=f"{mean['embedding_norm']:.3f}")
