"""The label-loss options of training (issue 13 part 4): the authors' class weights and
background weight, averaging over classes, full-resolution labels; and their CLI flags.

Not tested here: which options train better (measured on a selection set, docs/training.md),
the fast paths against the definitions (tests/model/test_fast_paths.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pddnet.errors import PddnetError
from pddnet.model import losses
from pddnet.model.network import PDDNet
from pddnet.model.train import NUM_CLASSES, Trainer, TrainOptions
from pddnet.spec.config import preset


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_class_weights_follow_the_authors_formula(rng):
    """sqrt(1 / count), mean 1 over the classes present, then the background weight."""
    maps = [rng.integers(0, 4, size=(6, 7, 5)) for _ in range(3)]
    counts = np.bincount(np.concatenate([m.ravel() for m in maps]), minlength=5).astype(float)
    w = 1.0 / np.sqrt(counts[:4])
    w /= w.mean()
    got = losses.class_weights(maps, 5).numpy()
    np.testing.assert_allclose(got[:4], w, rtol=1e-6)
    assert got[4] == 0.0  # absent class
    with_bg = losses.class_weights(maps, 5, background=0.15).numpy()
    np.testing.assert_allclose(with_bg[1:4], w[1:], rtol=1e-6)
    assert with_bg[0] == pytest.approx(0.15)


@pytest.mark.parametrize("fn", [losses.nonlocal_label_loss, losses.nonlocal_label_loss_direct])
def test_class_mean_is_the_sum_over_the_class_count(rng, fn):
    grid, L, q, n = (3, 4, 3), 3, 0.3, 5
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(*grid, L ** 3)) * 2), -1)
    fixed = losses.one_hot(torch.from_numpy(rng.integers(0, n, size=(9, 8, 7))), n).double()
    moving = losses.one_hot(torch.from_numpy(rng.integers(0, n, size=(9, 8, 7))), n).double()
    w = torch.from_numpy(rng.uniform(0.1, 2.0, n))
    total = fn(probs, fixed, moving, grid, L, q, w)
    mean = fn(probs, fixed, moving, grid, L, q, w, "mean")
    torch.testing.assert_close(mean, total / n)
    with pytest.raises(PddnetError, match="reduction"):
        fn(probs, fixed, moving, grid, L, q, w, "max")


def _subjects(rng, shape=(24, 24, 24)):
    return [(rng.normal(0, 300, shape).astype(np.float32), rng.integers(0, 6, shape))
            for _ in range(2)]


def test_trainer_applies_the_options(rng):
    """Full-resolution labels, class mean and background weight reach the loss: the trainer's
    loss equals the loss written out with those settings."""
    subjects = _subjects(rng)
    opts = TrainOptions(augment=False, label_pool=1, class_reduction="mean",
                        background_weight=0.15)
    trainer = Trainer(PDDNet(preset("tiny"), seed=1), subjects, opts)
    assert trainer.weights[0].item() == pytest.approx(0.15)
    cfg = trainer.model.config
    with torch.no_grad():
        label, _ = trainer.losses(trainer.images[0], trainer.labels[0], trainer.images[1],
                                  trainer.labels[1])
        out = trainer.model(trainer.images[0], trainer.images[1])
        f = losses.one_hot(trainer.labels[0][0, 0], NUM_CLASSES)  # no pooling
        m = losses.one_hot(trainer.labels[1][0, 0], NUM_CLASSES)
        want = losses.nonlocal_label_loss_direct(out.probs, f, m, cfg.grid, cfg.disp_size,
                                                 cfg.capture, trainer.weights, "mean")
    torch.testing.assert_close(label, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad,match", [({"label_pool": 3}, "label_pool"),
                                       ({"class_reduction": "max"}, "class_reduction"),
                                       ({"background_weight": -1.0}, "background_weight")])
def test_trainer_refuses_bad_options(rng, bad, match):
    with pytest.raises(PddnetError, match=match):
        Trainer(PDDNet(preset("tiny")), _subjects(rng), TrainOptions(**bad))


def test_cli_flags_reach_the_train_options(monkeypatch, tmp_path, rng):
    import pddnet.model.train as train_mod
    from pddnet.cli.model import train_cmd

    seen = {}

    def fake_train(subjects, cfg, out, opts, **kw):
        seen["opts"] = opts
        return train_mod.TrainState(iteration=1, history=[[0, 0.5, 0.4, 0.1, 0.0]])

    monkeypatch.setattr(train_mod, "load_training_subjects",
                        lambda d: (_subjects(rng), {"image_shape": [24] * 3, "spacing_mm": [1] * 3}))
    monkeypatch.setattr(train_mod, "train", fake_train)
    res = CliRunner().invoke(train_cmd, ["--data", str(tmp_path), "--out", str(tmp_path / "x.pt"),
                                         "--label-resolution", "full", "--class-reduction", "mean",
                                         "--background-weight", "0.15", "--diffusion-weight", "2"])
    assert res.exit_code == 0, res.output
    opts = seen["opts"]
    assert (opts.label_pool, opts.class_reduction, opts.background_weight,
            opts.diffusion_weight) == (1, "mean", 0.15, 2.0)
    res = CliRunner().invoke(train_cmd, ["--data", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 0, res.output
    defaults = TrainOptions()
    assert (seen["opts"].label_pool, seen["opts"].class_reduction,
            seen["opts"].background_weight) == (defaults.label_pool, defaults.class_reduction,
                                                defaults.background_weight)
