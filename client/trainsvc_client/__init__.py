"""trainsvc-client: submit training jobs to a trainsvc service, wait for them, read results.

from trainsvc_client import Client
with Client("http://127.0.0.1:8000", api_key="tsk_...") as client:
    job = client.submit({"dataset": {"name": "digits"}, "epochs": 5})
    job = client.wait(job.id, timeout=600)

Ids (of jobs, studies, checkpoints) are uuid.UUIDs or strings of one; any other id raises
InvalidId, a ValueError, before a request is sent. Every error is a TrainsvcError.
"""

from trainsvc_client._protocol import RetryPolicy
from trainsvc_client.aio import AsyncClient
from trainsvc_client.client import Client
from trainsvc_client.errors import (
    ApiError,
    Conflict,
    ConnectionFailed,
    InvalidId,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    TrainsvcError,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
    WaitTimedOut,
)
from trainsvc_client.models import Checkpoint, Epoch, Job
from trainsvc_client.sse import ServerSentEvent

__all__ = [
    "ApiError",
    "AsyncClient",
    "Checkpoint",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Epoch",
    "InvalidId",
    "InvalidRequest",
    "Job",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "ServerSentEvent",
    "TrainsvcError",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "WaitTimedOut",
]
