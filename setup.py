from setuptools import find_packages, setup

setup(
    name="dpo-noise",
    version="0.1.0",
    description="Hand-rolled PyTorch DPO on HellaSwag preference pairs with controlled label noise",
    packages=find_packages(include=["dpo", "dpo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "transformers>=4.45",
        "tokenizers",
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
    },
    entry_points={"console_scripts": ["dpo = dpo.cli:main"]},
)
