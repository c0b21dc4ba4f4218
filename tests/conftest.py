from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a real local Slurm)


def pytest_configure(config):
    if not any(m.split(":")[0].strip() == "slurm" for m in config.getini("markers")):
        config.addinivalue_line("markers", "slurm: needs a real local Slurm (installed by .ci/slurm.sh)")
