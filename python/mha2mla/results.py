"""Writing benchmark and evaluation results: JSON + Markdown named after the card."""
import json
import os


def save_results(out_dir: str, stem: str, card: str, data: dict, markdown_text: str) -> str:
    """Writes <stem>_<card>.json and .md under out_dir, prints the Markdown,
    returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{card.replace(' ', '_')}")
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write(markdown_text)
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
