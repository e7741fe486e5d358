"""Error types of the kernels package."""


class KernelArgumentError(ValueError):
    """A kernel argument has the wrong shape, dtype, device, layout or value; the message names it."""
