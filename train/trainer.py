"""The training loop shared by Phase 1 and Phase 3, single process or torchrun DDP.

Exact resume: everything random in step ``s`` (data order, augmentations, masks, bootstrap
weights, dropout) is drawn from generators seeded by ``(seed, s)``; learning rate, weight
decay and EMA momentum are pure functions of ``s``; a checkpoint holds the model, its EMA
target, the optimiser and ``s``. A run stopped after any checkpoint and resumed ends
bit-identical (on CPU) to one that never stopped.

DDP: every rank draws the *global* batch's indices and random parameters and keeps its own
contiguous slice, so N ranks with batch B/N each compute the same gradient as one process
with batch B (losses are per-sample means; see ``iwm_bus.model.objective``).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from loguru import logger
from torch import Tensor, nn

from iwm_bus.errors import CheckpointError
from iwm_bus.model import IWM, create_iwm_model, load_checkpoint, load_iwm, save_checkpoint
from iwm_bus.model.action_terms import SEQ_LEN
from train.augment import apply_views, cond_vector, sample_params, with_target_jitters
from train.cf_data import CounterfactualStore
from train.config import RunConfig, TrainConfig
from train.data import DataError, FrameStore, batch_indices, find_images, find_sessions
from train.logbook import Logbook
from train.look import sample_looks
from train.masks import sample_masks

__all__ = ["DistInfo", "Trainer", "init_model", "init_opt", "lr_at", "set_adamw_impl", "wd_at"]

COLLAPSE_STD = 0.05  # target tokens' mean per-dimension std below this = collapsing
# steps timed before a ``minutes`` budget fits the schedule to the time left (sooner if they
# take over a tenth of the budget)
FIT_AFTER = 50


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without DDP)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``total``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * frac))


def wd_at(step: int, total: int, tc: TrainConfig) -> float:
    """Cosine from ``weight_decay`` to ``weight_decay_end`` (I-JEPA)."""
    frac = min(1.0, step / max(1, total))
    return tc.weight_decay_end + 0.5 * (tc.weight_decay - tc.weight_decay_end) * (
        1 + math.cos(math.pi * frac))


ENCODER_FIELDS = ("encoder_name", "img_size", "patch_size", "encoder_depth")
# predictor parts a checkpoint without them starts at zero (the predictor it had, unchanged)
NEW_PREDICTOR_PARTS = ("layer_cond.", "local.")


def init_model(run: RunConfig, device: torch.device) -> IWM:
    """A fresh model of ``run.model`` (seeded), or ``init_from``'s weights.

    ``init_from`` of the same encoder gives its encoder and target encoder, and its predictor
    where the predictor's shapes are the same too; a predictor of another shape (depth,
    width, ...) starts new, with a warning (how the dual-stream presets start from the
    shipped default). Another encoder is refused.
    """
    tc = run.train

    def fresh() -> IWM:
        m = create_iwm_model(run.model.variant, device=device, seed=tc.seed,
                             **{k: v for k, v in run.model.to_dict().items() if k != "variant"})
        m.init_target_encoder()
        return m

    if not tc.init_from:
        model = fresh()
    else:
        src = load_iwm(tc.init_from, device, with_target=True)
        diff = {k: (v, getattr(run.model, k)) for k, v in src.config.to_dict().items()
                if getattr(run.model, k) != v}
        if any(k in ENCODER_FIELDS for k in diff):
            raise CheckpointError(f"{tc.init_from}: checkpoint encoder differs from the "
                                  f"run's (checkpoint, run): {diff}")
        model = src
        if diff or not tc.init_predictor:
            model = fresh()
            model.encoder.load_state_dict(src.encoder.state_dict())
            model.target_encoder.load_state_dict(src.target_encoder.state_dict())
            new = _new_predictor_parts(model.predictor, src.predictor)
            if tc.init_predictor and new is not None:
                model.predictor.load_state_dict(src.predictor.state_dict(), strict=False)
                logger.info("{}: all weights loaded (config differs: {}; new: {})",
                            tc.init_from, diff, new + (["inverse"] if model.inverse else []))
            else:
                logger.warning("{}: encoder and target encoder loaded; the predictor {} and "
                               "starts new", tc.init_from, f"differs ({sorted(diff)})"
                               if tc.init_predictor else "is not taken (init_predictor)")
    model.amp = tc.amp
    return model.train()


def _new_predictor_parts(dst: nn.Module, src: nn.Module) -> list[str] | None:
    """The parts of predictor ``dst`` that ``src`` lacks, when every weight ``src`` has fits
    ``dst`` and what it lacks is only :data:`NEW_PREDICTOR_PARTS`; None otherwise."""
    have, want = src.state_dict(), dst.state_dict()
    if any(k not in want or want[k].shape != v.shape for k, v in have.items()):
        return None
    missing = [k for k in want if k not in have]
    if any(not k.startswith(NEW_PREDICTOR_PARTS) for k in missing):
        return None
    return sorted({k.split(".")[0] for k in missing})


def init_opt(model: IWM, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms, positions, tokens);
    ``tc.adamw`` picks the implementation (:func:`set_adamw_impl`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("target_encoder."):
            continue
        (decay if p.ndim >= 2 and "pos" not in name and "token" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                             fused=tc.adamw == "fused", foreach=tc.adamw == "foreach")


def set_adamw_impl(opt: torch.optim.AdamW, impl: str) -> None:
    """Run ``opt``'s update as ``impl``: ``fused`` (one kernel over every parameter),
    ``foreach`` (a few kernels an update) or ``loop`` (ops per parameter). The same update
    within float rounding. Also after ``load_state_dict``, which brings back the flags the
    checkpoint was saved with; a fused update keeps its step counts on the parameters'
    device, as ``AdamW(fused=True)`` makes them."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = impl == "fused", impl == "foreach"
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device if impl == "fused" else "cpu",
                                                 torch.float32)


def _step_gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1)


class Trainer:
    """One training run: ``Trainer(run).run()``; ``resume`` first to continue a run."""

    def __init__(self, run: RunConfig, dist_info: DistInfo | None = None,
                 store: FrameStore | None = None, cf: CounterfactualStore | None = None
                 ) -> None:
        self.run_cfg, self.tc = run, run.train
        self.dist = dist_info or DistInfo()
        if self.tc.batch_size % self.dist.world:
            raise ValueError(f"batch size {self.tc.batch_size} does not divide over "
                             f"{self.dist.world} DDP ranks")
        k = run.aug.target_views
        if (self.tc.batch_size // self.dist.world) % k:
            raise ValueError(f"aug.target_views={k} does not divide the batch of each rank "
                             f"({self.tc.batch_size // self.dist.world}): a group of views "
                             "must not straddle two ranks")
        self.device = torch.device(self.tc.device if not self.tc.device.startswith("cuda")
                                   or not self.tc.ddp else f"cuda:{self.dist.local_rank}")
        self.out = Path(self.tc.out_dir)
        self.store = store if store is not None else self.load_data()
        if cf is None and run.objective.cf_weight:
            cf = CounterfactualStore.for_sessions(self.store.sources, run.model.img_size,
                                                  workers=self.tc.load_workers)
        self.cf = cf if run.objective.cf_weight else None
        self._check_data()
        self.model = init_model(run, self.device)
        self.ddp_model: nn.Module = self.model
        if self.tc.ddp and self.dist.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.tc.phase == 1 or not run.objective.global_weight)
        self.opt = init_opt(self.model, self.tc)
        self.total = self.tc.steps or self.tc.epochs * (self.num_samples // self.tc.batch_size)
        self.ema = self.model.make_ema(self.total)
        self.step = 0  # steps completed
        # make the next batch on a thread while this one runs on the GPU
        self.prefetch = self.device.type == "cuda"

    # -- data

    def load_data(self) -> FrameStore:
        tc, mc = self.tc, self.run_cfg.model
        if tc.phase == 3:
            return FrameStore.from_sessions(tc.sessions, mc.img_size, mc.cond_dim, tc.max_frames,
                                            workers=tc.load_workers)
        stores = []
        sess = find_sessions(tc.data_dirs)
        imgs = find_images([p for p in tc.data_dirs if not str(p).endswith(".mcap")])
        if imgs:
            stores.append(FrameStore.from_images(imgs, mc.img_size, mc.cond_dim))
        if sess:
            stores.append(FrameStore.from_sessions(sess, mc.img_size, mc.cond_dim,
                                                   tc.max_frames, workers=tc.load_workers))
        if not stores:
            raise DataError(f"{', '.join(tc.data_dirs)}: no PNG/JPG images or .mcap sessions")
        return FrameStore.concat(stores) if len(stores) > 1 else stores[0]

    def _check_data(self) -> None:
        mc, tc = self.run_cfg.model, self.tc
        if tc.phase == 3:
            # action terms read frames t-1 .. t+2 (3 transitions); Phase 3 k_steps transitions
            self.starts = self.store.sequence_starts(
                SEQ_LEN - 1 if self.run_cfg.objective.action_terms else tc.k_steps)
            if self.store.num_actions > mc.num_actions:
                raise DataError(f"the sessions hold action ids up to {self.store.num_actions - 1} "
                                f"but the model has num_actions={mc.num_actions}")
        if self.num_samples < tc.batch_size:
            what = f"{tc.k_steps}-step sequences" if tc.phase == 3 else "frames"
            raise DataError(f"the data holds {self.num_samples} {what}, fewer than one batch "
                            f"of {tc.batch_size}")

    @property
    def num_samples(self) -> int:
        return len(self.starts) if self.tc.phase == 3 else len(self.store)

    def make_batch(self, step: int) -> dict[str, Tensor]:
        """This rank's slice of the global batch of ``step``."""
        tc, mc = self.tc, self.run_cfg.model
        gen = _step_gen(tc.seed, step)
        idx = batch_indices(step, self.num_samples, tc.batch_size, tc.seed)
        b = tc.batch_size // self.dist.world
        sl = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        boot = torch.poisson(torch.ones(mc.ensemble, tc.batch_size), generator=gen)
        if tc.phase == 1:
            return self._views(gen, self.store.frames[idx[sl]], sl, boot)
        start = self.starts[idx[sl]]  # (b,)
        if self.run_cfg.objective.action_terms:
            return self._action_batch(gen, start, boot[:, sl])
        k = tc.k_steps
        fi = start[:, None] + torch.arange(k + 1)  # (b, K+1)
        frames = self._unit(self.store.frames[fi].flatten(0, 1)).unflatten(0, (b, k + 1))
        ai = fi[:, 1:]  # the action that produced frame j+1
        batch = {"frames": frames, "cond": self.store.vector[ai].to(self.device),
                 "boot": boot[:, sl].to(self.device)}
        if mc.num_actions:
            batch["actions"] = self.store.action_id[ai].to(self.device)
        if self.run_cfg.objective.views_weight:
            batch["views"] = self._views(gen, self.store.frames[start], sl, boot)
        return batch

    def _action_batch(self, gen: torch.Generator, start: Tensor, boot: Tensor
                      ) -> dict[str, Tensor]:
        """An action-term batch (``iwm_bus.model.action_terms``): factual frames t-1 .. t+2
        from ``start`` and, with the counterfactual term, this rank's share of ``cf_states``
        states (drawn from its own generator stream)."""
        tc, dev = self.tc, self.device
        fi = start[:, None] + torch.arange(SEQ_LEN)  # (b, 4)
        u8 = self.store.frames[fi]  # (b, 4, S, S, 3)
        acts = self.store.action_id[fi]
        b = u8.shape[0]
        looks = tc.mirror_p or tc.recolour_p
        if looks:  # drawn for the global batch, this rank's slice taken (as the views do)
            look = sample_looks(gen, tc.batch_size, tc.mirror_p, tc.recolour_p)
            look = look.part(slice(self.dist.rank * b, (self.dist.rank + 1) * b))
            u8, acts = look.frames(u8), look.actions(acts)
        # which of the 4b frames are pixel copies of each positive (t+1, t+2): frames numbered
        # by content, O(b) memory; comparing every pair pixel by pixel made a (b, 2, 4b, S*S*3)
        # mask, 6 GB and seconds a step at batch 256
        _, ids = torch.unique(u8.reshape(b * SEQ_LEN, -1), dim=0, return_inverse=True)  # (4b,)
        same = ids.view(b, SEQ_LEN)[:, 2:, None] == ids[None, None]  # (b, 2, 4b)
        batch = {"seq_frames": self._unit(u8.flatten(0, 1)).unflatten(0, (b, SEQ_LEN)),
                 "seq_actions": acts.to(dev), "seq_same": same.to(dev),
                 "boot": boot.to(dev)}
        if self.cf is not None:
            if self.dist.rank:
                gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=gen))
                                                    + self.dist.rank)
            part = self.cf.sample(gen, max(1, tc.cf_states // self.dist.world), tc.cf_outcomes,
                                  tc.cf_extra)
            if looks:
                look = sample_looks(gen, len(part["cf_cur"]), tc.mirror_p, tc.recolour_p)
                states, queried = part["cf_out_state"], part["cf_q_state"]
                part["cf_cur"] = look.frames(part["cf_cur"])
                part["cf_out"] = look.frames(part["cf_out"], states)
                part["cf_q_action"] = look.actions(part["cf_q_action"], queried)
                part["cf_out_actions"] = look.action_sets(part["cf_out_actions"], states)
            part["cf_cur"], part["cf_out"] = self._unit(part["cf_cur"]), self._unit(part["cf_out"])
            batch.update({k: v.to(dev) for k, v in part.items()})
        return batch

    def _unit(self, u8: Tensor) -> Tensor:
        """uint8 (n, S, S, 3) -> the encoder's input (n, 3, S, S) on the device (moved as
        uint8: a quarter of the bytes of float, converted there)."""
        return self.model.normalise_unit(u8.to(self.device).permute(0, 3, 1, 2).float() / 255.0)

    def _views(self, gen: torch.Generator, frames: Tensor, sl: slice, boot: Tensor
               ) -> dict[str, Tensor]:
        """A views (Phase 1) batch of uint8 frames (b, S, S, 3): this rank's ``sl`` of the
        global batch's random augmentations and masks."""
        mc, aug, n = self.run_cfg.model, self.run_cfg.aug, self.tc.batch_size
        k = aug.target_views  # groups of k rows: one source view, k colour-jittered targets
        if k > 1:
            params = with_target_jitters(gen, sample_params(gen, n // k, aug), k, aug)
            frames = frames[::k].repeat_interleave(k, 0)  # a group's rows: one frame
        else:
            params = sample_params(gen, n, aug)
        ctx, tgt = sample_masks(gen, n, mc.grid, self.run_cfg.masks)
        src, tgt_img = apply_views(frames, params.slice(sl))
        views = {"src": self.model.normalise_unit(src), "tgt": self.model.normalise_unit(tgt_img),
                 "cond": (cond_vector(params, mc.cond_dim) if aug.condition
                          else torch.zeros(n, mc.cond_dim))[sl].to(self.device),
                 "ctx_idx": ctx[sl].to(self.device), "tgt_idx": tgt[sl].to(self.device),
                 "boot": boot[:, sl].to(self.device)}
        if k > 1:
            views["group"] = (torch.arange(n) // k)[sl].to(self.device)
        return views

    # -- optimisation

    def train_step(self, step: int, batch: dict[str, Tensor] | None = None) -> dict[str, float]:
        """One optimiser step on ``batch`` (made here when not given)."""
        tc = self.tc
        t0 = time.perf_counter()
        batch = batch if batch is not None else self.make_batch(step)
        t1 = time.perf_counter()
        torch.manual_seed(tc.seed * 15_485_863 + step)  # dropout etc.: a pure function of step
        lr, wd = lr_at(step, self.total, tc), wd_at(step, self.total, tc)
        self.opt.param_groups[0]["lr"] = self.opt.param_groups[1]["lr"] = lr
        self.opt.param_groups[0]["weight_decay"] = wd
        if self.device.type == "cuda":
            autocast = torch.autocast("cuda", torch.bfloat16, enabled=tc.amp)
        else:
            autocast = torch.autocast("cpu", torch.bfloat16, enabled=tc.cpu_amp)
        with autocast:
            out = self.ddp_model(batch, self.run_cfg.objective)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            tc.clip_grad if tc.clip_grad else float("inf"))
        self.opt.step()
        t3 = time.perf_counter()
        m = self.ema.update(step) if not self.run_cfg.objective.freeze_encoder or tc.phase == 1 \
            else 1.0
        t4 = time.perf_counter()
        # every metric of the step read at once: the one wait for the device a step (on a GPU
        # the times above are then launch times; t_wait is the rest of the device's work)
        with torch.no_grad():
            values = torch.stack([*out.values(), gnorm]).tolist()
        t5 = time.perf_counter()
        self.step = step + 1
        return {**dict(zip(out, values[:-1], strict=True)), "lr": lr, "wd": wd,
                "grad_norm": values[-1], "ema_momentum": m, "t_data": t1 - t0,
                "t_forward": t2 - t1, "t_backward": t3 - t2, "t_ema": t4 - t3,
                "t_wait": t5 - t4}

    # -- checkpoints

    def save(self, path: Path) -> None:
        save_checkpoint(self.model, path, kind="train-state", step=self.step,
                        total_steps=self.total, optimizer=self.opt.state_dict(),
                        ema=self.ema.state_dict(), run_config=self.run_cfg.to_dict())

    def save_all(self) -> None:
        """``step_NNNNNNN.pt`` (the last two kept) and ``last.pt``, each written atomically."""
        if self.dist.rank:
            return
        self.save(self.out / f"step_{self.step:07d}.pt")
        self.save(self.out / "last.pt")
        for old in sorted(self.out.glob("step_*.pt"))[:-2]:
            old.unlink(missing_ok=True)

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Continue from a ``train-state`` checkpoint of the same run config."""
        payload = load_checkpoint(path)
        extra = payload["extra"]
        if extra.get("kind") != "train-state":
            raise CheckpointError(f"{path}: not a training checkpoint (no optimiser state); "
                                  "use --init_from to start from its weights")
        saved = RunConfig.from_dict(extra["run_config"])
        if saved.model != self.run_cfg.model:
            raise CheckpointError(f"{path}: the checkpoint's model config differs from this "
                                  "run's; resume with the same preset and flags")
        self.model.load_state_dict(payload["state_dict"], strict=True)
        self.opt.load_state_dict(extra["optimizer"])
        set_adamw_impl(self.opt, self.tc.adamw)
        self.ema.load_state_dict(extra["ema"])
        self.step = int(extra["step"])
        if self.tc.minutes:  # a budgeted run's schedule is the one it fitted
            self.total = self.ema.total_steps = int(extra.get("total_steps", self.total))
        logger.info("resumed {} at step {}", path, self.step)

    # -- the loop

    def fit_to_budget(self, steps_done: int, seconds: float) -> None:
        """Cut the schedule's total to the steps that fit ``tc.minutes``, given that
        ``steps_done`` steps took ``seconds``; LR, weight decay and EMA follow the new total."""
        per_step = seconds / max(1, steps_done)
        left = self.tc.minutes * 60.0 - seconds
        fitted = max(self.step + 1, self.step + int(left / per_step))
        if fitted < self.total:
            logger.info("{:.1f} min budget at {:.3f} s a step: the schedule ends at step {} "
                        "instead of {}", self.tc.minutes, per_step, fitted, self.total)
            self.total = fitted
            self.ema.total_steps = fitted

    def run(self) -> dict[str, float]:
        """Train to ``self.total`` steps. On CUDA the next batch is made on a thread while
        this one runs on the GPU (a batch is a pure function of its step, so the order is
        the same either way)."""
        tc, rank0 = self.tc, self.dist.rank == 0
        self.out.mkdir(parents=True, exist_ok=True)
        if rank0:
            (self.out / "config.json").write_text(json.dumps(self.run_cfg.to_dict(), indent=2))
        book = Logbook(self.out, self.step) if rank0 else None
        bar = None
        if rank0 and tc.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True)
        pool = ThreadPoolExecutor(1) if self.prefetch else None
        ahead: Future[dict[str, Tensor]] | None = None
        t0, first, fitted = time.perf_counter(), self.step, False
        last: dict[str, float] = {}
        try:
            while self.step < self.total:
                if pool is not None:
                    batch = ahead.result() if ahead is not None else self.make_batch(self.step)
                    ahead = (pool.submit(self.make_batch, self.step + 1)
                             if self.step + 1 < self.total else None)
                    last = self.train_step(self.step, batch)
                else:
                    last = self.train_step(self.step)
                spent = time.perf_counter() - t0
                if tc.minutes and not fitted and (self.step - first == FIT_AFTER
                                                  or spent > tc.minutes * 6):
                    self.fit_to_budget(self.step - first, spent)
                    fitted = True
                    if bar is not None:
                        bar.total = self.total
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", std=f"{last['target_std']:.3f}")
                if book is not None and (self.step % tc.log_every == 0 or self.step == self.total):
                    last["ema_distance"] = self.ema.distance()
                    book.log(self.step, last)
                    self._check_collapse(last)
                if self.step % tc.ckpt_every == 0 or self.step == self.total:
                    self.save_all()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            if bar is not None:
                bar.close()
            if book is not None:
                book.close()
        return last

    def _check_collapse(self, m: dict[str, float]) -> None:
        if m.get("target_std", 1.0) < COLLAPSE_STD:
            logger.warning("COLLAPSE at step {}: target latents' per-dimension std {:.4f} "
                           "(effective rank {:.1f}); raise var_weight/cov_weight, slow the "
                           "EMA (ema_momentum_start) or lower the lr", self.step,
                           m["target_std"], m.get("target_rank", float("nan")))


def setup_distributed(tc: TrainConfig) -> DistInfo:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when ``tc.ddp``."""
    info = DistInfo.from_env()
    if tc.ddp and info.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if tc.device.startswith("cuda") else "gloo")
        if tc.device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
    return info
