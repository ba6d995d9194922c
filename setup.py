"""The catalog (models/*.toml) and themes (themes/*.toml) live at the repo root, where they are
reviewed like code, and ship inside the wheel as chatapp.catalog_data / chatapp.theme_data."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["chatapp", "chatapp.*"]) + ["chatapp.catalog_data", "chatapp.theme_data"],
    package_dir={"chatapp.catalog_data": "models", "chatapp.theme_data": "themes"},
)
