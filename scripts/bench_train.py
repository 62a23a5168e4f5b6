"""Time of one training step: today's reference step vs the fast (separable) step, interleaved.

    PYTHONPATH=src .venv/bin/python scripts/bench_train.py --data DIR [--preset small]
        [--threads 2] [--repeats 5] [--profile]

``DIR`` is a Learn2Reg-layout dataset at the preset's geometry (for ``small``:
``pddnet data synth --out DIR --subjects 8 --preset small``, 96x80x128). One
:class:`pddnet.model.train.Trainer` (seeded initialisation, augmentation on) runs iterations
``0, 1, 2, ...``; each iteration is run twice from the same weights and optimiser state, once
as today's step (``ops.fast_gradients(False)``: the model's forward with the direct
correlation, the min-pooling's gradient through six ``torch.minimum``, the label loss sampling
the one-hot labels at every displacement) and once as the fast step (the default), in
alternating order; both steps' losses and, for the first pair, the parameter gradients are
compared. Wall-clock medians and the ratio come from the same run, so they compare on a shared
machine; absolute times do not.

With ``--profile`` the fast step's forward and backward are also timed per part (features,
correlation, mean field, label loss) once.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from pddnet.model import losses, ops
from pddnet.model.network import PDDNet
from pddnet.model.train import (
    NUM_CLASSES,
    Trainer,
    TrainOptions,
    load_training_subjects,
    regularise_fast,
)
from pddnet.spec.config import preset


def one_step(trainer: Trainer, iteration: int, fast: bool):
    """Iteration ``iteration`` as a full step; returns (seconds, loss, gradients)."""
    with ops.fast_gradients(fast):
        t0 = time.perf_counter()
        trainer.step(iteration)
        seconds = time.perf_counter() - t0
    grads = [None if p.grad is None else p.grad.detach().clone()
             for p in trainer.model.parameters()]
    return seconds, grads


def profile_parts(trainer: Trainer, iteration: int) -> None:
    cfg = trainer.model.config
    model = trainer.model
    rng = np.random.default_rng([trainer.opts.seed, iteration])
    a, b = rng.choice(len(trainer.images), size=2, replace=False)
    fixed, fl = trainer._sample(rng, int(a))
    moving, ml = trainer._sample(rng, int(b))
    model.train()
    times = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        times[name] = time.perf_counter() - t0
        return out

    cl = torch.channels_last_3d
    ff = timed("features (2 images)",
               lambda: (model.features(fixed, cl), model.features(moving, cl)))
    ssd = timed("correlation", lambda: ops.correlation_separable(
        *ff, cfg.grid, cfg.disp_size, cfg.capture, layout="disp"))
    neg_cost = timed("mean field", regularise_fast, model, ssd)
    L3 = cfg.disp_size ** 3
    probs = ops.softmax_scaled(neg_cost.reshape(L3, *cfg.grid), model.alpha[5], 0)
    disp = ops.displacement_set(cfg.disp_size, cfg.capture).reshape(L3, 3)
    grid_disp = (disp.T @ probs.reshape(L3, -1)).T.reshape(*cfg.grid, 3)
    pool = trainer.opts.label_pool
    f_oh = losses.pooled_one_hot(fl[0, 0], NUM_CLASSES, pool)
    m_oh = losses.pooled_one_hot(ml[0, 0], NUM_CLASSES, pool)
    label = timed("label loss", lambda: losses.nonlocal_label_loss(
        probs, f_oh, m_oh, cfg.grid, cfg.disp_size, cfg.capture, trainer.weights,
        trainer.opts.class_reduction, layout="disp"))
    loss = label + trainer.opts.diffusion_weight * losses.diffusion_penalty(grid_disp)
    # backward per part: stop the graph at each part's inputs
    t0 = time.perf_counter()
    loss.backward()
    total_bwd = time.perf_counter() - t0
    print("fast step, forward per part (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
          + f"; backward (all parts) {total_bwd:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subjects, meta = load_training_subjects(args.data)
    cfg = preset(args.preset)
    model = PDDNet(cfg, seed=0)
    trainer = Trainer(model, subjects, TrainOptions(iterations=1500, threads=args.threads))
    print(f"preset {args.preset}: grid {cfg.grid}, L {cfg.disp_size}, images "
          f"{meta['image_shape']}, {len(subjects)} subjects, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    times = {"today": [], "fast": []}
    for it in range(args.repeats):
        state = (copy.deepcopy(trainer.model.state_dict()),
                 copy.deepcopy(trainer.optimizer.state_dict()))
        order = ("today", "fast") if it % 2 == 0 else ("fast", "today")
        grads = {}
        for k, name in enumerate(order):
            if k:  # the second step of the pair starts from the same state
                trainer.model.load_state_dict(state[0])
                trainer.optimizer.load_state_dict(state[1])
            seconds, grads[name] = one_step(trainer, it, name == "fast")
            times[name].append(seconds)
        a = torch.cat([g.reshape(-1) for g in grads["fast"] if g is not None])
        b = torch.cat([g.reshape(-1) for g in grads["today"] if g is not None])
        rel = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
        print(f"iteration {it}: today {times['today'][-1]:.2f} s, fast {times['fast'][-1]:.2f} s "
              f"(gradient difference |fast - today| / |today| = {rel:.1e}, all parameters)",
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median of {args.repeats}: today {med['today']:.2f} s, fast {med['fast']:.2f} s per "
          f"step; ratio {med['today'] / med['fast']:.2f}x")
    if args.profile:
        profile_parts(trainer, args.repeats)


if __name__ == "__main__":
    main()
