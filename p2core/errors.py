"""Errors that the CLI turns into a one-line message and exit status 2 (user mistakes, not bugs)."""


class UserError(Exception):
    """Bad input from the user: a config key, a file, a flag. The message names it."""


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss; carries the image count where it happened."""

    def __init__(self, images_seen: int, loss: float):
        super().__init__(f"training diverged: loss={loss} at {images_seen} images seen")
        self.images_seen = images_seen
        self.loss = loss
