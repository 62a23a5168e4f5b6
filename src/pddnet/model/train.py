"""Weakly supervised training of PDD-Net: non-local label loss + diffusion penalty.

Random pairs of training subjects, each scan independently augmented by a small random
affine transform; Adam (the paper: lr 0.01, 1500 iterations), with the learning rate held for
the first ``decay_start`` fraction of the iterations and then lowered along a cosine to
``final_lr_factor`` of it. Every iteration draws its randomness from ``(seed, iteration)`` and
the schedule is a function of the iteration, so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pddnet.errors import PddnetError
from pddnet.model import losses, ops
from pddnet.model.checkpoint import read_checkpoint, save_checkpoint
from pddnet.model.network import PDDNet, Registration, normalise_intensity
from pddnet.spec.config import PDDConfig

NUM_CLASSES = 14  # background + the 13 Learn2Reg abdomen labels


@dataclass
class TrainOptions:
    iterations: int = 1500
    lr: float = 0.01
    decay_start: float = 0.6     # fraction of the iterations run at the full learning rate
    final_lr_factor: float = 0.1
    diffusion_weight: float = 1.5
    # the label loss (docs/training.md: each measured on a selection set)
    label_pool: int = 2          # 1: labels at full resolution (the authors); 2: average-pooled 2x
    class_reduction: str = "sum"  # "mean": averaged over the classes (the authors)
    background_weight: float | None = None  # None: frequency weight; the authors: 0.15
    seed: int = 0
    augment: bool = True
    max_rotation_deg: float = 6.0
    max_scale: float = 0.06
    max_shift: float = 0.05      # normalised units (fraction of the half field of view)
    checkpoint_every: int = 100
    threads: int | None = None
    device: str = "cpu"          # torch device to train on ("cuda" for a GPU)


@dataclass
class TrainState:
    iteration: int = 0
    history: list = field(default_factory=list)  # [iteration, loss, label, diffusion, seconds]


def random_affine(rng: np.random.Generator, opts: TrainOptions) -> np.ndarray:
    """A random ``(3, 4)`` affine in normalised array-order coordinates (output -> input)."""
    angles = np.deg2rad(rng.uniform(-opts.max_rotation_deg, opts.max_rotation_deg, 3))
    rot = np.eye(3)
    for axis, ang in enumerate(angles):
        c, s = math.cos(ang), math.sin(ang)
        a, b = [ax for ax in range(3) if ax != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        rot = rot @ r
    scale = np.diag(1.0 + rng.uniform(-opts.max_scale, opts.max_scale, 3))
    shift = rng.uniform(-opts.max_shift, opts.max_shift, 3)
    return np.concatenate([rot @ scale, shift[:, None]], axis=1)


def apply_affine(image: torch.Tensor, labels: torch.Tensor, theta: np.ndarray):
    """Resample a ``(1,1,I,J,K)`` image (trilinear) and its labels (nearest) with ``theta``.

    :func:`ops.grid_sample3d` at ``identity_grid @ theta``, with the sampling grid written in
    one pass straight in ``grid_sample``'s ``(k, j, i)`` order (the cell centres cached per
    shape, ``theta``'s axes reversed). ``labels`` may be given in the image's float type
    (integer values) to save a conversion; nearest sampling returns them exactly.
    """
    shape = tuple(image.shape[2:])
    mat = torch.as_tensor(np.ascontiguousarray(theta[::-1][:, [2, 1, 0, 3]]),
                          dtype=image.dtype, device=image.device)  # (k, j, i) order
    coords = torch.addmm(mat[:, 3], _centres_kji(shape, image.dtype, image.device),
                         mat[:, :3].T)
    grid = coords.reshape(1, *shape, 3)
    kw = dict(padding_mode="border", align_corners=False)
    img = F.grid_sample(image, grid, mode="bilinear", **kw)
    lab = F.grid_sample(labels.to(image.dtype), grid, mode="nearest", **kw)
    return img, lab.long()


@functools.lru_cache(maxsize=4)
def _centres_kji(shape: tuple, dtype, device) -> torch.Tensor:
    """``ops.identity_grid(shape)`` in ``(k, j, i)`` order, as ``(I*J*K, 3)``."""
    return ops.identity_grid(shape, dtype=dtype, device=device).flip(-1).reshape(-1, 3)


def training_device(name: str) -> torch.device:
    """The torch device ``name``, refused clearly when this machine does not have it."""
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise PddnetError(f"unknown device {name!r} ({exc}); use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PddnetError(f"device {name!r} asked for, but this torch build sees no CUDA GPU "
                          f"(torch {torch.__version__}); train with --device cpu")
    return dev


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks in the heap (process-wide); True if it agreed.

    A training step allocates and frees dozens of cost-volume-sized tensors (~40 MB at the
    ``small`` preset). glibc serves blocks above 32 MB with ``mmap`` and unmaps them on free, so
    every step page-faults them in again: on our 2-core Xeon that was 1.2-1.4 s of a 3.1-3.3 s
    step (docs/benchmarks.md, "The <= 2 s target"). Raising the mmap and trim thresholds to
    1 GiB keeps them for reuse; the memory is not returned to the system until the process
    ends. A no-op off glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


class Trainer:
    """Holds the model, optimiser and data; ``step(i)`` runs iteration ``i``.

    Constructing one calls :func:`keep_freed_memory` (process-wide)."""

    def __init__(self, model: PDDNet, subjects, opts: TrainOptions):
        keep_freed_memory()
        if len(subjects) < 2:
            raise PddnetError(f"training needs at least 2 subjects with labels, got {len(subjects)}")
        shapes = {tuple(img.shape) for img, _ in subjects}
        if len(shapes) != 1:
            raise PddnetError(f"all training images must share one shape; got {sorted(shapes)}. "
                              f"Resample the data to a common grid first.")
        dev = training_device(opts.device)
        self.model, self.opts = model.to(dev), opts
        self.image_shape = shapes.pop()
        cfg = model.config
        self.images = [torch.from_numpy(normalise_intensity(img, cfg.intensity))[None, None].to(dev)
                       for img, _ in subjects]
        labels = [torch.from_numpy(np.asarray(lab, dtype=np.int64))[None, None]
                  for _, lab in subjects]
        top = max(int(lab.max()) for lab in labels)
        if top >= NUM_CLASSES:
            raise PddnetError(f"label value {top} found; PDD-Net trains on labels 0..{NUM_CLASSES - 1}")
        if opts.label_pool not in (1, 2):
            raise PddnetError(f"label_pool must be 1 (full resolution) or 2, got {opts.label_pool}")
        if opts.class_reduction not in losses.REDUCTIONS:
            raise PddnetError(f"class_reduction must be one of {losses.REDUCTIONS}, got "
                              f"{opts.class_reduction!r}")
        if opts.background_weight is not None and not opts.background_weight >= 0:
            raise PddnetError(f"background_weight must be >= 0, got {opts.background_weight}")
        self.weights = losses.class_weights(labels, NUM_CLASSES,
                                            background=opts.background_weight).to(dev)
        self.labels = [lab.to(dev) for lab in labels]
        self._labels_float = [lab.float() for lab in self.labels]  # sampled by augmentation
        self.optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)

    def _sample(self, rng: np.random.Generator, index: int):
        if self.opts.augment:
            return apply_affine(self.images[index], self._labels_float[index],
                                random_affine(rng, self.opts))
        return self.images[index], self.labels[index]

    def learning_rate(self, iteration: int) -> float:
        """Constant, then a cosine from ``lr`` down to ``final_lr_factor * lr`` at the end."""
        opts = self.opts
        start = int(opts.decay_start * opts.iterations)
        if iteration < start:
            return opts.lr
        t = (iteration - start) / max(1, opts.iterations - start)
        low = opts.final_lr_factor
        return opts.lr * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def losses(self, fixed, fixed_lab, moving, moving_lab):
        """The label loss and the diffusion penalty of one pair (images ``(1, 1, I, J, K)``,
        integer labels of the same shape), with the graph for the backward pass.

        With :func:`ops.fast_gradients` on (the default) the network runs as
        :func:`forward_fast` and the label loss in its separable form; off, the model's own
        forward and the direct label loss (the reference step the fast one is tested and
        benchmarked against).
        """
        cfg = self.model.config
        fast = ops.fast_gradients_enabled()
        pool = self.opts.label_pool
        f_oh = losses.pooled_one_hot(fixed_lab[0, 0], NUM_CLASSES, pool)
        m_oh = losses.pooled_one_hot(moving_lab[0, 0], NUM_CLASSES, pool)
        args = (f_oh, m_oh, cfg.grid, cfg.disp_size, cfg.capture, self.weights,
                self.opts.class_reduction)
        if fast:
            out = forward_fast(self.model, fixed, moving)
            label = losses.nonlocal_label_loss(out.probs, *args, layout="disp")
        else:
            out = self.model(fixed, moving)
            label = losses.nonlocal_label_loss_direct(out.probs, *args)
        return label, losses.diffusion_penalty(out.grid_disp)

    def step(self, iteration: int) -> dict[str, float]:
        opts = self.opts
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        rng = np.random.default_rng([opts.seed, iteration])
        a, b = rng.choice(len(self.images), size=2, replace=False)
        fixed, fixed_lab = self._sample(rng, int(a))
        moving, moving_lab = self._sample(rng, int(b))
        self.model.train()
        label, diff = self.losses(fixed, fixed_lab, moving, moving_lab)
        loss = label + opts.diffusion_weight * diff
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "label": label.item(), "diffusion": diff.item()}


@dataclass
class FastForward:
    """What :func:`forward_fast` produces: the cost (negated) and the probabilities
    displacement-major."""

    neg_cost: torch.Tensor   # (L, L, L, Gi, Gj, Gk): minus the model's regularised cost
    probs: torch.Tensor      # (L^3, Gi, Gj, Gk)
    grid_disp: torch.Tensor  # (Gi, Gj, Gk, 3), normalised units

    def registration(self) -> Registration:
        """The same as the model's :class:`Registration` (grid-major views)."""
        return Registration(cost=-self.neg_cost.permute(3, 4, 5, 0, 1, 2),
                            probs=self.probs.permute(1, 2, 3, 0), grid_disp=self.grid_disp)


def forward_fast(model: PDDNet, fixed: torch.Tensor, moving: torch.Tensor) -> FastForward:
    """``model(fixed, moving)`` computed for a cheap backward pass: the features channels-last,
    the correlation in its separable form (:func:`ops.correlation_separable`), and the cost
    negated and displacement-major through the mean field (:func:`regularise_fast`). The same
    values as the model up to float rounding."""
    cfg = model.config
    if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
        raise PddnetError(f"forward_fast expects fixed and moving as (1, 1, I, J, K) of one "
                          f"shape; got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    cl = torch.channels_last_3d
    ssd = ops.correlation_separable(model.features(fixed, cl), model.features(moving, cl),
                                    cfg.grid, cfg.disp_size, cfg.capture, layout="disp")
    neg_cost = regularise_fast(model, ssd)
    L3 = cfg.disp_size ** 3
    probs = ops.softmax_scaled(neg_cost.reshape(L3, *cfg.grid), model.alpha[5], 0)
    disp = ops.displacement_set(cfg.disp_size, cfg.capture, dtype=probs.dtype,
                                device=probs.device).reshape(L3, 3)
    grid_disp = (disp.T @ probs.reshape(L3, -1)).T.reshape(*cfg.grid, 3)
    return FastForward(neg_cost=neg_cost, probs=probs, grid_disp=grid_disp)


def regularise_fast(model: PDDNet, ssd: torch.Tensor) -> torch.Tensor:
    """:meth:`PDDNet.regularise` of ``a1 + a0 * ssd`` for a displacement-major ``ssd``,
    returned negated: the cost is carried as ``-cost``, so that the min-pooling is a
    max-pooling with no negation passes (:func:`ops.mean_field_step_dmajor_neg`), and the
    affine mixes are fused passes (:func:`ops.affine`)."""
    a, mode, pen = model.alpha, model.config.minconv, model.penalty
    neg = ops.affine(-a[1], -a[0], ssd)  # -(a1 + a0 ssd)
    first = ops.mean_field_step_dmajor_neg(neg, mode, pen)
    # -(a4 + a2 cost + a3 first) = -a4 + a2 (-cost) + a3 (-first)
    return ops.mean_field_step_dmajor_neg(ops.affine(-a[4], a[2], neg, a[3], first), mode, pen)


def train(subjects, config: PDDConfig, out, opts: TrainOptions, *, resume=None, init=None,
          progress: bool = True, metadata: dict | None = None) -> TrainState:
    """Train on ``subjects`` (list of ``(image_HU, labels)`` arrays) and write checkpoints.

    Writes ``out`` every ``opts.checkpoint_every`` iterations and at the end (atomically, so a
    Ctrl-C leaves the last complete checkpoint). With ``init``, starts from a checkpoint's
    weights (any grid, capture range or displacement count) with a fresh optimiser and
    schedule. With ``resume`` (a checkpoint written by this
    function), continues from its iteration with its optimiser state and history.
    """
    if opts.threads:
        torch.set_num_threads(opts.threads)
    state = TrainState()
    model = PDDNet(config, seed=opts.seed)
    trainer = Trainer(model, subjects, opts)
    if resume is not None and init is not None:
        raise PddnetError("pass either --resume (continue a run) or --init (start a new run from "
                          "trained weights), not both")
    if init is not None:  # fine-tuning: the weights do not depend on the grid or displacements
        ckpt = read_checkpoint(init)
        try:
            missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
        except RuntimeError as exc:  # tensor shapes differ: another channel count
            raise PddnetError(f"{init} does not fit this preset's network (different channel "
                              f"count?): {str(exc).splitlines()[-1].strip()}") from None
        if unexpected or [k for k in missing if k != "penalty_raw"]:
            raise PddnetError(f"{init} does not fit this preset's network: missing "
                              f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    if resume is not None:
        ckpt = read_checkpoint(resume)
        if ckpt.get("train") is None:
            raise PddnetError(f"{resume} holds no training state to resume from (was it written "
                              f"by 'pddnet train'?)")
        if PDDConfig.from_dict(ckpt["config"]) != config:
            raise PddnetError(f"{resume} was trained with a different config; resume with the "
                              f"same --preset")
        model.load_state_dict(ckpt["state_dict"])
        trainer.optimizer.load_state_dict(ckpt["train"]["optimizer"])
        state = TrainState(iteration=int(ckpt["train"]["iteration"]),
                           history=list(ckpt["train"]["history"]))
        if state.iteration >= opts.iterations:
            raise PddnetError(f"{resume} is already at iteration {state.iteration} >= "
                              f"--iterations {opts.iterations}; ask for more iterations")

    def write():
        save_checkpoint(out, model, image_shape=trainer.image_shape, metadata=metadata, train={
            "iteration": state.iteration,
            "optimizer": _to_cpu(trainer.optimizer.state_dict()),
            "history": state.history,
            "options": asdict(opts),
        })

    from tqdm import tqdm

    bar = tqdm(range(state.iteration, opts.iterations), initial=state.iteration,
               total=opts.iterations, desc="train", disable=not progress, unit="it")
    smooth = None
    for it in bar:
        t0 = time.perf_counter()
        stats = trainer.step(it)
        if not math.isfinite(stats["loss"]):
            raise PddnetError(f"training diverged at iteration {it} (loss {stats['loss']}); "
                              f"lower --lr or check the data")
        state.iteration = it + 1
        state.history.append([it, stats["loss"], stats["label"], stats["diffusion"],
                              time.perf_counter() - t0])
        smooth = stats["loss"] if smooth is None else 0.95 * smooth + 0.05 * stats["loss"]
        bar.set_postfix(loss=f"{smooth:.4f}", diff=f"{stats['diffusion']:.4f}")
        if state.iteration % opts.checkpoint_every == 0 or state.iteration == opts.iterations:
            write()
    model.eval()
    return state


def _to_cpu(obj):
    """``obj`` with every tensor moved to the CPU, so a GPU run's checkpoint loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_training_subjects(data_dir) -> tuple[list, dict]:
    """The training split of a Learn2Reg-layout dataset as ``[(image_HU, labels)]`` arrays,
    plus metadata (dataset name, image shape, spacing) recorded in the checkpoint."""
    from tqdm import tqdm

    from pddnet.data.io import load_nifti
    from pddnet.data.learn2reg import Learn2RegDataset

    dataset = Learn2RegDataset(data_dir)
    chosen = [s for s in dataset.train_subjects() if s.label is not None]
    if len(chosen) < 2:
        raise PddnetError(f"{data_dir}: training needs at least 2 training subjects with label "
                          f"maps, found {len(chosen)}")
    subjects, spacing = [], None
    for s in tqdm(chosen, desc="load", unit="subject", leave=False):
        img, lab = load_nifti(s.image, kind="image"), load_nifti(s.label, kind="label")
        if img.shape != lab.shape:
            raise PddnetError(f"{s.name}: image {img.shape} and labels {lab.shape} differ")
        spacing = spacing or [round(float(v), 4) for v in img.spacing]
        subjects.append((img.array, lab.array))
    meta = {"dataset": str(dataset.json_path.name), "image_shape": list(subjects[0][0].shape),
            "spacing_mm": spacing, "train_subjects": [s.name for s in chosen],
            "num_labels": NUM_CLASSES - 1}
    return subjects, meta
