"""Where the project's shared data lives: ../shared/data beside the checkout
(see its SOURCES.md). Found from $MHA2MLA_DATA, else from the working
directory and its parents, else from this source file (an editable or
in-tree install), so an installed package run from a checkout finds it."""
import os


# What a refusal over a missing default data file tells the user to do.
DATA_HINT = "set MHA2MLA_DATA to the data folder (README: Data)"


def shared_data_dir() -> str:
    env = os.environ.get("MHA2MLA_DATA")
    if env:
        return os.path.abspath(env)
    starts = [os.getcwd(), os.path.dirname(os.path.abspath(__file__))]
    for start in starts:
        d = start
        while True:
            for cand in (os.path.join(d, "shared", "data"), os.path.join(d, "..", "shared", "data")):
                if os.path.isdir(os.path.join(cand, "wikitext2")) or os.path.isdir(os.path.join(cand, "corpus")):
                    return os.path.normpath(cand)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
    return os.path.normpath(os.path.join(os.getcwd(), "..", "shared", "data"))  # for the error message


def shared_path(*parts: str) -> str:
    return os.path.join(shared_data_dir(), *parts)


def wikitext2_test() -> str:
    """WikiText-2's raw test split, the perplexity text of convert.py and
    evaluate.py."""
    return shared_path("wikitext2", "wiki.test.raw")
