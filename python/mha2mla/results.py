"""Writing benchmark and evaluation results: JSON + Markdown named after the card."""
import json
import os


def save_results(out_dir: str, stem: str, card: str, data: dict, markdown_text: str, echo: bool = True) -> str:
    """Writes <stem>_<card>.json and .md under out_dir (each through a
    temporary file, so an interrupted write leaves the last complete one),
    prints the Markdown unless echo is False, returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{card.replace(' ', '_')}")
    with open(path + ".json.tmp", "w") as f:
        json.dump(data, f, indent=2)
    with open(path + ".md.tmp", "w") as f:
        f.write(markdown_text)
    os.replace(path + ".json.tmp", path + ".json")
    os.replace(path + ".md.tmp", path + ".md")
    if echo:
        print(markdown_text)
    return path


def pyplot():
    """matplotlib.pyplot on a file backend, or None where matplotlib is missing
    (pictures are extras: nothing fails without them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
