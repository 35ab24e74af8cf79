"""compressor: stack distillation, structured pruning and quantization; measure every step."""

__version__ = "0.1.0"

# Bumped whenever the layout or meaning of an artifact changes: it is part of every stage key,
# so old artifacts are never mistaken for new ones.
FORMAT_VERSION = 1


class UserError(Exception):
    """A problem the user can act on: a bad recipe or file (code 2), or a run that cannot go
    on, such as a diverged loss (code 1). The CLI prints it as one line, no traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
