"""Shared fixtures: where the project's shared assets live, seeded RNG."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
REFERENCE = SHARED / "reference"
BUNDLED = ROOT / "models" / "reference"


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty kernel-probe cache (never the user's ~/.cache)."""
    monkeypatch.setenv("ONNXQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def need_shared(*parts) -> Path:
    """Path inside ../shared/assets, or skip the test saying why."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the shared assets are not beside this checkout")
    return path


@pytest.fixture
def rounding_devices(monkeypatch):
    """The device type every learned rounding of reconstruct_torch was made on (torch tier)."""
    import torch

    from onnxquant import reconstruct_torch, torch_quant

    seen = []

    class Recorded(torch_quant.Rounding):
        def __init__(self, layer, device, *args, **kwargs):
            seen.append(torch.device(device).type)
            super().__init__(layer, device, *args, **kwargs)

    monkeypatch.setattr(reconstruct_torch, "Rounding", Recorded)
    return seen
