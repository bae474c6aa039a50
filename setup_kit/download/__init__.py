"""`internlm-kit download`: get the model from wherever it is reachable, resume, and prove every byte.

Python users call :func:`download` with a :class:`DownloadRequest`; the CLI is a thin layer over it.
"""

from setup_kit.download.sources import SOURCES, DownloadRequest, DownloadResult, download

__all__ = ["SOURCES", "DownloadRequest", "DownloadResult", "download"]
