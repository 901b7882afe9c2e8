"""Graph passes, one per file. Each exposes ``run(graph, ctx) -> int`` (places matched).

The pipeline is the explicit ordered list ``PIPELINE``; passes only mark the plan,
``onnxquant.emit`` creates every Q/DQ node afterwards.
"""

from . import (canonicalize, check_model, find_attention, find_blocks, find_linear,
               find_residuals, fold_batchnorm, select_sites)

PIPELINE = (check_model.run, canonicalize.run, fold_batchnorm.run, find_attention.run,
            find_blocks.run, find_linear.run, find_residuals.run, select_sites.run)
