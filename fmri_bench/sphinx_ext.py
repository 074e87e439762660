"""A small Sphinx extension for the book build (listed in ``_config.yml`` as an extra extension).

- Each script once per page: jupyter-book 1.x with sphinx-thebe 0.3 adds thebe's configuration
  script twice, and the second copy stops with ``Identifier 'THEBE_JS_URL' has already been
  declared`` in the browser console (found by ``fmri_bench.bookcheck``).
- A light colour mode by default: without one, pydata-sphinx-theme logs ``Got invalid theme mode``
  as a console error on a browser's first visit.
"""

from __future__ import annotations


def _script_id(script) -> str:
    """What a script is (its file, or its inline body, and its attributes), whatever its priority."""
    attrs = getattr(script, "attributes", {}) or {}
    return f"{getattr(script, 'filename', script) or ''}|{sorted((k, str(v)) for k, v in attrs.items())}"  # None == ''


def _page_context(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        seen, unique = set(), []
        for s in scripts:
            key = _script_id(s)
            if key not in seen:
                seen.add(key)
                unique.append(s)
        context["script_files"] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "light"


def setup(app):
    app.connect("html-page-context", _page_context, priority=900)  # after the extensions that add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
