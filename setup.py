import re
from pathlib import Path

from setuptools import find_packages, setup

# one version string: dpo/__init__.py's (`dpo --version` prints it)
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "dpo" / "__init__.py").read_text())[1]

setup(
    name="dpo-noise",
    version=VERSION,
    description="Hand-rolled PyTorch DPO on HellaSwag preference pairs with controlled label noise",
    license="MIT",
    packages=find_packages(include=["dpo", "dpo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "transformers>=4.56",  # the `dtype=` argument the model loader passes
        "huggingface_hub",  # the hub cache and offline checks of dpo/models.py
        "tokenizers",
        "safetensors",  # LoRA adapters and checkpoints are read and written as safetensors, never pickles
        "tomli; python_version < '3.11'",  # sweep files (tomllib is in the standard library from 3.11)
        "numpy",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        # the full test suite also exercises the GGUF conversion, the plots and Parquet/Arrow preference data
        "dev": ["pytest", "ruff", "gguf", "accelerate", "matplotlib", "pyarrow"],
        "gguf": ["gguf", "accelerate"],
        "plots": ["matplotlib"],
        # `dpo data --pairs` on Parquet files and `datasets` folders (JSON, JSONL and CSV need nothing)
        "pairs": ["pyarrow"],
        # `--pairs OWNER/NAME[:CONFIG]`: a preference dataset on the Hugging Face hub (local files need none of it)
        "datasets": ["datasets"],
        # `dpo train --report-to`: the dashboards besides TensorBoard (dpo/dashboards.py)
        "wandb": ["wandb"],
        "mlflow": ["mlflow"],
        "trackio": ["trackio"],
        # `[eval] lm_eval_tasks` in sweep files: lm-evaluation-harness on each cell's final/ (model_args as a dict)
        "harness": ["lm-eval>=0.4.2"],
        # experiments/audit_real.py's cleanlab arm: confident learning, the peer `dpo audit` is compared with
        "cleanlab": ["cleanlab"],
    },
    entry_points={"console_scripts": ["dpo = dpo.cli:main"]},
)
