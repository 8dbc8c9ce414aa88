"""Maps the repository's top-level folders under the one installed name `keytrio`.

pyproject.toml holds the metadata; only the package layout is computed here, because setuptools'
static configuration cannot list "every subpackage of actors/ as keytrio.actors.*".
"""

from setuptools import Extension, find_packages, setup

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
    # The IMA fast path's line loop in C (protocol/ima_fast.py uses it when importable, its own
    # Python otherwise). optional: a machine without a compiler or libssl-dev still installs;
    # CI fails instead (tests/protocol/test_ima_fast_c.py). An editable install builds it in
    # place, next to protocol/ima_fast.py.
    ext_modules=[
        Extension(
            "keytrio.protocol._ima_fast",
            sources=["protocol/_ima_fast.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ],
)
