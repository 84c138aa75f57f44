"""A labelled text set that exists wherever Python does: stdlib docstrings by area.

    python -c "from jobs.data.stdlib_docs import examples; print(len(examples()))"

Each example is the first sentence of a public function's, class's or method's
docstring; its label is the area of the module it comes from. Same Python version,
same set: it is built at run time, deterministically.
"""

from __future__ import annotations

import importlib
import inspect
import re

AREAS: dict[str, tuple[str, ...]] = {
    "text": (
        "string",
        "re",
        "textwrap",
        "difflib",
        "unicodedata",
        "codecs",
        "html",
        "html.parser",
        "gettext",
        "locale",
    ),
    "math": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "files": (
        "os",
        "os.path",
        "shutil",
        "pathlib",
        "glob",
        "fnmatch",
        "tempfile",
        "filecmp",
        "stat",
        "io",
        "fileinput",
    ),
    "network": (
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "smtplib",
        "ftplib",
        "imaplib",
        "poplib",
        "ipaddress",
        "socketserver",
        "xmlrpc.client",
    ),
    "concurrency": (
        "threading",
        "multiprocessing",
        "multiprocessing.pool",
        "asyncio",
        "concurrent.futures",
        "queue",
        "sched",
        "subprocess",
        "signal",
        "selectors",
    ),
    "data_structures": (
        "collections",
        "heapq",
        "bisect",
        "array",
        "copy",
        "enum",
        "dataclasses",
        "itertools",
        "functools",
        "operator",
        "weakref",
        "types",
    ),
    "time": ("datetime", "time", "calendar", "zoneinfo"),
    "formats": (
        "json",
        "csv",
        "pickle",
        "struct",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "configparser",
        "base64",
        "binascii",
        "xml.etree.ElementTree",
        "xml.dom.minidom",
        "sqlite3",
        "plistlib",
        "email.message",
    ),
}


def _first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0].replace("\n", " ")
    para = re.sub(r"\s+", " ", para)
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    return (match.group(1) if match else para).strip()


def _docs(module_name: str) -> list[tuple[str, str]]:
    """(first sentence, kind) of each public member's docstring; kind is "function"
    (functions and builtins) or "class" (a class and its methods)."""
    module = importlib.import_module(module_name)
    texts = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (
            inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)
        ):
            continue
        owner = getattr(obj, "__module__", None) or ""
        if not owner.lstrip("_").startswith(module_name.split(".")[0].lstrip("_")):
            continue  # re-exported from elsewhere
        members = [obj]
        if inspect.isclass(obj):
            members += [
                m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m)
            ]
        kind = "class" if inspect.isclass(obj) else "function"
        for member in members:
            doc = inspect.getdoc(member)
            if doc:
                texts.append((_first_sentence(doc), kind))
    return texts


def examples(min_words: int = 4, kind: str | None = None) -> list[dict[str, str]]:
    """[{"text", "label"}] with each text once (a text seen under two areas is dropped).
    ``kind``: only "function" docstrings, or only "class" ones (classes and their
    methods): two domains with the same labels (jobs/objectives/dann.py's benchmark)."""
    by_text: dict[str, set[str]] = {}
    kinds: dict[str, set[str]] = {}
    for area, modules in AREAS.items():
        for module_name in modules:
            for text, found in _docs(module_name):
                if len(text.split()) >= min_words:
                    by_text.setdefault(text, set()).add(area)
                    kinds.setdefault(text, set()).add(found)
    return [
        {"text": t, "label": next(iter(a))}
        for t, a in sorted(by_text.items())
        if len(a) == 1 and (kind is None or kinds[t] == {kind})
    ]
