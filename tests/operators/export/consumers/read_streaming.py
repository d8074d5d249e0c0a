"""Runs in .venv-consumers (mosaicml-streaming): one epoch of the exported streams.

argv: shuffle seed, then one or more streams.json. Prints a JSON list, one entry per streams.json:
uid -> times drawn, domain -> samples, and per uid the caption and the SHA-256 of the image bytes
as StreamingDataset decoded them.
"""

import hashlib
import json
import sys
from collections import Counter

from streaming import Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory


def epoch(streams_json: str, seed: int) -> dict:
    streams = json.load(open(streams_json))
    clean_stale_shared_memory()
    ds = StreamingDataset(streams=[Stream(**s) for s in streams], shuffle=True, shuffle_seed=seed,
                          num_canonical_nodes=1, batch_size=1)
    uids, domains, fields = Counter(), Counter(), {}
    for sample in ds:
        uids[sample["uid"]] += 1
        domains[sample["domain"]] += 1
        fields[sample["uid"]] = [sample["caption"], hashlib.sha256(sample["image"]).hexdigest(), sample["repeats"]]
    return {"uids": uids, "domains": domains, "fields": fields, "epoch_size": len(ds)}


def main() -> None:
    print(json.dumps([epoch(path, int(sys.argv[1])) for path in sys.argv[2:]]))


if __name__ == "__main__":
    main()
