"""Basic (Z, Y, X) indexing for readers that fetch one z-slice at a time."""

from __future__ import annotations

from typing import Union

Index = Union[int, slice]
Key = Union[Index, tuple]


def normalise_key(key: Key, shape: tuple[int, ...]) -> tuple[range, tuple[slice, slice], tuple]:
    """Split ``key`` over a 3-d ``shape`` into the z indices to read, the (y, x) slices to apply to
    each plane, and the index that drops the axes an integer selected (numpy semantics).

    Only ints, slices and one Ellipsis are accepted: readers of slices never need fancy indexing.
    """
    items = list(key) if isinstance(key, tuple) else [key]
    if items.count(Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (3 - (len(items) - 1))
    if len(items) > 3:
        raise IndexError(f"too many indices for a 3-d volume: {key!r}")
    items += [slice(None)] * (3 - len(items))
    slices: list[slice] = []
    squeeze: list[Union[int, slice]] = []
    for item, n in zip(items, shape):
        if isinstance(item, slice):
            slices.append(item)
            squeeze.append(slice(None))
        elif isinstance(item, int) or hasattr(item, "__index__"):
            i = int(item)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
            i %= n
            slices.append(slice(i, i + 1))
            squeeze.append(0)
        else:
            raise IndexError(f"only ints, slices and ... index a volume; got {item!r}")
    return range(*slices[0].indices(shape[0])), (slices[1], slices[2]), tuple(squeeze)
