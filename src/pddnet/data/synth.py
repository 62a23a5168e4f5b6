"""Synthetic abdominal CT: the embedded dataset for the demo and the tests.

Each subject is rendered from a *template anatomy* described in millimetres (x = patient
left -> right, y = posterior -> anterior, z = inferior -> superior, origin at the centre of the
field of view) after three layers of random variation, all drawn from ``(seed, index)`` only:

* a subject-specific global affine (body size per axis, a few degrees of rotation, a shift of
  1-3 cm, most of it along z: where the scan starts on the patient),
* a smooth random nonlinear deformation (a low-frequency tensor-product Fourier field,
  ~1 cm RMS) applied to the whole anatomy,
* per-organ variation: shift, size, orientation, shape (low-frequency radial perturbations of
  implicit surfaces, bending and tapering), breathing (diaphragm height, which moves the upper
  abdominal organs together), stomach/bladder filling, fat amount, contrast phase.

Every voxel gets its template coordinate ``t(x) = A^-1 (x - T) + d(x)``; each structure is an
implicit surface (a deformed ellipsoid or a tube along a smooth curve) evaluated on the
template coordinates inside its own bounding box only. Structures are painted in a fixed order
(later ones win); organs are painted only inside the abdominal cavity and never into bone or
the back and psoas muscles, so labels cannot overlap and always lie inside the body.

Labels are the 13 of the Learn2Reg abdomen CT-CT task, numbered as there (see :data:`LABELS`).

``contrast="mr"`` renders the same subject (same labels) as an MR-like image instead: another
tissue order, a smooth multiplicative bias field, noise, and an arbitrary intensity scale and
offset per subject (:func:`_mr_contrast`), for models with the ``mr`` intensity normalisation.

Dataset layout and splits (:func:`write_dataset`): Learn2Reg's ``imagesTr/`` (int16 HU),
``labelsTr/`` (uint8) and ``PddnetSynth_dataset.json``. With N >= 8 subjects the last 4 are
the test subjects, the 2 before them validation and the rest training. With 4 <= N < 8 the
split scales down to 2 test, 2 validation and N - 4 training subjects (none for N = 4); fewer
than 4 subjects is an error. Registration pairs are *all ordered pairs* (fixed, moving),
fixed != moving, within a split: 12 test pairs for 4 test subjects, 2 validation pairs.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from pddnet.errors import PddnetError

GENERATOR = "pddnet.data.synth"
#: Bumped whenever the rendered content for a given (preset, seed, index) changes.
GENERATOR_VERSION = "1"
DATASET_NAME = "PddnetSynth"

#: Learn2Reg abdomen CT-CT label numbering.
LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "left adrenal gland",
    13: "right adrenal gland",
}

HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class SynthPreset:
    name: str
    shape: tuple[int, int, int]
    spacing: float  # mm, isotropic


#: ``l2r``: the Learn2Reg abdomen CT-CT grid; ``small``: the same field of view at 4 mm.
PRESETS: dict[str, SynthPreset] = {
    "small": SynthPreset("small", (96, 80, 128), 4.0),
    "l2r": SynthPreset("l2r", (192, 160, 256), 2.0),
}


@dataclass(frozen=True)
class _Variation:
    """Standard deviations of the inter-subject variation (tuned for ~30% initial Dice)."""

    size_sd: float = 0.05        # log body size, shared by the axes
    axis_scale_sd: float = 0.04  # log scale per axis
    rot_deg: tuple[float, float, float] = (1.0, 1.5, 2.5)  # global rotation about x, y, z
    shift_mm: tuple[float, float, float] = (4.0, 3.0, 14.0)
    warp_mm: float = 4.5         # RMS of the smooth nonlinear deformation
    warp_wavelength: tuple[float, float] = (350.0, 800.0)
    breath_mm: float = 6.5       # diaphragm height
    organ_shift_mm: float = 4.0
    organ_scale_sd: float = 0.06
    organ_rot_deg: float = 6.0
    shape_amp: float = 0.08      # RMS radial surface perturbation (fraction of the radius)


_VAR = _Variation()


def _preset(preset: str | SynthPreset) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise PddnetError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def preset_affine(preset: str | SynthPreset) -> np.ndarray:
    """RAS+ affine of a preset grid: diagonal spacing, origin so the grid is centred on 0."""
    p = _preset(preset)
    aff = np.diag([p.spacing, p.spacing, p.spacing, 1.0])
    aff[:3, 3] = -(np.asarray(p.shape, dtype=np.float64) - 1.0) / 2.0 * p.spacing
    return aff


# --------------------------------------------------------------------------------------------
# Random smooth functions
# --------------------------------------------------------------------------------------------

def _tn(rng: np.random.Generator, sd: float, size=None, lim: float = 2.5):
    """Normal draw clipped at +-lim standard deviations (no implausible outliers)."""
    return np.clip(rng.normal(0.0, sd, size), -lim * sd, lim * sd)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx (angles in radians)."""
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Field:
    """A smooth random scalar field on world coordinates, separable so that it is cheap.

    ``f(x, y, z) = sum_abc C_abc bx_a(x) by_b(y) bz_c(z)`` with random-frequency cosines
    ``b(s) = sqrt(2) cos(w s + phi)``; the RMS of ``f`` is about ``amp``.
    """

    def __init__(self, rng: np.random.Generator, terms: int, wavelength: tuple[float, float],
                 amp: float):
        k = terms
        self.omega = 2 * np.pi / rng.uniform(wavelength[0], wavelength[1], size=(3, k))
        self.phase = rng.uniform(0, 2 * np.pi, size=(3, k))
        self.coef = rng.standard_normal((k, k, k)) * (amp / k ** 1.5)

    def __call__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        b = [np.sqrt(2.0) * np.cos(np.asarray(s, np.float64)[:, None] * self.omega[a]
                                   + self.phase[a]) for a, s in enumerate((xs, ys, zs))]
        t1 = np.tensordot(b[0], self.coef, axes=(1, 0))            # (nx, kb, kc)
        t2 = np.einsum("ibc,jb->ijc", t1, b[1])                    # (nx, ny, kc)
        out = t2.astype(np.float32) @ b[2].T.astype(np.float32)    # (nx, ny, nz)
        return np.ascontiguousarray(out)


class _Noise:
    """A smooth isotropic random field (unit RMS) on world coordinates.

    White noise on a coarse grid over the field of view (spacing ``sigma / 1.5``), Gaussian
    filtered and normalised, then interpolated linearly (separably, so a box of the output grid
    costs a few passes over that box). The grid is the same at every preset.
    """

    HALF = (200.0, 168.0, 264.0)  # covers the largest field of view (384 x 320 x 512 mm)

    def __init__(self, rng: np.random.Generator, sigma_mm: float):
        self.h = sigma_mm / 1.5
        self.n = [int(math.ceil(2 * e / self.h)) + 2 for e in self.HALF]
        g = rng.standard_normal(self.n, dtype=np.float32)
        g = ndimage.gaussian_filter(g, 1.5, mode="wrap", truncate=3.0)
        g /= np.float32(g.std())
        self.grid = g

    def __call__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        out = self.grid
        for a, s in ((2, zs), (1, ys), (0, xs)):
            c = (np.asarray(s, np.float64) + self.HALF[a]) / self.h
            c = np.clip(c, 0.0, self.n[a] - 1.001)
            i = np.floor(c).astype(np.intp)
            w = (c - i).astype(np.float32)
            lo, hi = int(i.min()), int(i.max()) + 2
            sub = out[(slice(None),) * a + (slice(lo, hi),)]
            shp = [1, 1, 1]
            shp[a] = len(w)
            w = w.reshape(shp)
            out = np.take(sub, i - lo, axis=a) * (1 - w) + np.take(sub, i - lo + 1, axis=a) * w
        return out


class _Waves:
    """A sum of plane waves in arbitrary (non-separable) coordinates, clipped to +-2.5 RMS."""

    def __init__(self, rng: np.random.Generator, n: int, freq: tuple[float, float], amp: float):
        dirs = rng.standard_normal((n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.k = dirs * rng.uniform(freq[0], freq[1], size=(n, 1))
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        self.a = amp * math.sqrt(2.0 / n)
        self.bound = 2.5 * amp

    def __call__(self, u0: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(u0.shape, u1.shape, u2.shape), np.float32)
        for (k0, k1, k2), ph in zip(self.k, self.phase):
            out += np.cos(np.float32(k0) * u0 + np.float32(k1) * u1 + np.float32(k2) * u2
                          + np.float32(ph))
        out *= np.float32(self.a)
        np.clip(out, -self.bound, self.bound, out=out)
        return out


# --------------------------------------------------------------------------------------------
# Shapes in template coordinates
# --------------------------------------------------------------------------------------------

class _Blob:
    """A deformed ellipsoid: bent, tapered and radially perturbed; ``sdf`` is ~mm, < 0 inside.

    Local coordinates ``u = R^T (t - centre) / radii``; then ``u1 += bend1 u0^2``,
    ``u2 += bend2 u0^2``; ``u1, u2 /= 1 + taper u0``; inside where ``|u| < 1 + g(u)`` with
    ``g`` a smooth random function (waves in local coordinates).
    """

    def __init__(self, centre, radii, rot=None, bend=(0.0, 0.0), taper=0.0, waves=None):
        self.centre = np.asarray(centre, np.float64)
        self.radii = np.asarray(radii, np.float64)
        self.rot = np.eye(3) if rot is None else np.asarray(rot, np.float64)
        self.bend = bend
        self.taper = taper
        self.waves = waves

    def jitter(self, rng: np.random.Generator, shift_mm: float, scale_sd: float,
               rot_deg: float, size: float = 1.0) -> "_Blob":
        """Apply a random per-organ shift, anisotropic size change and rotation (in place)."""
        self.centre = self.centre + _tn(rng, shift_mm, 3)
        self.radii = self.radii * np.exp(_tn(rng, scale_sd, 3, lim=2.0)) * size
        self.rot = _rotation(*np.deg2rad(_tn(rng, rot_deg, 3))) @ self.rot
        return self

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        g = 1.0 + (self.waves.bound if self.waves is not None else 0.0)
        s = 1.0 + abs(self.taper) * g
        ext = np.array([g, g * s + abs(self.bend[0]) * g * g, g * s + abs(self.bend[1]) * g * g])
        half = np.abs(self.rot) @ (ext * self.radii)
        return self.centre - half, self.centre + half

    def local(self, t):
        p = [t[a] - np.float32(self.centre[a]) for a in range(3)]
        u = []
        for k in range(3):
            r = self.rot[:, k] / self.radii[k]
            u.append(np.float32(r[0]) * p[0] + np.float32(r[1]) * p[1] + np.float32(r[2]) * p[2])
        return u

    def sdf(self, t) -> np.ndarray:
        u0, u1, u2 = self.local(t)
        if self.bend[0]:
            u1 += np.float32(self.bend[0]) * u0 * u0
        if self.bend[1]:
            u2 += np.float32(self.bend[1]) * u0 * u0
        if self.taper:
            s = np.maximum(1.0 + np.float32(self.taper) * u0, np.float32(0.3))
            u1 /= s
            u2 /= s
        rho = np.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
        rho -= 1.0
        if self.waves is not None:
            rho -= self.waves(u0, u1, u2)
        rho *= np.float32(float(np.mean(self.radii)))
        return rho


def _frame(axis0, hint2) -> np.ndarray:
    """Right-handed orthonormal frame (columns) with axis 0 along ``axis0`` and axis 2 as close
    to ``hint2`` as possible."""
    a0 = np.asarray(axis0, np.float64)
    a0 = a0 / np.linalg.norm(a0)
    a2 = np.asarray(hint2, np.float64)
    a2 = a2 - (a2 @ a0) * a0
    a2 = a2 / np.linalg.norm(a2)
    return np.column_stack([a0, np.cross(a2, a0), a2])


def _catmull_rom(ctrl: np.ndarray, per: int) -> np.ndarray:
    """Points along a Catmull-Rom spline through the rows of ``ctrl`` (any number of columns)."""
    ctrl = np.asarray(ctrl, np.float64)
    if len(ctrl) == 2:
        s = np.linspace(0, 1, per + 1)[:, None]
        return ctrl[0] * (1 - s) + ctrl[1] * s
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    out = []
    s = np.linspace(0, 1, per, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * s ** 3))
    out.append(ctrl[-1:])
    return np.vstack(out)


class _Tube:
    """A tube of varying radius along a smooth curve through control points (template mm)."""

    def __init__(self, ctrl, radii, waves: _Waves | None = None, per: int = 4):
        ctrl = np.asarray(ctrl, np.float64)
        radii = np.broadcast_to(np.asarray(radii, np.float64), (len(ctrl),))
        curve = _catmull_rom(np.column_stack([ctrl, radii]), per)
        self.points = curve[:, :3]
        self.radii = np.maximum(curve[:, 3], 0.5)
        self.waves = waves  # perturbation in mm, frequencies in rad/mm

    def jitter(self, rng: np.random.Generator, shift_mm: float, point_mm: float,
               size: float = 1.0) -> "_Tube":
        self.points = self.points + _tn(rng, shift_mm, 3)
        n = len(self.points)
        # smooth per-point wobble: a random walk low-passed along the curve
        wob = ndimage.gaussian_filter1d(rng.normal(0.0, point_mm, (n, 3)), sigma=max(n / 6, 1),
                                        axis=0, mode="nearest") * math.sqrt(max(n / 6, 1))
        self.points = self.points + wob
        self.radii = self.radii * size
        return self

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.waves.bound if self.waves is not None else 0.0
        r = self.radii[:, None] + w
        return (self.points - r).min(axis=0), (self.points + r).max(axis=0)


# --------------------------------------------------------------------------------------------
# The canvas: world grid, template coordinates, painting
# --------------------------------------------------------------------------------------------

class _Canvas:
    def __init__(self, preset: SynthPreset, lin: np.ndarray, shift: np.ndarray, warp: list):
        self.shape = preset.shape
        self.sp = preset.spacing
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * self.sp for n in self.shape]
        self.lin = lin            # template -> world linear part
        self.shift = shift        # world = lin @ t_lin + shift
        inv = np.linalg.inv(lin)
        t = []
        self.dmax = np.zeros(3)
        for c in range(3):
            d = warp[c](*self.axes)
            self.dmax[c] = float(np.abs(d).max())
            part = [(inv[c, a] * (self.axes[a] - shift[a])).astype(np.float32) for a in range(3)]
            d += (part[0][:, None, None] + part[1][None, :, None]) + part[2][None, None, :]
            t.append(d)
        self.t = t
        self.img = np.full(self.shape, -1000.0, np.float32)
        self.lab = np.zeros(self.shape, np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel box containing every voxel whose template coordinate lies in [lo, hi]."""
        lo = np.asarray(lo, np.float64) - self.dmax - self.sp
        hi = np.asarray(hi, np.float64) + self.dmax + self.sp
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        world = corners @ self.lin.T + self.shift
        n = np.asarray(self.shape)
        i0 = np.floor(world.min(axis=0) / self.sp + (n - 1) / 2.0).astype(int)
        i1 = np.ceil(world.max(axis=0) / self.sp + (n - 1) / 2.0).astype(int) + 1
        i0 = np.clip(i0, 0, n)
        i1 = np.clip(i1, 0, n)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1))

    def coords(self, sl):
        return [self.t[a][sl] for a in range(3)]

    def world(self, sl):
        return [self.axes[a][sl[a]] for a in range(3)]

    def blob_sdf(self, blob: _Blob):
        sl = self.box(*blob.box())
        if sl is None:
            return None, None
        return sl, blob.sdf(self.coords(sl))

    def tube_sdf(self, tube: _Tube):
        lo, hi = tube.box()
        sl = self.box(lo, hi)
        if sl is None:
            return None, None
        f = np.full(tuple(s.stop - s.start for s in sl), np.inf, np.float32)
        p, r = tube.points, tube.radii
        for i in range(len(p) - 1):
            a, b, ra, rb = p[i], p[i + 1], r[i], r[i + 1]
            rr = max(ra, rb) + (tube.waves.bound if tube.waves is not None else 0.0)
            ss = self.box(np.minimum(a, b) - rr, np.maximum(a, b) + rr)
            if ss is None:
                continue
            ss = tuple(slice(max(q.start, s.start), min(q.stop, s.stop)) for q, s in zip(ss, sl))
            if any(q.stop <= q.start for q in ss):
                continue
            t = self.coords(ss)
            ab = b - a
            ll = float(ab @ ab) or 1e-9
            pa = [t[c] - np.float32(a[c]) for c in range(3)]
            h = (pa[0] * np.float32(ab[0]) + pa[1] * np.float32(ab[1])
                 + pa[2] * np.float32(ab[2])) / np.float32(ll)
            np.clip(h, 0.0, 1.0, out=h)
            dist2 = sum((pa[c] - h * np.float32(ab[c])) ** 2 for c in range(3))
            fs = np.sqrt(dist2) - (np.float32(ra) + h * np.float32(rb - ra))
            loc = tuple(slice(q.start - s.start, q.stop - s.start) for q, s in zip(ss, sl))
            np.minimum(f[loc], fs, out=f[loc])
        if tube.waves is not None:
            t = self.coords(sl)
            fin = np.isfinite(f)
            f[fin] -= tube.waves(t[0][fin], t[1][fin], t[2][fin])
        return sl, f

    def paint(self, sl, mask, value, label: int | None = None) -> None:
        if sl is None:
            return
        view = self.img[sl]
        if np.ndim(value) == 0:
            view[mask] = value
        else:
            view[mask] = value[mask]
        if label is not None:
            self.lab[sl][mask] = label


# --------------------------------------------------------------------------------------------
# The anatomy
# --------------------------------------------------------------------------------------------

def _spine_y(tz):
    """Centre (y, mm) of the vertebral bodies along z: a gentle lumbar lordosis."""
    return -52.0 + 9.0 * np.exp(-((tz + 60.0) / 110.0) ** 2) - 10.0 * np.clip(
        (-170.0 - tz) / 80.0, 0.0, None)


def _soft_ellipse(x, y, a, b):
    """Squared-ish normalised radius of a rounded-rectangle ellipse (level 1 = boundary)."""
    u = (x / a) ** 2
    v = (y / b) ** 2
    return 0.6 * (u + v) + 0.4 * np.sqrt(u * u + v * v)


#: Reference y (mm) of the vertebral bodies used to place structures (actual spine: _spine_y).
_YS = -52.0


# ---------------- subject-level parameters ----------------

class _Draw:
    """The subject's anatomy random stream plus the draw helpers used to place structures.

    Everything below draws from one stream in a fixed order (subject parameters, then the
    structures in :func:`_place_anatomy`'s order, arguments left to right): moving or adding a
    draw changes every later structure, so it needs a new :data:`GENERATOR_VERSION`.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def n(self, sd=1.0, size=None, lim=2.5):
        """Normal draw truncated (clipped) at +-lim standard deviations."""
        return _tn(self.rng, sd, size, lim)

    def u(self, lo, hi, size=None):
        """Uniform draw in [lo, hi)."""
        return self.rng.uniform(lo, hi, size)

    def organ(self, blob: _Blob, size_sd=_VAR.organ_scale_sd, size=1.0,
              shift=_VAR.organ_shift_mm) -> _Blob:
        """Per-organ shift (mm), anisotropic size change and rotation of ``blob``, in place."""
        return blob.jitter(self.rng, shift, size_sd, _VAR.organ_rot_deg, size)

    def waves(self, amp=_VAR.shape_amp, freq=(1.4, 3.2), k=6) -> _Waves:
        """Radial perturbation of a blob's surface (in its local, radius-normalised units)."""
        return _Waves(self.rng, k, freq, amp)

    def tube_waves(self, amp_mm, freq=(0.03, 0.09), k=5) -> _Waves:
        """Perturbation of a tube's surface (amplitude in mm, frequencies in rad/mm)."""
        return _Waves(self.rng, k, freq, amp_mm)


@dataclass
class _Subject:
    """Subject-level parameters; lengths in mm (template coordinates unless stated)."""

    lin: np.ndarray          # 3x3 template -> world linear part (rotation @ diag(scale))
    gshift: np.ndarray       # (3,) world shift: world = lin @ t + gshift
    warp: list               # 3 _Field: smooth template displacement per axis
    tex_field: _Noise        # smooth tissue texture (unit RMS, world coordinates)
    bowel_field: _Noise      # bowel loops vs visceral fat
    gas_field: _Noise        # gas in the bowel, colon, duodenum and stomach
    A_c: float               # cavity half-width (LR)
    B_ca: float              # cavity anterior half-depth
    B_cp: float              # cavity posterior half-depth
    wall: float              # abdominal wall (muscle) thickness
    fat: float               # subcutaneous fat, laterally
    fat_ant: float           # ... anteriorly
    fat_post: float          # ... posteriorly
    post_wall: float         # posterior wall (back muscles) thickness
    breath: float            # diaphragm height offset
    visc_fat: float          # amount of visceral fat vs bowel, in [0, 1)
    contrast: float          # contrast phase: vessel / organ enhancement offset (HU)
    noise_sd: float          # image noise (HU)
    spine_phase: float       # z phase of the vertebrae, in [0, 34)
    dome_r: float            # right diaphragm dome height (z)
    dome_l: float            # left diaphragm dome height (z)

    @property
    def upper(self) -> np.ndarray:
        """Shift of the upper abdominal organs, which follow the diaphragm."""
        return np.array([0.0, 0.0, self.breath])

    @property
    def mid(self) -> np.ndarray:
        """Shift of the mid abdominal organs (kidneys): 60% of the diaphragm's."""
        return np.array([0.0, 0.0, 0.6 * self.breath])

    def z_dia(self, tx, ty):
        """Diaphragm height (mm) over (x, y): two domes, lower posteriorly and laterally."""
        post = np.maximum(-ty - 40.0, 0.0) * 0.25
        dr = self.dome_r - ((tx - 70.0) ** 2 / 240.0 + (ty + 5.0) ** 2 / 300.0)
        dl = self.dome_l - ((tx + 70.0) ** 2 / 240.0 + (ty + 5.0) ** 2 / 300.0)
        return np.maximum(dr, dl) - post


def _draw_subject(d: _Draw) -> _Subject:
    """Draw the subject-level parameters (the first draws of the stream, in a fixed order)."""
    V, n, u = _VAR, d.n, d.u
    size = math.exp(n(V.size_sd, lim=2.0))
    scale = size * np.exp(n(V.axis_scale_sd, 3, lim=2.0))
    grot = _rotation(*np.deg2rad(n(1.0, 3) * np.asarray(V.rot_deg)))
    gshift = n(1.0, 3) * np.asarray(V.shift_mm)
    lin = grot @ np.diag(scale)
    warp = [_Field(d.rng, 4, V.warp_wavelength, V.warp_mm / math.sqrt(3)) for _ in range(3)]
    tex_field = _Noise(d.rng, 5.0)
    bowel_field = _Noise(d.rng, 6.0)
    gas_field = _Noise(d.rng, 8.0)

    A_c = 116.0 * math.exp(n(0.05))
    B_ca = 78.0 * math.exp(n(0.05))
    B_cp = 92.0 * math.exp(n(0.04))
    wall = u(7.0, 13.0)
    fat = u(8.0, 32.0)
    fat_ant = fat * u(0.8, 1.4)
    fat_post = fat * u(0.4, 0.7)
    post_wall = u(40.0, 50.0)
    breath = n(V.breath_mm)
    visc_fat = u(0.0, 1.0)
    contrast = n(12.0)
    noise_sd = u(15.0, 25.0)
    spine_phase = u(0.0, 34.0)
    dome_r = 148.0 + breath + n(6.0)
    dome_l = 138.0 + breath + n(6.0)
    return _Subject(lin, gshift, warp, tex_field, bowel_field, gas_field, A_c, B_ca, B_cp,
                    wall, fat, fat_ant, fat_post, post_wall, breath, visc_fat, contrast,
                    noise_sd, spine_phase, dome_r, dome_l)


# ---------------- structures (template coordinates, mm; drawn in this order) ----------------

@dataclass
class _Anatomy:
    """Every structure of one subject, placed in template coordinates (mm)."""

    liver_r: _Blob
    liver_l: _Blob
    hepatic_veins: list[_Tube]
    spleen: _Blob
    kidneys: list            # (label, kidney _Blob, renal sinus _Blob, side: +1 right, -1 left)
    gall: _Blob
    stomach: _Tube
    gas_level: float         # stomach gas level above the median y of its curve (mm)
    eso: _Tube
    pancreas: _Tube
    splenic_v: _Tube
    portal_v: _Tube
    aorta: _Tube
    ivc: _Tube
    iliacs: list             # ("a" artery | "v" vein, _Tube)
    renal_veins: list[_Tube]
    adrenals: list           # (label, [limb _Tube, limb _Tube])
    duo: _Tube
    colon: _Tube
    bladder: _Blob
    heart: _Blob
    psoas: list[_Tube]
    paraspinal: list[_Blob]
    crest_z: float           # height of the iliac crests


def _place_liver(d: _Draw, s: _Subject):
    """Liver: right + left lobe (smooth union when painted), cut by the diaphragm, and three
    hepatic veins. Returns ``(liver_r, liver_l, hepatic_veins, liver_shift)``; the shift (mm)
    also moves the gallbladder."""
    V, n = _VAR, d.n
    liver_shift = n(V.organ_shift_mm, 3) + s.upper
    liver_size = 1.04 * math.exp(n(0.05, lim=2.0))
    liver_r = _Blob([72.0, -2.0, s.dome_r - s.breath - 74.0], [71.0, 80.0, 79.0],
                    _rotation(0.0, np.deg2rad(-12.0), 0.0), bend=(0.0, -0.15), taper=0.12,
                    waves=d.waves())
    liver_r.jitter(d.rng, 0.0, 0.05, V.organ_rot_deg, liver_size)
    liver_l = _Blob([-4.0, 44.0, s.dome_l - s.breath - 48.0], [48.0, 28.0, 36.0],
                    _frame((-1.0, 0.2, -0.15), (0.0, 0.0, 1.0)), taper=-0.35,
                    waves=d.waves())
    liver_l.jitter(d.rng, 8.0, 0.12, V.organ_rot_deg, liver_size)
    for b in (liver_r, liver_l):
        b.centre = b.centre + liver_shift
    hepatic_veins = []
    for end in ([105.0, 5.0, -45.0], [45.0, 50.0, -38.0], [-25.0, 40.0, -40.0]):
        ivc_top = np.array([22.0, _YS + 36.0, s.dome_r - 12.0])
        e = np.array(end) + [0.0, 0.0, s.dome_r] + n(8.0, 3)
        hepatic_veins.append(_Tube([ivc_top, 0.5 * (ivc_top + e) + n(6.0, 3), e],
                                   [6.5, 4.5, 2.5]))
    for t in hepatic_veins:
        t.points = t.points + liver_shift
    return liver_r, liver_l, hepatic_veins, liver_shift


def _place_spleen(d: _Draw, s: _Subject) -> _Blob:
    """Spleen: crescent, posterolateral left, long axis along the ribs."""
    spleen = d.organ(_Blob([-88.0, _YS + 24.0, s.dome_l - 68.0], [58.0, 35.0, 20.0],
                           _frame((-0.1, 0.55, -0.83), (-1.0, -0.7, 0.0)),
                           bend=(0.0, 0.35), waves=d.waves()),
                     size=math.exp(d.n(0.13, lim=2.0)))
    spleen.centre += s.upper
    return spleen


def _place_kidneys(d: _Draw, s: _Subject) -> list:
    """Kidneys: beans with a medial hilum, upper pole medial and posterior.

    Returns ``[(label, kidney, sinus, side)]``, right (label 2, side +1) then left (3, -1);
    the renal sinus blob is the hilum's fat, cut out of the kidney when painted.
    """
    kidneys = []
    for side, label, zc in ((1.0, 2, 2.0), (-1.0, 3, 16.0)):
        kb = _Blob([side * 68.0, _YS + 2.0, zc], [58.0, 28.0, 22.5],
                   _frame((-side * 0.25, -0.25, 1.0), (0.5, side, 0.0)),
                   bend=(-0.22, 0.0), waves=d.waves(0.05))
        d.organ(kb, size=math.exp(d.n(0.05, lim=2.0)))
        kb.centre += s.mid
        sinus = _Blob(kb.centre, kb.radii * [0.45, 0.55, 0.45], kb.rot)
        sinus.centre = kb.centre + kb.rot @ np.array([0.0, -0.72 * kb.radii[1], 0.0])
        kidneys.append((label, kb, sinus, side))
    return kidneys


def _place_gallbladder(d: _Draw, s: _Subject, liver_shift: np.ndarray) -> _Blob:
    """Gallbladder: pear under the liver, fundus anterior-inferior; moves with the liver."""
    gall = d.organ(_Blob([46.0, 36.0, s.dome_r - s.breath - 112.0], [36.0, 15.0, 14.0],
                         _frame((0.2, 0.6, -0.75), (1.0, 0.0, 0.0)),
                         taper=0.35, waves=d.waves(0.06)),
                   size=math.exp(d.n(0.12, lim=2.0)))
    gall.centre += liver_shift
    return gall


def _place_stomach(d: _Draw, s: _Subject):
    """Stomach: J-shaped tube from the fundus under the left dome to the pylorus; then the
    esophagus down the mediastinum, anterior-left of the aorta, into the fundus.
    Returns ``(stomach, gas_level, eso)``."""
    fill = math.exp(d.n(0.14))
    zl = s.dome_l - s.breath
    stomach = _Tube([[-42.0, 4.0, zl - 32.0], [-56.0, 28.0, zl - 68.0],
                     [-38.0, 50.0, zl - 100.0], [-8.0, 54.0, zl - 110.0],
                     [18.0, 40.0, zl - 104.0]],
                    np.array([30.0, 27.0, 23.0, 17.0, 10.0]) * fill, d.tube_waves(3.5))
    stomach.jitter(d.rng, _VAR.organ_shift_mm, 5.0)
    stomach.points = stomach.points + s.upper
    gas_level = d.u(5.0, 35.0)

    eso = _Tube([[-4.0, _YS + 30.0, 270.0], [-8.0, _YS + 32.0, s.dome_l + 40.0],
                 [-22.0, _YS + 40.0, s.dome_l - 2.0], stomach.points[0] + [14.0, 2.0, 18.0]],
                [8.5, 8.5, 8.0, 9.0], d.tube_waves(1.5))
    eso.jitter(d.rng, 3.0, 3.0)
    return stomach, gas_level, eso


def _place_pancreas(d: _Draw, s: _Subject, spleen: _Blob, liver_r: _Blob):
    """Pancreas (head right, tail towards the spleen) and the splenic and portal veins, which
    meet at the confluence behind its neck. Returns ``(pan_ctrl, pancreas, splenic_v,
    portal_v)``; ``pan_ctrl`` (5 x 3, mm) are the pancreas's control points, head first."""
    n = d.n
    pz = s.dome_l - s.breath - 100.0 + n(8.0)
    pan_ctrl = np.array([[32.0, _YS + 58.0, pz - 22.0], [6.0, _YS + 66.0, pz - 6.0],
                         [-30.0, _YS + 58.0, pz + 4.0], [-68.0, _YS + 40.0, pz + 16.0],
                         [-86.0, _YS + 26.0, pz + 24.0]])
    pan_ctrl += n(_VAR.organ_shift_mm, 3) + 0.6 * s.upper
    pancreas = _Tube(pan_ctrl, np.array([15.0, 11.0, 11.0, 10.0, 8.0]) * math.exp(n(0.1)),
                     d.tube_waves(2.5, (0.05, 0.15)))
    pancreas.jitter(d.rng, 0.0, 4.0)
    conf = pan_ctrl[1] + [2.0, -14.0, 2.0]
    splenic_v = _Tube([conf, pan_ctrl[2] + [0.0, -13.0, 2.0], pan_ctrl[3] + [0.0, -12.0, 4.0],
                       spleen.centre + [22.0, 10.0, -8.0]], [5.5, 5.0, 5.0, 4.5],
                      d.tube_waves(1.0))
    splenic_v.jitter(d.rng, 2.0, 2.5)
    portal_end = liver_r.centre + [-22.0, 14.0, -6.0]
    portal_v = _Tube([conf, 0.5 * (conf + portal_end) + [0.0, 4.0, 0.0], portal_end,
                      portal_end + [30.0, -5.0, 8.0]], [6.5, 7.0, 6.0, 4.0], d.tube_waves(1.0))
    portal_v.jitter(d.rng, 2.0, 3.0)
    return pan_ctrl, pancreas, splenic_v, portal_v


def _place_big_vessels(d: _Draw, s: _Subject, kidneys: list):
    """Aorta and inferior vena cava down to their bifurcation, the iliac arteries and veins,
    and the renal veins (the left one in front of the aorta).
    Returns ``(aorta, ivc, iliacs, renal_veins)``."""
    n = d.n
    bif_z = -108.0 + n(12.0)
    aorta = _Tube([[-22.0, _YS + 16.0, 270.0], [-14.0, _YS + 26.0, 150.0],
                   [-9.0, _YS + 30.0, 50.0], [-5.0, _YS + 31.0, -40.0],
                   [-3.0, _YS + 31.0, bif_z]],
                  np.array([12.5, 12.0, 11.0, 10.0, 9.0]) * math.exp(n(0.08)),
                  d.tube_waves(1.0))
    aorta.jitter(d.rng, 3.0, 3.0)
    ivc = _Tube([[22.0, _YS + 38.0, s.dome_r + 25.0], [25.0, _YS + 38.0, s.dome_r - 40.0],
                 [23.0, _YS + 32.0, 0.0], [17.0, _YS + 29.0, bif_z + 12.0]],
                np.array([13.0, 12.0, 11.0, 10.0]) * math.exp(n(0.1)), d.tube_waves(1.2))
    ivc.jitter(d.rng, 3.0, 3.0)
    iliacs = []
    for side in (1.0, -1.0):
        iliacs.append(("a", _Tube([aorta.points[-1], [side * 38.0, _YS + 38.0, bif_z - 60.0],
                                   [side * 60.0, _YS + 50.0, bif_z - 135.0]],
                                  [7.0, 6.5, 6.0])))
        iliacs.append(("v", _Tube([ivc.points[-1], [side * 32.0, _YS + 25.0, bif_z - 60.0],
                                   [side * 55.0, _YS + 38.0, bif_z - 135.0]],
                                  [8.0, 7.5, 7.0])))
    renal_veins = []
    for _label, kb, _sinus, side in kidneys:
        hil = kb.centre + kb.rot @ np.array([0.0, -0.9 * kb.radii[1], 0.0])
        ivc_pt = ivc.points[np.argmin(np.abs(ivc.points[:, 2] - hil[2]))]
        mid_pt = 0.5 * (hil + ivc_pt) + [0.0, 6.0 if side < 0 else 0.0, 0.0]
        if side < 0:  # the left renal vein passes in front of the aorta
            ap = aorta.points[np.argmin(np.abs(aorta.points[:, 2] - hil[2]))]
            mid_pt = np.array([ap[0], ap[1] + 16.0, hil[2]])
        renal_veins.append(_Tube([hil, mid_pt, ivc_pt], [5.0, 5.0, 6.0]))
    return aorta, ivc, iliacs, renal_veins


def _place_adrenals(d: _Draw, kidneys: list) -> list:
    """Adrenal glands: thin inverted Y above/medial to each kidney's upper pole.
    Returns ``[(label, [limb, limb])]``: 13 right, 12 left."""
    n = d.n
    adrenals = []
    for _label, kb, _sinus, side in kidneys:
        top = kb.centre + kb.rot @ np.array([0.95 * kb.radii[0], -0.35 * kb.radii[1], 0.0])
        apex = top + [-side * 8.0, 16.0, 18.0] + n(3.0, 3)
        limbs = [apex + [side * 10.0, -20.0, -24.0] + n(3.0, 3),
                 apex + [-side * 5.0, -18.0, -26.0] + n(3.0, 3)]
        r = 5.0 * math.exp(n(0.1))
        adrenals.append((12 if side < 0 else 13,
                         [_Tube([apex, 0.5 * (apex + lb) + n(2.0, 3), lb], [r, r * 0.9, r * 0.7])
                          for lb in limbs]))
    return adrenals


def _place_gut_bladder_heart(d: _Draw, s: _Subject, stomach: _Tube, pan_ctrl: np.ndarray):
    """Duodenum (C-loop around the pancreatic head), colon (frame from the caecum to the
    rectum), bladder and heart. Returns ``(duo, colon, bladder, heart)``."""
    n = d.n
    pyl = stomach.points[-1]
    duo = _Tube([pyl, pan_ctrl[0] + [26.0, 0.0, 18.0], pan_ctrl[0] + [30.0, -8.0, -22.0],
                 pan_ctrl[0] + [0.0, -6.0, -44.0], pan_ctrl[0] + [-45.0, 0.0, -40.0]],
                [12.0, 13.0, 13.0, 12.0, 12.0], d.tube_waves(2.0))
    cz = n(15.0)
    colon = _Tube([[92.0, _YS + 52.0, -150.0 + cz], [100.0, _YS + 50.0, -60.0 + cz],
                   [96.0, _YS + 60.0, 5.0 + cz], [70.0, _YS + 95.0, 30.0 + cz],
                   [0.0, _YS + 118.0, n(25.0) - 5.0], [-72.0, _YS + 95.0, 48.0 + cz],
                   [-98.0, _YS + 50.0, 30.0 + cz], [-100.0, _YS + 48.0, -60.0 + cz],
                   [-88.0, _YS + 55.0, -140.0 + cz], [-35.0, _YS + 75.0, -175.0],
                   [-5.0, _YS + 50.0, -200.0], [0.0, _YS + 22.0, -260.0]],
                  np.array([24, 22, 22, 21, 20, 20, 19, 18, 17, 15, 15, 17.0]) * math.exp(n(0.1)),
                  d.tube_waves(3.5))
    colon.jitter(d.rng, 6.0, 6.0)
    bladder = _Blob([0.0, _YS + 85.0, -222.0], [45.0, 34.0, 35.0], waves=d.waves(0.06))
    d.organ(bladder, size=math.exp(n(0.2)))
    heart = _Blob([-18.0, 38.0, s.dome_l + 62.0], [68.0, 50.0, 58.0],
                  _rotation(0.0, np.deg2rad(20.0), np.deg2rad(30.0)), waves=d.waves(0.05))
    d.organ(heart)
    return duo, colon, bladder, heart


def _place_back(d: _Draw):
    """Psoas muscles (tubes), paraspinal muscles (long blobs) and the iliac crest height.
    Returns ``(psoas, paraspinal, crest_z)``."""
    psoas = [_Tube([[s * 28.0, _YS + 2.0, 40.0], [s * 42.0, _YS + 6.0, -50.0],
                    [s * 58.0, _YS + 16.0, -140.0], [s * 72.0, _YS + 34.0, -240.0]],
                   [6.0, 17.0, 22.0, 20.0], d.tube_waves(2.0)) for s in (1.0, -1.0)]
    for p in psoas:
        p.jitter(d.rng, 3.0, 3.0, math.exp(d.n(0.1)))
    paraspinal = [_Blob([s * 34.0, _YS - 42.0, 0.0], [30.0, 26.0, 300.0],
                        waves=d.waves(0.04)) for s in (1.0, -1.0)]
    crest_z = -118.0 + d.n(10.0)
    return psoas, paraspinal, crest_z


def _place_anatomy(d: _Draw, s: _Subject) -> _Anatomy:
    """Place every structure, in the fixed order of the random draws."""
    liver_r, liver_l, hepatic_veins, liver_shift = _place_liver(d, s)
    spleen = _place_spleen(d, s)
    kidneys = _place_kidneys(d, s)
    gall = _place_gallbladder(d, s, liver_shift)
    stomach, gas_level, eso = _place_stomach(d, s)
    pan_ctrl, pancreas, splenic_v, portal_v = _place_pancreas(d, s, spleen, liver_r)
    aorta, ivc, iliacs, renal_veins = _place_big_vessels(d, s, kidneys)
    adrenals = _place_adrenals(d, kidneys)
    duo, colon, bladder, heart = _place_gut_bladder_heart(d, s, stomach, pan_ctrl)
    psoas, paraspinal, crest_z = _place_back(d)
    return _Anatomy(liver_r, liver_l, hepatic_veins, spleen, kidneys, gall, stomach, gas_level,
                    eso, pancreas, splenic_v, portal_v, aorta, ivc, iliacs, renal_veins,
                    adrenals, duo, colon, bladder, heart, psoas, paraspinal, crest_z)


# ---------------- rendering: painting on the canvas ----------------

@dataclass
class _Scene:
    """What every painting step shares: the canvas, the subject and the texture.

    Masks are bool arrays of the grid's shape (x, y, z); ``tex`` is float32 on the grid.
    """

    cv: _Canvas
    subj: _Subject
    tex: np.ndarray  # smooth texture (unit RMS) on the grid, from subj.tex_field

    def _paint_sdf(self, sl, f, value, label, where, texture):
        if sl is None:
            return None, None
        m = f < 0
        if where is not None:
            m &= where[sl]
        val = value if not texture else value + texture * self.tex[sl]
        self.cv.paint(sl, m, val, label)
        return sl, f

    def paint_blob(self, blob: _Blob, value, label=None, where=None, texture=0.0):
        """Paint the inside of ``blob`` (within ``where``) with ``value + texture * tex`` HU."""
        return self._paint_sdf(*self.cv.blob_sdf(blob), value, label, where, texture)

    def paint_tube(self, tube: _Tube, value, label=None, where=None, texture=0.0):
        """Paint the inside of ``tube`` (within ``where``) with ``value + texture * tex`` HU."""
        return self._paint_sdf(*self.cv.tube_sdf(tube), value, label, where, texture)


def _paint_body(sc: _Scene):
    """Body (fat), wall (muscle), skin, cavity, diaphragm and lungs, on the full volume.
    Returns the masks ``(muscle, cavity, allowed)``; ``allowed`` (abdominal cavity 2 mm below
    the diaphragm) is where abdominal organs may be painted."""
    cv, s, tex = sc.cv, sc.subj, sc.tex
    tx, ty, tz = cv.t
    yb = np.where(ty > 0, np.float32(1.0), np.float32(0.0))
    cav_b = yb * np.float32(s.B_ca) + (1 - yb) * np.float32(s.B_cp)
    body_b = yb * np.float32(s.B_ca + s.wall + s.fat_ant) + (1 - yb) * np.float32(
        s.B_cp + s.post_wall + s.fat_post)
    mus_b = yb * np.float32(s.B_ca + s.wall) + (1 - yb) * np.float32(s.B_cp + s.post_wall)
    del yb
    widen = np.float32(1.0) + np.float32(0.07) * np.clip((-120.0 - tz) / 80.0, 0.0, 1.0)
    body_e = _soft_ellipse(tx, ty, (s.A_c + s.wall + s.fat) * widen, body_b)
    body = body_e < 1.0
    cv.img[body] = -105.0 + 12.0 * tex[body]
    muscle = _soft_ellipse(tx, ty, (s.A_c + s.wall) * widen, mus_b) < 1.0
    cv.img[muscle] = 48.0 + 6.0 * tex[muscle]
    cavity = _soft_ellipse(tx, ty, s.A_c * widen, cav_b) < 1.0
    del body_b, mus_b, cav_b, widen
    # skin
    skin = body & (body_e > 0.96)
    cv.img[skin] = 35.0
    del skin, body_e
    zd = s.z_dia(tx, ty)
    thorax = cavity & (tz > zd)
    abdomen = cavity & ~thorax
    cv.img[abdomen] = -95.0 + 10.0 * tex[abdomen]
    cv.img[thorax] = 40.0  # diaphragm muscle, overwritten by the lungs above it
    lungs = cavity & (tz > zd + 5.0)
    cv.img[lungs] = -855.0 + 25.0 * tex[lungs]
    del thorax, lungs
    allowed = abdomen & (tz < zd - 2.0)
    return muscle, cavity, allowed


def _paint_thorax(sc: _Scene, cavity: np.ndarray, heart: _Blob) -> None:
    """Mediastinal fat above the diaphragm, then the heart: pericardial fat, myocardium and
    the (contrast-enhanced) blood pool."""
    cv, s, tex = sc.cv, sc.subj, sc.tex
    sl = cv.box([-40.0, _YS - 10.0, 100.0], [40.0, 90.0, 300.0])
    if sl is not None:
        x, y, z = cv.coords(sl)
        med = (np.abs(x) < 26.0) & (y > _spine_y(z) + 5.0) & cavity[sl] & (z > s.z_dia(x, y))
        cv.paint(sl, med, -70.0 + 15.0 * tex[sl])
    sl, f = cv.blob_sdf(heart)
    if sl is not None:
        x, y, z = cv.coords(sl)
        above = (z > s.z_dia(x, y) + 3.0) & cavity[sl]
        cv.paint(sl, (f < 4.0) & above, -90.0)              # pericardial fat
        cv.paint(sl, (f < 0.0) & above, 55.0 + 8.0 * tex[sl])  # myocardium
        cv.paint(sl, (f < -9.0) & above, 165.0 + s.contrast + 10.0 * tex[sl])  # blood pool


def _paint_back_muscles(sc: _Scene, muscle: np.ndarray, cavity: np.ndarray,
                        paraspinal: list[_Blob], psoas: list[_Tube]) -> np.ndarray:
    """Muscles of the back (inside the wall, behind the spine) and the psoas (inside the
    cavity, below z = 45 mm). Returns their mask, the start of the organs' no-go ``frame``."""
    cv, tex = sc.cv, sc.tex
    frame = np.zeros(cv.shape, bool)
    for b in paraspinal:
        sl, f = cv.blob_sdf(b)
        if sl is not None:
            m = (f < 0) & muscle[sl] & (cv.coords(sl)[1] < _spine_y(cv.coords(sl)[2]) - 18.0)
            cv.paint(sl, m, 50.0 + 6.0 * tex[sl])
            frame[sl] |= m
    for p in psoas:
        sl, f = cv.tube_sdf(p)
        if sl is not None:
            m = (f < 0) & cavity[sl] & (cv.coords(sl)[2] < 45.0)
            cv.paint(sl, m, 52.0 + 6.0 * tex[sl])
            frame[sl] |= m
    return frame


def _paint_bowel(sc: _Scene, allowed: np.ndarray, frame: np.ndarray, an: _Anatomy) -> None:
    """Unlabelled gut under the organs: small-bowel loops vs visceral fat (a thresholded smooth
    field, with gas), the duodenum and colon (wall, content, gas) and the bladder."""
    cv, s, tex = sc.cv, sc.subj, sc.tex
    sl = cv.box([-150.0, _YS + 10.0, -270.0], [150.0, 140.0, 60.0])
    if sl is not None:
        x, y, z = cv.coords(sl)
        region = (allowed[sl] & ~frame[sl] & (z < 38.0 - 0.002 * x * x)
                  & (y > _spine_y(z) + 22.0 - 0.25 * np.abs(x)))
        w = cv.world(sl)
        v = s.bowel_field(*w)
        gas = s.gas_field(*w)
        theta = np.float32(-0.5 + 0.9 * s.visc_fat)
        loops = region & (v > theta - 0.3)
        lumen = region & (v > theta)
        cv.paint(sl, loops, 45.0 + 6.0 * tex[sl])
        cv.paint(sl, lumen, 18.0 + 12.0 * gas)
        cv.paint(sl, lumen & (gas > 1.3), -930.0)
    for tube, wall_val in ((an.duo, 45.0), (an.colon, 40.0)):
        sl, f = cv.tube_sdf(tube)
        if sl is None:
            continue
        ok = allowed[sl] & ~frame[sl]
        cv.paint(sl, (f < 0) & ok, wall_val)
        inner = (f < -3.0) & ok
        g = s.gas_field(*cv.world(sl))
        if tube is an.colon:
            cv.paint(sl, inner, -120.0 + 140.0 * g)
            cv.paint(sl, inner & (g > -0.2), -940.0)
        else:
            cv.paint(sl, inner, 15.0 + 10.0 * g)
            cv.paint(sl, inner & (g > 1.0), -920.0)
    sl, f = cv.blob_sdf(an.bladder)
    if sl is not None:
        ok = allowed[sl] & ~frame[sl]
        cv.paint(sl, (f < 0) & ok, 40.0)
        cv.paint(sl, (f < -3.0) & ok, 8.0 + 3.0 * tex[sl])


def _paint_spine(sc: _Scene, bone: np.ndarray) -> None:
    """Vertebrae (bodies with a cortex, discs every 34 mm, arches, spinous and transverse
    processes), the spinal canal and the sacrum; adds the bone to ``bone``."""
    cv, s, tex = sc.cv, sc.subj, sc.tex
    sl = cv.box([-75.0, _YS - 95.0, -270.0], [75.0, _YS + 30.0, 270.0])
    if sl is None:
        return
    x, y, z = cv.coords(sl)
    yc = _spine_y(z)
    lumbar = np.clip((100.0 - z) / 60.0, 0.0, 1.0)
    sac = np.clip((-175.0 - z) / 40.0, 0.0, 1.0)
    rx = 17.0 + 5.0 * lumbar + 28.0 * sac
    ry = 14.0 + 3.0 * lumbar + 3.0 * sac
    phase = np.mod(z - s.spine_phase, 34.0)
    ev = (x / rx) ** 2 + ((y - yc) / ry) ** 2
    in_body = ev < 1.0
    disc = in_body & (phase > 27.0) & (sac < 0.5)
    vb = in_body & ~disc
    cy = yc - ry - 12.0  # spinal canal
    rc2 = x * x + (y - cy) ** 2
    arch_z = (phase > 3.0) & (phase < 24.0)
    arch = arch_z & (rc2 < 16.0 ** 2) & (rc2 > 9.5 ** 2) & (y < cy + 6.0)
    spinous = arch_z & (np.abs(x) < 4.5) & (y < cy) & (y > cy - 42.0) & (phase < 20.0)
    ax_ = np.abs(x)
    transverse = ((phase > 9.0) & (phase < 17.0)
                  & (np.abs(y - cy - 4.0 + 0.15 * (ax_ - 10.0)) < 3.5)
                  & (ax_ > 8.0) & (ax_ < 24.0 + 18.0 * lumbar))
    canal = (rc2 < 9.5 ** 2) & (sac < 0.5)
    post = (arch | spinous | transverse) & ~in_body
    cortex = in_body & (ev > 0.72)
    val = np.where(cortex, 700.0, 420.0 + 60.0 * tex[sl]).astype(np.float32)
    cv.paint(sl, vb, val)
    cv.paint(sl, disc, 85.0)
    cv.paint(sl, canal & ~in_body, 15.0)
    cv.paint(sl, post, 560.0 + 80.0 * tex[sl])
    bone[sl] |= vb | disc | post


def _paint_ribs(sc: _Scene, bone: np.ndarray) -> None:
    """Ribs: a helical cage in the wall, shorter towards the bottom, cartilage at the front;
    adds them to ``bone``."""
    cv, s = sc.cv, sc.subj
    sl = cv.box([-200.0, -160.0, -40.0], [200.0, 150.0, 270.0])
    if sl is None:
        return
    x, y, z = cv.coords(sl)
    yb = np.where(y > 0, np.float32(s.B_ca + s.wall * 0.5), np.float32(s.B_cp + s.wall * 0.5))
    a_r = np.float32(s.A_c + s.wall * 0.5)
    e = np.sqrt((x / a_r) ** 2 + (y / yb) ** 2)
    rad = (e - 1.0) * np.sqrt(x * x + y * y) / np.maximum(e, 1e-3)
    near = np.abs(rad) < 7.0
    phi = np.arctan2(np.abs(x) / a_r, -y / yb) / np.pi  # 0 at the back, 1 at the front
    q = (z + 75.0 * phi ** 1.2 - (12.0 + s.breath * 0.5 + s.spine_phase * 0.3)) / 34.0
    k = np.floor(q)
    fr = (q - k - 0.5) * 34.0
    rib = near & (k >= 0) & (phi > 0.12) & (phi < np.minimum(0.35 + 0.1 * k, 0.93))
    cs = (rad / 4.5) ** 2 + (fr / 6.0) ** 2
    rib &= cs < 1.0
    cart = rib & (phi > 0.72)
    cv.paint(sl, rib, np.where(cs > 0.5, 620.0, 260.0).astype(np.float32))
    cv.paint(sl, cart, 130.0)
    bone[sl] |= rib


def _paint_pelvis(sc: _Scene, cavity: np.ndarray, crest_z: float, bone: np.ndarray) -> None:
    """Pelvis: iliac wings as curved plates flaring upwards up to ``crest_z``, joined to the
    sacrum; adds them to ``bone``."""
    cv = sc.cv
    for side in (1.0, -1.0):
        sl = cv.box([side * 20.0 - 110.0, _YS - 60.0, -270.0],
                    [side * 20.0 + 110.0, _YS + 90.0, crest_z + 10.0])
        if sl is None:
            continue
        x, y, z = cv.coords(sl)
        fl = np.clip((z - crest_z + 120.0) / 110.0, 0.2, 1.0)
        dx = side * x - 40.0
        dy = y - (_spine_y(z) + 20.0)
        rx_, ry_ = 30.0 + 55.0 * fl, 20.0 + 40.0 * fl
        e = np.sqrt((dx / rx_) ** 2 + (dy / ry_) ** 2)
        d = (e - 1.0) * np.minimum(rx_, ry_)
        ang = np.arctan2(dy, dx)
        plate = ((np.abs(d) < 5.0) & (ang > np.deg2rad(-150.0)) & (ang < np.deg2rad(35.0))
                 & (z < crest_z - 8.0 * np.cos(ang)) & cavity[sl])
        cv.paint(sl, plate, np.where(np.abs(d) > 2.5, 600.0, 250.0).astype(np.float32))
        bone[sl] |= plate


def _paint_bones(sc: _Scene, cavity: np.ndarray, crest_z: float) -> np.ndarray:
    """Spine, ribs and pelvis (painted before the organs, so organs stay out of them).
    Returns the bone mask."""
    bone = np.zeros(sc.cv.shape, bool)
    _paint_spine(sc, bone)
    _paint_ribs(sc, bone)
    _paint_pelvis(sc, cavity, crest_z, bone)
    return bone


def _paint_stomach(sc: _Scene, stomach: _Tube, gas_level: float, ok: np.ndarray) -> None:
    """Stomach (label 7): wall, content, and gas above ``gas_level`` mm over the median y of
    its curve."""
    cv, tex = sc.cv, sc.tex
    sl, f = cv.tube_sdf(stomach)
    if sl is None:
        return
    ok = ok[sl]
    y = cv.coords(sl)[1]
    g = sc.subj.gas_field(*cv.world(sl))
    cv.paint(sl, (f < 0) & ok, 45.0 + 6.0 * tex[sl], 7)
    inner = (f < -4.0) & ok
    cv.paint(sl, inner, 18.0 + 15.0 * g)
    level = float(np.median(stomach.points[:, 1])) + gas_level
    cv.paint(sl, inner & (y > level), -950.0)


def _paint_liver(sc: _Scene, an: _Anatomy, ok_all: np.ndarray) -> None:
    """Liver (label 6): smooth union of the two lobes, then the contrast-filled hepatic veins
    inside it (their voxels keep the liver label)."""
    cv, contrast = sc.cv, sc.subj.contrast
    sl = cv.box(*_union_box(an.liver_r.box(), an.liver_l.box()))
    if sl is not None:
        t = cv.coords(sl)
        f = _smin(an.liver_r.sdf(t), an.liver_l.sdf(t), 18.0)
        cv.paint(sl, (f < 0) & ok_all[sl], 60.0 + 0.4 * contrast + 8.0 * sc.tex[sl], 6)
    for hv in an.hepatic_veins:
        hs, hf = cv.tube_sdf(hv)
        if hs is not None:
            cv.paint(hs, (hf < 0) & (cv.lab[hs] == 6), 150.0 + contrast)


def _paint_kidneys(sc: _Scene, kidneys: list, ok_all: np.ndarray) -> None:
    """Kidneys (labels 2, 3): perirenal fat, enhancing cortex around a patterned medulla, and
    the hilum (sinus fat, renal pelvis) cut out of the label."""
    cv, contrast = sc.cv, sc.subj.contrast
    for label, kb, sinus, _side in kidneys:
        sl, f = cv.blob_sdf(kb)
        if sl is None:
            continue
        t = cv.coords(sl)
        fs = sinus.sdf(t)
        ok = ok_all[sl]
        cv.paint(sl, (f < 7.0) & ok & (cv.lab[sl] == 0), -100.0)  # perirenal fat
        kid = (f < 0) & (fs > 0) & ok
        med = 135.0 + contrast + 30.0 * np.cos(0.25 * t[0] + 0.2 * t[2]) * np.cos(0.3 * t[1])
        val = np.where(f > -6.0, 175.0 + contrast, med).astype(np.float32)
        cv.paint(sl, kid, val + 6.0 * sc.tex[sl], label)
        hil = (fs < 0) & (f < 0) & ok
        cv.paint(sl, hil, -80.0)
        cv.paint(sl, hil & (fs < -6.0), 10.0)  # renal pelvis


def _paint_vessels(sc: _Scene, an: _Anatomy, ok_all: np.ndarray, eso_ok: np.ndarray) -> None:
    """Renal veins and iliac vessels (unlabelled, only where no label is yet), then the IVC
    (label 9) and the aorta (label 8), which may also run above the diaphragm (``eso_ok``)."""
    cv, contrast = sc.cv, sc.subj.contrast
    for rv in an.renal_veins:
        sl, f = cv.tube_sdf(rv)
        if sl is not None:
            cv.paint(sl, (f < 0) & ok_all[sl] & (cv.lab[sl] == 0), 150.0 + contrast)
    for kind, tube in an.iliacs:
        sl, f = cv.tube_sdf(tube)
        if sl is not None:
            cv.paint(sl, (f < 0) & ok_all[sl] & (cv.lab[sl] == 0),
                     (185.0 if kind == "a" else 140.0) + contrast)
    sc.paint_tube(an.ivc, 150.0 + contrast, 9, eso_ok, texture=5.0)
    sc.paint_tube(an.aorta, 185.0 + contrast, 8, eso_ok, texture=5.0)


def _paint_organs(sc: _Scene, an: _Anatomy, cavity: np.ndarray, bone: np.ndarray,
                  ok_all: np.ndarray) -> None:
    """The labelled structures, later ones winning, inside ``ok_all`` (abdominal cavity below
    the diaphragm, outside bone and muscles); the esophagus, IVC and aorta anywhere in the
    cavity outside bone."""
    contrast = sc.subj.contrast
    _paint_stomach(sc, an.stomach, an.gas_level, ok_all)
    _paint_liver(sc, an, ok_all)
    sc.paint_blob(an.spleen, 50.0 + 0.5 * contrast, 1, ok_all, texture=6.0)
    _paint_kidneys(sc, an.kidneys, ok_all)
    sc.paint_blob(an.gall, 10.0, 4, ok_all, texture=3.0)
    sc.paint_tube(an.pancreas, 75.0 + 0.5 * contrast, 11, ok_all, texture=14.0)
    for tube in (an.splenic_v, an.portal_v):
        sc.paint_tube(tube, 165.0 + contrast, 10, ok_all, texture=6.0)
    eso_ok = cavity & ~bone
    sc.paint_tube(an.eso, 42.0, 5, eso_ok, texture=5.0)
    _paint_vessels(sc, an, ok_all, eso_ok)
    for label, limbs in an.adrenals:
        for limb in limbs:
            sc.paint_tube(limb, 35.0, label, ok_all, texture=4.0)


def _acquire(img: np.ndarray, preset: SynthPreset, nrng: np.random.Generator,
             noise_sd: float) -> np.ndarray:
    """Imaging: blur (scanner resolution, ~0.6 * 2 mm), white noise of ``noise_sd`` HU drawn
    from ``nrng``, rounding to integers and clipping to [HU_MIN, HU_MAX]; float32."""
    img = ndimage.gaussian_filter(img, sigma=0.6 * 2.0 / preset.spacing + 0.25,
                                  mode="nearest", truncate=3.0)
    img += nrng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_sd)
    np.rint(img, out=img)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return img


#: The contrasts :func:`synthesize_subject` renders.
CONTRASTS = ("ct", "mr")

#: MR-like tissue contrast: piecewise-linear map from the painted (noise-free) HU to a relative
#: signal in [0, 1], T1-weighted-like: fat bright, fluid and bone dark, liver brighter than
#: spleen and muscle, enhanced vessels bright, air dark. The order of the tissues differs from
#: CT's (fat is darker than every soft tissue in CT, bone the brightest).
_MR_KNOTS_HU = (-1024.0, -300.0, -120.0, -80.0, 0.0, 15.0, 30.0, 45.0, 60.0, 120.0, 250.0,
                400.0, 3071.0)
_MR_KNOTS_SIGNAL = (0.02, 0.05, 0.95, 0.9, 0.12, 0.15, 0.35, 0.4, 0.62, 0.8, 0.85, 0.25, 0.15)


def _mr_contrast(hu: np.ndarray, preset: SynthPreset, mrng: np.random.Generator
                 ) -> np.ndarray:
    """An MR-like image of the painted HU image ``hu`` (float32, before blur and noise).

    Tissue contrast (:data:`_MR_KNOTS_HU` -> :data:`_MR_KNOTS_SIGNAL`), a smooth multiplicative
    bias field ``exp(b(x))`` (a low-frequency Fourier field, about 15% RMS: coil sensitivity),
    the scanner blur, Gaussian noise of 2% of the tissue range, then an arbitrary intensity
    scale ``a`` (log-uniform in [0.5, 5000]) and offset ``b`` (uniform in [-0.02, 0.2] * a,
    so air stays near 0 as in magnitude images): MR has no absolute unit. Everything random
    comes from ``mrng``."""
    sig = np.interp(hu, _MR_KNOTS_HU, _MR_KNOTS_SIGNAL).astype(np.float32)
    field = _Field(mrng, 3, (300.0, 700.0), 0.15)
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(preset.spacing)
            for n in preset.shape]
    sig *= np.exp(field(*axes)).astype(np.float32)
    sig = ndimage.gaussian_filter(sig, sigma=0.6 * 2.0 / preset.spacing + 0.25,
                                  mode="nearest", truncate=3.0)
    sig += mrng.standard_normal(sig.shape, dtype=np.float32) * np.float32(0.02)
    scale = float(np.exp(mrng.uniform(np.log(0.5), np.log(5000.0))))
    offset = float(mrng.uniform(-0.02, 0.2)) * scale
    return (sig * np.float32(scale) + np.float32(offset)).astype(np.float32)


def _render(preset: SynthPreset, seed: int, index: int, contrast: str = "ct"):
    """Render subject ``(seed, index)`` on ``preset``'s grid: ``(image, labels, affine)`` as
    returned by :func:`synthesize_subject`.

    Two random streams: one for the anatomy (subject parameters, then every structure, in a
    fixed order) and one for the image noise, so the anatomy is the same at every preset. The
    MR contrast draws from a third stream, so the anatomy (and the labels) are those of the CT
    subject and the CT images do not depend on whether MR is rendered.
    """
    rng = np.random.default_rng(np.random.SeedSequence([0x5D7A, seed, index, 0]))
    nrng = np.random.default_rng(np.random.SeedSequence([0x5D7A, seed, index, 1]))
    d = _Draw(rng)
    subj = _draw_subject(d)
    an = _place_anatomy(d, subj)

    cv = _Canvas(preset, subj.lin, subj.gshift, subj.warp)
    sc = _Scene(cv, subj, subj.tex_field(*cv.axes))
    muscle, cavity, allowed = _paint_body(sc)
    _paint_thorax(sc, cavity, an.heart)
    frame = _paint_back_muscles(sc, muscle, cavity, an.paraspinal, an.psoas)
    del muscle
    _paint_bowel(sc, allowed, frame, an)
    bone = _paint_bones(sc, cavity, an.crest_z)
    frame |= bone
    ok_all = allowed & ~frame  # where the labelled abdominal organs may be painted
    del allowed, frame
    _paint_organs(sc, an, cavity, bone, ok_all)

    # labels never outside the cavity, in bone, or above the diaphragm (except the tubes)
    cv.lab[~cavity] = 0
    cv.lab[bone] = 0
    del cavity, bone, ok_all, cv.t
    if contrast == "mr":
        mrng = np.random.default_rng(np.random.SeedSequence([0x5D7A, seed, index, 2]))
        return _mr_contrast(cv.img, preset, mrng), cv.lab, preset_affine(preset)
    img = _acquire(cv.img, preset, nrng, subj.noise_sd)
    return img, cv.lab, preset_affine(preset)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (polynomial), for blending implicit surfaces."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / np.float32(k)
    return np.minimum(a, b) - h * h * np.float32(k / 4.0)


def _union_box(*boxes):
    return (np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def synthesize_subject(preset: str | SynthPreset, seed: int, index: int, *,
                       contrast: str = "ct") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render subject ``index`` of the dataset with ``seed``.

    Returns ``(image, labels, affine)``: float32 HU (integer-valued, in [-1024, 3071]) for
    ``contrast="ct"``, an MR-like float32 image in arbitrary units for ``"mr"``
    (:func:`_mr_contrast`: other tissue order, bias field, per-subject scale and offset);
    uint8 labels (:data:`LABELS`, the same for both contrasts), and the 4x4 RAS+ affine of the
    preset grid. The content depends only on ``(seed, index)`` (the anatomy is the same at
    every preset; only the resolution and the noise differ).
    """
    p = _preset(preset)
    if contrast not in CONTRASTS:
        raise PddnetError(f"unknown contrast {contrast!r}; choose one of {list(CONTRASTS)}")
    if int(seed) != seed or seed < 0:
        raise PddnetError(f"seed must be a non-negative integer, got {seed!r}")
    if int(index) != index or index < 0:
        raise PddnetError(f"subject index must be a non-negative integer, got {index!r}")
    return _render(p, int(seed), int(index), contrast)


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------

MIN_SUBJECTS = 4


def split_subjects(names: list[str]) -> dict[str, list[str]]:
    """The default split: last 4 test, 2 before them validation, the rest training (N >= 8);
    2 test, 2 validation, N - 4 training for 4 <= N < 8; an error below 4."""
    n = len(names)
    if n < MIN_SUBJECTS:
        raise PddnetError(
            f"{n} subject(s) requested; the dataset needs at least {MIN_SUBJECTS} (2 validation "
            "+ 2 test subjects), and 8 or more for the default split (4 test, 2 validation, "
            "the rest training)")
    n_test = 4 if n >= 8 else 2
    n_val = 2
    return {"train": names[: n - n_test - n_val],
            "val": names[n - n_test - n_val: n - n_test],
            "test": names[n - n_test:]}


def ordered_pairs(names: list[str]) -> list[tuple[str, str]]:
    """All ordered (fixed, moving) pairs with fixed != moving."""
    return [(a, b) for a in names for b in names if a != b]


@dataclass
class PairDice:
    fixed: str
    moving: str
    mean: float                  # mean over labels present in both (NaN labels skipped)
    per_label: dict[int, float]  # NaN where a label is absent from fixed or moving


@dataclass
class SynthReport:
    out_dir: Path
    json_path: Path
    preset: str
    seed: int
    subjects: list[str]
    images: list[Path]
    labels: list[Path]
    split: dict[str, list[str]]
    test_pairs: list[PairDice] = field(default_factory=list)
    val_pairs: list[PairDice] = field(default_factory=list)
    synth_seconds: list[float] = field(default_factory=list)   # rendering, per subject
    write_seconds: list[float] = field(default_factory=list)   # NIfTI writing, per subject

    @property
    def mean_test_dice(self) -> float:
        return float(np.mean([p.mean for p in self.test_pairs])) if self.test_pairs else math.nan

    @property
    def mean_val_dice(self) -> float:
        return float(np.mean([p.mean for p in self.val_pairs])) if self.val_pairs else math.nan

    @property
    def seconds_per_subject(self) -> float:
        """Mean wall time per subject, rendering plus writing."""
        total = [a + b for a, b in zip(self.synth_seconds, self.write_seconds)]
        return float(np.mean(total)) if total else math.nan

    def summary(self) -> str:
        lines = [f"wrote {len(self.subjects)} subjects ({self.preset}, seed {self.seed}) to "
                 f"{self.out_dir}", f"dataset json: {self.json_path}",
                 "split: " + ", ".join(f"{k} {len(v)}" for k, v in self.split.items())]
        for title, pairs, mean in (("test", self.test_pairs, self.mean_test_dice),
                                   ("validation", self.val_pairs, self.mean_val_dice)):
            lines.append(f"initial Dice (no registration), {title} pairs (fixed <- moving):")
            for p in pairs:
                lines.append(f"  {p.fixed} <- {p.moving}: {100 * p.mean:5.1f}%")
            lines.append(f"  mean over {len(pairs)} {title} pairs: {100 * mean:.1f}%")
        if self.synth_seconds:
            lines.append(
                f"time per subject: {self.seconds_per_subject:.2f} s (rendering "
                f"{np.mean(self.synth_seconds):.2f} s, writing {np.mean(self.write_seconds):.2f} s)")
        return "\n".join(lines)


def _previous_synth(out: Path) -> dict | None:
    """The dataset json of a previous synth output in ``out``, or None."""
    cand = out / f"{DATASET_NAME}_dataset.json"
    if not cand.is_file():
        return None
    try:
        data = json.loads(cand.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("pddnet"), dict) and \
            data["pddnet"].get("generator") == GENERATOR:
        return data
    return None


def _pair_dice(fixed: np.ndarray, moving: np.ndarray, fname: str, mname: str) -> PairDice:
    from pddnet.metrics import dice_per_label

    per = dice_per_label(fixed, moving, moving, labels=[k for k in LABELS if k])
    vals = [v for v in per.values() if not math.isnan(v)]
    return PairDice(fname, mname, float(np.mean(vals)) if vals else math.nan, per)


def write_dataset(out_dir: str | Path, *, subjects: int, seed: int, preset: str = "small",
                  progress: bool = True, overwrite: bool = False,
                  contrast: str = "ct") -> SynthReport:
    """Render ``subjects`` subjects and write them in the Learn2Reg layout under ``out_dir``.

    Writes ``imagesTr/<name>_0000.nii.gz`` (int16 HU; float32 arbitrary units for
    ``contrast="mr"``, :func:`synthesize_subject`), ``labelsTr/<name>_0000.nii.gz`` (uint8)
    and ``PddnetSynth_dataset.json`` (see the module docstring for the split and the pairs),
    as one transaction (:func:`pddnet._files.atomic_directory`: the folder holds its previous
    content until the new dataset is complete). Refuses a non-empty folder unless it holds a
    previous synth output (whose files no longer listed are then removed) or ``overwrite`` is
    set (other files there are left alone). Returns the paths, the initial Dice of every test
    and validation pair and the timings.
    """
    from pddnet._files import atomic_directory, write_json

    p = _preset(preset)
    if contrast not in CONTRASTS:
        raise PddnetError(f"unknown contrast {contrast!r}; choose one of {list(CONTRASTS)}")
    if int(subjects) != subjects:
        raise PddnetError(f"subjects must be an integer, got {subjects!r}")
    if int(seed) != seed or seed < 0:
        raise PddnetError(f"seed must be a non-negative integer, got {seed!r}")
    names = [f"{DATASET_NAME}_{i + 1:04d}" for i in range(int(subjects))]
    split = split_subjects(names)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PddnetError(f"{out} exists and is not a folder; choose another --out")
    previous = _previous_synth(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()) and previous is None and not overwrite:
        raise PddnetError(
            f"{out} is not empty and holds no previous `pddnet data synth` output; choose an "
            "empty or new folder, or pass --overwrite to write into it anyway")
    json_name = f"{DATASET_NAME}_dataset.json"
    # everything else in the folder is carried into the new version (hard links), then replaced
    # file by file where this dataset writes
    with atomic_directory(out, overwrite=True, keep=lambda name: name != json_name) as stage:
        report = _write_subjects(stage, out, p, seed, names, split, progress, contrast)
        doc = _dataset_json(p, seed, names, split, report, contrast)
        write_json(stage / json_name, doc)
        if previous is not None:  # files of the previous synth output that are no longer listed
            listed = {e["image"] for e in doc["training"]} | {e["label"] for e in doc["training"]}
            for e in previous.get("training", []):
                for key in ("image", "label"):
                    old = e.get(key) if isinstance(e, dict) else None
                    if isinstance(old, str) and old not in listed and old.startswith("./") \
                            and ".." not in old:
                        (stage / old).unlink(missing_ok=True)
    return report


def _write_subjects(stage: Path, out: Path, p: SynthPreset, seed: int, names: list[str],
                    split: dict, progress: bool, contrast: str = "ct") -> "SynthReport":
    """Render and write every subject into ``stage`` (the staging folder of ``out``)."""
    from tqdm import tqdm

    from pddnet.data.io import save_nifti

    (stage / "imagesTr").mkdir(parents=True, exist_ok=True)
    (stage / "labelsTr").mkdir(parents=True, exist_ok=True)
    keep = set(split["val"]) | set(split["test"])
    kept: dict[str, np.ndarray] = {}
    report = SynthReport(out, out / f"{DATASET_NAME}_dataset.json", p.name, int(seed), names,
                         [], [], split)
    for i, name in enumerate(tqdm(names, desc=f"synth {p.name}", unit="subject",
                                  disable=not progress)):
        t0 = time.perf_counter()
        img, lab, aff = synthesize_subject(p, seed, i, contrast=contrast)
        t1 = time.perf_counter()
        ip = Path("imagesTr") / f"{name}_0000.nii.gz"
        lp = Path("labelsTr") / f"{name}_0000.nii.gz"
        save_nifti(stage / ip, img.astype(np.int16) if contrast == "ct" else img, aff)
        save_nifti(stage / lp, lab, aff)
        ip, lp = out / ip, out / lp
        report.synth_seconds.append(t1 - t0)
        report.write_seconds.append(time.perf_counter() - t1)
        report.images.append(ip)
        report.labels.append(lp)
        if name in keep:
            kept[name] = lab

    for key, pairs_out in (("test", report.test_pairs), ("val", report.val_pairs)):
        for f, m in ordered_pairs(split[key]):
            pairs_out.append(_pair_dice(kept[f], kept[m], f, m))
    return report


def _dataset_json(p: SynthPreset, seed: int, names: list[str], split: dict,
                  report: "SynthReport", contrast: str = "ct") -> dict:
    """The Learn2Reg dataset json of a synth output (with pddnet's own block; an MR output
    says so in ``modality``, ``description`` and ``pddnet.contrast``)."""

    def rel(kind: str, name: str) -> str:
        return f"./{kind}/{name}_0000.nii.gz"

    doc = {
        "name": DATASET_NAME,
        "description": f"Synthetic abdominal {contrast.upper()}{'-like' if contrast == 'mr' else ''}"
                       " with the 13 Learn2Reg abdomen labels, generated by pddnet.data.synth",
        "release": GENERATOR_VERSION,
        "licence": "synthetic data, no restrictions",
        "reference": "pddnet",
        "pairings": "unpaired",
        "provided_data": {"0": ["image", "label"]},
        "registration_direction": {"fixed": 0, "moving": 0},
        "modality": {"0": contrast.upper()},
        "img_shift": {"fixed": "Patient_A", "moving": "Patient_B"},
        "labels": {"0": {str(k): v for k, v in LABELS.items()}},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(p.shape)},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": rel("imagesTr", n), "label": rel("labelsTr", n)} for n in names],
        "test": [],
        "numPairedTraining": 0,
        "training_paired_images": [],
        "numRegistration_val": len(report.val_pairs),
        "registration_val": [{"fixed": rel("imagesTr", q.fixed), "moving": rel("imagesTr", q.moving)}
                             for q in report.val_pairs],
        "numRegistration_test": len(report.test_pairs),
        "registration_test": [{"fixed": rel("imagesTr", q.fixed),
                               "moving": rel("imagesTr", q.moving)} for q in report.test_pairs],
        "pddnet": {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "preset": p.name,
            "seed": int(seed),
            "subjects": len(names),
            "shape": list(p.shape),
            "spacing": [p.spacing] * 3,
            "split": split,
            "pairs": "all ordered pairs (fixed, moving), fixed != moving, within a split",
            "initial_dice": {"test_mean": round(report.mean_test_dice, 6),
                             "val_mean": round(report.mean_val_dice, 6)},
        },
    }
    if contrast != "ct":  # CT outputs stay byte-identical to those written before MR existed
        doc["pddnet"]["contrast"] = contrast
    return doc
