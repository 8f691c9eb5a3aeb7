"""The one exception of the data layer."""


class DataError(ValueError):
    """Bad data input (source folder, split file, ratio, counts, .beton file).

    The message is one line and names what is wrong and where, e.g.
    ``DataError: data.imbalance_ratio must be >= 1, got 0.5``.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
