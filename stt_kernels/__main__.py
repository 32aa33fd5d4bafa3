"""``python -m stt_kernels``: which backends run here, and why the others do not."""

from .backend import backends

for status in backends().values():
    print(status)
