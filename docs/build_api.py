"""Build the API reference, HTML generated from the docstrings with pdoc:

    python docs/build_api.py [OUT]          # default docs/api; open OUT/index.html

CI runs it on every change (.ci/run) and fails on any warning pdoc gives (a name in an
``__all__`` that does not resolve, an annotation it cannot read), so the reference
cannot rot. The HTML is not committed: it is built from the code.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

# The public modules; pdoc follows each one's ``__all__`` to its submodules
# (shardline.models brings schedules, gpt, minilm, hf and compress).
MODULES = ["shardline", "shardline.models", "shardline.transport", "shardline.tensors",
           "shardline.serve"]

# pdoc's warnings that say nothing about our docs, each with why.
TOLERATED = [
    # typing.NamedTuple generates __init__ in a namespace of its own, where pdoc cannot
    # evaluate string annotations; the tuple's fields are documented all the same.
    re.compile(r"Error parsing type annotation .* for shardline\.models(\.compress)?"
               r"\.Compressed\.__init__"),
]


def build(out: Path) -> list[str]:
    """Write the HTML under ``out``; return pdoc's warnings that are not tolerated."""
    import pdoc

    for name in MODULES:
        module = importlib.import_module(name)
        # Names a module loads on first use (``__getattr__``) are looked up once here,
        # so pdoc finds them in the module like any other.
        for attr in getattr(module, "__all__", ()):
            if attr not in vars(module):
                setattr(module, attr, getattr(module, attr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=out)
    return [str(w.message) for w in caught
            if "pdoc" in Path(w.filename).parts
            and not any(t.search(str(w.message)) for t in TOLERATED)]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "api")
    problems = build(out)
    for problem in problems:
        sys.stderr.write(f"docs/build_api.py: {problem}\n")
    if problems:
        return 1
    sys.stdout.write(f"API reference in {out}/index.html\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
