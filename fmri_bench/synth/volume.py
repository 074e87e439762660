"""MNI152 volume runs of the synthetic cohort, for the NIfTI input path.

In: a run's noise-free cortical signal ``(T, 59412)`` (percent signal change) and a
``np.random.Generator``. Out: a 4D int16 NIfTI image on nilearn's MNI152 grey-matter mask grid
(3 mm), baseline 10000 inside the mask, 0 outside. Each grey-matter voxel within ``max_mm`` of
the fs_LR midthickness surface (which HCP places in MNI space) takes the signal of its nearest
vertex, so the volume carries the same network nodes (blobs around each node's vertices) and
condition maps as the surface truth; deeper grey matter gets baseline and noise only.
"""

from __future__ import annotations

import functools

import numpy as np

from fmri_bench.synth.maps import cortex_coords_faces


@functools.lru_cache(maxsize=1)
def volume_grid(resolution: int = 3, max_mm: float = 4.0):
    """(mask image, (n_vox, 3) voxel indices, (n_vox,) nearest vertex or -1)."""
    from nilearn.datasets import load_mni152_gm_mask
    from scipy.spatial import cKDTree

    mask = load_mni152_gm_mask(resolution=resolution)
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0)
    xyz = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    coords, _ = cortex_coords_faces()
    dist, nearest = cKDTree(coords).query(xyz)
    nearest[dist > max_mm] = -1
    return mask, ijk, nearest


def volume_run(signal_pct: np.ndarray, tr: float, rng: np.random.Generator,
               thermal: float = 1.0, baseline: float = 10000.0):
    """signal_pct (T, 59412) -> nibabel Nifti1Image (X, Y, Z, T) int16 (scaled), TR in header."""
    import nibabel as nib

    mask, ijk, nearest = volume_grid()
    n_t = signal_pct.shape[0]
    vox = np.zeros((n_t, len(ijk)), np.float32)
    on = nearest >= 0
    vox[:, on] = signal_pct[:, nearest[on]]
    vox += thermal * rng.standard_normal(vox.shape, dtype=np.float32)
    vox = baseline * (1 + vox / 100)
    data = np.zeros(mask.shape + (n_t,), np.float32)
    data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = vox.T
    img = nib.Nifti1Image(data, mask.affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    zooms = img.header.get_zooms()
    img.header.set_zooms(zooms[:3] + (float(tr),))
    return img
