"""Hostile field files: for any generated .npz or NIfTI (shapes, dtypes, intents, arrays, NaN,
affines), :func:`pddnet.runtime.fields.load_field` returns a field of shape ``(i, j, k, 3)``
float32 or raises one :class:`PddnetError` of one line; never another exception.

Not tested here: truncated or bit-flipped gzip streams (nibabel raises, and the error is
wrapped: tests/cli/test_apply.py checks one unreadable file).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pddnet.errors import PddnetError
from pddnet.runtime.fields import load_field

_any_dims = st.lists(st.integers(0, 5), min_size=1, max_size=5).map(tuple)
#: shapes near the accepted ones: (i, j, k, 3), (i, j, k, 1, 3) and their neighbours
_field_like = st.tuples(*[st.integers(1, 5)] * 3).flatmap(
    lambda t: st.sampled_from([t + (3,), t + (1, 3), t + (1, 2), t + (3, 1), (3,) + t, t]))
_dims = st.one_of(_any_dims, _field_like)
_dtypes = st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.float16])
_nifti_dtypes = st.sampled_from([np.float32, np.float64, np.int16, np.uint8])


def _check(path):
    try:
        f = load_field(path, max_voxels=10_000)
    except PddnetError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert f.disp.ndim == 4 and f.disp.shape[3] == 3 and f.disp.dtype == np.float32
    assert np.all(np.isfinite(f.disp)) and f.affine.shape == (4, 4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(_dims, min_size=0, max_size=3), dtype=_dtypes, nan=st.booleans(),
       named=st.booleans(), with_summary=st.booleans())
def test_any_npz_loads_or_is_refused_in_one_line(tmp_path_factory, shapes, dtype, nan, named,
                                                  with_summary):
    d = tmp_path_factory.mktemp("npz")
    arrays = [np.ones(s, dtype) for s in shapes]
    if nan and arrays and arrays[0].size and arrays[0].dtype.kind == "f":
        arrays[0].flat[0] = np.nan
    path = d / "f.npz"
    if named and len(arrays) == 2:
        np.savez(path, disp=arrays[0], affine=arrays[1])
    else:
        np.savez(path, *arrays)
    if with_summary:
        (d / "summary.json").write_text('{"field": {"affine": [[1,0,0,0],[0,1,0,0],[0,0,1,0],'
                                        '[0,0,0,1]], "shape": [3, 4, 5, 3]}}')
    _check(path)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=_dims.filter(lambda s: 0 not in s), dtype=_nifti_dtypes,
       intent=st.sampled_from([0, 1006, 1007, 2001]), nan=st.booleans(),
       scale=st.sampled_from([1.0, 1e-9, -2.0]), shear=st.booleans())
def test_any_nifti_loads_or_is_refused_in_one_line(tmp_path_factory, shape, dtype, intent, nan,
                                                    scale, shear):
    d = tmp_path_factory.mktemp("nii")
    data = np.ones(shape, dtype)
    if nan and data.dtype.kind == "f":
        data.flat[0] = np.nan
    aff = np.diag([2.0, 3.0, scale, 1.0])
    if shear:
        aff[0, 1] = 1.0
    path = d / "f.nii.gz"
    try:
        with np.errstate(all="ignore"):
            img = nib.Nifti1Image(data, aff)
            img.header.set_intent(intent)
            nib.save(img, path)
    except (nib.spatialimages.HeaderDataError, np.linalg.LinAlgError):
        assume(False)  # nibabel will not write it (float16, an affine with no qform)
    _check(path)
