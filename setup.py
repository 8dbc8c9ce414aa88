"""Maps the repository's top-level folders under the one installed name `keytrio`.

pyproject.toml holds the metadata; only the package layout is computed here, because setuptools'
static configuration cannot list "every subpackage of actors/ as keytrio.actors.*".
"""

from setuptools import find_packages, setup

ROOTS = ("actors", "protocol", "testbed", "scenarios", "deploy")

packages = ["keytrio"]
package_dir = {"keytrio": "keytrio"}
for root in ROOTS:
    package_dir[f"keytrio.{root}"] = root
    packages.append(f"keytrio.{root}")
    packages += [f"keytrio.{root}.{sub}" for sub in find_packages(root)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"keytrio.deploy": ["*.service", "*.toml", "*.md"]},
)
