"""Engines: something that streams a reply for a list of chat messages.

`native` (InternLM2 weights on transformers' Llama), `remote-code` (the tutorial's
trust_remote_code path) and `openai` (any OpenAI-compatible server) share `base.Engine`.
"""
