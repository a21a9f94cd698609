"""oneword: Textual Inversion (Gal et al. 2022) as production software."""

from oneword import step_exit

__version__ = "0.1.0"

step_exit.install()
