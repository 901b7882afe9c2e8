"""How hybrid models become ONNX: the timm zoo table, export code, local-weights loading.

`zoo` (the table) imports without torch; `export` imports torch and timm inside its
functions, so `import onnxquant.models` works in the no-torch test tier too.
"""
from .zoo import ZOO, ZooEntry, get, names

__all__ = ["ZOO", "ZooEntry", "get", "names"]
