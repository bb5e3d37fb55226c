"""Sphinx configuration of the API reference (``tools/dev.sh docs`` builds it).

autodoc imports the package, so the compiled modules must be built (dev.sh builds them
in place): their docstrings and signatures come from the extensions themselves.
"""
import pyublk_fast

project = "pyublk_fast"
version = release = pyublk_fast.__version__
extensions = ["sphinx.ext.autodoc"]
root_doc = "index"
exclude_patterns = ["_build"]
# `name` in a docstring is code, as in the rest of the project's text
default_role = "code"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
html_theme = "alabaster"
html_title = f"pyublk_fast {release}"
html_static_path: list[str] = []
