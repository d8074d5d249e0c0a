"""Runs in .venv-consumers (Hugging Face datasets): the exported hf/load_mixture.py, unmodified.

argv: path of load_mixture.py, number of interleaved examples to draw. Prints JSON: uid -> times
in epoch(), domain -> examples among the first draws of interleaved(), and per uid the caption and
image size that datasets decoded.
"""

import importlib.util
import json
import sys
from collections import Counter


def main() -> None:
    spec = importlib.util.spec_from_file_location("load_mixture", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    epoch = loader.epoch()
    uids = Counter(epoch.select_columns(["uid"])["uid"])
    fields = {}
    for row in loader.concatenate_datasets(loader.domains()):
        fields[row["uid"]] = [row["text"], list(row["image"].size), row["repeats"]]
    draws = int(sys.argv[2])
    mixed = loader.interleaved()
    domains = Counter(mixed.select_columns(["domain"]).select(range(min(draws, len(mixed))))["domain"])
    print(json.dumps({"uids": uids, "domains": domains, "fields": fields, "interleaved": len(mixed)}))


if __name__ == "__main__":
    main()
