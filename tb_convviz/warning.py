"""The warning tb-convviz gives when a checkpoint, or part of one, could not be logged."""


class ConvVizWarning(UserWarning):
    """A checkpoint that could not be logged; training goes on."""
