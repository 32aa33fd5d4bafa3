"""Triton kernels. Each module registers its kernels in the op's table when imported; the
tables import them on first use (see ``stt_kernels.ops.kernels``)."""
