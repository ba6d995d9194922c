"""The catalog (models/*.toml) and themes (themes/*.toml) live at the repo root, where they are
reviewed like code, and ship inside the wheel as chatapp.catalog_data / chatapp.theme_data."""
from pathlib import Path

from setuptools import find_packages, setup

DATA = {"chatapp.catalog_data": "models", "chatapp.theme_data": "themes"}
DATA = {pkg: d for pkg, d in DATA.items() if (Path(__file__).parent / d).is_dir()}

setup(
    packages=find_packages(include=["chatapp", "chatapp.*"]) + list(DATA),
    package_dir=DATA,
)
