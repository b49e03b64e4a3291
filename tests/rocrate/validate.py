"""Runs roc-validator (the `rocrate-validator` command) without the network.

The validator resolves the crate's JSON-LD `@context`
(https://w3id.org/ro/crate/1.1/context) over HTTP; test machines reach no
such host. Requests for an RO-Crate context are answered here with the
context the `rocrate` package ships (rocrate/data/ro-crate.jsonld, the
RO-Crate context under CC0, which maps every term of the 1.1 context the
same way); any other request fails as offline. Arguments are the
validator's own.
"""

import io
import json
import re
import sys
from importlib.resources import files

import requests
import urllib3
from requests.adapters import HTTPAdapter

CONTEXT_URL = re.compile(r"^https?://w3id\.org/ro/crate/[0-9.]+/context/?$")
CONTEXT = files("rocrate").joinpath("data/ro-crate.jsonld").read_bytes()


def send(self, request, **_kwargs):
    if CONTEXT_URL.match(request.url or ""):
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(CONTEXT),
            headers={"Content-Type": "application/ld+json"},
            status=200,
            preload_content=False,
            request_url=request.url,
        )
        return self.build_response(request, raw)
    raise requests.ConnectionError(f"offline: no request to {request.url}")


HTTPAdapter.send = send

# rdflib's JSON-LD parser fetches contexts itself (urllib) where the
# validator does not route it through its HTTP client.
from rdflib.plugins.shared.jsonld import context as jsonld_context  # noqa: E402
from rdflib.plugins.shared.jsonld import util as jsonld_util  # noqa: E402

_source_to_json = jsonld_util.source_to_json


def source_to_json(source, *args, **kwargs):
    if isinstance(source, str) and CONTEXT_URL.match(source):
        return json.loads(CONTEXT), None
    return _source_to_json(source, *args, **kwargs)


jsonld_util.source_to_json = source_to_json
jsonld_context.source_to_json = source_to_json

from rocrate_validator.cli.main import cli  # noqa: E402

sys.exit(cli())
