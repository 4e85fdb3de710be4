"""torch as the oracle of the differential harness: run as a script, in a sandbox folder, on many files at once.

    python torch_oracle.py JOBS.json RESULTS.jsonl

``JOBS.json`` lists ``[path, folder]`` pairs. For each, in ``folder`` (its own current directory, so a payload's
canary file says which file ran it), this records what ``torch.load(path, weights_only=False)`` did: whether the
canary appeared, whether it loaded, the tensors it loaded as ``[shape, sha256 of the bytes]``, and which
``data.pkl`` ``torch._C.PyTorchFileReader`` picks (its sha256). One JSON line per file, flushed at once, so a
caller can restart after the file that killed the process. Never import this module: it runs payloads.
"""

import hashlib
import json
import os
import sys

CANARY = "CKCONV_PWNED"


def tensors(obj, out, depth=0):
    import torch

    if depth > 50:
        return
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.append([list(t.shape), hashlib.sha256(raw).hexdigest()])
    elif isinstance(obj, dict):
        for v in obj.values():
            tensors(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors(v, out, depth + 1)


def judge(path, folder):
    import torch

    os.chdir(folder)
    result = {"path": path, "loaded": False, "error": None, "tensors": [], "picked": None}
    try:
        reader = torch._C.PyTorchFileReader(path)
        result["picked"] = hashlib.sha256(reader.get_record("data.pkl")).hexdigest()
    except Exception as exc:  # noqa: BLE001 - not a zip, or one miniz refuses
        result["picked"] = f"error: {type(exc).__name__}"
    try:
        obj = torch.load(path, weights_only=False)
        result["loaded"] = True
        found = []
        tensors(obj, found)
        result["tensors"] = sorted(found)
    except BaseException as exc:  # noqa: BLE001 - every way a hostile file can fail
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["ran"] = os.path.exists(os.path.join(folder, CANARY))
    return result


def main():
    import warnings

    warnings.simplefilter("ignore")
    jobs = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "a") as out:
        for path, folder in jobs:
            out.write(json.dumps(judge(path, folder)) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
