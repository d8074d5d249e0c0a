"""Runs in .venv-consumers (mosaicml-streaming): one epoch of the exported streams.

argv: streams.json, shuffle seed. Prints JSON: uid -> times drawn, domain -> samples, and per uid
the caption and the SHA-256 of the image bytes as StreamingDataset decoded them.
"""

import hashlib
import json
import sys
from collections import Counter

from streaming import Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory


def main() -> None:
    streams = json.load(open(sys.argv[1]))
    clean_stale_shared_memory()
    ds = StreamingDataset(streams=[Stream(**s) for s in streams], shuffle=True, shuffle_seed=int(sys.argv[2]),
                          num_canonical_nodes=1, batch_size=1)
    uids, domains, fields = Counter(), Counter(), {}
    for sample in ds:
        uids[sample["uid"]] += 1
        domains[sample["domain"]] += 1
        fields[sample["uid"]] = [sample["caption"], hashlib.sha256(sample["image"]).hexdigest(), sample["repeats"]]
    print(json.dumps({"uids": uids, "domains": domains, "fields": fields, "epoch_size": len(ds)}))


if __name__ == "__main__":
    main()
