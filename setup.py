"""
Packaging for meteredrt.

Metadata lives in C{setup.cfg}. This file adds the one thing declarative
configuration cannot say cleanly: the twistd plugin module ships as part of
the C{twisted.plugins} namespace (it has no C{__init__.py} on purpose, so it
merges into Twisted's own plugin directory in site-packages).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["meteredrt", "meteredrt.*"]) + ["twisted.plugins"],
)
