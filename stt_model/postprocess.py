"""From the network's probability maps to 3D instance labels.

Decodings of the MitoEM baseline (pytorch_connectomics ``bc_connected``, ``bc_watershed``,
``binary_connected``) on in-memory ``(Z, Y, X)`` volumes, and :func:`label_chunked`, an
out-of-core 3D connected-component labelling that reads and writes array-likes (h5py or
zarr datasets) slab by slab.

Probability inputs are float in [0, 1] or uint8 in 0..255 (what inference writes). A
threshold ``t`` in [0, 1] is applied as ``p > t`` to floats and, as in the baseline, as
``p > int(255 * t)`` to uint8 (``<`` for contour thresholds). Outputs are uint32 labels,
0 = background, numbered consecutively 1..N.

Connected components use ``cc3d`` (connected-components-3d) when it is installed and
``scipy.ndimage.label`` otherwise; both give identical labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph

from .errors import UserInputError, UserTypeError

try:
    import cc3d as _cc3d
except ImportError:  # optional: faster and leaner than scipy.ndimage.label
    _cc3d = None

__all__ = ["bc_connected", "bc_watershed", "binary_connected", "distance_watershed", "label_chunked", "Foreground"]

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
# (dy, dx) offsets linking a voxel to the next z-plane, per 3D connectivity.
_PLANE_OFFSETS = {
    6: [(0, 0)],
    18: [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
    26: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}
_SLAB_VOXELS = 1 << 24  # in-memory passes over a label volume
_CHUNK_VOXELS = 1 << 25  # label_chunked slabs


def _check_prob(vol: Any, name: str) -> np.ndarray:
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise UserInputError(f"{name} must be a 3-D (Z, Y, X) volume, got shape {vol.shape}")
    if vol.dtype != np.uint8 and vol.dtype.kind != "f":
        raise UserTypeError(f"{name} must be float in [0, 1] or uint8 in 0..255, got dtype {vol.dtype}")
    return vol


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise UserInputError(f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; expected the same")


def _check_threshold(t: float, name: str) -> float:
    if not 0.0 <= t <= 1.0:
        raise UserInputError(f"{name} must be in [0, 1], got {t}")
    return t


def _check_connectivity(connectivity: int) -> int:
    if connectivity not in _CONNECTIVITY_RANK:
        raise UserInputError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return connectivity


def _check_size(n: int, name: str) -> int:
    if n < 0:
        raise UserInputError(f"{name} must be >= 0, got {n}")
    return n


def _above(p: np.ndarray, t: float) -> np.ndarray:
    return p > (int(255 * t) if p.dtype == np.uint8 else t)


def _below(p: np.ndarray, t: float) -> np.ndarray:
    return p < (int(255 * t) if p.dtype == np.uint8 else t)


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """3D connected components of a boolean volume: (uint32 labels, count)."""
    if _cc3d is not None:
        labels, n = _cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint32, return_N=True)
        return labels, int(n)
    structure = ndi.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    labels, n = ndi.label(mask, structure=structure, output=np.uint32)
    return labels, int(n)


def _sizes(labels: np.ndarray, n: int) -> np.ndarray:
    # Slab by slab: np.bincount would otherwise make an int64 copy of the whole volume.
    sizes = np.zeros(n + 1, np.int64)
    for zs in _z_slabs(labels.shape, _SLAB_VOXELS):
        sizes += np.bincount(labels[zs].ravel(), minlength=n + 1)
    return sizes


def _z_slabs(shape: tuple[int, ...], slab_voxels: int) -> Iterator[slice]:
    depth = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for z0 in range(0, shape[0], depth):
        yield slice(z0, min(z0 + depth, shape[0]))


def _keep_lut(keep: np.ndarray, dtype: Any = np.uint32) -> np.ndarray:
    """Lookup table old id -> new id: kept ids renumbered 1.. in order, others (and 0) -> 0."""
    keep = keep.copy()
    keep[0] = False
    lut = np.zeros(keep.size, dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut


def _remove_small_relabel(labels: np.ndarray, n: int, min_size: int) -> np.ndarray:
    """Drop instances with fewer than ``min_size`` voxels and renumber the rest 1..N
    (in place when ``labels`` is uint32)."""
    lut = _keep_lut(_sizes(labels, n) >= min_size)
    out = labels if labels.dtype == np.uint32 else np.empty(labels.shape, np.uint32)
    for zs in _z_slabs(labels.shape, _SLAB_VOXELS):
        out[zs] = lut[labels[zs]]
    return out


def binary_connected(semantic: Any, *, t_fg: float = 0.8, min_size: int = 128, connectivity: int = 26) -> np.ndarray:
    """Instances as 3D connected components of the foreground (Lucchi-style outputs).

    Parameters
    ----------
    semantic : (Z, Y, X) bool, float or uint8 array
        A binary mask (bool, used as is) or a foreground probability map. A 0/1 mask
        stored as uint8 would read as probabilities 0..255: pass it as bool.
    t_fg : float
        Foreground threshold for probability maps (baseline: 0.8).
    min_size : int
        Instances with fewer voxels are removed (baseline: 128).
    connectivity : {6, 18, 26}
        Voxel neighbourhood (baseline: 26, skimage's default in 3D).

    Returns
    -------
    (Z, Y, X) uint32 array
    """
    semantic = np.asarray(semantic)
    if semantic.dtype == np.bool_:
        if semantic.ndim != 3:
            raise UserInputError(f"semantic must be a 3-D (Z, Y, X) volume, got shape {semantic.shape}")
        fg = semantic
    else:
        fg = _above(_check_prob(semantic, "semantic"), _check_threshold(t_fg, "t_fg"))
    labels, n = _label(fg, _check_connectivity(connectivity))
    return _remove_small_relabel(labels, n, _check_size(min_size, "min_size"))


def bc_connected(
    semantic: Any,
    contour: Any,
    *,
    t_fg: float = 0.8,
    t_contour: float = 0.5,
    min_size: int = 128,
    dilation: tuple[int, int, int] | None = (1, 5, 5),
    dilate_into: Literal["all", "foreground"] = "all",
    connectivity: int = 26,
) -> np.ndarray:
    """MitoEM baseline ``bc_connected``: components of (foreground and not contour).

    Steps: ``sem > t_fg and contour < t_contour``; 3D connected components; a grey
    dilation of the labels with a box of shape ``dilation`` (the larger id wins where two
    grow into each other) to give back the contour voxels cut away; removal of instances
    under ``min_size`` voxels; renumbering.

    Parameters
    ----------
    semantic, contour : (Z, Y, X) float or uint8 arrays
        Foreground and instance-contour probabilities.
    t_fg, t_contour : float
        Thresholds (baseline: 0.8, 0.5).
    min_size : int
        Instances with fewer voxels are removed (baseline: 128).
    dilation : (int, int, int) or None
        Box size of the dilation in (Z, Y, X); None skips it (baseline: (1, 5, 5)).
    dilate_into : {"all", "foreground"}
        "all" grows into any voxel (baseline); "foreground" only into ``sem > t_fg``.
    connectivity : {6, 18, 26}
        Voxel neighbourhood of the components (baseline: 26).

    Returns
    -------
    (Z, Y, X) uint32 array
        Needs about 10 bytes per voxel on top of the inputs.
    """
    semantic, contour = _check_prob(semantic, "semantic"), _check_prob(contour, "contour")
    _check_same_shape(semantic, contour, ("semantic", "contour"))
    _check_threshold(t_fg, "t_fg")
    _check_threshold(t_contour, "t_contour")
    _check_connectivity(connectivity)
    _check_size(min_size, "min_size")
    if dilate_into not in ("all", "foreground"):
        raise UserInputError(f'dilate_into must be "all" or "foreground", got {dilate_into!r}')
    if dilation is not None and (len(dilation) != 3 or min(dilation) < 1):
        raise UserInputError(f"dilation must be three positive box sizes (Z, Y, X), got {dilation}")
    fg = _above(semantic, t_fg)
    labels, n = _label(fg & _below(contour, t_contour), connectivity)
    if dilation is not None:
        labels = ndi.grey_dilation(labels, size=tuple(dilation))
        if dilate_into == "foreground":
            labels[~fg] = 0
    return _remove_small_relabel(labels, n, min_size)


def bc_watershed(
    semantic: Any,
    contour: Any,
    *,
    t_seed: float = 0.9,
    t_contour: float = 0.8,
    t_fg: float = 0.85,
    min_seed_size: int = 32,
    min_size: int = 128,
    connectivity: int = 26,
) -> np.ndarray:
    """MitoEM baseline ``bc_watershed``: seeded watershed of the foreground.

    Steps: seeds = ``sem > t_seed and contour < t_contour``, 3D connected components,
    seeds under ``min_seed_size`` voxels dropped; ``skimage.segmentation.watershed`` of
    ``-sem`` from the seeds within ``sem > t_fg``; instances under ``min_size`` voxels
    removed; renumbering. Foreground not reached from any seed stays background.

    Parameters
    ----------
    semantic, contour : (Z, Y, X) float or uint8 arrays
        Foreground and instance-contour probabilities.
    t_seed, t_contour, t_fg : float
        Thresholds (baseline: 0.9, 0.8, 0.85).
    min_seed_size, min_size : int
        Minimum voxels of a seed and of a final instance (baseline: 32, 128).
    connectivity : {6, 18, 26}
        Voxel neighbourhood of the seed components (baseline: 26).

    Returns
    -------
    (Z, Y, X) uint32 array
        The watershed works on a float64 copy of ``semantic``: budget about 30 bytes per
        voxel; use :func:`label_chunked` for volumes that do not fit.
    """
    from skimage.segmentation import watershed  # skimage is slow to import; only needed here

    semantic, contour = _check_prob(semantic, "semantic"), _check_prob(contour, "contour")
    _check_same_shape(semantic, contour, ("semantic", "contour"))
    for t, name in ((t_seed, "t_seed"), (t_contour, "t_contour"), (t_fg, "t_fg")):
        _check_threshold(t, name)
    _check_size(min_seed_size, "min_seed_size")
    _check_size(min_size, "min_size")
    _check_connectivity(connectivity)
    seeds, n = _label(_above(semantic, t_seed) & _below(contour, t_contour), connectivity)
    seeds = _remove_small_relabel(seeds, n, min_seed_size)
    n = int(seeds.max()) if seeds.size else 0
    labels = watershed(-semantic.astype(np.float64), seeds, mask=_above(semantic, t_fg))
    del seeds
    return _remove_small_relabel(labels.astype(np.uint32, copy=False), n, min_size)


def distance_watershed(
    semantic: Any,
    contour: Any,
    *,
    t_fg: float = 0.5,
    t_contour: float = 0.5,
    peak_height: float = 2.0,
    anisotropy: float = 1.0,
    min_size: int = 128,
    merge_ratio: float = 1.0,
) -> np.ndarray:
    """Instances split by their shape: a watershed of the distance transform.

    Touching instances whose interface the contour channel misses (no membrane between them
    in the image) still meet at a neck of the foreground. Steps: the core ``sem > t_fg and
    contour < t_contour``; its Euclidean distance transform with voxels ``anisotropy`` times
    longer in z than in y and x; seeds = the regional maxima that stand ``peak_height`` (in
    xy voxels) above their surroundings (h-maxima, so a noisy ridge gives one seed), 3D
    connected; ``skimage.segmentation.watershed`` of the negated distance from the seeds
    within ``sem > t_fg``; neighbouring regions merged where the neck between them is wide
    (``merge_ratio``); instances under ``min_size`` voxels removed; renumbering.

    h-maxima compare heights in voxels, so a long, thick object with a mild waist (peaks 8
    voxels, neck 5) is cut where a touching pair of thin ones (peaks 3, neck 1) is not. The
    neck's distance over the lower of the two peaks is the same for an object at any scale: a
    waist keeps most of the object's thickness, the contact of two capsules little of it.

    Parameters
    ----------
    semantic, contour : (Z, Y, X) float or uint8 arrays
    t_fg, t_contour : float
        Thresholds (probabilities in [0, 1]).
    peak_height : float
        h of the h-maxima, >= 0: larger merges more.
    anisotropy : float
        z voxel size over the xy voxel size (> 0): 1 for isotropic EM, about 4 for MitoEM.
    min_size : int
    merge_ratio : float
        In [0, 1]: two touching regions are merged (transitively) when the largest distance
        on their shared boundary (the neck) exceeds ``merge_ratio`` times the lower of their
        two peak distances; 1 merges none (the decoding without this step), smaller merges more.
        Where the contour channel separates two objects the core is cut, the neck is 0 and
        they are never merged.

    Returns
    -------
    (Z, Y, X) uint32 array
        Needs about 40 bytes per voxel (float64 distance, labels).
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    semantic, contour = _check_prob(semantic, "semantic"), _check_prob(contour, "contour")
    _check_same_shape(semantic, contour, ("semantic", "contour"))
    _check_threshold(t_fg, "t_fg")
    _check_threshold(t_contour, "t_contour")
    _check_size(min_size, "min_size")
    if not peak_height >= 0:
        raise UserInputError(f"peak_height must be >= 0 (xy voxels), got {peak_height}")
    if not anisotropy > 0:
        raise UserInputError(f"anisotropy must be > 0 (z voxel size / xy voxel size), got {anisotropy}")
    if not 0 <= merge_ratio <= 1:
        raise UserInputError(f"merge_ratio must be in [0, 1] (neck distance / lower peak distance), got {merge_ratio}")
    fg = _above(semantic, t_fg)
    distance = ndi.distance_transform_edt(fg & _below(contour, t_contour), sampling=(anisotropy, 1.0, 1.0))
    peaks = h_maxima(distance, peak_height) if peak_height > 0 else (distance > 0)
    seeds, n = _label(peaks.astype(bool) & (distance > 0), 26)
    labels = watershed(-distance, seeds, mask=fg).astype(np.uint32, copy=False)
    del seeds
    if merge_ratio < 1 and n > 1:
        labels = _merge_wide_necks(labels, n, distance, merge_ratio)
    del distance
    return _remove_small_relabel(labels, n, min_size)


def _merge_wide_necks(labels: np.ndarray, n: int, distance: np.ndarray, ratio: float) -> np.ndarray:
    """Merge regions 1..n of ``labels`` whose neck (the largest ``min(distance)`` over pairs of
    face-neighbour voxels, one in each) exceeds ``ratio`` times the lower region peak."""
    peaks = np.zeros(n + 1)
    np.maximum.at(peaks, labels.ravel(), distance.ravel())
    codes, necks = [], []
    for axis in range(3):
        ahead = [slice(None)] * 3
        behind = [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        a, b = labels[tuple(behind)], labels[tuple(ahead)]
        touch = (a != b) & (a != 0) & (b != 0)
        lo, hi = np.minimum(a[touch], b[touch]).astype(np.int64), np.maximum(a[touch], b[touch]).astype(np.int64)
        codes.append(lo * (n + 1) + hi)
        necks.append(np.minimum(distance[tuple(behind)][touch], distance[tuple(ahead)][touch]))
    code, neck = np.concatenate(codes), np.concatenate(necks)
    if code.size == 0:
        return labels
    pairs, inverse = np.unique(code, return_inverse=True)
    widest = np.zeros(pairs.size)
    np.maximum.at(widest, inverse, neck)
    lo, hi = pairs // (n + 1), pairs % (n + 1)
    merge = widest > ratio * np.minimum(peaks[lo], peaks[hi])
    graph = sparse.coo_matrix((np.ones(int(merge.sum()), np.int8), (lo[merge], hi[merge])), shape=(n + 1, n + 1))
    _, component = csgraph.connected_components(graph, directed=False)
    # Component ids of 1..n renumbered from 1 (the background, 0, is its own component).
    lut = np.zeros(n + 1, np.uint32)
    _, first = np.unique(component[1:], return_inverse=True)
    lut[1:] = first + 1
    for zs in _z_slabs(labels.shape, _SLAB_VOXELS):
        labels[zs] = lut[labels[zs]]
    return labels


class Foreground:
    """Lazy foreground mask of probability array-likes, thresholded slab by slab.

    ``Foreground(sem)[z0:z1]`` is ``sem[z0:z1] > t_fg``; with a contour map it is the
    ``bc_connected`` core ``sem > t_fg and contour < t_contour``. Pass it to
    :func:`label_chunked` to label probability maps stored on disk without loading them.

    Parameters
    ----------
    semantic : (Z, Y, X) float or uint8 array-like
    contour : (Z, Y, X) float or uint8 array-like, optional
    t_fg, t_contour : float
        Thresholds, applied as in the module docstring.
    """

    def __init__(self, semantic: Any, contour: Any = None, *, t_fg: float = 0.8, t_contour: float = 0.5):
        for vol, name in ((semantic, "semantic"), (contour, "contour")):
            if vol is None:
                continue
            if len(vol.shape) != 3:
                raise UserInputError(f"{name} must be a 3-D (Z, Y, X) volume, got shape {tuple(vol.shape)}")
            if np.dtype(vol.dtype) != np.uint8 and np.dtype(vol.dtype).kind != "f":
                raise UserTypeError(f"{name} must be float in [0, 1] or uint8 in 0..255, got dtype {vol.dtype}")
        if contour is not None and tuple(contour.shape) != tuple(semantic.shape):
            raise UserInputError(
                f"semantic has shape {tuple(semantic.shape)} but contour has shape "
                f"{tuple(contour.shape)}; expected the same"
            )
        self.semantic, self.contour = semantic, contour
        self.t_fg, self.t_contour = _check_threshold(t_fg, "t_fg"), _check_threshold(t_contour, "t_contour")
        self.shape = tuple(semantic.shape)
        self.dtype = np.dtype(np.bool_)

    def __getitem__(self, zs: slice) -> np.ndarray:
        fg = _above(np.asarray(self.semantic[zs]), self.t_fg)
        if self.contour is not None:
            fg &= _below(np.asarray(self.contour[zs]), self.t_contour)
        return fg


def _plane_pairs(upper: np.ndarray, lower: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs (a in ``upper``, b in ``lower``) of foreground voxels that touch across
    two adjacent z-planes of shape (Y, X)."""
    ny, nx = upper.shape
    a_parts, b_parts = [], []
    for dy, dx in _PLANE_OFFSETS[connectivity]:
        a = upper[max(0, -dy) : ny - max(0, dy), max(0, -dx) : nx - max(0, dx)]
        b = lower[max(0, dy) : ny - max(0, -dy), max(0, dx) : nx - max(0, -dx)]
        touch = (a != 0) & (b != 0)
        a, b = a[touch], b[touch]
        # Objects cover runs of voxels: dropping repeats of the previous pair first leaves
        # little for the sort below.
        new = np.ones(a.size, bool)
        new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        a_parts.append(a[new])
        b_parts.append(b[new])
    a, b = np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    new = np.ones(a.size, bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[new], b[new]


def _provisional(plane: np.ndarray, offset: int) -> np.ndarray:
    return np.where(plane != 0, plane.astype(np.int64) + offset, 0)


def label_chunked(
    mask: Any,
    out: Any = None,
    *,
    connectivity: int = 26,
    slab: int | None = None,
    min_size: int = 0,
) -> tuple[Any, int]:
    """3D connected components of a volume too large for memory, slab by slab along z.

    Pass 1 labels each slab of ``slab`` z-planes on its own, writes these slab-local ids
    to ``out`` and records, with ids offset past those of earlier slabs, the pairs that
    touch across each slab border and each id's voxel count. The touching pairs are merged with a
    union-find (connected components of the id graph, ``scipy.sparse.csgraph``), small
    objects are dropped, and pass 2 rewrites ``out`` slab by slab with the final ids. The
    result equals whole-volume labelling (``scipy.ndimage.label`` with the matching
    structure) followed by removal of objects under ``min_size`` voxels and renumbering
    1..N in order of first voxel.

    Parameters
    ----------
    mask : (Z, Y, X) array-like
        Foreground = non-zero; anything with ``shape`` and z-slicing (numpy array,
        h5py/zarr dataset, :class:`Foreground`).
    out : (Z, Y, X) array-like of unsigned integer dtype, optional
        Receives the labels (numpy array, h5py/zarr dataset); its dtype must hold the
        number of components of one slab and the final count. Default: a new uint32
        numpy array.
    connectivity : {6, 18, 26}
        Voxel neighbourhood.
    slab : int, optional
        z-planes per slab; default: as many as fit in 2**25 voxels. Memory: about 20
        bytes per slab voxel plus about 50 bytes per provisional id (all per-slab
        components), independent of the volume depth.
    min_size : int
        Objects with fewer voxels are removed (0 keeps all).

    Returns
    -------
    out : array-like
        The filled output.
    n : int
        Number of objects (labels are 1..n).
    """
    _check_connectivity(connectivity)
    _check_size(min_size, "min_size")
    shape = tuple(mask.shape)
    if len(shape) != 3:
        raise UserInputError(f"mask must be a 3-D (Z, Y, X) volume, got shape {shape}")
    if slab is None:
        slab = max(1, _CHUNK_VOXELS // max(1, shape[1] * shape[2]))
    if slab < 1:
        raise UserInputError(f"slab must be >= 1, got {slab}")
    if out is None:
        out = np.zeros(shape, np.uint32)
    if tuple(out.shape) != shape:
        raise UserInputError(f"out has shape {tuple(out.shape)} but mask has shape {shape}; expected the same")
    if np.dtype(out.dtype).kind != "u":
        raise UserTypeError(f"out must have an unsigned integer dtype (uint32 or uint64), got {out.dtype}")
    id_max = np.iinfo(out.dtype).max

    # Pass 1 writes each slab's own ids 1..n; provisional id = slab offset + own id.
    offsets = [0]
    sizes_parts = [np.zeros(1, np.int64)]
    edge_a, edge_b = [], []
    last_plane = None
    for z0 in range(0, shape[0], slab):
        zs = slice(z0, min(z0 + slab, shape[0]))
        labels, n = _label(np.asarray(mask[zs]) != 0, connectivity)
        if n > id_max:
            raise UserInputError(f"out dtype {out.dtype} cannot hold the {n} labels of one slab; pass a uint64 out")
        sizes_parts.append(np.bincount(labels.ravel(), minlength=n + 1)[1:])
        first_plane = _provisional(labels[0], offsets[-1])
        if last_plane is not None:
            a, b = _plane_pairs(last_plane, first_plane, connectivity)
            edge_a.append(a)
            edge_b.append(b)
        last_plane = _provisional(labels[-1], offsets[-1])
        out[zs] = labels
        offsets.append(offsets[-1] + n)
    del labels
    n_ids = offsets[-1]

    a = np.concatenate(edge_a) if edge_a else np.zeros(0, np.int64)
    b = np.concatenate(edge_b) if edge_b else np.zeros(0, np.int64)
    graph = sparse.coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n_ids + 1, n_ids + 1))
    n_comp, comp = csgraph.connected_components(graph, directed=False)
    # Number the merged objects by their smallest provisional id, i.e. by first voxel.
    first = np.full(n_comp, n_ids + 1, np.int64)
    np.minimum.at(first, comp, np.arange(n_ids + 1))
    rank = np.empty(n_comp, np.int64)
    rank[np.argsort(first)] = np.arange(n_comp)
    comp = rank[comp]  # the background (id 0) is its own component and gets rank 0
    comp_sizes = np.bincount(comp, weights=np.concatenate(sizes_parts), minlength=n_comp)
    keep = comp_sizes >= min_size
    if int(keep[1:].sum()) > id_max:
        raise UserInputError(f"out dtype {out.dtype} cannot hold {int(keep[1:].sum())} labels; pass a uint64 out")
    comp_lut = _keep_lut(keep, out.dtype)
    lut = comp_lut[comp]
    for k, z0 in enumerate(range(0, shape[0], slab)):
        zs = slice(z0, min(z0 + slab, shape[0]))
        slab_lut = lut[offsets[k] : offsets[k + 1] + 1].copy()
        slab_lut[0] = 0
        out[zs] = slab_lut[np.asarray(out[zs])]
    return out, int(comp_lut.max()) if comp_lut.size else 0
