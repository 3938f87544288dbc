"""Fetching: the aiohttp session, the Downloader, retries, throttling and bandwidth."""
