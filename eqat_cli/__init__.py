"""eqat: EfficientQAT, made usable.

Importing the package is cheap: nothing here imports torch.
"""

__version__ = "0.1.0"
