from setuptools import find_packages, setup

setup(
    name="procctl",
    version="0.1.0",
    description="Run N worker processes you can pause, resume and stop, leaving nothing behind.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["procctl", "procctl.*"]),
    package_data={"procctl": ["py.typed"]},
    # rich draws the live terminal view and psutil measures each worker for it
    # (CPU %, RSS); both load only in the command line, never on `import procctl`.
    install_requires=["click>=8.0", "rich>=13", "psutil>=5.9"],
    extras_require={
        # distributed: the cluster tests (tests/test_cluster.py) run in CI too.
        # pytest-xdist: the README's test command runs the suite in four processes (-n 4).
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3.2", "psutil>=5.9", "mypy>=1.8", "ruff>=0.4",
                 "types-psutil", "distributed>=2024.1", "prometheus_client>=0.16"],
        # procctl.cluster: ClusterController and ClusterExecutor on a Dask cluster.
        "dask": ["distributed>=2024.1"],
        "bench": ["psutil>=5.9", "loky>=3.4", "pebble>=5.0", "mpire>=2.8", "billiard>=4.0"],
    },
    entry_points={
        "console_scripts": ["procctl=procctl.__main__:main"],
        "pytest11": ["procctl=procctl.pytest_plugin"],
    },
)
