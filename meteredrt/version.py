"""
The version of meteredrt that is running, for C{meteredrt --version}.

An installed package knows its version from its metadata
(L{importlib.metadata}); a source tree run without installing it (as the
tests do) has no metadata, so the version is read from the tree's
C{setup.cfg} and marked as such.
"""

from __future__ import annotations

import configparser
import os
from importlib import metadata

#: The distribution name in C{setup.cfg}.
DISTRIBUTION = "meteredrt"


def package_version() -> str:
    """
    The installed version, else C{"<version> (source tree at <dir>)"},
    else C{"unknown"}.
    """
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = configparser.ConfigParser(interpolation=None)
    if parser.read(os.path.join(tree, "setup.cfg")) and parser.has_option("metadata", "version"):
        return f"{parser.get('metadata', 'version')} (source tree at {tree})"
    return "unknown"
