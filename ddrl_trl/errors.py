"""The error types of ddrl-trl that more than one part of it raises or catches."""


class UsageError(ValueError):
    """Bad command-line input, found before any work: the `ddrl-trl` command prints it as one line, no traceback."""


class ReferenceSampleError(ValueError):
    """A reference sample that can be read but does not fit the training setup (pixel values, frame count, size)."""


class CheckpointError(ValueError):
    """A checkpoint or weight file that is incomplete, unreadable, non-finite or from another run."""


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or ±inf, refused for saving or loading."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses, gradients or weights that could not be skipped."""
