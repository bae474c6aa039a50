"""internlm-kit: get the InternLM2 chat model running on your own machine and keep it running."""

__version__ = "0.1.0"
DEFAULT_REPO = "internlm/internlm2-chat-1_8b"
