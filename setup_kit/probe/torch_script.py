"""Imports torch in its own process and prints what it says about CUDA, as JSON on stdout.

Run by the target interpreter. A torch that hangs or crashes only takes this process down.
"""

import json
import sys
import warnings


def collect():
    caught = []
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        import torch

        facts = {
            "version": torch.__version__,
            "cuda": torch.version.cuda or "",
            "hip": getattr(torch.version, "hip", None) or "",
            "file": torch.__file__,
        }
        available = bool(torch.cuda.is_available())
        facts["cuda_available"] = available
        devices = []
        if available:
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                devices.append({"index": index, "name": props.name,
                                "capability": "{0}.{1}".format(props.major, props.minor),
                                "memory_total_mib": props.total_memory // (1024 * 1024)})
        facts["devices"] = devices
    caught = [str(w.message).strip() for w in recorded]
    facts["warnings"] = caught
    return facts


if __name__ == "__main__":
    sys.stdout.write(json.dumps(collect()))
