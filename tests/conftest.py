"""Fixtures live in tests/fixtures/, one module per kind of situation a user is in."""

pytest_plugins = [
    "fixtures.models",   # tiny InternLM2 checkpoints and tokenizers
    "fixtures.remote_code",  # a tiny InternLM2 folder whose remote code runs (transformers 4.38)
    "fixtures.venvs",    # throwaway virtual environments with real (old) packages
    "fixtures.hub",      # a hub-compatible HTTP server on 127.0.0.1
    "fixtures.modelscope_hub",  # a ModelScope-compatible hub on 127.0.0.1, for the real modelscope package
    "fixtures.gpu",      # fake nvidia-smi executables printing real drivers' output
    "fixtures.servers",  # OpenAI-compatible servers started on 127.0.0.1
]
