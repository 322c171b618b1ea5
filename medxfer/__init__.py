"""medxfer: transfer-learning workbench for medical image segmentation, built on MONAI.

Package folders follow the life of a model: ``data`` -> ``planning`` -> ``transforms`` ->
``networks`` -> ``transfer`` -> ``transferability``.
"""

__version__ = "0.1.0"
