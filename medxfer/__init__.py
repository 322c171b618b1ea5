"""medxfer: transfer-learning workbench for medical image segmentation, built on MONAI.

Package folders follow the life of a model, and are layers (a module imports its own layer and
lower ones only; ``tests/test_layers.py`` checks it): ``data`` -> ``planning`` -> ``transforms`` ->
``networks`` -> ``losses`` / ``metrics`` -> ``transfer`` -> ``transferability`` -> ``handlers`` ->
``workflows`` -> ``study`` -> ``demo`` -> ``cli``; ``jsonfile``, ``device`` and ``resources`` sit
below them all.
"""

__version__ = "0.1.0"
