"""``python -m wetok.memory`` (and ``wetok-memory``): paper Table 1 as a Hydra app on
conf/memory.yaml; the measurement lives beside the other benchmarks, in
:mod:`wetok.bench.memory`.

    python -m wetok.memory                                  # the paper's setting, on a GPU
    python -m wetok.memory dims=[8,16] batch_size=4         # smaller
    python -m wetok.memory logger=wandb                     # also a W&B table
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import wetok.config  # noqa: F401  (registers the run-folder resolver)
from wetok.bench.memory import report


@hydra.main(version_base="1.3", config_path="../conf", config_name="memory")
def main(cfg: DictConfig) -> None:
    report(cfg)


if __name__ == "__main__":
    main()
