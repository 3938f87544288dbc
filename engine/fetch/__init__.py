"""Fetching: the aiohttp session, the Downloader, retries, throttling and bandwidth."""

from engine.fetch.bandwidth import TokenBucket
from engine.fetch.download import Downloader, PartFile
from engine.fetch.session import open_session
from engine.fetch.throttle import AdaptiveLimiter

__all__ = ["AdaptiveLimiter", "Downloader", "PartFile", "TokenBucket", "open_session"]
