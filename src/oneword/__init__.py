"""oneword: Textual Inversion (Gal et al. 2022) as production software."""

__version__ = "0.1.0"
