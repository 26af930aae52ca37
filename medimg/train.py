"""``python -m medimg.train bundle=NAME key=value ...`` (Hydra entry point; thin)."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

import medimg.cpu  # noqa: F401 - OpenMP spin default, before PyTorch loads
from medimg.errors import run_cli
from medimg.resources import resource_dir

CONFIG_DIR = str(resource_dir("configs"))


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from medimg.runs.run import run_training

    logging.getLogger("medimg").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # third-party deprecation notices about their own internals (Lightning's pytree use, MONAI's metrics
    # calling its own deprecated argument): nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*")
    code = run_cli(lambda: run_training(cfg) and None)
    if code:
        sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    _main()


if __name__ == "__main__":
    main()
