"""pip install -e .  (dependencies pinned in requirements.txt: pip install -r requirements.txt -e .)"""
from setuptools import find_packages, setup

setup(
    name="medsam-peft",
    version="0.1.0",
    description="Parameter-efficient adaptation of SAM, MobileSAM and EfficientSAM to medical images",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "datasets", "datasets.*", "engine", "engine.*",
                                    "common", "common.*"]),
    py_modules=["cfg", "train", "val", "compare", "benchmark"],
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt")
                      if line.split("#")[0].strip()],
)
