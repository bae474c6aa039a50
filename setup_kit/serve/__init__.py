"""`internlm-kit serve`: the model behind an OpenAI-compatible API and a chat page (or LMDeploy / vLLM)."""
