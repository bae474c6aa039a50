"""Runs import checks (a JSON list on stdin) in the target interpreter; prints each outcome.

Each item is {"statement": "from transformers.x import Y"} (executed, so the name must really
exist) or {"module": "einops"} (only located, not imported: cheap, and no side effects).
Used to ask whether a model's remote code could import in this environment.
"""

import importlib.util
import json
import sys


def run(item):
    if "module" in item:
        if importlib.util.find_spec(item["module"]) is None:
            raise ModuleNotFoundError("No module named '{0}'".format(item["module"]))
    else:
        exec(item["statement"], {})


def main():
    results = []
    for item in json.loads(sys.stdin.read()):
        try:
            run(item)
            results.append(dict(item, ok=True, error=""))
        except BaseException as exc:  # an import may raise anything, even SystemExit
            message = "{0}: {1}".format(type(exc).__name__, exc).strip()
            results.append(dict(item, ok=False, error=message[:500]))
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
