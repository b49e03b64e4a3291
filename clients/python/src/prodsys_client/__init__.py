"""Python client of prodsys, the production request system, for notebooks and
science platforms.

    from prodsys_client import Client

    client = Client()                      # the local stack; or Client("host:50051", ...)
    submission = client.submit("examples/cta-irf-mc.json")
    request = client.wait_for_decision(submission.request_id)
    for snapshot in client.watch(request.production_id):
        print(snapshot.state, snapshot.counts.done, "/", snapshot.job_total)
    files = client.files(request.production_id)
"""

from .client import (
    DEFAULT_CATALOG,
    DEFAULT_INTAKE,
    DEFAULT_STATUS,
    Client,
    condition,
    request_message,
)
from .errors import Conflict, InvalidRequest, NotFound, ProdsysError, Timeout, Violation
from .models import (
    TERMINAL_STATES,
    JobCounts,
    JobPlan,
    OutputFile,
    Overlap,
    Period,
    PointingProduction,
    Production,
    ProductionRecord,
    Profile,
    Request,
    ResourceEstimate,
    Submission,
    Template,
    Validation,
)

__all__ = [
    "DEFAULT_CATALOG",
    "DEFAULT_INTAKE",
    "DEFAULT_STATUS",
    "TERMINAL_STATES",
    "Client",
    "condition",
    "Conflict",
    "InvalidRequest",
    "JobCounts",
    "JobPlan",
    "NotFound",
    "OutputFile",
    "Overlap",
    "Period",
    "PointingProduction",
    "ProdsysError",
    "Production",
    "ProductionRecord",
    "Profile",
    "Request",
    "ResourceEstimate",
    "Submission",
    "Template",
    "Timeout",
    "Validation",
    "Violation",
    "request_message",
]
