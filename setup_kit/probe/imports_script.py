"""Runs import statements (JSON list on stdin) in the target interpreter; prints each outcome.

Used to ask whether a model's remote code could import its names from the installed
transformers, without loading the model.
"""

import json
import sys


def main():
    results = []
    for statement in json.loads(sys.stdin.read()):
        try:
            exec(statement, {})
            results.append({"statement": statement, "ok": True, "error": ""})
        except BaseException as exc:  # an import may raise anything, even SystemExit
            message = "{0}: {1}".format(type(exc).__name__, exc).strip()
            results.append({"statement": statement, "ok": False, "error": message[:500]})
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
