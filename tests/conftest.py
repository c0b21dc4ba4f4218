"""Shared fixtures: a real local Slurm (tests/slurm_cluster.py), an offline TORCH_HOME, a
cache folder of each test's own (eval.cache_dir: rFID statistics, baselines) and one
torch.compile cache for the session."""
import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a real local Slurm)


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """One torch.compile cache for the session (TORCHINDUCTOR_CACHE_DIR, compile_cache_dir's
    default), so the per-test WETOK_CACHE does not make every compiling test start cold."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """WETOK_CACHE (eval.cache_dir's default) in this test's folder: no test reads another's."""
    monkeypatch.setenv("WETOK_CACHE", str(tmp_path / "wetok-cache"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME in which any download attempt fails the test."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "th"


def model_preset(name: str, group: str = "model") -> dict:
    """A conf/<group> preset as a plain dict (the configs are the one home of the presets);
    model_preset("gq", "quantizer") holds every quantizer key."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / group / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path))
