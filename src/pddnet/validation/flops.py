"""Analytic FLOP count of one PDD-Net forward pass (one pair), per block.

What is counted: the algorithm's *useful* floating-point operations -- the arithmetic that
computing each block's result needs, as the paper defines the block -- not the operations a
particular implementation executes. In particular we do not count the zeros that our ONNX
function bodies multiply (interpolation and smoothing applied as dense matrices), the folding
of BatchNorm or of the six alphas, or any recomputation; and we do count every block at the
cost of its standard efficient formulation where that is exact:

* one add, subtract, multiply, divide, comparison (min/max, ReLU), exp or log is 1 FLOP; a
  multiply-accumulate is 2;
* convolution: ``2 * C_in * k^3`` per output value, plus 1 for the bias (BatchNorm folded in
  eval mode) and 1 for a following ReLU;
* trilinear sampling where the sample points form a tensor-product lattice (OBELISK's shifted
  grids, the displaced control points of the correlation, the upsampling): separable, 3 FLOPs
  (2 multiplies, 1 add) per output value of each 1-D pass, per channel; the per-axis weights
  are O(n) and not counted. (A gather per point costs 15 per channel-sample instead.)
* box filters (3-wide average or min pooling): separable, 2 adds or 2 comparisons per output
  value per axis, plus 1 multiply per output for an average;
* correlation: ``3 C`` per control point and displacement (subtract, square, accumulate), i.e.
  ``C * K * L^3 * 3``, plus the sampling of the features at the (displaced) control points;
* min-convolution ``approx`` (the paper): a 3x3x3 min-pooling then two 3x3x3 average poolings
  over the displacement dimensions = 6 + 2 * 7 = 20 per cost-volume element; ``exact``
  (Felzenszwalb-Huttenlocher lower envelope, separable, linear time): an estimate of
  :data:`EXACT_ENVELOPE_FLOPS` per element and axis;
* grid smoothing (message passing): two 3x3x3 average poolings over the control grid = 14 per
  element; the mean-field combinations ``a1 + a0 D`` (2) and ``a4 + a2 D + a3 first`` (4);
* softmax of ``-a5 * cost`` over the ``L^3`` displacements: scale, max, subtract, exp, sum,
  divide = 6 per element; expectation: 3 components x (multiply + add) = 6 per element;
  entropy (optional): 3 per element;
* upsampling of the control-grid field to the image (3 components, separable trilinear) and
  the conversion to voxels (1 multiply per output value).

Both scans go through the feature network, so its blocks count twice. Nothing here needs
torch: the count is a function of the :class:`~pddnet.spec.config.PDDConfig` and the image
shape only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from pddnet.errors import PddnetError
from pddnet.spec.config import PDDConfig

#: estimated FLOPs per element and axis of the exact (lower-envelope) min-convolution: building
#: the envelope (an intersection: 2 subtracts, a divide, a compare; amortised twice per element)
#: and evaluating it (a compare, and ``p (q - v)^2 + f(v)``: subtract, 2 multiplies, add)
EXACT_ENVELOPE_FLOPS = 14

LERP = 3  # FLOPs per output value of a 1-D linear interpolation pass


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def lattice_sampling(channels: int, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Separable trilinear sampling of a ``channels``-channel map of ``in_shape`` on a
    tensor-product lattice of ``out_shape`` points: passes along i, then j, then k."""
    (oi, oj, ok), (_, nj, nk) = out_shape, in_shape
    return LERP * channels * (oi * nj * nk + oi * oj * nk + oi * oj * ok)


def pooled_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Output of the stride-2 average pooling (k3, p1): ``ceil(n / 2)`` per axis."""
    return tuple((int(n) + 1) // 2 for n in shape)  # type: ignore[return-value]


def stem_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Output of pooling then the stride-2 5x5x5 convolution (p2): ``ceil(ceil(n/2)/2)``."""
    return pooled_shape(pooled_shape(shape))


@dataclass
class FlopCount:
    """``blocks``: FLOPs per block, in pipeline order; ``total``; ``features``/``head`` sums."""

    config: dict[str, Any]
    image_shape: tuple[int, int, int]
    blocks: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.blocks.values())

    @property
    def features(self) -> int:
        return sum(v for k, v in self.blocks.items() if k.startswith("features."))

    @property
    def head(self) -> int:
        return self.total - self.features

    def as_dict(self) -> dict[str, Any]:
        tot = self.total or 1
        return {
            "total": self.total, "gflop": self.total / 1e9, "features": self.features,
            "head": self.head, "image_shape": list(self.image_shape),
            "blocks": dict(self.blocks),
            "share": {k: v / tot for k, v in self.blocks.items()},
            "definition": "useful FLOPs of the algorithm (pddnet.validation.flops docstring)",
        }

    def table(self) -> str:
        tot = self.total or 1
        lines = [f"{'block':<28} {'GFLOP':>10} {'share':>7}"]
        for k, v in self.blocks.items():
            lines.append(f"{k:<28} {v / 1e9:10.4f} {100 * v / tot:6.1f}%")
        lines.append(f"{'total':<28} {self.total / 1e9:10.4f} {100.0:6.1f}%")
        return "\n".join(lines)


def count_flops(config: PDDConfig, image_shape: Sequence[int], *,
                outputs: Sequence[str] = ()) -> FlopCount:
    """Useful FLOPs of one forward pass of ``config`` on a pair of ``image_shape`` (module
    docstring), per block. ``outputs`` may include ``"entropy"`` (``probs`` costs nothing)."""
    if len(image_shape) != 3 or min(int(n) for n in image_shape) < 6:
        raise PddnetError(f"count_flops: image_shape must be three sizes >= 6, got "
                          f"{tuple(image_shape)}")
    shape = tuple(int(n) for n in image_shape)
    c = config.channels
    grid, L = config.grid, config.disp_size
    K, D = _prod(grid), L ** 3
    F = PDDConfig.feature_shape(shape)
    nF = _prod(F)
    P = pooled_shape(shape)
    S = stem_shape(shape)
    ni, nj, nk = shape
    b: dict[str, int] = {}

    # --- feature network (shared weights), once per scan -----------------------------------
    def conv(cin: int, cout: int, k: int, n_out: int, *, bias: bool = True,
             relu: bool = True) -> int:
        return n_out * cout * (2 * cin * k ** 3 + int(bias) + int(relu))

    pool = 2 * (P[0] * nj * nk + P[0] * P[1] * nk + P[0] * P[1] * P[2]) + _prod(P)
    b["features.avgpool"] = 2 * pool
    b["features.conv0"] = 2 * conv(1, 4, 5, _prod(S))          # BN folded -> bias, ReLU
    n_offsets = 2 * (2 * c)                                     # two sets of 2c offsets
    sampling = n_offsets * lattice_sampling(4, S, F) + 4 * (2 * c) * nF  # + the difference
    b["features.obelisk_sampling"] = 2 * sampling
    b["features.conv1"] = 2 * conv(8 * c, 4 * c, 1, nF)
    b["features.conv2"] = 2 * conv(4 * c, 4 * c, 3, nF)
    b["features.conv3"] = 2 * conv(4 * c, c, 1, nF, relu=False)

    # --- correlation -----------------------------------------------------------------------
    displaced = tuple(g * L for g in grid)                      # per axis: control x offsets
    b["correlation.sampling"] = (lattice_sampling(c, F, displaced)   # moving, displaced
                                 + lattice_sampling(c, F, grid))     # fixed, control points
    b["correlation.ssd"] = 3 * c * K * D

    # --- regularisation: two mean-field iterations -------------------------------------------
    b["data_cost"] = 2 * K * D                                  # a1 + a0 * SSD
    if config.minconv == "approx":
        per = 6 + 2 * 7
    else:
        per = 3 * EXACT_ENVELOPE_FLOPS
    b["minconv"] = 2 * per * K * D
    b["grid_smoothing"] = 2 * 14 * K * D
    b["second_input"] = 4 * K * D                               # a4 + a2 D + a3 first

    # --- probabilities, expectation, dense field -------------------------------------------
    b["softmax"] = 6 * K * D
    b["expectation"] = 6 * K * D
    if "entropy" in outputs:
        b["entropy"] = 3 * K * D
    up = 3 * lattice_sampling(1, grid, shape)                   # 3 components
    b["upsampling"] = up + 3 * ni * nj * nk                     # + to voxels
    return FlopCount(config.as_dict(), shape, b)
