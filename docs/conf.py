"""Sphinx configuration for the triggers documentation."""

from __future__ import annotations

import os
import sys

# -- Django set-up (autodoc imports modules that need settings) ---------------

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

import triggers  # noqa: E402

# -- Project information -------------------------------------------------------

project = "triggers"
author = "The triggers developers"
copyright = "The triggers developers"  # noqa: A001 - Sphinx setting
release = triggers.__version__
version = ".".join(release.split(".")[:2])

# -- General configuration -----------------------------------------------------

# The package's docstrings are reStructuredText with Sphinx field lists, so
# napoleon is not enabled: it would read ``#:`` comments such as
# "Registry of trigger managers: ``...``" as "type: description".
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

master_doc = "index"
exclude_patterns = ["_build"]
default_role = "literal"
pygments_style = "sphinx"
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {
    "show-inheritance": True,
}

# Celery's and ClassRegistry's docstrings use roles and labels of their own
# documentation; do not copy them onto our subclasses.
autodoc_inherit_docstrings = False

# Types from the standard library and third-party packages cannot be linked
# without intersphinx (the build runs offline); they are shown as plain text.
nitpick_ignore_regex = [
    (r"py:class", r"(collections\.abc|contextlib|enum|logging|datetime|abc|threading|pathlib)\.\w+"),
    (r"py:func", r"unittest\.mock\..+"),
    (r"py:class", r"(celery|class_registry)\..+"),
    # Django's classes (base classes of the models, check messages).
    (r"py:class", r"django\..+"),
    # The type variable of triggers.exceptions.with_context.
    (r"py:class", r"triggers\.exceptions\.E"),
    # Type variables of generic helpers.
    (r"py:class", r"triggers\.(storages\.(base|cache)|testing)\.T"),
    (r"py:class", r"list\[tuple\[str"),  # a dataclass field's annotation, split by autodoc
    # The private module of record encodings.
    (r"py:class", r"triggers\.storages\._records\..+"),
]


# -- Resolving short names ------------------------------------------------------
#
# The package's docstrings refer to some objects by short names
# (``TaskConfig`` in triggers.config, ``TaskContext.filter_kwargs`` in
# triggers.exceptions …).  Resolve such a reference when exactly one documented
# object of the package ends with that name.


def _resolve_short_name(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target or target.startswith(("triggers.", "~")):
        return None
    domain = env.get_domain("py")
    suffix = "." + target.lstrip(".")
    matches = [
        name for name in domain.objects
        if name.startswith("triggers.") and name.endswith(suffix)
        and not domain.objects[name].aliased
    ]
    if len(matches) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    obj = domain.objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode,
                        matches[0])


def setup(app):
    app.connect("missing-reference", _resolve_short_name)


# -- HTML output ------------------------------------------------------------------

html_theme = "alabaster"
html_theme_options = {
    "description": "A distributed observer pattern for Django and Celery",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
htmlhelp_basename = "triggersdoc"
