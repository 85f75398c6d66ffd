"""Installs the tapeworks packages `engine` and `models`."""
from setuptools import find_packages, setup

setup(
    name="tapeworks",
    version="0.1.0",
    description="A readable TensorFlow 2 custom-training-loop engine for fine-tuning image models.",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*"]),
    py_modules=["train_main"],
    python_requires=">=3.10",
    install_requires=[
        # The CPU wheel works everywhere; GPU users install tensorflow[and-cuda] (see README).
        "tensorflow>=2.21,<2.22",
        "numpy",
        "absl-py",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
    entry_points={"console_scripts": ["tapeworks=train_main:run"]},
)
