"""Locating and loading WordNet 3.0 with NLTK's reader.

Three places are searched, in this order:

1. ``WNSEARCHDIR`` (the variable WordNet's own tools use),
2. NLTK's data path (``python -m nltk.downloader wordnet`` puts it there),
3. the system copy Debian's ``wordnet-base`` + ``wordnet-sense-index`` install
   in ``/usr/share/wordnet``.

A raw WordNet database directory (cases 1 and 3) lacks the ``lexnames`` file
NLTK's reader needs, and NLTK refuses to open files outside its data path, so
such a directory is staged (copied, with a generated ``lexnames``) once into a
cache directory that is then put on NLTK's data path.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

SYSTEM_WORDNET = Path("/usr/share/wordnet")

# WordNet 3.0's lexicographer files (lexnames(5WN)): number, name, syntactic category.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
_LEX_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

# Files NLTK's WordNetCorpusReader opens; the sense index and counts give tag frequencies.
DATABASE_FILES = [
    *(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
    "index.sense", "cntlist.rev",
]

MISSING_MESSAGE = (
    "WordNet 3.0 was not found (looked in $WNSEARCHDIR, NLTK's data path {nltk_path} and {system}). "
    "Fix it with either\n"
    "  sudo apt-get install wordnet-base wordnet-sense-index   (Debian/Ubuntu system copy), or\n"
    "  python -m nltk.downloader wordnet                        (NLTK's data directory),\n"
    "or point WNSEARCHDIR at a WordNet 3.0 'dict' directory."
)


class WordNetNotFound(RuntimeError):
    """No usable WordNet 3.0 database could be found."""


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0, as NLTK's reader expects it."""
    return "".join(
        f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)
    )


def _is_database(path: Path) -> bool:
    return all((path / name).is_file() for name in ("data.noun", "index.noun", "index.sense", "cntlist.rev"))


def cache_dir() -> Path:
    """Where staged copies go: ``$DACO_CACHE`` or ``$XDG_CACHE_HOME/daco`` (default ``~/.cache/daco``)."""
    if os.environ.get("DACO_CACHE"):
        return Path(os.environ["DACO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "daco"


def stage_database(source: Path, nltk_root: Path) -> Path:
    """Copy a raw WordNet directory to ``nltk_root/corpora/wordnet`` with a ``lexnames`` file.

    Idempotent: files already staged with the same size are kept. Returns the staged folder.
    """
    target = nltk_root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        src, dst = source / name, target / name
        if not src.is_file():
            continue
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    lexnames = target / "lexnames"
    if (source / "lexnames").is_file():
        shutil.copyfile(source / "lexnames", lexnames)
    elif not lexnames.is_file():
        lexnames.write_text(lexnames_text())
    return target


def find_wordnet(search_dir: str | None = None) -> tuple[Path, str]:
    """Return (NLTK data root holding ``corpora/wordnet``, where it came from).

    ``search_dir`` overrides ``$WNSEARCHDIR``. Raises :class:`WordNetNotFound` with both fixes.
    """
    import nltk

    search_dir = search_dir or os.environ.get("WNSEARCHDIR")
    if search_dir:
        path = Path(search_dir)
        if not _is_database(path):
            raise WordNetNotFound(
                f"WNSEARCHDIR={search_dir} is not a WordNet 3.0 database directory "
                "(data.noun, index.noun, index.sense and cntlist.rev are needed). "
                "Unset it or point it at WordNet's 'dict' directory."
            )
        return cache_dir() / "nltk_data", f"WNSEARCHDIR:{path}"
    try:
        found = nltk.data.find("corpora/wordnet")
        return Path(str(found)).parents[1], f"nltk:{found}"
    except LookupError:
        pass
    if _is_database(SYSTEM_WORDNET):
        return cache_dir() / "nltk_data", f"system:{SYSTEM_WORDNET}"
    raise WordNetNotFound(MISSING_MESSAGE.format(nltk_path=list(nltk.data.path), system=SYSTEM_WORDNET))


@functools.lru_cache(maxsize=4)
def load_wordnet(search_dir: str | None = None):
    """Return NLTK's ``WordNetCorpusReader`` over WordNet 3.0 (see :func:`find_wordnet`)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root, origin = find_wordnet(search_dir)
    kind, _, source = origin.partition(":")
    if kind in ("WNSEARCHDIR", "system"):
        stage_database(Path(source), root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    with warnings.catch_warnings():  # "multilingual functions are not available": no OMW is asked for
        warnings.simplefilter("ignore")
        reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    if reader.get_version() != "3.0":
        raise WordNetNotFound(f"WordNet at {origin} is version {reader.get_version()}, 3.0 is required. "
                              + MISSING_MESSAGE.format(nltk_path=list(nltk.data.path), system=SYSTEM_WORDNET))
    return reader


def wordnet_origin(search_dir: str | None = None) -> str:
    """Where :func:`load_wordnet` reads WordNet from (for metadata)."""
    return find_wordnet(search_dir)[1]
