"""Client side of the agent HTTP API: an async aiohttp client for http:// and unix:// agents."""

from nomad_client.api.client import (
    DEFAULT_ADDRESS,
    ApiClient,
    ApiConnectionError,
    ApiError,
    ApiResponse,
)

__all__ = ["DEFAULT_ADDRESS", "ApiClient", "ApiConnectionError", "ApiError", "ApiResponse"]
