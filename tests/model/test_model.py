"""The PyTorch network, checkpoints and training loop.

Known-answer registration with identity-like features; the published size of the paper
preset; checkpoint round trip and refusal of pickled objects; training determinism and
resume; an ``mr`` model's training is independent of the input intensity scale. Not tested here: registration quality of trained weights (a benchmark:
``pddnet evaluate``), the ops one by one (tests/model/test_ops.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from pddnet.errors import PddnetError
from pddnet.model import losses
from pddnet.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from pddnet.model.network import PDDNet
from pddnet.model.train import TrainOptions, train
from pddnet.spec.config import Intensity, PDDConfig, preset


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_known_shift_is_recovered_with_identity_features(rng):
    """Moving = fixed translated by s voxels; the model must return u = s inside the volume.

    The shift stays two lattice steps inside the capture range: replicate padding of the
    poolings biases minima within two steps of the displacement border towards it.
    """
    n = 32
    base = ndi.gaussian_filter(rng.normal(size=(n + 16,) * 3), 1.5)
    base /= base.std()
    shift = rng.integers(-2, 3, size=3)
    c = 8
    fixed = base[c:c + n, c:c + n, c:c + n]
    moving = base[c - shift[0]:c - shift[0] + n, c - shift[1]:c - shift[1] + n,
                  c - shift[2]:c - shift[2] + n]
    L = 11  # lattice step of one voxel: displacements -5..5
    cfg = PDDConfig(channels=1, grid=(8, 8, 8), disp_size=L, capture=(L - 1) / n,
                    alpha_init=(300.0, 0.0, 1.0, 1.0, 0.0, 1.0))
    model = PDDNet(cfg).double()
    with torch.no_grad():
        reg = model.register_features(torch.from_numpy(fixed.copy())[None, None],
                                      torch.from_numpy(moving.copy())[None, None])
        dense = reg.dense((n, n, n)).numpy()
    inner = dense[6:-6, 6:-6, 6:-6].reshape(-1, 3)
    np.testing.assert_allclose(np.median(inner, 0), shift, atol=0.1)
    assert np.abs(inner - shift).max() < 0.8


def test_paper_preset_has_published_size():
    model = PDDNet(preset("paper"))
    assert 115_000 < model.parameter_count() < 125_000  # "about 120k weights"
    assert model.alpha.shape == (6,)


def test_forward_shapes_and_probabilities(rng):
    cfg = preset("tiny")
    model = PDDNet(cfg, seed=1).eval()
    shape = (24, 21, 27)
    fixed = torch.from_numpy(rng.normal(size=(1, 1, *shape)).astype(np.float32))
    moving = torch.from_numpy(rng.normal(size=(1, 1, *shape)).astype(np.float32))
    with torch.no_grad():
        out = model(fixed, moving)
    G, L = cfg.grid, cfg.disp_size
    assert out.cost.shape == (*G, L, L, L)
    assert out.probs.shape == (*G, L ** 3)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(G), atol=1e-5, rtol=0)
    assert out.dense(shape).shape == (*shape, 3)
    assert out.grid_disp.abs().max() <= cfg.capture + 1e-6
    with pytest.raises(PddnetError, match="same shape|one shape"):
        model(fixed, moving[..., :-1])


def test_checkpoint_round_trip(tmp_path, rng):
    model = PDDNet(preset("tiny", minconv="exact"), seed=3).eval()
    with torch.no_grad():
        model.alpha.add_(torch.from_numpy(rng.normal(size=6).astype(np.float32)))
    path = save_checkpoint(tmp_path / "m.pt", model, image_shape=(24, 24, 24))
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["config"]["minconv"] == "exact"
    loaded, ckpt = load_model(path)
    assert ckpt["image_shape"] == [24, 24, 24]
    x = torch.from_numpy(rng.normal(size=(1, 1, 24, 24, 24)).astype(np.float32))
    y = torch.from_numpy(rng.normal(size=(1, 1, 24, 24, 24)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(x, y).grid_disp, loaded(x, y).grid_disp)


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "pddnet-checkpoint", "payload": _Evil()}, path)
    with pytest.raises(PddnetError, match="unpickling"):
        read_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PddnetError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(PddnetError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def _toy_subjects(rng, n=3, shape=(24, 24, 24)):
    subjects = []
    for _ in range(n):
        lab = np.zeros(shape, np.uint8)
        for label in range(1, 5):
            c = rng.integers(5, np.array(shape) - 5)
            lab[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = label
        img = (lab * 80.0 - 300.0 + rng.normal(0, 20, shape)).astype(np.float32)
        subjects.append((img, lab))
    return subjects


def test_training_is_deterministic_and_resumes_exactly(tmp_path, rng):
    subjects = _toy_subjects(rng)
    cfg = preset("tiny")
    opts = TrainOptions(iterations=4, checkpoint_every=2, seed=int(rng.integers(1000)))
    torch.manual_seed(0)
    state = train(subjects, cfg, tmp_path / "full.pt", opts, progress=False)
    assert state.iteration == 4 and len(state.history) == 4
    half = TrainOptions(**{**opts.__dict__, "iterations": 2})
    train(subjects, cfg, tmp_path / "part.pt", half, progress=False)
    train(subjects, cfg, tmp_path / "resumed.pt", opts, resume=tmp_path / "part.pt", progress=False)
    a = read_checkpoint(tmp_path / "full.pt")
    b = read_checkpoint(tmp_path / "resumed.pt")
    assert b["train"]["iteration"] == 4
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=1e-6, rtol=1e-5)
    with pytest.raises(PddnetError, match="already at iteration"):
        train(subjects, cfg, tmp_path / "x.pt", opts, resume=tmp_path / "full.pt", progress=False)


def test_fine_tuning_starts_from_the_given_weights_on_another_grid(tmp_path, rng):
    subjects = _toy_subjects(rng)
    cfg = preset("tiny")
    opts = TrainOptions(iterations=2, checkpoint_every=2, seed=int(rng.integers(1000)))
    train(subjects, cfg, tmp_path / "base.pt", opts, progress=False)
    base = read_checkpoint(tmp_path / "base.pt")["state_dict"]
    finer = preset("tiny", grid=(8, 8, 8), capture=0.2)
    zero_lr = TrainOptions(**{**opts.__dict__, "iterations": 1, "lr": 0.0})
    train(subjects, finer, tmp_path / "ft.pt", zero_lr, init=tmp_path / "base.pt", progress=False)
    ft = read_checkpoint(tmp_path / "ft.pt")
    assert tuple(ft["config"]["grid"]) == (8, 8, 8) and ft["train"]["iteration"] == 1
    for k, v in base.items():  # with lr 0 the weights are exactly the initial ones
        if k.endswith("num_batches_tracked") or "running_" in k:
            continue  # batch-norm statistics move in training mode even with lr 0
        torch.testing.assert_close(ft["state_dict"][k], v, atol=0, rtol=0)
    fresh = PDDNet(finer, seed=opts.seed).state_dict()
    assert not torch.equal(fresh["features.conv1.weight"], ft["state_dict"]["features.conv1.weight"])
    wide = preset("tiny", channels=6)
    with pytest.raises(PddnetError, match="does not fit"):
        train(subjects, wide, tmp_path / "bad.pt", opts, init=tmp_path / "base.pt", progress=False)
    with pytest.raises(PddnetError, match="not both"):
        train(subjects, cfg, tmp_path / "bad.pt", opts, init=tmp_path / "base.pt",
              resume=tmp_path / "base.pt", progress=False)
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_training_on_a_missing_gpu_is_refused(tmp_path, rng):
    opts = TrainOptions(iterations=1, device="cuda")
    with pytest.raises(PddnetError, match="no CUDA GPU.*--device cpu"):
        train(_toy_subjects(rng), preset("tiny"), tmp_path / "x.pt", opts, progress=False)
    assert not (tmp_path / "x.pt").exists()


def test_label_loss_is_zero_for_perfect_match_and_positive_otherwise(rng):
    cfg = PDDConfig(channels=1, grid=(4, 4, 4), disp_size=3, capture=0.2)
    lab = torch.from_numpy(rng.integers(0, 3, size=(12, 12, 12)))
    onehot = losses.one_hot(lab, 3).double()
    L3 = cfg.disp_size ** 3
    probs = torch.zeros(4, 4, 4, L3, dtype=torch.float64)
    probs[..., L3 // 2] = 1.0  # all mass on the zero displacement
    w = torch.ones(3, dtype=torch.float64)
    same = losses.nonlocal_label_loss(probs, onehot, onehot, cfg.grid, cfg.disp_size, cfg.capture, w)
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    other = losses.one_hot(torch.from_numpy(rng.integers(0, 3, size=(12, 12, 12))), 3).double()
    diff = losses.nonlocal_label_loss(probs, onehot, other, cfg.grid, cfg.disp_size, cfg.capture, w)
    assert float(diff) > 1e-3


def test_diffusion_penalty_known_value():
    g = torch.zeros(4, 5, 6, 3, dtype=torch.float64)
    g[..., 0] = torch.arange(4, dtype=torch.float64).view(4, 1, 1) * 0.1  # slope 0.1 along i
    # mean over every element, the three displacement components included
    assert float(losses.diffusion_penalty(g)) == pytest.approx(0.01 / 3, abs=1e-12)


def test_mr_training_does_not_depend_on_the_intensity_scale(tmp_path, rng):
    """An ``mr`` model trained on ``a * image + b`` (a > 0) sees what it sees trained on
    ``image``: training normalises with the contract's z-score, so the network inputs and the
    first step's loss agree; a ``ct`` model's do not (the control). Weights after Adam steps are
    not compared: Adam's first update is about ``lr * sign(gradient)``, so float32 rounding of
    the rescaled image flips the step of near-zero gradients."""
    from pddnet.model.train import Trainer

    subjects = _toy_subjects(rng)
    a, b = float(10 ** rng.uniform(-2, 2)), float(rng.uniform(-50, 50))
    scaled = [((img.astype(np.float64) * a + b * a).astype(np.float32), lab)
              for img, lab in subjects]
    opts = TrainOptions(iterations=2, checkpoint_every=2, seed=int(rng.integers(1000)))
    inputs, loss = {}, {}
    for mode in ("mr", "ct"):
        cfg = preset("tiny", intensity=Intensity(mode=mode))
        for name, data in (("plain", subjects), ("scaled", scaled)):
            trainer = Trainer(PDDNet(cfg, seed=0), data, opts)
            inputs[mode, name] = torch.cat([im.reshape(-1) for im in trainer.images])
            loss[mode, name] = trainer.step(0)["loss"]
    torch.testing.assert_close(inputs["mr", "plain"], inputs["mr", "scaled"], atol=1e-4,
                               rtol=1e-4)
    assert loss["mr", "plain"] == pytest.approx(loss["mr", "scaled"], rel=1e-3)
    assert not torch.allclose(inputs["ct", "plain"], inputs["ct", "scaled"], atol=1e-2)
    # and the mode travels with the checkpoint
    cfg = preset("tiny", intensity=Intensity(mode="mr"))
    train(subjects, cfg, tmp_path / "mr.pt", TrainOptions(iterations=1, checkpoint_every=1),
          progress=False)
    assert read_checkpoint(tmp_path / "mr.pt")["config"]["intensity"]["mode"] == "mr"
